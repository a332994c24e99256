//! What one seed simulates: the size of the world, the protocol's timings,
//! the workload's pace and how often each fault strikes. All of it is drawn
//! from the seed ([`Config::from_seed`]), so a seed names a whole scenario;
//! tests may adjust a drawn config before running it (a known-defect test
//! turns one knob up).

use crate::rng::Rng;

/// Which clock a process measures leases on (the agent's core and gate;
/// the server's core, its pool-lease machine and commit window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseClock {
    /// `CLOCK_BOOTTIME`: runs through a VM pause — what production reads
    /// (`blockio::clock::LeaseInstant`, the fencing timing rules).
    Boottime,
    /// `CLOCK_MONOTONIC`: stops while the VM is paused — what the agent and
    /// the server read before the timing rules (tokio's `Instant`): after a
    /// long VM pause a process believes a lease that ran out everywhere
    /// else. Kept to show the simulator catches it (`demos/monotonic.patch`).
    Monotonic,
}

/// How often each fault strikes, as a mean number per simulated second
/// across the whole world (0 disables it). See the crate docs for what each
/// one does and how to add another.
#[derive(Debug, Clone)]
pub struct FaultRates {
    /// A control connection breaks (both ends notice, at different times).
    pub conn_drop: f64,
    /// An agent (or the admin) is cut off from the server hosts for a while;
    /// long cuts break its connections.
    pub partition: f64,
    pub server_crash: f64,
    /// The server process stops (SIGSTOP) and continues later.
    pub server_pause: f64,
    pub agent_crash: f64,
    /// An agent process stops and continues; its clocks run on.
    pub agent_pause: f64,
    /// An agent's VM is paused: the process stops *and* its monotonic clock
    /// stops with it (only its boot-time clock counts the pause).
    pub agent_vm_pause: f64,
    /// A device loses power: unflushed writes may be lost, writes in flight
    /// torn; it comes back after a short outage.
    pub device_crash: f64,
    /// Two-server world only: a metadata server's VM is paused — the process
    /// stops *and* its monotonic clock stops with it (its lease clock,
    /// `CLOCK_BOOTTIME`, counts the pause).
    pub server_vm_pause: f64,
    /// Two-server world only: a server host is cut off from the devices for
    /// a while (its device requests fail; nothing it sends lands).
    pub server_device_cut: f64,
    /// Two-server world only: the admin asks the active server to hand the
    /// pool to the standby (`sanvol mds handoff`), as a mean per second.
    pub handoff: f64,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// Simulated time the workload and faults run for; then the world
    /// settles (faults stop, crashed processes restart) and is checked.
    pub duration_ms: u64,
    pub settle_ms: u64,
    /// Hosts a metadata server may run on. With `servers == 1`, one server
    /// runs at a time and after a crash it restarts on any of them (a cold
    /// failover; the pool lease is not simulated). With `servers == 2`, every
    /// host runs its own server for good (host id = host + 1) and the pool
    /// lease decides which one is active ([`crate::lease`]).
    pub server_hosts: usize,
    /// 1: the one-server world above; 2: two servers, one active by the pool
    /// lease, the other standing by.
    pub servers: usize,
    /// The pool lease's I/O timeout `T` (`lease_io_timeout_ms`); two-server
    /// world only.
    pub lease_io_timeout_ms: u64,
    /// Which volumes have a mirrored write-back cache (issue 15): bit `v`
    /// for the initial volume `v`, bit 63 for volumes the admin creates
    /// later (each then by a draw of its own). 0: none, and the agents never
    /// ask a server for a mirror, so the world is exactly the one drawn
    /// before caches were simulated.
    pub cache_mask: u64,
    /// Whether the agents keep the write-intent log of mirrored volumes
    /// (protocol 8, `client_agent::intent`): they record a region dirty
    /// before writing it and the server copies what a gone holder left
    /// dirty before the volume opens again. Otherwise they speak protocol 7
    /// and the server treats their mirrored writes as untracked.
    pub intent_log: bool,
    pub agents: usize,
    pub devices: usize,
    pub lease_ms: u64,
    pub durable_ms: u64,
    pub grace_ms: u64,
    /// One-way network delay of a control message.
    pub net_delay_ms: (u64, u64),
    /// Extra delay before a server reply enters its connection (the hop
    /// through the session task; events do not take it, so an event can
    /// overtake a reply produced before it, as in the real server).
    pub reply_hop_ms: (u64, u64),
    /// Time a device takes to execute one request (sent to completed).
    pub device_latency_ms: (u64, u64),
    /// Now and then a device request stalls (stuck in the device server's
    /// queue): (probability, longest stall). Drawn for half the seeds.
    pub device_stall: (f64, u64),
    /// The longest a device request takes (latency + stall): the server's
    /// `device_request_max_ms`, which it waits past a holder's lease before
    /// acting on it (the fencing timing rules). The agent's own timeout of
    /// that length never fires here (no request takes longer), so it is not
    /// simulated.
    pub device_request_max_ms: u64,
    pub agent_clock: LeaseClock,
    /// The metadata servers' lease clock (the core's `Now`, the pool-lease
    /// machine and its commit window).
    pub server_clock: LeaseClock,
    pub extent_bytes: u64,
    /// Extents per device data area.
    pub device_extents: u64,
    pub volumes: usize,
    pub volume_extents: (u64, u64),
    /// Mean time between two workload steps of an agent.
    pub app_step_ms: u64,
    /// Mean time between two admin requests.
    pub admin_step_ms: u64,
    pub faults: FaultRates,
}

impl Config {
    /// The world seed `seed` simulates.
    pub fn from_seed(seed: u64) -> Config {
        Self::draw(seed, true)
    }

    /// The world seed `seed` simulated before the two-server world existed
    /// (one server at a time): how seeds found then replay as they did.
    pub fn one_server_world(seed: u64) -> Config {
        Self::draw(seed, false)
    }

    fn draw(seed: u64, two_servers_drawn: bool) -> Config {
        let mut r = Rng::new(seed ^ 0x5EED_C0F1_6000_0000);
        let lease_ms = r.range(600, 3000);
        let durable_ms = if r.chance(0.3) { 0 } else { r.range(lease_ms / 2, 3 * lease_ms) };
        let net_min = r.range(1, 4);
        let net_max = net_min + r.range(1, 20);
        let heavy = r.chance(0.5);
        let k = if heavy { 2.0 } else { 1.0 };
        let mut c = Config {
            seed,
            duration_ms: r.range(15_000, 40_000),
            settle_ms: 4 * (lease_ms + durable_ms) + 2_000,
            server_hosts: r.range(1, 2) as usize,
            agents: r.range(2, 8) as usize,
            devices: r.range(3, 5) as usize,
            lease_ms,
            durable_ms,
            grace_ms: if r.chance(0.3) { 0 } else { r.range(lease_ms / 2, 2 * lease_ms) },
            net_delay_ms: (net_min, net_max),
            reply_hop_ms: (0, r.range(0, 2)),
            device_latency_ms: (0, net_min),
            device_stall: (0.0, 0),
            device_request_max_ms: 0,
            agent_clock: LeaseClock::Boottime,
            server_clock: LeaseClock::Boottime,
            extent_bytes: 128 << 10,
            device_extents: 48,
            volumes: r.range(2, 5) as usize,
            volume_extents: (1, 3),
            app_step_ms: r.range(10, 60),
            admin_step_ms: r.range(300, 1500),
            faults: FaultRates {
                conn_drop: k * r.range(0, 30) as f64 / 100.0,
                partition: k * r.range(0, 15) as f64 / 100.0,
                server_crash: k * r.range(0, 8) as f64 / 100.0,
                server_pause: k * r.range(0, 8) as f64 / 100.0,
                agent_crash: k * r.range(0, 8) as f64 / 100.0,
                agent_pause: k * r.range(0, 10) as f64 / 100.0,
                agent_vm_pause: k * r.range(0, 8) as f64 / 100.0,
                device_crash: k * r.range(0, 5) as f64 / 100.0,
                server_vm_pause: 0.0,
                server_device_cut: 0.0,
                handoff: 0.0,
            },
            servers: 1,
            lease_io_timeout_ms: 0,
            cache_mask: 0,
            intent_log: false,
        };
        // Drawn after everything else, so a seed's one-server world is the
        // one it drew before two servers existed (old seeds replay as they
        // did).
        if r.chance(0.5) && two_servers_drawn {
            c.servers = 2;
            c.server_hosts = 2;
            c.lease_io_timeout_ms = r.range((lease_ms / 12).max(20), (lease_ms / 4).max(40));
            c.faults.server_device_cut = k * r.range(0, 5) as f64 / 100.0;
            c.faults.handoff = r.range(0, 10) as f64 / 100.0;
            c.settle_ms += 12 * c.lease_io_timeout_ms;
        }
        // Drawn after the two-server world, so every earlier draw is as it
        // was (the schedules still differ: the server now waits the device
        // margin past leases, and VM pauses and stalls strike).
        if c.two_servers() {
            c.faults.server_vm_pause = k * r.range(0, 5) as f64 / 100.0;
        }
        if r.chance(0.5) {
            c.device_stall = (r.range(1, 4) as f64 / 100.0, r.range(50, 1_000));
        }
        c.device_request_max_ms = c.device_latency_ms.1 + c.device_stall.1 + 1;
        c.settle_ms += 2 * c.device_request_max_ms;
        // Drawn last, so every earlier draw is as it was; half the worlds
        // have cached volumes (not the worlds old one-server seeds replay).
        if two_servers_drawn && r.chance(0.5) {
            c.cache_mask = r.u64() | 1 << 63;
        }
        // Drawn after the caches, so every earlier draw is as it was.
        if two_servers_drawn && r.chance(0.5) {
            c.intent_log = true;
        }
        c
    }

    /// Whether two servers share the pool by its lease.
    pub fn two_servers(&self) -> bool {
        self.servers >= 2
    }
}
