//! [`CacheMirror`] over a control connection: the requests of protocol 6
//! (`MirrorOpen`, `MirrorAppend`, `MirrorRelease`) under the handle that
//! holds the volume exclusively.
//!
//! The connection is looked up at every request ([`ClientSource`]): in
//! `sanvol-agent` it is the owner's current control connection, so after a
//! reconnect (and the resume of the handle on it) mirroring continues on
//! the new session; a request on a session that does not hold the handle
//! fails, which turns the cache write-through until mirroring restarts.
//!
//! Every request is bounded by [`MIRROR_REQUEST_TIMEOUT`]: a server that
//! stops answering (stopped, partitioned) turns the cache write-through
//! instead of holding writes for the control client's general timeout.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use control_client::{ControlClient, ControlClientError};
use volume_format::control::messages::{ErrorCode, MirrorRecord, Request, Response, VolumeCache};
use volume_format::HandleId;

use super::CacheMirror;

/// The longest a mirror request may take before the cache goes
/// write-through.
pub const MIRROR_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The control connection to send a mirror request on, if there is one now.
pub type ClientSource = Arc<dyn Fn() -> Option<ControlClient> + Send + Sync>;

pub struct ControlMirror {
    client: ClientSource,
    handle: HandleId,
}

impl ControlMirror {
    /// Mirrors over one fixed connection.
    pub fn new(client: ControlClient, handle: HandleId) -> ControlMirror {
        ControlMirror::with_source(Arc::new(move || Some(client.clone())), handle)
    }

    /// Mirrors over whatever connection `client` returns at each request.
    pub fn with_source(client: ClientSource, handle: HandleId) -> ControlMirror {
        ControlMirror { client, handle }
    }

    async fn call(&self, request: Request) -> Result<Response, String> {
        let client = (self.client)().ok_or("not connected to the metadata server")?;
        client.request_with_timeout(request, MIRROR_REQUEST_TIMEOUT).await.map_err(|e| e.to_string())
    }
}

/// Servers before this protocol have no mirror (and no cached volumes).
pub const MIRROR_PROTOCOL_MIN: u32 = 6;

impl ControlMirror {
    /// The volume's cache setting, asked with `MirrorOpen` (which also
    /// empties the server's mirror of it): `None` when the volume has no
    /// cache. Only for a handle opened afresh: the server replayed the
    /// mirror before the open, so it holds nothing needed; after a resume
    /// the agent's own log must be replayed first (see
    /// [`super::OldLog`]).
    pub async fn setting(&self) -> Result<Option<VolumeCache>, String> {
        let client = (self.client)().ok_or("not connected to the metadata server")?;
        if client.session().version < MIRROR_PROTOCOL_MIN {
            return Ok(None);
        }
        let request = Request::MirrorOpen { handle: self.handle };
        match client.request_with_timeout(request, MIRROR_REQUEST_TIMEOUT).await {
            Ok(Response::MirrorOpened { cache }) => Ok(cache),
            // An exclusive holder hears this only when the volume has no cache.
            Err(ControlClientError::Server(e)) if e.code == ErrorCode::InvalidArgument => Ok(None),
            Err(e) => Err(format!("asking the metadata server for the volume's cache setting: {e}")),
            Ok(other) => Err(format!("the metadata server answered MirrorOpen with {other:?}")),
        }
    }
}

#[async_trait]
impl CacheMirror for ControlMirror {
    async fn open(&self) -> Result<(), String> {
        match self.call(Request::MirrorOpen { handle: self.handle }).await? {
            Response::MirrorOpened { cache: Some(_) } => Ok(()),
            Response::MirrorOpened { cache: None } => Err("the volume has no cache at the metadata server".into()),
            other => Err(format!("the metadata server answered MirrorOpen with {other:?}")),
        }
    }

    async fn append(&self, records: Vec<MirrorRecord>) -> Result<(), String> {
        let last = records.last().map_or(0, |r| r.seq);
        match self.call(Request::MirrorAppend { handle: self.handle, records }).await? {
            Response::Mirrored { upto_seq } if upto_seq == last => Ok(()),
            other => Err(format!("the metadata server answered MirrorAppend with {other:?}")),
        }
    }

    async fn release(&self, upto_seq: u64) -> Result<(), String> {
        match self.call(Request::MirrorRelease { handle: self.handle, upto_seq }).await? {
            Response::Done => Ok(()),
            other => Err(format!("the metadata server answered MirrorRelease with {other:?}")),
        }
    }
}
