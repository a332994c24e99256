//! [`CacheMirror`] over a control connection: the requests of protocol 6
//! (`MirrorOpen`, `MirrorAppend`, `MirrorRelease`) under the handle that
//! holds the volume exclusively.
//!
//! The connection is looked up at every request ([`ClientSource`]): in
//! `sanvol-agent` it is the owner's current control connection, so after a
//! reconnect (and the resume of the handle on it) mirroring continues on
//! the new session; a request on a session that does not hold the handle
//! fails, which turns the cache write-through until mirroring restarts.
//! Appends and releases go only to the connection mirroring was started
//! on: on any other (a reconnect, a handoff or takeover to another server,
//! whose mirror never saw the earlier writes) they fail without being sent,
//! so the cache writes through and starts mirroring again there: with a
//! server of protocol 15, with the log's records staged first
//! (`MirrorStage`, then `MirrorOpenStaged` on the same connection);
//! with an older one, empty, once it has destaged everything.
//!
//! Every request is bounded by [`MIRROR_REQUEST_TIMEOUT`]: a server that
//! stops answering (stopped, partitioned) turns the cache write-through
//! instead of holding writes for the control client's general timeout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use control_client::{ControlClient, ControlClientError};
use volume_format::control::messages::{ErrorCode, HolderCacheReport, MirrorRecord, Request, Response, VolumeCache};
use volume_format::HandleId;

use super::{CacheMirror, MirrorAck};

/// The longest a mirror request may take before the cache goes
/// write-through.
pub const MIRROR_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The control connection to send a mirror request on, if there is one now,
/// with a number that differs for every connection.
pub type ClientSource = Arc<dyn Fn() -> Option<(u64, ControlClient)> + Send + Sync>;

pub struct ControlMirror {
    client: ClientSource,
    handle: HandleId,
    /// The connection mirroring was last started on.
    opened_on: Mutex<Option<u64>>,
    /// The connection the records of a start with the log's records were
    /// staged on, and the attempt: the start must go to the same one.
    staged_on: Mutex<Option<(u64, u64)>>,
}

impl ControlMirror {
    /// Mirrors over one fixed connection.
    pub fn new(client: ControlClient, handle: HandleId) -> ControlMirror {
        ControlMirror::with_source(Arc::new(move || Some((0, client.clone()))), handle)
    }

    /// Mirrors over whatever connection `client` returns at each request.
    pub fn with_source(client: ClientSource, handle: HandleId) -> ControlMirror {
        ControlMirror { client, handle, opened_on: Mutex::new(None), staged_on: Mutex::new(None) }
    }

    fn opened_on(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.opened_on.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn staged_on(&self) -> std::sync::MutexGuard<'_, Option<(u64, u64)>> {
        self.staged_on.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an open on the current connection, and remembers it.
    async fn open_here(&self) -> Result<Response, ControlClientError> {
        let Some((conn, client)) = (self.client)() else { return Err(ControlClientError::Closed) };
        let answer =
            client.request_with_timeout(Request::MirrorOpen { handle: self.handle }, MIRROR_REQUEST_TIMEOUT).await;
        *self.opened_on() = answer.is_ok().then_some(conn);
        answer
    }

    /// The connection mirroring started on, or why there is none.
    fn mirroring_client(&self) -> Result<ControlClient, String> {
        let (conn, client) = (self.client)().ok_or("not connected to the metadata server")?;
        if *self.opened_on() != Some(conn) {
            return Err("the control connection changed since mirroring started; mirroring starts afresh".into());
        }
        Ok(client)
    }

    /// Sends an append or release on the connection mirroring started on.
    async fn call(&self, request: Request) -> Result<Response, String> {
        let client = self.mirroring_client()?;
        client.request_with_timeout(request, MIRROR_REQUEST_TIMEOUT).await.map_err(|e| e.to_string())
    }
}

/// Servers before this protocol have no mirror (and no cached volumes).
pub const MIRROR_PROTOCOL_MIN: u32 = 6;

impl ControlMirror {
    /// Tells the server how the cache stands ([`super::report`]), on the
    /// current connection (mirroring or not). Nothing is sent to a server
    /// older than protocol 14, or while there is no connection.
    pub async fn report(&self, report: HolderCacheReport) -> Result<(), String> {
        let Some((_, client)) = (self.client)() else { return Ok(()) };
        if client.session().version < volume_format::control::CACHE_REPORT_PROTOCOL_MIN {
            return Ok(());
        }
        match client
            .request_with_timeout(Request::CacheReport { handle: self.handle, report }, MIRROR_REQUEST_TIMEOUT)
            .await
        {
            Ok(Response::Done) => Ok(()),
            Ok(other) => Err(format!("the metadata server answered CacheReport with {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The volume's cache setting, asked with `MirrorOpen` (which also
    /// empties the server's mirror of it): `None` when the volume has no
    /// cache. Only for a handle opened afresh: the server replayed the
    /// mirror before the open, so it holds nothing needed; after a resume
    /// the agent's own log must be replayed first (see
    /// [`super::OldLog`]).
    pub async fn setting(&self) -> Result<Option<VolumeCache>, String> {
        let (_, client) = (self.client)().ok_or("not connected to the metadata server")?;
        if client.session().version < MIRROR_PROTOCOL_MIN {
            return Ok(None);
        }
        match self.open_here().await {
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
        match self.open_here().await.map_err(|e| e.to_string())? {
            Response::MirrorOpened { cache: Some(_) } => Ok(()),
            Response::MirrorOpened { cache: None } => Err("the volume has no cache at the metadata server".into()),
            other => Err(format!("the metadata server answered MirrorOpen with {other:?}")),
        }
    }

    async fn append(&self, records: Vec<MirrorRecord>) -> Result<MirrorAck, String> {
        let last = records.last().map_or(0, |r| r.seq);
        let client = self.mirroring_client()?;
        let sent = client
            .send_request(Request::MirrorAppend { handle: self.handle, records }, MIRROR_REQUEST_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Box::pin(async move {
            match sent.answer().await.map_err(|e| e.to_string())? {
                Response::Mirrored { upto_seq } if upto_seq == last => Ok(()),
                other => Err(format!("the metadata server answered MirrorAppend with {other:?}")),
            }
        }))
    }

    async fn release(&self, upto_seq: u64) -> Result<(), String> {
        match self.call(Request::MirrorRelease { handle: self.handle, upto_seq }).await? {
            Response::Done => Ok(()),
            other => Err(format!("the metadata server answered MirrorRelease with {other:?}")),
        }
    }

    fn still_mirroring(&self) -> Result<(), String> {
        self.mirroring_client().map(|_| ())
    }

    /// With a server of protocol 15 or later on the current connection.
    fn stages(&self) -> Option<bool> {
        (self.client)().map(|(_, c)| c.session().version >= volume_format::control::MIRROR_STAGE_PROTOCOL_MIN)
    }

    async fn stage(&self, copy: u64, records: Vec<MirrorRecord>) -> Result<(), String> {
        let (conn, client) = (self.client)().ok_or("not connected to the metadata server")?;
        let last = records.last().map_or(0, |r| r.seq);
        let request = Request::MirrorStage { handle: self.handle, copy, records };
        match client.request_with_timeout(request, MIRROR_REQUEST_TIMEOUT).await.map_err(|e| e.to_string())? {
            Response::Mirrored { upto_seq } if upto_seq == last => {
                *self.staged_on() = Some((conn, copy));
                Ok(())
            }
            other => Err(format!("the metadata server answered MirrorStage with {other:?}")),
        }
    }

    async fn open_staged(&self, copy: u64, records: u64) -> Result<(), String> {
        let (conn, client) = (self.client)().ok_or("not connected to the metadata server")?;
        if *self.staged_on() != Some((conn, copy)) {
            return Err("the control connection changed while the cache's records were staged; staging again".into());
        }
        let request = Request::MirrorOpenStaged { handle: self.handle, copy, records };
        let answer = client.request_with_timeout(request, MIRROR_REQUEST_TIMEOUT).await;
        *self.staged_on() = None;
        *self.opened_on() = answer.is_ok().then_some(conn);
        match answer.map_err(|e| e.to_string())? {
            Response::MirrorOpened { cache: Some(_) } => Ok(()),
            Response::MirrorOpened { cache: None } => Err("the volume has no cache at the metadata server".into()),
            other => Err(format!("the metadata server answered MirrorOpenStaged with {other:?}")),
        }
    }
}
