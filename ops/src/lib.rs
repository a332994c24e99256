//! What makes sanvol's binaries operable like the tools operators already
//! run, kept out of the crates that do the storage work:
//!
//! - [`logging`]: `--log-format text|json` for every binary (JSON lines carry
//!   the fields and spans the text format shows, for log shippers).
//! - [`metrics`]: the Prometheus `/metrics` endpoint (`--metrics-addr`) over
//!   the `prometheus` crate's default registry, where the agent and the
//!   metadata server register their own metrics.
//! - [`notify`]: systemd readiness (`Type=notify`) through `NOTIFY_SOCKET`.
//! - [`host`]: host facts that decide latency more than the code (idle
//!   vCPUs that halt without polling), logged once at start.
//! - [`docs`]: man pages and shell completions generated from the same clap
//!   `Command` that parses the arguments, so they cannot drift apart.
//!
//! Why one crate: every binary needs the same edges, and none of them
//! belongs in a storage crate's dependency tree twice.

pub mod docs;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod notify;
