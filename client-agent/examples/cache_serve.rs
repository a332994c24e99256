//! Serves one NBD device through the agent's write-back cache
//! ([`client_agent::cache::CachedDevice`]), or straight through
//! (`--write-through`), as an NBD export on a unix socket: the process the
//! cache's crash tests kill and restart, and the two peers `bench/cache.sh`
//! compares in one run.
//!
//! `cache_serve --unix SOCK --device NBD_URI (--log PATH --log-mib N | --write-through) [--volume ID]`
//!
//! Opening the cache replays an old log at PATH to the device first; "ready"
//! is printed once the export listens (so after any replay). SIGTERM or
//! ctrl-c destages the cache, then exits.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use blockio::client::{ClientOptions, NbdClient};
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::BlockDevice;
use client_agent::cache::{CacheConfig, CachedDevice};
use tokio::signal::unix::{signal, SignalKind};
use volume_format::VolumeId;

const USAGE: &str =
    "usage: cache_serve --unix SOCK --device NBD_URI (--log PATH --log-mib N | --write-through) [--volume ID]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let (Some(socket), Some(device)) = (get("--unix"), get("--device")) else { anyhow::bail!(USAGE) };
    let volume = VolumeId(get("--volume").map(|v| v.parse()).transpose()?.unwrap_or(1));
    let uri = device.parse().map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    let client: Arc<dyn BlockDevice> = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await?);
    let cache = if args.iter().any(|a| a == "--write-through") {
        None
    } else {
        let (Some(log), Some(log_mib)) = (get("--log"), get("--log-mib")) else { anyhow::bail!(USAGE) };
        let config = CacheConfig { log_path: PathBuf::from(log), log_bytes: log_mib.parse::<u64>()? << 20 };
        let cache = CachedDevice::open(client.clone(), volume, &config).await?;
        eprintln!("cache log {}: {} records replayed", config.log_path.display(), cache.replayed_records());
        Some(Arc::new(cache))
    };
    let served: Arc<dyn BlockDevice> = match &cache {
        Some(cache) => cache.clone(),
        None => client,
    };
    let server = NbdServer::new(Arc::new(ExportTable::single(String::new(), served)), ServerConfig::default());
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    println!("ready");
    std::io::stdout().flush()?;
    server.serve_unix(listener, shutdown).await?;
    if let Some(cache) = cache {
        cache.destage_all().await;
    }
    Ok(())
}
