//! `sanvol demo`: a whole local pool in one command.
//!
//! Three file-backed devices served by blockio's own NBD server (no system
//! package needed), `sanvol-mds`, `sanvol-agent`, a mirrored and a plain
//! volume, attached, written and read back, a snapshot taken, the volume
//! overwritten and the snapshot read back through the backup pseudo-device
//! — then it prints where every
//! piece is, so a user can keep going by hand, and waits for Ctrl-C.
//!
//! Why it drives the real binaries (`sanvol`, `sanvol-mds`, `sanvol-agent`
//! beside this executable) instead of calling library functions: the demo is
//! also the tutorial. Every step it prints is a command the user can type.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockio::client::{ClientOptions, NbdClient};
use blockio::file::FileDevice;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use bytes::Bytes;
use tokio::process::{Child, Command};

/// Options of `sanvol demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's devices, keys, sockets and logs (default: a
    /// new directory under /tmp, removed on exit).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of each of the three demo devices.
    #[arg(long, default_value = "1G", value_parser = super::size::parse_size)]
    pub device_size: u64,
    /// Set everything up, verify it, tear it down and exit instead of
    /// waiting for Ctrl-C (for scripts and tests).
    #[arg(long)]
    pub exit_after_setup: bool,
}

const DEVICES: usize = 3;
/// Threads per connection of the demo's device servers (`ServerConfig::connection_threads`).
const DEVICE_CONNECTION_THREADS: usize = 4;
const VOLUMES: [(&str, &str, &[&str]); 2] = [("mirrored", "256M", &["--mirror", "2"]), ("plain", "128M", &[])];

/// A child process killed when dropped (tokio's kill_on_drop), with its log.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    async fn terminate(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM lets the agent flush and close its handles.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.is_err() {
            eprintln!("{} did not stop within 15 s; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the sanvol executable")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!("{} not found beside {}: build all binaries first (`cargo build --release --bins`)", name, exe.display());
    }
    Ok(path)
}

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Runs `sanvol`/`sanvol-agent` with `args`, echoing the command, and
/// returns stdout; a failure carries the command's stderr.
async fn run_cli(program: &Path, args: &[String], env: &[(&str, String)]) -> Result<String> {
    let shown = args.iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() }).collect::<Vec<_>>();
    println!("$ {} {}", program.file_name().unwrap().to_string_lossy(), shown.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.with_context(|| format!("running {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{} {} failed: {}{}", program.display(), shown.join(" "), String::from_utf8_lossy(&out.stderr), stdout);
    }
    print!("{stdout}");
    Ok(stdout)
}

fn is_listening(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

async fn spawn_daemon(
    name: &'static str,
    program: &Path,
    args: &[String],
    log: PathBuf,
    socket: &Path,
) -> Result<Daemon> {
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let mut daemon = Daemon { name, child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_listening(socket) {
        if let Some(status) = daemon.child.try_wait()? {
            bail!(
                "{name} exited ({status}) during startup; its log {}:\n{}",
                daemon.log.display(),
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("{name} did not listen on {} within 30 s; see {}", socket.display(), daemon.log.display());
        }
        // Waiting for another process to bind its socket: nothing to await.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(daemon)
}

/// Serves each demo device file on its own unix socket; returns the URIs.
async fn serve_devices(dir: &Path, size: u64, shutdown: &tokio::sync::watch::Receiver<bool>) -> Result<Vec<NbdUri>> {
    let mut uris = Vec::new();
    for i in 0..DEVICES {
        let image = dir.join(format!("device{i}.img"));
        let socket = dir.join(format!("device{i}.sock"));
        let device = FileDevice::create(&image, size).with_context(|| format!("creating {}", image.display()))?;
        // Local files: served on connection threads (blocking `pread`/`pwrite`
        // in place), as sanvol-target serves its device.
        let config = ServerConfig { connection_threads: DEVICE_CONNECTION_THREADS, ..ServerConfig::default() };
        let server = NbdServer::new(Arc::new(ExportTable::single("", Arc::new(device))), config);
        let _ = std::fs::remove_file(&socket);
        let listener =
            tokio::net::UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = server
                .serve_unix(listener, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        });
        uris.push(NbdUri::unix(&socket, ""));
    }
    Ok(uris)
}

/// Writes a 4 MiB pattern across an extent boundary and reads it back
/// through the agent's export with blockio's NBD client.
async fn write_and_verify(uri: &NbdUri, seed: u8) -> Result<()> {
    let client =
        NbdClient::connect(uri, ClientOptions::default()).await.with_context(|| format!("connecting to {uri}"))?;
    let len = 4 << 20;
    let data = demo_pattern(seed);
    // Half-way minus 2 MiB: with the default 64 MiB extents this crosses an
    // extent boundary, so the write is split across two extents (and devices).
    let offset = client.info().size / 2 - (2 << 20);
    client.write(offset, data.clone(), true).await.with_context(|| format!("writing 4 MiB to {uri}"))?;
    let back = client.read(offset, len as u32).await.with_context(|| format!("reading back from {uri}"))?;
    client.disconnect().await;
    if back != data {
        bail!("read-back through {uri} differs from what was written");
    }
    println!("wrote 4 MiB at offset {offset} through {uri} and read it back: identical");
    Ok(())
}

/// The 4 MiB `write_and_verify` wrote with `seed`, and where.
fn demo_pattern(seed: u8) -> Bytes {
    (0..4usize << 20).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

/// Reads the range `write_and_verify` wrote from snapshot export `export`
/// through the backup pseudo-device and compares it with `expected`.
async fn verify_snapshot(dir: &Path, mds: &str, export: &str, size: u64, expected: &Bytes) -> Result<()> {
    let key = control_client::keys::load_private(&dir.join("admin.key"))?;
    let (pinned, _) = control_client::keys::parse_public(&dir.join("mds.key.pub").display().to_string())?;
    let addr: control_client::ControlAddr = mds.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let role = volume_format::control::auth::Role::Admin;
    let stream = control_client::channel::open_backup(&addr, &key, Some(&pinned), role, "sanvol-demo")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let client = NbdClient::connect_stream(stream, export, ClientOptions::default())
        .await
        .with_context(|| format!("opening snapshot export {export}"))?;
    let offset = size / 2 - (2 << 20);
    let back = client.read(offset, expected.len() as u32).await.with_context(|| format!("reading {export}"))?;
    client.disconnect().await;
    if back != *expected {
        bail!("snapshot {export} does not read what the volume held when it was taken");
    }
    println!(
        "read 4 MiB at offset {offset} of {export} through the backup pseudo-device: the data from before the snapshot"
    );
    Ok(())
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let sanvol = sibling_binary("sanvol")?;
    let mds_bin = sibling_binary("sanvol-mds")?;
    let agent_bin = sibling_binary("sanvol-agent")?;
    let (dir, _tempdir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.canonicalize()?, None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("sanvol-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    for f in ["mds.key", "admin.key", "agent.key"] {
        if dir.join(f).exists() {
            bail!("{} already holds a demo ({} exists); give an empty --dir", dir.display(), f);
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    step(&format!("Serving {DEVICES} file-backed NBD devices with blockio's server (in {})", dir.display()));
    let devices = serve_devices(&dir, args.device_size, &stop_rx).await?;
    for d in &devices {
        println!("device: {d}");
    }

    step("Creating keys for the metadata server, an admin and an agent");
    let arg = |s: &str| s.to_string();
    let p = |p: PathBuf| p.display().to_string();
    for name in ["mds", "admin", "agent"] {
        run_cli(&sanvol, &[arg("keygen"), p(dir.join(format!("{name}.key")))], &[]).await?;
    }

    step("Labelling the devices and writing the first pool metadata");
    let mut init = vec![arg("pool"), arg("init"), arg("--name"), arg("demo")];
    for d in &devices {
        init.extend([arg("--device"), d.to_string()]);
    }
    init.extend([arg("--server-key"), p(dir.join("mds.key.pub")), arg("--admin-key"), p(dir.join("admin.key.pub"))]);
    run_cli(&sanvol, &init, &[]).await?;

    step("Starting sanvol-mds");
    let mds_socket = dir.join("mds.sock");
    let config = dir.join("mds.toml");
    let device_list: Vec<String> = devices.iter().map(|d| format!("{:?}", d.to_string())).collect();
    std::fs::write(
        &config,
        format!(
            "# sanvol-mds configuration written by `sanvol demo`\nlisten = [{:?}]\nkey = {:?}\ndevices = [{}]\n\
             # One server, started fresh: a short disk-lease timeout takes the lease in about a second.\n\
             lease_io_timeout_ms = 250\n",
            format!("unix:{}", mds_socket.display()),
            p(dir.join("mds.key")),
            device_list.join(", ")
        ),
    )?;
    let mds =
        spawn_daemon("sanvol-mds", &mds_bin, &[arg("--config"), p(config.clone())], dir.join("mds.log"), &mds_socket)
            .await?;
    let admin_env = [
        ("SANVOL_MDS", format!("unix:{}", mds_socket.display())),
        ("SANVOL_KEY", p(dir.join("admin.key"))),
        ("SANVOL_SERVER_KEY", p(dir.join("mds.key.pub"))),
    ];

    let result = async {
        step("Authorizing the agent's key and starting sanvol-agent");
        run_cli(
            &sanvol,
            &[
                arg("client"),
                arg("add"),
                p(dir.join("agent.key.pub")),
                arg("--role"),
                arg("agent"),
                arg("--name"),
                arg("demo-host"),
            ],
            &admin_env,
        )
        .await?;
        let agent_socket = dir.join("agent.sock");
        let agent_args = vec![
            arg("run"),
            arg("--mds"),
            format!("unix:{}", mds_socket.display()),
            arg("--key"),
            p(dir.join("agent.key")),
            arg("--server-key"),
            p(dir.join("mds.key.pub")),
            arg("--name"),
            arg("demo-host"),
            arg("--control-socket"),
            p(agent_socket.clone()),
            arg("--export-dir"),
            p(dir.clone()),
            arg("--state-dir"),
            p(dir.join("agent-state")),
        ];
        let agent = spawn_daemon("sanvol-agent", &agent_bin, &agent_args, dir.join("agent.log"), &agent_socket).await?;

        let inner = async {
            step("Creating a mirrored and a plain volume");
            for (name, size, extra) in VOLUMES {
                let mut a = vec![arg("volume"), arg("create"), arg(name), arg(size)];
                a.extend(extra.iter().map(|s| arg(s)));
                run_cli(&sanvol, &a, &admin_env).await?;
            }
            run_cli(&sanvol, &[arg("volume"), arg("list")], &admin_env).await?;

            step("Attaching both volumes through the agent (direct I/O to the devices)");
            let ctl = [arg("--control-socket"), p(agent_socket.clone())];
            let mut uris = Vec::new();
            for (name, _, _) in VOLUMES {
                let mut a = vec![arg("attach"), arg(name), arg("--mode"), arg("exclusive")];
                a.extend(ctl.iter().cloned());
                let out = run_cli(&agent_bin, &a, &[]).await?;
                let uri: NbdUri = out
                    .lines()
                    .find(|l| l.starts_with("nbd"))
                    .context("sanvol-agent attach printed no NBD URI")?
                    .trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("sanvol-agent attach printed a bad URI: {e}"))?;
                uris.push((name, uri));
            }

            step("Writing and reading back through each volume");
            for (i, (_, uri)) in uris.iter().enumerate() {
                write_and_verify(uri, i as u8).await?;
            }

            step("The mirrored volume's extent map");
            run_cli(&sanvol, &[arg("volume"), arg("show"), arg("mirrored")], &admin_env).await?;

            step("Snapshot of the mirrored volume, overwritten afterwards, read back through the backup pseudo-device");
            run_cli(&sanvol, &[arg("snapshot"), arg("create"), arg("mirrored"), arg("before")], &admin_env).await?;
            write_and_verify(&uris[0].1, 77).await?;
            let size = NbdClient::connect(&uris[0].1, ClientOptions::default()).await?;
            let volume_bytes = size.info().size;
            size.disconnect().await;
            let mds_addr = format!("unix:{}", mds_socket.display());
            verify_snapshot(&dir, &mds_addr, "mirrored@before", volume_bytes, &demo_pattern(0)).await?;
            run_cli(&sanvol, &[arg("snapshot"), arg("list")], &admin_env).await?;

            if args.exit_after_setup {
                println!(
                    "\n==> The demo pool works (--exit-after-setup: tearing it down now). By hand you would use:\n"
                );
            } else {
                println!("\n==> The demo pool is running. Keep going by hand in another shell:\n");
            }
            println!(
                "  export SANVOL_MDS=unix:{} SANVOL_KEY={} SANVOL_SERVER_KEY={}",
                mds_socket.display(),
                dir.join("admin.key").display(),
                dir.join("mds.key.pub").display()
            );
            println!("  export PATH={}:$PATH", sanvol.parent().unwrap().display());
            println!("  sanvol pool status; sanvol device list; sanvol volume list; sanvol client list");
            println!("  sanvol volume create scratch 64M; sanvol volume show scratch");
            println!("  sanvol-agent list --control-socket {}", agent_socket.display());
            for (name, uri) in &uris {
                println!("  nbdinfo '{uri}'        # volume {name}");
            }
            println!("  qemu-io -f raw '{}' -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M'", uris[0].1);
            println!("  sanvol snapshot list; sanvol-backup full mirrored@before --to {}/backups", dir.display());
            println!("  sanvol-backup serve --socket {}/snapshots.sock &", dir.display());
            println!("  nbdinfo --list 'nbd+unix:///?socket={}/snapshots.sock'", dir.display());
            println!("\n  devices: {}   logs: {}/mds.log {}/agent.log", dir.display(), dir.display(), dir.display());
            Ok::<_, anyhow::Error>(uris)
        }
        .await;

        let outcome = match inner {
            Ok(uris) => {
                if !args.exit_after_setup {
                    println!("\nPress Ctrl-C to stop the demo and clean up.");
                    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
                }
                step("Stopping: detaching volumes, stopping the agent and the metadata server");
                for (name, _) in &uris {
                    let mut a = vec![arg("detach"), arg(name)];
                    a.extend([arg("--control-socket"), p(agent_socket.clone())]);
                    run_cli(&agent_bin, &a, &[]).await?;
                }
                Ok(())
            }
            Err(e) => Err(e.context(format!("see the logs in {}", dir.display()))),
        };
        agent.terminate().await;
        outcome
    }
    .await;

    mds.terminate().await;
    let _ = stop_tx.send(true);
    if result.is_ok() {
        println!(
            "demo stopped cleanly{}",
            if args.dir.is_none() { "; its temporary directory is removed" } else { "" }
        );
    }
    result
}
