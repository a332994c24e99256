//! The error every block device returns.
//!
//! Why errno-shaped: whatever a device does, its error must eventually be
//! told to an NBD peer, which understands only the spec's errno values. Each
//! error carries a kind (mapped 1:1 to an NBD error code) and a message that
//! says what failed, so logs stay useful even though the wire drops the text.

use std::fmt;

/// Error classes, one per NBD error code (`NBD_EPERM` ... `NBD_ESHUTDOWN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoErrorKind {
    /// Operation not permitted (e.g. a write to a read-only export).
    PermissionDenied,
    /// Input/output error: the backing store failed.
    Io,
    /// Out of memory.
    OutOfMemory,
    /// Invalid argument (misaligned, malformed, unsupported flag combination).
    InvalidArgument,
    /// No space left on the device.
    NoSpace,
    /// Offset or length beyond the end of the device.
    Overflow,
    /// Operation not supported (e.g. fast zero that cannot be fast).
    NotSupported,
    /// The server or connection is shutting down; retry elsewhere.
    Shutdown,
    /// Not sent: the request's send deadline had passed (the caller's lease
    /// ran out, [`crate::client::with_send_deadline`]). Nothing reached the
    /// server; send it again once the lease is renewed. Never on the wire
    /// (told to an NBD peer as `EIO`).
    Fenced,
}

impl IoErrorKind {
    /// The NBD error code for this kind (values from the NBD spec).
    pub fn nbd_code(self) -> u32 {
        use crate::proto::errno::*;
        match self {
            IoErrorKind::PermissionDenied => EPERM,
            IoErrorKind::Io => EIO,
            IoErrorKind::OutOfMemory => ENOMEM,
            IoErrorKind::InvalidArgument => EINVAL,
            IoErrorKind::NoSpace => ENOSPC,
            IoErrorKind::Overflow => EOVERFLOW,
            IoErrorKind::NotSupported => ENOTSUP,
            IoErrorKind::Shutdown => ESHUTDOWN,
            IoErrorKind::Fenced => EIO,
        }
    }

    /// The kind for an NBD error code; unknown codes are treated as `EINVAL`
    /// as the spec tells clients to.
    pub fn from_nbd_code(code: u32) -> IoErrorKind {
        use crate::proto::errno::*;
        match code {
            EPERM => IoErrorKind::PermissionDenied,
            EIO => IoErrorKind::Io,
            ENOMEM => IoErrorKind::OutOfMemory,
            EINVAL => IoErrorKind::InvalidArgument,
            ENOSPC => IoErrorKind::NoSpace,
            EOVERFLOW => IoErrorKind::Overflow,
            ENOTSUP => IoErrorKind::NotSupported,
            ESHUTDOWN => IoErrorKind::Shutdown,
            _ => IoErrorKind::InvalidArgument,
        }
    }
}

/// A failed block operation: its class and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    pub kind: IoErrorKind,
    pub message: String,
}

impl IoError {
    pub fn new(kind: IoErrorKind, message: impl Into<String>) -> IoError {
        IoError { kind, message: message.into() }
    }
    pub fn io(message: impl Into<String>) -> IoError {
        IoError::new(IoErrorKind::Io, message)
    }
    pub fn invalid(message: impl Into<String>) -> IoError {
        IoError::new(IoErrorKind::InvalidArgument, message)
    }
    pub fn not_supported(message: impl Into<String>) -> IoError {
        IoError::new(IoErrorKind::NotSupported, message)
    }
    pub fn read_only() -> IoError {
        IoError::new(IoErrorKind::PermissionDenied, "the device is read-only")
    }
    pub fn shutdown(message: impl Into<String>) -> IoError {
        IoError::new(IoErrorKind::Shutdown, message)
    }
    /// `offset + len` does not fit in a device of `size` bytes.
    pub fn out_of_range(offset: u64, len: u64, size: u64) -> IoError {
        IoError::new(
            IoErrorKind::Overflow,
            format!("request at offset {offset} length {len} is beyond the end of the {size}-byte device"),
        )
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.kind)
    }
}

impl std::error::Error for IoError {}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> IoError {
        let kind = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => IoErrorKind::PermissionDenied,
            Some(libc::ENOMEM) => IoErrorKind::OutOfMemory,
            Some(libc::EINVAL) => IoErrorKind::InvalidArgument,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => IoErrorKind::NoSpace,
            Some(libc::EOVERFLOW) | Some(libc::EFBIG) => IoErrorKind::Overflow,
            Some(libc::EOPNOTSUPP) => IoErrorKind::NotSupported,
            _ => IoErrorKind::Io,
        };
        IoError::new(kind, e.to_string())
    }
}

/// Checks that `[offset, offset+len)` lies within a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), IoError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::out_of_range(offset, len, size)),
    }
}
