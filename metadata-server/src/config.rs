//! `sanvol-mds --config FILE`: the server's TOML configuration.
//!
//! Why so little is configured here: everything about the pool (devices,
//! volumes, authorized clients) lives in the pool metadata on the devices, so
//! that any server with access to the devices can take over. The config only
//! says where to listen, which key proves this server's identity, and where
//! to start looking for the pool.
//!
//! ```toml
//! listen = ["127.0.0.1:7700", "unix:/run/sanvol/mds.sock"]
//! key = "mds.key"
//! devices = ["nbd://10.0.0.5:10809/disk0", "nbd+unix:///disk1?socket=/run/disk1.sock"]
//! lease_ms = 10000
//! durable_ms = 30000
//! grace_ms = 40000
//! device_request_max_ms = 5000   # at least every agent's --device-request-max-ms
//! channel_mode_min = "integrity"   # or "encrypted": refuse integrity-only channels
//! log = "info"
//! # One active server per pool (a disk lease); standbys run the same config
//! # with their own host_id, name and listen addresses.
//! host_id = 1
//! name = "mds-a"
//! lease_io_timeout_ms = 1000
//! advertise = ["10.0.0.2:7700"]
//! # A failed device's extents are rebuilt on the other devices after this
//! # long (0: never; the admin replaces it).
//! device_replace_after_ms = 600000
//! # Where the server keeps its mirror of agents' write-back caches (one
//! # file per cached volume, as large as the volume's cache; default: the
//! # directory `cache-mirror` beside this file).
//! cache_mirror_dir = "/var/lib/sanvol/cache-mirror"
//! # Snapshots as plain NBD exports VOLUME@SNAPSHOT for backup tools on
//! # this host (mode 0600; only while this server is the active one).
//! backup_socket = "/run/sanvol-mds/backup.sock"
//! ```
//!
//! Relative paths (the key, `unix:` listen sockets, `socket=` of unix device
//! URIs) are resolved against the directory holding the config file, so a
//! config and its key can move together.

use std::path::{Path, PathBuf};

use blockio::uri::{NbdUri, Transport};
use serde::Deserialize;

use control_client::{ChannelMode, ControlAddr};

/// Default lease: long enough that a busy agent renews comfortably, short
/// enough that a dead agent is excluded from a reconfiguration quickly.
pub const LEASE_MS_DEFAULT: u64 = 10_000;
/// Shortest lease accepted: below it, renewals would flood the server.
pub const LEASE_MS_MIN: u64 = 100;
/// Longest lease accepted: a dead agent would hold volumes for too long.
pub const LEASE_MS_MAX: u64 = 600_000;
/// Default durable timeout: how long past its lease a handle stays reserved
/// for its agent to resume (a server restart, a network blip) before a
/// conflicting open may break it.
pub const DURABLE_MS_DEFAULT: u64 = 30_000;
/// Longest durable timeout (and grace period) accepted: a vanished agent
/// would keep volumes from everyone else for too long.
pub const DURABLE_MS_MAX: u64 = 3_600_000;
/// Default time a device stays failed before its extents are rebuilt on the
/// other devices (Ceph marks a down OSD out after 10 minutes too): long
/// enough for a device server's restart or a host's reboot, short enough
/// that a mirror is not left with one leg for long.
pub const DEVICE_REPLACE_AFTER_MS_DEFAULT: u64 = 600_000;

/// The cache mirror directory when the config names none (relative to the
/// config file's directory).
pub const CACHE_MIRROR_DIR_DEFAULT: &str = "cache-mirror";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file as written (all paths still relative).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Vec<String>,
    key: PathBuf,
    devices: Vec<String>,
    #[serde(default)]
    lease_ms: Option<u64>,
    #[serde(default)]
    durable_ms: Option<u64>,
    #[serde(default)]
    device_request_max_ms: Option<u64>,
    #[serde(default)]
    grace_ms: Option<u64>,
    #[serde(default)]
    channel_mode_min: Option<String>,
    #[serde(default)]
    log: Option<String>,
    #[serde(default)]
    log_format: Option<String>,
    #[serde(default)]
    metrics_addr: Option<String>,
    #[serde(default)]
    host_id: Option<u32>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    lease_io_timeout_ms: Option<u64>,
    #[serde(default)]
    advertise: Option<Vec<String>>,
    #[serde(default)]
    device_replace_after_ms: Option<u64>,
    #[serde(default)]
    cache_mirror_dir: Option<PathBuf>,
    #[serde(default)]
    backup_socket: Option<PathBuf>,
}

/// Shortest and longest disk-lease I/O timeout accepted (all lease timing
/// derives from it: see `volume_format::lease`).
pub const LEASE_IO_TIMEOUT_MS_MIN: u64 = 50;
pub const LEASE_IO_TIMEOUT_MS_MAX: u64 = 60_000;

/// Who this server is among the pool's metadata servers (one active, the
/// others standing by), and its disk-lease timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    /// 1..=15, unique per server of a pool (its sector in the lease area).
    pub host_id: u32,
    /// Shown in listings, logs and redirects ("mds-a").
    pub name: String,
    /// The disk lease's I/O timeout `T` (renew every T, stop committing 3T
    /// after the last good renewal, a standby takes over after 5T + 4T).
    pub lease_io_timeout_ms: u64,
    /// Where clients reach this server (default: `listen`); told to clients
    /// of another server when this one is active.
    pub advertise: Vec<String>,
}

impl Availability {
    /// Host id 1, named after the host, default timing, reached at `listen`.
    pub fn defaults(listen: &[ControlAddr]) -> Availability {
        Availability {
            host_id: 1,
            name: default_name(1),
            lease_io_timeout_ms: volume_format::lease::LeaseTiming::DEFAULT_IO_TIMEOUT_MS,
            advertise: listen.iter().map(|a| a.to_string()).collect(),
        }
    }
}

fn default_name(host_id: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    if host.is_empty() {
        format!("mds-{host_id}")
    } else {
        format!("{host}/{host_id}")
    }
}

/// A loaded, validated configuration with absolute paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Control listeners (`HOST:PORT` or `unix:PATH`).
    pub listen: Vec<ControlAddr>,
    /// The server's private key file (`sanvol keygen`).
    pub key: PathBuf,
    /// NBD URIs where the pool's devices are found. Devices the metadata
    /// records under other URIs are tried as well.
    pub devices: Vec<NbdUri>,
    /// How long a session's lease (and its handles) lasts after a renewal.
    pub lease_ms: u64,
    /// How long past its lease a handle stays reserved for a resume.
    pub durable_ms: u64,
    /// The longest an agent's device request may take: nothing about a
    /// holder is acted on (break, release, exclusion from a recall) before
    /// its lease + this has passed (`volume_format::fencing`). At least
    /// every agent's `--device-request-max-ms`.
    pub device_request_max_ms: u64,
    /// After a restart, how long only resumes are served (default: lease +
    /// durable time, the longest a handle from before could still be resumed
    /// without conflict). Ends early once every handle was resumed or closed.
    pub grace_ms: u64,
    /// The weakest channel mode accepted from clients (default integrity:
    /// clients choose; both modes authenticate every byte).
    pub channel_mode_min: ChannelMode,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace` or a
    /// `tracing_subscriber` directive); `RUST_LOG` and `--log` override it.
    pub log: Option<String>,
    /// How log lines are written (`text` or `json`); `--log-format` overrides it.
    pub log_format: ops::logging::LogFormat,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere;
    /// `--metrics-addr` overrides it.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Host id, name, disk-lease timing and advertised addresses.
    pub availability: Availability,
    /// A device failed for this long has its extents rebuilt on the other
    /// devices; `None` (`device_replace_after_ms = 0`): never.
    pub device_replace_after_ms: Option<u64>,
    /// Where the mirrors of agents' write-back caches are kept (a local
    /// directory; one file per cached volume).
    pub cache_mirror_dir: PathBuf,
    /// Where the active server serves the backup pseudo-device as plain NBD
    /// to local backup tools (`server::backup_socket`); `None`: nowhere.
    pub backup_socket: Option<PathBuf>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &base).map_err(|message| ConfigError::Invalid { path: path.into(), message })
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let resolve =
            |p: &Path| if p.is_absolute() || base.as_os_str().is_empty() { p.to_path_buf() } else { base.join(p) };
        if raw.listen.is_empty() {
            return Err("`listen` is empty: give at least one address, e.g. listen = [\"127.0.0.1:7700\"]".into());
        }
        let listen = raw
            .listen
            .iter()
            .map(|a| match a.parse::<ControlAddr>()? {
                ControlAddr::Unix(p) => Ok(ControlAddr::Unix(resolve(&p))),
                tcp => Ok(tcp),
            })
            .collect::<Result<Vec<_>, String>>()?;
        if raw.devices.is_empty() {
            return Err("`devices` is empty: list the NBD URIs of the pool's devices".into());
        }
        let devices = raw
            .devices
            .iter()
            .map(|d| {
                let mut uri: NbdUri = d.parse().map_err(|e: blockio::uri::UriError| format!("devices: {e}"))?;
                if let Transport::Unix { socket } = &mut uri.transport {
                    *socket = resolve(socket);
                }
                Ok(uri)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let lease_ms = raw.lease_ms.unwrap_or(LEASE_MS_DEFAULT);
        if !(LEASE_MS_MIN..=LEASE_MS_MAX).contains(&lease_ms) {
            return Err(format!("lease_ms = {lease_ms} is outside {LEASE_MS_MIN}..={LEASE_MS_MAX}"));
        }
        let durable_ms = raw.durable_ms.unwrap_or(DURABLE_MS_DEFAULT);
        if durable_ms > DURABLE_MS_MAX {
            return Err(format!("durable_ms = {durable_ms} is above the maximum {DURABLE_MS_MAX}"));
        }
        let device_request_max_ms =
            raw.device_request_max_ms.unwrap_or(volume_format::fencing::DEVICE_REQUEST_MAX_MS_DEFAULT);
        let (min, max) =
            (volume_format::fencing::DEVICE_REQUEST_MAX_MS_MIN, volume_format::fencing::DEVICE_REQUEST_MAX_MS_MAX);
        if !(min..=max).contains(&device_request_max_ms) {
            return Err(format!("device_request_max_ms = {device_request_max_ms} is outside {min}..={max}"));
        }
        let grace_ms = raw.grace_ms.unwrap_or(lease_ms + durable_ms);
        if grace_ms > DURABLE_MS_MAX {
            return Err(format!("grace_ms = {grace_ms} is above the maximum {DURABLE_MS_MAX}"));
        }
        let channel_mode_min = match &raw.channel_mode_min {
            None => ChannelMode::Integrity,
            Some(m) => m.parse().map_err(|e| format!("channel_mode_min: {e}"))?,
        };
        let host_id = raw.host_id.unwrap_or(1);
        if !(1..=volume_format::lease::HOST_ID_MAX).contains(&host_id) {
            return Err(format!(
                "host_id = {host_id} is outside 1..={}: give each metadata server of a pool its own host id",
                volume_format::lease::HOST_ID_MAX
            ));
        }
        let lease_io_timeout_ms =
            raw.lease_io_timeout_ms.unwrap_or(volume_format::lease::LeaseTiming::DEFAULT_IO_TIMEOUT_MS);
        if !(LEASE_IO_TIMEOUT_MS_MIN..=LEASE_IO_TIMEOUT_MS_MAX).contains(&lease_io_timeout_ms) {
            return Err(format!(
                "lease_io_timeout_ms = {lease_io_timeout_ms} is outside {LEASE_IO_TIMEOUT_MS_MIN}..={LEASE_IO_TIMEOUT_MS_MAX}"
            ));
        }
        let advertise = match raw.advertise {
            Some(list) => list
                .iter()
                .map(|a| a.parse::<ControlAddr>().map(|a| a.to_string()).map_err(|e| format!("advertise: {e}")))
                .collect::<Result<Vec<_>, String>>()?,
            None => listen.iter().map(|a| a.to_string()).collect(),
        };
        if advertise.len() > volume_format::lease::LEASE_ADDRS_MAX {
            return Err(format!("advertise: at most {} addresses", volume_format::lease::LEASE_ADDRS_MAX));
        }
        let log_format = match raw.log_format.as_deref() {
            None | Some("text") => ops::logging::LogFormat::Text,
            Some("json") => ops::logging::LogFormat::Json,
            Some(other) => return Err(format!("log_format = {other:?}: expected \"text\" or \"json\"")),
        };
        let metrics_addr = match &raw.metrics_addr {
            None => None,
            Some(a) => Some(a.parse().map_err(|e| {
                format!("metrics_addr = {a:?}: {e}; expected HOST:PORT with an IP address, e.g. \"127.0.0.1:9751\"")
            })?),
        };
        let name = raw.name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| default_name(host_id));
        let availability = Availability { host_id, name, lease_io_timeout_ms, advertise };
        Ok(Config {
            listen,
            key: resolve(&raw.key),
            devices,
            lease_ms,
            durable_ms,
            device_request_max_ms,
            grace_ms,
            channel_mode_min,
            log: raw.log,
            log_format,
            metrics_addr,
            availability,
            device_replace_after_ms: match raw.device_replace_after_ms.unwrap_or(DEVICE_REPLACE_AFTER_MS_DEFAULT) {
                0 => None,
                ms => Some(ms),
            },
            cache_mirror_dir: resolve(raw.cache_mirror_dir.as_deref().unwrap_or(Path::new(CACHE_MIRROR_DIR_DEFAULT))),
            backup_socket: raw.backup_socket.as_deref().map(resolve),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backup_socket_is_read_and_resolved() {
        let text = |path: &str| {
            format!("listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]\nbackup_socket = {path:?}")
        };
        let c = Config::parse(&text("backup.sock"), Path::new("/etc/sanvol")).unwrap();
        assert_eq!(c.backup_socket, Some(PathBuf::from("/etc/sanvol/backup.sock")));
        let c = Config::parse(&text("/run/sanvol-mds/backup.sock"), Path::new("/etc/sanvol")).unwrap();
        assert_eq!(c.backup_socket, Some(PathBuf::from("/run/sanvol-mds/backup.sock")));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let c = Config::parse(
            r#"
            listen = ["127.0.0.1:7700", "unix:mds.sock"]
            key = "mds.key"
            devices = ["nbd+unix:///d0?socket=d0.sock", "nbd://10.0.0.1:10809/x"]
            "#,
            Path::new("/etc/sanvol"),
        )
        .unwrap();
        assert_eq!(c.key, PathBuf::from("/etc/sanvol/mds.key"));
        assert_eq!(c.listen[1], ControlAddr::Unix("/etc/sanvol/mds.sock".into()));
        assert_eq!(c.devices[0].to_string(), "nbd+unix:///d0?socket=/etc/sanvol/d0.sock");
        assert_eq!(c.lease_ms, LEASE_MS_DEFAULT);
        assert_eq!(c.durable_ms, DURABLE_MS_DEFAULT);
        assert_eq!(c.grace_ms, LEASE_MS_DEFAULT + DURABLE_MS_DEFAULT);
        assert_eq!(c.channel_mode_min, ChannelMode::Integrity, "by default clients choose");
        assert_eq!(c.backup_socket, None, "no backup socket unless asked");
    }

    #[test]
    fn the_channel_mode_minimum_is_read_and_checked() {
        let text =
            |m: &str| format!("listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]\nchannel_mode_min = {m:?}");
        assert_eq!(Config::parse(&text("encrypted"), base()).unwrap().channel_mode_min, ChannelMode::Encrypted);
        assert_eq!(Config::parse(&text("integrity"), base()).unwrap().channel_mode_min, ChannelMode::Integrity);
        let err = Config::parse(&text("plain"), base()).unwrap_err();
        assert!(err.contains("channel_mode_min") && err.contains("encrypted or integrity"), "{err}");
    }

    #[test]
    fn the_commented_example_parses() {
        let c = Config::parse(include_str!("../examples/mds.toml"), Path::new("/etc/sanvol")).unwrap();
        assert_eq!((c.lease_ms, c.durable_ms, c.grace_ms), (10_000, 30_000, 40_000));
        assert_eq!(c.device_request_max_ms, volume_format::fencing::DEVICE_REQUEST_MAX_MS_DEFAULT);
        assert!(Config::parse(
            "listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]\ndevice_request_max_ms = 10",
            base()
        )
        .unwrap_err()
        .contains("device_request_max_ms"));
        assert!(Config::parse(
            "listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]\ndurable_ms = 99999999",
            base()
        )
        .unwrap_err()
        .contains("durable_ms"));
    }

    #[test]
    fn log_format_and_metrics_addr_are_read_and_checked() {
        let text = |extra: &str| format!("listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]\n{extra}");
        let c = Config::parse(&text(""), base()).unwrap();
        assert_eq!((c.log_format, c.metrics_addr), (ops::logging::LogFormat::Text, None));
        let c = Config::parse(&text("log_format = \"json\"\nmetrics_addr = \"127.0.0.1:9751\""), base()).unwrap();
        assert_eq!(c.log_format, ops::logging::LogFormat::Json);
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9751".parse().unwrap()));
        assert!(Config::parse(&text("log_format = \"xml\""), base()).unwrap_err().contains("log_format"));
        assert!(Config::parse(&text("metrics_addr = \"localhost\""), base()).unwrap_err().contains("metrics_addr"));
    }

    fn base() -> &'static Path {
        Path::new("/")
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let base = Path::new("/");
        let err = Config::parse("listen = []\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]", base).unwrap_err();
        assert!(err.contains("listen"), "{err}");
        let err = Config::parse("listen = [\"x\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]", base).unwrap_err();
        assert!(err.contains("HOST:PORT"), "{err}");
        let err = Config::parse("listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"http://x\"]", base).unwrap_err();
        assert!(err.contains("nbd://"), "{err}");
        let err =
            Config::parse("listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]\nlease = 5", base).unwrap_err();
        assert!(err.contains("lease"), "{err}");
        let err = Config::parse("listen = [\"h:1\"]\nkey = \"k\"\ndevices = [\"nbd://h:1/x\"]\nlease_ms = 1", base)
            .unwrap_err();
        assert!(err.contains("lease_ms"), "{err}");
    }
}
