//! Where a device may block in place.
//!
//! Why: a device whose calls block in the kernel ([`crate::file::FileDevice`]:
//! `pread`, `pwrite`, `fdatasync`) runs them on tokio's blocking pool when
//! an async task calls it, so no runtime thread stalls. The NBD server's
//! connection threads (`ServerConfig::connection_threads`) exist to block:
//! there a hop to the pool would only add two thread wake-ups per request,
//! so they mark themselves and such devices run the call where it is.

use std::cell::Cell;

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// True on a thread that may block: devices run blocking calls in place.
pub fn inline_allowed() -> bool {
    INLINE.with(Cell::get)
}

/// Marks the calling thread as one that may block (for its whole life).
pub(crate) fn allow_inline_on_this_thread() {
    INLINE.with(|c| c.set(true));
}
