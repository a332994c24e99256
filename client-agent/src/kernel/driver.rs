//! The `nbd` generic-netlink family's commands, plus what the driver shows in sysfs.
//!
//! Blocking calls: run them with `tokio::task::spawn_blocking` (see the [`netlink`](super::netlink)
//! module for why).

use std::os::fd::RawFd;
use std::path::Path;

use super::netlink::{self, nbd, Attr, GenlSocket};
use super::{device_path, KernelError, KernelSettings};

/// Whether the driver is loaded (its module directory, or a built-in driver's genl family).
pub fn loaded() -> bool {
    Path::new("/sys/module/nbd").exists() || matches!(GenlSocket::open(nbd::FAMILY), Ok(Some(_)))
}

fn socket() -> Result<GenlSocket, KernelError> {
    match GenlSocket::open(nbd::FAMILY) {
        Ok(Some(sock)) => Ok(sock),
        Ok(None) => Err(KernelError::NotLoaded),
        Err(source) => Err(KernelError::Netlink { what: "opening a generic netlink socket".into(), source }),
    }
}

fn sockets_attr(fds: &[RawFd]) -> Attr {
    Attr::Nested(
        nbd::ATTR_SOCKETS,
        fds.iter().map(|fd| Attr::Nested(nbd::SOCK_ITEM, vec![Attr::U32(nbd::SOCK_FD, *fd as u32)])).collect(),
    )
}

/// What `connect` sets up.
pub struct ConnectParams<'a> {
    /// A specific device, or `None` for the first free one.
    pub index: Option<u32>,
    pub size_bytes: u64,
    /// Transmission flags from the handshake (read-only, flush, FUA, trim, multi-conn).
    pub server_flags: u64,
    pub backend: &'a str,
    pub settings: KernelSettings,
    pub fds: &'a [RawFd],
}

/// `NBD_CMD_CONNECT`; returns the device index the driver used.
pub fn connect(p: &ConnectParams<'_>) -> Result<u32, KernelError> {
    let mut sock = socket()?;
    let mut attrs = vec![
        Attr::U64(nbd::ATTR_SIZE_BYTES, p.size_bytes),
        Attr::U64(nbd::ATTR_BLOCK_SIZE_BYTES, p.settings.block_size_bytes),
        Attr::U64(nbd::ATTR_SERVER_FLAGS, p.server_flags),
        Attr::U64(nbd::ATTR_TIMEOUT, p.settings.timeout_secs),
        Attr::U64(nbd::ATTR_DEAD_CONN_TIMEOUT, p.settings.dead_conn_timeout_secs),
        // No DESTROY_ON_DISCONNECT / DISCONNECT_ON_CLOSE: the device must outlive the agent.
        Attr::U64(nbd::ATTR_CLIENT_FLAGS, 0),
        Attr::Str(nbd::ATTR_BACKEND_IDENTIFIER, p.backend.to_string()),
        sockets_attr(p.fds),
    ];
    if let Some(index) = p.index {
        attrs.push(Attr::U32(nbd::ATTR_INDEX, index));
    }
    let what = match p.index {
        Some(i) => format!("connecting {}", device_path(i)),
        None => "connecting a free /dev/nbdX".to_string(),
    };
    match sock.request(nbd::CMD_CONNECT, nbd::VERSION, &attrs) {
        Ok(Some(reply)) => netlink::parse_attrs(&reply)
            .iter()
            .find(|(t, _)| *t == nbd::ATTR_INDEX)
            .and_then(|(_, p)| netlink::attr_u32(p))
            .ok_or_else(|| KernelError::Netlink { what, source: std::io::Error::other("the reply names no device") }),
        Ok(None) => p.index.ok_or_else(|| KernelError::Netlink {
            what,
            source: std::io::Error::other("the driver did not say which device it used"),
        }),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(KernelError::Busy { device: p.index.map(device_path).unwrap_or_default() })
        }
        Err(source) => Err(KernelError::Netlink { what, source }),
    }
}

/// `NBD_CMD_DISCONNECT`: the driver sends NBD_CMD_DISC on the sockets and tears the device down.
pub fn disconnect(index: u32) -> Result<(), KernelError> {
    socket()?
        .request(nbd::CMD_DISCONNECT, nbd::VERSION, &[Attr::U32(nbd::ATTR_INDEX, index)])
        .map(|_| ())
        .map_err(|source| KernelError::Netlink { what: format!("disconnecting {}", device_path(index)), source })
}

/// `NBD_CMD_RECONFIGURE`: new sockets replace *dead* ones of the device (extra ones are dropped by
/// the driver), and/or a new size. The backend identifier must match the device's.
pub fn reconfigure(
    index: u32,
    backend: &str,
    size_bytes: Option<u64>,
    settings: Option<KernelSettings>,
    fds: &[RawFd],
) -> Result<(), KernelError> {
    let mut attrs =
        vec![Attr::U32(nbd::ATTR_INDEX, index), Attr::Str(nbd::ATTR_BACKEND_IDENTIFIER, backend.to_string())];
    if let Some(size) = size_bytes {
        attrs.push(Attr::U64(nbd::ATTR_SIZE_BYTES, size));
    }
    if let Some(s) = settings {
        attrs.push(Attr::U64(nbd::ATTR_TIMEOUT, s.timeout_secs));
        attrs.push(Attr::U64(nbd::ATTR_DEAD_CONN_TIMEOUT, s.dead_conn_timeout_secs));
    }
    if !fds.is_empty() {
        attrs.push(sockets_attr(fds));
    }
    socket()?
        .request(nbd::CMD_RECONFIGURE, nbd::VERSION, &attrs)
        .map(|_| ())
        .map_err(|source| KernelError::Netlink { what: format!("reconfiguring {}", device_path(index)), source })
}

/// One device as `NBD_CMD_STATUS` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

/// `NBD_CMD_STATUS` for every device.
pub fn status() -> Result<Vec<DeviceStatus>, KernelError> {
    let reply = socket()?
        .request(nbd::CMD_STATUS, nbd::VERSION, &[])
        .map_err(|source| KernelError::Netlink { what: "listing devices".into(), source })?
        .unwrap_or_default();
    Ok(parse_status(&reply))
}

fn parse_status(reply: &[u8]) -> Vec<DeviceStatus> {
    let mut devices = Vec::new();
    for (t, list) in netlink::parse_attrs(reply) {
        if t != nbd::ATTR_DEVICE_LIST {
            continue;
        }
        for (t, item) in netlink::parse_attrs(list) {
            if t != nbd::DEVICE_ITEM {
                continue;
            }
            let fields = netlink::parse_attrs(item);
            let index = fields.iter().find(|(t, _)| *t == nbd::DEVICE_INDEX).and_then(|(_, p)| netlink::attr_u32(p));
            let connected = fields.iter().find(|(t, _)| *t == nbd::DEVICE_CONNECTED).and_then(|(_, p)| p.first());
            if let Some(index) = index {
                devices.push(DeviceStatus { index, connected: connected.is_some_and(|c| *c != 0) });
            }
        }
    }
    devices.sort_by_key(|d| d.index);
    devices
}

/// The backend identifier of a connected device (`/sys/block/nbdN/backend`).
pub fn backend(index: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"))
        .ok()
        .map(|s| s.trim_end_matches(['\n', '\0']).to_string())
}

/// The process (thread) id the driver recorded at connect (`/sys/block/nbdN/pid`), if any.
pub fn connecting_pid(index: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/pid")).ok()?.trim().parse().ok()
}

/// Size in bytes the kernel sees (`/sys/block/nbdN/size` is in 512-byte sectors).
pub fn size_bytes(index: u32) -> Option<u64> {
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/nbd{index}/size")).ok()?.trim().parse().ok()?;
    sectors.checked_mul(512)
}

/// Flushes the device's dirty pages and the driver's cache (`fsync` on the block device sends
/// NBD_CMD_FLUSH when the export allows it).
pub fn flush(index: u32) -> Result<(), KernelError> {
    let path = device_path(index);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .open(&path)
        .map_err(|source| KernelError::Netlink { what: format!("opening {path} to flush it"), source })?;
    file.sync_all().map_err(|source| KernelError::Netlink { what: format!("flushing {path}"), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_replies_are_parsed_and_junk_is_skipped() {
        let mut buf = Vec::new();
        let item = |i: u32, c: u8| {
            Attr::Nested(
                nbd::DEVICE_ITEM,
                vec![Attr::U32(nbd::DEVICE_INDEX, i), Attr::U32(nbd::DEVICE_CONNECTED, c as u32)],
            )
        };
        Attr::Nested(nbd::ATTR_DEVICE_LIST, vec![item(3, 1), item(0, 0), Attr::Nested(nbd::DEVICE_ITEM, vec![])])
            .encode_for_test(&mut buf);
        assert_eq!(
            parse_status(&buf),
            vec![DeviceStatus { index: 0, connected: false }, DeviceStatus { index: 3, connected: true }]
        );
        assert!(parse_status(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn a_host_without_the_driver_says_so() {
        // The build machines have no NBD driver; where one is loaded this checks nothing.
        if !loaded() {
            assert!(matches!(status(), Err(KernelError::NotLoaded)));
            assert_eq!(KernelError::NotLoaded.to_string(), super::super::NOT_LOADED);
        }
    }
}
