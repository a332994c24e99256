//! Handover tokens already used, and the pool's token clock, recorded in the
//! pool metadata (format 4).
//!
//! A handover token (live migration: the holder of a volume lets another
//! agent open it alongside) must work once. Kept in a server's memory, "used"
//! was forgotten by a restart or a takeover by a standby, and the token could
//! be used again. So a token's use is committed with the handle it opens (in
//! one commit: either both happened or neither), and every server of the pool
//! refuses it from then on.
//!
//! Bounded: a used token is forgotten once the pool's token clock has passed
//! its expiry (it is refused as expired from then on anyway), and at most
//! [`HANDOVER_USED_MAX`] unexpired used tokens are kept — a server refuses a
//! handover beyond that rather than forget a live one.
//!
//! The token clock: tokens carry wall-clock times (several servers must
//! agree on them), and wall clocks step. The ledger records a floor, the
//! latest token time any server of the pool committed; a server's token
//! clock never reads below it (and runs on its monotonic clock while it
//! runs). A used token is therefore refused forever whatever the clocks do:
//! either its record is still here, or it was forgotten by a commit that
//! raised the floor past its expiry.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{MetaChange, PoolMetadata};

/// Unexpired used tokens kept at most.
pub const HANDOVER_USED_MAX: usize = 4096;

/// The used handover tokens and the token clock's floor. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverLedger {
    /// No server's token clock reads less than this (Unix ms).
    pub clock_floor_unix_ms: u64,
    /// Used tokens whose expiry the floor has not reached, in the order they
    /// were used.
    pub used: Vec<UsedToken>,
}

/// A used handover token: its nonce and when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UsedToken {
    pub nonce: [u8; 16],
    pub expires_at_unix_ms: u64,
}

impl HandoverLedger {
    /// Whether the token with `nonce` was used.
    pub fn is_used(&self, nonce: &[u8; 16]) -> bool {
        self.used.iter().any(|u| u.nonce == *nonce)
    }

    /// The ledger's invariants: bounded, no nonce twice, nothing kept that
    /// the floor has expired.
    pub fn check(&self) -> Result<(), String> {
        if self.used.len() > HANDOVER_USED_MAX {
            return Err(format!("{} used handover tokens, more than {HANDOVER_USED_MAX}", self.used.len()));
        }
        let mut nonces = HashSet::new();
        for u in &self.used {
            if !nonces.insert(u.nonce) {
                return Err(format!("used handover token {} appears twice", hex(&u.nonce)));
            }
            if u.expires_at_unix_ms <= self.clock_floor_unix_ms {
                return Err(format!(
                    "used handover token {} expired at {} but is kept past the clock floor {}",
                    hex(&u.nonce),
                    u.expires_at_unix_ms,
                    self.clock_floor_unix_ms
                ));
            }
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl PoolMetadata {
    /// Plans a [`MetaChange::HandoverTokens`]: the token clock read
    /// `clock_unix_ms` (the floor rises to it, never falls), the used tokens
    /// that expired by then are forgotten, and `used` is recorded. Refuses a
    /// token already used or expired, and one more than
    /// [`HANDOVER_USED_MAX`].
    pub fn plan_handover_tokens(&self, clock_unix_ms: u64, used: Option<UsedToken>) -> Result<MetaChange, String> {
        let ledger = &self.handovers;
        let floor = ledger.clock_floor_unix_ms.max(clock_unix_ms);
        let forget: Vec<[u8; 16]> =
            ledger.used.iter().filter(|u| u.expires_at_unix_ms <= floor).map(|u| u.nonce).collect();
        if let Some(u) = &used {
            if ledger.is_used(&u.nonce) {
                return Err("the handover token was already used (tokens are single-use)".into());
            }
            if u.expires_at_unix_ms <= floor {
                return Err("the handover token has expired".into());
            }
            if ledger.used.len() - forget.len() >= HANDOVER_USED_MAX {
                return Err(format!(
                    "{HANDOVER_USED_MAX} handover tokens were used and have not expired yet; retry in a moment"
                ));
            }
        }
        Ok(MetaChange::HandoverTokens { clock_unix_ms: floor, used, forget })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::testing::rich_pool;

    fn token(n: u8, expires_at_unix_ms: u64) -> UsedToken {
        UsedToken { nonce: [n; 16], expires_at_unix_ms }
    }

    #[test]
    fn a_used_token_stays_refused_until_the_floor_passes_its_expiry_and_then_is_forgotten() {
        let mut meta = rich_pool();
        let change = meta.plan_handover_tokens(1_000, Some(token(1, 5_000))).unwrap();
        let undo = meta.apply(&change).unwrap();
        assert!(meta.handovers.is_used(&[1; 16]));
        meta.check().unwrap();
        assert!(meta.plan_handover_tokens(2_000, Some(token(1, 5_000))).unwrap_err().contains("already used"));
        // A clock read behind the floor does not move it back.
        let change = meta.plan_handover_tokens(500, Some(token(2, 6_000))).unwrap();
        assert_eq!(
            change,
            MetaChange::HandoverTokens { clock_unix_ms: 1_000, used: Some(token(2, 6_000)), forget: vec![] }
        );
        meta.apply(&change).unwrap();
        // Past the first's expiry: it is forgotten, and expired for good.
        let change = meta.plan_handover_tokens(5_000, None).unwrap();
        assert_eq!(change, MetaChange::HandoverTokens { clock_unix_ms: 5_000, used: None, forget: vec![[1; 16]] });
        let before = meta.clone();
        let undo2 = meta.apply(&change).unwrap();
        assert_eq!(meta.handovers, HandoverLedger { clock_floor_unix_ms: 5_000, used: vec![token(2, 6_000)] });
        assert!(meta.plan_handover_tokens(0, Some(token(1, 5_000))).unwrap_err().contains("expired"));
        meta.check().unwrap();
        meta.revert(undo2);
        assert_eq!(meta, before);
        drop(undo);
    }

    #[test]
    fn changes_that_would_break_the_ledger_do_not_apply() {
        let mut meta = rich_pool();
        meta.apply(&meta.plan_handover_tokens(1_000, Some(token(1, 5_000))).unwrap()).unwrap();
        let before = meta.clone();
        for bad in [
            // Forgetting a token before the floor passed its expiry.
            MetaChange::HandoverTokens { clock_unix_ms: 4_000, used: None, forget: vec![[1; 16]] },
            // Forgetting one that is not there.
            MetaChange::HandoverTokens { clock_unix_ms: 9_000, used: None, forget: vec![[7; 16]] },
            // Recording one twice, or one already expired.
            MetaChange::HandoverTokens { clock_unix_ms: 2_000, used: Some(token(1, 5_000)), forget: vec![] },
            MetaChange::HandoverTokens { clock_unix_ms: 2_000, used: Some(token(3, 2_000)), forget: vec![] },
            // Keeping one the floor expired.
            MetaChange::HandoverTokens { clock_unix_ms: 6_000, used: None, forget: vec![] },
        ] {
            assert!(meta.apply(&bad).is_err(), "{bad:?}");
            assert_eq!(meta, before, "{bad:?} changed nothing");
        }
    }

    #[test]
    fn the_ledger_is_bounded() {
        let mut meta = rich_pool();
        meta.handovers.used = (0..HANDOVER_USED_MAX as u32)
            .map(|i| UsedToken {
                nonce: [i.to_be_bytes(), [0; 4], [0; 4], [0; 4]].concat().try_into().unwrap(),
                expires_at_unix_ms: 10_000 + u64::from(i),
            })
            .collect();
        meta.check().unwrap();
        assert!(meta.plan_handover_tokens(1_000, Some(token(0xff, 20_000))).unwrap_err().contains("retry"));
        // Once the oldest expired there is room again.
        let change = meta.plan_handover_tokens(10_001, Some(token(0xff, 20_000))).unwrap();
        meta.apply(&change).unwrap();
        assert_eq!(meta.handovers.used.len(), HANDOVER_USED_MAX - 1);
        meta.check().unwrap();
    }
}
