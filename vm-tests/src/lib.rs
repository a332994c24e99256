//! Boots a throwaway Linux VM to test what only a real kernel can show.
//!
//! The build machines' kernel has no NBD driver, so everything that needs `/dev/nbdX` — the agent's
//! kernel attach, a real filesystem on a sanvol volume, reattach without unmounting — is tested inside
//! a QEMU guest. The guest is deliberately tiny: Debian's stock kernel (the same one a user runs),
//! an initramfs with busybox, the few kernel modules the scenario needs, and the host binaries the
//! scenario names (copied with their shared libraries). There is no disk image and no distribution to
//! boot: `/init` sets up the network, runs the scenario's shell script and prints one result line,
//! `SANVOL-VM-RESULT: PASS` or `SANVOL-VM-RESULT: FAIL <reason>`, then powers the VM off.
//!
//! # Layout
//! - [`Scenario`]: what to run in the guest (script, binaries, modules, environment, timeout).
//! - [`Vm`]: one running guest; waits for console lines and the result marker, enforces the wall-clock
//!   timeout and kills QEMU when dropped (also on panic). [`VmReport`] is what a finished run says.
//! - [`kernel`]: downloads and caches Debian's kernel package, unpacks the kernel and modules.
//! - [`initramfs`]: the `newc` cpio writer and the builder that copies binaries with their libraries.
//! - [`host`]: host-side helpers for scenarios (an NBD export the guest can reach).
//! - [`deps`]: checks (and if allowed installs) the host tools the runner needs.
//!
//! # Network
//! QEMU's user-mode network (slirp) gives the guest 10.0.2.15; 10.0.2.2 is the host's loopback. The
//! guest gets a host route to 10.0.2.2 only — no subnet route, no default route, no IPv6 — so a
//! scenario can reach services the test started on 127.0.0.1 and nothing else.

pub mod deps;
mod error;
pub mod host;
pub mod initramfs;
pub mod kernel;
mod paths;
mod scenario;
mod vm;

pub use error::VmError;
pub use paths::{artifact_dir, cache_dir};
pub use scenario::Scenario;
pub use vm::{Verdict, Vm, VmReport, GUEST_HOST_ADDR, RESULT_MARKER};
