//! Serves an in-memory export with the `nbd` crate's (blocking, serial)
//! server: a reference peer for `bench/nbd-engine.sh`.
//!
//! `nbd_crate_server SOCKET_PATH SIZE_MIB` — prints `ready` once listening.
//! Connections are served one after another (fio opens one per job), all on
//! the same memory, so data written by one is read by the next.

use std::io::{Cursor, Write};
use std::os::unix::net::UnixListener;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(size_mib)) = (args.first(), args.get(1).and_then(|s| s.parse::<u64>().ok())) else {
        eprintln!("usage: nbd_crate_server SOCKET_PATH SIZE_MIB");
        std::process::exit(2);
    };
    let size = size_mib << 20;
    let mut data = Cursor::new(vec![0u8; size as usize]);
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    println!("ready");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        let export: nbd::server::Export<()> = nbd::server::Export { size, send_flush: true, ..Default::default() };
        if nbd::server::handshake(&mut conn, |_name| Ok(export)).is_err() {
            continue;
        }
        // The connection ends with an error when the client disconnects; serve the next.
        let _ = nbd::server::transmission(&mut conn, &mut data);
    }
    Ok(())
}
