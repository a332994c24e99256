//! The client side of a **backup channel**: how `sanvol-backup` (or any
//! admin/backup key holder) reaches the backup pseudo-device.
//!
//! A backup channel is a data channel ([`DATA_CHANNEL_PREAMBLE`], the usual
//! mutual handshake, one request) whose request is [`Request::BackupChannel`].
//! Once the server answers OK, the same stream carries plain NBD (fixed
//! newstyle) serving every snapshot of the pool as a read-only export named
//! `VOLUME@SNAPSHOT`, with `base:allocation` and the
//! `sanvol:changed-since:OLDER` metadata contexts. The stream this returns
//! is positioned right there: hand it to any NBD client
//! (`blockio::client::NbdClient::connect_stream`), or pipe it to a local
//! socket so standard tools (nbdinfo, nbdcopy, qemu-img) can read snapshots
//! (`sanvol-backup serve`).

use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::io::AsyncWriteExt;
use volume_format::control::auth::Role;
use volume_format::control::messages::{ClientMessage, Request, Response, ServerMessage, DATA_CHANNEL_PREAMBLE};

use super::addr::{ControlAddr, ControlStream};
use super::handshake::HandshakeError;
use super::{framed, handshake};

/// Why a backup channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackupChannelError {
    /// The mutual handshake failed (refused key or role, wrong server key...).
    #[error("{addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: HandshakeError,
    },
    #[error("{0}")]
    Other(String),
}

impl BackupChannelError {
    /// The server knows the key, but with another role than the one claimed
    /// (a caller may retry as that role).
    pub fn is_wrong_role(&self) -> bool {
        matches!(
            self,
            BackupChannelError::Handshake {
                source: HandshakeError::Refused { failure: volume_format::control::auth::AuthFailure::WrongRole, .. },
                ..
            }
        )
    }
}

/// Opens a backup channel to the server at `addr` with `key` (role `role`:
/// admin or backup), refusing a server that does not prove `pinned`.
/// Returns the stream, ready for the NBD handshake.
pub async fn connect_backup_channel(
    addr: &ControlAddr,
    key: &SigningKey,
    pinned: Option<&VerifyingKey>,
    role: Role,
    name: &str,
) -> Result<Box<dyn ControlStream>, BackupChannelError> {
    let other = BackupChannelError::Other;
    let mut stream =
        addr.connect().await.map_err(|e| other(format!("connecting to the metadata server at {addr}: {e}")))?;
    stream.write_all(&DATA_CHANNEL_PREAMBLE).await.map_err(|e| other(format!("{addr}: sending the preamble: {e}")))?;
    let mut instance = [0u8; 16];
    getrandom::getrandom(&mut instance).map_err(|e| other(format!("no randomness for the session instance: {e}")))?;
    handshake::client(&mut stream, key, pinned, role, name, instance)
        .await
        .map_err(|source| BackupChannelError::Handshake { addr: addr.to_string(), source })?;
    let ask = ClientMessage { id: 1, request: Request::BackupChannel };
    framed::write_message(&mut stream, &ask)
        .await
        .map_err(|e| other(format!("{addr}: asking for a backup channel: {e}")))?;
    match framed::read_message::<ServerMessage, _>(&mut stream).await {
        Ok(ServerMessage::Reply { result: Ok(Response::Done), .. }) => Ok(stream),
        Ok(ServerMessage::Reply { result: Err(e), .. }) => {
            Err(other(format!("the metadata server refused a backup channel: {e}")))
        }
        Ok(msg) => Err(other(format!("the metadata server answered a backup channel with {msg:?}"))),
        Err(e) => Err(other(format!("{addr}: reading the answer to a backup channel: {e}"))),
    }
}
