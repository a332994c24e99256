//! The admin subcommands: one request each over an authenticated control
//! connection, printed as an aligned table or, with `--json`, as JSON.

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use volume_format::control::auth::Role;
use volume_format::control::messages::{snapshot_export_name, Request, Response};

use super::size::format_size;
use super::{
    progress, table, wait, ClientCommand, Command, ConnArgs, DeviceCommand, MdsCommand, MirrorCommand, PoolCommand,
    SnapshotCommand, VolumeCommand,
};
use crate::pool::init::{init, InitOptions};
use control_client::{ControlAddr, ControlClient};
use volume_format::PublicKey;

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Connects and authenticates as an admin. `--mds` may list several
/// servers (`a,b`: the active one and its standbys): each is tried in turn,
/// and one that is standing by is passed over (its answer names the active
/// server, which is what is reported if none is).
pub async fn connect(conn: &ConnArgs) -> Result<ControlClient> {
    let list = conn
        .mds
        .as_deref()
        .ok_or_else(|| anyhow!("no metadata server given: use --mds HOST:PORT or unix:PATH (or SANVOL_MDS)"))?;
    let addrs: Vec<ControlAddr> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| a.parse().map_err(|e: String| anyhow!(e)))
        .collect::<Result<_>>()?;
    if addrs.is_empty() {
        bail!("no metadata server given: use --mds HOST:PORT or unix:PATH (or SANVOL_MDS)");
    }
    if addrs.len() == 1 {
        return connect_one(conn, &addrs[0]).await;
    }
    let mut errors = Vec::new();
    for addr in &addrs {
        match connect_one(conn, addr).await {
            Ok(client) => match client.request(Request::PoolStatus).await {
                Err(control_client::ControlClientError::Server(e))
                    if e.code == volume_format::control::messages::ErrorCode::NotActive =>
                {
                    client.close().await;
                    errors.push(format!("{addr}: {}", e.message));
                }
                // Closed or timed out while asking: try the next server.
                Err(
                    e @ (control_client::ControlClientError::Closed | control_client::ControlClientError::Timeout(_)),
                ) => {
                    client.close().await;
                    errors.push(format!("{addr}: {e}"));
                }
                _ => return Ok(client),
            },
            Err(e) => errors.push(format!("{addr}: {e:#}")),
        }
    }
    bail!("no active metadata server among {list}: {}", errors.join("; "))
}

async fn connect_one(conn: &ConnArgs, addr: &ControlAddr) -> Result<ControlClient> {
    let key_path = conn.key.as_ref().ok_or_else(|| anyhow!("no admin key given: use --key FILE (or SANVOL_KEY)"))?;
    let key = control_client::keys::load_private(key_path)?;
    let server_key = conn.server_key.as_deref().ok_or_else(|| {
        anyhow!("no server key to pin: use --server-key PUB (or SANVOL_SERVER_KEY), the key sanvol-mds runs with")
    })?;
    let (pinned, _) = control_client::keys::parse_public(server_key).context("reading --server-key")?;
    let mut instance = [0u8; 16];
    getrandom::getrandom(&mut instance).map_err(|e| anyhow!("random bytes: {e}"))?;
    let name = format!("sanvol@{}", host_name());
    let (client, _events) =
        ControlClient::connect_with_mode(addr, &key, Some(&pinned), Role::Admin, &name, instance, conn.channel_mode)
            .await?;
    Ok(client)
}

async fn request(client: &ControlClient, request: Request) -> Result<Response> {
    Ok(client.request(request).await?)
}

fn unexpected(r: Response) -> anyhow::Error {
    anyhow!("the server sent an unexpected reply: {r:?}")
}

/// A device named on the command line: `devN`, `N` or its URI.
async fn device_index(client: &ControlClient, spec: &str) -> Result<volume_format::DeviceIndex> {
    if let Ok(n) = spec.strip_prefix("dev").unwrap_or(spec).parse::<u32>() {
        return Ok(volume_format::DeviceIndex(n));
    }
    let Response::Devices(devices) = request(client, Request::DeviceList).await? else { bail!("unexpected reply") };
    match devices.iter().find(|d| d.uri == spec) {
        Some(d) => Ok(d.index),
        None => bail!("no device {spec:?} in the pool: give devN, N or a URI as `sanvol device list` shows them"),
    }
}

/// Whether each device fences (`Request::DeviceFencing`), from a server that
/// negotiated it (`DEVICE_FENCING_SINCE_PROTOCOL`); nothing from an older one (shown as not known).
async fn device_fencing(client: &ControlClient) -> Result<Vec<volume_format::control::messages::DeviceFencing>> {
    if client.session().version < volume_format::control::messages::DEVICE_FENCING_SINCE_PROTOCOL {
        return Ok(Vec::new());
    }
    match request(client, Request::DeviceFencing).await? {
        Response::DeviceFencing(list) => Ok(list),
        other => Err(unexpected(other)),
    }
}

/// The state of `name`'s write-back cache, from a server that can tell
/// (protocol 9; `None` from an older one).
async fn volume_cache_state(
    client: &ControlClient,
    name: &str,
) -> Result<Option<volume_format::control::messages::CacheStateInfo>> {
    if client.session().version < volume_format::control::CACHE_STATE_PROTOCOL_MIN {
        return Ok(None);
    }
    let r = request(client, Request::VolumeCacheShow { name: name.to_string() })
        .await
        .with_context(|| format!("showing volume {name}'s cache"))?;
    match r {
        Response::VolumeCacheState(state) => Ok(Some(state)),
        other => Err(unexpected(other)),
    }
}

/// The pool's record of `name`'s cache mirror (which server holds it, of
/// which generation, whether it may hold writes the devices lack), from a
/// server that can tell (protocol 17; `None` from an older one, for a
/// volume without a cache, or one never mirrored).
async fn volume_cache_mirror(
    client: &ControlClient,
    name: &str,
    state: Option<&volume_format::control::messages::CacheStateInfo>,
) -> Result<Option<volume_format::control::messages::RecordedMirror>> {
    let cached = state.is_some_and(|s| s.cache.is_some());
    if !cached || client.session().version < volume_format::control::CACHE_MIRROR_SHOW_PROTOCOL_MIN {
        return Ok(None);
    }
    let r = request(client, Request::VolumeCacheMirror { name: name.to_string() })
        .await
        .with_context(|| format!("showing where volume {name}'s cache mirror is recorded"))?;
    match r {
        Response::CacheMirrorRecorded(recorded) => Ok(recorded),
        other => Err(unexpected(other)),
    }
}

/// The last report of `name`'s cache by its holder (why it writes through,
/// its destage rate), from a server that can tell (protocol 14; `None`
/// from an older one, or when nobody holds the cache).
async fn volume_cache_reported(
    client: &ControlClient,
    name: &str,
    state: Option<&volume_format::control::messages::CacheStateInfo>,
) -> Result<Option<volume_format::control::messages::ReportedCache>> {
    let held = state.is_some_and(|s| s.cache.is_some() && s.holder.is_some());
    if !held || client.session().version < volume_format::control::CACHE_REPORT_PROTOCOL_MIN {
        return Ok(None);
    }
    let r = request(client, Request::VolumeCacheReport { name: name.to_string() })
        .await
        .with_context(|| format!("showing the holder's report of volume {name}'s cache"))?;
    match r {
        Response::CacheReported(reported) => Ok(reported),
        other => Err(unexpected(other)),
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What `sanvol pool init` was given.
pub struct PoolInitArgs {
    pub devices: Vec<String>,
    pub admin_key: String,
    pub admin_name: String,
    pub name: String,
    pub extent_bytes: u64,
    pub force: bool,
    pub server_signing_key: Option<std::path::PathBuf>,
}

pub async fn pool_init(conn: &ConnArgs, args: PoolInitArgs) -> Result<()> {
    let PoolInitArgs { devices, admin_key, admin_name, name, extent_bytes, force, server_signing_key } = args;
    let server_key = conn
        .server_key
        .as_deref()
        .ok_or_else(|| anyhow!("pool init needs --server-key PUB: the public key sanvol-mds will run with"))?;
    let (server_key, _) = super::public_key_arg(server_key)?;
    if let Some(path) = &server_signing_key {
        let key = control_client::keys::load_private(path)?;
        if key.verifying_key().to_bytes() != server_key {
            bail!("{} is not the private key of --server-key; give the pair sanvol-mds will run with", path.display());
        }
        // Devices served by sanvol-target let in only the server's capability.
        crate::targets::install(std::sync::Arc::new(key));
        crate::targets::set_term(crate::targets::ServerTerm::Init);
    }
    let (admin_key, _) = super::public_key_arg(&admin_key)?;
    let uris = devices
        .iter()
        .map(|d| d.parse().map_err(|e: blockio::uri::UriError| anyhow!(e)))
        .collect::<Result<Vec<_>>>()?;
    let report = init(InitOptions {
        devices: uris,
        name,
        extent_bytes,
        server_key: PublicKey(server_key),
        admin_key: PublicKey(admin_key),
        admin_name,
        force,
    })
    .await
    .context("pool init")?;
    for (uri, found) in &report.overwritten {
        println!("overwrote {found} on {uri} (--force)");
    }
    let m = &report.metadata;
    println!("pool {} ({}) created, generation {}", m.pool_name, m.pool_uuid, m.generation);
    let rows: Vec<Vec<String>> = m
        .devices
        .iter()
        .zip(report.fencing.iter().copied().chain(std::iter::repeat(None)))
        .map(|(d, fenced)| {
            vec![
                d.index.to_string(),
                d.uri.clone(),
                format_size(d.device_bytes),
                d.extent_count(m.extent_bytes).to_string(),
                if d.holds_metadata { "yes" } else { "no" }.into(),
                match fenced {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "?",
                }
                .into(),
            ]
        })
        .collect();
    table::print(&["DEVICE", "URI", "SIZE", "EXTENTS", "METADATA", "FENCED"], &rows);
    println!("next: list these devices in sanvol-mds's config (`devices = [...]`) and start it");
    Ok(())
}

pub async fn run(client: &ControlClient, command: Command) -> Result<()> {
    match command {
        Command::Pool(PoolCommand::Status { json }) => {
            let Response::Pool(p) = request(client, Request::PoolStatus).await? else { bail!("unexpected reply") };
            if json {
                return print_json(&p);
            }
            let rows = vec![
                vec!["name".into(), p.name.clone()],
                vec!["uuid".into(), p.pool_uuid.clone()],
                vec!["generation".into(), p.generation.to_string()],
                vec!["extent size".into(), format_size(p.extent_bytes)],
                vec!["devices".into(), format!("{} ({} failed)", p.devices, p.devices_failed)],
                vec!["volumes".into(), p.volumes.to_string()],
                vec!["capacity".into(), format_size(p.capacity_bytes)],
                vec!["free".into(), format_size(p.free_bytes)],
                vec!["server key".into(), p.server_key.clone()],
            ];
            table::print(&["POOL", ""], &rows);
            if let Ok(Response::Operations(ops)) = request(client, Request::Operations).await {
                for op in ops {
                    println!(
                        "\nreconfiguring: {} — {}; {} of {} volumes, {} of {} extents moved",
                        op.what, op.state, op.volumes_done, op.volumes_total, op.extents_done, op.extents_total
                    );
                }
            }
            if !p.servers.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = p
                    .servers
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.host_id.to_string(),
                            s.role.clone(),
                            crate::server::durable::hms(s.since_unix_ms / 1000),
                            s.addrs.join(", "),
                        ]
                    })
                    .collect();
                table::print(&["METADATA SERVER", "HOST ID", "ROLE", "SINCE", "ADDRESSES"], &rows);
            }
        }
        Command::Device(DeviceCommand::List { json }) => {
            let Response::Devices(devices) = request(client, Request::DeviceList).await? else {
                bail!("unexpected reply")
            };
            let fencing = device_fencing(client).await?;
            let fences = |d: &volume_format::control::messages::DeviceInfo| {
                fencing.iter().find(|f| f.device == d.index).and_then(|f| f.fences)
            };
            if json {
                // Each device as before, plus `fenced`: true, false, or
                // null (not known: the server has not reached it, or is older).
                let mut listed = Vec::with_capacity(devices.len());
                for d in &devices {
                    let mut value = serde_json::to_value(d)?;
                    if let Some(object) = value.as_object_mut() {
                        object.insert("fenced".into(), serde_json::json!(fences(d)));
                    }
                    listed.push(value);
                }
                return print_json(&listed);
            }
            let rows: Vec<Vec<String>> = devices
                .iter()
                .map(|d| {
                    vec![
                        d.index.to_string(), // "dev0"
                        d.uri.clone(),
                        format_size(d.size_bytes),
                        format!("{}/{}", d.extents_free, d.extents_total),
                        d.state.to_string(),
                        if d.reachable { "yes" } else { "NO" }.into(),
                        match fences(d) {
                            Some(true) => "yes",
                            Some(false) => "no",
                            None => "?",
                        }
                        .into(),
                        if d.recovery.is_empty() { "-".into() } else { d.recovery.clone() },
                    ]
                })
                .collect();
            table::print(&["DEVICE", "URI", "SIZE", "FREE/EXTENTS", "STATE", "REACHABLE", "FENCED", "RECOVERY"], &rows);
        }
        Command::Device(DeviceCommand::Add { uri, force }) => {
            let what = format!("adding device {uri}");
            progress::run(client, Request::DeviceAdd { uri: uri.clone(), force }, &what, false).await?;
        }
        Command::Device(DeviceCommand::Evacuate { device, json }) => {
            let index = device_index(client, &device).await?;
            let what = format!("evacuating {index}");
            progress::run(client, Request::DeviceEvacuate { device: index }, &what, json).await?;
        }
        Command::Device(DeviceCommand::Remove { device }) => {
            let index = device_index(client, &device).await?;
            request(client, Request::DeviceRemove { device: index })
                .await
                .with_context(|| format!("removing {index}"))?;
            println!("{index} removed from the pool");
        }
        Command::Device(DeviceCommand::Replace { device, uri, force, json }) => {
            let index = device_index(client, &device).await?;
            let what = format!("replacing {index} with {uri}");
            progress::run(client, Request::DeviceReplace { device: index, uri, force }, &what, json).await?;
        }
        Command::Volume(VolumeCommand::Mirror(MirrorCommand::Add { name, json })) => {
            let what = format!("adding a mirror leg to volume {name}");
            progress::run(client, Request::VolumeMirrorAdd { name }, &what, json).await?;
        }
        Command::Volume(VolumeCommand::Mirror(MirrorCommand::Remove { name, device, json })) => {
            let device = match device {
                Some(d) => Some(device_index(client, &d).await?),
                None => None,
            };
            let what = format!("removing a mirror leg of volume {name}");
            progress::run(client, Request::VolumeMirrorRemove { name, device }, &what, json).await?;
        }
        Command::Volume(VolumeCommand::Move { name, from, to, json }) => {
            let from = device_index(client, &from).await?;
            let to = match to {
                Some(d) => Some(device_index(client, &d).await?),
                None => None,
            };
            let what = format!("moving volume {name} off {from}");
            progress::run(client, Request::VolumeMove { name, from, to }, &what, json).await?;
        }
        Command::Volume(VolumeCommand::Create { name, size, mirror }) => {
            request(client, Request::VolumeCreate { name: name.clone(), size_bytes: size, legs: mirror })
                .await
                .with_context(|| format!("creating volume {name}"))?;
            println!("volume {name} created: {} with {mirror} leg(s)", format_size(size));
        }
        Command::Snapshot(SnapshotCommand::Create { volume, name }) => {
            let what = format!("taking snapshot {name} of volume {volume}");
            let request = Request::SnapshotCreate { volume: volume.clone(), name: name.clone() };
            wait::request_while_alive(client, request, &what).await.context(what)?;
            println!("snapshot {name} of volume {volume} created; export {}", snapshot_export_name(&volume, &name));
        }
        Command::Snapshot(SnapshotCommand::Delete { volume, name }) => {
            request(client, Request::SnapshotDelete { volume: volume.clone(), name: name.clone() })
                .await
                .with_context(|| format!("deleting snapshot {name} of volume {volume}"))?;
            println!("snapshot {name} of volume {volume} deleted");
        }
        Command::Snapshot(SnapshotCommand::List { volume, json }) => {
            let r = request(client, Request::SnapshotList { volume }).await.context("listing snapshots")?;
            let Response::Snapshots(list) = r else { return Err(unexpected(r)) };
            if json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.volume.clone(),
                        s.name.clone(),
                        s.id.to_string(),
                        format_size(s.size_bytes),
                        format!("{} ({})", s.cow_chunks, format_size(s.cow_chunks * s.chunk_bytes)),
                        format_size(s.reserved_bytes),
                        if s.newest { "yes" } else { "" }.into(),
                        s.export.clone(),
                    ]
                })
                .collect();
            table::print(&["VOLUME", "SNAPSHOT", "ID", "SIZE", "COPIED CHUNKS", "RESERVED", "NEWEST", "EXPORT"], &rows);
        }
        Command::Volume(VolumeCommand::List { json }) => {
            let Response::Volumes(volumes) = request(client, Request::VolumeList).await? else {
                bail!("unexpected reply")
            };
            if json {
                return print_json(&volumes);
            }
            let rows: Vec<Vec<String>> = volumes
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.id.to_string(),
                        format_size(v.size_bytes),
                        v.legs.to_string(),
                        v.extents.to_string(),
                        v.layout_generation.to_string(),
                        if v.open_by.is_empty() { "-".into() } else { v.open_by.join(", ") },
                        if v.health.is_empty() { "ok".into() } else { v.health.clone() },
                    ]
                })
                .collect();
            table::print(&["NAME", "ID", "SIZE", "LEGS", "EXTENTS", "LAYOUT GEN", "OPEN BY", "HEALTH"], &rows);
        }
        Command::Volume(VolumeCommand::Show { name, json }) => {
            let r = request(client, Request::VolumeShow { name: name.clone() })
                .await
                .with_context(|| format!("showing volume {name}"))?;
            let Response::Volume(detail) = r else { return Err(unexpected(r)) };
            let cache = volume_cache_state(client, &name).await?;
            let reported = volume_cache_reported(client, &name, cache.as_ref()).await?;
            let recorded = volume_cache_mirror(client, &name, cache.as_ref()).await?;
            if json {
                let mut value = serde_json::to_value(&detail)?;
                if let (Some(cache), Some(object)) = (&cache, value.as_object_mut()) {
                    let mut cache = serde_json::to_value(cache)?;
                    if let Some(object) = cache.as_object_mut() {
                        object.insert("holder_report".into(), serde_json::to_value(&reported)?);
                        object.insert("mirror_recorded".into(), serde_json::to_value(&recorded)?);
                    }
                    object.insert("cache".into(), cache);
                }
                return print_json(&value);
            }
            let v = &detail.info;
            let d = &detail.description;
            println!(
                "volume {} (id {}): {}, {} leg(s), {} extents of {}, layout generation {}",
                v.name,
                v.id,
                format_size(v.size_bytes),
                v.legs,
                v.extents,
                format_size(d.extent_bytes),
                v.layout_generation
            );
            if !v.open_by.is_empty() {
                println!("open by: {}", v.open_by.join(", "));
            }
            for f in &v.fallback {
                println!("fallback through the server: {f}");
            }
            if !v.health.is_empty() {
                println!("health: {}", v.health);
            }
            if let Some(cache) = &cache {
                println!("cache: {}", cache.summary());
            }
            if let Some(reported) = &reported {
                println!("cache at its holder: {}", reported.summary());
            }
            if let Some(recorded) = &recorded {
                println!("cache mirror: {}", recorded.summary());
            }
            let mut headers = vec!["EXTENT".to_string(), "LOGICAL RANGE".to_string()];
            for i in 0..d.mirror_legs {
                headers.push(format!("LEG {} (device @ byte offset)", i + 1));
            }
            let rows: Vec<Vec<String>> = d
                .extents
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let start = i as u64 * d.extent_bytes;
                    let end = (start + d.extent_bytes).min(d.size_bytes);
                    let mut row = vec![i.to_string(), format!("[{start}, {end})")];
                    row.extend(e.legs.iter().map(|leg| format!("{} @ {}", leg.device, leg.offset)));
                    row
                })
                .collect();
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            table::print(&headers, &rows);
            println!();
            let rows: Vec<Vec<String>> = d
                .devices
                .iter()
                .map(|dev| {
                    vec![
                        dev.index.to_string(),
                        dev.uri.clone(),
                        dev.device_uuid.to_string(),
                        if dev.online {
                            "online"
                        } else if dev.resyncing {
                            "resyncing"
                        } else {
                            "failed"
                        }
                        .into(),
                    ]
                })
                .collect();
            table::print(&["DEVICE", "URI", "UUID", "STATE"], &rows);
        }
        Command::Volume(VolumeCommand::Delete { name }) => {
            request(client, Request::VolumeDelete { name: name.clone() })
                .await
                .with_context(|| format!("deleting volume {name}"))?;
            println!("volume {name} deleted");
        }
        Command::Volume(VolumeCommand::Grow { name, size }) => {
            request(client, Request::VolumeGrow { name: name.clone(), size_bytes: size })
                .await
                .with_context(|| format!("growing volume {name}"))?;
            println!("volume {name} is now {}", format_size(size));
        }
        Command::Volume(VolumeCommand::Cache { name, forget_mirror: true, .. }) => {
            if client.session().version < volume_format::control::MIRROR_FORGET_PROTOCOL_MIN {
                bail!(
                    "the metadata server is too old to forget a cache mirror (protocol {} < {}); upgrade it first",
                    client.session().version,
                    volume_format::control::MIRROR_FORGET_PROTOCOL_MIN
                );
            }
            request(client, Request::MirrorForget { name: name.clone() })
                .await
                .with_context(|| format!("forgetting the cache mirror of volume {name}"))?;
            println!("volume {name}: its cache mirror's writes are given up; it opens with what its devices hold");
        }
        Command::Volume(VolumeCommand::Cache { name, size, mode, .. }) => {
            let mode = crate::server::cache::parse_cache_mode(&mode).map_err(anyhow::Error::msg)?;
            let what = format!("setting the cache of volume {name}");
            let request = Request::VolumeCache { name: name.clone(), size_bytes: size, mode };
            wait::request_while_alive(client, request, &what).await.context(what)?;
            match mode {
                Some(mode) => println!("volume {name}: {mode} write-back cache of {}", format_size(size)),
                None => println!("volume {name}: no cache"),
            }
        }
        Command::Client(ClientCommand::List { json }) => {
            let Response::Clients(clients) = request(client, Request::ClientList).await? else {
                bail!("unexpected reply")
            };
            if json {
                return print_json(&clients);
            }
            let rows: Vec<Vec<String>> = clients
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.role.to_string(),
                        c.key.clone(),
                        c.connected.to_string(),
                        if c.handles.is_empty() { "-".into() } else { c.handles.join(", ") },
                    ]
                })
                .collect();
            table::print(&["NAME", "ROLE", "KEY", "SESSIONS", "HANDLES"], &rows);
            for c in clients.iter().filter(|c| !c.fallback.is_empty()) {
                println!("{} reaches through the server: {}", c.name, c.fallback.join("; "));
            }
        }
        Command::Client(ClientCommand::Add { public_key, role, name, volumes }) => {
            let (key, comment) = super::public_key_arg(&public_key)?;
            let name = name.unwrap_or(comment);
            let scope = if volumes.is_empty() { String::new() } else { format!(" for volumes {}", volumes.join(", ")) };
            request(client, Request::ClientAuthorize { key, name: name.clone(), role, volumes })
                .await
                .context("authorizing the key")?;
            println!(
                "key {} authorized as {role}{}{scope}",
                hex::encode(key),
                if name.is_empty() { String::new() } else { format!(" ({name})") }
            );
        }
        Command::Client(ClientCommand::Remove { public_key }) => {
            let (key, _) = super::public_key_arg(&public_key)?;
            request(client, Request::ClientRevoke { key }).await.context("revoking the key")?;
            println!("key {} revoked", hex::encode(key));
        }
        Command::Mds(MdsCommand::Handoff { to }) => {
            request(client, Request::Handoff { to: to.clone() }).await.context("handing the pool off")?;
            println!("the pool was handed off{}", to.map(|t| format!(" to {t}")).unwrap_or_default());
        }
        Command::Keygen { .. } | Command::Pool(PoolCommand::Init { .. }) | Command::Demo(_) | Command::Generate(_) => {
            unreachable!("handled without a server connection")
        }
    }
    Ok(())
}
