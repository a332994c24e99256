//! [`CacheMirror`] over a control connection: the requests of protocol 6
//! (`MirrorOpen`, `MirrorAppend`, `MirrorRelease`) under the handle that
//! holds the volume exclusively.
//!
//! Every request is bounded by [`MIRROR_REQUEST_TIMEOUT`]: a server that
//! stops answering (stopped, partitioned) turns the cache write-through
//! instead of holding writes for the control client's general timeout.

use std::time::Duration;

use async_trait::async_trait;
use control_client::ControlClient;
use volume_format::control::messages::{MirrorRecord, Request, Response};
use volume_format::HandleId;

use super::CacheMirror;

/// The longest a mirror request may take before the cache goes
/// write-through.
pub const MIRROR_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ControlMirror {
    client: ControlClient,
    handle: HandleId,
}

impl ControlMirror {
    pub fn new(client: ControlClient, handle: HandleId) -> ControlMirror {
        ControlMirror { client, handle }
    }

    async fn call(&self, request: Request) -> Result<Response, String> {
        self.client.request_with_timeout(request, MIRROR_REQUEST_TIMEOUT).await.map_err(|e| e.to_string())
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
