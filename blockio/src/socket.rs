//! Socket tuning shared by the client and the server.
//!
//! Why: a unix stream socket's default send buffer (`net.core.wmem_default`,
//! 208 KiB on common kernels) is smaller than a 1 MiB payload, so a
//! non-blocking writer sends one in five or six pieces, each a `writev`
//! that fills the buffer, an `EAGAIN`, and a trip through epoll until the
//! peer has drained it. Profiled through the agent at 1 MiB, those round
//! trips were a large part of the per-request CPU. A send buffer that holds
//! a few whole payloads lets one `writev` hand the kernel a whole reply.
//!
//! Only unix sockets are tuned: on TCP, setting `SO_SNDBUF` turns off the
//! kernel's buffer auto-tuning, which knows the path better than we do.
//!
//! Public for the other unix sockets that carry large replies: the
//! metadata server's accepted channels (the fallback path's and the backup
//! pseudo-device's replies) and `sanvol-backup serve`'s local side. A
//! send buffer is a cap on bytes queued, not memory set aside: an idle
//! control connection costs nothing more.

use std::os::fd::AsRawFd;

/// Send buffer asked for on unix sockets. The kernel doubles the value for
/// its bookkeeping and caps it at `net.core.wmem_max`.
pub const UNIX_SEND_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Best effort: a socket that refuses keeps the default buffer and works
/// the same, only with more system calls per large payload.
pub fn tune_unix(socket: &impl AsRawFd) {
    let value = UNIX_SEND_BUFFER_BYTES as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid
    // pointer to a live c_int, on a descriptor the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not enlarge a unix socket's send buffer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_buffer(socket: &impl AsRawFd) -> usize {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &mut value as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        value as usize
    }

    #[test]
    fn the_send_buffer_grows_as_far_as_the_kernel_allows() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let before = send_buffer(&a);
        tune_unix(&a);
        let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(before / 2);
        let expected = 2 * UNIX_SEND_BUFFER_BYTES.min(wmem_max);
        assert_eq!(send_buffer(&a), expected.max(before), "before: {before}, wmem_max: {wmem_max}");
    }
}

/// Why a unix socket path cannot be bound ([`clear_stale_unix_socket`]).
#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    #[error("another process is serving on it")]
    InUse,
    #[error("it exists and is not a socket")]
    NotASocket,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Makes `path` free to bind a listening unix socket on: nothing there is
/// fine; a socket nobody serves (left by a process that did not clean up)
/// is removed; a socket something still serves, or anything that is not
/// a socket, is refused and left as it is.
pub fn clear_stale_unix_socket(path: &std::path::Path) -> Result<(), SocketPathError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketPathError::InUse);
            }
            Ok(std::fs::remove_file(path)?)
        }
        Ok(_) => Err(SocketPathError::NotASocket),
    }
}
