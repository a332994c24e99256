//! The byte layout of resume keys and handover tokens: what the metadata
//! server signs so that an agent can prove, on a later connection, which
//! handle it holds (see the server's `resume` module for why signed).
//!
//! Why a fixed byte layout rather than a serde encoding: the bytes are signed,
//! so they must never change with a library upgrade. Layout (big-endian):
//!
//! ```text
//! resume key:     "SVRK" ver(1)=1 | pool uuid(16) | handle(8) | volume(8) | opened_at_unix_secs(8)
//!                 | agent key(32) | agent instance(16) | mode(1)                           | sig(64)
//! handover token: "SVHT" ver(1)=1 | pool uuid(16) | handle(8) | volume(8) | from key(32) | to key(32)
//!                 | mode(1) | issued_at_unix_ms(8) | expires_at_unix_ms(8) | nonce(16)   | sig(64)
//! ```
//!
//! The signature (ed25519, 64 bytes) covers everything before it, magic
//! included, so a resume key can never be passed off as a handover token or
//! the other way round. This module only lays out and splits the bytes;
//! signing and verifying live with the keys. Decoding never panics on any
//! input: every length is checked first.

use crate::metadata::OpenMode;

const RESUME_MAGIC: &[u8; 4] = b"SVRK";
const HANDOVER_MAGIC: &[u8; 4] = b"SVHT";
const VERSION: u8 = 1;
/// Bytes of the ed25519 signature that ends every key and token.
pub const SIGNATURE_BYTES: usize = 64;
/// Body sizes (magic and version included, signature excluded).
const RESUME_BODY_BYTES: usize = 4 + 1 + 16 + 8 + 8 + 8 + 32 + 16 + 1;
const HANDOVER_BODY_BYTES: usize = 4 + 1 + 16 + 8 + 8 + 32 + 32 + 1 + 8 + 8 + 16;

/// What a resume key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeKey {
    pub pool: [u8; 16],
    pub handle: u64,
    pub volume: u64,
    pub opened_at_unix_secs: u64,
    pub agent_key: [u8; 32],
    pub agent_instance: [u8; 16],
    pub mode: OpenMode,
}

/// What a handover token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverToken {
    pub pool: [u8; 16],
    /// The holder's handle the token was issued from.
    pub handle: u64,
    pub volume: u64,
    pub from_key: [u8; 32],
    pub to_key: [u8; 32],
    pub mode: OpenMode,
    pub issued_at_unix_ms: u64,
    pub expires_at_unix_ms: u64,
    /// Makes every token distinct, so "used" can be remembered per token.
    pub nonce: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("it is {0} bytes long, not the {1} bytes of a sanvol {2}; pass the bytes exactly as issued")]
    Length(usize, usize, &'static str),
    #[error("it is not a sanvol {0} (wrong magic or version)")]
    Magic(&'static str),
    #[error("its signature does not verify against this pool's server key: it was forged or altered")]
    Signature,
    #[error("it names an unknown open mode {0}")]
    Mode(u8),
}

fn mode_byte(m: OpenMode) -> u8 {
    match m {
        OpenMode::ReadOnly => 0,
        OpenMode::SharedWrite => 1,
        OpenMode::Exclusive => 2,
    }
}

fn byte_mode(b: u8) -> Result<OpenMode, TokenError> {
    Ok(match b {
        0 => OpenMode::ReadOnly,
        1 => OpenMode::SharedWrite,
        2 => OpenMode::Exclusive,
        other => return Err(TokenError::Mode(other)),
    })
}

/// A bounds-checked reader over a body whose length was checked up front.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().unwrap_or([0; N])
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take::<8>())
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
}

/// A key or token split into its signed body and its signature.
#[derive(Debug)]
pub struct Signed<'a, T> {
    pub content: T,
    /// The bytes the signature covers.
    pub body: &'a [u8],
    pub signature: &'a [u8; SIGNATURE_BYTES],
}

/// Checks length, magic and version; splits body and signature.
fn split<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    body_bytes: usize,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8; SIGNATURE_BYTES]), TokenError> {
    if bytes.len() != body_bytes + SIGNATURE_BYTES {
        return Err(TokenError::Length(bytes.len(), body_bytes + SIGNATURE_BYTES, what));
    }
    let (body, sig) = bytes.split_at(body_bytes);
    if &body[..4] != magic || body[4] != VERSION {
        return Err(TokenError::Magic(what));
    }
    let sig: &[u8; SIGNATURE_BYTES] = sig.try_into().map_err(|_| TokenError::Signature)?;
    Ok((body, sig))
}

impl ResumeKey {
    /// The bytes to sign.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(RESUME_BODY_BYTES + SIGNATURE_BYTES);
        b.extend_from_slice(RESUME_MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&self.pool);
        b.extend_from_slice(&self.handle.to_be_bytes());
        b.extend_from_slice(&self.volume.to_be_bytes());
        b.extend_from_slice(&self.opened_at_unix_secs.to_be_bytes());
        b.extend_from_slice(&self.agent_key);
        b.extend_from_slice(&self.agent_instance);
        b.push(mode_byte(self.mode));
        debug_assert_eq!(b.len(), RESUME_BODY_BYTES);
        b
    }

    /// Splits signed bytes; the caller verifies the signature over `body`.
    pub fn parse(bytes: &[u8]) -> Result<Signed<'_, ResumeKey>, TokenError> {
        let (body, signature) = split(bytes, RESUME_MAGIC, RESUME_BODY_BYTES, "resume key")?;
        let mut r = Reader(&body[5..]);
        let content = ResumeKey {
            pool: r.take(),
            handle: r.u64(),
            volume: r.u64(),
            opened_at_unix_secs: r.u64(),
            agent_key: r.take(),
            agent_instance: r.take(),
            mode: byte_mode(r.u8())?,
        };
        Ok(Signed { content, body, signature })
    }
}

impl HandoverToken {
    /// The bytes to sign.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HANDOVER_BODY_BYTES + SIGNATURE_BYTES);
        b.extend_from_slice(HANDOVER_MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&self.pool);
        b.extend_from_slice(&self.handle.to_be_bytes());
        b.extend_from_slice(&self.volume.to_be_bytes());
        b.extend_from_slice(&self.from_key);
        b.extend_from_slice(&self.to_key);
        b.push(mode_byte(self.mode));
        b.extend_from_slice(&self.issued_at_unix_ms.to_be_bytes());
        b.extend_from_slice(&self.expires_at_unix_ms.to_be_bytes());
        b.extend_from_slice(&self.nonce);
        debug_assert_eq!(b.len(), HANDOVER_BODY_BYTES);
        b
    }

    /// Splits signed bytes; the caller verifies the signature over `body`.
    pub fn parse(bytes: &[u8]) -> Result<Signed<'_, HandoverToken>, TokenError> {
        let (body, signature) = split(bytes, HANDOVER_MAGIC, HANDOVER_BODY_BYTES, "handover token")?;
        let mut r = Reader(&body[5..]);
        let content = HandoverToken {
            pool: r.take(),
            handle: r.u64(),
            volume: r.u64(),
            from_key: r.take(),
            to_key: r.take(),
            mode: byte_mode(r.u8())?,
            issued_at_unix_ms: r.u64(),
            expires_at_unix_ms: r.u64(),
            nonce: r.take(),
        };
        Ok(Signed { content, body, signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume() -> ResumeKey {
        ResumeKey {
            pool: [1; 16],
            handle: 42,
            volume: 3,
            opened_at_unix_secs: 1_700_000_000,
            agent_key: [5; 32],
            agent_instance: [6; 16],
            mode: OpenMode::Exclusive,
        }
    }

    fn signed(mut body: Vec<u8>) -> Vec<u8> {
        body.extend_from_slice(&[0xAB; SIGNATURE_BYTES]);
        body
    }

    #[test]
    fn the_resume_key_layout_is_pinned() {
        let bytes = signed(resume().body());
        assert_eq!(bytes.len(), 94 + SIGNATURE_BYTES);
        assert_eq!(&bytes[..5], b"SVRK\x01");
        assert_eq!(&bytes[21..29], &42u64.to_be_bytes(), "handle after magic, version and pool");
        assert_eq!(bytes[93], 2, "mode byte: exclusive");
        let parsed = ResumeKey::parse(&bytes).unwrap();
        assert_eq!(parsed.content, resume());
        assert_eq!(parsed.body, &bytes[..94]);
        assert_eq!(parsed.signature, &[0xAB; SIGNATURE_BYTES]);
    }

    #[test]
    fn truncated_extended_or_foreign_bytes_are_refused_without_panicking() {
        let bytes = signed(resume().body());
        for n in [0, 1, 5, bytes.len() - 1, bytes.len() + 1] {
            let mut b = bytes.clone();
            b.resize(n, 0);
            assert!(matches!(ResumeKey::parse(&b), Err(TokenError::Length(..))), "{n} bytes");
        }
        let mut bad_mode = bytes.clone();
        bad_mode[93] = 9;
        assert_eq!(ResumeKey::parse(&bad_mode).unwrap_err(), TokenError::Mode(9));
        assert!(matches!(HandoverToken::parse(&bytes), Err(TokenError::Length(..))));
    }
}
