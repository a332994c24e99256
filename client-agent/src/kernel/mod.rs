//! Kernel attach: a volume as `/dev/nbdX`, through the kernel NBD driver's generic-netlink interface.
//!
//! The agent stays the NBD server: for each device it makes socketpairs, serves one end of each with
//! blockio's NBD server over the volume's `VolumeDevice`, does the NBD handshake on the other end
//! itself (the kernel driver only speaks the transmission phase) and hands that end to the driver
//! with `NBD_CMD_CONNECT`. The volume's data still goes straight from the agent to the pool's devices.
//!
//! Why netlink and not the ioctl interface: an ioctl-configured device lives only as long as the
//! process blocked in `NBD_DO_IT`, so an agent crash or upgrade would tear down a mounted filesystem.
//! A netlink-configured device outlives its sockets: when the agent dies the driver marks the sockets
//! dead, requeues their requests and holds new ones for the *dead-connection timeout*; a restarted
//! agent finds its devices (`NBD_CMD_STATUS` plus the backend identifier in
//! `/sys/block/nbdX/backend`), re-opens the volume and gives the same device fresh sockets with
//! `NBD_CMD_RECONFIGURE`. The filesystem sees a pause, not an error. See [`KernelSettings`] for the
//! timeouts and why they have the values they have.
//!
//! The backend identifier (`sanvol:<pool-uuid>:<mode>:<handle>:<volume>`, [`BackendId`]) is what
//! stops a restarted agent from ever binding a device to the wrong volume: it is set once at connect,
//! the driver refuses a reconfigure that names a different one, and the agent checks the re-opened
//! volume's pool against it before it touches the device.
//!
//! # Layout
//! - [`netlink`]: a minimal generic-netlink client (family lookup, request/ack, attribute parsing).
//! - [`driver`]: the `nbd` family's commands (connect, disconnect, reconfigure, status) and sysfs.
//! - [`attach`]: sockets, the handshake, and [`attach::KernelAttachment`] — one attached device with
//!   its monitor (new sockets when the driver drops one, the new size after a grow).
//! - [`reattach`]: finding a previous agent's devices after a restart and binding them again; the
//!   device-URI host aliases (`--device-host-alias`).

pub mod attach;
pub mod driver;
pub mod netlink;
pub mod reattach;

use std::fmt;
use std::io;

use volume_format::control::messages::OpenMode;

/// What an operator sees when the driver is missing.
pub const NOT_LOADED: &str = "the kernel NBD driver is not loaded: modprobe nbd, or use the socket export";

/// Per-device kernel settings. Units are seconds because the driver's attributes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSettings {
    /// `NBD_ATTR_TIMEOUT`: when a request has been on a socket this long, the driver declares that
    /// socket dead and *requeues* the request (with a non-zero timeout it never fails it for this).
    /// It must be non-zero: it is what moves requests that were in flight on a dead agent's socket
    /// onto the new one; and it should be well above the longest stall a live agent may have (a
    /// recall, a slow device), because a live socket timed out this way is replaced too (the agent
    /// notices and reconfigures), which costs a pause.
    pub timeout_secs: u64,
    /// `NBD_ATTR_DEAD_CONN_TIMEOUT`: how long requests wait for a live socket when none is left
    /// before they fail with EIO. This is the reattach window: agent restart + control reconnect +
    /// handle resume (from the state file; without it a re-open, which waits up to the old handle's
    /// lease plus durable time at the metadata server) + reconfigure.
    pub dead_conn_timeout_secs: u64,
    /// Sockets per device. More than one only when the volume's export allows multi-connection.
    pub connections: usize,
    /// Logical block size given to the driver (a power of two, 512..=4096).
    pub block_size_bytes: u64,
}

impl Default for KernelSettings {
    fn default() -> Self {
        KernelSettings { timeout_secs: 30, dead_conn_timeout_secs: 120, connections: 1, block_size_bytes: 4096 }
    }
}

pub use control_client::agent_api::KernelAttachRequest;

/// Most sockets per device we hand the driver.
pub const CONNECTIONS_MAX: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{NOT_LOADED}")]
    NotLoaded,
    #[error("{device} is in use (connected to another backend); choose another --nbd-device or detach it")]
    Busy { device: String },
    #[error("{0:?} is not an NBD device name (expected /dev/nbdN or nbdN)")]
    BadDevice(String),
    #[error("kernel NBD driver: {what}: {source}")]
    Netlink { what: String, source: io::Error },
    #[error("serving the kernel's NBD socket: {0}")]
    Socket(String),
    #[error("{device} belongs to {found}, not to {expected}; refusing to bind it")]
    WrongBackend { device: String, expected: String, found: String },
}

/// `/dev/nbd<index>`.
pub fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

/// Parses `/dev/nbdN` or `nbdN`.
pub fn parse_device(name: &str) -> Result<u32, KernelError> {
    let bare = name.strip_prefix("/dev/").unwrap_or(name);
    bare.strip_prefix("nbd")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| KernelError::BadDevice(name.to_string()))
}

/// The backend identifier the agent gives each device it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendId {
    pub pool: uuid::Uuid,
    pub mode: OpenMode,
    /// The handle the device was first attached with (a re-open gets a new one; the identifier
    /// cannot change while the device stays connected).
    pub handle: u64,
    pub volume: String,
}

fn mode_word(mode: OpenMode) -> &'static str {
    match mode {
        OpenMode::ReadOnly => "ro",
        OpenMode::SharedWrite => "shared",
        OpenMode::Exclusive => "exclusive",
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sanvol:{}:{}:{}:{}", self.pool, mode_word(self.mode), self.handle, self.volume)
    }
}

impl BackendId {
    /// `None` for anything that is not a sanvol identifier (another tool's device).
    pub fn parse(s: &str) -> Option<BackendId> {
        let rest = s.trim_end_matches(['\n', '\0']).strip_prefix("sanvol:")?;
        let mut parts = rest.splitn(4, ':');
        let pool = parts.next()?.parse().ok()?;
        let mode = match parts.next()? {
            "ro" => OpenMode::ReadOnly,
            "shared" => OpenMode::SharedWrite,
            "exclusive" => OpenMode::Exclusive,
            _ => return None,
        };
        let handle = parts.next()?.parse().ok()?;
        let volume = parts.next().filter(|v| !v.is_empty())?.to_string();
        Some(BackendId { pool, mode, handle, volume })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_ids_round_trip_and_foreign_ones_are_ignored() {
        let id = BackendId { pool: uuid::Uuid::new_v4(), mode: OpenMode::Exclusive, handle: 7, volume: "db:1".into() };
        let text = id.to_string();
        assert!(text.starts_with("sanvol:"));
        assert_eq!(BackendId::parse(&text), Some(id.clone()));
        assert_eq!(BackendId::parse(&format!("{text}\n")), Some(id));
        for foreign in
            ["", "nbd-client:x", "sanvol:not-a-uuid:ro:1:v", "sanvol:00000000-0000-0000-0000-000000000000:rw:1:v"]
        {
            assert_eq!(BackendId::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn device_names() {
        assert_eq!(parse_device("/dev/nbd3").unwrap(), 3);
        assert_eq!(parse_device("nbd12").unwrap(), 12);
        for bad in ["/dev/sda", "nbd", "/dev/nbd1p1", "nbd-1"] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
    }
}
