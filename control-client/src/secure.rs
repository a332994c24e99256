//! Protected records over any byte stream: [`SecureStream`] wraps a socket
//! after the handshake and carries every later byte in records that are
//! encrypted (AES-256-GCM) or integrity-only (BLAKE3 keyed hash), each checked against an
//! implicit per-direction sequence number (layout:
//! `volume_format::control::record`).
//!
//! Why a stream wrapper rather than protected frames: the control protocol's
//! framing and NBD (on data and backup channels) run over it unchanged — the
//! agent's fallback path, the backup pseudo-device and `sanvol-backup serve`
//! need no knowledge of it.
//!
//! A record that fails its check (a flipped byte; a replayed, reordered,
//! dropped or injected record) is logged once on this side with the
//! channel's label and the record's number, and the stream fails for good:
//! every later read and write returns the same error, and dropping it closes
//! the socket. There is no recovery by design — a channel someone tampers
//! with is not a channel to keep using.
//!
//! [`Protection`] is the record state machine without any I/O (seal, open),
//! testable on byte buffers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ring::aead;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use volume_format::control::auth::ChannelMode;
use volume_format::control::record::{
    self, check_record_header, mac_prefix, record_header, RecordError, INTEGRITY_KEY_CONTEXT, MAC_TAG_BYTES,
    RECORD_BODY_BYTES_MAX, RECORD_HEADER_BYTES, RECORD_PLAINTEXT_BYTES_MAX,
};

/// Bytes of sealed records a writer may have buffered before `poll_write`
/// waits for the socket (a megabyte: small writes coalesce into one
/// syscall, a 1 MiB reply leaves in one, larger ones do not pile up).
pub const WRITE_BUFFERED_BYTES_MAX: usize = 16 * (RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX);
/// A stream's read buffer at first: two records (a reader never holds more
/// than one incomplete record besides whole ones).
const READ_BUFFER_BYTES: usize = 2 * (RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX);
/// The read buffer grows, doubling each time a read from the socket filled
/// it, up to this: a channel that carries 1 MiB replies takes one in one or
/// two reads instead of eight, and control connections keep a small one.
const READ_BUFFER_BYTES_MAX: usize = 16 * (RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX);

/// Why a record could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordFailure {
    /// The tag did not verify for the expected sequence number.
    #[error(
        "record {seq} failed its {mode} check: the stream was altered, replayed, reordered, truncated or \
         injected on the way"
    )]
    Tampered { seq: u64, mode: ChannelMode },
    #[error("record {seq}: {source}")]
    Header { seq: u64, source: RecordError },
    #[error("the channel has protected 2^64 records in one direction; reconnect")]
    Exhausted,
    #[error("record of {0} bytes exceeds the {max}-byte limit", max = RECORD_PLAINTEXT_BYTES_MAX)]
    TooLarge(usize),
}

/// The keys of both directions. `Aead`: AES-256-GCM under the Noise
/// split's keys with Noise's nonce (four zero bytes, then the sequence
/// number big-endian) and no associated data — what Noise's transport
/// messages are, sealed and opened in place by ring instead of through
/// snow's transport, which copies every byte into a second buffer first
/// (a tenth of the backup bridge's CPU at 1 MiB reads, with the zeroing of
/// that buffer).
// One per channel, never moved after setup: the size difference is moot.
#[allow(clippy::large_enum_variant)]
enum Cipher {
    Aead { send: aead::LessSafeKey, recv: aead::LessSafeKey },
    Mac { send: [u8; 32], recv: [u8; 32] },
}

/// Noise's AESGCM nonce for record `seq`.
fn noise_nonce(seq: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn aead_key(split_key: &[u8]) -> Result<aead::LessSafeKey, snow::Error> {
    let key = aead::UnboundKey::new(&aead::AES_256_GCM, split_key)
        .map_err(|_| snow::Error::Init(snow::error::InitStage::ValidateKeyLengths))?;
    Ok(aead::LessSafeKey::new(key))
}

/// The record state of one channel: the keys of both directions and the
/// next sequence number of each. No I/O.
pub struct Protection {
    mode: ChannelMode,
    cipher: Cipher,
    send_seq: u64,
    recv_seq: u64,
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protection")
            .field("mode", &self.mode)
            .field("send_seq", &self.send_seq)
            .field("recv_seq", &self.recv_seq)
            .finish_non_exhaustive()
    }
}

/// The MAC key of one direction: BLAKE3's key derivation from the Noise
/// split's key, under a context string of its own (so the key used for the
/// MAC is never one Noise would use for a cipher).
fn integrity_key(split_key: &[u8]) -> [u8; 32] {
    blake3::derive_key(INTEGRITY_KEY_CONTEXT, split_key)
}

fn mac(key: &[u8; 32], seq: u64, parts: &[&[u8]]) -> blake3::Hash {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&mac_prefix(seq, len));
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

impl Protection {
    /// Takes over a finished Noise handshake. `initiator`: this side sent
    /// the first Noise message (the client).
    pub fn from_handshake(
        mut hs: snow::HandshakeState,
        initiator: bool,
        mode: ChannelMode,
    ) -> Result<Protection, snow::Error> {
        if !hs.is_handshake_finished() {
            return Err(snow::Error::State(snow::error::StateProblem::HandshakeNotFinished));
        }
        // The split's keys: Noise's transport cipher keys (encrypted), or
        // the seeds of the MAC keys (integrity, never used as cipher keys).
        let (initiator_to_responder, responder_to_initiator) = hs.dangerously_get_raw_split();
        let (send, recv) = if initiator {
            (initiator_to_responder, responder_to_initiator)
        } else {
            (responder_to_initiator, initiator_to_responder)
        };
        let cipher = match mode {
            ChannelMode::Encrypted => Cipher::Aead { send: aead_key(&send)?, recv: aead_key(&recv)? },
            ChannelMode::Integrity => Cipher::Mac { send: integrity_key(&send), recv: integrity_key(&recv) },
        };
        Ok(Protection { mode, cipher, send_seq: 0, recv_seq: 0 })
    }

    pub fn mode(&self) -> ChannelMode {
        self.mode
    }

    /// Records sealed and opened so far (the next sequence numbers).
    pub fn sequence_numbers(&self) -> (u64, u64) {
        (self.send_seq, self.recv_seq)
    }

    /// Appends one record carrying the concatenation of `parts` (at most
    /// [`RECORD_PLAINTEXT_BYTES_MAX`] bytes in all) to `out`.
    pub fn seal(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), RecordFailure> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > RECORD_PLAINTEXT_BYTES_MAX {
            return Err(RecordFailure::TooLarge(len));
        }
        let seq = self.send_seq;
        let next = seq.checked_add(1).ok_or(RecordFailure::Exhausted)?;
        out.extend_from_slice(&record_header(self.mode, len));
        let start = out.len();
        for p in parts {
            out.extend_from_slice(p);
        }
        match &self.cipher {
            Cipher::Aead { send, .. } => {
                let tag = send
                    .seal_in_place_separate_tag(noise_nonce(seq), aead::Aad::empty(), &mut out[start..])
                    .map_err(|_| {
                        out.truncate(start - RECORD_HEADER_BYTES);
                        RecordFailure::TooLarge(len)
                    })?;
                out.extend_from_slice(tag.as_ref());
            }
            Cipher::Mac { send, .. } => {
                let tag = mac(send, seq, &[&out[start..]]);
                out.extend_from_slice(tag.as_bytes());
            }
        }
        self.send_seq = next;
        Ok(())
    }

    /// Checks a record's header; returns the body length to read.
    pub fn body_len(&self, header: [u8; RECORD_HEADER_BYTES]) -> Result<usize, RecordFailure> {
        check_record_header(header, self.mode).map_err(|source| RecordFailure::Header { seq: self.recv_seq, source })
    }

    /// Opens the next record's `body` (without its header) in place: its
    /// plaintext is then `body[..n]` for the returned `n`. An empty
    /// plaintext is the peer's close. On failure `body` holds garbage.
    pub fn open_in_place(&mut self, body: &mut [u8]) -> Result<usize, RecordFailure> {
        let seq = self.recv_seq;
        let tampered = RecordFailure::Tampered { seq, mode: self.mode };
        let tag = record::tag_bytes(self.mode);
        if body.len() < tag {
            return Err(RecordFailure::Header { seq, source: RecordError::Short { body: body.len(), tag } });
        }
        let n = body.len() - tag;
        if n > RECORD_PLAINTEXT_BYTES_MAX {
            return Err(RecordFailure::Header { seq, source: RecordError::TooLarge(n) });
        }
        let next = seq.checked_add(1).ok_or(RecordFailure::Exhausted)?;
        match &self.cipher {
            Cipher::Aead { recv, .. } => {
                recv.open_in_place(noise_nonce(seq), aead::Aad::empty(), body).map_err(|_| tampered)?;
            }
            Cipher::Mac { recv, .. } => {
                let (text, tag) = body.split_at(n);
                let tag: [u8; MAC_TAG_BYTES] = tag.try_into().expect("split at the tag length");
                // blake3::Hash compares in constant time.
                if mac(recv, seq, &[text]) != blake3::Hash::from_bytes(tag) {
                    return Err(tampered);
                }
            }
        }
        self.recv_seq = next;
        Ok(n)
    }
}

/// A byte stream whose every byte travels in protected records.
pub struct SecureStream<S> {
    inner: S,
    protection: Protection,
    label: Arc<str>,
    /// Wire bytes read and not yet opened: `rbuf[rstart..rend]`.
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// The plaintext of the last opened record not yet handed out:
    /// `rbuf[plain_start..plain_end]` (records are opened in place).
    plain_start: usize,
    plain_end: usize,
    /// The peer sent its close.
    read_closed: bool,
    /// Sealed records not yet written: `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// This side sent its close.
    write_closed: bool,
    /// Once a record failed, every later call returns this.
    failed: Option<(io::ErrorKind, String)>,
}

impl<S> std::fmt::Debug for SecureStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream").field("label", &self.label).field("protection", &self.protection).finish()
    }
}

impl<S> SecureStream<S> {
    /// Wraps `inner` (positioned right after the Noise handshake).
    pub fn new(inner: S, protection: Protection) -> SecureStream<S> {
        SecureStream {
            inner,
            protection,
            label: Arc::from("protected channel"),
            rbuf: vec![0u8; READ_BUFFER_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            plain_start: 0,
            plain_end: 0,
            read_closed: false,
            wbuf: Vec::with_capacity(2 * (RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX)),
            wpos: 0,
            write_closed: false,
            failed: None,
        }
    }

    /// Names the channel in log lines ("control connection from …").
    pub fn set_label(&mut self, label: impl Into<String>) {
        self.label = Arc::from(label.into());
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn mode(&self) -> ChannelMode {
        self.protection.mode()
    }

    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn fail(&mut self, kind: io::ErrorKind, message: String) -> io::Error {
        self.failed = Some((kind, message.clone()));
        io::Error::new(kind, message)
    }

    fn failed_error(&self) -> Option<io::Error> {
        self.failed.as_ref().map(|(kind, msg)| io::Error::new(*kind, msg.clone()))
    }
}

impl<S: AsyncRead + Unpin> SecureStream<S> {
    /// Opens the next whole record in the read buffer, if there is one.
    /// `Ok(true)`: a record was consumed.
    fn open_buffered(&mut self) -> io::Result<bool> {
        let have = self.rend - self.rstart;
        if have < RECORD_HEADER_BYTES {
            return Ok(false);
        }
        let header = [self.rbuf[self.rstart], self.rbuf[self.rstart + 1]];
        let body = match self.protection.body_len(header) {
            Ok(b) => b,
            Err(e) => return Err(self.tampered(e)),
        };
        if have < RECORD_HEADER_BYTES + body {
            return Ok(false);
        }
        let start = self.rstart + RECORD_HEADER_BYTES;
        let n = match self.protection.open_in_place(&mut self.rbuf[start..start + body]) {
            Ok(n) => n,
            Err(e) => return Err(self.tampered(e)),
        };
        self.rstart = start + body;
        (self.plain_start, self.plain_end) = (start, start + n);
        if n == 0 {
            self.read_closed = true;
        }
        Ok(true)
    }

    fn tampered(&mut self, e: RecordFailure) -> io::Error {
        tracing::warn!("{}: {e}; closing the channel", self.label);
        self.fail(io::ErrorKind::InvalidData, format!("{}: {e}", self.label))
    }
}

/// Fills the caller's buffer with as many records' plaintext as are there
/// without waiting (not one record per call): a reader with a large buffer
/// — `sanvol-backup serve` copying a 1 MiB reply — then makes one write per
/// buffer rather than one per record, and wakes its own reader that much
/// less. What it got before an error or the end is returned first; the
/// error comes with the next call.
impl<S: AsyncRead + Unpin> AsyncRead for SecureStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut gave = false;
        loop {
            if let Some(e) = this.failed_error() {
                return Poll::Ready(if gave { Ok(()) } else { Err(e) });
            }
            if this.plain_start < this.plain_end {
                let n = (this.plain_end - this.plain_start).min(buf.remaining());
                buf.put_slice(&this.rbuf[this.plain_start..this.plain_start + n]);
                this.plain_start += n;
                gave = true;
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.open_buffered() {
                Ok(true) => continue,
                Ok(false) => {}
                // Kept in `failed`: the next call returns it.
                Err(e) => return Poll::Ready(if gave { Ok(()) } else { Err(e) }),
            }
            // Need more bytes: make room for a whole record, then read.
            if this.rstart > 0 && this.rbuf.len() - this.rend < RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX {
                this.rbuf.copy_within(this.rstart..this.rend, 0);
                this.rend -= this.rstart;
                this.rstart = 0;
            }
            let room = this.rbuf.len() - this.rend;
            let mut rb = ReadBuf::new(&mut this.rbuf[this.rend..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending if gave => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) if gave => {
                    this.fail(e.kind(), format!("{}: {e}", this.label));
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            if n == 0 && gave {
                // The end (or the cut) is reported by the next call.
                return Poll::Ready(Ok(()));
            }
            if n == 0 {
                let message = if this.rstart == this.rend {
                    format!("{}: the connection ended without the peer's close (cut off)", this.label)
                } else {
                    format!("{}: the connection ended in the middle of a protected record", this.label)
                };
                tracing::debug!("{message}");
                return Poll::Ready(Err(this.fail(io::ErrorKind::UnexpectedEof, message)));
            }
            this.rend += n;
            if n == room && this.rbuf.len() < READ_BUFFER_BYTES_MAX {
                let mut grown = std::mem::take(&mut this.rbuf).into_vec();
                grown.resize((2 * grown.len()).min(READ_BUFFER_BYTES_MAX), 0);
                this.rbuf = grown.into_boxed_slice();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> SecureStream<S> {
    /// Writes buffered records until the buffer is empty or the socket
    /// would block.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.fail(io::ErrorKind::WriteZero, format!("{}: closed", self.label))))
                }
                Poll::Ready(Ok(n)) => self.wpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(e.kind(), format!("{}: {e}", self.label)))),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_seal(&mut self, cx: &mut Context<'_>, parts: &[&[u8]]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.failed_error() {
            return Poll::Ready(Err(e));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        if self.wbuf.len() - self.wpos >= WRITE_BUFFERED_BYTES_MAX {
            ready!(self.poll_drain(cx))?;
        }
        // Take whole parts while they fit, then a piece of the next.
        let mut take: Vec<&[u8]> = Vec::with_capacity(parts.len().min(16));
        let mut n = 0;
        for p in parts {
            let room = RECORD_PLAINTEXT_BYTES_MAX - n;
            if room == 0 {
                break;
            }
            let piece = &p[..p.len().min(room)];
            if !piece.is_empty() {
                take.push(piece);
                n += piece.len();
            }
        }
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        if let Err(e) = self.protection.seal(&take, &mut self.wbuf) {
            return Poll::Ready(Err(self.fail(io::ErrorKind::Other, format!("{}: {e}", self.label))));
        }
        // A full record: the caller is in the middle of a large write, and
        // will write on or flush (as every writer of an `AsyncWrite` must
        // before it waits for an answer) — send it with the next ones, up
        // to WRITE_BUFFERED_BYTES_MAX at once: a 1 MiB reply leaves in one
        // or two writes, not sixteen, and wakes the peer as often.
        if n == RECORD_PLAINTEXT_BYTES_MAX && self.wbuf.len() - self.wpos < WRITE_BUFFERED_BYTES_MAX {
            return Poll::Ready(Ok(n));
        }
        // Start sending now; what the socket does not take goes with the
        // next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SecureStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_seal(cx, &[buf])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let parts: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.poll_seal(cx, &parts)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.failed_error() {
            return Poll::Ready(Err(e));
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Sends this side's close (an empty record), then shuts the socket's
    /// write side.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed.is_none() && !self.write_closed {
            let this = &mut *self;
            if let Err(e) = this.protection.seal(&[], &mut this.wbuf) {
                return Poll::Ready(Err(this.fail(io::ErrorKind::Other, e.to_string())));
            }
            this.write_closed = true;
        }
        if self.failed.is_none() {
            ready!(self.poll_drain(cx))?;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Two finished Noise NN handshakes (initiator, responder) in memory, for
/// tests and benchmarks of the record layer.
#[doc(hidden)]
pub fn noise_pair() -> (snow::HandshakeState, snow::HandshakeState) {
    let mut i = crate::handshake::plain_noise_builder().build_initiator().expect("initiator");
    let mut r = crate::handshake::plain_noise_builder().build_responder().expect("responder");
    let (mut msg, mut payload) = (vec![0u8; 256], vec![0u8; 256]);
    let n = i.write_message(&[], &mut msg).expect("msg 1");
    r.read_message(&msg[..n], &mut payload).expect("msg 1");
    let n = r.write_message(&[], &mut msg).expect("msg 2");
    i.read_message(&msg[..n], &mut payload).expect("msg 2");
    (i, r)
}

/// A connected pair of [`Protection`]s (a Noise NN handshake in memory),
/// for tests and benchmarks of the record layer.
#[doc(hidden)]
pub fn protection_pair(mode: ChannelMode) -> (Protection, Protection) {
    let (i, r) = noise_pair();
    (
        Protection::from_handshake(i, true, mode).expect("initiator transport"),
        Protection::from_handshake(r, false, mode).expect("responder transport"),
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use volume_format::control::record::AEAD_TAG_BYTES;

    use super::*;

    const MODES: [ChannelMode; 2] = [ChannelMode::Encrypted, ChannelMode::Integrity];

    fn sealed(p: &mut Protection, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        p.seal(&[text], &mut out).unwrap();
        out
    }

    fn open(p: &mut Protection, record: &[u8]) -> Result<Vec<u8>, RecordFailure> {
        let body = p.body_len([record[0], record[1]])?;
        assert_eq!(record.len(), RECORD_HEADER_BYTES + body);
        let mut body = record[RECORD_HEADER_BYTES..].to_vec();
        let n = p.open_in_place(&mut body)?;
        body.truncate(n);
        Ok(body)
    }

    /// Encrypted records are Noise transport messages: what snow's own
    /// transport seals, a Protection opens, and the other way round (same
    /// keys, nonces and tag), record after record.
    #[test]
    fn encrypted_records_are_noise_transport_messages() {
        let (i, r) = noise_pair();
        let mut ours = Protection::from_handshake(i, true, ChannelMode::Encrypted).unwrap();
        let snow_side = r.into_stateless_transport_mode().unwrap();
        for seq in 0..3u64 {
            let text: Vec<u8> = (0..1000u32).map(|k| (k as u64 * 7 + seq) as u8).collect();
            let record = sealed(&mut ours, &text);
            let mut plain = vec![0u8; text.len()];
            let n = snow_side.read_message(seq, &record[RECORD_HEADER_BYTES..], &mut plain).unwrap();
            assert_eq!(&plain[..n], &text[..]);
            let mut wire = vec![0u8; text.len() + AEAD_TAG_BYTES];
            let n = snow_side.write_message(seq, &text, &mut wire).unwrap();
            let mut record = record_header(ChannelMode::Encrypted, text.len()).to_vec();
            record.extend_from_slice(&wire[..n]);
            assert_eq!(open(&mut ours, &record).unwrap(), text);
        }
    }

    #[test]
    fn records_round_trip_in_both_directions_and_modes() {
        for mode in MODES {
            let (mut c, mut s) = protection_pair(mode);
            for i in 0..3u8 {
                let r = sealed(&mut c, &[i; 100]);
                assert_eq!(open(&mut s, &r).unwrap(), vec![i; 100]);
                let r = sealed(&mut s, &[i; 7]);
                assert_eq!(open(&mut c, &r).unwrap(), vec![i; 7]);
            }
            let mut multi = Vec::new();
            c.seal(&[b"ab", b"", b"cd"], &mut multi).unwrap();
            assert_eq!(open(&mut s, &multi).unwrap(), b"abcd");
            assert_eq!(c.sequence_numbers(), (4, 3));
        }
    }

    #[test]
    fn integrity_only_records_carry_the_plaintext_and_encrypted_ones_do_not() {
        let text = b"the quick brown fox, a recognisable plaintext";
        let (mut c, _) = protection_pair(ChannelMode::Integrity);
        let r = sealed(&mut c, text);
        assert!(r.windows(text.len()).any(|w| w == text));
        assert_eq!(r.len(), RECORD_HEADER_BYTES + text.len() + MAC_TAG_BYTES);
        let (mut c, _) = protection_pair(ChannelMode::Encrypted);
        let r = sealed(&mut c, text);
        assert!(!r.windows(8).any(|w| w == &text[..8]));
        assert_eq!(r.len(), RECORD_HEADER_BYTES + text.len() + AEAD_TAG_BYTES);
    }

    #[test]
    fn every_tampering_is_detected() {
        for mode in MODES {
            // A flipped bit anywhere in the body.
            for at in [RECORD_HEADER_BYTES, RECORD_HEADER_BYTES + 10, RECORD_HEADER_BYTES + 30] {
                let (mut c, mut s) = protection_pair(mode);
                let mut r = sealed(&mut c, &[5; 20]);
                r[at] ^= 1;
                assert!(matches!(open(&mut s, &r), Err(RecordFailure::Tampered { seq: 0, .. })), "{mode} at {at}");
            }
            // Replayed.
            let (mut c, mut s) = protection_pair(mode);
            let r0 = sealed(&mut c, b"zero");
            open(&mut s, &r0).unwrap();
            assert!(matches!(open(&mut s, &r0), Err(RecordFailure::Tampered { seq: 1, .. })), "{mode} replay");
            // Reordered (and so also dropped).
            let (mut c, mut s) = protection_pair(mode);
            let _r0 = sealed(&mut c, b"zero");
            let r1 = sealed(&mut c, b"one");
            assert!(matches!(open(&mut s, &r1), Err(RecordFailure::Tampered { seq: 0, .. })), "{mode} reorder");
            // Reflected: a record sent back to its sender.
            let (mut c, _) = protection_pair(mode);
            let r0 = sealed(&mut c, b"zero");
            assert!(open(&mut c, &r0).is_err(), "{mode} reflect");
            // Injected: a record from another connection.
            let (mut other, _) = protection_pair(mode);
            let (_, mut s) = protection_pair(mode);
            assert!(open(&mut s, &sealed(&mut other, b"evil")).is_err(), "{mode} inject");
        }
    }

    #[test]
    fn a_record_never_exceeds_its_bound() {
        let (mut c, _) = protection_pair(ChannelMode::Encrypted);
        let mut out = Vec::new();
        assert!(matches!(
            c.seal(&[&vec![0; RECORD_PLAINTEXT_BYTES_MAX + 1]], &mut out),
            Err(RecordFailure::TooLarge(_))
        ));
        assert!(out.is_empty());
        c.seal(&[&vec![0; RECORD_PLAINTEXT_BYTES_MAX]], &mut out).unwrap();
        assert!(out.len() <= RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX);
        assert_eq!(record::check_record_header([out[0], out[1]], ChannelMode::Encrypted).unwrap(), out.len() - 2);
    }

    async fn pair(mode: ChannelMode) -> (SecureStream<tokio::io::DuplexStream>, SecureStream<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (pa, pb) = protection_pair(mode);
        (SecureStream::new(a, pa), SecureStream::new(b, pb))
    }

    #[tokio::test]
    async fn a_stream_carries_bytes_of_any_size_and_closes_cleanly() {
        for mode in MODES {
            let (mut a, mut b) = pair(mode).await;
            let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let sent = big.clone();
            let writer = tokio::spawn(async move {
                a.write_all(b"hello").await.unwrap();
                a.write_all(&sent).await.unwrap();
                a.shutdown().await.unwrap();
                a
            });
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            assert_eq!(&got[..5], b"hello");
            assert_eq!(&got[5..], &big[..]);
            let a = writer.await.unwrap();
            assert!(a.protection().sequence_numbers().0 >= 6, "300 kB went as several bounded records");
        }
    }

    /// Counts the writes that reach the socket.
    struct Counted {
        inner: tokio::io::DuplexStream,
        writes: usize,
        reads: usize,
    }

    impl AsyncRead for Counted {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            self.reads += 1;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
            self.writes += 1;
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_large_write_leaves_in_few_socket_writes_and_is_read_in_large_pieces() {
        for mode in MODES {
            let (a, b) = tokio::io::duplex(8 << 20);
            let (pa, pb) = protection_pair(mode);
            let mut a = SecureStream::new(Counted { inner: a, writes: 0, reads: 0 }, pa);
            let mut b = SecureStream::new(Counted { inner: b, writes: 0, reads: 0 }, pb);
            let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
            a.write_all(b"head").await.unwrap();
            a.write_all(&big).await.unwrap();
            a.flush().await.unwrap();
            let records = big.len().div_ceil(RECORD_PLAINTEXT_BYTES_MAX);
            let per_write = WRITE_BUFFERED_BYTES_MAX / (RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX);
            let writes = a.get_ref().writes;
            assert!(
                writes <= 1 + records.div_ceil(per_write),
                "{mode}: {records} records went in {writes} socket writes"
            );
            // Everything is on the wire: one read takes several records,
            // and the read buffer grows, so the whole megabyte takes a few
            // socket reads (eight or more with a two-record buffer).
            let mut got = vec![0u8; 4 + big.len()];
            let n = b.read(&mut got).await.unwrap();
            assert!(n > 2 * RECORD_PLAINTEXT_BYTES_MAX, "{mode}: one read returned {n} bytes");
            b.read_exact(&mut got[n..]).await.unwrap();
            assert_eq!(&got[..4], b"head");
            assert!(got[4..] == big[..], "{mode}: the bytes differ");
            let reads = b.get_ref().reads;
            assert!(reads <= 6, "{mode}: {records} records took {reads} socket reads");
        }
    }

    #[tokio::test]
    async fn a_cut_connection_is_an_error_not_an_end_of_stream() {
        let (a, mut b) = pair(ChannelMode::Encrypted).await;
        drop(a);
        let e = b.read_u8().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("without the peer's close"), "{e}");
    }

    #[tokio::test]
    async fn a_tampered_stream_fails_for_good() {
        for mode in MODES {
            let (raw_a, raw_b) = tokio::io::duplex(1 << 16);
            let (pa, pb) = protection_pair(mode);
            let mut a = SecureStream::new(raw_a, pa);
            a.write_all(b"first").await.unwrap();
            a.write_all(b"second").await.unwrap();
            a.flush().await.unwrap();
            // Take the wire bytes, flip one bit of the second record, deliver.
            let (mut tap, mut b_side) = (raw_b, tokio::io::duplex(1 << 16));
            let mut wire = vec![0u8; 2 * RECORD_HEADER_BYTES + 11 + 2 * record::tag_bytes(mode)];
            tap.read_exact(&mut wire).await.unwrap();
            let second = RECORD_HEADER_BYTES + 5 + record::tag_bytes(mode);
            wire[second + RECORD_HEADER_BYTES + 1] ^= 0x40;
            b_side.0.write_all(&wire).await.unwrap();
            let mut b = SecureStream::new(b_side.1, pb);
            b.set_label("test channel");
            let mut first = [0u8; 5];
            b.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"first");
            let e = b.read_u8().await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("test channel: record 1 failed"), "{e}");
            assert!(b.read_u8().await.is_err(), "the stream stays failed");
            assert!(b.write_all(b"x").await.is_err(), "and cannot be written either");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Random bytes on the wire never panic the reader and never yield
        /// plaintext: they fail the check (or wait for more bytes).
        #[test]
        fn random_wire_bytes_are_refused(wire in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
                                         integrity in proptest::prelude::any::<bool>()) {
            let mode = if integrity { ChannelMode::Integrity } else { ChannelMode::Encrypted };
            let (_, mut s) = protection_pair(mode);
            if wire.len() >= 2 {
                if let Ok(body) = s.body_len([wire[0], wire[1]]) {
                    if wire.len() >= 2 + body {
                        proptest::prop_assert!(s.open_in_place(&mut wire[2..2 + body].to_vec()).is_err());
                    }
                }
            }
        }

        /// A genuine record with any single byte changed is refused.
        #[test]
        fn any_mutated_record_is_refused(text in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
                                         at in proptest::prelude::any::<proptest::sample::Index>(),
                                         flip in 1u8..=255, integrity in proptest::prelude::any::<bool>()) {
            let mode = if integrity { ChannelMode::Integrity } else { ChannelMode::Encrypted };
            let (mut c, mut s) = protection_pair(mode);
            let mut r = Vec::new();
            c.seal(&[&text], &mut r).unwrap();
            let at = at.index(r.len());
            r[at] ^= flip;
            let refused = match s.body_len([r[0], r[1]]) {
                Err(_) => true,
                Ok(body) if r.len() != 2 + body => true, // the reader would wait for other bytes
                Ok(body) => s.open_in_place(&mut r[2..2 + body].to_vec()).is_err(),
            };
            proptest::prop_assert!(refused);
        }
    }
}
