//! The [`BlockDevice`] trait: what every data path in sanvol is written
//! against.
//!
//! A device is anything that stores blocks: an in-memory store, a file, a
//! remote NBD export (the [`crate::client`]), or a composition such as the
//! agent's volume (an extent map over several remote devices) or the server's
//! snapshot pseudo-device. The NBD server serves any of them.
//!
//! Why `async_trait` (one boxed future per call) instead of native async
//! trait methods: volumes compose heterogeneous devices behind
//! `Arc<dyn BlockDevice>`, which needs dyn-compatible methods, and one small
//! allocation per I/O is noise next to the syscalls an I/O costs.
//!
//! Buffers are [`bytes::Bytes`] so data moves between sockets, caches and
//! devices without copies.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::IoError;
use crate::splice::Payload;

/// Block-size constraints, as advertised by `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit; requests must be aligned to it. Power of 2, 1..=65536.
    pub minimum: u32,
    /// Size below which I/O is inefficient (read-modify-write). Power of 2, >= minimum.
    pub preferred: u32,
    /// Largest payload a single request may carry. Multiple of minimum.
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> BlockSizes {
        BlockSizes { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 }
    }
}

/// Flags for [`BlockDevice::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Force unit access: durable before the call returns.
    pub fua: bool,
    /// The device may deallocate (punch a hole) instead of writing zeroes
    /// (the inverse of NBD's `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// Fail with `NotSupported` rather than doing a slow zero
    /// (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast_only: bool,
}

/// A metadata context for block status queries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: flags are [`crate::proto::STATE_HOLE`] and
    /// [`crate::proto::STATE_ZERO`].
    BaseAllocation,
    /// A device-specific context, by its full name (`namespace:leaf`), e.g.
    /// the backup pseudo-device's changed-block list.
    Custom(String),
}

impl MetaContext {
    pub const BASE_ALLOCATION: &'static str = "base:allocation";

    pub fn name(&self) -> &str {
        match self {
            MetaContext::BaseAllocation => MetaContext::BASE_ALLOCATION,
            MetaContext::Custom(name) => name,
        }
    }

    pub fn from_name(name: &str) -> MetaContext {
        if name == MetaContext::BASE_ALLOCATION {
            MetaContext::BaseAllocation
        } else {
            MetaContext::Custom(name.to_string())
        }
    }
}

/// One run of a block status reply: `length` bytes sharing `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u64,
    pub flags: u32,
}

/// Something that stores blocks. All offsets and lengths are in bytes.
///
/// Implementations check ranges themselves (`offset + len <= size`) and
/// return [`crate::IoErrorKind::Overflow`] otherwise: a device is handed
/// requests from the network and must never trust them.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// Block-size constraints.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Whether several connections to the same device see a consistent view
    /// (a flush on one covers writes completed on all) — `NBD_FLAG_CAN_MULTI_CONN`.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Whether `trim` does anything (if false it is accepted and ignored).
    fn can_trim(&self) -> bool {
        true
    }

    /// Whether `write_zeroes` with `fast_only` can ever succeed.
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// A signal that this device, as served to one connection, was taken
    /// away (a fencing target fenced the connection's holder): when it
    /// turns true the server stops reading the connection's requests, lets
    /// the ones being handled finish, and closes the connection without
    /// waiting to deliver their replies. Default: never.
    fn revoked(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }

    /// Names of the metadata contexts this device answers besides
    /// `base:allocation`.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError>;

    /// Reads `len` bytes at `offset` for a caller that only passes them on
    /// (the NBD server's reply): a device that forwards to a socket may
    /// return them still in pipes ([`crate::splice`]), never copied into
    /// memory. Default: [`Self::read`].
    async fn read_payload(&self, offset: u64, len: u32) -> Result<Payload, IoError> {
        self.read(offset, len).await.map(Payload::Bytes)
    }

    /// Writes `data` at `offset`; with `fua` it is durable on return.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError>;

    /// Whether a write of `len` bytes at `offset` would be passed on to a
    /// socket as it is: the NBD server then takes its payload from the
    /// client's socket into pipes ([`crate::splice`]) and hands it to
    /// [`Self::write_payload`], so the bytes never enter memory. Asked per
    /// request, so it must be cheap; a wrong `true` costs a copy out of the
    /// pipes, never correctness. Default: no.
    fn wants_write_pipe(&self, _offset: u64, _len: u32) -> bool {
        false
    }

    /// Writes a payload that may be in pipes. Default: read it out of the
    /// pipes and [`Self::write`] it.
    async fn write_payload(&self, offset: u64, data: Payload, fua: bool) -> Result<(), IoError> {
        let data = match data {
            Payload::Bytes(data) => data,
            Payload::Pipe(chain) => chain.into_write_data()?,
        };
        self.write(offset, data, fua).await
    }

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), IoError>;

    /// Changes whenever a connection this device writes through was
    /// replaced (0: never, or no connections). A flush vouches only for the
    /// writes completed while it stayed the same: a server that restarted
    /// may have lost what its old connection completed, and a flush on the
    /// new one says nothing about that. Wrappers pass their device's on.
    fn connection_epoch(&self) -> u64 {
        0
    }

    /// Hints that `[offset, offset+len)` is no longer needed. Reads of a
    /// trimmed range return unspecified data (zeroes for our backends).
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError>;

    /// Writes zeroes to `[offset, offset+len)`.
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError>;

    /// Describes `[offset, offset+len)` under `context`. The reply covers at
    /// least one byte starting at `offset` and never goes past `offset+len`;
    /// it may be shorter than `len`. The default says "all data" for
    /// `base:allocation` and refuses custom contexts.
    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        crate::error::check_range(offset, len as u64, self.size())?;
        match context {
            MetaContext::BaseAllocation => Ok(vec![StatusExtent { length: len as u64, flags: 0 }]),
            MetaContext::Custom(name) => {
                Err(IoError::not_supported(format!("metadata context {name} is not offered by this device")))
            }
        }
    }

    /// Hints that `[offset, offset+len)` will be read soon. Default: no-op.
    async fn cache(&self, offset: u64, len: u32) -> Result<(), IoError> {
        crate::error::check_range(offset, len as u64, self.size())
    }
}
