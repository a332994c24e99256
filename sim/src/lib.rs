//! Deterministic simulation of sanvol's control protocol.
//!
//! One thread, virtual time, one seed: a whole world — one or two metadata
//! server hosts running the **real** server core ([`metadata_server`]'s
//! `Core`), two to eight agents, three to five devices, an admin — runs
//! through faults (dropped connections, partitions, crashes and restarts,
//! process and VM pauses, device power loss) while a workload writes,
//! flushes, reads, snapshots, grows, hands over and detaches, and the
//! invariants ([`observer`]) are checked after every step. A failure names
//! its seed; the same seed replays the same run, event for event, with a
//! full trace (`SIM_SEED=N`). This is FoundationDB's and TigerBeetle's VOPR
//! approach, applied to leases, durable handles, recalls, the grace period
//! and copy-on-write registration.
//!
//! # Running it
//! - `cargo test -p sanvol-sim`: a fixed set of seeds (seconds).
//! - `SIM_SEED=N cargo test -p sanvol-sim --test seeds -- replay --nocapture`:
//!   one seed with every event and the cores' logs, in simulated time
//!   (`RUST_LOG=debug` for more).
//! - `scripts/sim-seeds.sh`: random seeds in a release build for
//!   `SIM_SECONDS` (default 180); prints each failing seed and how to replay
//!   it (`scripts/test.sh` runs it).
//!
//! `sim/README.md` has the rest: the demonstration defects with their seeds
//! and times, known defects, and step by step how to add a fault and an
//! invariant.
//!
//! # How the world is simulated
//! - **Time** ([`world`]): a queue of timed events; events at the same
//!   millisecond run in the order scheduled. Nothing reads a real clock.
//!   Each process has its own clocks derived from true time: a server's
//!   `Now` is its lease clock since the term began and the wall clock; an
//!   agent's lease clock is boot time. Both count VM pauses, as production's
//!   `CLOCK_BOOTTIME` does (`Config::agent_clock`, `Config::server_clock`);
//!   a VM pause adds to a process's *monotonic lag*, so a process on
//!   `LeaseClock::Monotonic` (code that read `CLOCK_MONOTONIC`) would see
//!   time stand still.
//! - **Processes**: an event is for one incarnation of a process; a crash
//!   ends the incarnation (its events are dropped, its connections break,
//!   its device requests in flight still land), a restart starts a new one
//!   (a server reloads the metadata from the devices and builds a new
//!   `Core`; an agent is a new instance that remembers nothing). A pause
//!   holds a process's events until it continues.
//! - **Network** ([`net`]): one ordered stream per connection and
//!   direction, random delays, nothing ordered across connections; breaks,
//!   and partitions that delay traffic or, when long, break connections.
//!   Server replies take a hop through the session task that events do not
//!   (as in `server::session`).
//! - **Devices** ([`device`]): blocks hold workload tags or raw bytes;
//!   per-request latency; unflushed writes may be lost and writes in flight
//!   torn on a power loss.
//! - **The server** ([`server`]): the real `Core`, and a shell that does
//!   what the production shell does (sessions, role checks, the device
//!   task's commits with the real slot format, jobs, ticks, boot through
//!   `MetadataArea::choose_newest`).
//! - **Two servers and the pool lease** ([`lease`], half of the seeds):
//!   each host runs a server for good; the real `LeaseMachine` on the
//!   devices' lease areas decides which one serves; the other stands by
//!   (`NotActive`), takes over when the lease lapses, or is handed the pool
//!   (`sim/README.md`, "The two-server world").
//! - **Agents** ([`agent`]): the real agent core
//!   (`client_agent::core::AgentCore`) in a shell that does what the
//!   agent's owner does, and a data path with the gate, lease and
//!   copy-on-write rules.
//! - **Write-back cache mirrors** (issue 15; [`mirror`], `agent::cache`):
//!   exclusive holders of cached volumes log writes, mirror them at the
//!   server and acknowledge once mirrored; destage rounds flush before they
//!   release; a failed mirror is started again with the log's records
//!   staged at the server first (protocol 15); a dead holder's mirror is
//!   replayed by the real core before the volume opens again
//!   (`sim/README.md`, "Write-back cache mirrors").
//! - **Workload** ([`app`]), **data model** ([`oracle`]), **invariants**
//!   ([`observer`]).
//!
//! What runs unchanged: the server core (`Core::apply` and everything it
//! calls: handles, leases, recalls, resumes, grace, snapshots, COW
//! registration), the metadata format (slot encoder/decoder, newest-slot
//! choice, metadata checks, allocation, snapshot maps), the volume
//! description and its mapping, the control-protocol messages.
//!
//! # Adding a fault or an invariant
//! See `sim/README.md`: a fault is a rate in [`config::FaultRates`], an arm
//! in `World::inject_fault` and its undoing in `World::settle`; an invariant
//! is a check in one of [`observer`]'s hooks that calls `env.fail` with the
//! rule's name, listed in the table of [`observer`]'s docs.

pub mod agent;
pub mod app;
pub mod config;
pub mod device;
pub mod lease;
/// The cache mirrors a server host keeps on its disk (issue 15).
pub mod mirror;
pub mod net;
pub mod observer;
pub mod oracle;
pub mod rng;
pub mod server;
pub mod trace;
pub mod world;

use volume_format::control::messages::{ControlError, Request, Response, ServerEvent};

pub use config::Config;
pub use world::{Outcome, Violation, World};

/// Runs the world of `config`; `verbose` prints every event and the code
/// under test's logs as they happen.
pub fn run(config: Config, verbose: bool) -> Outcome {
    if verbose {
        trace::with_logs(|| World::new(config, true).run())
    } else {
        World::new(config, false).run()
    }
}

/// Runs seed `seed` with the configuration it draws.
pub fn run_seed(seed: u64, verbose: bool) -> Outcome {
    run(Config::from_seed(seed), verbose)
}

/// One line for a request, for traces.
pub fn describe_request(r: &Request) -> String {
    match r {
        Request::Resume { .. } => "Resume".into(),
        Request::OpenHandover { .. } => "OpenHandover".into(),
        Request::ClientAuthorize { name, .. } => format!("ClientAuthorize {name}"),
        other => format!("{other:?}"),
    }
}

/// One line for a reply, for traces.
pub fn describe_result(r: &Result<Response, ControlError>) -> String {
    match r {
        Ok(Response::Opened(o)) => format!(
            "Opened handle {} {} layout generation {}{}",
            o.handle.0,
            o.mode,
            o.description.layout_generation,
            o.description.snapshot.as_ref().map_or(String::new(), |s| format!(" snapshot {}", s.id))
        ),
        Ok(Response::HandoverToken { .. }) => "HandoverToken".into(),
        Ok(Response::Volumes(_)) | Ok(Response::Pool(_)) | Ok(Response::Devices(_)) => "a listing".into(),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("Err({:?}: {})", e.code, e.message),
    }
}

/// One line for an event, for traces.
pub fn describe_event(e: &ServerEvent) -> String {
    match e {
        ServerEvent::Recall { handle, generation } => format!("Recall handle {} generation {generation}", handle.0),
        ServerEvent::Publish { handle, description } => format!(
            "Publish handle {} generation {}{}",
            handle.0,
            description.layout_generation,
            description.snapshot.as_ref().map_or(String::new(), |s| format!(" snapshot {}", s.id))
        ),
        ServerEvent::Revoked { handle, reason } => format!("Revoked handle {}: {reason}", handle.0),
        ServerEvent::Redirect { addrs, reason } => format!("Redirect to {addrs:?}: {reason}"),
        ServerEvent::Locks { handle, locks } => format!("Locks handle {}: {} holders", handle.0, locks.holders.len()),
        ServerEvent::Recovery { handle, status } => match status {
            Some(s) => format!("Recovery handle {}: {s}", handle.0),
            None => format!("Recovery handle {}: over", handle.0),
        },
    }
}
