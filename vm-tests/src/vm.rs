//! One running guest: QEMU under TCG, its serial console captured to a log file and watched for the
//! result marker.
//!
//! Synchronization is by console lines, never by sleeping: the host waits for `SANVOL-VM-RESULT:` (or any
//! line a scenario prints, with [`Vm::wait_for_line`]) until the scenario's wall-clock deadline. QEMU is
//! a direct child, killed by its PID when the [`Vm`] is dropped — also when a test panics — and also
//! by the kernel (`PR_SET_PDEATHSIG`) if the test process itself dies.
//!
//! VM runs are serialized (a lock file under the artifact directory) across threads and processes:
//! the machines have two cores shared with other work, and one TCG vCPU per VM at a time keeps timings
//! predictable. Waiting for the lock does not count against a scenario's timeout.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::paths::FileLock;
use crate::{Scenario, VmError};

/// The line prefix `/init` prints with the outcome: `SANVOL-VM-RESULT: PASS` or `... FAIL <reason>`.
pub const RESULT_MARKER: &str = "SANVOL-VM-RESULT: ";
/// The host's loopback as the guest sees it.
pub const GUEST_HOST_ADDR: &str = "10.0.2.2";
const INIT_MARKER: &str = "SANVOL-VM-INIT: ";

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
}

/// What a finished run says.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub scenario: String,
    pub verdict: Verdict,
    /// The serial console (and QEMU's own stderr, prefixed `[qemu]`), kept after the run.
    pub console_log: PathBuf,
    /// Host wall-clock time from starting QEMU to the guest's `/init` running.
    pub boot_to_init: Option<Duration>,
    /// Host wall-clock time from starting QEMU to the result (or the timeout).
    pub elapsed: Duration,
}

impl VmReport {
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// The failure reason, if the run failed.
    pub fn failure(&self) -> Option<&str> {
        match &self.verdict {
            Verdict::Pass => None,
            Verdict::Fail(reason) => Some(reason),
        }
    }

    /// The message [`VmReport::assert_pass`] panics with: the reason, the console log's path and its
    /// last lines. `None` if the scenario passed.
    pub fn failure_message(&self) -> Option<String> {
        let reason = self.failure()?;
        Some(format!(
            "vm scenario `{}` FAILED: {reason}\n  console log: {}\n  last console lines:\n{}",
            self.scenario,
            self.console_log.display(),
            tail(&self.console_log, 25)
        ))
    }

    /// Panics with [`VmReport::failure_message`] unless the scenario passed.
    #[track_caller]
    pub fn assert_pass(&self) {
        if let Some(message) = self.failure_message() {
            panic!("{message}");
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("    | {l}\n")).collect()
}

/// A running guest. Dropping it kills QEMU.
pub struct Vm {
    scenario: String,
    child: Child,
    lines: Receiver<String>,
    log_path: PathBuf,
    log: Arc<Mutex<std::fs::File>>,
    started: Instant,
    deadline: Instant,
    boot_to_init: Option<Duration>,
    result: Option<Verdict>,
    _serial: FileLock,
}

impl Vm {
    /// Prepares the kernel and initramfs and boots the guest. Returns once QEMU is running.
    pub fn start(scenario: &Scenario) -> Result<Vm, VmError> {
        crate::deps::ensure_host_tools()?;
        let kernel = crate::kernel::prepare(&scenario.modules)?;
        let work = crate::artifact_dir();
        std::fs::create_dir_all(&work).map_err(VmError::io(format!("creating {}", work.display())))?;
        let initrd = work.join(format!("{}-initramfs.cpio", scenario.name));
        std::fs::write(&initrd, scenario.initramfs(&kernel)?.to_cpio())
            .map_err(VmError::io(format!("writing {}", initrd.display())))?;
        let log_path = work.join(format!("{}-console.log", scenario.name));

        let serial = FileLock::acquire(&work.join("vm.lock")).map_err(VmError::io("locking vm.lock"))?;
        let log_file =
            std::fs::File::create(&log_path).map_err(VmError::io(format!("creating {}", log_path.display())))?;
        let log = Arc::new(Mutex::new(log_file));

        let mut append = vec!["console=ttyS0".to_string(), "quiet".into(), "panic=-1".into()];
        append.extend(scenario.cmdline.iter().cloned());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", &scenario.memory_mib.to_string()])
            .args(["-nographic", "-no-reboot", "-no-user-config"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append.join(" ")])
            // slirp: 10.0.2.2 is the host's loopback; the guest routes only to it (see /init).
            .args(["-netdev", "user,id=n0,ipv6=off", "-device", "virtio-net-pci,netdev=n0,romfile="])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(VmError::io("starting qemu-system-x86_64"))?;

        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_log = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let _ = out_log.lock().map(|mut f| f.write_all(&buf));
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep logging.
                }
                buf.clear();
            }
        });
        let err_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_log.lock().map(|mut f| writeln!(f, "[qemu] {line}"));
            }
        });

        Ok(Vm {
            scenario: scenario.name.clone(),
            child,
            lines,
            log_path,
            log,
            started,
            deadline: started + scenario.timeout,
            boot_to_init: None,
            result: None,
            _serial: serial,
        })
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console log being written.
    pub fn console_log(&self) -> &Path {
        &self.log_path
    }

    fn note(&mut self, line: &str) {
        if line.contains(INIT_MARKER) && self.boot_to_init.is_none() {
            self.boot_to_init = Some(self.started.elapsed());
        }
        if let Some(pos) = line.find(RESULT_MARKER) {
            if self.result.is_none() {
                let rest = line[pos + RESULT_MARKER.len()..].trim();
                self.result = Some(match rest.strip_prefix("FAIL") {
                    _ if rest == "PASS" => Verdict::Pass,
                    Some(reason) => Verdict::Fail(reason.trim().to_string()),
                    None => Verdict::Fail(format!("unreadable result marker: {rest}")),
                });
            }
        }
    }

    fn guest_error(&self, message: String) -> VmError {
        VmError::Guest { scenario: self.scenario.clone(), message, log: self.log_path.clone() }
    }

    /// Waits until the guest prints a console line containing `needle` and returns that line. Lets a
    /// test act on the host at a point the scenario chooses (e.g. break a connection after
    /// `echo READY-TO-CUT`). Fails on the deadline, or when the run ends first.
    pub fn wait_for_line(&mut self, needle: &str) -> Result<String, VmError> {
        loop {
            if self.result.is_some() {
                return Err(self.guest_error(format!("the scenario ended before printing `{needle}`")));
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.note(&line);
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    return Err(self.guest_error(format!("timed out waiting for `{needle}`")));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.guest_error(format!("QEMU exited before the guest printed `{needle}`")));
                }
            }
        }
    }

    /// Waits for the result marker (or the deadline, or QEMU exiting without one), then lets the guest
    /// power off (killing QEMU if it does not within a few seconds).
    pub fn wait(mut self) -> Result<VmReport, VmError> {
        let mut verdict = None;
        while self.result.is_none() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.note(&line),
                Err(RecvTimeoutError::Timeout) => {
                    verdict = Some(Verdict::Fail(format!(
                        "timed out after {:.0?} without a result marker (QEMU killed)",
                        self.deadline - self.started
                    )));
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    verdict = Some(Verdict::Fail(format!(
                        "QEMU exited ({status}) without a result marker (kernel panic or QEMU error? see the log)"
                    )));
                    break;
                }
            }
        }
        let elapsed = self.started.elapsed();
        let verdict = verdict.or_else(|| self.result.clone()).expect("a verdict");
        // The guest syncs and powers off right after the marker; give it a moment, then kill.
        let grace = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= grace || !matches!(verdict, Verdict::Pass) => {
                    self.kill();
                    break;
                }
                // QEMU closes stdout when it exits: wait on the line channel rather than sleeping blind.
                Ok(None) => match self.lines.recv_timeout(Duration::from_millis(200)) {
                    Ok(line) => self.note(&line),
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = self.child.wait();
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                },
            }
        }
        let _ = self.log.lock().map(|mut f| f.flush());
        Ok(VmReport {
            scenario: self.scenario.clone(),
            verdict,
            console_log: self.log_path.clone(),
            boot_to_init: self.boot_to_init,
            elapsed,
        })
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
