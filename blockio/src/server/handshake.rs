//! Fixed-newstyle option haggling (`reference/nbd/proto.md`, "Handshake").
//!
//! Why hard disconnects are rare here: the spec wants option errors answered
//! with an error reply so the client can try something else. We disconnect
//! only where the spec leaves no other way (unknown client flags, a failed
//! `NBD_OPT_EXPORT_NAME`) or where continuing would let a client make us
//! allocate or loop without limit (huge option lengths, endless options,
//! a lost option magic).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::exports::{Export, ExportRefusal, ExportSource};
use super::ServerError;
use crate::device::MetaContext;
use crate::proto::{self, limits};

/// How the handshake (or its part before TLS) ended.
pub(super) enum Outcome {
    /// Enter transmission with this export.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the caller runs the TLS
    /// handshake, then [`options`] again inside it.
    StartTls,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy)]
pub(super) struct TlsState {
    /// The server can do TLS (has certificates).
    pub offered: bool,
    /// Every option but STARTTLS and ABORT is refused until TLS is active.
    pub required: bool,
    /// TLS is running on this connection.
    pub active: bool,
}

/// What the client and server agreed on.
pub(super) struct Negotiated {
    pub export: Export,
    pub structured: bool,
    /// Selected metadata contexts and the ids we gave them.
    pub contexts: Vec<(u32, MetaContext)>,
    pub flags: u16,
}

/// The transmission flags we advertise for `export`: only what we really do.
pub(super) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let device = &export.device;
    let mut flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_CACHE;
    if export.is_read_only() {
        flags |= proto::TFLAG_READ_ONLY;
    } else {
        flags |= proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_WRITE_ZEROES;
        if device.can_trim() {
            flags |= proto::TFLAG_SEND_TRIM;
        }
        if device.can_fast_zero() {
            flags |= proto::TFLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        flags |= proto::TFLAG_SEND_DF;
    }
    if device.can_multi_conn() {
        flags |= proto::TFLAG_CAN_MULTI_CONN;
    }
    flags
}

/// Largest payload we tell clients to send for `export`.
pub(super) fn payload_bytes_max(export: &Export) -> u32 {
    export.device.block_sizes().maximum.clamp(1, limits::PAYLOAD_BYTES_MAX)
}

/// A bounds-checked reader over an option's data.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, len: u32) -> Option<&'a str> {
        if len as usize > limits::STRING_BYTES_MAX {
            return None;
        }
        std::str::from_utf8(self.take(len as usize)?).ok()
    }
    fn remaining(&self) -> usize {
        self.0.len()
    }
}

/// Appends one option reply to `out`.
fn push_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[&[u8]]) {
    let len: usize = data.iter().map(|d| d.len()).sum();
    out.extend_from_slice(&proto::OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for d in data {
        out.extend_from_slice(d);
    }
}

fn push_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug!(option, reply_type = reply_type & !proto::REP_FLAG_ERROR, message, "refusing option");
    push_reply(out, option, reply_type, &[message.as_bytes()]);
}

fn push_refusal(out: &mut Vec<u8>, option: u32, name: &str, refusal: ExportRefusal) {
    match refusal {
        ExportRefusal::Unknown => push_error(out, option, proto::REP_ERR_UNKNOWN, &format!("no export named {name:?}")),
        ExportRefusal::Policy(message) => {
            push_error(out, option, proto::REP_ERR_POLICY, truncate(&message, limits::STRING_BYTES_MAX))
        }
    }
}

/// Negotiation state carried between options.
struct State<'a> {
    exports: &'a dyn ExportSource,
    structured: bool,
    /// The export named in the last `NBD_OPT_SET_META_CONTEXT`, and what it selected.
    meta: Option<(String, Vec<(u32, MetaContext)>)>,
}

/// Sends the greeting and reads the client's flags; returns whether the
/// client asked for no zeroes.
pub(super) async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<bool, ServerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await.map_err(ServerError::io("sending the greeting"))?;
    w.flush().await.map_err(ServerError::io("sending the greeting"))?;

    let client_flags = r.read_u32().await.map_err(ServerError::io("reading the client flags"))?;
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(ServerError::UnknownClientFlags { flags: client_flags });
    }
    Ok(client_flags & proto::FLAG_C_NO_ZEROES != 0)
}

/// The option haggling after the greeting (again inside TLS, after
/// [`Outcome::StartTls`]).
pub(super) async fn options<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &dyn ExportSource,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Outcome, ServerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut state = State { exports, structured: false, meta: None };
    let mut out = Vec::new();
    for _ in 0..limits::OPTIONS_MAX {
        let magic = r.read_u64().await.map_err(ServerError::io("reading an option header"))?;
        if magic != proto::IHAVEOPT {
            return Err(ServerError::BadOptionMagic { magic });
        }
        let option = r.read_u32().await.map_err(ServerError::io("reading an option header"))?;
        let length = r.read_u32().await.map_err(ServerError::io("reading an option header"))?;
        if length > limits::OPTION_DATA_BYTES_MAX {
            return Err(ServerError::OptionTooLong { option, length, max: limits::OPTION_DATA_BYTES_MAX });
        }
        // Bounded by the check above.
        let mut data = vec![0u8; length as usize];
        r.read_exact(&mut data).await.map_err(ServerError::io("reading option data"))?;

        out.clear();
        let tls_missing = tls.required && !tls.active;
        let done = match option {
            proto::OPT_EXPORT_NAME if tls_missing => return Err(ServerError::TlsRequired),
            proto::OPT_STARTTLS if tls.active => {
                push_error(&mut out, option, proto::REP_ERR_INVALID, "TLS is already active on this connection");
                None
            }
            proto::OPT_STARTTLS if tls.offered => {
                if !data.is_empty() {
                    push_error(&mut out, option, proto::REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                    None
                } else {
                    push_reply(&mut out, option, proto::REP_ACK, &[]);
                    Some(Outcome::StartTls)
                }
            }
            o if tls_missing && o != proto::OPT_ABORT && o != proto::OPT_STARTTLS => {
                push_error(
                    &mut out,
                    option,
                    proto::REP_ERR_TLS_REQD,
                    "this server requires TLS: negotiate NBD_OPT_STARTTLS first (an nbds:// URI)",
                );
                None
            }
            proto::OPT_EXPORT_NAME => {
                let name = match std::str::from_utf8(&data) {
                    Ok(n) if n.len() <= limits::STRING_BYTES_MAX => n,
                    _ => return Err(ServerError::BadExportName),
                };
                let export = match exports.open(name) {
                    Ok(export) => export,
                    Err(ExportRefusal::Unknown) => return Err(ServerError::UnknownExport { name: name.to_string() }),
                    Err(ExportRefusal::Policy(message)) => return Err(ServerError::ExportRefused { message }),
                };
                let negotiated = state.finish(name, export);
                out.extend_from_slice(&negotiated.export.device.size().to_be_bytes());
                out.extend_from_slice(&negotiated.flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Some(Outcome::Transmission(negotiated))
            }
            proto::OPT_ABORT => {
                push_reply(&mut out, option, proto::REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = w.write_all(&out).await;
                let _ = w.flush().await;
                return Ok(Outcome::Aborted);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    push_error(&mut out, option, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for (name, description) in exports.list() {
                        let len = (name.len() as u32).to_be_bytes();
                        push_reply(
                            &mut out,
                            option,
                            proto::REP_SERVER,
                            &[&len, name.as_bytes(), description.as_bytes()],
                        );
                    }
                    push_reply(&mut out, option, proto::REP_ACK, &[]);
                }
                None
            }
            proto::OPT_STARTTLS => {
                push_error(
                    &mut out,
                    option,
                    proto::REP_ERR_POLICY,
                    "this server does not offer TLS; connect without TLS",
                );
                None
            }
            proto::OPT_INFO | proto::OPT_GO => state.info_or_go(option, &data, &mut out),
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    push_error(&mut out, option, proto::REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if state.structured {
                    push_error(&mut out, option, proto::REP_ERR_INVALID, "structured replies are already negotiated");
                } else {
                    state.structured = true;
                    push_reply(&mut out, option, proto::REP_ACK, &[]);
                }
                None
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                state.meta_context(option, &data, &mut out);
                None
            }
            proto::OPT_EXTENDED_HEADERS => {
                push_error(&mut out, option, proto::REP_ERR_UNSUP, "extended headers are not supported");
                None
            }
            _ => {
                push_error(&mut out, option, proto::REP_ERR_UNSUP, &format!("option {option} is not supported"));
                None
            }
        };
        w.write_all(&out).await.map_err(ServerError::io("sending an option reply"))?;
        w.flush().await.map_err(ServerError::io("sending an option reply"))?;
        if let Some(outcome) = done {
            return Ok(outcome);
        }
    }
    Err(ServerError::TooManyOptions { max: limits::OPTIONS_MAX })
}

impl State<'_> {
    /// The agreement for entering transmission with `export`, asked for as `name`.
    fn finish(&mut self, name: &str, export: Export) -> Negotiated {
        // Contexts count only if they were selected for the same export name.
        let contexts = match self.meta.take() {
            Some((meta_name, contexts)) if meta_name == name && self.structured => contexts,
            _ => Vec::new(),
        };
        let flags = transmission_flags(&export, self.structured);
        Negotiated { export, structured: self.structured, contexts, flags }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Option<Outcome> {
        let mut c = Cursor(data);
        let parsed = (|| {
            let name_len = c.u32()?;
            let name = c.string(name_len)?;
            let count = c.u16()?;
            if c.remaining() != count as usize * 2 {
                return None;
            }
            let mut requests = Vec::with_capacity(4);
            for _ in 0..count {
                let info = c.u16()?;
                if !requests.contains(&info) && requests.len() < 16 {
                    requests.push(info);
                }
            }
            Some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            push_error(out, option, proto::REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data");
            return None;
        };
        let export = match self.exports.open(name) {
            Ok(export) => export,
            Err(refusal) => {
                push_refusal(out, option, name, refusal);
                return None;
            }
        };
        let flags = transmission_flags(&export, self.structured);
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.device.size().to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        push_reply(out, option, proto::REP_INFO, &[&info]);
        if requests.contains(&proto::INFO_NAME) {
            push_reply(out, option, proto::REP_INFO, &[&proto::INFO_NAME.to_be_bytes(), export.name.as_bytes()]);
        }
        if requests.contains(&proto::INFO_DESCRIPTION) && !export.description.is_empty() {
            let description = truncate(&export.description, limits::STRING_BYTES_MAX);
            push_reply(out, option, proto::REP_INFO, &[&proto::INFO_DESCRIPTION.to_be_bytes(), description.as_bytes()]);
        }
        // Sent unasked too (as qemu does): clients ignore what they did not request.
        let sizes = export.device.block_sizes();
        let mut bs = Vec::with_capacity(14);
        bs.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        bs.extend_from_slice(&sizes.minimum.max(1).to_be_bytes());
        bs.extend_from_slice(&sizes.preferred.max(512).max(sizes.minimum).to_be_bytes());
        bs.extend_from_slice(&payload_bytes_max(&export).to_be_bytes());
        push_reply(out, option, proto::REP_INFO, &[&bs]);
        push_reply(out, option, proto::REP_ACK, &[]);
        if option == proto::OPT_GO {
            Some(Outcome::Transmission(self.finish(name, export)))
        } else {
            None
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta = None;
        }
        if !self.structured {
            push_error(out, option, proto::REP_ERR_INVALID, "negotiate structured replies before metadata contexts");
            return;
        }
        let mut c = Cursor(data);
        let header = (|| {
            let name_len = c.u32()?;
            let name = c.string(name_len)?;
            let count = c.u32()?;
            Some((name, count))
        })();
        let Some((name, count)) = header else {
            push_error(out, option, proto::REP_ERR_INVALID, "malformed metadata context option data");
            return;
        };
        if count as usize > limits::META_CONTEXTS_MAX {
            let msg = format!("at most {} metadata context queries are accepted", limits::META_CONTEXTS_MAX);
            push_error(out, option, proto::REP_ERR_TOO_BIG, &msg);
            return;
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let query = c.u32().and_then(|len| c.string(len));
            match query {
                Some(q) if q.contains(':') => queries.push(q),
                Some(q) => {
                    let msg = format!("metadata context query {q:?} has no namespace (namespace:leaf)");
                    push_error(out, option, proto::REP_ERR_INVALID, &msg);
                    return;
                }
                None => {
                    push_error(out, option, proto::REP_ERR_INVALID, "malformed metadata context query");
                    return;
                }
            }
        }
        if c.remaining() != 0 {
            push_error(out, option, proto::REP_ERR_INVALID, "trailing bytes after metadata context queries");
            return;
        }
        let export = match self.exports.open(name) {
            Ok(export) => export,
            Err(refusal) => return push_refusal(out, option, name, refusal),
        };
        let mut available = vec![MetaContext::BASE_ALLOCATION.to_string()];
        for extra in export.device.meta_contexts() {
            if !available.contains(&extra) && extra.contains(':') && extra.len() <= limits::STRING_BYTES_MAX {
                available.push(extra);
            }
        }
        let mut chosen: Vec<&str> = Vec::new();
        for q in &queries {
            if q.ends_with(':') {
                // "namespace:" lists every context of the namespace; it
                // selects nothing (the spec says to ignore it in SET).
                if !set {
                    for a in available.iter().filter(|a| a.starts_with(q)) {
                        choose(&available, a, &mut chosen);
                    }
                }
            } else {
                choose(&available, q, &mut chosen);
            }
        }
        if queries.is_empty() && !set {
            for a in &available {
                choose(&available, a, &mut chosen);
            }
        }
        let mut selected = Vec::new();
        for (i, ctx) in chosen.iter().enumerate() {
            let id = if set { i as u32 + 1 } else { 0 };
            push_reply(out, option, proto::REP_META_CONTEXT, &[&id.to_be_bytes(), ctx.as_bytes()]);
            if set {
                selected.push((id, MetaContext::from_name(ctx)));
            }
        }
        push_reply(out, option, proto::REP_ACK, &[]);
        if set {
            self.meta = Some((name.to_string(), selected));
        }
    }
}

/// Adds the available context named `name` (if any) to `chosen`, once.
fn choose<'a>(available: &'a [String], name: &str, chosen: &mut Vec<&'a str>) {
    if let Some(a) = available.iter().find(|a| *a == name) {
        if !chosen.contains(&a.as_str()) {
            chosen.push(a.as_str());
        }
    }
}

/// The longest prefix of `s` within `bytes_max` bytes, on a char boundary.
pub(super) fn truncate(s: &str, bytes_max: usize) -> &str {
    if s.len() <= bytes_max {
        return s;
    }
    let mut end = bytes_max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
