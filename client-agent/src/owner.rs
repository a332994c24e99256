//! The owner task: the thin async shell around [`AgentCore`].
//!
//! Its loop is `select` → `apply` → perform: it waits for the next message
//! (a caller's command, a server event, a reply, a task's result) or the
//! core's next deadline, hands it to [`AgentCore::apply`] with the time, and
//! performs the effects that come back — at once when they are quick (a gate
//! operation, a layout build, a reply), as a spawned task when they wait on
//! the network or the devices (a request, a connection attempt, an attach or
//! detach, a drain, a probe). Tasks post their outcome back as messages, so
//! the loop itself never waits on anything but `select`.
//!
//! What the core keeps as plain data, the shell keeps as objects: the
//! control connections, each attachment's gate, volume device, export and
//! kernel device, and the reply channels of callers. Messages that carry
//! objects (`ToOwner`) are unpacked here into the core's plain
//! [`Input`]s.
//!
//! Two channels lead into the owner. Input from outside — callers'
//! commands, server events, the data path's registrations — goes through a
//! bounded inbox ([`INBOX_MAX`]) whose senders wait for room (a flood of
//! server events backs up into the control client, which drops a connection
//! whose events are not consumed). Results of tasks the owner started, and
//! the data path's reports of a failed direct path, go through an unbounded
//! channel, because the owner must never wait to post to itself and the data
//! path reports from synchronous code; both are bounded by construction: one
//! message per task, one report per device until its path is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use blockio::BlockDevice;
use control_client::{ControlAddr, ControlClient, ControlClientError};
use tokio::sync::{mpsc, oneshot, watch};
// The core's milliseconds are on the lease clock (`CLOCK_BOOTTIME`): a VM
// pause counts, so leases run out through it as they do at the server.
use blockio::clock::LeaseInstant as Instant;
use tracing::{info, warn, Instrument};
use volume_format::control::auth::Role;
use volume_format::control::messages::{OpenMode, ServerEvent};
use volume_format::{HandleId, VolumeDescription};

use crate::agent::{AgentConfig, AgentError};
use crate::cache::mirror::ControlMirror;
use crate::cache::{CacheConfig, CachedDevice, OldLog};
use crate::core::{
    AgentCore, AttachmentId, CallerId, ConnId, DetachFailure, Effect, Input, KernelPlan, Millis, Prepared,
    ProbeOutcome, Reply, RequestError,
};
use crate::cow::{CowRegistrar, Registrations};
use crate::devices::DevicePool;
use crate::export::{serve_volume, ExportHandle, ExportTarget};
use crate::fallback::ServerLink;
use crate::gate::Gate;
use crate::intent::{IntentLog, IntentRecorder};
use crate::kernel::attach::KernelAttachment;
use crate::session::{ConnectState, SessionConfig};
use crate::volume::{Layout, VolumeDevice};

/// Builds a layout from a description (the agent resolves devices through
/// its pool). Must not block: the owner calls it in its loop.
/// Gets the handle the layout is for: its I/O to fencing devices goes over
/// that handle's own connections (`crate::credentials`).
pub type LayoutBuilder = Arc<dyn Fn(VolumeDescription, u64) -> Result<Layout, String> + Send + Sync>;

/// Messages from outside the owner waiting to be applied, at most.
pub const INBOX_MAX: usize = 1024;

/// What is sent to the owner.
pub(crate) enum ToOwner {
    Command {
        command: crate::core::Command,
        reply: oneshot::Sender<Reply>,
    },
    /// The data path registers copy-on-write chunks.
    Cow {
        volume: String,
        snapshot: u64,
        chunks: Vec<u64>,
        server_copies: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The data path records write-intent regions.
    Intent {
        volume: String,
        op: crate::core::IntentOp,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Connected {
        conn: ConnId,
        client: ControlClient,
        events: mpsc::Receiver<ServerEvent>,
    },
    Prepared {
        attachment: AttachmentId,
        result: Result<Ready, AgentError>,
    },
    Detached {
        attachment: AttachmentId,
        result: Result<(), DetachFailure>,
        leftovers: Leftovers,
    },
    /// An attach task opened the volume's cache and waits for `ack` before
    /// it serves the export: from then on a recall sees the cache.
    CacheOpened {
        attachment: AttachmentId,
        cache: Arc<CachedDevice>,
        ack: oneshot::Sender<()>,
    },
    /// A cached volume's cache destaged for a recall (`Effect::BeginRecall`).
    Quiesced {
        attachment: AttachmentId,
        generation: u64,
        hold: crate::cache::WriteHold,
        result: Result<(), String>,
    },
    Input(Input),
}

/// How a newly opened handle is to be served ([`Effect::StartAttach`]'s rest).
struct AttachPlan {
    mode: OpenMode,
    lease_until_ms: Millis,
    export: ExportTarget,
    kernel: Option<KernelPlan>,
    cow_by_server: bool,
    resumed: bool,
}

/// What a successful attach task made.
pub(crate) struct Ready {
    export: ExportHandle,
    kernel: Option<KernelAttachment>,
    kernel_note: Option<String>,
    cache: Option<Arc<CachedDevice>>,
}

/// The longest a detach waits for a volume's write-back cache to write
/// what it holds to the devices before it gives up (the volume then stays
/// attached, its cache still holding the data).
pub const DETACH_DESTAGE_MAX: Duration = Duration::from_secs(120);

/// How long a detach waits for the server to copy the regions where a write
/// failed (`IntentLog::resync_before_close`) before it leaves the handle to
/// run out instead: a server that is down must not hold a detach — or the
/// agent's shutdown, which detaches every volume — for ever.
pub const DETACH_RESYNC_MAX: Duration = Duration::from_secs(30);

/// What a failed detach task hands back (the volume stays attached).
#[derive(Default)]
pub(crate) struct Leftovers {
    export: Option<ExportHandle>,
    kernel: Option<KernelAttachment>,
}

enum Waiter {
    Command(oneshot::Sender<Reply>),
    Cow(oneshot::Sender<Result<(), String>>),
}

/// One attachment's data-path objects.
struct Runtime {
    volume: String,
    handle: u64,
    gate: Arc<Gate<Layout>>,
    device: Arc<VolumeDevice>,
    export: Option<ExportHandle>,
    kernel: Option<KernelAttachment>,
    /// The volume's write-back cache in front of `device`, if it has one.
    cache: Option<(Arc<CachedDevice>, String)>,
}

/// The owner task's state.
pub(crate) struct Shell {
    core: AgentCore,
    /// Where the core's milliseconds start (on the lease clock).
    origin: Instant,
    /// Commands, server events, registrations.
    inbox: mpsc::Receiver<ToOwner>,
    /// For event pumps and registrars.
    inbox_tx: mpsc::Sender<ToOwner>,
    /// Results of the owner's own tasks, path reports.
    rx: mpsc::UnboundedReceiver<ToOwner>,
    tx: mpsc::UnboundedSender<ToOwner>,
    waiters: HashMap<CallerId, Waiter>,
    next_caller: u64,
    conns: HashMap<ConnId, ControlClient>,
    connecting: Option<tokio::task::JoinHandle<()>>,
    attachments: HashMap<AttachmentId, Runtime>,
    config: AgentConfig,
    addrs: Vec<ControlAddr>,
    pool: Arc<DevicePool>,
    link: Arc<ServerLink>,
    builder: LayoutBuilder,
    state: watch::Sender<ConnectState>,
    /// The newest control connection, for caches' mirror requests (see
    /// [`crate::cache::mirror`]).
    current: Arc<std::sync::Mutex<Option<(ConnId, ControlClient)>>>,
}

impl Shell {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        core: AgentCore,
        (inbox_tx, inbox): (mpsc::Sender<ToOwner>, mpsc::Receiver<ToOwner>),
        (tx, rx): (mpsc::UnboundedSender<ToOwner>, mpsc::UnboundedReceiver<ToOwner>),
        config: AgentConfig,
        pool: Arc<DevicePool>,
        link: Arc<ServerLink>,
        builder: LayoutBuilder,
        state: watch::Sender<ConnectState>,
    ) -> Shell {
        Shell {
            core,
            origin: Instant::now(),
            inbox,
            inbox_tx,
            rx,
            tx,
            waiters: HashMap::new(),
            next_caller: 0,
            conns: HashMap::new(),
            connecting: None,
            attachments: HashMap::new(),
            addrs: config.session.addrs(),
            config,
            pool,
            link,
            builder,
            state,
            current: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    fn forget_current(&self, conn: ConnId) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|(c, _)| *c == conn) {
            *current = None;
        }
    }

    fn now_ms(&self) -> Millis {
        self.origin.elapsed().as_millis() as Millis
    }

    fn instant(&self, ms: Millis) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    /// Runs until the core has stopped.
    pub(crate) async fn run(mut self) {
        self.step(Input::Tick);
        while !self.core.is_stopped() {
            let deadline = self.core.next_deadline_ms().map(|ms| self.instant(ms));
            let message = tokio::select! {
                Some(message) = self.inbox.recv() => message,
                Some(message) = self.rx.recv() => message,
                _ = sleep_until(deadline) => ToOwner::Input(Input::Tick),
            };
            if let Some(input) = self.accept(message) {
                self.step(input);
            }
        }
        if let Some(task) = self.connecting.take() {
            task.abort();
        }
    }

    fn step(&mut self, input: Input) {
        let effects = self.core.apply(self.now_ms(), input);
        for effect in effects {
            self.perform(effect);
        }
    }

    fn post(&self, input: Input) {
        let _ = self.tx.send(ToOwner::Input(input));
    }

    fn caller(&mut self, waiter: Waiter) -> CallerId {
        self.next_caller += 1;
        let caller = CallerId(self.next_caller);
        self.waiters.insert(caller, waiter);
        caller
    }

    /// Whether `volume` is attached here with an agent that still copies
    /// its snapshot pre-images itself.
    fn copies_itself(&self, volume: &str) -> bool {
        self.attachments.values().any(|rt| rt.volume == volume && !rt.device.server_copies_now())
    }

    /// Keeps a message's objects; returns the core's input.
    fn accept(&mut self, message: ToOwner) -> Option<Input> {
        Some(match message {
            ToOwner::Command { command: crate::core::Command::Handover { volume, .. }, reply }
                if self.attachments.values().any(|rt| rt.volume == volume && rt.cache.is_some()) =>
            {
                // The receiver would open the volume without a replay of
                // the mirror while this agent's cache still holds writes.
                let e = AgentError::Session(crate::session::SessionError::Server(format!(
                    "volume {volume} has a write-back cache: a handover is not supported for cached volumes yet; \
                     detach it here (its cache is written to the devices) and attach it on the other host"
                )));
                let _ = reply.send(Reply::Failed(e));
                return None;
            }
            ToOwner::Command { command: crate::core::Command::Handover { volume, to_key }, reply }
                if self.copies_itself(&volume) =>
            {
                // Before the token exists: the volume's copy-on-write goes
                // through the server, once this agent's own copies in flight
                // are answered (see `crate::cow`); then the command again.
                let device = self.attachments.values().find(|rt| rt.volume == volume).map(|rt| rt.device.clone());
                let inbox = self.inbox_tx.clone();
                tokio::spawn(
                    async move {
                        if let Some(device) = device {
                            device.use_server_copies().await;
                        }
                        let command = crate::core::Command::Handover { volume, to_key };
                        let _ = inbox.send(ToOwner::Command { command, reply }).await;
                    }
                    .in_current_span(),
                );
                return None;
            }
            ToOwner::Command { command, reply } => {
                let caller = self.caller(Waiter::Command(reply));
                Input::Command { caller, command }
            }
            ToOwner::Cow { volume, snapshot, chunks, server_copies, reply } => {
                let caller = self.caller(Waiter::Cow(reply));
                Input::CowRegister { caller, volume, snapshot, chunks, server_copies }
            }
            ToOwner::Intent { volume, op, reply } => {
                // A server of an older protocol knows no intent log (nor
                // stale tracking): nothing to record there.
                let version = volume_format::control::messages::INTENT_PROTOCOL_VERSION;
                if self.conns.values().any(|c| c.session().version < version) {
                    let _ = reply.send(Ok(()));
                    return None;
                }
                let caller = self.caller(Waiter::Cow(reply));
                Input::IntentRecord { caller, volume, op }
            }
            ToOwner::Connected { conn, client, mut events } => {
                let session = client.session();
                let input = Input::Connected { conn, lease_ms: session.lease_ms, session: session.session };
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((conn, client.clone()));
                self.conns.insert(conn, client);
                let inbox = self.inbox_tx.clone();
                tokio::spawn(
                    async move {
                        while let Some(event) = events.recv().await {
                            if inbox.send(ToOwner::Input(Input::Event { conn, event })).await.is_err() {
                                return;
                            }
                        }
                        let _ = inbox.send(ToOwner::Input(Input::ConnectionLost { conn })).await;
                    }
                    .in_current_span(),
                );
                input
            }
            ToOwner::Prepared { attachment, result } => {
                let result = match result {
                    Ok(ready) => {
                        let prepared = Prepared {
                            export_uri: ready.export.uri().to_string(),
                            kernel_device: ready.kernel.as_ref().map(|k| k.index()),
                            kernel_note: ready.kernel_note,
                        };
                        match self.attachments.get_mut(&attachment) {
                            Some(rt) => {
                                rt.export = Some(ready.export);
                                rt.kernel = ready.kernel;
                                rt.cache = ready.cache.map(|c| {
                                    let path = self.config.cache_log_path(&rt.volume).unwrap_or_default();
                                    (c, path.display().to_string())
                                });
                            }
                            // Cannot happen (the core forgets a preparing attachment only on this
                            // result); dropping stops the export and leaves a kernel device.
                            None => {
                                warn!(attachment = attachment.0, "an attach task finished for a forgotten attachment")
                            }
                        }
                        Ok(prepared)
                    }
                    Err(e) => Err(e),
                };
                Input::Prepared { attachment, result }
            }
            ToOwner::Detached { attachment, result, leftovers } => {
                if let Some(rt) = self.attachments.get_mut(&attachment) {
                    rt.export = leftovers.export.or(rt.export.take());
                    rt.kernel = leftovers.kernel.or(rt.kernel.take());
                }
                Input::Detached { attachment, result }
            }
            ToOwner::CacheOpened { attachment, cache, ack } => {
                if let Some(rt) = self.attachments.get_mut(&attachment) {
                    // Known before the export serves a write: every recall
                    // from now on destages the cache first. One that began
                    // before (the uncached path: its confirmation may be out)
                    // holds the cache's writes until the layout that ends it,
                    // so nothing is acknowledged that its change misses.
                    if matches!(rt.gate.status().phase, crate::gate::Phase::Recalled { .. }) {
                        cache.hold_writes();
                    }
                    let path = self.config.cache_log_path(&rt.volume).unwrap_or_default();
                    rt.cache = Some((cache, path.display().to_string()));
                }
                let _ = ack.send(());
                return None;
            }
            ToOwner::Quiesced { attachment, generation, hold, result } => {
                let rt = self.attachments.get(&attachment)?;
                let cache = rt.cache.as_ref().map(|(cache, _)| cache.clone())?;
                // Checked here, in order with `Effect::Publish`: a layout
                // published while the cache destaged ended the recall.
                let closed = result.and_then(|()| {
                    if !cache.hold_is_current(hold) {
                        return Err("a new layout came (or the handle went) while the cache destaged".to_string());
                    }
                    rt.gate.begin_recall(generation).map_err(|e| e.to_string())
                });
                if let Err(e) = closed {
                    if cache.hold_is_current(hold) {
                        cache.resume_writes();
                    }
                    return Some(Input::Drained { attachment, generation, result: Err(e) });
                }
                let (gate, tx) = (rt.gate.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let result = gate.drained().await.map_err(|e| e.to_string());
                    let _ = tx.send(ToOwner::Input(Input::Drained { attachment, generation, result }));
                });
                return None;
            }
            ToOwner::Input(input) => {
                if let Input::ConnectionLost { conn } = &input {
                    self.conns.remove(conn);
                    self.forget_current(*conn);
                }
                input
            }
        })
    }

    fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::Connect { conn, addr } => self.connect(conn, addr),
            Effect::Addresses { addrs } => {
                let parsed: Vec<ControlAddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
                if parsed.len() == addrs.len() && !parsed.is_empty() {
                    self.addrs = parsed;
                } else {
                    tracing::error!(
                        "unusable metadata-server addresses in a redirect: {addrs:?}; keeping the old ones"
                    );
                }
            }
            Effect::Disconnect { conn } => {
                self.forget_current(conn);
                if let Some(client) = self.conns.remove(&conn) {
                    tokio::spawn(async move { client.close().await });
                }
            }
            Effect::Send { conn, request, message, timeout_ms } => match self.conns.get(&conn) {
                Some(client)
                    if matches!(message, volume_format::control::messages::Request::Lock { .. })
                        && client.session().version < volume_format::control::LOCKS_PROTOCOL_MIN =>
                {
                    let e = volume_format::control::messages::ControlError::new(
                        volume_format::control::messages::ErrorCode::InvalidArgument,
                        format!(
                            "the metadata server speaks control protocol {}; byte-range locks need {}: upgrade sanvol-mds",
                            client.session().version,
                            volume_format::control::LOCKS_PROTOCOL_MIN
                        ),
                    );
                    self.post(Input::Reply { request, result: Err(RequestError::Server(e)) });
                }
                Some(client) if !client.is_closed() => {
                    if matches!(message, volume_format::control::messages::Request::RecallDone { .. }) {
                        // Tests freeze the agent here (`:stop`) and cut its connection.
                        control_client::fault::hit("agent-before-recall-done");
                    }
                    let (client, tx) = (client.clone(), self.tx.clone());
                    let timeout = timeout_ms.map_or(control_client::client::REQUEST_TIMEOUT, Duration::from_millis);
                    tokio::spawn(
                        async move {
                            let result = client.request_with_timeout(message, timeout).await.map_err(|e| match e {
                                ControlClientError::Server(e) => RequestError::Server(e),
                                ControlClientError::Closed => RequestError::Closed,
                                other => RequestError::Transport(other.to_string()),
                            });
                            let _ = tx.send(ToOwner::Input(Input::Reply { request, result }));
                        }
                        .in_current_span(),
                    );
                }
                _ => self.post(Input::Reply { request, result: Err(RequestError::Closed) }),
            },
            Effect::Reply { caller, reply } => self.reply(caller, reply),
            Effect::StartAttach {
                attachment,
                volume,
                handle,
                mode,
                description,
                lease_until_ms,
                export,
                kernel,
                cow_by_server,
                resumed,
            } => {
                let plan = AttachPlan { mode, lease_until_ms, export, kernel, cow_by_server, resumed };
                self.start_attach(attachment, volume, handle, *description, plan)
            }
            Effect::BeginRecall { attachment, generation } => {
                let Some(rt) = self.attachments.get(&attachment) else { return };
                if let Some((cache, _)) = &rt.cache {
                    // A cached volume destages first (see `crate::cache`'s
                    // "Snapshots"): the gate stays open for that, and closes
                    // in the owner loop (`ToOwner::Quiesced`), where a layout
                    // published meanwhile shows.
                    let hold = cache.hold_writes();
                    let (cache, tx) = (cache.clone(), self.tx.clone());
                    tokio::spawn(
                        async move {
                            // The mirror must be empty before the confirmation; that
                            // needs the server, as the confirmation does: retried until
                            // it answers, or the hold ends (a new layout, a revocation).
                            let result = loop {
                                match cache.quiesce().await {
                                    Ok(()) => break Ok(()),
                                    Err(why) if !cache.hold_is_current(hold) => break Err(why),
                                    Err(why) => {
                                        warn!(generation, error = %why, retry_ms = crate::cache::MIRROR_RETRY_MS,
                                            "a recall of a cached volume waits for its mirror; retrying");
                                        tokio::time::sleep(Duration::from_millis(crate::cache::MIRROR_RETRY_MS)).await;
                                    }
                                }
                            };
                            let _ = tx.send(ToOwner::Quiesced { attachment, generation, hold, result });
                        }
                        .in_current_span(),
                    );
                    return;
                }
                if let Err(e) = rt.gate.begin_recall(generation) {
                    return self.post(Input::Drained { attachment, generation, result: Err(e.to_string()) });
                }
                let (gate, tx) = (rt.gate.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let result = gate.drained().await.map_err(|e| e.to_string());
                    let _ = tx.send(ToOwner::Input(Input::Drained { attachment, generation, result }));
                });
            }
            Effect::Publish { attachment, description, context } => {
                let Some(rt) = self.attachments.get(&attachment) else { return };
                let generation = description.layout_generation;
                match (self.builder)(*description, rt.handle) {
                    Ok(layout) => {
                        if let Err(e) = rt.gate.publish(Arc::new(layout), generation) {
                            warn!(volume = rt.volume, generation, error = %e, "the gate refused a layout the owner published");
                        }
                        // Writes held at a recall point go on (with the new layout).
                        if let Some((cache, _)) = &rt.cache {
                            cache.resume_writes();
                        }
                    }
                    Err(reason) => self.post(Input::LayoutRejected { attachment, context, reason }),
                }
            }
            Effect::Revoke { attachment, reason } => {
                if let Some(rt) = self.attachments.get(&attachment) {
                    rt.gate.revoke(reason);
                    // Held writes now fail at the revoked gate.
                    if let Some((cache, _)) = &rt.cache {
                        cache.resume_writes();
                    }
                }
            }
            Effect::Locks { attachment, table } => {
                if let Some(rt) = self.attachments.get(&attachment) {
                    rt.device.set_range_locks(table);
                }
            }
            Effect::RenewLease { attachment, until_ms } => {
                let until = self.instant(until_ms);
                if let Some(rt) = self.attachments.get(&attachment) {
                    rt.gate.renew_lease(until);
                }
            }
            Effect::StartDetach { attachment, flush } => self.start_detach(attachment, flush),
            Effect::LeaveKernelConnected { attachment } => {
                if let Some(rt) = self.attachments.get_mut(&attachment) {
                    // Dropping stops its monitor and leaves the device connected.
                    drop(rt.kernel.take());
                }
            }
            Effect::Forget { attachment } => {
                if let Some(rt) = self.attachments.remove(&attachment) {
                    rt.gate.close();
                }
            }
            Effect::ReportPathFailure { device, index, reason } => {
                let (link, tx) = (self.link.clone(), self.tx.clone());
                tokio::spawn(
                    async move {
                        match link.report_failure(index, &reason).await {
                            Ok(marked_failed) => {
                                let _ = tx.send(ToOwner::Input(Input::FailureReported { device, marked_failed }));
                            }
                            Err(e) => warn!(device, error = %e, "could not report the failed direct path"),
                        }
                    }
                    .in_current_span(),
                );
            }
            Effect::ReportPathRecovered { device, index } => {
                let link = self.link.clone();
                tokio::spawn(
                    async move {
                        if let Err(e) = link.report_recovered(index).await {
                            warn!(device, error = %e, "could not report the recovered direct path");
                        }
                    }
                    .in_current_span(),
                );
            }
            Effect::Probe { device } => match self.pool.find(&device) {
                Some(d) => {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let outcome = if d.probe().await { ProbeOutcome::Works } else { ProbeOutcome::Fails };
                        let _ = tx.send(ToOwner::Input(Input::ProbeDone { device, outcome }));
                    });
                }
                None => self.post(Input::ProbeDone { device, outcome: ProbeOutcome::Gone }),
            },
            Effect::DirectPathBack { device } => {
                if let Some(d) = self.pool.find(&device) {
                    d.set_direct();
                }
            }
            Effect::MarkDeviceFailed { device } => {
                if let Some(d) = self.pool.find(&device) {
                    d.path().marked_failed.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            Effect::SaveState { handles } => {
                // Synchronous on purpose: the effects after it (a recall's
                // confirmation) must not happen before it is on disk. A
                // small file, written on attach, detach and recalls only.
                if let Some(dir) = &self.config.state {
                    if let Err(e) = dir.save(&handles) {
                        tracing::error!(error = %e, "cannot write the state file: a restarted agent would not take these volumes back at once");
                    }
                }
            }
            Effect::State(state) => {
                self.state.send_replace(state);
            }
            Effect::Stopped => info!("the agent's control plane has stopped"),
        }
    }

    fn connect(&mut self, conn: ConnId, addr: usize) {
        let addr = self.addrs[addr % self.addrs.len()].clone();
        let (c, tx): (SessionConfig, _) = (self.config.session.clone(), self.tx.clone());
        self.connecting = Some(tokio::spawn(
            async move {
                let message =
                    match ControlClient::connect(&addr, &c.key, Some(&c.server_key), Role::Agent, &c.name, c.instance)
                        .await
                    {
                        Ok((client, events)) => ToOwner::Connected { conn, client, events },
                        Err(e) => {
                            let fatal = matches!(&e, ControlClientError::Handshake { .. });
                            ToOwner::Input(Input::ConnectFailed { conn, error: e.to_string(), fatal })
                        }
                    };
                let _ = tx.send(message);
            }
            .in_current_span(),
        ));
    }

    fn reply(&mut self, caller: CallerId, reply: Reply) {
        match self.waiters.remove(&caller) {
            Some(Waiter::Command(tx)) => {
                let reply = match reply {
                    Reply::Attached(mut info) => {
                        self.fill_counters(&mut info);
                        Reply::Attached(info)
                    }
                    Reply::List(mut list) => {
                        list.iter_mut().for_each(|info| self.fill_counters(info));
                        Reply::List(list)
                    }
                    other => other,
                };
                let _ = tx.send(reply);
            }
            Some(Waiter::Cow(tx)) => {
                let result = match reply {
                    Reply::Registered(r) => r,
                    other => Err(format!("unexpected answer to a registration: {other:?}")),
                };
                let _ = tx.send(result);
            }
            None => warn!(caller = caller.0, "a reply for a caller nobody knows"),
        }
    }

    /// The I/O counters only the gate knows, and the cache's state.
    fn fill_counters(&self, info: &mut crate::core::AttachmentInfo) {
        if let Some(rt) = self.attachments.values().find(|rt| rt.volume == info.volume) {
            let status = rt.gate.status();
            info.io_in_flight = status.in_flight;
            info.io_waiting = status.waiting;
            info.cache = rt.cache.as_ref().map(|(cache, path)| cache_info(cache, path));
            info.writes_behind = rt.device.writes_behind() as u64;
        }
    }

    /// Installs the gate and the volume device of a newly opened handle,
    /// then starts the attach task.
    fn start_attach(
        &mut self,
        attachment: AttachmentId,
        volume: String,
        handle: u64,
        description: VolumeDescription,
        plan: AttachPlan,
    ) {
        let AttachPlan { mode, lease_until_ms, export, kernel, cow_by_server, resumed } = plan;
        let generation = description.layout_generation;
        let layout = match (self.builder)(description, handle) {
            Ok(layout) => Arc::new(layout),
            Err(reason) => {
                let e = AgentError::Session(crate::session::SessionError::Layout { volume, reason });
                let _ = self.tx.send(ToOwner::Prepared { attachment, result: Err(e) });
                return;
            }
        };
        let gate = Arc::new(Gate::new(layout.clone(), generation));
        gate.renew_lease(self.instant(lease_until_ms));
        let registrar = Arc::new(OwnerRegistrar { owner: self.inbox_tx.clone(), volume: volume.clone() });
        let registrations = Registrations::new(registrar, mode == OpenMode::SharedWrite || cow_by_server);
        let mut device = VolumeDevice::new(volume.clone(), handle, mode == OpenMode::ReadOnly, gate.clone())
            .with_cow(registrations)
            .with_write_behind(self.config.cow_write_behind_bytes);
        let d = layout.description();
        if d.mirror_legs > 1 && mode != OpenMode::ReadOnly && !crate::intent::disabled_by_env() {
            let recorder = Arc::new(OwnerIntents { owner: self.inbox_tx.clone(), volume: volume.clone() });
            let region_bytes = volume_format::metadata::intent_region_bytes(d.extent_bytes);
            device = device.with_intent(IntentLog::start(recorder, region_bytes, d.size_bytes));
        }
        let device = device.into_arc();
        self.attachments.insert(
            attachment,
            Runtime {
                volume: volume.clone(),
                handle,
                gate,
                device: device.clone(),
                export: None,
                kernel: None,
                cache: None,
            },
        );
        // Only an exclusive holder caches writes (the server refuses the
        // mirror to anyone else).
        let cache = (mode == OpenMode::Exclusive).then(|| {
            let current = self.current.clone();
            let source: crate::cache::mirror::ClientSource = Arc::new(move || {
                let current = current.lock().unwrap_or_else(|p| p.into_inner());
                current.as_ref().map(|(conn, client)| (conn.0, client.clone()))
            });
            CachePlan {
                log_path: self.config.cache_log_path(&volume),
                read_cache_bytes: self.config.cache_read_bytes,
                destage_hold: self.config.cache_destage_hold,
                resumed,
                mirror: Arc::new(ControlMirror::with_source(source, HandleId(handle))),
            }
        });
        let backend =
            crate::kernel::BackendId { pool: layout.description().pool_uuid, mode, handle, volume: volume.clone() };
        let task = AttachTask {
            attachment,
            owner: self.tx.clone(),
            pool: self.pool.clone(),
            layout,
            device,
            volume,
            handle,
            mode,
            export,
            kernel,
            backend: backend.to_string(),
            settings: self.config.kernel,
            cache,
        };
        let tx = self.tx.clone();
        tokio::spawn(
            async move {
                let result = task.run().await;
                let _ = tx.send(ToOwner::Prepared { attachment, result });
            }
            .in_current_span(),
        );
    }

    fn start_detach(&mut self, attachment: AttachmentId, flush: bool) {
        let Some(rt) = self.attachments.get_mut(&attachment) else {
            let _ = self.tx.send(ToOwner::Detached { attachment, result: Ok(()), leftovers: Leftovers::default() });
            return;
        };
        let task = DetachTask {
            gate: rt.gate.clone(),
            device: rt.device.clone(),
            export: rt.export.take(),
            kernel: rt.kernel.take(),
            flush,
            volume: rt.volume.clone(),
            cache: rt.cache.as_ref().map(|(c, _)| c.clone()),
        };
        let tx = self.tx.clone();
        tokio::spawn(
            async move {
                let (result, leftovers) = task.run().await;
                let _ = tx.send(ToOwner::Detached { attachment, result, leftovers });
            }
            .in_current_span(),
        );
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => at.sleep_until().await,
        None => std::future::pending().await,
    }
}

/// An attach's long steps: connect every online device (so an unreachable
/// one fails the attach with its name instead of failing the first I/O),
/// serve the export, attach the kernel device. Undoes its own steps on
/// failure; the owner then closes the gate and the handle.
struct AttachTask {
    attachment: AttachmentId,
    /// The owner, told of the cache before the export serves
    /// ([`ToOwner::CacheOpened`]).
    owner: mpsc::UnboundedSender<ToOwner>,
    pool: Arc<DevicePool>,
    layout: Arc<Layout>,
    device: Arc<VolumeDevice>,
    volume: String,
    handle: u64,
    mode: OpenMode,
    export: ExportTarget,
    kernel: Option<KernelPlan>,
    backend: String,
    settings: crate::kernel::KernelSettings,
    cache: Option<CachePlan>,
}

/// How an exclusive attach finds out whether the volume is cached, and
/// opens its cache (see [`CachePlan::open`]).
struct CachePlan {
    /// `None`: the agent has no cache directory (no state directory either).
    log_path: Option<std::path::PathBuf>,
    /// Memory for the cache's clean blocks ([`crate::cache::clean`]).
    read_cache_bytes: u64,
    /// [`crate::cache::CacheConfig::destage_hold`].
    destage_hold: std::time::Duration,
    resumed: bool,
    mirror: Arc<ControlMirror>,
}

impl CachePlan {
    /// The volume's cache in front of `device`, or `None` when it has none.
    ///
    /// After a fresh open the server has replayed the volume's mirror, so
    /// an old local log is dropped ([`OldLog::Discard`]) and the server is
    /// asked for the setting. After a resume (a restart took the handle
    /// back) the server replayed nothing: the old log is written to the
    /// devices first ([`OldLog::Replay`]), and only then is the mirror
    /// started afresh (it holds the same writes).
    async fn open(
        &self,
        volume: &str,
        device: Arc<VolumeDevice>,
        id: volume_format::VolumeId,
    ) -> Result<Option<Arc<CachedDevice>>, String> {
        let old_log_bytes = self.log_path.as_ref().and_then(|p| p.metadata().ok()).map_or(0, |m| m.len());
        let (log_bytes, old) = if self.resumed && old_log_bytes > 0 {
            (old_log_bytes, OldLog::Replay)
        } else {
            let setting = match self.mirror.setting().await {
                Ok(setting) => setting,
                // After a resume the mirror may hold the previous run's
                // writes: serving without the cache, a later replay of it
                // would put them over newer ones. Failing closes the handle;
                // the next open replays the mirror.
                Err(e) if self.resumed => return Err(e),
                Err(e) => {
                    // Safe without the cache: after a fresh open the server's
                    // mirror holds nothing, and nothing is ever appended to it.
                    warn!(volume, error = %e, "cannot tell whether the volume has a write-back cache; serving it without one");
                    return Ok(None);
                }
            };
            match setting {
                Some(setting) => (setting.size_bytes, OldLog::Discard),
                None => {
                    // A log left from when the volume was cached is stale (the
                    // server replayed its mirror before this open); a resume
                    // after a crash must not find and replay it.
                    if let Some(path) = self.log_path.as_ref().filter(|_| old_log_bytes > 0) {
                        std::fs::remove_file(path)
                            .map_err(|e| format!("removing the stale cache log {}: {e}", path.display()))?;
                        info!(volume, log = %path.display(), "removed the cache log of when the volume was cached");
                    }
                    return Ok(None);
                }
            }
        };
        let Some(log_path) = &self.log_path else {
            warn!(volume, "the volume has a write-back cache, but the agent has no --cache-dir (nor --state-dir): its writes go straight to the devices");
            return Ok(None);
        };
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cache directory {}: {e}", dir.display()))?;
        }
        let config = CacheConfig {
            log_path: log_path.clone(),
            log_bytes,
            read_cache_bytes: self.read_cache_bytes,
            destage_hold: self.destage_hold,
        };
        let before_logged: Arc<dyn crate::cache::BeforeLogged> = device.clone();
        let cache =
            CachedDevice::open_mirrored_with(device, id, &config, self.mirror.clone(), old, Some(before_logged))
                .await
                .map_err(|e| format!("write-back cache: {e}"))?;
        info!(
            volume,
            log = %log_path.display(),
            log_bytes,
            replayed = cache.replayed_records(),
            state = %cache.report().mirror,
            "write-back cache open"
        );
        let cache = Arc::new(cache);
        crate::metrics::cache_opened(volume, &cache);
        let mirror = self.mirror.clone();
        let send = move |report| {
            let mirror = mirror.clone();
            async move { mirror.report(report).await }
        };
        crate::cache::report::spawn(Arc::downgrade(&cache), send, volume.to_string());
        Ok(Some(cache))
    }
}

/// What `sanvol-agent list` shows of a cache.
fn cache_info(cache: &CachedDevice, log_path: &str) -> control_client::agent_api::CacheInfo {
    let report = cache.report();
    let (state, state_detail) = crate::cache::report::state_names(&report.mirror);
    control_client::agent_api::CacheInfo {
        state: state.to_string(),
        state_detail,
        dirty_bytes: report.status.dirty_bytes,
        log_used_bytes: report.status.log_used_bytes,
        log_capacity_bytes: report.status.log_capacity_bytes,
        destage_bytes_per_sec: report.destage_bytes_per_sec,
        destaged_bytes: report.destaged_bytes,
        destage_writes: report.destage_writes,
        written_around_bytes: report.written_around_bytes,
        writes_waiting_for_mirror: report.writes_waiting_for_mirror,
        read_cache_bytes: report.read_cache.bytes,
        read_cache_capacity_bytes: report.read_cache.capacity_bytes,
        read_hits: report.read_cache.hits,
        read_misses: report.read_cache.misses,
        log_path: log_path.to_string(),
    }
}

impl AttachTask {
    async fn run(self) -> Result<Ready, AgentError> {
        let volume = self.volume.clone();
        let description = self.layout.description();
        if let Some(KernelPlan::Reconnect { index, backend, pool }) = &self.kernel {
            if *pool != description.pool_uuid {
                let e = crate::kernel::KernelError::WrongBackend {
                    device: crate::kernel::device_path(*index),
                    expected: format!("pool {}", description.pool_uuid),
                    found: backend.clone(),
                };
                return Err(AgentError::Kernel { volume, message: e.to_string() });
            }
        }
        let connects = description.devices.iter().filter(|e| e.online || e.resyncing).map(|endpoint| {
            let pool = self.pool.clone();
            let pool_uuid = description.pool_uuid;
            async move {
                match pool.device(endpoint, pool_uuid) {
                    Ok(device) => device.connect().await.map_err(|e| e.message),
                    Err(e) => Err(e.to_string()),
                }
            }
        });
        if let Some(Err(message)) = futures::future::join_all(connects).await.into_iter().find(|r| r.is_err()) {
            return Err(AgentError::Device { volume, message });
        }
        let cache = match &self.cache {
            Some(plan) => plan
                .open(&volume, self.device.clone(), description.volume)
                .await
                .map_err(|message| AgentError::Device { volume: volume.clone(), message })?,
            None => None,
        };
        if let Some(cache) = &cache {
            // The owner must know of the cache before a write reaches it: a
            // recall then destages it (see `ToOwner::CacheOpened`).
            let (ack, acked) = oneshot::channel();
            let _ = self.owner.send(ToOwner::CacheOpened { attachment: self.attachment, cache: cache.clone(), ack });
            if acked.await.is_err() {
                return Err(AgentError::Export { volume, message: "the agent is stopping".into() });
            }
        }
        let text = format!("sanvol volume {volume} ({}, handle {})", self.mode, self.handle);
        let served: Arc<dyn BlockDevice> = match &cache {
            Some(cache) => cache.clone(),
            None => self.device.clone(),
        };
        let device: Arc<dyn BlockDevice> = Arc::new(crate::metrics::Metered::new(&volume, served));
        let export = serve_volume(&volume, text, device.clone(), &self.export)
            .await
            .map_err(|e| AgentError::Export { volume: volume.clone(), message: e.to_string() })?;
        // Crash tests: the export serves before the owner hears of it
        // (`agent-attach-serving:sleep=MS` widens that window).
        if let Some(wait) = control_client::fault::hit("agent-attach-serving") {
            tokio::time::sleep(wait).await;
        }
        let kernel = match &self.kernel {
            None => return Ok(Ready { export, kernel: None, kernel_note: None, cache }),
            Some(KernelPlan::Connect { index }) => {
                KernelAttachment::connect(&volume, device, *index, self.backend.clone(), self.settings).await
            }
            Some(KernelPlan::Reconnect { index, backend, .. }) => {
                KernelAttachment::reconnect(&volume, device, *index, backend.clone(), self.settings).await
            }
        };
        match kernel {
            Ok(kernel) => Ok(Ready { export, kernel: Some(kernel), kernel_note: None, cache }),
            Err(crate::kernel::KernelError::NotLoaded) => {
                warn!(volume, "{}; serving {} only", crate::kernel::NOT_LOADED, export.uri());
                let note = format!("{} ({})", crate::kernel::NOT_LOADED, export.uri());
                Ok(Ready { export, kernel: None, kernel_note: Some(note), cache })
            }
            Err(e) => {
                // Clients may have found the export already: stop it, then flush what they wrote.
                export.stop().await;
                if let Some(cache) = &cache {
                    cache.destage_all().await;
                }
                if self.mode != OpenMode::ReadOnly {
                    if let Err(flush) = self.device.flush().await {
                        warn!(volume, error = %flush, "flush after a failed kernel attach failed");
                    }
                }
                Err(AgentError::Kernel { volume, message: e.to_string() })
            }
        }
    }
}

/// A detach's long steps: flush and disconnect the kernel device (if its
/// flush fails it stays connected), destage the write-back cache and flush
/// (if either fails the volume stays attached), stop the export (connected
/// clients finish their in-flight requests), destage and flush again
/// (writes that raced the first flush), close the gate and wait for
/// in-flight I/O.
struct DetachTask {
    gate: Arc<Gate<Layout>>,
    device: Arc<VolumeDevice>,
    export: Option<ExportHandle>,
    kernel: Option<KernelAttachment>,
    flush: bool,
    volume: String,
    cache: Option<Arc<CachedDevice>>,
}

impl DetachTask {
    /// Every write the cache acknowledged is on the devices, within
    /// [`DETACH_DESTAGE_MAX`].
    async fn destage(&self) -> Result<(), String> {
        let Some(cache) = &self.cache else { return Ok(()) };
        tokio::time::timeout(DETACH_DESTAGE_MAX, cache.destage_all()).await.map_err(|_| {
            format!(
                "the write-back cache could not write what it holds ({} bytes) to the devices within {} s \
                 (is a device unreachable?); it keeps it; retry",
                cache.status().dirty_bytes,
                DETACH_DESTAGE_MAX.as_secs()
            )
        })
    }
}

impl DetachTask {
    async fn run(mut self) -> (Result<(), DetachFailure>, Leftovers) {
        if let Some(kernel) = self.kernel.as_mut() {
            if let Err(e) = kernel.detach().await {
                return (
                    Err(DetachFailure::Kernel(e.to_string())),
                    Leftovers { export: self.export, kernel: self.kernel },
                );
            }
            self.kernel = None;
        }
        if self.flush {
            if let Err(e) = self.destage().await {
                return (Err(DetachFailure::Flush(e)), Leftovers { export: self.export, kernel: None });
            }
            if let Err(e) = self.device.flush().await {
                return (Err(DetachFailure::Flush(e.to_string())), Leftovers { export: self.export, kernel: None });
            }
        }
        if let Some(export) = self.export.take() {
            export.stop().await;
        }
        if self.flush {
            if let Err(e) = self.destage().await {
                warn!(volume = self.volume, error = %e, "destaging the cache after stopping the export failed");
            }
            if let Err(e) = self.device.flush().await {
                warn!(volume = self.volume, error = %e, "flush after stopping the export failed");
            }
        }
        self.gate.close();
        let _ = self.gate.drained().await;
        // Nothing is in flight now: regions where a write failed are copied
        // before the close makes the server forget them (`crate::intent`).
        if let Some(log) = self.device.intent() {
            let resync = tokio::time::timeout(DETACH_RESYNC_MAX, log.resync_before_close()).await;
            let resync = resync.unwrap_or_else(|_| {
                Err(format!(
                    "the metadata server did not copy the regions where a write failed within {} s",
                    DETACH_RESYNC_MAX.as_secs()
                ))
            });
            if let Err(e) = resync {
                return (Err(DetachFailure::LeaveHandle(e)), Leftovers::default());
            }
        }
        (Ok(()), Leftovers::default())
    }
}

/// Records write-intent regions of one volume through the owner.
struct OwnerIntents {
    owner: mpsc::Sender<ToOwner>,
    volume: String,
}

#[async_trait::async_trait]
impl IntentRecorder for OwnerIntents {
    async fn record(&self, mark: Vec<u64>, clear: Vec<u64>) -> Result<(), String> {
        self.send(crate::core::IntentOp::Record { mark, clear }).await
    }

    async fn resync(&self) -> Result<(), String> {
        self.send(crate::core::IntentOp::Resync).await
    }
}

impl OwnerIntents {
    async fn send(&self, op: crate::core::IntentOp) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        let message = ToOwner::Intent { volume: self.volume.clone(), op, reply };
        if self.owner.send(message).await.is_err() {
            return Err("the agent is shutting down".to_string());
        }
        answer.await.unwrap_or_else(|_| Err("the agent is shutting down".to_string()))
    }
}

/// Registers copy-on-write chunks of one volume through the owner.
struct OwnerRegistrar {
    owner: mpsc::Sender<ToOwner>,
    volume: String,
}

#[async_trait::async_trait]
impl CowRegistrar for OwnerRegistrar {
    async fn register(&self, snapshot: u64, chunks: Vec<u64>, server_copies: bool) -> Result<(), String> {
        crate::metrics::cow_registered(&self.volume, chunks.len());
        let (reply, answer) = oneshot::channel();
        let message = ToOwner::Cow { volume: self.volume.clone(), snapshot, chunks, server_copies, reply };
        if self.owner.send(message).await.is_err() {
            return Err("the agent is shutting down".to_string());
        }
        answer.await.unwrap_or_else(|_| Err("the agent is shutting down".to_string()))
    }
}
