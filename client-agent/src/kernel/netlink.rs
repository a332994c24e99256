//! A minimal generic-netlink client for the kernel NBD driver's `nbd` family.
//!
//! Why hand-written rather than `nbd-netlink`: that crate only connects; the agent also needs
//! disconnect, reconfigure (new sockets for the same index after a restart), status, the
//! dead-connection timeout and the backend identifier, and it pulls in `neli` for what is, on the
//! wire, a dozen fixed-layout headers. Everything here is synchronous and short: callers run it on a
//! blocking thread, because the kernel may do I/O on the agent's own sockets during a command (a
//! disconnect sends `NBD_CMD_DISC`) and the agent must keep serving them meanwhile.
//!
//! Replies are parsed defensively: every length is checked against the buffer, nothing panics on
//! what the kernel (or anything else on the socket) sends.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_GENERIC: i32 = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `include/uapi/linux/nbd-netlink.h`.
pub mod nbd {
    pub const FAMILY: &str = "nbd";
    pub const VERSION: u8 = 1;
    pub const CMD_CONNECT: u8 = 1;
    pub const CMD_DISCONNECT: u8 = 2;
    pub const CMD_RECONFIGURE: u8 = 3;
    pub const CMD_STATUS: u8 = 5;
    pub const ATTR_INDEX: u16 = 1;
    pub const ATTR_SIZE_BYTES: u16 = 2;
    pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    pub const ATTR_TIMEOUT: u16 = 4;
    pub const ATTR_SERVER_FLAGS: u16 = 5;
    pub const ATTR_CLIENT_FLAGS: u16 = 6;
    pub const ATTR_SOCKETS: u16 = 7;
    pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
    pub const ATTR_DEVICE_LIST: u16 = 9;
    pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;
    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
    pub const DEVICE_ITEM: u16 = 1;
    pub const DEVICE_INDEX: u16 = 1;
    pub const DEVICE_CONNECTED: u16 = 2;
}

/// Largest reply we read; a status listing of 256 devices is ~4 KiB.
const REPLY_BYTES_MAX: usize = 64 * 1024;

/// One netlink attribute being built.
pub enum Attr {
    U32(u16, u32),
    U64(u16, u64),
    Str(u16, String),
    Nested(u16, Vec<Attr>),
}

impl Attr {
    #[cfg(test)]
    pub(crate) fn encode_for_test(&self, out: &mut Vec<u8>) {
        self.encode(out)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let kind = match self {
            Attr::U32(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Attr::U64(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Attr::Str(t, s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
                *t
            }
            Attr::Nested(t, inner) => {
                for a in inner {
                    a.encode(out);
                }
                *t | NLA_F_NESTED
            }
        };
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
}

/// Attributes of a received message: (type without flags, payload).
pub fn parse_attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut attrs = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        attrs.push((kind, &buf[4..len]));
        let advance = (len + 3) & !3;
        buf = buf.get(advance..).unwrap_or(&[]);
    }
    attrs
}

pub fn attr_u32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

fn attr_u16(payload: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(payload.get(..2)?.try_into().ok()?))
}

/// A generic-netlink socket bound to one family.
pub struct GenlSocket {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl GenlSocket {
    /// Opens a socket and resolves `family`. `Ok(None)` when the kernel has no such family (for
    /// `nbd`: the driver is not loaded).
    pub fn open(family: &str) -> io::Result<Option<GenlSocket>> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh, valid fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A bounded wait: the kernel answers at once; this only guards against a wedged driver.
        let tv = libc::timeval { tv_sec: 60, tv_usec: 0 };
        // SAFETY: setsockopt with a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let mut sock = GenlSocket { fd, family: GENL_ID_CTRL, seq: 1 };
        let reply = match sock.request(CTRL_CMD_GETFAMILY, 1, &[Attr::Str(CTRL_ATTR_FAMILY_NAME, family.to_string())]) {
            Ok(reply) => reply,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let id = reply
            .and_then(|payload| {
                parse_attrs(&payload).iter().find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID).and_then(|(_, p)| attr_u16(p))
            })
            .ok_or_else(|| io::Error::other(format!("the kernel's reply for genl family {family} has no id")))?;
        sock.family = id;
        Ok(Some(sock))
    }

    /// Sends a command to the family and waits for its acknowledgement. Returns the attribute payload
    /// of the reply message if the kernel sent one (after the generic header), `None` for a bare ack.
    /// A kernel error comes back as `io::Error` with its errno.
    pub fn request(&mut self, cmd: u8, version: u8, attrs: &[Attr]) -> io::Result<Option<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = vec![0u8; 16];
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        for a in attrs {
            a.encode(&mut msg);
        }
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        msg[4..6].copy_from_slice(&self.family.to_ne_bytes());
        msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg[8..12].copy_from_slice(&seq.to_ne_bytes());
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and addr are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = None;
        let mut buf = vec![0u8; REPLY_BYTES_MAX];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let mlen = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let mtype = u16::from_ne_bytes([rest[4], rest[5]]);
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if mlen < 16 || mlen > rest.len() {
                    return Err(io::Error::other("malformed netlink message from the kernel"));
                }
                let body = &rest[16..mlen];
                rest = rest.get((mlen + 3) & !3..).unwrap_or(&[]);
                if mseq != seq {
                    continue;
                }
                match mtype {
                    NLMSG_ERROR => {
                        let errno = body.get(..4).map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                        return match errno {
                            Some(0) => Ok(reply),
                            Some(e) => Err(io::Error::from_raw_os_error(-e)),
                            None => Err(io::Error::other("truncated netlink error message")),
                        };
                    }
                    NLMSG_DONE => return Ok(reply),
                    _ => reply = Some(body.get(4..).unwrap_or(&[]).to_vec()),
                }
            }
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut buf = Vec::new();
        Attr::Str(10, "sanvol:x".into()).encode(&mut buf);
        Attr::Nested(7, vec![Attr::Nested(1, vec![Attr::U32(1, 42)])]).encode(&mut buf);
        Attr::U64(2, 1 << 33).encode(&mut buf);
        assert_eq!(buf.len() % 4, 0);
        let attrs = parse_attrs(&buf);
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0], (10, &b"sanvol:x\0"[..]));
        let item = parse_attrs(attrs[1].1);
        assert_eq!(item[0].0, 1);
        assert_eq!(attr_u32(parse_attrs(item[0].1)[0].1), Some(42));
        assert_eq!(attrs[2].1, &(1u64 << 33).to_ne_bytes()[..]);
    }

    #[test]
    fn truncated_attributes_are_ignored_not_panicked_on() {
        assert!(parse_attrs(&[200, 0, 1, 0, 1, 2]).is_empty());
        assert!(parse_attrs(&[2, 0]).is_empty());
        assert_eq!(attr_u32(&[1, 2]), None);
    }
}
