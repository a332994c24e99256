//! The client side of NBD option haggling (fixed newstyle, with fallbacks).
//!
//! Why it is plain sequential code over one stream: the handshake is a
//! strict request/reply dialogue that runs once per connection, so clarity
//! beats speed here. Every length the server sends is checked against a
//! named limit before anything is allocated, and every refusal becomes a
//! [`ClientError`] that names the option, the export and the server's reply.
//!
//! Order: `STRUCTURED_REPLY` → `SET_META_CONTEXT` → `GO` (asking for block
//! sizes, name and description). Servers that answer `GO` with
//! `ERR_UNSUP`, and servers without fixed newstyle, get the old
//! `EXPORT_NAME` instead.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::ClientError;
use crate::device::BlockSizes;
use crate::proto::{self, limits};

/// What a finished handshake agreed on.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub transmission_flags: u16,
    /// `None` when the server sent no `NBD_INFO_BLOCK_SIZE` (defaults apply).
    pub block_sizes: Option<BlockSizes>,
    pub structured_replies: bool,
    /// Metadata contexts the server selected: (name, id). Ids are per
    /// connection.
    pub contexts: Vec<(String, u32)>,
}

/// Export names carrying credentials (a capability, hundreds of hex
/// digits) are cut in error messages: the start says which export it was.
fn shorten_export_name(export: &str) -> String {
    const SHOWN_CHARS: usize = 80;
    if export.chars().count() <= SHOWN_CHARS {
        return export.to_string();
    }
    format!("{}…", export.chars().take(SHOWN_CHARS).collect::<String>())
}

/// Most replies accepted for one option (a list of exports or contexts).
const OPTION_REPLIES_MAX: usize = 100_000;

fn option_name(opt: u32) -> &'static str {
    match opt {
        proto::OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        proto::OPT_ABORT => "NBD_OPT_ABORT",
        proto::OPT_LIST => "NBD_OPT_LIST",
        proto::OPT_GO => "NBD_OPT_GO",
        proto::OPT_INFO => "NBD_OPT_INFO",
        proto::OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        proto::OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        proto::OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        proto::OPT_STARTTLS => "NBD_OPT_STARTTLS",
        _ => "an option",
    }
}

pub(crate) fn reply_name(reply: u32) -> String {
    match reply {
        proto::REP_ACK => "ACK".into(),
        proto::REP_SERVER => "REP_SERVER".into(),
        proto::REP_INFO => "REP_INFO".into(),
        proto::REP_META_CONTEXT => "REP_META_CONTEXT".into(),
        proto::REP_ERR_UNSUP => "ERR_UNSUP".into(),
        proto::REP_ERR_POLICY => "ERR_POLICY".into(),
        proto::REP_ERR_INVALID => "ERR_INVALID".into(),
        proto::REP_ERR_PLATFORM => "ERR_PLATFORM".into(),
        proto::REP_ERR_TLS_REQD => "ERR_TLS_REQD".into(),
        proto::REP_ERR_UNKNOWN => "ERR_UNKNOWN".into(),
        proto::REP_ERR_SHUTDOWN => "ERR_SHUTDOWN".into(),
        proto::REP_ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD".into(),
        proto::REP_ERR_TOO_BIG => "ERR_TOO_BIG".into(),
        other if other & proto::REP_FLAG_ERROR != 0 => format!("error reply {:#x}", other),
        other => format!("reply type {other}"),
    }
}

/// One option dialogue over `stream`.
pub(crate) struct Handshake<'a, S> {
    stream: &'a mut S,
    target: &'a str,
    /// Server speaks fixed newstyle (options other than EXPORT_NAME allowed).
    pub fixed_newstyle: bool,
    no_zeroes: bool,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Handshake<'a, S> {
    fn protocol(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Protocol { target: self.target.to_string(), reason: reason.into() }
    }

    fn io(&self, doing: &'static str) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
        move |source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                self.protocol(format!("server closed the connection while {doing}"))
            } else {
                ClientError::Io { target: self.target.to_string(), doing, source }
            }
        }
    }

    /// Continues a dialogue on a new stream (the TLS session after
    /// `NBD_OPT_STARTTLS`) with what the greeting settled.
    pub fn resume(stream: &'a mut S, target: &'a str, fixed_newstyle: bool, no_zeroes: bool) -> Handshake<'a, S> {
        Handshake { stream, target, fixed_newstyle, no_zeroes }
    }

    /// What the greeting settled: (fixed newstyle, no zeroes).
    pub fn flags(&self) -> (bool, bool) {
        (self.fixed_newstyle, self.no_zeroes)
    }

    /// `NBD_OPT_STARTTLS`: on `Ok` the caller must start TLS on the stream
    /// at once (the server's next byte is its TLS handshake).
    pub async fn starttls(&mut self) -> Result<(), ClientError> {
        let tls = |reason: String| ClientError::Tls { target: self.target.to_string(), reason };
        if !self.fixed_newstyle {
            return Err(tls("the server does not speak fixed-newstyle NBD, so it cannot negotiate TLS".into()));
        }
        self.send_option(proto::OPT_STARTTLS, &[]).await?;
        let (reply, data) = self.read_reply(proto::OPT_STARTTLS).await?;
        match reply {
            proto::REP_ACK => Ok(()),
            r if r & proto::REP_FLAG_ERROR != 0 => Err(tls(format!(
                "the server refused TLS ({}: {}); the device URI says nbds://, so the connection cannot go on \
                 without it",
                reply_name(r),
                String::from_utf8_lossy(&data[..data.len().min(limits::STRING_BYTES_MAX)])
            ))),
            r => Err(self.protocol(format!("unexpected {} to NBD_OPT_STARTTLS", reply_name(r)))),
        }
    }

    /// Reads the server greeting and answers with our client flags.
    pub async fn start(stream: &'a mut S, target: &'a str) -> Result<Handshake<'a, S>, ClientError> {
        let mut hs = Handshake { stream, target, fixed_newstyle: false, no_zeroes: false };
        let mut greeting = [0u8; 16];
        hs.stream.read_exact(&mut greeting).await.map_err(hs.io("reading the greeting"))?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap());
        let magic2 = u64::from_be_bytes(greeting[8..16].try_into().unwrap());
        if magic != proto::NBDMAGIC {
            return Err(hs.protocol(format!("not an NBD server (greeting magic {magic:#018x})")));
        }
        if magic2 == proto::OLDSTYLE_MAGIC {
            return Err(hs.protocol("server speaks the oldstyle handshake, which this client does not support"));
        }
        if magic2 != proto::IHAVEOPT {
            return Err(hs.protocol(format!("unknown handshake magic {magic2:#018x}")));
        }
        let mut flags = [0u8; 2];
        hs.stream.read_exact(&mut flags).await.map_err(hs.io("reading handshake flags"))?;
        let flags = u16::from_be_bytes(flags);
        hs.fixed_newstyle = flags & proto::FLAG_FIXED_NEWSTYLE != 0;
        hs.no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
        let mut client_flags = 0u32;
        if hs.fixed_newstyle {
            client_flags |= proto::FLAG_C_FIXED_NEWSTYLE;
        }
        if hs.no_zeroes {
            client_flags |= proto::FLAG_C_NO_ZEROES;
        }
        hs.stream.write_all(&client_flags.to_be_bytes()).await.map_err(hs.io("sending client flags"))?;
        tracing::debug!(target: "blockio::client", server = hs.target, fixed_newstyle = hs.fixed_newstyle, no_zeroes = hs.no_zeroes, "NBD greeting");
        Ok(hs)
    }

    async fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut buf = Vec::with_capacity(16 + data.len());
        buf.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        buf.extend_from_slice(&opt.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.stream.write_all(&buf).await.map_err(self.io("sending an option"))?;
        self.stream.flush().await.map_err(self.io("sending an option"))
    }

    /// Reads one option reply to `opt`: (reply type, data).
    async fn read_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).await.map_err(self.io("reading an option reply"))?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let echoed = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        if magic != proto::OPTION_REPLY_MAGIC {
            return Err(self.protocol(format!("bad option reply magic {magic:#x} in reply to {}", option_name(opt))));
        }
        if echoed != opt {
            return Err(self.protocol(format!("reply names option {echoed} but we sent {}", option_name(opt))));
        }
        if len > limits::OPTION_DATA_BYTES_MAX {
            return Err(self.protocol(format!(
                "option reply of {len} bytes exceeds the {} byte limit",
                limits::OPTION_DATA_BYTES_MAX
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await.map_err(self.io("reading option reply data"))?;
        Ok((reply, data))
    }

    fn refused(&self, opt: u32, export: &str, reply: u32, data: &[u8]) -> ClientError {
        ClientError::Refused {
            target: self.target.to_string(),
            option: option_name(opt),
            export: shorten_export_name(export),
            reply: reply_name(reply),
            message: String::from_utf8_lossy(&data[..data.len().min(limits::STRING_BYTES_MAX)]).into_owned(),
        }
    }

    /// `NBD_OPT_STRUCTURED_REPLY`; `Ok(false)` if the server declines.
    pub async fn structured_replies(&mut self) -> Result<bool, ClientError> {
        self.send_option(proto::OPT_STRUCTURED_REPLY, &[]).await?;
        let (reply, _) = self.read_reply(proto::OPT_STRUCTURED_REPLY).await?;
        match reply {
            proto::REP_ACK => Ok(true),
            proto::REP_ERR_SHUTDOWN => Err(self.refused(proto::OPT_STRUCTURED_REPLY, "", reply, &[])),
            r if r & proto::REP_FLAG_ERROR != 0 => Ok(false),
            r => Err(self.protocol(format!("unexpected {} to NBD_OPT_STRUCTURED_REPLY", reply_name(r)))),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT`; returns what the server selected (empty
    /// if it refused).
    pub async fn set_meta_contexts(
        &mut self,
        export: &str,
        queries: &[String],
    ) -> Result<Vec<(String, u32)>, ClientError> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        self.send_option(proto::OPT_SET_META_CONTEXT, &data).await?;
        let mut contexts = Vec::new();
        for _ in 0..OPTION_REPLIES_MAX {
            let (reply, data) = self.read_reply(proto::OPT_SET_META_CONTEXT).await?;
            match reply {
                proto::REP_META_CONTEXT => {
                    if data.len() < 5 {
                        return Err(self.protocol("NBD_REP_META_CONTEXT shorter than 5 bytes"));
                    }
                    let id = u32::from_be_bytes(data[0..4].try_into().unwrap());
                    let name = String::from_utf8(data[4..].to_vec())
                        .map_err(|_| self.protocol("metadata context name is not UTF-8"))?;
                    if contexts.len() >= limits::META_CONTEXTS_MAX {
                        return Err(self.protocol("server selected too many metadata contexts"));
                    }
                    contexts.push((name, id));
                }
                proto::REP_ACK => return Ok(contexts),
                proto::REP_ERR_SHUTDOWN => return Err(self.refused(proto::OPT_SET_META_CONTEXT, export, reply, &data)),
                r if r & proto::REP_FLAG_ERROR != 0 => {
                    tracing::info!(target: "blockio::client", server = self.target, reply = %reply_name(r), "server refused NBD_OPT_SET_META_CONTEXT; block status unavailable");
                    return Ok(Vec::new());
                }
                r => return Err(self.protocol(format!("unexpected {} to NBD_OPT_SET_META_CONTEXT", reply_name(r)))),
            }
        }
        Err(self.protocol("too many replies to NBD_OPT_SET_META_CONTEXT"))
    }

    /// `NBD_OPT_GO`. `Ok(None)` means the server does not know GO (answer
    /// `ERR_UNSUP`): fall back to [`Self::export_name`].
    pub async fn go(&mut self, export: &str) -> Result<Option<Negotiated>, ClientError> {
        self.info_or_go(proto::OPT_GO, export).await
    }

    /// `NBD_OPT_INFO`: what `GO` would say, without entering transmission.
    /// `Ok(None)` if the server does not know the option.
    pub async fn info(&mut self, export: &str) -> Result<Option<Negotiated>, ClientError> {
        self.info_or_go(proto::OPT_INFO, export).await
    }

    async fn info_or_go(&mut self, option: u32, export: &str) -> Result<Option<Negotiated>, ClientError> {
        let name = option_name(option);
        let infos = [proto::INFO_BLOCK_SIZE, proto::INFO_NAME, proto::INFO_DESCRIPTION];
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            data.extend_from_slice(&i.to_be_bytes());
        }
        self.send_option(option, &data).await?;
        let mut n = Negotiated {
            name: export.to_string(),
            description: None,
            size: 0,
            transmission_flags: 0,
            block_sizes: None,
            structured_replies: false,
            contexts: Vec::new(),
        };
        let mut have_export = false;
        for _ in 0..OPTION_REPLIES_MAX {
            let (reply, data) = self.read_reply(option).await?;
            match reply {
                proto::REP_INFO => {
                    if data.len() < 2 {
                        return Err(self.protocol("NBD_REP_INFO shorter than 2 bytes"));
                    }
                    let kind = u16::from_be_bytes([data[0], data[1]]);
                    let body = &data[2..];
                    match kind {
                        proto::INFO_EXPORT => {
                            if body.len() != 10 {
                                return Err(self.protocol(format!("NBD_INFO_EXPORT of {} bytes, not 12", data.len())));
                            }
                            n.size = u64::from_be_bytes(body[0..8].try_into().unwrap());
                            n.transmission_flags = u16::from_be_bytes([body[8], body[9]]);
                            have_export = true;
                        }
                        proto::INFO_NAME if body.len() <= limits::STRING_BYTES_MAX => {
                            n.name = String::from_utf8_lossy(body).into_owned();
                        }
                        proto::INFO_DESCRIPTION if body.len() <= limits::STRING_BYTES_MAX => {
                            n.description = Some(String::from_utf8_lossy(body).into_owned());
                        }
                        proto::INFO_BLOCK_SIZE => {
                            if body.len() != 12 {
                                return Err(
                                    self.protocol(format!("NBD_INFO_BLOCK_SIZE of {} bytes, not 14", data.len()))
                                );
                            }
                            let b = BlockSizes {
                                minimum: u32::from_be_bytes(body[0..4].try_into().unwrap()),
                                preferred: u32::from_be_bytes(body[4..8].try_into().unwrap()),
                                maximum: u32::from_be_bytes(body[8..12].try_into().unwrap()),
                            };
                            n.block_sizes = Some(validate_block_sizes(b).map_err(|r| self.protocol(r))?);
                        }
                        _ => {} // The spec says to ignore what we do not understand.
                    }
                }
                proto::REP_ACK => {
                    if !have_export {
                        return Err(self.protocol(format!("server accepted {name} without sending NBD_INFO_EXPORT")));
                    }
                    return Ok(Some(n));
                }
                proto::REP_ERR_UNSUP => return Ok(None),
                r if r & proto::REP_FLAG_ERROR != 0 => return Err(self.refused(option, export, r, &data)),
                r => return Err(self.protocol(format!("unexpected {} to {name}", reply_name(r)))),
            }
        }
        Err(self.protocol(format!("too many replies to {name}")))
    }

    /// `NBD_OPT_EXPORT_NAME`: the old way in; the server has no way to say
    /// no except closing the connection.
    pub async fn export_name(&mut self, export: &str) -> Result<Negotiated, ClientError> {
        self.send_option(proto::OPT_EXPORT_NAME, export.as_bytes()).await?;
        let mut b = [0u8; 10 + 124];
        let want = if self.no_zeroes { 10 } else { b.len() };
        self.stream.read_exact(&mut b[..want]).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ClientError::Refused {
                    target: self.target.to_string(),
                    option: "NBD_OPT_EXPORT_NAME",
                    export: export.to_string(),
                    reply: "a closed connection".into(),
                    message: "the export probably does not exist".into(),
                }
            } else {
                ClientError::Io {
                    target: self.target.to_string(),
                    doing: "reading the NBD_OPT_EXPORT_NAME reply",
                    source: e,
                }
            }
        })?;
        Ok(Negotiated {
            name: export.to_string(),
            description: None,
            size: u64::from_be_bytes(b[0..8].try_into().unwrap()),
            transmission_flags: u16::from_be_bytes([b[8], b[9]]),
            block_sizes: None,
            structured_replies: false,
            contexts: Vec::new(),
        })
    }

    /// `NBD_OPT_LIST`: (name, description) of every export.
    pub async fn list(&mut self) -> Result<Vec<(String, String)>, ClientError> {
        if !self.fixed_newstyle {
            return Err(ClientError::Unsupported {
                target: self.target.to_string(),
                what: "the server does not speak fixed newstyle, so it cannot list exports".into(),
            });
        }
        self.send_option(proto::OPT_LIST, &[]).await?;
        let mut exports = Vec::new();
        for _ in 0..OPTION_REPLIES_MAX {
            let (reply, data) = self.read_reply(proto::OPT_LIST).await?;
            match reply {
                proto::REP_SERVER => {
                    if data.len() < 4 {
                        return Err(self.protocol("NBD_REP_SERVER shorter than 4 bytes"));
                    }
                    let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                    if name_len > data.len() - 4 {
                        return Err(self.protocol("NBD_REP_SERVER name length exceeds the reply"));
                    }
                    let name = String::from_utf8_lossy(&data[4..4 + name_len]).into_owned();
                    let description = String::from_utf8_lossy(&data[4 + name_len..]).into_owned();
                    exports.push((name, description));
                }
                proto::REP_ACK => return Ok(exports),
                r if r & proto::REP_FLAG_ERROR != 0 => return Err(self.refused(proto::OPT_LIST, "", r, &data)),
                r => return Err(self.protocol(format!("unexpected {} to NBD_OPT_LIST", reply_name(r)))),
            }
        }
        Err(self.protocol("too many replies to NBD_OPT_LIST"))
    }

    /// `NBD_OPT_ABORT`, the polite way to leave: the reply is optional.
    pub async fn abort(&mut self) {
        if self.send_option(proto::OPT_ABORT, &[]).await.is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.read_reply(proto::OPT_ABORT)).await;
        }
    }
}

/// Checks the spec's rules for advertised block sizes.
pub(crate) fn validate_block_sizes(b: BlockSizes) -> Result<BlockSizes, String> {
    let ok = b.minimum.is_power_of_two()
        && b.minimum <= 65536
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum
        && b.maximum >= b.minimum
        && (b.maximum == u32::MAX || b.maximum.is_multiple_of(b.minimum));
    if ok {
        Ok(b)
    } else {
        Err(format!(
            "server advertised impossible block sizes (minimum {}, preferred {}, maximum {})",
            b.minimum, b.preferred, b.maximum
        ))
    }
}
