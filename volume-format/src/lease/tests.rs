//! The lease format, the majority rule, and a seeded model of several
//! servers racing for the lease over shared copies: at no instant may two
//! servers be allowed to commit, whatever the I/O latencies (each within
//! the I/O timeout), pauses and crashes.

use proptest::prelude::*;

use super::*;

const POOL: Uuid = Uuid::from_u128(42);
const T: u64 = 100;

fn me(host_id: u32) -> LeaseRecord {
    LeaseRecord {
        pool_uuid: POOL,
        host_id,
        instance: [host_id as u8; 16],
        name: format!("mds-{host_id}"),
        generation: 0,
        counter: 0,
        io_timeout_ms: T as u32,
        since_unix_ms: 1,
        handoff_to: 0,
        addrs: vec![format!("unix:/run/mds-{host_id}.sock")],
        role: ServerRole::Standby,
    }
}

#[test]
fn sectors_round_trip_and_refuse_damage() {
    let r = me(3);
    let sector = encode_sector(&r).unwrap();
    assert_eq!(sector.len() as u64, LEASE_SECTOR_BYTES);
    assert_eq!(decode_sector(&sector, POOL).unwrap(), Some(r.clone()));
    assert_eq!(decode_sector(&vec![0; LEASE_SECTOR_BYTES as usize], POOL).unwrap(), None, "never written = free");
    for i in [0, 9, 13, 17, 25, 200, 4095] {
        let mut bad = sector.clone();
        bad[i] ^= 0x10;
        assert!(decode_sector(&bad, POOL).is_err(), "flipped byte {i}");
    }
    assert!(matches!(decode_sector(&sector, Uuid::from_u128(7)), Err(LeaseError::WrongPool { .. })));
    assert!(matches!(decode_sector(&sector[..100], POOL), Err(LeaseError::Size(100))));
}

#[test]
fn a_majority_decides() {
    let a = me(1);
    let b = me(2);
    assert_eq!(majority(&[Ok(Some(a.clone())), Ok(Some(a.clone())), Ok(Some(b.clone()))]), Ok(Some(a.clone())));
    assert_eq!(majority(&[Ok(None), Ok(None), Ok(Some(b.clone()))]), Ok(None));
    assert!(majority(&[Ok(None), Ok(Some(a.clone())), Ok(Some(b.clone()))]).is_err());
    assert!(majority(&[Err("gone".into()), Err("gone".into()), Ok(Some(a))]).is_err());
}

/// An owner that died in the middle of renewals left its copies at three
/// different counters: still one holding, so a standby can watch it expire
/// and take over (requiring equal records left the lease with no majority
/// for good: found by the simulator's two-server world, seed
/// 264961850341265).
#[test]
fn copies_of_one_holding_at_different_counters_agree_on_the_newest() {
    let at = |counter: u64| LeaseRecord { counter, generation: 1, ..me(2) };
    let copies = [Ok(Some(at(28))), Ok(Some(at(29))), Ok(Some(at(25)))];
    assert_eq!(majority(&copies), Ok(Some(at(29))));
    let other_holding = LeaseRecord { generation: 2, ..at(30) };
    assert!(majority(&[Ok(Some(at(28))), Ok(Some(other_holding)), Err("gone".into())]).is_err());

    let mut m = LeaseMachine::new(me(1), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    m.reading(0);
    m.read_done(5, &copies);
    for now in (T..=6 * T).step_by(T as usize) {
        m.reading(now);
        if let LeaseAction::Write(rec) = m.read_done(now + 5, &copies) {
            assert_eq!((rec.host_id, rec.generation), (1, 2), "takes over the dead owner's holding");
            return;
        }
    }
    panic!("the standby never took the lease over: {:?}", m.phase);
}

#[test]
fn a_free_lease_is_acquired_after_the_wait_and_renewed() {
    let mut m = LeaseMachine::new(me(1), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    assert_eq!(m.next(0), LeaseAction::Read);
    m.reading(0);
    let LeaseAction::Write(rec) = m.read_done(5, &[Ok(None), Ok(None), Ok(None)]) else { panic!() };
    assert_eq!((rec.generation, rec.role), (1, ServerRole::Active));
    assert_eq!(m.write_done(10, &rec, 3, 3), LeaseAction::WaitUntil(5 + 4 * T));
    assert!(!m.may_commit(10));
    let at = 5 + 4 * T;
    m.reading(at);
    let done = [Ok(Some(rec.clone())), Ok(Some(rec.clone())), Ok(Some(rec.clone()))];
    // Ours: renewed at once (that read counts), and the window opens when
    // the renewal's write is done.
    let LeaseAction::Write(renewed) = m.read_done(at + 1, &done) else { panic!("renews at once") };
    assert_eq!(renewed.counter, 1);
    assert!(!m.may_commit(at + 1), "not before the renewal is written");
    m.write_done(at + 2, &renewed, 2, 3);
    assert!(m.may_commit(at + 2) && m.may_commit(at + 3 * T - 1) && !m.may_commit(at + 3 * T));
    // The next renewal extends it.
    m.reading(at + T);
    let renewed_done = [Ok(Some(renewed.clone())), Ok(Some(renewed.clone())), Ok(Some(renewed.clone()))];
    let LeaseAction::Write(again) = m.read_done(at + T + 1, &renewed_done) else { panic!() };
    m.write_done(at + T + 2, &again, 3, 3);
    assert!(m.may_commit(at + 4 * T - 1) && !m.may_commit(at + 4 * T));
}

#[test]
fn a_released_lease_is_acquired_with_the_next_generation_not_from_one_again() {
    // Fencing devices refuse server capabilities below the newest generation
    // they were fenced to: the generation must go up across a release too.
    let mut released = me(2);
    (released.host_id, released.generation, released.role) = (0, 7, ServerRole::Stopped);
    let mut m = LeaseMachine::new(me(1), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    m.reading(0);
    let copies = [Ok(Some(released.clone())), Ok(None), Ok(Some(released))];
    let LeaseAction::Write(rec) = m.read_done(5, &copies) else { panic!("a free lease is acquired") };
    assert_eq!(rec.generation, 8);
}

#[test]
fn a_new_owner_commits_only_after_the_old_owners_slowest_device_write() {
    // The old owner may have renewed just before the acquirer's record
    // went over its own, then sent writes for 3T that land up to D later:
    // after the read-back the new owner waits D before it commits.
    let d = 7 * T;
    let mut m = LeaseMachine::new(me(1), LeaseTiming { io_timeout_ms: T, device_request_max_ms: d });
    m.reading(0);
    let LeaseAction::Write(rec) = m.read_done(5, &[Ok(None), Ok(None), Ok(None)]) else { panic!() };
    assert_eq!(m.write_done(10, &rec, 3, 3), LeaseAction::WaitUntil(5 + 4 * T));
    let at = 5 + 4 * T;
    m.reading(at);
    let done = [Ok(Some(rec.clone())), Ok(Some(rec.clone())), Ok(Some(rec.clone()))];
    let LeaseAction::Write(renewed) = m.read_done(at + 1, &done) else { panic!("renews at once") };
    m.write_done(at + 2, &renewed, 3, 3);
    assert!(!m.may_commit(at + 2), "not within D of the read-back");
    // Renewals go on meanwhile.
    let mut last = renewed;
    let mut now = at + 2;
    while now < at + 1 + d {
        now += T;
        m.reading(now);
        let seen = [Ok(Some(last.clone())), Ok(Some(last.clone())), Ok(Some(last.clone()))];
        let LeaseAction::Write(next) = m.read_done(now + 1, &seen) else { panic!("renews") };
        m.write_done(now + 2, &next, 3, 3);
        last = next;
        assert_eq!(m.may_commit(now + 2), now + 2 >= at + 1 + d, "at {}", now + 2);
    }
}

#[test]
fn a_held_lease_is_taken_only_after_it_stayed_unchanged_for_the_expiry() {
    let mut owner = me(1);
    owner.generation = 4;
    owner.role = ServerRole::Active;
    let mut m = LeaseMachine::new(me(2), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    let seen = |r: &LeaseRecord| [Ok(Some(r.clone())), Ok(Some(r.clone())), Ok(Some(r.clone()))];
    m.reading(0);
    assert!(matches!(m.read_done(0, &seen(&owner)), LeaseAction::WaitUntil(_)));
    // It renews: the watch starts over.
    owner.counter += 1;
    m.reading(4 * T);
    m.read_done(4 * T, &seen(&owner));
    m.reading(8 * T);
    assert!(matches!(m.read_done(8 * T, &seen(&owner)), LeaseAction::WaitUntil(_)), "4T unchanged is not enough");
    m.reading(9 * T);
    let LeaseAction::Write(rec) = m.read_done(9 * T, &seen(&owner)) else { panic!("5T unchanged: take over") };
    assert_eq!(rec.generation, 5);
}

#[test]
fn an_owner_that_finds_another_record_has_lost_and_stops() {
    let mut m = LeaseMachine::new(me(1), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    m.reading(0);
    let LeaseAction::Write(rec) = m.read_done(0, &[Ok(None), Ok(None), Ok(None)]) else { panic!() };
    m.write_done(1, &rec, 3, 3);
    m.reading(4 * T);
    let all = |r: &LeaseRecord| [Ok(Some(r.clone())), Ok(Some(r.clone())), Ok(Some(r.clone()))];
    m.read_done(4 * T, &all(&rec));
    m.reading(4 * T + 1);
    let LeaseAction::Write(renewed) = m.read_done(4 * T + 1, &all(&rec)) else { panic!() };
    m.write_done(4 * T + 2, &renewed, 3, 3);
    assert!(m.may_commit(4 * T + 3));
    let mut other = me(2);
    other.generation = 2;
    m.reading(5 * T);
    m.read_done(5 * T, &all(&other));
    assert!(matches!(&m.phase, LeasePhase::Lost { why } if why.contains("mds-2")), "{:?}", m.phase);
    assert!(!m.may_commit(5 * T));
}

#[test]
fn a_handoff_is_taken_at_once_by_the_named_standby_only() {
    let mut owner = me(1);
    owner.generation = 3;
    owner.handoff_to = 2;
    let all = |r: &LeaseRecord| [Ok(Some(r.clone())), Ok(Some(r.clone())), Ok(Some(r.clone()))];
    let mut named = LeaseMachine::new(me(2), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    named.reading(0);
    let LeaseAction::Write(rec) = named.read_done(0, &all(&owner)) else { panic!("takes it") };
    assert_eq!(named.write_done(1, &rec, 3, 3), LeaseAction::Read, "no acquire wait after a handoff");
    let mut other = LeaseMachine::new(me(3), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    other.reading(0);
    assert!(matches!(other.read_done(0, &all(&owner)), LeaseAction::WaitUntil(_)));
}

/// Simulator exploration seed 139267659683386: server 1 was handed the
/// lease (generation 3), then stale copies of the old owner's renewal and
/// handoff records landed over two of its copies; it read a majority for
/// the old holding and lost the lease, and read the same stale handoff
/// record naming it again. Taken at once, with generation 3 again, it
/// served while a journal write of its previous term was still in flight.
/// Now it acquires above every generation it saw, and commits nothing
/// before `D` after its last term ended.
#[test]
fn a_server_handed_the_lease_again_waits_for_its_own_last_terms_writes() {
    let d = 7 * T;
    let timing = LeaseTiming { io_timeout_ms: T, device_request_max_ms: d };
    let mut old = me(2);
    old.generation = 2;
    old.counter = 34;
    old.handoff_to = 1;
    let mut m = LeaseMachine::new(me(1), timing);
    let all = |r: &LeaseRecord| [Ok(Some(r.clone())), Ok(Some(r.clone())), Ok(Some(r.clone()))];
    m.reading(0);
    let LeaseAction::Write(first) = m.read_done(1, &all(&old)) else { panic!("takes the handoff") };
    assert_eq!(first.generation, 3);
    m.write_done(2, &first, 3, 3);
    m.reading(3);
    let LeaseAction::Write(renewed) = m.read_done(4, &all(&first)) else { panic!("renews") };
    m.write_done(5, &renewed, 3, 3);
    assert!(m.may_commit(6), "a handed lease is served at once");
    // Stale writes of the old owner land over two copies: lost.
    let stale = [
        Ok(Some(old.clone())),
        Ok(Some(LeaseRecord { counter: 32, handoff_to: 0, ..old.clone() })),
        Ok(Some(renewed.clone())),
    ];
    m.reading(T);
    m.read_done(T + 1, &stale);
    assert!(matches!(m.phase, LeasePhase::Lost { .. }), "{:?}", m.phase);
    let ended = T + 10;
    m.stand_by(ended);
    // The same stale handoff record names it again.
    m.reading(ended + 1);
    let LeaseAction::Write(again) = m.read_done(ended + 2, &stale) else { panic!("takes the handoff again") };
    assert_eq!(again.generation, 4, "above the generation it held, which one copy still shows");
    m.write_done(ended + 3, &again, 3, 3);
    let mut last = again;
    let mut now = ended + 3;
    let mut served = false;
    while now < ended + d + 3 * T {
        m.reading(now);
        let LeaseAction::Write(next) = m.read_done(now + 1, &all(&last)) else { panic!("renews") };
        m.write_done(now + 2, &next, 3, 3);
        last = next;
        assert_eq!(m.may_commit(now + 2), now + 2 >= ended + d, "at {}", now + 2);
        served |= m.may_commit(now + 2);
        now += T;
    }
    assert!(served, "serves once D has passed since its last term ended");

    // A term that ended with a handoff had nothing in flight: the lease
    // handed back is served at once.
    let handed = m.hand_off(2).expect("the owner hands off");
    let back_at = now + T;
    m.stand_by(back_at);
    let back =
        LeaseRecord { host_id: 2, instance: [2; 16], generation: handed.generation + 1, handoff_to: 1, ..handed };
    m.reading(back_at + 1);
    let LeaseAction::Write(taken) = m.read_done(back_at + 2, &all(&back)) else { panic!("takes the handoff") };
    m.write_done(back_at + 3, &taken, 3, 3);
    m.reading(back_at + 4);
    let LeaseAction::Write(renewed) = m.read_done(back_at + 5, &all(&taken)) else { panic!("renews") };
    m.write_done(back_at + 6, &renewed, 3, 3);
    assert!(m.may_commit(back_at + 6), "no wait after its own handoff");
}

// ---- the race model ----

#[derive(Debug, Clone)]
enum Op {
    Read { done_at: Vec<u64>, results: Vec<Option<Result<Option<LeaseRecord>, String>>> },
    Write { record: LeaseRecord, land_at: Vec<u64>, landed: Vec<bool> },
}

struct Server {
    m: LeaseMachine,
    op: Option<Op>,
    wait_until: u64,
    paused_until: u64,
    crashed: bool,
}

/// Deterministic pseudo-random numbers for the model (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Runs `servers` against `copies` shared owner sectors for `steps` ms with
/// random I/O latencies (each below the timeout), pauses and crashes;
/// panics if two servers may commit at the same instant.
fn race(seed: u64, servers: usize, copies: usize, steps: u64) -> usize {
    let mut rng = Rng(seed | 1);
    let mut disk: Vec<Vec<u8>> = vec![vec![0; LEASE_SECTOR_BYTES as usize]; copies];
    let mut fleet: Vec<Server> = (0..servers)
        .map(|i| Server {
            m: LeaseMachine::new(me(i as u32 + 1), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 }),
            op: None,
            wait_until: 0,
            paused_until: 0,
            crashed: false,
        })
        .collect();
    let mut acquisitions = 0;
    // LEASE_TRACE=1 prints every step of the model (to read a failing seed).
    let trace = std::env::var_os("LEASE_TRACE").is_some();
    for now in 0..steps {
        // I/O lands (even for paused or crashed servers: it was in flight).
        for s in fleet.iter_mut() {
            match &mut s.op {
                Some(Op::Write { record, land_at, landed }) => {
                    for c in 0..copies {
                        if !landed[c] && land_at[c] <= now {
                            disk[c] = encode_sector(record).unwrap();
                            landed[c] = true;
                        }
                    }
                }
                Some(Op::Read { done_at, results }) => {
                    for c in 0..copies {
                        if results[c].is_none() && done_at[c] <= now {
                            results[c] = Some(decode_sector(&disk[c], POOL).map_err(|e| e.to_string()));
                        }
                    }
                }
                None => {}
            }
        }
        // Faults: rare pauses (up to 12T: longer than any lease window) and crashes.
        for s in fleet.iter_mut() {
            if s.crashed {
                continue;
            }
            match rng.below(4000) {
                0 => {
                    s.paused_until = now + rng.below(12 * T);
                    if trace {
                        eprintln!("{now:5} host {} paused until {}", s.m.me.host_id, s.paused_until);
                    }
                }
                1 if s.m.may_commit(now) => {
                    s.crashed = true;
                    if trace {
                        eprintln!("{now:5} host {} crashed", s.m.me.host_id);
                    }
                }
                _ => {}
            }
        }
        // Servers step.
        for s in fleet.iter_mut() {
            if s.crashed || now < s.paused_until {
                continue;
            }
            let action = match &s.op {
                Some(Op::Read { results, .. }) if results.iter().all(Option::is_some) => {
                    let results: Vec<_> = results.iter().map(|r| r.clone().unwrap()).collect();
                    s.op = None;
                    let was_owner = matches!(s.m.phase, LeasePhase::Owner { .. });
                    let a = s.m.read_done(now, &results);
                    if !was_owner && matches!(s.m.phase, LeasePhase::Owner { .. }) {
                        acquisitions += 1;
                    }
                    Some(a)
                }
                Some(Op::Write { record, landed, .. }) if landed.iter().all(|l| *l) => {
                    let record = record.clone();
                    s.op = None;
                    Some(s.m.write_done(now, &record, copies, copies))
                }
                Some(_) => None,
                None if now >= s.wait_until => Some(s.m.next(now)),
                None => None,
            };
            if trace && action.is_some() {
                eprintln!("{now:5} host {} {:?} -> {:?}", s.m.me.host_id, s.m.phase, action);
            }
            match action {
                Some(LeaseAction::Read) => {
                    s.m.reading(now);
                    let done_at = (0..copies).map(|_| now + rng.below(T)).collect();
                    s.op = Some(Op::Read { done_at, results: vec![None; copies] });
                }
                Some(LeaseAction::Write(record)) => {
                    let land_at = (0..copies).map(|_| now + rng.below(T)).collect();
                    s.op = Some(Op::Write { record, land_at, landed: vec![false; copies] });
                }
                Some(LeaseAction::WaitUntil(t)) => s.wait_until = t,
                None => {}
            }
        }
        let committing: Vec<usize> =
            (0..fleet.len()).filter(|&i| !fleet[i].crashed && fleet[i].m.may_commit(now)).collect();
        assert!(committing.len() <= 1, "seed {seed}: at {now} ms servers {committing:?} may all commit");
    }
    acquisitions
}

/// `LEASE_SEED=N LEASE_SERVERS=S LEASE_COPIES=C` replays one model run.
#[test]
fn one_seed_from_the_environment() {
    let Some(seed) = std::env::var("LEASE_SEED").ok().and_then(|s| s.parse().ok()) else { return };
    let get = |k: &str, d: usize| std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
    race(seed, get("LEASE_SERVERS", 2), get("LEASE_COPIES", 1), 40 * T);
}

#[test]
fn racing_servers_never_both_commit() {
    let mut acquired = 0;
    for seed in 1..=40 {
        acquired += race(seed, 3, 3, 60 * T);
    }
    assert!(acquired >= 40, "the lease is taken (and taken over) at all: {acquired} acquisitions");
}

proptest! {
    // 48 cases by default; PROPTEST_CASES=N for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]
    #[test]
    fn racing_servers_never_both_commit_any_seed(seed in any::<u64>(), servers in 2usize..5, copies in prop_oneof![Just(1usize), Just(3), Just(5)]) {
        race(seed, servers, copies, 40 * T);
    }
}

#[test]
fn copies_split_between_two_acquirers_for_a_whole_expiry_are_taken_over() {
    // Two servers each reached one copy; the third copy was lost meanwhile
    // (free now). No majority agrees, and nobody writes any more: after the
    // copies stayed as they are for an expiry, a standby acquires, one
    // generation past the newest seen.
    let a = LeaseRecord { generation: 3, ..me(1) };
    let b = LeaseRecord { generation: 3, ..me(2) };
    let split = [Ok(Some(a.clone())), Ok(Some(b.clone())), Ok(None)];
    let mut m = LeaseMachine::new(me(3), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    m.reading(0);
    assert!(matches!(m.read_done(1, &split), LeaseAction::WaitUntil(_)));
    // A copy changes (someone is still writing): the watch starts over.
    let a2 = LeaseRecord { counter: 1, ..a.clone() };
    m.reading(3 * T);
    assert!(matches!(
        m.read_done(3 * T + 1, &[Ok(Some(a2.clone())), Ok(Some(b.clone())), Ok(None)]),
        LeaseAction::WaitUntil(_)
    ));
    let split2 = [Ok(Some(a2)), Ok(Some(b)), Ok(None)];
    m.reading(7 * T);
    assert!(matches!(m.read_done(7 * T + 1, &split2), LeaseAction::WaitUntil(_)), "4T unchanged is not enough");
    m.reading(8 * T + 2);
    let LeaseAction::Write(rec) = m.read_done(8 * T + 3, &split2) else { panic!("5T unchanged: acquire") };
    assert_eq!((rec.host_id, rec.generation), (3, 4));
}

#[test]
fn copies_this_server_cannot_read_are_never_taken_over() {
    // Cut off from the devices: every read fails, for longer than any
    // expiry. That is no evidence that the owner stopped renewing.
    let mut m = LeaseMachine::new(me(3), LeaseTiming { io_timeout_ms: T, device_request_max_ms: 0 });
    let unreadable: [Result<Option<LeaseRecord>, String>; 3] =
        [Err("cut".into()), Err("cut".into()), Err("cut".into())];
    for now in (0..=20 * T).step_by(T as usize) {
        m.reading(now);
        assert!(matches!(m.read_done(now + 1, &unreadable), LeaseAction::WaitUntil(_)), "took over at {now}");
    }
    // A minority readable (one copy shows an owner) is no evidence either.
    let owner = LeaseRecord { generation: 2, ..me(1) };
    let mostly_unreadable = [Ok(Some(owner)), Err("cut".into()), Err("cut".into())];
    for now in (21 * T..=40 * T).step_by(T as usize) {
        m.reading(now);
        assert!(matches!(m.read_done(now + 1, &mostly_unreadable), LeaseAction::WaitUntil(_)), "took over at {now}");
    }
}
