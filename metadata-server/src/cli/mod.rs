//! `sanvol`, the admin CLI.
//!
//! Every subcommand but `keygen`, `pool init` and `demo` talks to a running
//! `sanvol-mds` over an authenticated control connection as an admin, so the
//! connection flags (`--mds`, `--key`, `--server-key`, or `SANVOL_MDS`,
//! `SANVOL_KEY`, `SANVOL_SERVER_KEY`) are global. Every listing takes
//! `--json` and then prints the protocol's info types
//! (`volume_format::control::messages`) as JSON, whose field names are
//! stable.
//!
//! - [`admin`]: the subcommands that talk to the server.
//! - [`demo`]: `sanvol demo` (a local pool end to end).
//! - [`progress`]: long reconfigurations waited for, with progress.
//! - [`wait`]: recall points of cached volumes, waited for while the
//!   server is alive.
//! - [`size`], [`table`]: sizes and aligned tables.

pub mod admin;
pub mod demo;
pub mod progress;
pub mod size;
pub mod table;
pub mod wait;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// Declared by `cli/demo.rs`, which owns the demo's options.
pub use demo::DemoArgs;

#[derive(Debug, Parser)]
#[command(
    name = "sanvol",
    version,
    about = "Admin CLI for a sanvol pool: keys, pool setup, volumes and clients",
    long_about = "Admin CLI for a sanvol pool.\n\n\
        `sanvol keygen` makes key pairs; `sanvol pool init` labels NBD devices as a new pool; \
        everything else talks to a running sanvol-mds as an admin (set --mds, --key and --server-key, \
        or SANVOL_MDS, SANVOL_KEY and SANVOL_SERVER_KEY).\n\n\
        Sizes take binary units: 10G = 10 GiB, 512M, 4096 (bytes), 1GiB."
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// How log lines (RUST_LOG, quiet by default) are written on stderr.
    #[arg(long, global = true, env = "SANVOL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: ops::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach and trust the metadata server.
#[derive(Debug, Args, Clone)]
pub struct ConnArgs {
    /// Metadata server address: HOST:PORT or unix:PATH; several separated by
    /// commas (the active server and its standbys) are tried in turn.
    #[arg(long, global = true, env = "SANVOL_MDS", value_name = "ADDR[,ADDR...]")]
    pub mds: Option<String>,
    /// Your admin private key (made by `sanvol keygen`).
    #[arg(long, global = true, env = "SANVOL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The server's public key (file, `sanvol-ed25519 HEX` line or hex). The
    /// CLI refuses a server that cannot prove it holds this key. `pool init`
    /// writes it into the pool.
    #[arg(long, global = true, env = "SANVOL_SERVER_KEY", value_name = "PUB")]
    pub server_key: Option<String>,
    /// How the connection is protected: encrypted (default) or integrity
    /// (authenticated, not encrypted; the server may refuse it).
    #[arg(long, global = true, env = "SANVOL_CHANNEL_MODE", value_name = "MODE", default_value = "encrypted")]
    pub channel_mode: control_client::ChannelMode,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an ed25519 key pair: PATH (private, mode 0600) and PATH.pub.
    ///
    /// Refuses to overwrite existing files. Give PATH.pub to whoever
    /// authorizes the key (`sanvol client add PATH.pub --role ROLE`).
    Keygen {
        /// Where to write the private key; the public key goes to PATH.pub.
        path: PathBuf,
        /// Free text stored in the public key file (e.g. user@host).
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Pool setup and status.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// The pool's devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Create, list, show, grow and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of volumes (read them with `sanvol-backup`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Keys authorized to use the pool (agents, admins, backup jobs).
    #[command(subcommand)]
    Client(ClientCommand),
    /// The pool's metadata servers: one active, the others standing by.
    #[command(subcommand)]
    Mds(MdsCommand),
    /// Run a local demo pool end to end: three file-backed NBD devices, the
    /// metadata server, an agent and two volumes; prints where everything is.
    Demo(DemoArgs),
    /// Write man pages or shell completions (for packagers; see docs/operations.md).
    #[command(subcommand, hide = true)]
    Generate(ops::docs::Generate),
}

#[derive(Debug, Subcommand)]
pub enum MdsCommand {
    /// Hand the pool to a standby metadata server (planned maintenance).
    ///
    /// The active server stops taking changes, finishes what is in flight,
    /// passes the disk lease on (no expiry wait) and tells every connected
    /// agent to reconnect there; agents resume their handles at once.
    /// `sanvol pool status` lists the servers standing by.
    Handoff {
        /// The standby to hand to: its name or host id (default: any
        /// server standing by).
        #[arg(long, value_name = "NAME|HOST_ID")]
        to: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Label NBD devices as a new pool and write its first metadata.
    ///
    /// Each device's first MiB is probed first: a device that carries a
    /// sanvol label, a filesystem, a partition table or anything else
    /// libblkid recognizes is refused (nothing is written to any device)
    /// unless --force. Needs --server-key (the key sanvol-mds will run with).
    Init {
        /// NBD URI of a device (repeat for each): nbd://HOST:PORT/EXPORT or
        /// nbd+unix:///EXPORT?socket=PATH. The first three hold the metadata.
        #[arg(long = "device", value_name = "URI", required = true)]
        devices: Vec<String>,
        /// Public key of the first admin (it can authorize everyone else).
        #[arg(long, value_name = "PUB")]
        admin_key: String,
        /// Name of that admin in listings.
        #[arg(long, default_value = "admin")]
        admin_name: String,
        /// Pool name.
        #[arg(long, default_value = "pool")]
        name: String,
        /// Extent size: the unit of allocation (power of two, 4K..1G).
        #[arg(long, value_name = "SIZE", value_parser = size::parse_size, default_value = "64M")]
        extent_size: u64,
        /// Overwrite devices that carry something.
        #[arg(long)]
        force: bool,
        /// The private key sanvol-mds will run with (the pair of
        /// --server-key): needed only when devices are served by
        /// sanvol-target, which lets in only connections with a capability
        /// signed by it.
        #[arg(long, value_name = "FILE")]
        server_signing_key: Option<std::path::PathBuf>,
    },
    /// Pool summary: name, generation, capacity, free space.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Every device with its size, free extents, state and whether the
    /// server reaches it.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a device to the running pool: the server labels it and its space
    /// is free for volumes at once.
    ///
    /// The device's first MiB is probed first: a device that carries a
    /// filesystem, a partition table, another pool's label or anything else
    /// libblkid recognizes is refused unless --force. A device this pool
    /// labelled before (removed, or an add interrupted) is taken again. The
    /// new device holds no metadata copy. Agents need no restart: they
    /// connect to it when a volume first uses it.
    Add {
        /// NBD URI of the device, as the server reaches it:
        /// nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH.
        uri: String,
        /// Overwrite whatever the device carries.
        #[arg(long)]
        force: bool,
    },
    /// Move every extent off a device (to the other devices), with its
    /// volumes online.
    ///
    /// Volume by volume, the server pauses the volume's I/O on every agent
    /// holding it (recall), copies its extents on DEV to free extents on
    /// other devices, flushes them, commits the new map and lets the agents
    /// resume on it. Nothing new is placed on DEV while it runs. A mirrored
    /// extent is copied from any leg that reads well, so a failed device's
    /// mirror legs are rebuilt elsewhere. Progress: a bar on a terminal,
    /// JSON lines with --json, and `sanvol pool status` / `device list` /
    /// `volume list` from anywhere. Stopping the CLI does not stop the
    /// evacuation; a server restart stops it after the volume being moved
    /// (run it again to go on). Afterwards `sanvol device remove DEV`.
    Evacuate {
        /// The device: devN, N (its index) or its URI.
        device: String,
        /// Progress as JSON lines on stdout (one object per change).
        #[arg(long)]
        json: bool,
    },
    /// Remove a device from the pool.
    ///
    /// Refused while any extent of a volume or snapshot is on it (evacuate
    /// it first) and for a device holding a copy of the pool metadata
    /// (`device list --json`: the first devices of the pool; moving a
    /// metadata copy online is not supported).
    Remove {
        /// The device: devN, N (its index) or its URI.
        device: String,
    },
    /// Replace a device by a new one: add URI, move every extent of DEV onto
    /// it (as `evacuate`, volumes online), then remove DEV.
    ///
    /// DEV may be failed: mirrored extents are copied from their other legs.
    /// The new device must have room for everything on DEV. Refused for a
    /// device holding a metadata copy.
    Replace {
        /// The device to replace: devN, N (its index) or its URI.
        device: String,
        /// NBD URI of the new device.
        uri: String,
        /// Overwrite whatever the new device carries.
        #[arg(long)]
        force: bool,
        /// Progress as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Add a mirror leg to every extent of VOLUME (on a device holding no
    /// leg of it), copied from a leg that reads well while the volume's
    /// agents pause.
    Add {
        name: String,
        /// Progress as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove a mirror leg from every extent of VOLUME: the one on --device
    /// if given, else a leg on a failed device, else the last leg. The
    /// volume keeps at least one leg, and a leg on an online device.
    Remove {
        name: String,
        /// The leg to drop: devN, N or the device's URI.
        #[arg(long, value_name = "DEV")]
        device: Option<String>,
        /// Progress as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume; with --mirror 2 every extent has two legs on
    /// distinct devices.
    Create {
        name: String,
        /// Size, e.g. 10G (a multiple of 4 KiB).
        #[arg(value_parser = size::parse_size)]
        size: u64,
        /// Copies of every extent, each on a different device.
        #[arg(long, default_value_t = 1)]
        mirror: u8,
    },
    /// Every volume with size, legs and who has it open.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One volume's extent map: which device and offset holds each extent;
    /// who holds it, its health, and its write-back cache as the server and
    /// its holder see it (mirrored or write-through and why, dirty bytes,
    /// destage rate).
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume (refused while it is open anywhere).
    Delete { name: String },
    /// Grow a volume to SIZE. Agents holding it pause I/O briefly while the
    /// new layout is committed (recall–commit–publish).
    Grow {
        name: String,
        /// New size, e.g. 20G (larger than the current size).
        #[arg(value_parser = size::parse_size)]
        size: u64,
    },
    /// Give a volume a write-back cache, or turn it off: its holder
    /// acknowledges a write once it is in its local cache log and in the
    /// metadata server's mirror of it. Only while the volume is closed.
    ///
    /// `sanvol-agent attach --mode exclusive` then serves the volume through
    /// a cache log of this size in the agent's --cache-dir (default: `cache`
    /// in its --state-dir); `sanvol-agent list` shows its state (mirrored or
    /// write-through, dirty bytes, destage rate). If the holder dies, the
    /// server writes its mirror to the devices before the next open. A
    /// snapshot first destages the holder's cache; see docs/operations.md,
    /// "Write-back caches".
    Cache {
        name: String,
        /// Size of the holder's cache log and of the server's mirror, e.g. 1G.
        #[arg(long, value_parser = size::parse_size, default_value = "1G")]
        size: u64,
        /// `mirrored` (write-back, mirrored at the metadata server) or `off`.
        #[arg(long, default_value = "mirrored")]
        mode: String,
        /// Instead of a setting: give up the writes the volume's cache
        /// mirror may still hold, when an open is refused because they are
        /// mirrored by a metadata server that is lost for good and the last
        /// holder's own cache log is lost too. Those writes are gone; the
        /// volume opens with what its devices hold. Only while it is closed.
        #[arg(long, conflicts_with_all = ["size", "mode"])]
        forget_mirror: bool,
    },
    /// Add or remove a mirror leg (recall, copy, commit, publish).
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Move a volume's extents off one device, to another or anywhere.
    ///
    /// Agents holding the volume pause its I/O while the extents are copied
    /// (recall); the new map is committed once the copy is flushed, and
    /// they resume on it. A crash of the server during the copy leaves the
    /// old map in force.
    Move {
        name: String,
        /// The device to move off: devN, N or its URI.
        #[arg(long, value_name = "DEV")]
        from: String,
        /// The device to move to (default: the devices with the most free
        /// space that hold no other leg of each extent).
        #[arg(long, value_name = "DEV")]
        to: Option<String>,
        /// Progress as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of VOLUME named NAME.
    ///
    /// Agents holding the volume pause I/O briefly while the snapshot is
    /// committed (recall–commit–publish); from then on they copy each chunk
    /// (64 KiB) into the snapshot's copy-on-write area before first
    /// overwriting it. The snapshot reserves as much pool space as the
    /// volume, so it can never run out of room. Read it as the NBD export
    /// VOLUME@NAME with `sanvol-backup`.
    Create {
        /// The volume to snapshot.
        volume: String,
        /// The snapshot's name: 1-255 bytes, no '@' or '/'.
        name: String,
    },
    /// Snapshots of VOLUME (or of every volume): size, chunks copied so far,
    /// space reserved, export name.
    List {
        /// Only this volume's snapshots.
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot. Other snapshots stay readable: pre-images an older
    /// snapshot still needs are moved into it first.
    Delete {
        /// The snapshot's volume.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Every authorized key, its role, sessions and open handles.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Authorize a key (or change its role or name).
    Add {
        /// The public key: a .pub file, a `sanvol-ed25519 HEX` line or hex.
        #[arg(value_name = "PUB")]
        public_key: String,
        /// agent, admin or backup.
        #[arg(long)]
        role: volume_format::control::auth::Role,
        /// Name in listings and messages (default: the key file's comment).
        #[arg(long)]
        name: Option<String>,
        /// For a backup key: the only volumes whose snapshots it may read
        /// (comma-separated names; default every volume).
        #[arg(long, value_delimiter = ',', value_name = "VOLUMES")]
        volumes: Vec<String>,
    },
    /// Revoke a key; its open sessions and channels are closed at once.
    Remove {
        /// The public key: a .pub file, a `sanvol-ed25519 HEX` line or hex.
        #[arg(value_name = "PUB")]
        public_key: String,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { path, comment } => {
            let public = control_client::keys::generate(&path, &comment)?;
            println!("private key: {} (mode 0600)", path.display());
            println!("public key:  {}", control_client::keys::public_path_for(&path).display());
            println!("{}", control_client::keys::format_public(&public, &comment));
            Ok(())
        }
        Command::Pool(PoolCommand::Init {
            devices,
            admin_key,
            admin_name,
            name,
            extent_size,
            force,
            server_signing_key,
        }) => {
            let options = admin::PoolInitArgs {
                devices,
                admin_key,
                admin_name,
                name,
                extent_bytes: extent_size,
                force,
                server_signing_key,
            };
            admin::pool_init(&cli.conn, options).await
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Generate(what) => ops::docs::generate(<Cli as clap::CommandFactory>::command(), &what),
        other => {
            let client = admin::connect(&cli.conn).await?;
            let result = admin::run(&client, other).await;
            client.close().await;
            result
        }
    }
}

/// Parses a public key argument into the raw bytes the protocol carries.
pub fn public_key_arg(spec: &str) -> Result<([u8; 32], String)> {
    let (key, comment) =
        control_client::keys::parse_public(spec).with_context(|| format!("reading public key {spec:?}"))?;
    Ok((key.to_bytes(), comment))
}
