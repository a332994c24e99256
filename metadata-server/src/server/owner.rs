//! The owner loop: the async shell around [`Core`].
//!
//! It waits for the next thing to happen — a session's command, a commit
//! or job finishing, the periodic tick, a recall deadline, shutdown — turns
//! it into an [`Input`], applies it (synchronously) and performs the
//! [`Effect`]s in order. It never awaits anything but its inputs: replies
//! and events are queued to session tasks, commits and device checks go to
//! the device task ([`super::device_task`]), data jobs run on tasks of
//! their own. So a lease renewal is applied the moment it arrives, however
//! long a commit, a copy or a device check takes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockio::clock::LeaseInstant;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::warn;
use volume_format::control::messages::{ControlError, Request, Response, ServerMessage};
use volume_format::metadata::PoolMetadata;

use super::core::{ClientTable, Core, Effect, Input, Now, ReplyId};
use super::device_task::{DeviceTask, DeviceWork};
use super::jobs::{run_data_job, Job};
use super::lease_task::{LeaseCommand, LeaseGuard, Servers};
use super::snapshot_io::DeviceClients;
use crate::handles::SessionId;
use crate::pool::Pool;
use control_client::handshake::Peer;
use volume_format::control::messages::ServerInfo;

/// Inputs from the device task and jobs queued for the owner.
pub const RESULTS_QUEUED_MAX: usize = 1024;

/// What sessions ask of the owner.
pub enum Command {
    Connected {
        session: SessionId,
        peer: Peer,
        addr: String,
        out: mpsc::Sender<ServerMessage>,
        kick: oneshot::Sender<()>,
    },
    Request {
        session: SessionId,
        request: Request,
        reply: oneshot::Sender<Result<Response, ControlError>>,
    },
    Disconnected {
        session: SessionId,
    },
    /// A reader of the committed metadata started (a backup channel, after
    /// counting itself in `Published::readers`): publish it now.
    PublishMeta {
        done: oneshot::Sender<()>,
    },
}

/// A session's channels, as the shell holds them.
struct SessionChannels {
    out: mpsc::Sender<ServerMessage>,
    kick: Option<oneshot::Sender<()>>,
}

/// The owner's clocks: milliseconds since start on the lease clock
/// (`CLOCK_BOOTTIME`, [`blockio::clock`]: a VM pause of the server counts,
/// as it does for the agents whose leases it keeps; tokio's paused clock
/// still moves it in tests) and the wall clock.
#[derive(Clone, Copy)]
pub struct Clock {
    start: LeaseInstant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { start: LeaseInstant::now() }
    }

    pub fn now(&self) -> Now {
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Now { mono_ms: self.start.elapsed().as_millis() as u64, unix_ms }
    }

    /// When a timer should fire for `ms` (it wakes late after a pause, never early).
    fn instant_at(&self, ms: u64) -> Instant {
        (self.start + Duration::from_millis(ms)).to_timer()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Readers of the committed state outside the owner.
pub struct Published {
    /// The committed metadata while backup channels read it (`readers`);
    /// `placeholder` otherwise.
    pub meta: watch::Sender<Arc<PoolMetadata>>,
    pub readers: Arc<std::sync::atomic::AtomicUsize>,
    pub placeholder: Arc<PoolMetadata>,
    pub clients: watch::Sender<Arc<ClientTable>>,
}

struct Shell {
    core: Core,
    clock: Clock,
    sessions: HashMap<SessionId, SessionChannels>,
    replies: HashMap<ReplyId, oneshot::Sender<Result<Response, ControlError>>>,
    next_reply: ReplyId,
    devices: mpsc::Sender<DeviceWork>,
    results: mpsc::Sender<Input>,
    job_devices: DeviceClients,
    published: Published,
    lease_commands: mpsc::Sender<LeaseCommand>,
    /// Pre-image writes of jobs, like metadata writes, need the lease.
    lease_guard: Arc<LeaseGuard>,
    /// Set by [`Effect::Stop`]: the loop ends.
    stopped: Option<String>,
    /// Volumes' cache mirrors (their workers do the file I/O).
    mirrors: crate::mirror::Mirrors,
}

/// Where the owner keeps the volumes' cache mirrors, and the lanes their
/// holders' appends take to the mirror workers.
pub struct MirrorSetup {
    pub dir: std::path::PathBuf,
    pub lanes: Arc<crate::mirror::lane::Lanes>,
}

/// Runs the owner until `shutdown` completes or every command sender is
/// gone, then fails waiting callers, closes sessions and the devices.
pub async fn run(
    core: Core,
    pool: Pool,
    published: Published,
    mut commands: mpsc::Receiver<Command>,
    shutdown: impl Future<Output = ()>,
    lease: LeaseControl,
    mirrors: MirrorSetup,
) -> Option<String> {
    let MirrorSetup { dir: cache_mirror_dir, lanes } = mirrors;
    let LeaseControl { commands: lease_commands, mut servers, ended: mut lease_ended, guard } = lease;
    let (results_tx, mut results) = mpsc::channel(RESULTS_QUEUED_MAX);
    let job_devices = DeviceClients::default().guarded(guard.clone());
    let job_devices_for_mirrors = job_devices.clone();
    let (devices, device_task) = DeviceTask::start(pool, results_tx.clone(), guard.clone());
    let tick_ms = (core.lease_ms / 4).max(25);
    let mut shell = Shell {
        core,
        clock: Clock::new(),
        sessions: HashMap::new(),
        replies: HashMap::new(),
        next_reply: 1,
        devices,
        results: results_tx,
        job_devices,
        published,
        lease_commands,
        mirrors: crate::mirror::Mirrors::new(cache_mirror_dir, job_devices_for_mirrors, lanes),
        lease_guard: guard,
        stopped: None,
    };
    // The listing as it is now (`changed` reports only later ones): the
    // cache mirror records name this server from the first request on, as
    // a replay after a restart compares them with this server's name.
    let list = servers.borrow_and_update().iter().map(server_info).collect();
    let effects = shell.core.apply(shell.clock.now(), Input::Servers { servers: list });
    shell.perform(effects);
    let mut lease_gone = false;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = shell.core.next_deadline_ms().map(|ms| shell.clock.instant_at(ms));
        let input = tokio::select! {
            _ = &mut shutdown => break,
            cmd = commands.recv() => match cmd {
                Some(cmd) => shell.command(cmd),
                None => break,
            },
            Some(result) = results.recv() => Some(result),
            _ = tick.tick() => Some(Input::Tick),
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                Some(Input::Tick)
            }
            Ok(()) = servers.changed() => {
                let list = servers.borrow_and_update().iter().map(server_info).collect();
                Some(Input::Servers { servers: list })
            }
            why = &mut lease_ended, if !lease_gone => {
                // The lease task lost the lease while serving (a handoff's
                // end comes as Input::HandedOff: nothing is sent for it).
                lease_gone = true;
                why.ok().map(|why| Input::LeaseLost { why })
            }
        };
        if let Some(input) = input {
            let now = shell.clock.now();
            let effects = shell.core.apply(now, input);
            super::metrics::observe(&shell.core);
            // Before the effects: a mirror worker checks a holder's lane
            // requests against what was published before any request the
            // owner queues to it (crate::mirror::lane).
            shell.mirrors.publish(shell.core.mirror_holders());
            shell.perform(effects);
        }
        if shell.stopped.is_some() {
            break;
        }
    }
    let stopped = shell.stopped.take();
    if stopped.is_none() {
        let effects = shell.core.shut_down();
        shell.perform(effects);
    }
    drop(shell);
    let _ = device_task.await;
    stopped
}

/// What the owner needs of the lease task while it holds the lease.
pub struct LeaseControl {
    pub commands: mpsc::Sender<LeaseCommand>,
    /// The pool's servers as their lease sectors say.
    pub servers: watch::Receiver<Servers>,
    /// Resolves when the lease task ends (lost: commit nothing more).
    /// Why the lease task ended (it says whether another server took it).
    pub ended: oneshot::Receiver<String>,
    /// Checked by the device task before every metadata write.
    pub guard: Arc<LeaseGuard>,
}

/// How a server's lease sector is listed (`pool status`, handoff targets).
pub fn server_info(r: &volume_format::lease::LeaseRecord) -> ServerInfo {
    ServerInfo {
        name: r.name.clone(),
        host_id: r.host_id,
        role: r.role.to_string(),
        since_unix_ms: r.since_unix_ms,
        addrs: r.addrs.clone(),
    }
}

impl Shell {
    /// Turns a session's command into an input (keeping its channels).
    fn command(&mut self, cmd: Command) -> Option<Input> {
        match cmd {
            Command::Connected { session, peer, addr, out, kick } => {
                self.sessions.insert(session, SessionChannels { out, kick: Some(kick) });
                Some(Input::Connected { session, peer, addr })
            }
            Command::Disconnected { session } => {
                self.sessions.remove(&session);
                Some(Input::Disconnected { session })
            }
            Command::PublishMeta { done } => {
                self.publish_meta();
                let _ = done.send(());
                None
            }
            Command::Request { session, request, reply } => {
                // Nothing is answered without the pool lease (see
                // `lease_task::closed_window_refusal`).
                if let Some(refusal) = self.lease_guard.refusal() {
                    let _ = reply.send(Err(refusal));
                    return None;
                }
                let id = self.next_reply;
                self.next_reply += 1;
                self.replies.insert(id, reply);
                Some(Input::Request { session, request, reply: id })
            }
        }
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Reply { reply, result } => {
                    if let Some(tx) = self.replies.remove(&reply) {
                        let _ = tx.send(result);
                    }
                }
                Effect::Event { session, event } => {
                    let Some(s) = self.sessions.get_mut(&session) else { continue };
                    if let Err(e) = s.out.try_send(ServerMessage::Event(event)) {
                        warn!(session, "cannot queue an event for the session ({e}); closing it");
                        if let Some(kick) = s.kick.take() {
                            let _ = kick.send(());
                        }
                    }
                }
                Effect::Kick { session } => {
                    if let Some(kick) = self.sessions.get_mut(&session).and_then(|s| s.kick.take()) {
                        let _ = kick.send(());
                    }
                }
                Effect::MetaWrite { task, write } => {
                    if self.devices.try_send(DeviceWork::Write { task, write }).is_err() {
                        self.fail_task(task, true);
                    }
                }
                Effect::Job { task, job } => self.start_job(task, job),
                Effect::HandOff { to } => {
                    let (done, answer) = oneshot::channel();
                    let result = match self.lease_commands.try_send(LeaseCommand::HandOff { to, done }) {
                        Ok(()) => None,
                        Err(_) => Some(Err("the lease task is gone".to_string())),
                    };
                    let results = self.results.clone();
                    tokio::spawn(async move {
                        let result = match result {
                            Some(r) => r,
                            None => answer.await.unwrap_or_else(|_| Err("the lease task is gone".into())),
                        };
                        let _ = results.send(Input::HandedOff { result }).await;
                    });
                }
                Effect::Stop { why } => self.stopped = Some(why),
                Effect::Mirror { volume, op, reply } => {
                    let reply = match reply {
                        Some(reply) => self.replies.remove(&reply),
                        None => Some(oneshot::channel().0),
                    };
                    if let Some(reply) = reply {
                        let reply = crate::mirror::MirrorReply::Owner(reply);
                        self.mirrors.send(volume, crate::mirror::MirrorWork { op, reply });
                    }
                }
                Effect::Published { clients } => {
                    self.publish_meta();
                    if let Some(clients) = clients {
                        self.published.clients.send_replace(clients);
                    }
                }
            }
        }
    }

    fn start_job(&mut self, task: u64, job: Job) {
        match job {
            Job::CheckDevice { index, uuid } => {
                if self.devices.try_send(DeviceWork::Check { task, index, uuid }).is_err() {
                    self.fail_task(task, false);
                }
            }
            Job::LabelDevice(request) => {
                let devices = self.devices.clone();
                let results = self.results.clone();
                let guard = self.lease_guard.clone();
                tokio::spawn(async move {
                    // A server without the pool lease labels nothing: the
                    // active one may be adding the same device.
                    let outcome = if !guard.may_commit() {
                        super::jobs::JobOutcome::failed(
                            "this metadata server does not hold the pool lease now; nothing was labelled",
                        )
                    } else {
                        match crate::pool::add::label_device(&request).await {
                            Ok((label, device)) => {
                                let fences = device.fences();
                                let adopted = devices.send(DeviceWork::Adopt { device: Box::new(device) }).await;
                                match adopted {
                                    Ok(()) => super::jobs::JobOutcome { result: Ok(()), label: Some(label), fences },
                                    Err(_) => super::jobs::JobOutcome::failed("the server is shutting down"),
                                }
                            }
                            Err(why) => super::jobs::JobOutcome::failed(why),
                        }
                    };
                    let _ = results.send(Input::JobDone { task, outcome }).await;
                });
            }
            job @ (Job::MirrorReplay { .. } | Job::MirrorPrepare { .. }) => {
                let (reply, answer) = oneshot::channel();
                let reply = crate::mirror::MirrorReply::Owner(reply);
                let (volume, op) = match job {
                    Job::MirrorReplay { meta, volume, expected, named_here, source } => {
                        (volume, crate::mirror::MirrorOp::Replay { meta, expected, named_here, source })
                    }
                    Job::MirrorPrepare { volume, cache, generation, staged } => {
                        (volume, crate::mirror::MirrorOp::Prepare { cache, generation, staged })
                    }
                    _ => unreachable!("matched above"),
                };
                self.mirrors.send(volume, crate::mirror::MirrorWork { op, reply });
                let results = self.results.clone();
                tokio::spawn(async move {
                    let outcome = match answer.await {
                        Ok(Ok(_)) => super::jobs::JobOutcome::done(),
                        Ok(Err(e)) => super::jobs::JobOutcome::failed(e.message),
                        Err(_) => super::jobs::JobOutcome::failed("the cache mirror stopped; retry"),
                    };
                    let _ = results.send(Input::JobDone { task, outcome }).await;
                });
            }
            data_job => {
                let devices = self.job_devices.clone();
                let results = self.results.clone();
                let guard = self.lease_guard.clone();
                tokio::spawn(async move {
                    let outcome = run_data_job(data_job, &devices, || guard.may_commit()).await;
                    let _ = results.send(Input::JobDone { task, outcome }).await;
                });
            }
        }
    }

    /// Shares the committed metadata with backup channels while any is
    /// open. Sharing it makes the next change copy the whole metadata (the
    /// core changes it in place when nobody else holds it), so with no
    /// reader the watch holds a placeholder instead.
    fn publish_meta(&mut self) {
        if self.published.readers.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.published.meta.send_replace(self.core.meta.clone());
        } else if !Arc::ptr_eq(&self.published.meta.borrow(), &self.published.placeholder) {
            self.published.meta.send_replace(self.published.placeholder.clone());
        }
    }

    /// The device task is gone (shutting down): the task fails at once.
    fn fail_task(&mut self, task: u64, commit: bool) {
        let input = if commit {
            Input::MetaWritten { task, written: Vec::new(), failures: vec!["the server is shutting down".into()] }
        } else {
            Input::JobDone { task, outcome: super::jobs::JobOutcome::failed("the server is shutting down") }
        };
        let results = self.results.clone();
        tokio::spawn(async move {
            let _ = results.send(input).await;
        });
    }
}
