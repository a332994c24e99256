//! `sanvol-target`: an NBD server in front of one local file or disk that
//! enforces fencing for a sanvol pool.
//!
//! Why it exists: on plain NBD servers an excluded holder's writes are kept
//! off the devices only by timing (`volume_format::fencing`), which holds
//! only while every device request finishes within a bound. A device that
//! checks who writes needs no such bound: every connection presents a
//! capability signed by a metadata server of the pool (holder, generation,
//! device, writable ranges; `volume_format::capability`), and the metadata
//! server raises a holder's minimum generation and waits for the target's
//! acknowledgement — no older connection of that holder left open, none of
//! its requests still running — before it gives the volume to anyone else.
//!
//! # Layout
//! - [`fence`]: the state machine (minimum generations, admitted
//!   connections, in-flight requests) as a plain type.
//! - [`fencer`]: the shared live state, the per-connection fenced device,
//!   and the acknowledgement.
//! - [`exports`]: the NBD export source: plain names, capabilities, fence
//!   orders.
//! - [`state_file`]: raised generations on disk, kept across restarts.

pub mod exports;
pub mod fence;
pub mod fencer;
pub mod state_file;
