//! One volume attached to a kernel NBD device: the sockets the agent serves for it, the handshake,
//! and a monitor that keeps the device supplied.
//!
//! The monitor exists because the driver can drop a socket while the agent lives (a request that
//! took longer than [`KernelSettings::timeout_secs`] marks its socket dead): the agent then sees its
//! end close and hands the device a fresh socket with `NBD_CMD_RECONFIGURE`. It also pushes a new
//! size to the driver after a grow. The volume's size changes only through the gate (publish), which
//! has no public change signal, so the monitor checks it once per [`MONITOR_INTERVAL`].

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use blockio::proto;
use blockio::server::{ExportTable, NbdServer, ServerConfig};
use blockio::BlockDevice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{info, warn, Instrument};

use super::driver::{self, ConnectParams};
use super::{device_path, KernelError, KernelSettings, CONNECTIONS_MAX};

/// How often the monitor compares the volume's size with the kernel's.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// The export name the kernel-side sockets ask for.
const EXPORT: &str = "kernel";

/// What the kernel's sockets serve: the volume, but with a size that does not limit the NBD server.
///
/// Why: blockio's server fixes an export's size per connection at the handshake, and the driver
/// keeps its sockets across a grow (it takes the new size from `NBD_CMD_RECONFIGURE`, not from a
/// handshake), so requests beyond the old end would be refused with EINVAL. The volume itself
/// checks every range against its current layout (Overflow beyond the end), so the server's check
/// is redundant here; the kernel is told the real size through netlink.
struct KernelView(Arc<dyn BlockDevice>);

/// The size the NBD server sees on kernel sockets (see [`KernelView`]).
const VIEW_SIZE_BYTES: u64 = 1 << 60;

#[async_trait::async_trait]
impl BlockDevice for KernelView {
    fn size(&self) -> u64 {
        VIEW_SIZE_BYTES
    }
    fn block_sizes(&self) -> blockio::BlockSizes {
        self.0.block_sizes()
    }
    fn is_read_only(&self) -> bool {
        self.0.is_read_only()
    }
    fn can_multi_conn(&self) -> bool {
        self.0.can_multi_conn()
    }
    fn can_trim(&self) -> bool {
        self.0.can_trim()
    }
    fn can_fast_zero(&self) -> bool {
        self.0.can_fast_zero()
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.0.meta_contexts()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<bytes::Bytes, blockio::IoError> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> Result<(), blockio::IoError> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), blockio::IoError> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), blockio::IoError> {
        self.0.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: blockio::ZeroFlags) -> Result<(), blockio::IoError> {
        self.0.write_zeroes(offset, len, flags).await
    }
    async fn block_status(
        &self,
        context: &blockio::MetaContext,
        offset: u64,
        len: u32,
    ) -> Result<Vec<blockio::StatusExtent>, blockio::IoError> {
        self.0.block_status(context, offset, len).await
    }
    async fn cache(&self, offset: u64, len: u32) -> Result<(), blockio::IoError> {
        self.0.cache(offset, len).await
    }
}

/// A socket ready for the driver: past the handshake, blocking, plus what the handshake said.
struct KernelSocket {
    stream: std::os::unix::net::UnixStream,
    /// Always [`VIEW_SIZE_BYTES`]; the kernel gets the volume's real size.
    #[cfg_attr(not(test), allow(dead_code))]
    size_bytes: u64,
    flags: u16,
}

/// Serves `device` on one end of a socketpair (reporting on `ended` when that connection closes)
/// and does the client handshake on the other end.
async fn kernel_socket(
    volume: &str,
    device: Arc<dyn BlockDevice>,
    ended: mpsc::UnboundedSender<()>,
) -> Result<KernelSocket, KernelError> {
    let io = |e: std::io::Error| KernelError::Socket(e.to_string());
    let (ours, theirs) = tokio::net::UnixStream::pair().map_err(io)?;
    let view: Arc<dyn BlockDevice> = Arc::new(KernelView(device));
    let server = NbdServer::new(Arc::new(ExportTable::single(EXPORT, view)), ServerConfig::default());
    let span = tracing::info_span!("kernel-socket", volume);
    tokio::spawn(
        async move {
            if let Err(e) = server.serve_connection(ours).await {
                warn!(error = %e, "kernel NBD connection ended with an error");
            }
            let _ = ended.send(());
        }
        .instrument(span),
    );
    let mut theirs = theirs;
    let (size_bytes, flags) =
        tokio::time::timeout(Duration::from_secs(10), handshake(&mut theirs)).await.map_err(|_| {
            KernelError::Socket("the NBD handshake with the agent's own server did not finish in 10 s".into())
        })??;
    let stream = theirs.into_std().map_err(io)?;
    stream.set_nonblocking(false).map_err(io)?;
    Ok(KernelSocket { stream, size_bytes, flags })
}

/// Fixed-newstyle client handshake with `NBD_OPT_EXPORT_NAME`; returns (size, transmission flags).
async fn handshake(s: &mut tokio::net::UnixStream) -> Result<(u64, u16), KernelError> {
    let bad = |what: &str| KernelError::Socket(format!("NBD handshake: {what}"));
    let io = |e: std::io::Error| KernelError::Socket(format!("NBD handshake: {e}"));
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.map_err(io)?;
    if u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes")) != proto::NBDMAGIC
        || u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes")) != proto::IHAVEOPT
    {
        return Err(bad("not a newstyle NBD server"));
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    let mut msg = client_flags.to_be_bytes().to_vec();
    msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    msg.extend_from_slice(&(EXPORT.len() as u32).to_be_bytes());
    msg.extend_from_slice(EXPORT.as_bytes());
    s.write_all(&msg).await.map_err(io)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.map_err(io)?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).await.map_err(io)?;
    }
    let size = u64::from_be_bytes(reply[0..8].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    Ok((size, flags))
}

/// How many sockets to give the driver: more than one only if the export allows multi-conn.
fn connections(settings: &KernelSettings, flags: u16) -> usize {
    if flags & proto::TFLAG_CAN_MULTI_CONN != 0 {
        settings.connections.clamp(1, CONNECTIONS_MAX)
    } else {
        1
    }
}

/// Makes `n` sockets; returns them with the first one's handshake result.
async fn sockets(
    volume: &str,
    device: &Arc<dyn BlockDevice>,
    n: usize,
    ended: &mpsc::UnboundedSender<()>,
) -> Result<Vec<KernelSocket>, KernelError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(kernel_socket(volume, device.clone(), ended.clone()).await?);
    }
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KernelError> + Send + 'static,
) -> Result<T, KernelError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KernelError::Socket(format!("the netlink worker thread failed: {e}")))?
}

/// A volume attached as `/dev/nbd<index>`. Dropping it stops the monitor but leaves the device
/// connected (that is what an agent that dies does too); [`KernelAttachment::detach`] disconnects.
pub struct KernelAttachment {
    index: u32,
    backend: String,
    monitor: tokio::task::JoinHandle<()>,
}

impl Drop for KernelAttachment {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

impl KernelAttachment {
    /// Connects `device` to a free device (or `index`) with `backend` as its identifier.
    pub async fn connect(
        volume: &str,
        device: Arc<dyn BlockDevice>,
        index: Option<u32>,
        backend: String,
        settings: KernelSettings,
    ) -> Result<KernelAttachment, KernelError> {
        if !blocking(|| Ok(driver::loaded())).await? {
            return Err(KernelError::NotLoaded);
        }
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let first = kernel_socket(volume, device.clone(), ended_tx.clone()).await?;
        let n = connections(&settings, first.flags);
        let mut socks = vec![first];
        socks.extend(sockets(volume, &device, n - 1, &ended_tx).await?);
        let (size_bytes, flags) = (device.size(), socks[0].flags);
        let id = backend.clone();
        let index = blocking(move || {
            let fds: Vec<_> = socks.iter().map(|s| s.stream.as_raw_fd()).collect();
            // The driver holds its own references to the sockets; ours close when `socks` drops.
            driver::connect(&ConnectParams {
                index,
                size_bytes,
                server_flags: flags as u64,
                backend: &id,
                settings,
                fds: &fds,
            })
        })
        .await?;
        info!(volume, device = device_path(index), backend, size_bytes, sockets = n, "attached to the kernel");
        let monitor = spawn_monitor(volume.to_string(), device, index, backend.clone(), ended_tx, ended);
        Ok(KernelAttachment { index, backend, monitor })
    }

    /// Gives an existing device (left by a previous agent) fresh sockets serving `device`. The
    /// caller has checked the backend identifier; the driver checks it again.
    pub async fn reconnect(
        volume: &str,
        device: Arc<dyn BlockDevice>,
        index: u32,
        backend: String,
        settings: KernelSettings,
    ) -> Result<KernelAttachment, KernelError> {
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let first = kernel_socket(volume, device.clone(), ended_tx.clone()).await?;
        let n = connections(&settings, first.flags);
        let mut socks = vec![first];
        socks.extend(sockets(volume, &device, n - 1, &ended_tx).await?);
        let size = device.size();
        let id = backend.clone();
        blocking(move || {
            let fds: Vec<_> = socks.iter().map(|s| s.stream.as_raw_fd()).collect();
            let grown = driver::size_bytes(index).is_some_and(|s| s != size).then_some(size);
            driver::reconfigure(index, &id, grown, Some(settings), &fds)
        })
        .await?;
        info!(volume, device = device_path(index), backend, "reattached to the kernel device");
        let monitor = spawn_monitor(volume.to_string(), device, index, backend.clone(), ended_tx, ended);
        Ok(KernelAttachment { index, backend, monitor })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn device_path(&self) -> String {
        device_path(self.index)
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Flushes the device, then disconnects it. On a failed flush the device stays connected (and
    /// supplied).
    pub async fn detach(&mut self) -> Result<(), KernelError> {
        let index = self.index;
        blocking(move || driver::flush(index)).await?;
        // The disconnect closes our sockets: the monitor must not replace them.
        self.monitor.abort();
        blocking(move || driver::disconnect(index)).await?;
        info!(device = device_path(index), "kernel device disconnected");
        Ok(())
    }
}

fn spawn_monitor(
    volume: String,
    device: Arc<dyn BlockDevice>,
    index: u32,
    backend: String,
    ended_tx: mpsc::UnboundedSender<()>,
    mut ended: mpsc::UnboundedReceiver<()>,
) -> tokio::task::JoinHandle<()> {
    let span = tracing::info_span!("kernel-monitor", volume, device = device_path(index));
    tokio::spawn(
        async move {
            let mut kernel_size = device.size();
            let mut tick = tokio::time::interval(MONITOR_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    Some(()) = ended.recv() => {
                        // The driver dropped one of our sockets (or is disconnecting): replace it
                        // while the device is still connected.
                        let connected = blocking(driver::status)
                            .await
                            .map(|all| all.iter().any(|d| d.index == index && d.connected))
                            .unwrap_or(false);
                        if !connected {
                            info!("the kernel device is no longer connected; monitor stops");
                            return;
                        }
                        match kernel_socket(&volume, device.clone(), ended_tx.clone()).await {
                            Ok(sock) => {
                                let id = backend.clone();
                                let r = blocking(move || driver::reconfigure(index, &id, None, None, &[sock.stream.as_raw_fd()])).await;
                                match r {
                                    Ok(()) => info!("gave the kernel device a new socket"),
                                    Err(e) => warn!(error = %e, "replacing a dropped kernel socket failed"),
                                }
                            }
                            Err(e) => warn!(error = %e, "making a new kernel socket failed"),
                        }
                    }
                    _ = tick.tick() => {
                        let size = device.size();
                        if size != kernel_size {
                            let id = backend.clone();
                            match blocking(move || driver::reconfigure(index, &id, Some(size), None, &[])).await {
                                Ok(()) => {
                                    info!(size_bytes = size, "told the kernel the volume's new size");
                                    kernel_size = size;
                                }
                                Err(e) => {
                                    warn!(error = %e, "the kernel refused the new size; detach and attach again to see it");
                                    kernel_size = size;
                                }
                            }
                        }
                    }
                }
            }
        }
        .instrument(span),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, EXTENT};

    #[tokio::test]
    async fn the_kernel_side_socket_is_past_the_handshake_and_speaks_transmission() {
        let (vol, _devs) = testing::volume(1, 1, 1, false);
        let (tx, mut ended) = mpsc::unbounded_channel();
        let sock = kernel_socket("v", vol, tx).await.unwrap();
        assert_eq!(sock.size_bytes, VIEW_SIZE_BYTES, "the server does not limit the kernel's sockets");
        assert_ne!(sock.flags & proto::TFLAG_SEND_FLUSH, 0);
        assert_eq!(sock.flags & proto::TFLAG_READ_ONLY, 0);
        // A simple-reply read request, as the kernel sends it.
        let mut s = sock.stream;
        let mut req = Vec::new();
        req.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&proto::CMD_READ.to_be_bytes());
        req.extend_from_slice(&7u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&512u32.to_be_bytes());
        let reply = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            s.write_all(&req).unwrap();
            let mut reply = vec![0u8; 16 + 512];
            s.read_exact(&mut reply).unwrap();
            reply
        })
        .await
        .unwrap();
        assert_eq!(u32::from_be_bytes(reply[0..4].try_into().unwrap()), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0, "no error");
        assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 7, "cookie");
        // Closing the socket (what the driver does on disconnect) is reported.
        assert_eq!(ended.recv().await, Some(()));
    }

    #[tokio::test]
    async fn the_volume_still_refuses_io_beyond_its_end_on_kernel_sockets() {
        let (vol, _devs) = testing::volume(1, 1, 1, false);
        let view = KernelView(vol);
        assert_eq!(view.size(), VIEW_SIZE_BYTES);
        assert!(view.read(EXTENT, 512).await.is_err(), "beyond the volume's end");
        assert!(view.write(EXTENT - 512, bytes::Bytes::from(vec![1u8; 1024]), false).await.is_err());
        assert_eq!(view.read(EXTENT - 512, 512).await.unwrap().len(), 512);
    }

    #[tokio::test]
    async fn read_only_volumes_tell_the_kernel_so() {
        let (vol, _devs) = testing::volume(1, 1, 1, true);
        let (tx, _ended) = mpsc::unbounded_channel();
        let sock = kernel_socket("ro", vol, tx).await.unwrap();
        assert_ne!(sock.flags & proto::TFLAG_READ_ONLY, 0);
        let four = KernelSettings { connections: 4, ..Default::default() };
        assert_eq!(connections(&four, 0), 1, "one socket unless the export allows multi-conn");
        assert_eq!(connections(&four, proto::TFLAG_CAN_MULTI_CONN), 4);
    }

    #[tokio::test]
    async fn connect_on_a_host_without_the_driver_says_so() {
        if driver::loaded() {
            return;
        }
        let (vol, _devs) = testing::volume(1, 1, 1, false);
        let e = KernelAttachment::connect("v", vol, None, "sanvol:x".into(), KernelSettings::default()).await;
        assert!(matches!(e, Err(KernelError::NotLoaded)));
    }
}
