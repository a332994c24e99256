//! Fetching a cache mirror from the server that holds it (protocol 16).
//!
//! Why: each mirror generation is recorded with the server that holds its
//! file, and only that server's file may be replayed (`super::replayable`).
//! A holder that dies right after a handoff — before it mirrored again at
//! the new server — leaves its acknowledged writes in a file at the server
//! that handed off, which now stands by. Rather than refuse the open until
//! an operator hands the pool back, the active server asks that server for
//! its file and replays the copy: a planned handoff moves the mirror state
//! with it when it is needed.
//!
//! Safe because the server standing by writes nothing to its mirror files
//! (its term ended with its sessions), answers only the pool's server key
//! (the `server` role), and answers only for a file of the recorded
//! generation or the one after it (the same rule as a replay there); every
//! chunk says the file's generation and length, so a file that changed
//! while it was copied is refused; and the copy is read back with the same
//! checks as a local file (each record's checksum) before anything is
//! written to the devices. If the server cannot be reached, the open is
//! refused as before, naming it.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use control_client::{ControlAddr, ControlClient};
use ed25519_dalek::SigningKey;
use volume_format::control::auth::Role;
use volume_format::control::messages::{Request, Response};
use volume_format::control::MIRROR_FETCH_PROTOCOL_MIN;
use volume_format::VolumeId;

/// Where to fetch a mirror from: the server a record names, as the pool's
/// server listing has it, and the key this server proves itself with (the
/// pool's server key, which that server holds too).
#[derive(Clone)]
pub struct MirrorSource {
    pub server: String,
    pub addrs: Vec<String>,
    pub key: Arc<SigningKey>,
    /// This server's name (the other server's logs name the fetcher).
    pub me: String,
}

impl std::fmt::Debug for MirrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorSource").field("server", &self.server).field("addrs", &self.addrs).finish()
    }
}

/// How long one chunk may take to arrive before the fetch is given up.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the connection and its handshake may take (a server that is
/// stopped, not gone, accepts and then says nothing).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Copies `volume`'s mirror file of `generation` (or of the one after it)
/// from `source` to `dest`, durably. Tries each of the server's addresses
/// in turn; the error says what each one answered.
pub async fn fetch(source: &MirrorSource, volume: VolumeId, generation: u64, dest: &Path) -> Result<u64, String> {
    if source.addrs.is_empty() {
        return Err(format!("{} advertised no address", source.server));
    }
    let mut failures = Vec::new();
    for addr in &source.addrs {
        match fetch_from(source, addr, volume, generation, dest).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) => failures.push(format!("at {addr}: {e}")),
        }
    }
    Err(format!("fetching the file from {} failed ({})", source.server, failures.join("; ")))
}

async fn fetch_from(
    source: &MirrorSource,
    addr: &str,
    volume: VolumeId,
    generation: u64,
    dest: &Path,
) -> Result<u64, String> {
    let parsed: ControlAddr = addr.parse().map_err(|e| format!("not an address: {e}"))?;
    let pinned = source.key.verifying_key();
    let connect = ControlClient::connect(&parsed, &source.key, Some(&pinned), Role::Server, &source.me, [0; 16]);
    let (client, _events) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    let version = client.session().version;
    if version < MIRROR_FETCH_PROTOCOL_MIN {
        client.close().await;
        return Err(format!(
            "it speaks control protocol {version}; handing out a mirror needs {MIRROR_FETCH_PROTOCOL_MIN} (upgrade it)"
        ));
    }
    let result = copy(&client, volume, generation, dest).await;
    client.close().await;
    result
}

/// The chunks, one after the other, into `dest` (created afresh).
async fn copy(client: &ControlClient, volume: VolumeId, generation: u64, dest: &Path) -> Result<u64, String> {
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dest)
            .map_err(|e| format!("creating {}: {e}", dest.display()))?,
    );
    let mut offset = 0u64;
    // The file's generation and length, as the first chunk said.
    let mut seen: Option<(u64, u64)> = None;
    loop {
        let request = Request::MirrorFetch { volume, generation, offset };
        let answer = client.request_with_timeout(request, CHUNK_TIMEOUT).await.map_err(|e| e.to_string())?;
        let Response::MirrorChunk { generation: held, total_bytes, data } = answer else {
            return Err(format!("unexpected answer {answer:?}"));
        };
        match seen {
            None if !super::replayable(Some(held), generation, true) => {
                return Err(format!("it holds generation {held}, not {generation}"));
            }
            None => seen = Some((held, total_bytes)),
            Some(first) if first != (held, total_bytes) => {
                return Err(format!(
                    "its file changed while it was copied (generation {} of {} bytes, then {held} of {total_bytes})",
                    first.0, first.1
                ));
            }
            Some(_) => {}
        }
        if offset >= total_bytes {
            break;
        }
        if data.is_empty() || data.len() as u64 > total_bytes - offset {
            return Err(format!("a chunk of {} bytes at {offset} of {total_bytes}", data.len()));
        }
        let len = data.len() as u64;
        let f = file.clone();
        tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing {}: {e}", dest.display()))?;
        offset += len;
    }
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("syncing {}: {e}", dest.display()))?;
    Ok(offset)
}
