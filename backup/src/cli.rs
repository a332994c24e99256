//! `sanvol-backup`'s command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use blockio::uri::NbdUri;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use volume_format::control::auth::Role;

use crate::job::{self, JobOptions};
use crate::progress::{fmt_bytes, ProgressMode};
use crate::repo::{rfc3339, scan_dir, Manifest};
use crate::source::{mds_conn, SnapshotRef, Source};
use crate::verify::{self, Depth};
use crate::{restore, serve};
use control_client::agent_api::AttachRequest;
use control_client::agent_api::ControlRequest;

#[derive(Debug, Parser)]
#[command(
    name = "sanvol-backup",
    version,
    about = "Full and incremental backups of sanvol snapshots: make, restore, verify, list",
    long_about = "Full and incremental backups of sanvol snapshots.\n\n\
        Snapshots are read from the metadata server's backup pseudo-device over NBD (--mds, --key, \
        --server-key, or SANVOL_MDS, SANVOL_KEY, SANVOL_SERVER_KEY; the key must be authorized with role \
        backup or admin), or from any NBD server that exports VOLUME@SNAPSHOT names (--source NBD-URI, e.g. \
        a `sanvol-backup serve` socket).\n\n\
        A backup repository is a directory holding one chain: a full backup, then incrementals, each holding \
        the 64 KiB chunks written since the snapshot before it (from the sanvol:changed-since:OLD block-status \
        context). Every chunk is checksummed (crc32c); restore verifies the whole chain before writing anything.\n\n\
        Typical use:\n  \
        sanvol-backup full db@mon --to /backups/db\n  \
        sanvol-backup incremental db@tue --since mon --to /backups/db\n  \
        sanvol-backup verify /backups/db\n  \
        sanvol-backup restore /backups/db --to nbd://10.0.0.9/scratch --upto tue\n\n\
        Exit status: 0 on success, 1 on any failure (including a damaged chain), 2 on bad usage."
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Log filter for diagnostics on stderr (tracing syntax, e.g. info or
    /// backup=debug,blockio=info).
    #[arg(long, global = true, env = "SANVOL_LOG", value_name = "FILTER", default_value = "warn")]
    pub log: String,
    /// How log lines are written on stderr.
    #[arg(long, global = true, env = "SANVOL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: ops::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Where snapshots come from.
#[derive(Debug, Args, Clone)]
pub struct ConnArgs {
    /// Metadata server address: HOST:PORT or unix:PATH.
    #[arg(long, global = true, env = "SANVOL_MDS", value_name = "ADDR")]
    pub mds: Option<String>,
    /// Private key (made by `sanvol keygen`) authorized with role backup or
    /// admin (`sanvol client add KEY.pub --role backup`).
    #[arg(long, global = true, env = "SANVOL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The metadata server's public key (file, `sanvol-ed25519 HEX` line or
    /// hex); a server that cannot prove it holds this key is refused.
    #[arg(long, global = true, env = "SANVOL_SERVER_KEY", value_name = "PUB")]
    pub server_key: Option<String>,
    /// Role to authenticate as: backup or admin. Default: backup, and admin
    /// if the server says the key is registered as an admin.
    #[arg(long, global = true, value_name = "ROLE")]
    pub role: Option<Role>,
    /// Read snapshots from this NBD server instead of the metadata server
    /// (nbd://HOST:PORT or nbd+unix:///?socket=PATH; the export name is
    /// replaced by VOLUME@SNAPSHOT). Takes precedence over --mds.
    #[arg(long, global = true, env = "SANVOL_BACKUP_SOURCE", value_name = "NBD-URI")]
    pub source: Option<String>,
}

/// Data movement tuning.
#[derive(Debug, Args, Clone)]
pub struct Tuning {
    /// NBD connections to open (to the snapshot, or to the restore target).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub connections: u64,
    /// Requests of up to 1 MiB kept in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub queue_depth: u64,
    /// Progress on stderr: a bar on a terminal and log lines every 10 %
    /// otherwise (auto), always log lines (lines), or nothing (none). The
    /// summary line on stdout is always printed.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    Auto,
    Lines,
    None,
}

impl Tuning {
    fn options(&self) -> JobOptions {
        JobOptions {
            connections: self.connections as usize,
            queue_depth: self.queue_depth as usize,
            progress: match self.progress {
                ProgressArg::Auto => ProgressMode::Auto,
                ProgressArg::Lines => ProgressMode::Lines,
                ProgressArg::None => ProgressMode::Quiet,
            },
            ..JobOptions::default()
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Back up a whole snapshot: starts a new chain in DIR.
    ///
    /// DIR is created if needed and must hold no backups yet (one chain per
    /// directory), unless --force. Holes and zero ranges (from
    /// base:allocation) are not read, and all-zero chunks are not stored;
    /// both are recorded as zero chunks, which restore writes as zeroes.
    Full {
        /// The snapshot, as VOLUME@SNAPSHOT.
        snapshot: SnapshotRef,
        /// The backup repository (a directory).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Replace the chain DIR already holds. The old backups are deleted
        /// only once the new full backup is complete.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Back up only the chunks written since an older snapshot, continuing
    /// the chain in DIR.
    ///
    /// The newest backup in DIR must be of VOLUME@OLDSNAP (chain
    /// continuity); the changed chunks come from the snapshot's
    /// sanvol:changed-since:OLDSNAP block-status context. If the volume
    /// grew, everything past the old size is read too.
    Incremental {
        /// The newer snapshot, as VOLUME@SNAPSHOT.
        snapshot: SnapshotRef,
        /// The older snapshot (of the same volume) the newest backup in DIR
        /// was made of.
        #[arg(long, value_name = "OLDSNAP")]
        since: String,
        /// The backup repository holding the chain.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Write the snapshot a chain recorded to an NBD export or a sanvol volume.
    ///
    /// Verifies the chain up to --upto first, every chunk's checksum
    /// included, and writes nothing if any of it is damaged. The target must
    /// be writable and at least as large as the snapshot; bytes past the
    /// snapshot's size are left alone. Zero chunks are written with
    /// WRITE_ZEROES (or zeroes, if the export lacks it); the target is
    /// flushed at the end.
    Restore {
        /// The backup repository.
        dir: PathBuf,
        /// Target: an NBD URI (nbd://HOST[:PORT]/EXPORT or
        /// nbd+unix:///EXPORT?socket=PATH), or `volume:NAME` for a sanvol
        /// volume, which the local sanvol-agent attaches exclusively for the
        /// restore and detaches afterwards (create it first with `sanvol
        /// volume create NAME SIZE`). Its contents are overwritten.
        #[arg(long, value_name = "NBD-URI|volume:NAME")]
        to: String,
        /// The local sanvol-agent's control socket, for `--to volume:NAME`.
        #[arg(long, env = "SANVOL_AGENT_SOCKET", value_name = "PATH",
              default_value = control_client::agent_api::DEFAULT_CONTROL_SOCKET)]
        agent_socket: PathBuf,
        /// Restore the state of this snapshot (a snapshot name in the
        /// chain; default: the newest backup).
        #[arg(long, value_name = "SNAP")]
        upto: Option<String>,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Check every backup in DIR: the chain's structure, manifests, indexes
    /// and every chunk's checksum. Exits 1 naming what is damaged.
    Verify {
        /// The backup repository.
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Progress on stderr (auto, lines, none).
        #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
        progress: ProgressArg,
    },
    /// List the chain in DIR: kind, snapshot, since, size, chunks, bytes
    /// stored, creation time.
    List {
        /// The backup repository.
        dir: PathBuf,
        /// Print the manifests as JSON (field names are stable).
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots on the metadata server (or the VOLUME@SNAPSHOT
    /// exports of --source).
    Snapshots {
        /// Only this volume's snapshots.
        volume: Option<String>,
        /// Print as JSON (the protocol's SnapshotInfo fields).
        #[arg(long)]
        json: bool,
    },
    /// Serve the snapshots on a local unix socket for standard NBD tools.
    ///
    /// Every connection to PATH gets its own backup channel to the metadata
    /// server (or connection to --source), so `nbdinfo --list
    /// 'nbd+unix:///?socket=PATH'`, `nbdinfo --map=sanvol:changed-since:OLD
    /// 'nbd+unix:///VOL@SNAP?socket=PATH'`, nbdcopy and qemu-img work on
    /// snapshots. Prints `serving snapshots on PATH` once listening; stops
    /// on SIGINT or SIGTERM and removes the socket. The socket is mode 0600.
    Serve {
        /// The unix socket to listen on (a stale socket is replaced).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9752; port 0 picks one and
        /// stdout says which): per export reads, bytes, read latency, open sessions and errors.
        #[arg(long, env = "SANVOL_BACKUP_METRICS_ADDR", value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Write man pages or shell completions (for packagers; see docs/operations.md).
    #[command(subcommand, hide = true)]
    Generate(ops::docs::Generate),
}

fn source(conn: &ConnArgs) -> Result<Source> {
    if let Some(uri) = &conn.source {
        let uri: NbdUri = uri.parse().map_err(|e: blockio::uri::UriError| anyhow!(e)).context("parsing --source")?;
        return Ok(Source::Uri(uri));
    }
    let mds = conn.mds.as_deref().ok_or_else(|| {
        anyhow!("no metadata server given: use --mds HOST:PORT or unix:PATH (or SANVOL_MDS), or --source NBD-URI")
    })?;
    let key = conn.key.as_ref().ok_or_else(|| {
        anyhow!("no key given: use --key FILE (or SANVOL_KEY), a key authorized with role backup or admin")
    })?;
    let server_key = conn.server_key.as_deref().ok_or_else(|| {
        anyhow!("no server key to pin: use --server-key PUB (or SANVOL_SERVER_KEY), the key sanvol-mds runs with")
    })?;
    if let Some(r) = conn.role {
        if !matches!(r, Role::Backup | Role::Admin) {
            bail!("--role {r}: sanvol-backup authenticates as backup or admin");
        }
    }
    Ok(Source::Mds(Box::new(mds_conn(mds, key, server_key, conn.role)?)))
}

/// Asks the local agent to attach `volume` exclusively; returns its export.
async fn attach_volume(agent_socket: &Path, volume: &str) -> Result<NbdUri> {
    let request = ControlRequest::Attach(AttachRequest {
        volume: volume.to_string(),
        mode: volume_format::control::messages::OpenMode::Exclusive,
        socket: None,
        tcp: None,
        locks: Vec::new(),
    });
    let reply = control_client::agent_api::call(agent_socket, &request).await.map_err(|e| anyhow!(e))?;
    let attached = match reply {
        r if r.ok => r.attached.ok_or_else(|| anyhow!("the agent attached volume {volume} but named no export"))?,
        r => bail!("the agent could not attach volume {volume}: {}", r.error.unwrap_or_default()),
    };
    attached.export_uri.parse().map_err(|e: blockio::uri::UriError| anyhow!("the agent's export URI: {e}"))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Full { snapshot, to, force, tuning } => {
            let src = source(&cli.conn)?;
            let opts = tuning.options();
            let job = job::full(&src, &snapshot, &to, force, &opts);
            let summary = interruptible(job, "the unfinished backup was removed; the repository is as it was").await?;
            println!("{summary}");
        }
        Command::Incremental { snapshot, since, to, tuning } => {
            let src = source(&cli.conn)?;
            let opts = tuning.options();
            let job = job::incremental(&src, &snapshot, &since, &to, &opts);
            let summary = interruptible(job, "the unfinished backup was removed; the repository is as it was").await?;
            println!("{summary}");
        }
        Command::Restore { dir, to, upto, agent_socket, tuning } => {
            let opts = tuning.options();
            let Some(volume) = to.strip_prefix("volume:") else {
                let target: NbdUri =
                    to.parse().map_err(|e: blockio::uri::UriError| anyhow!(e)).context("parsing the --to target")?;
                let job = restore::restore(&dir, &target, upto.as_deref(), &opts);
                let summary = interruptible(job, "the target may be partly written: restore again").await?;
                println!("{summary}");
                return Ok(());
            };
            let target = attach_volume(&agent_socket, volume).await?;
            let job = restore::restore(&dir, &target, upto.as_deref(), &opts);
            let restored = interruptible(job, "the volume may be partly written: restore again").await;
            // Detach in any case (it flushes first).
            let detach = ControlRequest::Detach { volume: volume.to_string() };
            let detached = control_client::agent_api::call(&agent_socket, &detach).await;
            let summary = restored?;
            match detached {
                Ok(r) if r.ok => {}
                Ok(r) => bail!("restored, but detaching volume {volume} failed: {}", r.error.unwrap_or_default()),
                Err(e) => bail!("restored, but detaching volume {volume} failed: {e}"),
            }
            println!("{summary}");
        }
        Command::Verify { dir, json, progress } => {
            let mode = match progress {
                ProgressArg::Auto => ProgressMode::Auto,
                ProgressArg::Lines => ProgressMode::Lines,
                ProgressArg::None => ProgressMode::Quiet,
            };
            let d = dir.clone();
            let report = tokio::task::spawn_blocking(move || verify::check(&d, None, Depth::Data, mode))
                .await
                .map_err(|e| anyhow!("verification failed: {e}"))??;
            print_verify(&dir, &report, json)?;
            if !report.is_ok() {
                bail!(
                    "the backup chain in {} is damaged ({}): do not rely on it; start a new chain with a full backup",
                    dir.display(),
                    crate::verify::count(report.problems.len(), "problem")
                );
            }
        }
        Command::List { dir, json } => list(&dir, json)?,
        Command::Snapshots { volume, json } => {
            let src = source(&cli.conn)?;
            let list = src.snapshots(volume.as_deref()).await?;
            print_snapshots(&list, json)?;
        }
        Command::Serve { socket, metrics_addr } => {
            let src = Arc::new(source(&cli.conn)?);
            if let Some(addr) = metrics_addr {
                crate::serve_metrics::init();
                let bound = ops::metrics::serve(addr).await?;
                println!("metrics http://{bound}/metrics");
            }
            serve::serve(src, &socket, metrics_addr.is_some(), shutdown_signal()).await?;
        }
        Command::Generate(what) => ops::docs::generate(<Cli as clap::CommandFactory>::command(), &what)?,
    }
    Ok(())
}

/// Runs `job` until SIGINT or SIGTERM, which fail it with `what_then`.
async fn interruptible<T>(job: impl std::future::Future<Output = Result<T>>, what_then: &str) -> Result<T> {
    tokio::select! {
        r = job => r,
        _ = shutdown_signal() => bail!("interrupted: {what_then}"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(c, s)| format!("{s:<w$}", w = widths[c])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[derive(Serialize)]
struct ListRow {
    dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(flatten)]
    manifest: Option<Manifest>,
}

fn list(dir: &Path, json: bool) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory: no backup repository there", dir.display());
    }
    let scan = scan_dir(dir)?;
    let rows: Vec<ListRow> = scan
        .backups
        .iter()
        .map(|b| match b.load_manifest() {
            Ok(m) => ListRow { dir: b.name.clone(), error: None, manifest: Some(m) },
            Err(e) => ListRow { dir: b.name.clone(), error: Some(e), manifest: None },
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("no backups in {}", dir.display());
    } else {
        let mut t = vec![["#", "KIND", "VOLUME", "SNAPSHOT", "SINCE", "SIZE", "CHUNKS", "STORED", "CREATED", "DIR"]
            .map(String::from)
            .to_vec()];
        for r in &rows {
            match &r.manifest {
                Some(m) => t.push(vec![
                    m.sequence.to_string(),
                    m.kind.to_string(),
                    m.volume.clone(),
                    m.snapshot.clone(),
                    m.since.clone().unwrap_or_else(|| "-".into()),
                    fmt_bytes(m.size_bytes),
                    format!("{} data + {} zero", m.data_chunks, m.zero_chunks),
                    fmt_bytes(m.data_bytes),
                    m.created.clone(),
                    r.dir.clone(),
                ]),
                None => t.push(vec!["?".into(), "DAMAGED".into(), r.error.clone().unwrap_or_default(), r.dir.clone()]),
            }
        }
        print!("{}", table(&t));
    }
    let broken = rows.iter().filter(|r| r.error.is_some()).count();
    if broken > 0 {
        eprintln!("warning: {broken} backups in {} cannot be read; run `sanvol-backup verify` on it", dir.display());
    }
    Ok(())
}

#[derive(Serialize)]
struct VerifyJson<'a> {
    ok: bool,
    backups: &'a [verify::BackupStatus],
    problems: &'a [verify::Problem],
    data_chunks_checked: u64,
    data_bytes_checked: u64,
}

fn print_verify(dir: &Path, r: &verify::Report, json: bool) -> Result<()> {
    if json {
        let v = VerifyJson {
            ok: r.is_ok(),
            backups: &r.statuses,
            problems: &r.problems,
            data_chunks_checked: r.data_chunks_checked,
            data_bytes_checked: r.data_bytes_checked,
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for s in &r.statuses {
        println!(
            "{:<7} {}  {} {}",
            if s.ok { "ok" } else { "DAMAGED" },
            s.dir,
            s.kind,
            s.export.as_deref().unwrap_or("(unreadable manifest)")
        );
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
    if r.is_ok() {
        println!(
            "chain in {} verified: {}, {} data chunks ({}) checked",
            dir.display(),
            verify::count(r.statuses.len(), "backup"),
            r.data_chunks_checked,
            fmt_bytes(r.data_bytes_checked)
        );
    }
    Ok(())
}

fn print_snapshots(list: &[volume_format::control::messages::SnapshotInfo], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no snapshots");
        return Ok(());
    }
    let mut t =
        vec![["EXPORT", "VOLUME", "SNAPSHOT", "SIZE", "CREATED", "COW CHUNKS", "NEWEST"].map(String::from).to_vec()];
    for s in list {
        let known = s.size_bytes > 0 || s.created_at_unix_secs > 0;
        t.push(vec![
            s.export.clone(),
            s.volume.clone(),
            s.name.clone(),
            if known { fmt_bytes(s.size_bytes) } else { "-".into() },
            if s.created_at_unix_secs > 0 { rfc3339(s.created_at_unix_secs) } else { "-".into() },
            if known { s.cow_chunks.to_string() } else { "-".into() },
            if !known {
                "-".into()
            } else if s.newest {
                "yes".into()
            } else {
                "no".into()
            },
        ]);
    }
    print!("{}", table(&t));
    Ok(())
}
