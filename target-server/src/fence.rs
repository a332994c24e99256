//! The fencing state of one target, as a plain type: minimum generations
//! per holder, the connections admitted under a capability, and what each
//! may do now.
//!
//! Why a plain type: every rule that keeps an excluded holder's writes off
//! the device lives here — a capability below its holder's minimum is
//! refused at the handshake, a raise revokes the older connections at once
//! (their new requests are refused, even ones already read), and the
//! acknowledgement waits until none of them is open any more. Tests drive
//! it request by request without sockets or a runtime; [`crate::fencer`]
//! adds the waiting and the signals.
//!
//! A connection counts as open until the server dropped everything of it
//! (its device and every request it started): the server closes a revoked
//! connection only after its in-flight requests finished, so "no older
//! connection open" means "nothing older is left to land".

use std::collections::{BTreeMap, HashMap};

use volume_format::capability::{Capability, Holder, CAPABILITY_LIFETIME_MAX_SECS, CLOCK_SKEW_MAX_SECS};
use volume_format::label::ByteRange;

/// Most holders with a raised minimum kept at once. A raise is kept for a
/// capability's longest lifetime (then every capability it refuses has
/// expired anyway); a pool that breaks more handles than this in that time
/// gets its raises refused (the metadata server then falls back to the
/// timing rules) rather than a table without bound.
pub const FENCES_MAX: usize = 1 << 20;
/// Most connections admitted at once (the NBD listener's own bound is
/// smaller; this one guards the table).
pub const CONNECTIONS_MAX: usize = 1 << 16;

/// One connection admitted under a capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What a request does, as far as fencing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reads, block status, cache hints, flush: allowed to a connection that
    /// is not revoked.
    Read,
    /// Write, trim, write zeroes of `[offset, offset + len)`: also inside
    /// the capability's writable ranges.
    Write { offset: u64, len: u64 },
}

/// Why a connection or a request was refused. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{holder} was fenced: its capability has generation {generation}, this device now requires at least {min_generation}; the metadata server gave its access to someone else — reopen the volume")]
    Fenced { holder: Holder, generation: u64, min_generation: u64 },
    #[error("{holder} may not write [{offset}, +{len}): outside the ranges of its capability; ask the metadata server for a fresh volume description")]
    OutsideRanges { holder: Holder, offset: u64, len: u64 },
    #[error("connection {0:?} is unknown to the target (closed)")]
    UnknownConnection(ConnId),
    #[error("this target already has {max} connections under capabilities; close some or raise the limit")]
    TooManyConnections { max: usize },
    #[error("this target keeps {max} raised generations already; refusing to raise another (the metadata server falls back to the timing rules)")]
    TooManyFences { max: usize },
}

/// A holder's raised minimum and when it was raised (for pruning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub min_generation: u64,
    pub raised_unix_secs: u64,
}

#[derive(Debug, Clone)]
struct Conn {
    holder: Holder,
    generation: u64,
    writable: Vec<ByteRange>,
    in_flight: u64,
    revoked: bool,
}

/// The fencing state of one target.
#[derive(Debug, Default)]
pub struct FenceTable {
    fences: BTreeMap<Holder, Fence>,
    connections: HashMap<ConnId, Conn>,
    next_id: u64,
}

impl FenceTable {
    /// A table starting from persisted fences.
    pub fn with_fences(fences: impl IntoIterator<Item = (Holder, Fence)>) -> FenceTable {
        FenceTable { fences: fences.into_iter().collect(), ..FenceTable::default() }
    }

    /// The lowest generation `holder` may connect with now.
    pub fn min_generation(&self, holder: Holder) -> u64 {
        self.fences.get(&holder).map_or(0, |f| f.min_generation)
    }

    pub fn fences(&self) -> impl Iterator<Item = (Holder, Fence)> + '_ {
        self.fences.iter().map(|(h, f)| (*h, *f))
    }

    /// Admits a connection under an already verified capability.
    pub fn admit(&mut self, capability: &Capability) -> Result<ConnId, Refusal> {
        let min_generation = self.min_generation(capability.holder);
        if capability.generation < min_generation {
            return Err(Refusal::Fenced {
                holder: capability.holder,
                generation: capability.generation,
                min_generation,
            });
        }
        if self.connections.len() >= CONNECTIONS_MAX {
            return Err(Refusal::TooManyConnections { max: CONNECTIONS_MAX });
        }
        self.next_id += 1;
        let id = ConnId(self.next_id);
        self.connections.insert(
            id,
            Conn {
                holder: capability.holder,
                generation: capability.generation,
                writable: capability.writable.clone(),
                in_flight: 0,
                revoked: false,
            },
        );
        Ok(id)
    }

    /// A request of connection `id` starts; pair with [`FenceTable::end`].
    pub fn begin(&mut self, id: ConnId, op: Op) -> Result<(), Refusal> {
        let min_generation = self.min_generation_of(id)?;
        let conn = self.connections.get_mut(&id).ok_or(Refusal::UnknownConnection(id))?;
        if conn.revoked || conn.generation < min_generation {
            return Err(Refusal::Fenced { holder: conn.holder, generation: conn.generation, min_generation });
        }
        if let Op::Write { offset, len } = op {
            let inside = offset
                .checked_add(len)
                .is_some_and(|end| conn.writable.iter().any(|r| r.start <= offset && end <= r.end));
            if !inside {
                return Err(Refusal::OutsideRanges { holder: conn.holder, offset, len });
            }
        }
        conn.in_flight += 1;
        Ok(())
    }

    fn min_generation_of(&self, id: ConnId) -> Result<u64, Refusal> {
        let conn = self.connections.get(&id).ok_or(Refusal::UnknownConnection(id))?;
        Ok(self.min_generation(conn.holder))
    }

    /// A request begun with [`FenceTable::begin`] finished (landed or failed).
    pub fn end(&mut self, id: ConnId) {
        if let Some(conn) = self.connections.get_mut(&id) {
            conn.in_flight = conn.in_flight.saturating_sub(1);
        }
    }

    /// Requests of connection `id` still running.
    pub fn in_flight(&self, id: ConnId) -> u64 {
        self.connections.get(&id).map_or(0, |c| c.in_flight)
    }

    /// The connection is gone, with every request it started.
    pub fn close(&mut self, id: ConnId) {
        self.connections.remove(&id);
    }

    /// Raises `holder`'s minimum to `min_generation` (never lowers it) and
    /// returns the connections it revokes now (the caller closes them).
    pub fn raise(&mut self, holder: Holder, min_generation: u64, now_unix_secs: u64) -> Result<Vec<ConnId>, Refusal> {
        match self.fences.get_mut(&holder) {
            Some(fence) if fence.min_generation >= min_generation => {}
            Some(fence) => *fence = Fence { min_generation, raised_unix_secs: now_unix_secs },
            None => {
                self.prune(now_unix_secs);
                if self.fences.len() >= FENCES_MAX {
                    return Err(Refusal::TooManyFences { max: FENCES_MAX });
                }
                self.fences.insert(holder, Fence { min_generation, raised_unix_secs: now_unix_secs });
            }
        }
        let min_generation = self.min_generation(holder);
        let mut revoked = Vec::new();
        for (id, conn) in &mut self.connections {
            if conn.holder == holder && conn.generation < min_generation && !conn.revoked {
                conn.revoked = true;
                revoked.push(*id);
            }
        }
        revoked.sort();
        Ok(revoked)
    }

    /// Connections of `holder` below `min_generation` still open: the
    /// acknowledgement of a raise waits until this is 0.
    pub fn pending(&self, holder: Holder, min_generation: u64) -> usize {
        self.connections.values().filter(|c| c.holder == holder && c.generation < min_generation).count()
    }

    /// Forgets raises older than any capability they could refuse (the
    /// longest lifetime plus the clock skew): such a capability has expired
    /// and is refused for that. The server's own entry is never dropped.
    pub fn prune(&mut self, now_unix_secs: u64) {
        let keep_secs = CAPABILITY_LIFETIME_MAX_SECS + 2 * CLOCK_SKEW_MAX_SECS;
        self.fences.retain(|holder, fence| {
            *holder == Holder::Server || fence.raised_unix_secs.saturating_add(keep_secs) >= now_unix_secs
        });
    }
}

#[cfg(test)]
mod tests {
    use volume_format::HandleId;

    use super::*;

    fn cap(handle: u64, generation: u64) -> Capability {
        Capability {
            holder: Holder::Handle(HandleId(handle)),
            generation,
            device_uuid: None,
            writable: vec![ByteRange::new(4096, 8192)],
            issued_unix_secs: 0,
            expires_unix_secs: 0,
        }
    }

    const H5: Holder = Holder::Handle(HandleId(5));

    #[test]
    fn writes_inside_the_ranges_of_a_current_capability_pass() {
        let mut t = FenceTable::default();
        let c = t.admit(&cap(5, 1)).unwrap();
        t.begin(c, Op::Write { offset: 4096, len: 4096 }).unwrap();
        t.begin(c, Op::Read).unwrap();
        assert_eq!(t.in_flight(c), 2);
        t.end(c);
        t.end(c);
        assert_eq!(t.in_flight(c), 0);
    }

    #[test]
    fn writes_outside_the_ranges_are_refused() {
        let mut t = FenceTable::default();
        let c = t.admit(&cap(5, 1)).unwrap();
        for (offset, len) in [(0, 4096), (4096, 4097), (8192, 1), (u64::MAX, 2)] {
            let err = t.begin(c, Op::Write { offset, len }).unwrap_err();
            assert!(matches!(err, Refusal::OutsideRanges { .. }), "{err}");
        }
        assert_eq!(t.in_flight(c), 0);
        t.begin(c, Op::Read).unwrap();
    }

    #[test]
    fn a_raise_revokes_older_connections_and_waits_for_them_to_close() {
        let mut t = FenceTable::default();
        let old = t.admit(&cap(5, 1)).unwrap();
        let other_holder = t.admit(&cap(6, 1)).unwrap();
        t.begin(old, Op::Write { offset: 4096, len: 512 }).unwrap();
        assert_eq!(t.raise(H5, 2, 100).unwrap(), vec![old]);
        // Already running: it finishes; anything new is refused.
        let err = t.begin(old, Op::Read).unwrap_err();
        assert_eq!(err, Refusal::Fenced { holder: H5, generation: 1, min_generation: 2 });
        assert!(err.to_string().contains("reopen the volume"), "{err}");
        assert_eq!(t.pending(H5, 2), 1);
        t.end(old);
        assert_eq!(t.pending(H5, 2), 1, "open until the server closed it");
        t.close(old);
        assert_eq!(t.pending(H5, 2), 0);
        // Other holders are untouched.
        t.begin(other_holder, Op::Write { offset: 4096, len: 512 }).unwrap();
    }

    #[test]
    fn an_old_generation_is_refused_at_connect_and_a_newer_one_admitted() {
        let mut t = FenceTable::default();
        t.raise(H5, 3, 100).unwrap();
        let err = t.admit(&cap(5, 2)).unwrap_err();
        assert!(matches!(err, Refusal::Fenced { generation: 2, min_generation: 3, .. }), "{err}");
        let c = t.admit(&cap(5, 3)).unwrap();
        t.begin(c, Op::Write { offset: 4096, len: 1 }).unwrap();
    }

    #[test]
    fn raises_never_lower_and_repeat_harmlessly() {
        let mut t = FenceTable::default();
        let c = t.admit(&cap(5, 4)).unwrap();
        assert!(t.raise(H5, 4, 100).unwrap().is_empty());
        assert_eq!(t.raise(H5, 5, 100).unwrap(), vec![c]);
        assert!(t.raise(H5, 5, 200).unwrap().is_empty(), "already revoked");
        assert!(t.raise(H5, 2, 300).unwrap().is_empty());
        assert_eq!(t.min_generation(H5), 5);
        assert_eq!(t.fences().next().unwrap().1.raised_unix_secs, 100);
    }

    #[test]
    fn a_connection_admitted_with_a_stale_table_is_caught_by_the_next_request() {
        // Admission and raise race only through the table: whichever comes
        // second sees the other.
        let mut t = FenceTable::default();
        let c = t.admit(&cap(5, 1)).unwrap();
        t.raise(H5, 2, 0).unwrap();
        assert!(t.begin(c, Op::Write { offset: 4096, len: 1 }).is_err());
        assert_eq!(t.in_flight(c), 0);
    }

    #[test]
    fn persisted_fences_refuse_after_a_restart_and_old_ones_are_pruned() {
        let fence = Fence { min_generation: 7, raised_unix_secs: 1_000 };
        let mut t = FenceTable::with_fences([(H5, fence), (Holder::Server, fence)]);
        assert!(t.admit(&cap(5, 6)).is_err());
        t.prune(1_000 + CAPABILITY_LIFETIME_MAX_SECS);
        assert_eq!(t.min_generation(H5), 7);
        t.prune(1_000 + CAPABILITY_LIFETIME_MAX_SECS + 2 * CLOCK_SKEW_MAX_SECS + 1);
        assert_eq!(t.min_generation(H5), 0);
        assert_eq!(t.min_generation(Holder::Server), 7, "the server's entry is kept");
    }

    #[test]
    fn unknown_connections_are_refused_not_panicked_on() {
        let mut t = FenceTable::default();
        assert_eq!(t.begin(ConnId(9), Op::Read), Err(Refusal::UnknownConnection(ConnId(9))));
        t.end(ConnId(9));
        t.close(ConnId(9));
    }
}
