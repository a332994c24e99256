//! A handle's capabilities for devices that fence (`sanvol-target`, see
//! `volume_format::capability`), and whether the handle was fenced.
//!
//! Why per handle: a fencing device lets a connection write only under a
//! capability naming one holder, and fences holders one by one. A
//! connection authorized for handle A must never carry handle B's writes,
//! so the agent opens its connections to such a device per handle
//! ([`crate::devices::HandleLeg`]); plain devices keep their shared
//! connections.
//!
//! Why pulled when connecting rather than pushed with opens and layouts:
//! the target checks a capability at the handshake only, so the agent needs
//! one exactly when it (re)connects, and asking then (`Request::Capabilities`,
//! one round trip, on the fallback link's connection) needs no change to
//! the open, resume or publish messages. Renewal is the same step: a
//! capability is asked for again when the layout it was issued for is
//! older than the leg's, or when less than half of its lifetime (the server
//! gives a day) is left ([`fresh_enough`]) — so a reconnect never presents
//! an expired one. A connection, once open, is not cut when its capability
//! expires (the target checks it at the handshake only).
//!
//! Why a fenced handle is final: the server fences a handle at the devices
//! only when it breaks it or releases it after its lease ran out, and handle
//! ids are never reused. So once a device refuses the handle as fenced (or
//! the server says the handle is no longer open), every request of the
//! handle fails at once with [`IoErrorKind::PermissionDenied`] — not a path
//! error, so nothing is re-sent through the server either — as with a lost
//! lease. The way on is to reopen the volume.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use blockio::{IoError, IoErrorKind};
use volume_format::capability::SignedCapability;
use volume_format::control::messages::{ErrorCode, Response};
use volume_format::HandleId;

use crate::devices::PooledDevice;
use crate::fallback::{LinkError, ServerLink};

/// Whether `c` has more than half of its lifetime left at `now_unix_secs`
/// (else it is asked for again before a connection presents it).
pub fn fresh_enough(c: &SignedCapability, now_unix_secs: u64) -> bool {
    let c = &c.capability;
    let lifetime = c.expires_unix_secs.saturating_sub(c.issued_unix_secs);
    c.expires_unix_secs.saturating_sub(now_unix_secs) > lifetime / 2
}

struct Cached {
    layout_generation: u64,
    by_device: HashMap<u32, SignedCapability>,
}

/// One handle's capabilities and fenced state, shared by its legs.
pub struct HandleCredentials {
    handle: HandleId,
    link: Option<Arc<ServerLink>>,
    cached: tokio::sync::Mutex<Option<Cached>>,
    fenced: Mutex<Option<String>>,
    /// Devices holding a connection of this handle: closed when the
    /// handle's last layout is dropped (it was closed or revoked).
    devices: Mutex<Vec<Weak<PooledDevice>>>,
}

impl Drop for HandleCredentials {
    fn drop(&mut self) {
        let devices = std::mem::take(self.devices.get_mut().unwrap_or_else(|e| e.into_inner()));
        for device in devices.iter().filter_map(Weak::upgrade) {
            device.drop_handle_client(self.handle.0);
        }
    }
}

impl std::fmt::Debug for HandleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandleCredentials").field("handle", &self.handle).finish()
    }
}

fn now_unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl HandleCredentials {
    /// Without a link (tests, tools) no capability can be had: fencing
    /// devices refuse the handle's I/O with a clear error.
    pub fn new(handle: HandleId, link: Option<Arc<ServerLink>>) -> Arc<HandleCredentials> {
        Arc::new(HandleCredentials {
            handle,
            link,
            cached: tokio::sync::Mutex::new(None),
            fenced: Mutex::new(None),
            devices: Mutex::new(Vec::new()),
        })
    }

    /// Credentials holding `capabilities` (device index → capability) for
    /// the layout with `layout_generation`, with no link to ask for more:
    /// for tools and tests that get capabilities another way.
    pub fn with_capabilities(
        handle: HandleId,
        layout_generation: u64,
        capabilities: impl IntoIterator<Item = (u32, SignedCapability)>,
    ) -> Arc<HandleCredentials> {
        let by_device = capabilities.into_iter().collect();
        let creds = HandleCredentials::new(handle, None);
        if let Ok(mut cached) = creds.cached.try_lock() {
            *cached = Some(Cached { layout_generation, by_device });
        }
        creds
    }

    pub fn handle(&self) -> HandleId {
        self.handle
    }

    /// `device` now holds a connection of this handle.
    pub fn remember(&self, device: &Arc<PooledDevice>) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices.retain(|d| d.strong_count() > 0);
        if !devices.iter().any(|d| std::ptr::eq(d.as_ptr(), Arc::as_ptr(device))) {
            devices.push(Arc::downgrade(device));
        }
    }

    /// The error every request of a fenced handle fails with, if it was.
    pub fn fenced(&self) -> Option<IoError> {
        let why = self.fenced.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(IoError::new(
            IoErrorKind::PermissionDenied,
            format!(
                "handle {} was fenced ({why}): another holder got the volume; nothing more is written for this \
                 handle on any path — reopen the volume",
                self.handle.0
            ),
        ))
    }

    /// Marks the handle fenced for good; returns the error to hand up.
    pub fn set_fenced(&self, why: &str) -> IoError {
        {
            let mut fenced = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
            if fenced.is_none() {
                tracing::error!(handle = %self.handle, reason = %why, "handle fenced: its I/O fails from now on");
                *fenced = Some(why.to_string());
            }
        }
        self.fenced().unwrap_or_else(|| IoError::new(IoErrorKind::PermissionDenied, why.to_string()))
    }

    /// The capability to present on `device` for a leg of the layout with
    /// `layout_generation`: the cached one if it is for that layout or a
    /// newer one and not near its expiry, else a fresh set from the server.
    pub async fn capability(&self, device: u32, layout_generation: u64) -> Result<SignedCapability, IoError> {
        if let Some(e) = self.fenced() {
            return Err(e);
        }
        let mut cached = self.cached.lock().await;
        let fresh = |c: &SignedCapability| fresh_enough(c, now_unix_secs());
        if let Some(c) = cached.as_ref().filter(|c| c.layout_generation >= layout_generation) {
            if let Some(capability) = c.by_device.get(&device).filter(|c| fresh(c)) {
                return Ok(capability.clone());
            }
        }
        let Some(link) = &self.link else {
            return Err(IoError::new(
                IoErrorKind::PermissionDenied,
                format!("device {device} fences, and this agent has no link to the metadata server to ask for handle {}'s capability", self.handle.0),
            ));
        };
        let answer = link.capabilities(self.handle).await;
        let (got_generation, devices) = match answer {
            Ok(Response::Capabilities { handle, layout_generation, devices }) if handle == self.handle => {
                (layout_generation, devices)
            }
            Ok(other) => {
                return Err(IoError::io(format!(
                    "unexpected answer to a capability request for handle {}: {other:?}",
                    self.handle.0
                )))
            }
            Err(LinkError::Server(e)) if e.code == ErrorCode::HandleBroken => return Err(self.set_fenced(&e.message)),
            Err(e) => {
                return Err(IoError::io(format!(
                    "device {device} fences and the metadata server gave no capability for handle {}: {e} \
                     (a metadata server older than protocol 7 issues none: upgrade it)",
                    self.handle.0
                )))
            }
        };
        tracing::info!(handle = %self.handle, layout_generation = got_generation, devices = devices.len(), "capabilities received");
        let by_device = devices.into_iter().map(|d| (d.device.0, d.capability)).collect();
        let c = cached.insert(Cached { layout_generation: got_generation, by_device });
        c.by_device.get(&device).cloned().ok_or_else(|| {
            IoError::io(format!(
                "the metadata server gave handle {} no capability for device {device} (layout {got_generation})",
                self.handle.0
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fenced_handle_fails_everything_with_a_refusal_not_a_path_error() {
        let creds = HandleCredentials::new(HandleId(7), None);
        assert!(creds.fenced().is_none());
        let e = creds.set_fenced("device 0 refused: fenced");
        assert_eq!(e.kind, IoErrorKind::PermissionDenied);
        assert!(e.message.contains("handle 7") && e.message.contains("reopen"), "{e}");
        assert!(!crate::fallback::is_path_error(&e), "never re-sent through the server");
        let again = creds.capability(0, 1).await.unwrap_err();
        assert_eq!(again.kind, IoErrorKind::PermissionDenied);
        assert!(again.message.contains("device 0 refused"), "the first reason is kept: {again}");
    }

    #[test]
    fn a_capability_is_renewed_past_half_its_lifetime() {
        use volume_format::capability::{Capability, Holder};
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let c = SignedCapability::sign(
            Capability {
                holder: Holder::Handle(HandleId(1)),
                generation: 1,
                device_uuid: Some(uuid::Uuid::from_u128(1)),
                writable: Vec::new(),
                issued_unix_secs: 1000,
                expires_unix_secs: 2000,
            },
            &key,
        );
        assert!(fresh_enough(&c, 1000));
        assert!(fresh_enough(&c, 1499));
        assert!(!fresh_enough(&c, 1500));
        assert!(!fresh_enough(&c, 3000));
    }

    #[tokio::test]
    async fn without_a_link_no_capability_is_had() {
        let creds = HandleCredentials::new(HandleId(7), None);
        let e = creds.capability(3, 1).await.unwrap_err();
        assert!(e.message.contains("device 3 fences"), "{e}");
        assert!(creds.fenced().is_none(), "not having one is not being fenced");
    }
}
