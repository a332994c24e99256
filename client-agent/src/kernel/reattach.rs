//! After an agent restart: bind the kernel devices a previous agent left connected to their volumes
//! again. Plus the device-URI host aliases an agent in another network namespace (a VM) needs.
//!
//! Two ways, in this order:
//! - **From the state file** ([`restore_all`]): the handles the previous run held are resumed with
//!   their keys ([`Agent::restore`]), at once; each kernel device the state file names is given
//!   fresh sockets if it still carries that volume's backend identifier and nobody serves it
//!   ([`restore_plan`]). A handle the server refuses to give back (another client had the volume)
//!   has its device disconnected, so its held I/O fails now instead of at the dead-connection
//!   timeout: whatever the filesystem above it cached may be stale.
//! - **By scanning** ([`reattach_all`]): devices with a sanvol backend identifier that no state file
//!   names (an agent run without a state directory, or an older agent) are re-opened by mode.
//!
//! A device is taken over only if all of these hold: the driver lists it as connected; its backend
//! identifier is a sanvol one ([`BackendId`]); the process that connected it is gone (a live agent
//! keeps its own devices); the re-opened volume belongs to the identifier's pool. The driver itself
//! refuses a reconfigure whose identifier differs from the device's.
//!
//! When scanning, re-opening may be refused for a while: the dead agent's handle still holds the
//! volume until its lease plus the server's `durable_ms` runs out (no resume key is known for it). The
//! agent retries (every
//! [`REOPEN_RETRY`]) within the device's dead-connection window: the server offers no notification
//! for "that handle expired", so this is a bounded poll of a remote state. Each try is one attach
//! through the agent's owner (open, devices, export, then the device's fresh sockets), which checks
//! the volume's pool against the identifier's before it touches the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use volume_format::description::VolumeDescription;

use super::{device_path, driver, BackendId, KernelError};
use crate::agent::{Agent, AgentError};
use crate::core::{HeldHandle, KernelPlan};
use crate::session::SessionError;

/// Pause between re-open attempts while the old handle still holds the volume.
pub const REOPEN_RETRY: Duration = Duration::from_millis(500);

/// Host rewrites for device URIs (`FROM=TO`): `nbd://FROM:PORT/x` → `nbd://TO:PORT/x`.
#[derive(Clone, Default)]
pub struct HostAliases(Arc<Vec<(String, String)>>);

impl HostAliases {
    pub fn new(aliases: Vec<(String, String)>) -> HostAliases {
        HostAliases(Arc::new(aliases))
    }

    pub fn rewrite(&self, uri: &str) -> String {
        for (from, to) in self.0.iter() {
            for sep in [":", "/"] {
                let old = format!("://{from}{sep}");
                if let Some(at) = uri.find(&old) {
                    let end = at + old.len();
                    return format!("{}://{to}{sep}{}", &uri[..at], &uri[end..]);
                }
            }
            if let Some(prefix) = uri.strip_suffix(&format!("://{from}")) {
                return format!("{prefix}://{to}");
            }
        }
        uri.to_string()
    }

    pub fn apply(&self, mut description: VolumeDescription) -> VolumeDescription {
        for d in &mut description.devices {
            d.uri = self.rewrite(&d.uri);
        }
        description
    }
}

/// Parses `FROM=TO`.
pub fn parse_alias(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((from, to)) if !from.is_empty() && !to.is_empty() => Ok((from.to_string(), to.to_string())),
        _ => Err(format!("{s:?}: expected FROM=TO, e.g. 127.0.0.1=10.0.2.2")),
    }
}

/// Devices that look like a dead sanvol agent's: (index, identifier text, parsed identifier).
fn orphaned_devices() -> Result<Vec<(u32, String, BackendId)>, KernelError> {
    let mut found = Vec::new();
    for d in driver::status()?.into_iter().filter(|d| d.connected) {
        let Some(text) = driver::backend(d.index) else { continue };
        let Some(id) = BackendId::parse(&text) else { continue };
        if let Some(pid) = driver::connecting_pid(d.index) {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                info!(device = device_path(d.index), pid, "kernel device is served by a running process; leaving it");
                continue;
            }
        }
        found.push((d.index, text, id));
    }
    Ok(found)
}

/// What to do with the kernel device `held` had, as the driver shows it now: reconnect it (it is
/// connected with this volume's backend identifier and its process is gone), connect it afresh (it is
/// not connected, e.g. after a reboot), or leave it (it now serves something else, or a live process
/// serves it). The note says why a device is left alone. Blocking (netlink): call off the runtime.
pub fn restore_plan(held: &HeldHandle) -> (Option<KernelPlan>, Option<String>) {
    let Some(index) = held.kernel_device else { return (None, None) };
    let device = device_path(index);
    if !driver::loaded() {
        return (None, Some(format!("{device}: {}", super::NOT_LOADED)));
    }
    let status = match driver::status() {
        Ok(status) => status,
        Err(e) => return (None, Some(format!("{device}: cannot list kernel NBD devices: {e}"))),
    };
    let connected = status.iter().any(|d| d.index == index && d.connected);
    if !connected {
        return (Some(KernelPlan::Connect { index: Some(index) }), None);
    }
    let text = driver::backend(index).unwrap_or_default();
    match BackendId::parse(&text) {
        Some(id) if id.volume == held.volume && id.pool == held.pool_uuid => {}
        _ => return (None, Some(format!("{device} now serves {text:?}, not volume {}; left alone", held.volume))),
    }
    if let Some(pid) = driver::connecting_pid(index) {
        if pid != std::process::id() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return (None, Some(format!("{device} is served by a running process (pid {pid}); left alone")));
        }
    }
    (Some(KernelPlan::Reconnect { index, backend: text, pool: held.pool_uuid }), None)
}

/// What to do with `/dev/nbd<index>`, which the config file names for persisted volume `volume`:
/// connect it (it is free, or there is no driver: the attach then says so and serves the socket
/// export), give it fresh sockets (a previous agent left it connected with this volume's backend
/// identifier and is gone: a clean stop leaves kernel devices connected), or refuse (it serves
/// something else, or a live process serves it). Blocking (netlink): call off the runtime.
pub fn persisted_plan(volume: &str, index: u32) -> Result<KernelPlan, String> {
    let device = device_path(index);
    let connect = Ok(KernelPlan::Connect { index: Some(index) });
    if !driver::loaded() {
        return connect;
    }
    let status = driver::status().map_err(|e| format!("cannot list kernel NBD devices: {e}"))?;
    if !status.iter().any(|d| d.index == index && d.connected) {
        return connect;
    }
    let text = driver::backend(index).unwrap_or_default();
    let id = match BackendId::parse(&text) {
        Some(id) if id.volume == volume => id,
        _ => return Err(format!("{device} is connected to {text:?}, not to volume {volume}; left alone")),
    };
    if let Some(pid) = driver::connecting_pid(index) {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!("{device} is served by a running process (pid {pid}); left alone"));
        }
    }
    Ok(KernelPlan::Reconnect { index, backend: text, pool: id.pool })
}

/// A kernel device a previous agent left connected to `volume` (its backend identifier names the
/// volume and its connecting process is gone): where a persisted kernel entry without a device
/// (`kernel = true`) goes after a clean stop. Blocking (netlink): call off the runtime.
pub fn orphan_of(volume: &str) -> Option<u32> {
    if !driver::loaded() {
        return None;
    }
    orphaned_devices().ok()?.into_iter().find(|(_, _, id)| id.volume == volume).map(|(index, _, _)| index)
}

/// Takes back every handle of the state file (in parallel) with its kernel device; returns one line
/// per handle for the log, and the kernel devices the state file named (for [`reattach_all`] to skip).
pub async fn restore_all(agent: &Agent, handles: Vec<HeldHandle>) -> (Vec<String>, Vec<u32>) {
    let named: Vec<u32> = handles.iter().filter_map(|h| h.kernel_device).collect();
    let restores = handles.into_iter().map(|held| async move {
        let planned = {
            let held = held.clone();
            tokio::task::spawn_blocking(move || restore_plan(&held)).await.unwrap_or((None, None))
        };
        let (plan, note) = planned;
        if let Some(note) = &note {
            warn!(volume = held.volume, "{note}");
        }
        let volume = held.volume.clone();
        match agent.restore(held, plan.clone()).await {
            Ok(info) => {
                let served = info.kernel_device.clone().unwrap_or(info.export_uri.clone());
                format!("took back volume {volume} (handle {}): {served}", info.handle)
            }
            Err(e) => {
                if let Some(KernelPlan::Reconnect { index, backend, .. }) = plan {
                    give_up(index, backend).await;
                }
                format!("volume {volume} not taken back: {e}")
            }
        }
    });
    let report = futures::future::join_all(restores).await;
    for line in &report {
        info!("{line}");
    }
    (report, named)
}

/// Disconnects `/dev/nbd<index>` if it still carries `backend`: its handle is gone, so the I/O the
/// driver holds for it fails now rather than at the dead-connection timeout.
async fn give_up(index: u32, backend: String) {
    let result = tokio::task::spawn_blocking(move || {
        if driver::backend(index).as_deref() != Some(backend.as_str()) {
            return Ok(false);
        }
        driver::disconnect(index).map(|()| true)
    })
    .await;
    match result {
        Ok(Ok(true)) => warn!(device = device_path(index), "disconnected: its volume's handle is not ours any more"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => warn!(device = device_path(index), error = %e, "cannot disconnect"),
        Err(e) => warn!(device = device_path(index), error = %e, "disconnecting failed"),
    }
}

/// Re-opens the volumes of kernel devices a previous agent left connected that no state file names
/// (`skip`), and gives the devices fresh sockets.
pub(crate) async fn reattach_all(agent: &Agent, skip: &[u32]) -> Vec<String> {
    let mut report = Vec::new();
    let loaded = tokio::task::spawn_blocking(driver::loaded).await.unwrap_or(false);
    if !loaded {
        return report;
    }
    let devices = match tokio::task::spawn_blocking(orphaned_devices).await {
        Ok(Ok(devices)) => devices,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot list kernel NBD devices; nothing reattached");
            return report;
        }
        Err(e) => {
            warn!(error = %e, "listing kernel NBD devices failed");
            return report;
        }
    };
    for (index, text, id) in devices.into_iter().filter(|(index, ..)| !skip.contains(index)) {
        let line = match reattach_one(agent, index, text, &id).await {
            Ok(path) => format!("reattached {path} to volume {}", id.volume),
            Err(e) => format!("{}: not reattached: {e}", device_path(index)),
        };
        info!("{line}");
        report.push(line);
    }
    report
}

async fn reattach_one(agent: &Agent, index: u32, text: String, id: &BackendId) -> Result<String, AgentError> {
    let settings = agent.kernel_settings();
    let deadline = Instant::now() + Duration::from_secs(settings.dead_conn_timeout_secs.max(1));
    loop {
        match agent.reattach_kernel(&id.volume, id.mode, index, text.clone(), id.pool).await {
            Ok(info) => return Ok(info.kernel_device.unwrap_or_else(|| device_path(index))),
            // The old handle still holds the volume (its lease and durable time have not run out),
            // or a reconfiguration is in progress: both pass.
            Err(AgentError::Session(SessionError::Server(m)))
                if (m.contains(" is open ") || m.contains("retry in a moment")) && Instant::now() < deadline =>
            {
                info!(volume = id.volume, "the previous handle still holds the volume; retrying: {m}");
                tokio::time::sleep(REOPEN_RETRY).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_aliases_rewrite_only_the_host() {
        let a = HostAliases::new(vec![parse_alias("127.0.0.1=10.0.2.2").unwrap()]);
        assert_eq!(a.rewrite("nbd://127.0.0.1:10809/x"), "nbd://10.0.2.2:10809/x");
        assert_eq!(a.rewrite("nbd://127.0.0.1/x"), "nbd://10.0.2.2/x");
        assert_eq!(a.rewrite("nbd://127.0.0.12:1/x"), "nbd://127.0.0.12:1/x");
        assert_eq!(a.rewrite("nbd+unix:///x?socket=/s"), "nbd+unix:///x?socket=/s");
        assert!(parse_alias("a").is_err() && parse_alias("=b").is_err());
    }
}
