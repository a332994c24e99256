//! The README's first command keeps working: `sanvol demo` sets up a whole
//! pool (blockio-served devices, sanvol-mds, sanvol-agent, a mirrored and a
//! plain volume), writes and reads back through the agent, and tears down.

use std::process::Command;

use sanvol_tests::system::bin;

#[test]
fn demo_sets_up_verifies_and_tears_down() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("sanvol"))
        .args(["demo", "--exit-after-setup", "--device-size", "512M", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run sanvol demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sanvol demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    for expected in [
        "read it back: identical",
        "LEG 2",
        "nbd+unix:///mirrored?socket=",
        "nbd+unix:///plain?socket=",
        "demo stopped cleanly",
        "mirrored@before through the backup pseudo-device: the data from before the snapshot",
    ] {
        assert!(stdout.contains(expected), "demo output lacks {expected:?}:\n{stdout}");
    }
    // Both volumes, then the mirrored one again after the snapshot.
    assert_eq!(stdout.matches("read it back: identical").count(), 3, "{stdout}");
    // Everything it started is gone: its sockets no longer accept connections.
    for sock in ["mds.sock", "agent.sock", "device0.sock"] {
        let path = dir.path().join(sock);
        assert!(
            std::os::unix::net::UnixStream::connect(&path).is_err(),
            "{} still accepts connections",
            path.display()
        );
    }
}
