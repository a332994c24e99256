//! Signing and checking resume keys and handover tokens (their byte layout
//! is `volume_format::control::resume`).
//!
//! Why signed rather than random: the server may restart or fail over between
//! issuing a key and seeing it again. The handle itself lives in the pool
//! metadata; the key only has to prove that *this server's key* issued it for
//! *this* handle, pool and agent, which any server holding the pool's key can
//! check without having kept the key.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use volume_format::control::resume::Signed;
pub use volume_format::control::resume::{HandoverToken, ResumeKey, TokenError};

fn sign(key: &SigningKey, mut body: Vec<u8>) -> Vec<u8> {
    let sig = key.sign(&body);
    body.extend_from_slice(&sig.to_bytes());
    body
}

fn check<T>(signed: Signed<'_, T>, server: &VerifyingKey) -> Result<T, TokenError> {
    let sig = Signature::from_bytes(signed.signature);
    server.verify(signed.body, &sig).map_err(|_| TokenError::Signature)?;
    Ok(signed.content)
}

/// Signs resume keys and checks them.
pub trait SignedResumeKey: Sized {
    fn sign(&self, key: &SigningKey) -> Vec<u8>;
    fn verify(bytes: &[u8], server: &VerifyingKey) -> Result<Self, TokenError>;
}

impl SignedResumeKey for ResumeKey {
    fn sign(&self, key: &SigningKey) -> Vec<u8> {
        sign(key, self.body())
    }

    fn verify(bytes: &[u8], server: &VerifyingKey) -> Result<ResumeKey, TokenError> {
        check(ResumeKey::parse(bytes)?, server)
    }
}

impl SignedResumeKey for HandoverToken {
    fn sign(&self, key: &SigningKey) -> Vec<u8> {
        sign(key, self.body())
    }

    fn verify(bytes: &[u8], server: &VerifyingKey) -> Result<HandoverToken, TokenError> {
        check(HandoverToken::parse(bytes)?, server)
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
    use volume_format::control::messages::OpenMode;

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
