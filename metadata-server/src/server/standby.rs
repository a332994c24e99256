//! What a standby metadata server answers: every request is refused with
//! [`ErrorCode::NotActive`], naming the active server and where to reach
//! it, so an admin sees where to go and an agent moves on to its next
//! address. Connections are authenticated as on the active server (the
//! standby holds the pool's server key and reads the pool's clients), so
//! nobody learns anything without a key the pool authorizes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use volume_format::control::messages::{ControlError, ErrorCode, Request, Response, MIRROR_CHUNK_BYTES_MAX};
use volume_format::lease::LeaseRecord;
use volume_format::VolumeId;

use super::owner::Command;

/// The refusal a standby gives, from the owner record it last saw.
pub fn not_active_message(owner: Option<&LeaseRecord>, me: &str) -> String {
    match owner {
        Some(o) => format!(
            "this metadata server ({me}) is standing by; the pool is served by {} (host id {}) since {} at {}",
            o.name,
            o.host_id,
            super::durable::hms(o.since_unix_ms / 1000),
            if o.addrs.is_empty() { "an address it did not advertise".to_string() } else { o.addrs.join(", ") }
        ),
        None => format!("this metadata server ({me}) is standing by and has not seen the active server yet; retry"),
    }
}

/// Answers the commands of standby sessions until every sender is gone.
/// `mirror_dir`: this server's cache mirrors, handed to the active server
/// when it must replay one recorded here ([`Request::MirrorFetch`]).
pub async fn run(
    mut commands: mpsc::Receiver<Command>,
    owner: watch::Receiver<Option<LeaseRecord>>,
    me: Arc<str>,
    mirror_dir: PathBuf,
) {
    // Each session's kick sender is kept while it is connected: dropping
    // it would close the session before its first answer went out.
    let mut kicks = std::collections::BTreeMap::new();
    while let Some(cmd) = commands.recv().await {
        match cmd {
            Command::Request { request: Request::MirrorFetch { volume, generation, offset }, reply, .. } => {
                let (dir, me) = (mirror_dir.clone(), me.clone());
                // Off this loop: the file is read on the blocking pool.
                tokio::spawn(async move {
                    let answer =
                        tokio::task::spawn_blocking(move || mirror_chunk(&dir, &me, volume, generation, offset))
                            .await
                            .unwrap_or_else(|e| Err(ControlError::new(ErrorCode::Internal, e.to_string())));
                    let _ = reply.send(answer);
                });
            }
            Command::Request { reply, .. } => {
                let msg = not_active_message(owner.borrow().as_ref(), &me);
                let _ = reply.send(Err(ControlError::new(ErrorCode::NotActive, msg)));
            }
            Command::PublishMeta { done } => {
                let _ = done.send(());
            }
            Command::Connected { session, kick, .. } => {
                kicks.insert(session, kick);
            }
            Command::Disconnected { session } => {
                kicks.remove(&session);
            }
        }
    }
}

/// A chunk of this server's mirror file of `volume` for the active server
/// ([`Request::MirrorFetch`]): only of the generation asked or the one after
/// it — prepared here for a commit that did not happen, it holds what the
/// generation asked held (the rule of a replay here, `mirror::replayable`).
fn mirror_chunk(
    dir: &Path,
    me: &str,
    volume: VolumeId,
    generation: u64,
    offset: u64,
) -> Result<Response, ControlError> {
    use crate::mirror::store::Chunk;
    let path = crate::mirror::store::mirror_path(dir, volume);
    let chunk = crate::mirror::store::read_chunk(&path, volume, offset, MIRROR_CHUNK_BYTES_MAX).map_err(|e| {
        ControlError::new(ErrorCode::Unavailable, format!("metadata server {me} cannot read its cache mirror: {e}"))
    })?;
    let not_here = |what: String| {
        ControlError::new(
            ErrorCode::NotFound,
            format!("metadata server {me} holds no cache mirror of volume {volume} at generation {generation}: {what}"),
        )
    };
    match chunk {
        None => Err(not_here(format!("there is no {}", path.display()))),
        Some(Chunk { generation: held, total_bytes, data }) if crate::mirror::replayable(held, generation, true) => {
            let held = held.unwrap_or(generation);
            if offset == 0 {
                tracing::info!(volume = %volume, generation = held, bytes = total_bytes, "handing this server's cache mirror to the active server");
            }
            Ok(Response::MirrorChunk { generation: held, total_bytes, data })
        }
        Some(Chunk { generation: held, .. }) => Err(not_here(match held {
            Some(g) => format!("{} is of generation {g}", path.display()),
            None => format!("{} has no generation", path.display()),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::store::{mirror_path, VolumeMirror};

    const V: VolumeId = VolumeId(7);

    fn chunk(dir: &Path, generation: u64, offset: u64) -> Result<(u64, u64, usize), ControlError> {
        match mirror_chunk(dir, "mds-a", V, generation, offset)? {
            Response::MirrorChunk { generation, total_bytes, data } => Ok((generation, total_bytes, data.len())),
            other => panic!("answered {other:?}"),
        }
    }

    #[test]
    fn a_standby_hands_out_only_a_file_of_the_generation_asked_or_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let missing = chunk(dir.path(), 2, 0).unwrap_err();
        assert_eq!(missing.code, ErrorCode::NotFound);
        assert!(missing.message.contains("there is no"), "{}", missing.message);

        let log_bytes = 8 << 20;
        VolumeMirror::create(&mirror_path(dir.path(), V), V, log_bytes, 2).unwrap();
        let total = std::fs::metadata(mirror_path(dir.path(), V)).unwrap().len();
        assert_eq!(chunk(dir.path(), 2, 0).unwrap(), (2, total, MIRROR_CHUNK_BYTES_MAX.min(total as usize)));
        // Prepared for the generation after the one recorded: it holds what
        // that one held.
        assert_eq!(chunk(dir.path(), 1, 0).unwrap().0, 2);
        // The last chunk is short, and past the end there is nothing.
        let last = total - 100;
        assert_eq!(chunk(dir.path(), 2, last).unwrap(), (2, total, 100));
        assert_eq!(chunk(dir.path(), 2, total).unwrap(), (2, total, 0));
        assert_eq!(chunk(dir.path(), 2, total + 5).unwrap(), (2, total, 0));
        for stale in [3, 0] {
            let e = chunk(dir.path(), stale, 0).unwrap_err();
            assert_eq!(e.code, ErrorCode::NotFound, "generation {stale}");
            assert!(e.message.contains("is of generation 2"), "{}", e.message);
        }
    }
}
