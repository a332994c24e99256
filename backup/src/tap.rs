//! A passive NBD protocol tap for `sanvol-backup serve`'s metrics.
//!
//! `serve` bridges bytes between a local client and the snapshots' server
//! without terminating NBD (the client negotiates with the real server: its
//! export list, block status contexts and structured replies pass through
//! untouched). To count reads per export it follows both directions of the
//! conversation: the client's options and requests, the server's option
//! replies and replies, and reports what it saw ([`TapEvent`]). It never
//! changes a byte and never blocks the bridge: anything it does not follow
//! (TLS, extended headers, the oldstyle handshake, a stream it lost sync
//! with) turns it off for that connection ([`TapEvent::Untracked`]).
//!
//! Each direction is fed in order, and the bridge feeds bytes to the tap
//! before forwarding them, so when the server's answer to an option arrives
//! the tap has already seen the option.
//!
//! A plain state machine over byte slices: tested without sockets.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use blockio::proto;

/// Most requests the tap follows at once on one connection (the server
/// bounds what a client may have in flight; past this the tap gives up).
pub const IN_FLIGHT_MAX: usize = 16 * 1024;
/// Most options a client may send before transmission (as the server allows).
pub const OPTIONS_MAX: usize = proto::limits::OPTIONS_MAX;
/// Longest reply chunk payload followed (a read's data plus its offset).
pub const CHUNK_BYTES_MAX: u64 = proto::limits::PAYLOAD_BYTES_MAX as u64 + 64 * 1024;

/// What the tap saw.
#[derive(Debug, Clone, PartialEq)]
pub enum TapEvent {
    /// Transmission began on this export.
    Export(String),
    /// A read finished: the bytes it asked for, its latency, and whether the
    /// server reported an error.
    Read { bytes: u64, latency: Duration, ok: bool },
    /// Another request finished (block status, cache, flush, ...).
    Other { ok: bool },
    /// The tap stopped following this connection (why).
    Untracked(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Flags,
    OptionHeader,
    OptionData { option: u32, len: usize },
    Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Greeting,
    OptionReply,
    ExportInfo,
    ReplyMagic,
    SimpleRest,
    StructuredRest,
}

/// One direction's framing: bytes collected toward the next header, and
/// payload bytes to pass over.
#[derive(Debug, Default)]
struct Framer {
    header: Vec<u8>,
    skip: u64,
}

impl Framer {
    /// Consumes from `input` until `need` header bytes are collected (after
    /// any payload to skip); returns them when complete.
    fn take(&mut self, input: &mut &[u8], need: usize) -> Option<Vec<u8>> {
        if self.skip > 0 {
            let n = (self.skip.min(input.len() as u64)) as usize;
            self.skip -= n as u64;
            *input = &input[n..];
            if self.skip > 0 {
                return None;
            }
        }
        let n = (need - self.header.len()).min(input.len());
        self.header.extend_from_slice(&input[..n]);
        *input = &input[n..];
        (self.header.len() == need).then(|| std::mem::take(&mut self.header))
    }
}

struct InFlight {
    command: u16,
    length: u32,
    since: Instant,
    failed: bool,
}

/// The tap of one connection.
pub struct NbdTap {
    client: Client,
    server: Server,
    from_client: Framer,
    from_server: Framer,
    /// Options sent and not yet finally answered, in order.
    options: VecDeque<u32>,
    /// The name of the last NBD_OPT_GO / EXPORT_NAME.
    export: Option<String>,
    no_zeroes: bool,
    structured: bool,
    in_flight: HashMap<u64, InFlight>,
    off: bool,
}

impl Default for NbdTap {
    fn default() -> Self {
        NbdTap::new()
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

impl NbdTap {
    pub fn new() -> NbdTap {
        NbdTap {
            client: Client::Flags,
            server: Server::Greeting,
            from_client: Framer::default(),
            from_server: Framer::default(),
            options: VecDeque::new(),
            export: None,
            no_zeroes: false,
            structured: false,
            in_flight: HashMap::new(),
            off: false,
        }
    }

    /// Whether the tap still follows the connection.
    pub fn following(&self) -> bool {
        !self.off
    }

    fn give_up(&mut self, why: String, events: &mut Vec<TapEvent>) {
        if !self.off {
            self.off = true;
            self.in_flight.clear();
            events.push(TapEvent::Untracked(why));
        }
    }

    /// Bytes the client sent (before they are forwarded to the server).
    pub fn from_client(&mut self, mut input: &[u8], now: Instant) -> Vec<TapEvent> {
        let mut events = Vec::new();
        while !self.off && !input.is_empty() {
            let need = match self.client {
                Client::Flags => 4,
                Client::OptionHeader => 16,
                Client::OptionData { len, .. } => len,
                Client::Request => proto::REQUEST_HEADER_BYTES,
            };
            let Some(header) = self.from_client.take(&mut input, need) else { break };
            match self.client {
                Client::Flags => {
                    let flags = be32(&header);
                    self.no_zeroes &= flags & proto::FLAG_C_NO_ZEROES != 0;
                    self.client = Client::OptionHeader;
                }
                Client::OptionHeader => {
                    if be64(&header) != proto::IHAVEOPT {
                        self.give_up("the client's option has no IHAVEOPT magic".into(), &mut events);
                        break;
                    }
                    let (option, len) = (be32(&header[8..]), be32(&header[12..]));
                    if self.options.len() >= OPTIONS_MAX {
                        self.give_up(format!("more than {OPTIONS_MAX} options"), &mut events);
                        break;
                    }
                    let wanted = matches!(option, proto::OPT_EXPORT_NAME | proto::OPT_GO);
                    if wanted && len <= proto::limits::OPTION_DATA_BYTES_MAX && len > 0 {
                        self.client = Client::OptionData { option, len: len as usize };
                    } else {
                        self.from_client.skip = len as u64;
                        self.option_sent(option);
                    }
                }
                Client::OptionData { option, .. } => {
                    let name = if option == proto::OPT_EXPORT_NAME {
                        String::from_utf8_lossy(&header).into_owned()
                    } else {
                        let n = be32(&header) as usize;
                        String::from_utf8_lossy(header.get(4..4 + n).unwrap_or_default()).into_owned()
                    };
                    self.export = Some(name);
                    self.option_sent(option);
                }
                Client::Request => {
                    let header: [u8; proto::REQUEST_HEADER_BYTES] = header.try_into().expect("a request header");
                    let Ok(request) = proto::RequestHeader::decode(&header) else {
                        self.give_up("a request without the request magic".into(), &mut events);
                        break;
                    };
                    if request.command == proto::CMD_WRITE {
                        self.from_client.skip = request.length as u64;
                    }
                    if request.command == proto::CMD_DISC {
                        continue;
                    }
                    if self.in_flight.len() >= IN_FLIGHT_MAX {
                        self.give_up(format!("more than {IN_FLIGHT_MAX} requests in flight"), &mut events);
                        break;
                    }
                    let entry =
                        InFlight { command: request.command, length: request.length, since: now, failed: false };
                    self.in_flight.insert(request.cookie, entry);
                }
            }
        }
        events
    }

    /// The client sent `option`; EXPORT_NAME ends the handshake.
    fn option_sent(&mut self, option: u32) {
        self.options.push_back(option);
        self.client = if option == proto::OPT_EXPORT_NAME { Client::Request } else { Client::OptionHeader };
    }

    /// Bytes the server sent (before they are forwarded to the client).
    pub fn from_server(&mut self, mut input: &[u8], now: Instant) -> Vec<TapEvent> {
        let mut events = Vec::new();
        while !self.off && !input.is_empty() {
            if self.server == Server::OptionReply && self.options.front() == Some(&proto::OPT_EXPORT_NAME) {
                self.server = Server::ExportInfo;
            }
            let need = match self.server {
                Server::Greeting => 18,
                Server::OptionReply => 20,
                Server::ExportInfo if self.no_zeroes => 10,
                Server::ExportInfo => 10 + 124,
                Server::ReplyMagic => 4,
                Server::SimpleRest => proto::SIMPLE_REPLY_HEADER_BYTES - 4,
                Server::StructuredRest => proto::STRUCTURED_REPLY_HEADER_BYTES - 4,
            };
            let Some(header) = self.from_server.take(&mut input, need) else { break };
            match self.server {
                Server::Greeting => {
                    if be64(&header) != proto::NBDMAGIC || be64(&header[8..]) != proto::IHAVEOPT {
                        self.give_up("not a newstyle handshake".into(), &mut events);
                        break;
                    }
                    self.no_zeroes = be16(&header[16..]) & proto::FLAG_NO_ZEROES != 0;
                    self.server = Server::OptionReply;
                }
                Server::OptionReply => {
                    if be64(&header) != proto::OPTION_REPLY_MAGIC {
                        self.give_up("an option reply without its magic".into(), &mut events);
                        break;
                    }
                    let (option, kind, len) = (be32(&header[8..]), be32(&header[12..]), be32(&header[16..]));
                    self.from_server.skip = len as u64;
                    let last = kind == proto::REP_ACK || kind & proto::REP_FLAG_ERROR != 0;
                    if !last {
                        continue;
                    }
                    if self.options.pop_front() != Some(option) {
                        self.give_up(format!("a reply to option {option} that was not asked next"), &mut events);
                        break;
                    }
                    if kind != proto::REP_ACK {
                        continue;
                    }
                    match option {
                        proto::OPT_STRUCTURED_REPLY => self.structured = true,
                        proto::OPT_EXTENDED_HEADERS => {
                            self.give_up("extended headers (not followed)".into(), &mut events);
                        }
                        proto::OPT_STARTTLS => self.give_up("TLS".into(), &mut events),
                        proto::OPT_GO => self.transmission(&mut events),
                        _ => {}
                    }
                }
                Server::ExportInfo => {
                    self.options.pop_front();
                    self.transmission(&mut events);
                }
                Server::ReplyMagic => match be32(&header) {
                    proto::SIMPLE_REPLY_MAGIC => self.server = Server::SimpleRest,
                    proto::STRUCTURED_REPLY_MAGIC => self.server = Server::StructuredRest,
                    other => {
                        self.give_up(format!("a reply with magic {other:#x}"), &mut events);
                        break;
                    }
                },
                Server::SimpleRest => {
                    self.server = Server::ReplyMagic;
                    let (error, cookie) = (be32(&header), be64(&header[4..]));
                    let Some(request) = self.in_flight.remove(&cookie) else {
                        self.give_up(format!("a reply to unknown cookie {cookie}"), &mut events);
                        break;
                    };
                    if request.command == proto::CMD_READ && error == 0 && !self.structured {
                        self.from_server.skip = request.length as u64;
                    }
                    events.push(finished(&request, error == 0, now));
                }
                Server::StructuredRest => {
                    self.server = Server::ReplyMagic;
                    let (flags, kind, cookie, len) =
                        (be16(&header), be16(&header[2..]), be64(&header[4..]), be32(&header[12..]) as u64);
                    if len > CHUNK_BYTES_MAX {
                        self.give_up(format!("a reply chunk of {len} bytes"), &mut events);
                        break;
                    }
                    self.from_server.skip = len;
                    let Some(request) = self.in_flight.get_mut(&cookie) else {
                        self.give_up(format!("a reply to unknown cookie {cookie}"), &mut events);
                        break;
                    };
                    request.failed |= kind & (1 << 15) != 0;
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        let request = self.in_flight.remove(&cookie).expect("just found");
                        events.push(finished(&request, !request.failed, now));
                    }
                }
            }
        }
        events
    }

    fn transmission(&mut self, events: &mut Vec<TapEvent>) {
        self.server = Server::ReplyMagic;
        self.client = Client::Request;
        events.push(TapEvent::Export(self.export.clone().unwrap_or_default()));
    }
}

fn finished(request: &InFlight, ok: bool, now: Instant) -> TapEvent {
    if request.command == proto::CMD_READ {
        TapEvent::Read { bytes: request.length as u64, latency: now.saturating_duration_since(request.since), ok }
    } else {
        TapEvent::Other { ok }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(no_zeroes: bool) -> Vec<u8> {
        let mut b = proto::NBDMAGIC.to_be_bytes().to_vec();
        b.extend(proto::IHAVEOPT.to_be_bytes());
        b.extend((proto::FLAG_FIXED_NEWSTYLE | if no_zeroes { proto::FLAG_NO_ZEROES } else { 0 }).to_be_bytes());
        b
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend(option.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        b
    }

    fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut b = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(option.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        b
    }

    fn request(command: u16, cookie: u64, length: u32) -> Vec<u8> {
        proto::RequestHeader { flags: 0, command, cookie, offset: 0, length }.encode().to_vec()
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(flags.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend((payload.len() as u32).to_be_bytes());
        b.extend(payload);
        b
    }

    /// Feeds `bytes` one byte at a time: framing must not depend on how the
    /// stream is cut.
    fn dribble(tap: &mut NbdTap, client: bool, bytes: &[u8], at: Instant) -> Vec<TapEvent> {
        let mut events = Vec::new();
        for b in bytes {
            events.extend(if client { tap.from_client(&[*b], at) } else { tap.from_server(&[*b], at) });
        }
        events
    }

    #[test]
    fn go_and_structured_reads_are_followed_in_any_cut() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(3);
        for cut in [false, true] {
            let mut tap = NbdTap::new();
            let mut feed = |client: bool, bytes: Vec<u8>, at: Instant| {
                if cut {
                    dribble(&mut tap, client, &bytes, at)
                } else if client {
                    tap.from_client(&bytes, at)
                } else {
                    tap.from_server(&bytes, at)
                }
            };
            assert!(feed(false, greeting(true), t0).is_empty());
            let mut hello = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
            hello.extend(option(proto::OPT_STRUCTURED_REPLY, &[]));
            let mut go = 5u32.to_be_bytes().to_vec();
            go.extend(b"v@s1");
            go.push(b'!');
            go.extend(0u16.to_be_bytes());
            hello.extend(option(proto::OPT_GO, &go));
            assert!(feed(true, hello, t0).is_empty());
            let mut replies = option_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
            replies.extend(option_reply(proto::OPT_GO, proto::REP_INFO, &[0; 12]));
            replies.extend(option_reply(proto::OPT_GO, proto::REP_ACK, &[]));
            assert_eq!(feed(false, replies, t0), vec![TapEvent::Export("v@s1!".into())]);
            let mut requests = request(proto::CMD_READ, 7, 8192);
            requests.extend(request(proto::CMD_BLOCK_STATUS, 8, 1 << 20));
            requests.extend(request(proto::CMD_READ, 9, 4096));
            assert!(feed(true, requests, t0).is_empty());
            let mut data = vec![0u8; 8];
            data.extend(vec![0xab; 4096]);
            let mut replies = chunk(0, proto::REPLY_TYPE_OFFSET_DATA, 7, &data);
            replies.extend(chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE, 7, &[0; 12]));
            replies.extend(chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, 8, &[0; 12]));
            replies.extend(chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 9, &[0, 0, 0, 5, 0, 0]));
            let events = feed(false, replies, t1);
            assert_eq!(
                events,
                vec![
                    TapEvent::Read { bytes: 8192, latency: Duration::from_millis(3), ok: true },
                    TapEvent::Other { ok: true },
                    TapEvent::Read { bytes: 4096, latency: Duration::from_millis(3), ok: false },
                ]
            );
            assert!(tap.following());
        }
    }

    #[test]
    fn export_name_and_simple_replies_are_followed() {
        let t0 = Instant::now();
        let mut tap = NbdTap::new();
        tap.from_server(&greeting(false), t0);
        let mut hello = proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        hello.extend(option(proto::OPT_LIST, &[]));
        hello.extend(option(proto::OPT_EXPORT_NAME, b"db@nightly"));
        tap.from_client(&hello, t0);
        let mut replies = option_reply(proto::OPT_LIST, proto::REP_SERVER, b"\0\0\0\x02db");
        replies.extend(option_reply(proto::OPT_LIST, proto::REP_ACK, &[]));
        replies.extend(vec![0; 10 + 124]);
        assert_eq!(tap.from_server(&replies, t0), vec![TapEvent::Export("db@nightly".into())]);
        let mut requests = request(proto::CMD_READ, 1, 512);
        requests.extend(request(proto::CMD_WRITE, 2, 3));
        requests.extend(b"abc");
        requests.extend(request(proto::CMD_READ, 3, 512));
        tap.from_client(&requests, t0);
        let mut replies = proto::SimpleReplyHeader { error: 0, cookie: 1 }.encode().to_vec();
        replies.extend(vec![1; 512]);
        replies.extend(proto::SimpleReplyHeader { error: 1, cookie: 2 }.encode());
        replies.extend(proto::SimpleReplyHeader { error: 5, cookie: 3 }.encode());
        let events = tap.from_server(&replies, t0);
        assert_eq!(
            events,
            vec![
                TapEvent::Read { bytes: 512, latency: Duration::ZERO, ok: true },
                TapEvent::Other { ok: false },
                TapEvent::Read { bytes: 512, latency: Duration::ZERO, ok: false },
            ]
        );
    }

    #[test]
    fn what_it_cannot_follow_turns_it_off_without_panicking() {
        let t0 = Instant::now();
        let mut tap = NbdTap::new();
        tap.from_server(&greeting(true), t0);
        let mut hello = 0u32.to_be_bytes().to_vec();
        hello.extend(option(proto::OPT_EXTENDED_HEADERS, &[]));
        tap.from_client(&hello, t0);
        let events = tap.from_server(&option_reply(proto::OPT_EXTENDED_HEADERS, proto::REP_ACK, &[]), t0);
        assert!(matches!(&events[..], [TapEvent::Untracked(why)] if why.contains("extended")), "{events:?}");
        assert!(tap.from_server(&[0xff; 100], t0).is_empty());

        let mut tap = NbdTap::new();
        let events = tap.from_server(&[0x55; 64], t0);
        assert!(matches!(&events[..], [TapEvent::Untracked(_)]), "{events:?}");

        // A reply to a request never seen.
        let mut tap = NbdTap::new();
        tap.from_server(&greeting(true), t0);
        tap.from_client(&[0, 0, 0, 3], t0);
        tap.from_client(&option(proto::OPT_EXPORT_NAME, b"x"), t0);
        tap.from_server(&[0; 10], t0);
        let events = tap.from_server(&proto::SimpleReplyHeader { error: 0, cookie: 42 }.encode(), t0);
        assert!(matches!(&events[..], [TapEvent::Untracked(why)] if why.contains("42")), "{events:?}");
    }
}
