//! Facts about the host that decide latency more than sanvol's own code,
//! logged once at start so an operator reading the log sees them.
//!
//! Why: in a KVM guest whose idle vCPUs halt at once (`cpuidle-haltpoll`
//! with `guest_halt_poll_ns` 0, as some cloud and micro-VM images boot), a
//! wake-up that lands on an idle vCPU is a halt exit through the host —
//! about 80 µs on the development VM against ~14 with both threads on one
//! vCPU — and every queue-depth-1 request takes several such wake-ups
//! (bench/README.md, "Idle vCPUs"). The fix is a host setting, not a sanvol
//! option, so the binaries say when they see it
//! (docs/operations.md, "Latency on virtual machines").

use std::path::Path;

/// Where the kernel exposes the idle driver and the guest's halt polling.
const SYSFS: &str = "/sys";

/// A note for the start-up log when `sysfs` (normally `/sys`) shows
/// idle vCPUs that halt without polling first; `None` on hosts without the
/// `haltpoll` idle driver (bare metal, other hypervisors) or with a
/// polling window, and when the files cannot be read.
pub fn idle_vcpu_note(sysfs: &Path) -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(sysfs.join(p)).ok().map(|s| s.trim().to_string());
    let driver = read("devices/system/cpu/cpuidle/current_driver")?;
    if driver != "haltpoll" {
        return None;
    }
    let window: u64 = read("module/haltpoll/parameters/guest_halt_poll_ns")?.parse().ok()?;
    (window == 0).then(|| {
        "idle vCPUs halt at once (cpuidle driver haltpoll, guest_halt_poll_ns 0): every wake-up that \
         lands on an idle vCPU costs a halt exit, several times a 4 KiB request's own work at queue \
         depth 1; a polling window (e.g. echo 200000 > /sys/module/haltpoll/parameters/guest_halt_poll_ns) \
         removes most of it — docs/operations.md, \"Latency on virtual machines\""
            .to_string()
    })
}

/// Logs [`idle_vcpu_note`] for this host (at info: a fact, not a fault).
pub fn log_idle_vcpu_note() {
    if let Some(note) = idle_vcpu_note(Path::new(SYSFS)) {
        tracing::info!("{note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(driver: Option<&str>, window: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        if let Some(d) = driver {
            let p = dir.path().join("devices/system/cpu/cpuidle");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("current_driver"), format!("{d}\n")).unwrap();
        }
        if let Some(w) = window {
            let p = dir.path().join("module/haltpoll/parameters");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("guest_halt_poll_ns"), format!("{w}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn a_guest_that_halts_at_once_gets_the_note() {
        let dir = sysfs(Some("haltpoll"), Some("0"));
        let note = idle_vcpu_note(dir.path()).expect("a note");
        assert!(note.contains("guest_halt_poll_ns 0"), "{note}");
        assert!(note.contains("Latency on virtual machines"), "{note}");
    }

    #[test]
    fn a_polling_window_other_drivers_and_unreadable_files_get_none() {
        for (driver, window) in [
            (Some("haltpoll"), Some("200000")),
            (Some("intel_idle"), Some("0")),
            (Some("acpi_idle"), None),
            (Some("haltpoll"), None),
            (Some("haltpoll"), Some("not a number")),
            (None, Some("0")),
        ] {
            let dir = sysfs(driver, window);
            assert_eq!(idle_vcpu_note(dir.path()), None, "{driver:?} {window:?}");
        }
    }
}
