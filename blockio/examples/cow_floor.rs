//! The floor of a copy-on-write first write, measured on a device: what a
//! 4 KiB first write to a 64 KiB chunk costs at least, whatever the metadata
//! protocol — the chunk's pre-image read, its FUA write to the snapshot's COW
//! area, then the write itself, one after the other (each must be done
//! before the next may start, or a crash could leave the snapshot without
//! its pre-image) — next to the plain 4 KiB write, on the same export in the
//! same run. `bench/metadata.sh` prints it beside the agent's figures.
//!
//! ```text
//! cow_floor URI SECONDS [CHUNK_BYTES]   (default 65536, the chunk size snapshots use)
//! ```
//! Prints one line: `plain_us=… copy_us=… first_write_us=… ratio=…` (means
//! at queue depth 1; ratio = plain / first write).
//!
//! Writes to the export's first 2 GiB: use a scratch device.

use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;

const BLOCK_BYTES: u64 = 4096;
/// Live chunks in the first GiB, their COW copies in the second.
const SPAN_BYTES: u64 = 1 << 30;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(uri), Some(seconds)) = (args.first(), args.get(1).and_then(|s| s.parse::<f64>().ok())) else {
        eprintln!("usage: cow_floor URI SECONDS [CHUNK_BYTES]");
        std::process::exit(2)
    };
    let chunk_bytes = match args.get(2).map(|s| s.parse::<u64>()) {
        None => 64 * 1024,
        Some(Ok(n)) if n >= BLOCK_BYTES && n.is_power_of_two() && n <= 1 << 20 => n,
        Some(_) => {
            eprintln!("cow_floor: CHUNK_BYTES must be a power of two from 4096 to 1048576");
            std::process::exit(2)
        }
    };
    let uri: NbdUri = uri.parse().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(uri, Duration::from_secs_f64(seconds), chunk_bytes)) {
        eprintln!("cow_floor: {e}");
        std::process::exit(1)
    }
}

async fn run(uri: NbdUri, each: Duration, chunk_bytes: u64) -> Result<(), String> {
    let client = NbdClient::connect(&uri, ClientOptions::default()).await.map_err(|e| e.to_string())?;
    if client.size() < 2 * SPAN_BYTES {
        return Err(format!("the export needs at least {} bytes", 2 * SPAN_BYTES));
    }
    let block = Bytes::from(vec![0x5a; BLOCK_BYTES as usize]);
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let chunks = SPAN_BYTES / chunk_bytes;

    // Plain 4 KiB random writes.
    let (mut n, started) = (0u64, Instant::now());
    while started.elapsed() < each {
        let offset = rng.next() % (SPAN_BYTES / BLOCK_BYTES) * BLOCK_BYTES;
        client.write(offset, block.clone(), false).await.map_err(|e| e.to_string())?;
        n += 1;
    }
    let plain_us = started.elapsed().as_secs_f64() * 1e6 / n as f64;

    // First writes: pre-image read, FUA copy, then the write.
    let (mut n, mut copy, started) = (0u64, Duration::ZERO, Instant::now());
    while started.elapsed() < each {
        let chunk = rng.next() % chunks;
        let copy_started = Instant::now();
        let pre_image = client.read(chunk * chunk_bytes, chunk_bytes as u32).await.map_err(|e| e.to_string())?;
        client.write(SPAN_BYTES + chunk * chunk_bytes, pre_image, true).await.map_err(|e| e.to_string())?;
        copy += copy_started.elapsed();
        let within = rng.next() % (chunk_bytes / BLOCK_BYTES) * BLOCK_BYTES;
        client.write(chunk * chunk_bytes + within, block.clone(), false).await.map_err(|e| e.to_string())?;
        n += 1;
    }
    let first_us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    let copy_us = copy.as_secs_f64() * 1e6 / n as f64;
    println!(
        "plain_us={plain_us:.1} copy_us={copy_us:.1} first_write_us={first_us:.1} ratio={:.3}",
        plain_us / first_us
    );
    Ok(())
}

/// A small deterministic generator (no dependency needed for offsets).
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
