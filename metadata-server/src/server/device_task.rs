//! The task that owns the pool's own device connections: it writes the
//! metadata the owner sealed (journal entries, checkpoints) and checks
//! devices agents reported, one at a time, and posts each result back to
//! the owner as an input (with what it learnt about which devices the
//! server reaches).
//!
//! Why one task: both use and repair the same connections (a check replaces
//! a dead one), and commits must never interleave. Why not the owner: a
//! device that hangs would hang the owner, and with it every lease renewal.

use blockio::client::NbdClient;
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::core::{Input, TaskId};
use super::data_channel::DEVICE_CHECK_TIMEOUT;
use super::jobs::JobOutcome;
use std::sync::Arc;

use super::lease_task::LeaseGuard;
use crate::pool::journal::RawWrite;
use crate::pool::Pool;

/// How long a metadata write waits for a late lease renewal before it is
/// refused (the renewal's own I/O is bounded by the lease I/O timeout).
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Work queued for the device task (commits are one at a time by the core's
/// rule; checks are bounded by the agents reporting).
pub const DEVICE_WORK_QUEUED_MAX: usize = 1024;

pub enum DeviceWork {
    /// Sealed metadata writes (a journal entry or a checkpoint).
    Write {
        task: TaskId,
        write: RawWrite,
    },
    Check {
        task: TaskId,
        index: u32,
        uuid: Uuid,
    },
    /// A device just labelled for the pool (`device add`): its connection
    /// joins the pool's, so its metadata area can be written and its
    /// reachability reported. Sent before the commit that adds it.
    Adopt {
        device: Box<crate::pool::PoolDevice>,
    },
}

pub struct DeviceTask {
    pool: Pool,
    results: mpsc::Sender<Input>,
    /// Metadata is written only while this server holds the pool lease.
    guard: Arc<LeaseGuard>,
}

impl DeviceTask {
    /// Starts the task; it ends when every sender of the returned channel is
    /// gone, disconnecting the devices.
    pub fn start(
        pool: Pool,
        results: mpsc::Sender<Input>,
        guard: Arc<LeaseGuard>,
    ) -> (mpsc::Sender<DeviceWork>, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(DEVICE_WORK_QUEUED_MAX);
        let task = DeviceTask { pool, results, guard };
        (tx, tokio::spawn(task.run(rx)))
    }

    async fn run(mut self, mut work: mpsc::Receiver<DeviceWork>) {
        self.report_reachability().await;
        while let Some(w) = work.recv().await {
            let input = match w {
                DeviceWork::Adopt { device } => {
                    self.pool.devices.retain(|d| d.expected_uuid != device.expected_uuid);
                    self.pool.devices.push(*device);
                    self.report_reachability().await;
                    continue;
                }
                DeviceWork::Write { task, write } if !self.guard.wait_may_commit(LEASE_WAIT).await => {
                    // Checked right before the write leaves: a server whose
                    // lease lapsed (or was handed on) writes nothing.
                    let why = "this metadata server does not hold the pool lease now; nothing was written".into();
                    super::metrics::committed(std::time::Duration::ZERO, false);
                    Input::MetaWritten { task, written: vec![false; write.copies], failures: vec![why] }
                }
                DeviceWork::Write { task, write } => {
                    // `mds-before-metadata-write`: past the lease check,
                    // before anything is sent (with `:stop`, a server paused
                    // there with a commit in flight, for the takeover tests).
                    control_client::fault::hit("mds-before-metadata-write");
                    let started = std::time::Instant::now();
                    let guard = self.guard.clone();
                    let (written, failures) = self.pool.write_raw(&write, || guard.may_commit()).await;
                    super::metrics::committed(started.elapsed(), failures.is_empty());
                    if !failures.is_empty() {
                        // Said here too: a server that lost its lease
                        // meanwhile may end before its core hears of it.
                        tracing::warn!("metadata write failed on the devices: {}", failures.join("; "));
                        // The next commit (which supersedes this one) goes
                        // over fresh connections where these failed.
                        self.pool.reconnect_failed().await;
                    }
                    Input::MetaWritten { task, written, failures }
                }
                DeviceWork::Check { task, index, uuid } => {
                    let result = self.check(uuid).await;
                    if let Err(e) = &result {
                        tracing::warn!(device = index, "the metadata server cannot reach the device: {e}");
                    }
                    Input::JobDone { task, outcome: JobOutcome { result, label: None, fences: None } }
                }
            };
            if self.results.send(input).await.is_err() {
                break;
            }
            self.report_reachability().await;
        }
        for d in &self.pool.devices {
            if let Some(c) = &d.client {
                c.disconnect().await;
            }
        }
    }

    async fn report_reachability(&self) {
        for d in &self.pool.devices {
            let Some(uuid) = d.expected_uuid else { continue };
            let input = Input::Reachability {
                device: uuid,
                reachable: self.pool.reachable(uuid),
                fences: self.pool.fences(uuid),
            };
            if self.results.send(input).await.is_err() {
                return;
            }
        }
    }

    /// Whether the server reaches the device now: reads its label over the
    /// existing connection, else over a new one (each bounded by
    /// [`DEVICE_CHECK_TIMEOUT`]).
    async fn check(&mut self, uuid: Uuid) -> Result<(), String> {
        let Some(d) = self.pool.devices.iter_mut().find(|d| d.expected_uuid == Some(uuid)) else {
            return Err("the server has no connection to it".into());
        };
        if let Some(client) = d.client.clone() {
            if let Ok(Ok(block)) = tokio::time::timeout(DEVICE_CHECK_TIMEOUT, client.read(0, 4096)).await {
                return same_device(&block, uuid);
            }
        }
        let uri: NbdUri = d.uri.parse().map_err(|e| format!("bad URI {}: {e}", d.uri))?;
        let mut opts = crate::pool::device::client_options();
        opts.connect_timeout = DEVICE_CHECK_TIMEOUT;
        let fresh = async {
            let c = NbdClient::connect(&uri, opts).await.map_err(|e| e.to_string())?;
            let block = c.read(0, 4096).await.map_err(|e| e.to_string())?;
            same_device(&block, uuid)?;
            Ok::<_, String>(c)
        };
        match tokio::time::timeout(DEVICE_CHECK_TIMEOUT, fresh).await {
            Ok(Ok(c)) => {
                if let Some(old) = d.client.replace(c) {
                    old.disconnect().await;
                }
                d.error = None;
                Ok(())
            }
            Ok(Err(e)) => {
                d.error = Some(e.clone());
                Err(e)
            }
            Err(_) => {
                let e = format!("no answer within {} ms", DEVICE_CHECK_TIMEOUT.as_millis());
                d.error = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Whether `block` (the first 4 KiB of a device) is the label of device
/// `uuid`: a device that answers with another label, or none (an empty
/// disk behind the same address), is not the device that failed.
fn same_device(block: &[u8], uuid: Uuid) -> Result<(), String> {
    match volume_format::DeviceLabel::decode(block) {
        Ok(label) if label.device_uuid == uuid => Ok(()),
        Ok(label) => Err(format!("it answers as device {}, not {uuid}", label.device_uuid)),
        Err(e) => Err(format!("it answers without a sanvol label ({e})")),
    }
}
