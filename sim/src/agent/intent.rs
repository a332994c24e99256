//! The write-intent log of a mirrored volume, as `client_agent::intent`
//! keeps it, in worlds whose agents speak protocol 8
//! ([`crate::Config::intent_log`]).
//!
//! The state machine is the real one ([`IntentState`]); the shell does what
//! `IntentLog` does around it, through the real core's registrations
//! (`Input::IntentRecord`, retried like a copy-on-write registration):
//! - before its first I/O an attachment asks the server to resynchronize
//!   what its handle was left dirty (`IntentOp::Resync`); reads and writes
//!   wait for that, and fail if it fails (the next I/O asks again);
//! - a write to a region not recorded dirty waits for the record
//!   (`IntentState::begin`: the region and the one after it), then goes to
//!   every leg; it ends with its outcome (a failed write's region is never
//!   cleared);
//! - a sweeper every `INTENT_SWEEP_MS` clears regions idle for
//!   `INTENT_CLEAR_AFTER_MS`;
//! - the write-back cache's destage rounds (`super::cache`) hold the
//!   regions of their blocks the same way, from before their writes until
//!   the writes ended (production's cache writes through the volume device
//!   and its log, one write at a time; a round here is one hold);
//! - a detach whose writes failed somewhere has those regions copied
//!   before the close, or leaves the handle to run out
//!   (`IntentLog::resync_before_close`; production also gives up after
//!   `DETACH_RESYNC_MAX`, which the simulated server, always back in the
//!   end, never needs).
//!
//! The observer checks the outcome: `mirror-legs-agree`
//! (`observer::sweep`).

use std::collections::{BTreeMap, VecDeque};

use client_agent::core::{AttachmentId, CallerId, Input, IntentOp, Reply};
use client_agent::intent::{Begin, IntentState, INTENT_CLEAR_AFTER_MS, INTENT_REGIONS_PER_RECORD_MAX, INTENT_SWEEP_MS};
use volume_format::control::messages::OpenMode;

use super::{AgentHost, CallerPurpose, IoKind};
use crate::device::BLOCK_BYTES;
use crate::world::{Env, Ev};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ready {
    Unasked,
    Asking,
    Done,
}

/// One attachment's intent log.
#[derive(Debug)]
pub struct Intents {
    state: IntentState,
    region_blocks: u64,
    ready: Ready,
    /// I/O waiting for the resync or for a record of its region to settle.
    waiting: Vec<u64>,
    /// Writes that hold their regions (recorded dirty), by I/O id.
    holding: BTreeMap<u64, Vec<u64>>,
    /// The resync before the close of a handle whose write failed
    /// (`IntentLog::resync_before_close`).
    close: CloseStep,
    /// The regions the write-back cache's destage round holds (or is
    /// having marked), as production's cache writes through the volume's
    /// log: each destage write holds its regions until it ended.
    round: Option<RoundHold>,
}

#[derive(Debug, Clone)]
enum RoundHold {
    Marking,
    Held(Vec<u64>),
}

#[derive(Debug, Clone)]
enum CloseStep {
    NotAsked,
    Asking,
    Answered(Result<(), String>),
}

/// What an intent request of the core was for.
#[derive(Debug)]
pub enum IntentCall {
    Resync,
    /// The resync asked before the close.
    CloseResync,
    /// The regions of a destage round of the cache.
    RoundMark {
        regions: Vec<u64>,
        mark: Vec<u64>,
    },
    Mark {
        io: u64,
        regions: Vec<u64>,
        mark: Vec<u64>,
    },
    Clear {
        regions: Vec<u64>,
    },
}

impl AgentHost {
    /// A new attachment: a writer of a mirrored volume keeps the log.
    pub(super) fn intent_attached(&mut self, att: AttachmentId, env: &Env) {
        let Some(a) = self.atts.get_mut(&att) else { return };
        if !env.cfg.intent_log || a.mode == OpenMode::ReadOnly || a.desc.mirror_legs < 2 {
            return;
        }
        let region_bytes = volume_format::metadata::intent_region_bytes(a.desc.extent_bytes);
        a.intents = Some(Intents {
            state: IntentState::new(a.desc.size_bytes.div_ceil(region_bytes)),
            region_blocks: (region_bytes / BLOCK_BYTES).max(1),
            ready: Ready::Unasked,
            waiting: Vec::new(),
            holding: BTreeMap::new(),
            close: CloseStep::NotAsked,
            round: None,
        });
    }

    /// Before I/O `id` goes to the devices: whether it must wait for the
    /// log (it is sent again once what it waits for is answered).
    pub(super) fn intent_wait(&mut self, id: u64, env: &mut Env) -> bool {
        let Some(io) = self.ios.get(&id) else { return false };
        let att = io.att;
        let kind = io.kind.clone();
        if matches!(kind, IoKind::Flush) || self.atts.get(&att).is_none_or(|a| a.intents.is_none()) {
            return false;
        }
        if !self.intent_ready(att, Some(id), env) {
            return true;
        }
        let IoKind::Write { block, .. } = kind else { return false };
        let Some(it) = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()) else { return false };
        if it.holding.contains_key(&id) {
            return false;
        }
        let regions = vec![block / it.region_blocks];
        match it.state.begin(&regions) {
            Begin::Wait => {
                it.waiting.push(id);
                true
            }
            Begin::Go { mark } if mark.is_empty() => {
                it.holding.insert(id, regions);
                false
            }
            Begin::Go { mark } => {
                env.trace(self.me(), format_args!("io{id} marks regions {mark:?} dirty first"));
                let op = IntentOp::Record { mark: mark.clone(), clear: Vec::new() };
                self.intent_call(att, IntentCall::Mark { io: id, regions, mark }, op, env);
                true
            }
        }
    }

    /// Before a destage round of the cache writes `blocks`: whether it may
    /// go now (its regions held until [`AgentHost::intent_round_end`]); if
    /// not, the cache is kicked again once what it waits for is answered.
    pub(super) fn intent_round_begin(&mut self, att: AttachmentId, blocks: &[u64], env: &mut Env) -> bool {
        if self.atts.get(&att).is_none_or(|a| a.intents.is_none()) {
            return true;
        }
        if !self.intent_ready(att, None, env) {
            return false;
        }
        let it = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()).expect("checked above");
        let mut regions: Vec<u64> = blocks.iter().map(|b| b / it.region_blocks).collect();
        regions.sort_unstable();
        regions.dedup();
        match it.round.take() {
            Some(RoundHold::Marking) => {
                it.round = Some(RoundHold::Marking);
                return false;
            }
            Some(RoundHold::Held(held)) if regions.iter().all(|r| held.contains(r)) => {
                it.round = Some(RoundHold::Held(held));
                return true;
            }
            // Marked for a round whose records changed since: let go, begin anew.
            Some(RoundHold::Held(held)) => {
                let now = self.clock(env);
                let it = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()).expect("checked above");
                it.state.end(&held, true, now);
            }
            None => {}
        }
        let it = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()).expect("checked above");
        match it.state.begin(&regions) {
            Begin::Wait => false,
            Begin::Go { mark } if mark.is_empty() => {
                it.round = Some(RoundHold::Held(regions));
                true
            }
            Begin::Go { mark } => {
                it.round = Some(RoundHold::Marking);
                env.trace(self.me(), format_args!("a destage round marks regions {mark:?} dirty first"));
                let op = IntentOp::Record { mark: mark.clone(), clear: Vec::new() };
                self.intent_call(att, IntentCall::RoundMark { regions, mark }, op, env);
                false
            }
        }
    }

    /// Whether the handle's dirty regions of before this attachment were
    /// resynchronized (`IntentLog::ready`): if not, asks for it (once) and
    /// lets I/O `waiter` wait for the answer.
    fn intent_ready(&mut self, att: AttachmentId, waiter: Option<u64>, env: &mut Env) -> bool {
        let Some(it) = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()) else { return true };
        if it.ready == Ready::Done {
            return true;
        }
        it.waiting.extend(waiter);
        if it.ready == Ready::Unasked {
            it.ready = Ready::Asking;
            env.trace(self.me(), format_args!("resync of the handle's dirty regions asked before its first I/O"));
            self.intent_call(att, IntentCall::Resync, IntentOp::Resync, env);
        }
        false
    }

    /// The destage round's writes ended (`ok`: every one succeeded).
    pub(super) fn intent_round_end(&mut self, att: AttachmentId, ok: bool, env: &mut Env) {
        let now = self.clock(env);
        let Some(it) = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()) else { return };
        if let Some(RoundHold::Held(regions)) = it.round.take() {
            it.state.end(&regions, ok, now);
            self.intent_sweep_later(env);
        }
    }

    /// I/O `id` ended: a write that held its regions lets them go.
    pub(super) fn intent_end(&mut self, att: AttachmentId, id: u64, ok: bool, env: &mut Env) {
        let now = self.clock(env);
        let Some(it) = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()) else { return };
        if let Some(regions) = it.holding.remove(&id) {
            it.state.end(&regions, ok, now);
            self.intent_sweep_later(env);
        }
    }

    /// The attachment is drained and about to close its handle: `None`
    /// while the regions where a write failed are being copied (asked on
    /// `queue`); then `Ok` to close, or `Err` to leave the handle to run
    /// out (production's `DetachTask`).
    pub(super) fn intent_before_close(
        &mut self,
        att: AttachmentId,
        queue: &mut VecDeque<Input>,
        env: &mut Env,
    ) -> Option<Result<(), String>> {
        let Some(a) = self.atts.get_mut(&att) else { return Some(Ok(())) };
        let volume = a.volume.clone();
        let Some(it) = a.intents.as_mut() else { return Some(Ok(())) };
        let failed = it.state.failed();
        if failed.is_empty() {
            return Some(Ok(()));
        }
        match &it.close {
            CloseStep::Answered(result) => return Some(result.clone()),
            CloseStep::Asking => return None,
            CloseStep::NotAsked => it.close = CloseStep::Asking,
        }
        env.stats.intent_close_resyncs += 1;
        env.trace(self.me(), format_args!("{volume}: writes failed in regions {failed:?}: resync before the close"));
        queue.extend(self.intent_input(att, IntentCall::CloseResync, IntentOp::Resync));
        None
    }

    /// Sends an intent request through the core now.
    fn intent_call(&mut self, att: AttachmentId, call: IntentCall, op: IntentOp, env: &mut Env) {
        if let Some(input) = self.intent_input(att, call, op) {
            self.input(input, env);
        }
    }

    /// The core's input for an intent request of `att`, its answer routed
    /// back to [`AgentHost::intent_answered`] with `call`.
    fn intent_input(&mut self, att: AttachmentId, call: IntentCall, op: IntentOp) -> Option<Input> {
        let volume = self.atts.get(&att)?.volume.clone();
        let caller = CallerId(self.next_caller);
        self.next_caller += 1;
        self.callers.insert(caller, CallerPurpose::Intent { att, call });
        Some(Input::IntentRecord { caller, volume, op })
    }

    /// The core answered an intent request.
    pub(super) fn intent_answered(&mut self, att: AttachmentId, call: IntentCall, reply: Reply, env: &mut Env) {
        self.intent_answer(att, call, reply, env);
        // A destage round may wait for what was answered.
        if self.atts.get(&att).is_some_and(|a| a.cache.is_some()) {
            self.cache_kick(att, env);
        }
    }

    fn intent_answer(&mut self, att: AttachmentId, call: IntentCall, reply: Reply, env: &mut Env) {
        let now = self.clock(env);
        let error = match reply {
            Reply::Registered(Ok(())) => None,
            Reply::Registered(Err(e)) => Some(e),
            other => Some(format!("unexpected answer {other:?}")),
        };
        let Some(it) = self.atts.get_mut(&att).and_then(|a| a.intents.as_mut()) else { return };
        let waiting = std::mem::take(&mut it.waiting);
        match call {
            IntentCall::RoundMark { regions, mark } => {
                it.state.marked(&regions, &mark, error.is_none(), now);
                it.round = error.is_none().then_some(RoundHold::Held(regions));
                for w in waiting {
                    self.send_io(w, env);
                }
                self.intent_sweep_later(env);
            }
            IntentCall::CloseResync => {
                it.close = CloseStep::Answered(match error {
                    None => Ok(()),
                    Some(e) => Err(format!("the regions where a write failed could not be resynchronized ({e})")),
                });
                let mut queue = VecDeque::new();
                self.check_detached(att, &mut queue, env);
                for input in queue {
                    self.input(input, env);
                }
            }
            IntentCall::Resync => match error {
                None => {
                    it.ready = Ready::Done;
                    for io in waiting {
                        self.send_io(io, env);
                    }
                }
                Some(e) => {
                    it.ready = Ready::Unasked;
                    for io in waiting {
                        let why = format!(
                            "the regions the previous run of this agent was writing could not be resynchronized \
                             ({e}); no I/O until they are"
                        );
                        self.finish_io(io, Err(why), env);
                    }
                }
            },
            IntentCall::Mark { io, regions, mark } => {
                it.state.marked(&regions, &mark, error.is_none(), now);
                match error {
                    // The write ended while it waited (its attachment's
                    // I/O failed): as production's guard dropped unfinished.
                    None if !self.ios.contains_key(&io) => it.state.end(&regions, false, now),
                    None => {
                        it.holding.insert(io, regions);
                        self.send_io(io, env);
                    }
                    Some(e) => {
                        self.finish_io(io, Err(format!("recording the write-intent regions {mark:?}: {e}")), env)
                    }
                }
                for w in waiting {
                    self.send_io(w, env);
                }
                self.intent_sweep_later(env);
            }
            IntentCall::Clear { regions } => {
                it.state.cleared(&regions);
                for w in waiting {
                    self.send_io(w, env);
                }
                self.intent_sweep_later(env);
            }
        }
    }

    /// The sweeper: clears the regions idle long enough.
    pub(super) fn intent_tick(&mut self, env: &mut Env) {
        let now = self.clock(env);
        let due: Vec<(AttachmentId, Vec<u64>)> = self
            .atts
            .iter_mut()
            .filter_map(|(id, a)| {
                let it = a.intents.as_mut().filter(|it| it.ready == Ready::Done)?;
                let due = it.state.sweep(now, INTENT_CLEAR_AFTER_MS, INTENT_REGIONS_PER_RECORD_MAX);
                (!due.is_empty()).then_some((*id, due))
            })
            .collect();
        for (att, regions) in due {
            env.trace(self.me(), format_args!("clearing intent regions {regions:?}"));
            let op = IntentOp::Record { mark: Vec::new(), clear: regions.clone() };
            self.intent_call(att, IntentCall::Clear { regions }, op, env);
        }
        if self.intent_sweep_at.is_some_and(|at| at <= env.now) {
            self.intent_sweep_at = None;
        }
        self.intent_sweep_later(env);
    }

    /// Wakes the sweeper in `INTENT_SWEEP_MS` while a region is dirty.
    fn intent_sweep_later(&mut self, env: &mut Env) {
        let dirty = self.atts.values().any(|a| a.intents.as_ref().is_some_and(|it| !it.state.dirty().is_empty()));
        if !dirty || self.intent_sweep_at.is_some() {
            return;
        }
        let at = env.now + INTENT_SWEEP_MS;
        self.intent_sweep_at = Some(at);
        env.schedule(at, Ev::AgentWake { agent: self.index, inc: self.inc });
    }
}
