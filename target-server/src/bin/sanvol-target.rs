//! `sanvol-target`: serves one local file or block device to a sanvol pool
//! over NBD, and fences (see the `target_server` crate docs and
//! docs/operations.md, "Fencing with sanvol-target").

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use blockio::file::FileDevice;
use blockio::server::{NbdServer, ServerConfig, ServerTls};
use clap::Parser;
use target_server::exports::TargetExports;
use target_server::fencer::Fencer;
use target_server::state_file::StateFile;
use tracing::info;
use volume_format::label::{DeviceLabel, LABEL_BYTES};
use volume_format::PublicKey;

#[derive(Debug, Parser)]
#[command(
    name = "sanvol-target",
    version,
    about = "An NBD server for one local file or disk that fences for a sanvol pool",
    long_about = "Serves one local file or block device to a sanvol pool over NBD. Every connection \
        must present a capability signed by one of the pool's metadata servers (--server-key) in its \
        export name; writes outside its ranges or under a generation the metadata server has since \
        fenced are refused with EPERM, and a fence order is acknowledged only once no older \
        connection of that holder is open."
)]
#[command(subcommand_negates_reqs = true)]
struct Args {
    /// The file or block device to serve.
    #[arg(long, value_name = "PATH", required = true)]
    device: Option<PathBuf>,
    /// Listen on this unix socket (nbd+unix:///NAME?socket=PATH).
    #[arg(long, value_name = "PATH", conflicts_with = "tcp")]
    unix: Option<PathBuf>,
    /// Listen on this TCP address (nbd://HOST:PORT/NAME).
    #[arg(long, value_name = "ADDR")]
    tcp: Option<std::net::SocketAddr>,
    /// The export name (the URI's path); the empty name selects it too.
    #[arg(long, value_name = "NAME", default_value = "")]
    name: String,
    /// A public key of the pool's metadata servers (a .pub file, its line,
    /// or 64 hex digits); repeat for each server of the pool.
    #[arg(long = "server-key", value_name = "KEY", required = true)]
    server_keys: Vec<String>,
    /// Where the raised generations are kept (they must survive restarts).
    #[arg(long, value_name = "DIR", required = true)]
    state_dir: Option<PathBuf>,
    /// Offer TLS with the certificates in DIR (server-cert.pem,
    /// server-key.pem, ca-cert.pem: nbdkit's layout) and refuse clients
    /// without it.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Threads per client connection, taking turns at the socket with
    /// blocking reads and writes; the device's calls run on them. At most
    /// this many requests of one connection are in flight at once. 0 serves
    /// each connection as one async task (its requests run on the blocking
    /// pool); TLS connections always are.
    #[arg(long, value_name = "N", default_value_t = 4)]
    connection_threads: usize,
    /// With connection threads: a thread waiting for a client's next
    /// request polls the socket (yielding the CPU) for up to this many
    /// microseconds before it sleeps. Lower latency at queue depth 1,
    /// most of all on virtual machines whose idle vCPUs halt; costs up to
    /// that much CPU time after every request. 0 (the default) never polls.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    poll_us: u64,
    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
    #[command(subcommand)]
    generate: Option<Generate>,
}

#[derive(Debug, clap::Subcommand)]
enum Generate {
    /// Write man pages or shell completions (for packagers; see docs/operations.md).
    #[command(subcommand, hide = true)]
    Generate(ops::docs::Generate),
}

/// The device UUID of the label at offset 0, if there is a sanvol label.
fn label_reader(path: PathBuf) -> target_server::exports::LabelReader {
    Arc::new(move || {
        let file = std::fs::File::open(&path).ok()?;
        let mut block = vec![0u8; LABEL_BYTES];
        file.read_exact_at(&mut block, 0).ok()?;
        DeviceLabel::decode(&block).ok().map(|l| l.device_uuid)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
                _ = term.recv() => info!("SIGTERM received"),
            }
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (Some(device_path), Some(state_dir)) = (args.device.clone(), args.state_dir.clone()) else {
        bail!("--device PATH and --state-dir DIR are required");
    };
    let mut trusted = Vec::new();
    for spec in &args.server_keys {
        let (key, _) = control_client::keys::parse_public(spec).with_context(|| format!("--server-key {spec}"))?;
        trusted.push(PublicKey(key.to_bytes()));
    }
    let device = FileDevice::open(&device_path, false).with_context(|| format!("opening {}", device_path.display()))?;
    let fencer = Fencer::new(Some(StateFile::new(&state_dir))).context("loading the raised generations")?;
    let exports = TargetExports {
        name: args.name.clone(),
        device: Arc::new(device),
        fencer,
        trusted,
        device_uuid: label_reader(device_path.clone()),
        detail: device_path.display().to_string(),
    };
    let mut config = ServerConfig {
        connection_threads: args.connection_threads,
        poll_before_block: std::time::Duration::from_micros(args.poll_us),
        ..ServerConfig::default()
    };
    if let Some(dir) = &args.tls_dir {
        let tls =
            blockio::tls::server_from_dir(dir, false).with_context(|| format!("TLS setup from {}", dir.display()))?;
        config.tls = Some(ServerTls { config: tls, required: true });
    }
    let server = NbdServer::new(Arc::new(exports), config);
    match (&args.unix, &args.tcp) {
        (Some(path), None) => {
            let _ = std::fs::remove_file(path);
            let listener =
                tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
            println!("listening on unix:{}", path.display());
            server.serve_unix(listener, shutdown_signal()).await?;
        }
        (None, Some(addr)) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
            println!("listening on {}", listener.local_addr()?);
            server.serve_tcp(listener, shutdown_signal()).await?;
        }
        _ => bail!("give --unix PATH or --tcp ADDR"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Generate::Generate(what)) = &args.generate {
        return match ops::docs::generate(<Args as clap::CommandFactory>::command(), what) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sanvol-target: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    ops::host::log_idle_vcpu_note();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sanvol-target: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
