//! Times one NBD FLUSH on an export: what a benchmark adds to a write row
//! whose server may acknowledge writes before they land (the agent's
//! writes behind a snapshot's copy, `bench/metadata.sh`), so that nothing
//! left outstanding at the end of the row is counted free.
//!
//! ```text
//! nbd_flush URI
//! ```
//! Prints the FLUSH's duration in seconds (the connection is made first and
//! not counted).

use std::time::Instant;

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;

fn main() {
    let Some(uri) = std::env::args().nth(1) else {
        eprintln!("usage: nbd_flush URI");
        std::process::exit(2)
    };
    let uri: NbdUri = uri.parse().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let flushed = runtime.block_on(async {
        let client = NbdClient::connect(&uri, ClientOptions::default()).await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        client.flush().await.map_err(|e| format!("flush: {e}"))?;
        let took = started.elapsed();
        client.disconnect().await;
        Ok::<_, String>(took)
    });
    match flushed {
        Ok(took) => println!("{:.6}", took.as_secs_f64()),
        Err(e) => {
            eprintln!("nbd_flush: {e}");
            std::process::exit(1)
        }
    }
}
