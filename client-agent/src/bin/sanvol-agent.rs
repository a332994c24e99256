//! `sanvol-agent`: the per-host agent (`run`) and the commands that drive a
//! running agent over its control socket (`attach`, `detach`, `list`,
//! `wait-ready`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use client_agent::agent::{Agent, AgentConfig, AttachRequest, AttachmentInfo};
use client_agent::config_file;
use client_agent::control::{self, ControlReply, ControlRequest};
use client_agent::devices::PoolOptions;
use client_agent::persist::{self, PersistRequest, Persisted};
use client_agent::session::SessionConfig;
use control_client::ControlAddr;
use volume_format::control::messages::OpenMode;
use volume_format::locks::LockRange;

use control_client::agent_api::DEFAULT_CONTROL_SOCKET;

/// The data path allocates per request (futures, buffers, channel slots) on
/// one I/O thread; mimalloc's thread-local free lists cost less per pair
/// than glibc's malloc there (bench/README.md, "The agent's allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
const DEFAULT_EXPORT_DIR: &str = "/run/sanvol/exports";

#[derive(Parser)]
#[command(
    name = "sanvol-agent",
    version,
    about = "sanvol client agent: attaches pool volumes and serves them as local NBD exports",
    long_about = "sanvol client agent.\n\n\
        `sanvol-agent run` connects to the metadata server (sanvol-mds), keeps this host's lease \
        renewed and does volume I/O directly against the pool's NBD devices. While it runs, \
        `attach`, `detach` and `list` talk to it over its local control socket.\n\n\
        Its options can also be set in a config file (`run --config`, default /etc/sanvol/agent.toml), \
        which lists the volumes to attach at every start too ([[volume]] tables; `attach --persist` adds \
        one, `detach --persist` removes it).\n\n\
        Example:\n  \
        sanvol-agent run --mds 127.0.0.1:7700 --key host.key --server-key mds.key.pub &\n  \
        sanvol-agent wait-ready\n  \
        URI=$(sanvol-agent attach db --mode exclusive)   # prints nbd+unix:///db?socket=...\n  \
        qemu-img info \"$URI\"\n  \
        sanvol-agent detach db"
)]
struct Cli {
    /// The running agent's control socket.
    #[arg(long, global = true, env = "SANVOL_AGENT_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// How log lines are written on stderr (filter with SANVOL_LOG).
    #[arg(long, global = true, env = "SANVOL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: ops::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (in the foreground; stop with Ctrl-C or SIGTERM, which flushes and closes every volume).
    Run(Box<RunArgs>),
    /// Attach a volume and print its NBD URI.
    Attach {
        /// Volume name (as in `sanvol volume list`).
        volume: String,
        /// How to open it. A second exclusive open anywhere is refused by the server.
        #[arg(long, value_enum, default_value = "exclusive")]
        mode: Mode,
        /// Serve on this unix socket (default: EXPORT_DIR/VOLUME.sock).
        #[arg(long, conflicts_with = "tcp")]
        socket: Option<PathBuf>,
        /// Serve on TCP instead, loopback only (e.g. 127.0.0.1:10809; port 0 picks one).
        #[arg(long)]
        tcp: Option<SocketAddr>,
        /// Print the whole attachment as JSON instead of just the URI.
        #[arg(long)]
        json: bool,
        /// Also connect it to the kernel NBD driver and print the device (`/dev/nbdX`) instead of the URI.
        #[arg(long, conflicts_with_all = ["socket", "tcp"])]
        kernel: bool,
        /// With --kernel: use this device (default: the first free one).
        #[arg(long, requires = "kernel")]
        nbd_device: Option<String>,
        /// Attach with a handover token (a file, or hex) that the holder's `sanvol-agent handover` printed:
        /// live migration — both hosts hold the volume until the holder detaches. The mode is the holder's.
        /// (Socket exports only for now: not with --kernel.)
        #[arg(long, conflicts_with = "kernel")]
        handover_token: Option<String>,
        /// Also add the volume to the agent's config file (`run --config`, default /etc/sanvol/agent.toml),
        /// so that every start of the agent attaches it again the same way (a kernel attach on the same
        /// /dev/nbdX). The file is rewritten atomically, keeping its comments. A plain `detach` leaves the
        /// entry; `detach --persist` removes it.
        #[arg(long, conflicts_with = "handover_token")]
        persist: bool,
        /// With --mode shared: take exclusive byte-range locks START+LEN[,START+LEN…] (bytes, or with
        /// K, M, G, T) on the volume. Another agent's overlapping lock refuses the attach, naming its
        /// holder; every agent holding the volume refuses writes into another handle's locked bytes.
        /// Locks end when the volume is detached (or its handle is broken). Advisory between sanvol
        /// agents: plain NBD devices do not enforce them.
        #[arg(long, value_parser = parse_locks, conflicts_with_all = ["kernel", "persist", "handover_token"])]
        lock: Option<LockList>,
    },
    /// Print a single-use handover token that lets the agent with key KEY.pub attach VOLUME while this
    /// agent still holds it (live migration); valid for two minutes.
    Handover {
        volume: String,
        /// The target agent's public key (file, `sanvol-ed25519 HEX` line or hex).
        #[arg(long)]
        to: String,
    },
    /// Flush, stop the export and close the volume's handle. A volume in the agent's config file
    /// (`attach --persist`, [[volume]]) is attached again at the agent's next start unless --persist is given.
    Detach {
        volume: String,
        /// Also remove the volume from the agent's config file, so that the next start does not attach it
        /// (also for a persisted volume that is not attached, e.g. one that keeps failing to attach).
        #[arg(long)]
        persist: bool,
    },
    /// List attached volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Wait until the agent answers on its control socket (it does once connected to the metadata server).
    WaitReady {
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Write man pages or shell completions (for packagers; see docs/operations.md).
    #[command(subcommand, hide = true)]
    Generate(ops::docs::Generate),
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Exclusive read-write.
    Exclusive,
    /// Shared read-write (the users coordinate, e.g. a cluster filesystem).
    Shared,
    /// Read-only.
    Ro,
}

impl From<Mode> for OpenMode {
    fn from(m: Mode) -> OpenMode {
        match m {
            Mode::Exclusive => OpenMode::Exclusive,
            Mode::Shared => OpenMode::SharedWrite,
            Mode::Ro => OpenMode::ReadOnly,
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The config file: any of these options (`server_key = "..."`, `mds = ["a:7700", "b:7700"]`) and the
    /// volumes to attach at start ([[volume]] tables: name, mode, socket or tcp or nbd_device; see
    /// docs/operations.md). Options given here or in the environment override the file's. A missing
    /// default file is no error; a missing given one is.
    #[arg(long, env = "SANVOL_AGENT_CONFIG", value_name = "FILE", default_value = client_agent::config_file::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Metadata server address: HOST:PORT or unix:PATH. Give it several times (or a comma list) for a
    /// server and its standbys: after losing the connection the agent tries each in turn. Required
    /// (here, in SANVOL_MDS or in the config file).
    #[arg(long, env = "SANVOL_MDS", value_delimiter = ',')]
    mds: Vec<String>,
    /// This agent's private key (from `sanvol keygen`); its public half must be authorized as an agent.
    /// Required.
    #[arg(long, env = "SANVOL_KEY")]
    key: Option<PathBuf>,
    /// The metadata server's public key (file, `sanvol-ed25519 HEX` line or hex); the agent refuses any
    /// other server. Required.
    #[arg(long, env = "SANVOL_SERVER_KEY")]
    server_key: Option<String>,
    /// Name shown by the server in listings and conflict messages (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Directory for volume export sockets.
    #[arg(long, env = "SANVOL_EXPORT_DIR", default_value = DEFAULT_EXPORT_DIR)]
    export_dir: PathBuf,
    /// Directory for the agent's state: the resume keys of the volumes it holds and how it serves
    /// them (mode 0600), so that a restarted agent (crash, kill -9, upgrade) takes them back at once
    /// instead of waiting for their leases to run out. One agent per directory (it is locked).
    #[arg(long, env = "SANVOL_AGENT_STATE_DIR", default_value = client_agent::state_dir::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Directory for the write-back cache logs of cached volumes (`sanvol volume cache`): one file
    /// per attached cached volume, `VOLUME.cachelog`, as large as the volume's cache and
    /// preallocated at attach (an attach fails with how much room is missing). Put it on a fast
    /// local disk. Default: `cache` in the --state-dir.
    #[arg(long, env = "SANVOL_AGENT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Memory per cached volume for clean blocks read from its devices (least recently used go
    /// first), so that re-reads of a slow or distant device come from memory. Kept only from
    /// reads of up to 256 KiB; dropped where the devices change. 0: every read the cache's own
    /// not yet destaged writes do not cover goes to the devices.
    #[arg(long, env = "SANVOL_AGENT_CACHE_READ_MIB", default_value_t = client_agent::cache::READ_CACHE_BYTES_DEFAULT >> 20,
          value_parser = clap::value_parser!(u64).range(0..=64 << 10))]
    cache_read_mib: u64,
    /// How long a cached volume's acknowledged writes may stay in its cache before they are
    /// written to the devices, in milliseconds, while nobody waits for them and less than a quarter
    /// of the cache is waiting: a block written again meanwhile is written to the devices once,
    /// and neighbouring blocks go in one device write. The writes are durable in the cache log
    /// (and its mirror) all the while. 0: write them to the devices at once. At most 60000.
    #[arg(long, env = "SANVOL_AGENT_CACHE_DESTAGE_HOLD_MS", default_value_t = client_agent::cache::DESTAGE_HOLD_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    cache_destage_hold_ms: u64,
    /// After a snapshot, the first write to each 64 KiB chunk must first copy the chunk's old
    /// bytes for the snapshot. Up to this many KiB of such writes per volume (exclusive holders)
    /// are acknowledged at once and completed in the background, as a disk's volatile write
    /// cache does: a FLUSH waits for them and fails if one failed, reads and overlapping requests
    /// see them, FUA writes go in line. 0: every such write waits for its copy. At most 4 GiB.
    #[arg(long, env = "SANVOL_AGENT_COW_WRITE_BEHIND_KIB", default_value_t = client_agent::cow_behind::DEFAULT_BUDGET_BYTES / 1024,
          value_parser = clap::value_parser!(u64).range(0..=4 << 20))]
    cow_write_behind_kib: u64,
    /// How long the shutdown after SIGTERM/SIGINT may take to flush and close every volume; past it
    /// (or on a second signal) the agent exits as after a crash, and a restart with the same
    /// --state-dir resumes the volumes.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    shutdown_timeout_ms: u64,
    /// NBD connections per device (used when the device's server allows several).
    #[arg(long, default_value_t = 2)]
    device_connections: usize,
    /// The longest a direct device request may take: after it, the request fails (or goes
    /// through the metadata server) and its device connection is closed. Must not exceed the
    /// metadata server's device_request_max_ms, which it waits past a lease before handing
    /// the volume to anyone else (the fencing timing rules, docs/operations.md).
    #[arg(
        long,
        default_value_t = volume_format::fencing::DEVICE_REQUEST_MAX_MS_DEFAULT,
        value_parser = clap::value_parser!(u64).range(
            volume_format::fencing::DEVICE_REQUEST_MAX_MS_MIN..=volume_format::fencing::DEVICE_REQUEST_MAX_MS_MAX
        )
    )]
    device_request_max_ms: u64,
    /// Threads doing I/O. 1 (the default) runs every export and device
    /// connection on one thread: each request then crosses no thread
    /// boundary, which measured ~2x the IOPS of a multi-threaded runtime at
    /// 4k QD32 on a 2-core host shared with the workload (bench/agent.sh).
    /// Raise it on hosts with cores to spare and many busy volumes.
    #[arg(long, env = "SANVOL_AGENT_IO_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    io_threads: u16,
    /// Microseconds an I/O thread with nothing to run polls the socket its
    /// next request or reply is expected on before it sleeps, when the agent
    /// waits on one chain at queue depth 1: for the next request, or for a
    /// device's reply to the one request it passed on. Saves the
    /// wake-up at the end of each sleep, most of a 4k QD1 request's latency
    /// on a VM whose idle CPUs halt (bench/agent.sh: +13% 4k QD1 reads, +30%
    /// writes). Costs CPU: a QD1 stream keeps about one CPU busy; deeper
    /// queues and idle volumes never poll. Default 50 (0 on a one-CPU host,
    /// where polling would take the CPU from the application); 0 turns it off.
    #[arg(long, env = "SANVOL_AGENT_POLL_US", value_parser = clap::value_parser!(u64).range(0..=1000))]
    poll_us: Option<u64>,
    /// Kernel devices (`attach --kernel`): a request unanswered this long moves to a new socket
    /// (NBD_ATTR_TIMEOUT). Keep it above the longest stall a live agent may have.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    nbd_timeout_secs: u64,
    /// Kernel devices: how long I/O waits for an agent (restart, upgrade) before failing
    /// (NBD_ATTR_DEAD_CONN_TIMEOUT). The reattach window; keep it above the handles' lease.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
    nbd_dead_conn_timeout_secs: u64,
    /// Kernel devices: sockets per device (used only where the volume allows multi-connection).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    nbd_connections: u64,
    /// Reach devices recorded in the pool under host FROM at host TO instead (FROM=TO, repeatable),
    /// e.g. 127.0.0.1=10.0.2.2 for an agent in a VM whose host serves the devices on loopback.
    #[arg(long, value_parser = client_agent::kernel::reattach::parse_alias)]
    device_host_alias: Vec<(String, String)>,
    /// Reach the device the pool records as OLD (its whole NBD URI) at NEW instead
    /// (OLD=NEW, repeatable): hosts may reach devices by different addresses. Only this
    /// agent's direct path uses NEW; fallback through the metadata server uses the server's own.
    #[arg(long, value_parser = parse_device_uri)]
    device_uri: Vec<(String, String)>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9750; port 0 picks one
    /// and the log says which). Off by default.
    #[arg(long, env = "SANVOL_AGENT_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

fn parse_device_uri(s: &str) -> Result<(String, String), String> {
    // The first '=' that starts a new URI: OLD itself may contain '=' (query strings).
    let at = s
        .match_indices('=')
        .map(|(i, _)| i)
        .find(|i| s[i + 1..].starts_with("nbd"))
        .ok_or_else(|| format!("{s:?}: expected OLD=NEW, two NBD URIs"))?;
    let (old, new) = (&s[..at], &s[at + 1..]);
    for uri in [old, new] {
        uri.parse::<blockio::uri::NbdUri>().map_err(|e| format!("{uri:?} is not an NBD URI: {e}"))?;
    }
    Ok((old.to_string(), new.to_string()))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "agent".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

async fn run(args: RunArgs, control_socket: PathBuf, persisted: Arc<Persisted>) -> Result<()> {
    ops::host::log_idle_vcpu_note();
    let config_path = persisted.path().display().to_string();
    let missing = |what: &str, env: &str, key: &str| {
        let flag = key.replace('_', "-");
        anyhow::anyhow!("no {what} given: use --{flag} (or {env}, or `{key}` in {config_path})")
    };
    if args.mds.is_empty() {
        return Err(missing("metadata server address", "SANVOL_MDS", "mds"));
    }
    let key_path = args.key.clone().ok_or_else(|| missing("agent key", "SANVOL_KEY", "key"))?;
    let server_key_text =
        args.server_key.clone().ok_or_else(|| missing("server key", "SANVOL_SERVER_KEY", "server_key"))?;
    if let Some(addr) = args.metrics_addr {
        client_agent::metrics::init();
        let bound = ops::metrics::serve(addr).await?;
        println!("metrics http://{bound}/metrics");
    }
    let mut addrs = args
        .mds
        .iter()
        .map(|a| a.trim().parse::<ControlAddr>().map_err(|e: String| anyhow::anyhow!(e)).context("--mds"))
        .collect::<Result<Vec<_>>>()?;
    let addr = addrs.remove(0);
    let key = control_client::keys::load_private(&key_path)?;
    let (server_key, _) = control_client::keys::parse_public(&server_key_text).context("--server-key")?;
    // The lock on the state directory makes its instance ours (see client_agent::state_dir).
    let (state_dir, previous) = client_agent::state_dir::StateDir::open(&args.state_dir)?;
    let state_dir = std::sync::Arc::new(state_dir);
    if let Some(pid) = state_dir.previous_run_unclean() {
        // Its writes may still sit in a device server's queue (see client_agent::gate).
        client_agent::gate::hold_writes_until(
            blockio::clock::LeaseInstant::now() + Duration::from_millis(args.device_request_max_ms),
        );
        tracing::info!(
            previous_pid = pid,
            wait_ms = args.device_request_max_ms,
            "the previous run of this agent did not stop cleanly: writes wait --device-request-max-ms from now \
             (a write of it may still be queued in a device); reads and resumes go at once"
        );
    }
    let instance = previous.instance;
    let from_state: HashSet<String> = previous.handles.iter().map(|h| h.volume.clone()).collect();
    let config = AgentConfig {
        session: SessionConfig {
            addr,
            more_addrs: addrs,
            key,
            server_key,
            name: args.name.unwrap_or_else(hostname),
            instance,
        },
        export_dir: args.export_dir,
        pool: PoolOptions {
            connections_per_device: args.device_connections,
            request_timeout: Some(Duration::from_millis(args.device_request_max_ms)),
            uri_map: args.device_uri.into_iter().collect(),
            ..PoolOptions::default()
        },
        kernel: client_agent::kernel::KernelSettings {
            timeout_secs: args.nbd_timeout_secs,
            dead_conn_timeout_secs: args.nbd_dead_conn_timeout_secs,
            connections: args.nbd_connections as usize,
            ..Default::default()
        },
        host_aliases: args.device_host_alias.clone(),
        state: Some(state_dir.clone()),
        cache_dir: args.cache_dir.clone(),
        cow_write_behind_bytes: args.cow_write_behind_kib * 1024,
        cache_read_bytes: args.cache_read_mib << 20,
        cache_destage_hold: std::time::Duration::from_millis(args.cache_destage_hold_ms),
    };
    let agent = Agent::start(config);
    // The previous run's handles are resumed as soon as the server answers (in the background;
    // `list` shows each once it is served again).
    let (restored_tx, restored_rx) = tokio::sync::watch::channel(false);
    let restored = tokio::spawn({
        let agent = agent.clone();
        async move {
            let named = client_agent::kernel::reattach::restore_all(&agent, previous.handles).await.1;
            let _ = restored_tx.send(true);
            named
        }
    });

    let shutdown_max = std::time::Duration::from_millis(args.shutdown_timeout_ms);
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tracing::info!(mds = %args.mds.join(","), "connecting to the metadata server");
    tokio::select! {
        r = agent.wait_ready() => if let Err(e) = r {
            bail!("{e}");
        },
        _ = sigint.recv() => return bounded_shutdown(&agent, &state_dir, shutdown_max).await,
        _ = sigterm.recv() => return bounded_shutdown(&agent, &state_dir, shutdown_max).await,
    }

    if !client_agent::kernel::driver::loaded() {
        tracing::info!("{}; kernel attach is unavailable, socket exports work", client_agent::kernel::NOT_LOADED);
    }
    // The config file's volumes: each tried once before the agent says it is ready (bounded; those
    // that fail are retried in the background, see client_agent::persist).
    let persisted_devices = persisted.kernel_devices();
    let volumes = persisted.volumes().len();
    if volumes > 0 {
        tracing::info!(config = config_path, volumes, "attaching the config file's volumes");
        let first_tries = persist::attach_all(agent.clone(), persisted.clone(), from_state, restored_rx);
        tokio::select! {
            _ = tokio::time::timeout(persist::READY_WAIT_MAX, first_tries) => {}
            _ = sigint.recv() => return bounded_shutdown(&agent, &state_dir, shutdown_max).await,
            _ = sigterm.recv() => return bounded_shutdown(&agent, &state_dir, shutdown_max).await,
        }
    }
    // The control socket appears only now, so its existence means "ready".
    let listener = control::bind(&control_socket).await?;
    // Devices a previous agent left connected that neither the state file nor the config file
    // names get their volumes back by re-opening (in the background: the control socket answers
    // meanwhile).
    tokio::spawn({
        let agent = agent.clone();
        async move {
            let mut skip = restored.await.unwrap_or_default();
            skip.extend(persisted_devices);
            agent.reattach_kernel_devices(&skip).await;
        }
    });
    println!("ready control-socket={}", control_socket.display());
    tracing::info!(socket = %control_socket.display(), "agent ready");
    ops::notify::ready(&format!("connected; control socket {}", control_socket.display()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(control::serve_with(agent.clone(), Some(persisted), listener, control_socket, async move {
            let _ = stop_rx.await;
        }));
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    tracing::info!("shutting down: flushing and closing every volume");
    ops::notify::stopping();
    let _ = stop_tx.send(());
    let _ = server.await;
    // Bounded: with the devices or every metadata server gone, flushing and
    // closing could wait forever (and `systemctl stop` would hang). After
    // SHUTDOWN_MAX, or on a second signal, the agent exits as if it had
    // crashed: its handles stay at the server until they expire, and a
    // restart with the same --state-dir resumes them.
    tokio::select! {
        _ = agent.shutdown() => Ok(state_dir.stopped_cleanly()?),
        _ = tokio::time::sleep(shutdown_max) => bail!(
            "the shutdown did not finish within {} s (devices or metadata servers unreachable): volumes were not \
             all flushed and closed; their handles expire at the server, and restarting the agent with the same \
             --state-dir resumes them (--shutdown-timeout-ms)",
            shutdown_max.as_secs_f64()
        ),
        _ = sigint.recv() => bail!("interrupted again during the shutdown: volumes were not all flushed and closed"),
        _ = sigterm.recv() => bail!("terminated again during the shutdown: volumes were not all flushed and closed"),
    }
}

/// A shutdown before the agent was ready, bounded like the one after.
async fn bounded_shutdown(
    agent: &client_agent::agent::Agent,
    state_dir: &client_agent::state_dir::StateDir,
    max: std::time::Duration,
) -> Result<()> {
    match tokio::time::timeout(max, agent.shutdown()).await {
        Ok(()) => Ok(state_dir.stopped_cleanly()?),
        Err(_) => bail!("the shutdown did not finish within {} s (--shutdown-timeout-ms)", max.as_secs_f64()),
    }
}

async fn call(socket: &std::path::Path, request: ControlRequest) -> Result<ControlReply> {
    let reply = control::call(socket, &request).await.map_err(anyhow::Error::msg)?;
    if !reply.ok {
        // The agent's (and the server's) message, verbatim.
        bail!("{}", reply.error.unwrap_or_else(|| "the agent reported an unspecified failure".into()));
    }
    Ok(reply)
}

/// The ranges of one `--lock START+LEN[,…]`.
#[derive(Debug, Clone)]
struct LockList(Vec<LockRange>);

fn parse_locks(s: &str) -> Result<LockList, String> {
    volume_format::locks::parse_lock_spec(s).map(LockList)
}

fn print_table(volumes: &[AttachmentInfo]) {
    if volumes.is_empty() {
        println!("no volumes attached");
        return;
    }
    println!("{:<20} {:<13} {:>7} {:>5} {:<14} EXPORT", "VOLUME", "MODE", "HANDLE", "GEN", "STATE");
    for v in volumes {
        println!(
            "{:<20} {:<13} {:>7} {:>5} {:<14} {}",
            v.volume, v.mode, v.handle, v.layout_generation, v.state, v.export_uri
        );
        if !v.state_detail.is_empty() {
            println!("  {}", v.state_detail);
        }
        if let Some(device) = &v.kernel_device {
            println!("  kernel device {device}");
        }
        for lock in &v.locks {
            println!("  lock {lock}");
        }
        if !v.recovery.is_empty() {
            println!("  recovery {}", v.recovery);
        }
        if v.writes_behind > 0 {
            println!(
                "  {} writes acknowledged before the snapshot's copy of their chunk, landing now (a FLUSH waits for them)",
                v.writes_behind
            );
        }
        if let Some(c) = &v.cache {
            let state =
                if c.state_detail.is_empty() { c.state.clone() } else { format!("{} ({})", c.state, c.state_detail) };
            println!(
                "  cache {state}: {} dirty, log {} of {} used, destaging {}/s ({} in {} device writes so far), {} written around ({})",
                human_bytes(c.dirty_bytes),
                human_bytes(c.log_used_bytes),
                human_bytes(c.log_capacity_bytes),
                human_bytes(c.destage_bytes_per_sec),
                human_bytes(c.destaged_bytes),
                c.destage_writes,
                human_bytes(c.written_around_bytes),
                c.log_path
            );
            if c.writes_waiting_for_mirror > 0 {
                println!(
                    "  cache: {} writes on the devices wait for the mirror to be emptied before they are acknowledged \
                     (the failed mirror may hold older writes under them)",
                    c.writes_waiting_for_mirror
                );
            }
            if c.read_cache_capacity_bytes > 0 {
                println!(
                    "  read cache: {} of {} clean blocks, {} reads from memory, {} from the devices",
                    human_bytes(c.read_cache_bytes),
                    human_bytes(c.read_cache_capacity_bytes),
                    c.read_hits,
                    c.read_misses
                );
            }
        }
    }
}

/// `1.5 MiB`-style sizes for the listing.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parses the command line; for `run`, with the config file's options under
/// it (see client_agent::config_file): each option the command line or the
/// environment does not set is added as if given on the command line, so
/// clap checks it like one.
fn parse_with_config() -> Result<(Cli, Option<Arc<Persisted>>)> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    let matches = command.clone().try_get_matches_from(&argv).unwrap_or_else(|e| e.exit());
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Command::Run(args) = &cli.command else { return Ok((cli, None)) };
    let run_matches = matches.subcommand_matches("run").context("run's arguments")?;
    let explicit = run_matches.value_source("config") != Some(clap::parser::ValueSource::DefaultValue);
    // Absolute: `attach --persist` rewrites it later, and says which file it changed.
    let path = std::path::absolute(&args.config).unwrap_or_else(|_| args.config.clone());
    let Some(file) = config_file::load(&path, explicit)? else {
        return Ok((cli, Some(Persisted::new(path, Vec::new()))));
    };
    let run_command = command.find_subcommand("run").context("the run command")?;
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for setting in &file.settings {
        setting.check(&path, run_command)?;
        let overridden = matches!(
            run_matches.value_source(&setting.key),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        );
        if !overridden {
            let arg = run_command.get_arguments().find(|a| a.get_id() == setting.key.as_str()).context("checked")?;
            extra.extend(setting.command_line(arg).into_iter().map(Into::into));
        }
    }
    let persisted = Persisted::new(path.clone(), file.volumes);
    if extra.is_empty() {
        return Ok((cli, Some(persisted)));
    }
    let cli = Cli::try_parse_from(argv.into_iter().chain(extra))
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim().trim_start_matches("error: ")))?;
    Ok((cli, Some(persisted)))
}

fn main() -> Result<()> {
    let (cli, persisted) = parse_with_config()?;
    if let Command::Generate(what) = &cli.command {
        return ops::docs::generate(<Cli as clap::CommandFactory>::command(), what);
    }
    let filter = std::env::var("SANVOL_LOG").unwrap_or_else(|_| "info".into());
    ops::logging::init(&filter, "info", cli.log_format);
    let io_threads = match &cli.command {
        Command::Run(args) => args.io_threads,
        _ => 1,
    };
    // Polling is for `run` (the data path); the other commands are one-shot.
    let poll = match &cli.command {
        Command::Run(args) => client_agent::io_runtime::poll_window(args.poll_us),
        _ => std::time::Duration::ZERO,
    };
    let runtime =
        client_agent::io_runtime::build(usize::from(io_threads), poll).context("starting the async runtime")?;
    runtime.block_on(main_async(cli, persisted))
}

async fn main_async(cli: Cli, persisted: Option<Arc<Persisted>>) -> Result<()> {
    let socket = cli.control_socket;
    match cli.command {
        Command::Run(args) => {
            let persisted = persisted.context("the config file")?;
            run(*args, socket, persisted).await
        }
        Command::Attach {
            volume, mode, socket: export_socket, tcp, json, kernel, nbd_device, persist: true, ..
        } => {
            let attach = AttachRequest { volume, mode: mode.into(), socket: export_socket, tcp, locks: Vec::new() };
            let request = PersistRequest { attach, kernel, nbd_device };
            let reply = call(&socket, ControlRequest::AttachPersist(request)).await?;
            let info = reply.attached.context("the agent's reply lacks the attachment")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{}", info.kernel_device.as_deref().unwrap_or(&info.export_uri));
            }
            eprintln!("sanvol-agent: volume {} added to {}", info.volume, reply.config.unwrap_or_default());
            if let Some(note) = &info.kernel_note {
                // As a plain `attach --kernel`: the entry is kept, the kernel device was not made.
                eprintln!("sanvol-agent: {note}; volume {} stays attached at {}", info.volume, info.export_uri);
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Attach { volume, mode, kernel: true, nbd_device, json, .. } => {
            let request = client_agent::kernel::KernelAttachRequest { volume, mode: mode.into(), nbd_device };
            let reply = call(&socket, ControlRequest::AttachKernel(request)).await?;
            let info = reply.attached.context("the agent's reply lacks the attachment")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            }
            match (&info.kernel_device, &info.kernel_note) {
                (Some(device), _) if !json => println!("{device}"),
                (Some(_), _) => {}
                (None, note) => {
                    eprintln!(
                        "sanvol-agent: {}; volume {} stays attached at {}",
                        note.as_deref().unwrap_or(client_agent::kernel::NOT_LOADED),
                        info.volume,
                        info.export_uri
                    );
                    std::process::exit(2);
                }
            }
            Ok(())
        }
        Command::Attach { volume, mode, socket: export_socket, tcp, json, handover_token, lock, .. } => {
            let locks = lock.map(|l| l.0).unwrap_or_default();
            if !locks.is_empty() && !matches!(mode, Mode::Shared) {
                bail!("--lock takes byte-range locks on a shared volume: attach with --mode shared");
            }
            let request = AttachRequest { volume, mode: mode.into(), socket: export_socket, tcp, locks };
            let request = match handover_token {
                Some(t) => {
                    let token = if std::path::Path::new(&t).is_file() {
                        std::fs::read_to_string(&t).with_context(|| format!("reading the handover token {t}"))?
                    } else {
                        t
                    };
                    ControlRequest::AttachHandover { request, token: token.trim().to_string() }
                }
                None => ControlRequest::Attach(request),
            };
            let reply = call(&socket, request).await?;
            let info = reply.attached.context("the agent's reply lacks the attachment")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{}", info.export_uri);
            }
            Ok(())
        }
        Command::Handover { volume, to } => {
            // Read a key file here, where the path makes sense, not in the agent.
            let to_key = if std::path::Path::new(&to).is_file() {
                std::fs::read_to_string(&to).with_context(|| format!("reading {to}"))?
            } else {
                to
            };
            let reply = call(&socket, ControlRequest::Handover { volume, to_key }).await?;
            println!("{}", reply.token.context("the agent's reply lacks the token")?);
            Ok(())
        }
        Command::Detach { volume, persist: false } => {
            call(&socket, ControlRequest::Detach { volume }).await?;
            Ok(())
        }
        Command::Detach { volume, persist: true } => {
            let reply = call(&socket, ControlRequest::DetachPersist { volume: volume.clone() }).await?;
            eprintln!("sanvol-agent: volume {volume} removed from {}", reply.config.unwrap_or_default());
            Ok(())
        }
        Command::List { json } => {
            let reply = call(&socket, ControlRequest::List).await?;
            let volumes = reply.volumes.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&volumes)?);
            } else {
                print_table(&volumes);
            }
            Ok(())
        }
        Command::Generate(what) => ops::docs::generate(<Cli as clap::CommandFactory>::command(), &what),
        Command::WaitReady { timeout_secs } => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
            loop {
                match control::call(&socket, &ControlRequest::Status).await {
                    Ok(reply) if reply.ok => return Ok(()),
                    Ok(reply) => bail!("{}", reply.error.unwrap_or_default()),
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        bail!("the agent did not become ready within {timeout_secs} s: {e}")
                    }
                    // A CLI polling a socket that does not exist yet; not test synchronisation.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    }
}
