//! Serves one NBD device through the agent's write-back cache
//! ([`client_agent::cache::CachedDevice`]), or straight through
//! (`--write-through`), as an NBD export on a unix socket: the process the
//! cache's crash tests kill and restart, and the two peers `bench/cache.sh`
//! compares in one run.
//!
//! `cache_serve --unix SOCK --device NBD_URI (--log PATH --log-mib N | --write-through) [--volume ID]`
//!
//! Or, mirrored at a metadata server (issue 15): `cache_serve --unix SOCK
//! --mds ADDR --key KEY --server-key PUB --volume-name NAME --log PATH`
//! opens NAME exclusively as an agent, renews its lease, and serves the
//! volume (its legs on the pool's devices) through a cache whose batches
//! are mirrored at the server ([`client_agent::cache::mirror`]); the log's
//! size is the volume's cache size.
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

const USAGE: &str = "usage: cache_serve --unix SOCK --device NBD_URI (--log PATH --log-mib N | --write-through) \
                     [--volume ID]\n   or: cache_serve --unix SOCK --mds ADDR --key KEY --server-key PUB \
                     --volume-name NAME --log PATH";

/// The agent's I/O runtime at its defaults (one thread, polling before it
/// sleeps on a host with CPUs to spare): the cache measured as the agent
/// runs it.
fn main() -> anyhow::Result<()> {
    let runtime = client_agent::io_runtime::build(1, client_agent::io_runtime::poll_window(None))?;
    runtime.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    if get("--mds").is_some() {
        return mirrored(&args).await;
    }
    let (Some(socket), Some(device)) = (get("--unix"), get("--device")) else { anyhow::bail!(USAGE) };
    let volume = VolumeId(get("--volume").map(|v| v.parse()).transpose()?.unwrap_or(1));
    let uri = device.parse().map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    let client: Arc<dyn BlockDevice> = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await?);
    let cache = if args.iter().any(|a| a == "--write-through") {
        None
    } else {
        let (Some(log), Some(log_mib)) = (get("--log"), get("--log-mib")) else { anyhow::bail!(USAGE) };
        let config = CacheConfig::new(PathBuf::from(log), log_mib.parse::<u64>()? << 20);
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

/// The mirrored mode (see the module doc).
async fn mirrored(args: &[String]) -> anyhow::Result<()> {
    use client_agent::cache::mirror::ControlMirror;
    use client_agent::gate::Gate;
    use client_agent::volume::{Layout, VolumeDevice};
    use control_client::ControlClient;
    use volume_format::control::auth::Role;
    use volume_format::control::messages::{OpenMode, Request, Response};

    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let need = |flag: &str| get(flag).ok_or_else(|| anyhow::anyhow!("{flag} missing\n{USAGE}"));
    let (socket, mds, key, server_key, name, log) = (
        need("--unix")?,
        need("--mds")?,
        need("--key")?,
        need("--server-key")?,
        need("--volume-name")?,
        need("--log")?,
    );
    let key = control_client::keys::load_private(std::path::Path::new(&key))?;
    let (server_key, _) = control_client::keys::parse_public(std::fs::read_to_string(&server_key)?.trim())?;
    let addr = mds.parse().map_err(|e| anyhow::anyhow!("--mds {mds}: {e}"))?;
    let (client, _events) =
        ControlClient::connect(&addr, &key, Some(&server_key), Role::Agent, "cache_serve", [9; 16]).await?;
    let Response::Opened(opened) =
        client.request(Request::Open { volume: name.clone(), mode: OpenMode::Exclusive }).await?
    else {
        anyhow::bail!("unexpected answer to Open")
    };
    let Response::MirrorOpened { cache: Some(setting) } =
        client.request(Request::MirrorOpen { handle: opened.handle }).await?
    else {
        anyhow::bail!("volume {name} has no cache: `sanvol volume cache {name}` first")
    };
    // Renew the lease while serving (the handle dies with this process).
    let renewing = {
        let client = client.clone();
        let every = std::time::Duration::from_millis((opened.lease_ms / 3).max(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = client.request(Request::Renew).await {
                    eprintln!("renewal failed: {e}");
                }
            }
        })
    };
    let description = opened.description.clone();
    let mut devices = std::collections::HashMap::new();
    for endpoint in &description.devices {
        let uri = endpoint.uri.parse().map_err(|e| anyhow::anyhow!("device {}: {e}", endpoint.uri))?;
        let device: Arc<dyn BlockDevice> = Arc::new(NbdClient::connect(&uri, ClientOptions::default()).await?);
        devices.insert(endpoint.index, device);
    }
    let layout = Layout::new(description.clone(), |e| {
        devices.get(&e.index).cloned().ok_or_else(|| format!("device {} not connected", e.index))
    })
    .map_err(|e| anyhow::anyhow!("volume layout: {e:?}"))?;
    let gate = Arc::new(Gate::new(Arc::new(layout), description.layout_generation));
    let volume_device: Arc<dyn BlockDevice> = Arc::new(VolumeDevice::new(&name, opened.handle.0, false, gate));
    let config = CacheConfig::new(PathBuf::from(log), setting.size_bytes);
    let mirror = Arc::new(ControlMirror::new(client.clone(), opened.handle));
    let cache = Arc::new(CachedDevice::open_mirrored(volume_device, description.volume, &config, mirror).await?);
    eprintln!(
        "volume {name} (handle {}): cache log {}: {} records replayed; {}",
        opened.handle,
        config.log_path.display(),
        cache.replayed_records(),
        cache.report().mirror
    );
    let server = NbdServer::new(Arc::new(ExportTable::single(String::new(), cache.clone())), ServerConfig::default());
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
    cache.destage_all().await;
    renewing.abort();
    client.request(Request::Close { handle: opened.handle }).await?;
    Ok(())
}
