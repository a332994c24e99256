//! Serves a memory or file device over NBD with blockio's server.
//!
//! Used by the benchmarks (`bench/nbd-engine.sh`) and handy by hand:
//!
//! ```text
//! cargo run --release -p blockio --example nbd_serve -- --unix /tmp/d.sock --memory 1G
//! cargo run --release -p blockio --example nbd_serve -- --tcp 127.0.0.1:10809 --file disk.img
//! ```
//! Prints `ready` on stdout once the socket accepts connections.
//!
//! `--threads N` (default 1) sets the runtime's worker threads. One thread
//! is how the agent serves its exports (`sanvol-agent run --io-threads 1`):
//! no request crosses a thread, so none pays a cross-thread wake-up.
//!
//! `--connection-threads N` serves each connection on N blocking threads;
//! `--poll-us U` makes those threads poll the socket for up to U µs before
//! they sleep (`ServerConfig::poll_before_block`).

use std::io::Write;
use std::sync::Arc;

use blockio::file::FileDevice;
use blockio::memory::MemoryDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::BlockDevice;

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

const USAGE: &str = "usage: nbd_serve (--unix PATH | --tcp ADDR) (--memory SIZE | --file PATH) [--name EXPORT] \
                     [--threads N] [--connection-threads N] [--poll-us U]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let threads: usize = match get("--threads") {
        Some(n) => n.parse().ok().filter(|n| *n >= 1).ok_or(USAGE)?,
        None => 1,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let name = get("--name").unwrap_or_default();
    let device: Arc<dyn BlockDevice> = match (get("--memory"), get("--file")) {
        (Some(size), None) => Arc::new(MemoryDevice::new(parse_size(&size).ok_or(USAGE)?)),
        (None, Some(path)) => Arc::new(FileDevice::open(path, false)?),
        _ => return Err(USAGE.into()),
    };
    let connection_threads = match get("--connection-threads") {
        Some(n) => n.parse().map_err(|_| USAGE)?,
        None => ServerConfig::default().connection_threads,
    };
    let poll_before_block = match get("--poll-us") {
        Some(us) => std::time::Duration::from_micros(us.parse().map_err(|_| USAGE)?),
        None => ServerConfig::default().poll_before_block,
    };
    let config = ServerConfig { connection_threads, poll_before_block, ..ServerConfig::default() };
    let server = NbdServer::new(Arc::new(ExportTable::single(name, device)), config);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match (get("--unix"), get("--tcp")) {
        (Some(path), None) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)?;
            println!("ready");
            std::io::stdout().flush()?;
            server.serve_unix(listener, shutdown).await?;
        }
        (None, Some(addr)) => {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            println!("ready {}", listener.local_addr()?);
            std::io::stdout().flush()?;
            server.serve_tcp(listener, shutdown).await?;
        }
        _ => return Err(USAGE.into()),
    }
    Ok(())
}
