//! Each device's direct path, as the owner sees it: when the data path
//! finds a device's direct path broken (the first failure switches the
//! device to fallback by itself, see [`crate::devices`]), the owner reports
//! it to the server, probes the direct path with a bounded backoff
//! ([`PathState`]) and switches the device back when a probe works.

use std::collections::BTreeMap;

use tracing::{error, info, warn};

use super::{AgentCore, Effect, Millis, ProbeOutcome};
use crate::fallback::{PathAction, PathState};

/// A device whose I/O goes through the server.
#[derive(Debug, Clone)]
pub struct DevicePath {
    index: u32,
    state: PathState,
    /// A probe is running.
    probing: bool,
}

/// When the next probe is due.
pub fn deadline(paths: &BTreeMap<String, DevicePath>) -> Option<Millis> {
    paths.values().filter(|p| !p.probing).filter_map(|p| p.state.next_probe_ms()).min()
}

impl AgentCore {
    pub(super) fn direct_path_failed(&mut self, now: Millis, device: String, index: u32, reason: String) {
        let path = self.paths.entry(device.clone()).or_insert(DevicePath {
            index,
            state: PathState::default(),
            probing: false,
        });
        if let PathAction::ReportFailure(reason) = path.state.direct_failed(now, &reason) {
            warn!(device, %reason, "direct path failed; sending this device's I/O through the metadata server");
            crate::metrics::path_fell_back(&device);
            self.out.push(Effect::ReportPathFailure { device, index, reason });
        }
    }

    pub(super) fn probes_due(&mut self, now: Millis) {
        for (device, path) in self.paths.iter_mut() {
            if !path.probing && path.state.probe_due(now) {
                path.probing = true;
                self.out.push(Effect::Probe { device: device.clone() });
            }
        }
    }

    pub(super) fn probe_done(&mut self, now: Millis, device: String, outcome: ProbeOutcome) {
        let Some(path) = self.paths.get_mut(&device) else { return };
        path.probing = false;
        match outcome {
            ProbeOutcome::Works => {
                if path.state.probe_succeeded() == PathAction::ReportRecovered {
                    let index = path.index;
                    self.paths.remove(&device);
                    info!(device, "direct path works again; back to direct I/O");
                    crate::metrics::path_direct(&device);
                    self.out.push(Effect::DirectPathBack { device: device.clone() });
                    self.out.push(Effect::ReportPathRecovered { device, index });
                }
            }
            ProbeOutcome::Fails => path.state.probe_failed(now),
            ProbeOutcome::Gone => {
                crate::metrics::path_direct(&device);
                self.paths.remove(&device);
            }
        }
    }

    pub(super) fn failure_reported(&mut self, device: String, marked_failed: bool) {
        if marked_failed {
            error!(device, "the metadata server cannot reach the device either: it is marked failed");
            self.out.push(Effect::MarkDeviceFailed { device });
        } else {
            info!(device, "reported the failed direct path to the metadata server");
        }
    }
}
