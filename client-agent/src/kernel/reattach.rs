//! After an agent restart: find the kernel devices a previous agent left connected and bind them
//! to their volumes again. Plus the device-URI host aliases an agent in another network namespace
//! (a VM) needs.
//!
//! A device is taken over only if all of these hold: the driver lists it as connected; its backend
//! identifier is a sanvol one ([`BackendId`]); the process that connected it is gone (a live agent
//! keeps its own devices); the re-opened volume belongs to the identifier's pool. The driver itself
//! refuses a reconfigure whose identifier differs from the device's.
//!
//! Re-opening may be refused for a while: the dead agent's handle still holds the volume until its
//! lease plus the server's `durable_ms` runs out. (A resume would skip that wait, but the resume key
//! died with the old agent's memory; the new agent is a new instance and re-opens.) The agent retries (every
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

pub(crate) async fn reattach_all(agent: &Agent) -> Vec<String> {
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
    for (index, text, id) in devices {
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
