//! Resume keys and handover tokens: what the server signs so that an agent
//! can prove, on a later connection, which handle it holds.
//!
//! Why signed rather than random: the server may restart or fail over between
//! issuing a key and seeing it again. The handle itself lives in the pool
//! metadata; the key only has to prove that *this server's key* issued it for
//! *this* handle, pool and agent, which any server holding the pool's key can
//! check without having kept the key.
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
//! The signature covers everything before it, magic included, so a resume
//! key can never be passed off as a handover token or the other way round.
//! Decoding never panics on any input: every length is checked first.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use volume_format::control::messages::OpenMode;

const RESUME_MAGIC: &[u8; 4] = b"SVRK";
const HANDOVER_MAGIC: &[u8; 4] = b"SVHT";
const VERSION: u8 = 1;
const SIG_BYTES: usize = 64;
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

fn sign(key: &SigningKey, mut body: Vec<u8>) -> Vec<u8> {
    let sig = key.sign(&body);
    body.extend_from_slice(&sig.to_bytes());
    body
}

/// Checks length, magic and signature; returns the body after the magic and
/// version.
fn open<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    body_bytes: usize,
    what: &'static str,
    server: &VerifyingKey,
) -> Result<&'a [u8], TokenError> {
    if bytes.len() != body_bytes + SIG_BYTES {
        return Err(TokenError::Length(bytes.len(), body_bytes + SIG_BYTES, what));
    }
    let (body, sig) = bytes.split_at(body_bytes);
    if &body[..4] != magic || body[4] != VERSION {
        return Err(TokenError::Magic(what));
    }
    let sig = Signature::from_slice(sig).map_err(|_| TokenError::Signature)?;
    server.verify(body, &sig).map_err(|_| TokenError::Signature)?;
    Ok(&body[5..])
}

impl ResumeKey {
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(RESUME_BODY_BYTES + SIG_BYTES);
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
        sign(key, b)
    }

    pub fn verify(bytes: &[u8], server: &VerifyingKey) -> Result<ResumeKey, TokenError> {
        let mut r = Reader(open(bytes, RESUME_MAGIC, RESUME_BODY_BYTES, "resume key", server)?);
        Ok(ResumeKey {
            pool: r.take(),
            handle: r.u64(),
            volume: r.u64(),
            opened_at_unix_secs: r.u64(),
            agent_key: r.take(),
            agent_instance: r.take(),
            mode: byte_mode(r.u8())?,
        })
    }
}

impl HandoverToken {
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(HANDOVER_BODY_BYTES + SIG_BYTES);
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
        sign(key, b)
    }

    pub fn verify(bytes: &[u8], server: &VerifyingKey) -> Result<HandoverToken, TokenError> {
        let mut r = Reader(open(bytes, HANDOVER_MAGIC, HANDOVER_BODY_BYTES, "handover token", server)?);
        Ok(HandoverToken {
            pool: r.take(),
            handle: r.u64(),
            volume: r.u64(),
            from_key: r.take(),
            to_key: r.take(),
            mode: byte_mode(r.u8())?,
            issued_at_unix_ms: r.u64(),
            expires_at_unix_ms: r.u64(),
            nonce: r.take(),
        })
    }
}

/// How long a handover token is valid after it was issued: long enough to
/// copy it to the other host and attach, short enough that a leaked token is
/// soon worthless.
pub const HANDOVER_TOKEN_MS: u64 = 120_000;
/// Used tokens remembered at once (they are forgotten when they expire, so
/// only a flood of handovers within [`HANDOVER_TOKEN_MS`] reaches it).
pub const HANDOVER_USED_MAX: usize = 4096;

/// Remembers which handover tokens were used, so each works once.
///
/// Why tokens from before this server started are refused: the ledger is in
/// memory, so after a restart it cannot tell a used token from an unused
/// one. Refusing them all keeps "single use" true across restarts and
/// failovers; the holder simply issues a new token.
#[derive(Debug)]
pub struct HandoverLedger {
    started_unix_ms: u64,
    used: std::collections::BTreeMap<[u8; 16], u64>,
}

impl HandoverLedger {
    pub fn new(started_unix_ms: u64) -> HandoverLedger {
        HandoverLedger { started_unix_ms, used: Default::default() }
    }

    /// Whether `token` may be used at `now_unix_ms`; does not mark it used.
    pub fn check(&self, token: &HandoverToken, now_unix_ms: u64) -> Result<(), String> {
        if now_unix_ms >= token.expires_at_unix_ms {
            return Err(format!(
                "the handover token expired {} ms ago; ask the holder for a new one",
                now_unix_ms - token.expires_at_unix_ms
            ));
        }
        if token.issued_at_unix_ms < self.started_unix_ms {
            return Err("the handover token was issued before the metadata server restarted, so it cannot be \
                 told apart from a used one; ask the holder for a new one"
                .into());
        }
        if self.used.contains_key(&token.nonce) {
            return Err(
                "the handover token was already used (tokens are single-use); ask the holder for a new one".into()
            );
        }
        Ok(())
    }

    /// Marks `token` used (after the handover was committed).
    pub fn mark_used(&mut self, token: &HandoverToken, now_unix_ms: u64) {
        self.used.retain(|_, expires| *expires > now_unix_ms);
        if self.used.len() >= HANDOVER_USED_MAX {
            // Forgetting one early could let it be replayed: refuse instead by
            // treating the oldest as expired only when it truly is (above);
            // here the ledger is full of live tokens, so drop the soonest to
            // expire, which has the least time left to be replayed.
            if let Some(nonce) = self.used.iter().min_by_key(|(_, e)| **e).map(|(n, _)| *n) {
                self.used.remove(&nonce);
            }
        }
        self.used.insert(token.nonce, token.expires_at_unix_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (SigningKey, SigningKey) {
        (SigningKey::from_bytes(&[7; 32]), SigningKey::from_bytes(&[9; 32]))
    }

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

    #[test]
    fn resume_key_round_trips_and_refuses_forgery_alteration_and_truncation() {
        let (server, other) = keys();
        let bytes = resume().sign(&server);
        assert_eq!(ResumeKey::verify(&bytes, &server.verifying_key()), Ok(resume()));
        assert_eq!(ResumeKey::verify(&resume().sign(&other), &server.verifying_key()), Err(TokenError::Signature));
        for i in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 0x01;
            assert!(ResumeKey::verify(&altered, &server.verifying_key()).is_err(), "flipped byte {i}");
        }
        for n in [0, 1, 5, bytes.len() - 1, bytes.len() + 1] {
            let mut b = bytes.clone();
            b.resize(n, 0);
            assert!(matches!(ResumeKey::verify(&b, &server.verifying_key()), Err(TokenError::Length(..))));
        }
    }

    #[test]
    fn a_resume_key_is_not_a_handover_token() {
        let (server, _) = keys();
        let token = HandoverToken {
            pool: [1; 16],
            handle: 42,
            volume: 3,
            from_key: [5; 32],
            to_key: [8; 32],
            mode: OpenMode::Exclusive,
            issued_at_unix_ms: 1,
            expires_at_unix_ms: 2,
            nonce: [4; 16],
        };
        let bytes = token.sign(&server);
        assert_eq!(HandoverToken::verify(&bytes, &server.verifying_key()), Ok(token));
        assert!(ResumeKey::verify(&bytes, &server.verifying_key()).is_err());
        assert!(HandoverToken::verify(&resume().sign(&server), &server.verifying_key()).is_err());
    }

    #[test]
    fn a_handover_token_works_once_before_it_expires_and_never_from_a_previous_run() {
        let token = HandoverToken {
            pool: [1; 16],
            handle: 42,
            volume: 3,
            from_key: [5; 32],
            to_key: [8; 32],
            mode: OpenMode::Exclusive,
            issued_at_unix_ms: 1_000,
            expires_at_unix_ms: 1_000 + HANDOVER_TOKEN_MS,
            nonce: [4; 16],
        };
        let mut ledger = HandoverLedger::new(500);
        ledger.check(&token, 2_000).unwrap();
        ledger.mark_used(&token, 2_000);
        assert!(ledger.check(&token, 2_001).unwrap_err().contains("already used"));
        let fresh = HandoverToken { nonce: [5; 16], ..token.clone() };
        assert!(ledger.check(&fresh, 1_000 + HANDOVER_TOKEN_MS).unwrap_err().contains("expired"));
        ledger.check(&fresh, 1_000 + HANDOVER_TOKEN_MS - 1).unwrap();
        let restarted = HandoverLedger::new(1_001);
        assert!(restarted.check(&fresh, 2_000).unwrap_err().contains("restarted"));
    }
}
