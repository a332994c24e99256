//! The kernel NBD driver against a host NBD export, end to end: the guest attaches `/dev/nbd0` with
//! `nbd-client`, makes and uses an ext4 on it, and the host then finds that filesystem in the export.
//! This is the runner's proof of life; the agent's own kernel attach scenarios build on the same API.
//!
//! Plus two runs that must fail (a scenario that fails, a scenario that hangs), so a broken runner
//! cannot pass by never noticing failure.

use std::time::Duration;

use blockio::memory::MemoryDevice;
use sha2::{Digest, Sha256};
use vm_tests::host::BlockioExport;
use vm_tests::{Scenario, Verdict};

const EXPORT_BYTES: u64 = 256 << 20;

/// The file the guest writes with a shell loop, computed independently here.
fn pattern_sha256() -> String {
    let mut h = Sha256::new();
    for i in 0..4096 {
        h.update(format!("sanvol line {i}\n"));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn guest_ext4_on_kernel_nbd_round_trips_through_the_host_export() {
    // sanvol's own NBD server, in-process, over a 256 MiB memory device.
    let export = BlockioExport::serve(MemoryDevice::new(EXPORT_BYTES)).unwrap();

    let report = Scenario::new("kernel_nbd", include_str!("scenarios/kernel_nbd.sh"))
        .env("NBD_PORT", export.port())
        .env("EXPORT_BYTES", EXPORT_BYTES)
        .env("PATTERN_SHA256", pattern_sha256())
        .timeout(Duration::from_secs(150))
        .run()
        .unwrap();
    eprintln!(
        "kernel_nbd: boot to /init {:.1?}, whole run {:.1?}, console log {}",
        report.boot_to_init.unwrap_or_default(),
        report.elapsed,
        report.console_log.display()
    );
    report.assert_pass();

    // The guest's writes crossed the NBD path: the host-side device holds an ext4 superblock
    // (at byte 1024; s_magic 0xEF53 at offset 56 in it) with the label the guest gave it.
    let sb = export.read(1024, 1024).unwrap();
    assert_eq!(u16::from_le_bytes([sb[56], sb[57]]), 0xEF53, "no ext4 superblock magic at byte 1080 of the export");
    assert_eq!(&sb[120..129], b"sanvol-vm", "ext4 volume label in the export");
    let blocks = u32::from_le_bytes(sb[4..8].try_into().unwrap()) as u64;
    let block_size = 1024u64 << u32::from_le_bytes(sb[24..28].try_into().unwrap());
    assert_eq!(blocks * block_size, EXPORT_BYTES, "filesystem size recorded in the export's superblock");
}

#[test]
fn a_failing_scenario_reports_fail_with_reason_and_log() {
    let report = Scenario::new(
        "runner_fails",
        "step 'check the impossible'\n[ -e /dev/nbd0 ] || fail 'no nbd0'\nfail \"deliberate failure: nbd devices: $(ls /dev | grep -c '^nbd')\"\n",
    )
    .timeout(Duration::from_secs(60))
    .run()
    .unwrap();
    assert!(!report.passed());
    let reason = report.failure().unwrap();
    assert!(reason.starts_with("deliberate failure: nbd devices: 16"), "reason: {reason}");
    assert!(reason.contains("step: check the impossible"), "reason: {reason}");
    let log = std::fs::read_to_string(&report.console_log).unwrap();
    assert!(log.contains("SANVOL-VM-RESULT: FAIL deliberate failure"), "console log kept with the marker");

    // The panic message a test sees names the reason and where the log is.
    let msg = report.failure_message().unwrap();
    assert!(msg.contains("deliberate failure") && msg.contains(&report.console_log.display().to_string()), "{msg}");

    // A command failing under `set -e` names the step it failed in.
    let report = Scenario::new("runner_fails_set_e", "step 'run false'\nfalse\necho unreachable\n")
        .timeout(Duration::from_secs(60))
        .run()
        .unwrap();
    assert_eq!(report.verdict, Verdict::Fail("scenario exited with status 1 in step 'run false'".into()));
}

#[test]
fn a_hanging_scenario_times_out_and_qemu_is_killed() {
    let report = Scenario::new("runner_hangs", "step hang\necho HANGING-NOW\nwhile :; do sleep 1; done\n")
        .timeout(Duration::from_secs(25))
        .run()
        .unwrap();
    let reason = report.failure().expect("a hang must not pass");
    assert!(reason.contains("timed out"), "reason: {reason}");
    let log = std::fs::read_to_string(&report.console_log).unwrap();
    assert!(log.contains("HANGING-NOW"), "the guest got as far as the scenario");
    assert!(report.elapsed < Duration::from_secs(40));
}
