//! The agent's state directory: the resume keys of the handles it holds and
//! how it serves each volume, kept on disk so that a restarted agent (a crash,
//! `kill -9`, an upgrade) takes its handles back at once instead of waiting
//! out their leases.
//!
//! Layout of `--state-dir` (default [`DEFAULT_STATE_DIR`], mode 0700):
//! - `state.json` (mode 0600): `{"format": 1, "instance": HEX, "handles":
//!   [...]}`, one [`HeldHandle`] per handle. Replaced atomically: written to
//!   `state.json.tmp`, fsync'd, renamed over, and the directory fsync'd, so a
//!   crash at any point leaves the old file or the new one, never a torn one.
//! - `agent.lock`: held with `flock(LOCK_EX)` for the agent's whole life;
//!   holds its pid for the message a second agent gets, emptied at a clean
//!   stop ([`StateDir::stopped_cleanly`]): a pid found there at start means
//!   the previous run crashed ([`StateDir::previous_run_unclean`]).
//!
//! # Why a restarted agent may resume the previous run's handles
//!
//! The server accepts a resume key only from the agent key and the agent
//! *instance* it was issued to. The instance is what keeps two processes
//! with the same key (two agents on one host, or a new agent while the old
//! one is merely stuck — SIGSTOP, a hung device) from both holding one
//! exclusive handle: the old one could wake up and write next to the new
//! one. So the instance is not simply kept across restarts: it is kept in
//! the state file, and the state file is usable only by the process holding
//! the directory's lock. The kernel releases an `flock` when its holder dies
//! — `kill -9` included — and never while it lives, even stopped. A new agent
//! that got the lock therefore knows that no process of the previous run is
//! left: it *is* the previous run's successor and may present its instance.
//! A second agent on the same directory is refused at start; an agent on
//! another directory gets another instance and cannot resume these handles.
//! Copying a state directory to another host (while the first agent runs)
//! defeats this, as copying a private key would.
//!
//! What a dead run may have left in flight at the devices is what any agent
//! death leaves (its connections were closed by the kernel; requests the
//! devices had already received complete or not, none was acknowledged), and
//! the clients above (the kernel NBD driver, QEMU's NBD client) resend
//! whatever was not acknowledged. Such a request may still sit in a device
//! server's queue and land late, over a newer write of this run: so after
//! an unclean stop this run's writes wait until `device_request_max_ms`
//! after its start (`crate::gate::hold_writes_until`); reads do not wait.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::HeldHandle;

/// Where `sanvol-agent run` keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sanvol/agent";
/// The state file format this build writes and the newest it reads.
pub const STATE_FORMAT: u32 = 1;
/// Largest state file read (a corrupted or foreign file must not make the
/// agent allocate without bound; thousands of handles fit).
pub const STATE_FILE_BYTES_MAX: u64 = 16 << 20;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "another sanvol-agent{} uses the state directory {}; stop it first, or give this one its own --state-dir",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), dir.display()
    )]
    Locked { dir: PathBuf, pid: Option<u32> },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(
        "the state file {} is unreadable ({why}); move it away to start without taking back the handles it names \
         (they stay held for their lease and the server's durable time, then others may open the volumes)",
        path.display()
    )]
    Corrupt { path: PathBuf, why: String },
    #[error("the state file {} was written by a newer sanvol-agent (format {found}, this one reads {STATE_FORMAT}); upgrade sanvol-agent", path.display())]
    Newer { path: PathBuf, found: u32 },
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    /// Hex of the agent instance the handles' resume keys name.
    instance: String,
    handles: Vec<HeldHandle>,
}

/// The state a previous run left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    /// The agent instance to present to the server.
    pub instance: [u8; 16],
    /// The handles to take back.
    pub handles: Vec<HeldHandle>,
}

/// An open, locked state directory. Dropping it releases the lock.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    instance: [u8; 16],
    lock: File,
    /// The pid the previous run left in the lock file (it did not stop
    /// cleanly), if any.
    previous_unclean_pid: Option<u32>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StateError {
    let what = what.into();
    move |source| StateError::Io { what, source }
}

impl StateDir {
    /// Creates `dir` if need be, takes its lock, and reads what the previous
    /// run left (a new instance and no handles if nothing). A new instance
    /// is written at once, so it is the same for the whole life of the
    /// directory.
    pub fn open(dir: &Path) -> Result<(StateDir, AgentState), StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(format!("creating the state directory {} (see --state-dir)", dir.display())))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(format!("opening {}", lock_path.display())))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = std::fs::read_to_string(&lock_path).ok().and_then(|s| s.trim().parse().ok());
                return Err(StateError::Locked { dir: dir.to_path_buf(), pid });
            }
            return Err(io(format!("locking {}", lock_path.display()))(e));
        }
        // A pid left by the previous run: it did not stop cleanly.
        let previous_unclean_pid = std::fs::read_to_string(&lock_path).ok().and_then(|s| s.trim().parse().ok());
        lock.set_len(0).map_err(io(format!("writing {}", lock_path.display())))?;
        writeln!(lock, "{}", std::process::id()).map_err(io(format!("writing {}", lock_path.display())))?;
        lock.sync_all().map_err(io(format!("writing {}", lock_path.display())))?;

        let path = dir.join(STATE_FILE);
        let state = match read_state(&path)? {
            Some(state) => state,
            None => {
                let mut instance = [0u8; 16];
                getrandom::getrandom(&mut instance).map_err(|e| {
                    io("reading random bytes for the agent instance")(std::io::Error::other(e.to_string()))
                })?;
                AgentState { instance, handles: Vec::new() }
            }
        };
        let opened = StateDir { dir: dir.to_path_buf(), instance: state.instance, lock, previous_unclean_pid };
        opened.save(&state.handles)?;
        Ok((opened, state))
    }

    /// The state directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The previous run on this directory stopped without a clean shutdown
    /// (its pid was still in the lock file): its pid.
    pub fn previous_run_unclean(&self) -> Option<u32> {
        self.previous_unclean_pid
    }

    /// Records a clean stop (every volume flushed and closed, nothing of
    /// this run left at the devices): the next run need not wait for this
    /// one's writes. Call last, after the shutdown finished.
    pub fn stopped_cleanly(&self) -> Result<(), StateError> {
        self.lock.set_len(0).map_err(io("emptying the state directory's lock file"))?;
        self.lock.sync_all().map_err(io("emptying the state directory's lock file"))
    }

    /// Replaces the state file with `handles`, atomically and durably.
    pub fn save(&self, handles: &[HeldHandle]) -> Result<(), StateError> {
        let file = StateFile { format: STATE_FORMAT, instance: hex::encode(self.instance), handles: handles.to_vec() };
        let mut bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| io("encoding the state file")(std::io::Error::other(e.to_string())))?;
        bytes.push(b'\n');
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let what = || format!("writing the state file {}", tmp.display());
        let mut out =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(what()))?;
        out.write_all(&bytes).map_err(io(what()))?;
        out.sync_all().map_err(io(what()))?;
        drop(out);
        let path = self.path();
        std::fs::rename(&tmp, &path).map_err(io(format!("replacing the state file {}", path.display())))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing the state directory {}", self.dir.display())))
    }
}

fn read_state(path: &Path) -> Result<Option<AgentState>, StateError> {
    let corrupt = |why: String| StateError::Corrupt { path: path.to_path_buf(), why };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(format!("reading the state file {}", path.display()))(e)),
    };
    let len = file.metadata().map_err(io(format!("reading the state file {}", path.display())))?.len();
    if len > STATE_FILE_BYTES_MAX {
        return Err(corrupt(format!("{len} bytes, more than the {STATE_FILE_BYTES_MAX} a state file may have")));
    }
    let bytes = std::fs::read(path).map_err(io(format!("reading the state file {}", path.display())))?;
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let format: Format = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if format.format > STATE_FORMAT {
        return Err(StateError::Newer { path: path.to_path_buf(), found: format.format });
    }
    let file: StateFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let instance: [u8; 16] = hex::decode(&file.instance)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt(format!("instance {:?} is not 32 hex digits", file.instance)))?;
    Ok(Some(AgentState { instance, handles: file.handles }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use volume_format::control::messages::OpenMode;

    use super::*;
    use crate::core::PendingRecall;
    use crate::export::ExportTarget;

    fn held(volume: &str, handle: u64) -> HeldHandle {
        HeldHandle {
            volume: volume.into(),
            handle,
            mode: OpenMode::Exclusive,
            resume_key: vec![1, 2, 3],
            pool_uuid: uuid::Uuid::from_bytes([7; 16]),
            export: ExportTarget::Unix(format!("/run/{volume}.sock").into()),
            kernel_device: Some(3),
            pending_recall: Some(PendingRecall { generation: 4, drained: true, confirmed: false }),
            devices: vec![volume_format::description::DeviceEndpoint {
                index: volume_format::DeviceIndex(2),
                device_uuid: uuid::Uuid::from_bytes([9; 16]),
                uri: "nbd://127.0.0.1:10809/".into(),
                online: true,
                resyncing: false,
            }],
            cow_by_server: true,
        }
    }

    #[test]
    fn the_state_survives_a_restart_with_the_same_instance() {
        let dir = tempfile::tempdir().unwrap();
        let (state_dir, first) = StateDir::open(dir.path()).unwrap();
        assert!(first.handles.is_empty());
        let handles = vec![held("a", 1), held("b", 2)];
        state_dir.save(&handles).unwrap();
        let mode = std::fs::metadata(state_dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "resume keys are readable by the agent only");
        drop(state_dir);
        let (_, again) = StateDir::open(dir.path()).unwrap();
        assert_eq!(again, AgentState { instance: first.instance, handles });
    }

    #[test]
    fn a_state_file_written_before_the_device_list_and_the_copy_mode_existed_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = serde_json::to_value(held("a", 1)).unwrap();
        record.as_object_mut().unwrap().remove("devices");
        record.as_object_mut().unwrap().remove("cow_by_server");
        let file =
            serde_json::json!({"format": 1, "instance": "00112233445566778899aabbccddeeff", "handles": [record]});
        std::fs::write(dir.path().join(STATE_FILE), file.to_string()).unwrap();
        let (_, state) = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.handles, vec![HeldHandle { devices: Vec::new(), cow_by_server: false, ..held("a", 1) }]);
    }

    #[test]
    fn a_run_that_did_not_stop_cleanly_is_seen_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = StateDir::open(dir.path()).unwrap();
        assert_eq!(first.previous_run_unclean(), None, "a new directory has no previous run");
        drop(first); // as after kill -9: the lock goes, the pid stays
        let (second, _) = StateDir::open(dir.path()).unwrap();
        assert_eq!(second.previous_run_unclean(), Some(std::process::id()));
        second.stopped_cleanly().unwrap();
        drop(second);
        let (third, _) = StateDir::open(dir.path()).unwrap();
        assert_eq!(third.previous_run_unclean(), None, "the run before stopped cleanly");
    }

    #[test]
    fn a_second_agent_on_the_same_directory_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = StateDir::open(dir.path()).unwrap();
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(&e, StateError::Locked { pid: Some(p), .. } if *p == std::process::id()), "{e}");
        assert!(e.to_string().contains("--state-dir"), "{e}");
        drop(first);
        StateDir::open(dir.path()).unwrap();
    }

    #[test]
    fn a_damaged_or_newer_state_file_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{\"format\": 1, \"instance\": \"zz\", \"handles\": []}").unwrap();
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }) && e.to_string().contains("move it away"), "{e}");
        std::fs::write(dir.path().join(STATE_FILE), b"{\"format\": 9}").unwrap();
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(e, StateError::Newer { found: 9, .. }), "{e}");
        std::fs::write(dir.path().join(STATE_FILE), b"{\"form").unwrap();
        assert!(matches!(StateDir::open(dir.path()).unwrap_err(), StateError::Corrupt { .. }));
    }
}
