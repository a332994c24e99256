//! Drives an NBD export with sanvol's client and reports IOPS and MiB/s, so
//! the benchmark script can compare it with fio's libnbd engine on the same
//! export.
//!
//! ```text
//! nbd_client_bench URI PATTERN BLOCK_BYTES QUEUE_DEPTH SECONDS [--connections N] [--threads N] [--json]
//!   PATTERN: randread | randwrite | read | write
//! ```
//! Example: `nbd_client_bench 'nbd+unix:///?socket=/tmp/x.sock' randread 4096 32 10`
//!
//! QUEUE_DEPTH tasks each keep one request in flight. By default everything
//! runs on one thread (a current-thread runtime), like fio's single job, so
//! the comparison is per-core; `--threads N` uses a multi-thread runtime.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockio::client::{ClientOptions, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

fn usage() -> ! {
    eprintln!(
        "usage: nbd_client_bench URI randread|randwrite|read|write BLOCK_BYTES QUEUE_DEPTH SECONDS [--connections N] [--threads N] [--json]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        usage();
    }
    let uri: NbdUri = args[0].parse().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let pattern = match args[1].as_str() {
        "randread" => Pattern::RandRead,
        "randwrite" => Pattern::RandWrite,
        "read" => Pattern::SeqRead,
        "write" => Pattern::SeqWrite,
        _ => usage(),
    };
    let block_bytes: u32 = args[2].parse().unwrap_or_else(|_| usage());
    let queue_depth: usize = args[3].parse().unwrap_or_else(|_| usage());
    let seconds: f64 = args[4].parse().unwrap_or_else(|_| usage());
    let (mut connections, mut threads, mut json) = (1usize, 1usize, false);
    let mut rest = args[5..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--connections" => connections = rest.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "--threads" => threads = rest.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "--json" => json = true,
            _ => usage(),
        }
    }
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .expect("tokio runtime");
    rt.block_on(run(uri, pattern, block_bytes, queue_depth, Duration::from_secs_f64(seconds), connections, json));
}

async fn run(
    uri: NbdUri,
    pattern: Pattern,
    block_bytes: u32,
    queue_depth: usize,
    duration: Duration,
    connections: usize,
    json: bool,
) {
    let opts = ClientOptions { connections, ..ClientOptions::default() };
    let client = NbdClient::connect(&uri, opts).await.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let blocks = client.size() / block_bytes as u64;
    if blocks == 0 {
        eprintln!("export is smaller than one block");
        std::process::exit(1);
    }
    let payload = Bytes::from((0..block_bytes).map(|i| (i * 7 + 1) as u8).collect::<Vec<u8>>());
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..queue_depth {
        let (client, ops, errors, stop, seq, payload) =
            (client.clone(), ops.clone(), errors.clone(), stop.clone(), seq.clone(), payload.clone());
        workers.push(tokio::spawn(async move {
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            while !stop.load(Ordering::Relaxed) {
                let block = match pattern {
                    Pattern::RandRead | Pattern::RandWrite => {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % blocks
                    }
                    Pattern::SeqRead | Pattern::SeqWrite => seq.fetch_add(1, Ordering::Relaxed) % blocks,
                };
                let offset = block * block_bytes as u64;
                let r = match pattern {
                    Pattern::RandRead | Pattern::SeqRead => client.read(offset, block_bytes).await.map(|_| ()),
                    Pattern::RandWrite | Pattern::SeqWrite => client.write(offset, payload.clone(), false).await,
                };
                match r {
                    Ok(()) => ops.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("I/O error: {e}");
                        }
                        0
                    }
                };
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let secs = start.elapsed().as_secs_f64();
    client.disconnect().await;
    let n = ops.load(Ordering::Relaxed);
    let iops = n as f64 / secs;
    let mib_s = iops * block_bytes as f64 / (1024.0 * 1024.0);
    let errs = errors.load(Ordering::Relaxed);
    if json {
        println!("{{\"ops\":{n},\"seconds\":{secs:.3},\"iops\":{iops:.0},\"mib_per_s\":{mib_s:.1},\"errors\":{errs}}}");
    } else {
        println!("ops={n} seconds={secs:.2} iops={iops:.0} MiB/s={mib_s:.1} errors={errs}");
    }
    if errs > 0 {
        std::process::exit(1);
    }
}
