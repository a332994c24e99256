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
/// This server's clock for handover tokens: wall-clock milliseconds that
/// never read below the pool's floor (the newest token time a server of the
/// pool committed, `PoolMetadata::handovers`) and, once started, run on the
/// monotonic clock.
///
/// Why: a token carries wall-clock times, because any server of the pool may
/// check it. Checked against the wall clock itself, a clock stepped back (or
/// a standby whose clock lags) would find an expired token valid again. With
/// the floor, a used token stays refused whatever the clocks do: its record
/// is kept until a commit has raised the floor past its expiry. And a token
/// refused as expired is refused again by the next server too: that refusal
/// commits the floor first (`Core::open_handover_step`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenClock {
    base_unix_ms: u64,
    base_mono_ms: u64,
}

impl TokenClock {
    /// Starts at `now` (monotonic and wall-clock ms), never below `floor_unix_ms`.
    pub fn start(now_mono_ms: u64, now_unix_ms: u64, floor_unix_ms: u64) -> TokenClock {
        TokenClock { base_unix_ms: now_unix_ms.max(floor_unix_ms), base_mono_ms: now_mono_ms }
    }

    /// The token time at monotonic `now_mono_ms`.
    pub fn now_ms(&self, now_mono_ms: u64) -> u64 {
        self.base_unix_ms + now_mono_ms.saturating_sub(self.base_mono_ms)
    }
}

/// Why a token may not be used at token time `now_ms` (before the ledger is
/// consulted): expired, or issued by a server whose clock is ahead of this
/// one's (its age cannot be measured here).
pub fn check_token_time(token: &HandoverToken, now_ms: u64) -> Result<(), String> {
    if now_ms >= token.expires_at_unix_ms {
        return Err(format!(
            "the handover token expired {} ms ago; ask the holder for a new one",
            now_ms - token.expires_at_unix_ms
        ));
    }
    if token.issued_at_unix_ms > now_ms {
        return Err(format!(
            "the handover token was issued {} ms ahead of this server's clock (the pool's servers' clocks \
             disagree), so its age cannot be told; ask the holder for a new one",
            token.issued_at_unix_ms - now_ms
        ));
    }
    Ok(())
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
    fn the_token_clock_never_reads_below_the_floor_and_ignores_wall_clock_steps() {
        let clock = TokenClock::start(500, 10_000, 20_000);
        assert_eq!(clock.now_ms(500), 20_000, "a wall clock behind the pool's floor starts at the floor");
        assert_eq!(clock.now_ms(1_500), 21_000, "then runs on the monotonic clock");
        assert_eq!(TokenClock::start(0, 30_000, 20_000).now_ms(0), 30_000);
        let token = HandoverToken {
            pool: [1; 16],
            handle: 42,
            volume: 3,
            from_key: [5; 32],
            to_key: [8; 32],
            mode: OpenMode::Exclusive,
            issued_at_unix_ms: 21_000,
            expires_at_unix_ms: 21_000 + HANDOVER_TOKEN_MS,
            nonce: [4; 16],
        };
        check_token_time(&token, 21_000).unwrap();
        assert!(check_token_time(&token, 21_000 + HANDOVER_TOKEN_MS).unwrap_err().contains("expired"));
        assert!(check_token_time(&token, 20_500).unwrap_err().contains("ahead"));
    }
}
