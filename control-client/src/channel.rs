//! Opening a **channel**: a connection to the metadata server that
//! authenticates like a control connection and then carries NBD.
//!
//! Both kinds start the same way — [`DATA_CHANNEL_PREAMBLE`], the mutual
//! handshake (which protects the rest of the connection: every NBD byte
//! travels in encrypted or integrity-only records), one request, one reply —
//! and differ only in the request:
//! - a **data channel** ([`Request::DataChannel`], role agent): the agent's
//!   fallback path for one volume on one device, restricted by the server to
//!   that volume's extents there;
//! - a **backup channel** ([`Request::BackupChannel`], role admin or backup):
//!   every snapshot of the pool as a read-only export named
//!   `VOLUME@SNAPSHOT`, with `base:allocation` and the
//!   `sanvol:changed-since:OLDER` metadata contexts.
//!
//! Once the server answers OK, the (protected) stream is positioned right where NBD
//! (fixed newstyle) begins: hand it to any NBD client
//! (`blockio::client::NbdClient::connect_stream`), or pipe it to a local
//! socket so standard tools (nbdinfo, nbdcopy, qemu-img) can read it
//! (`sanvol-backup serve`). [`open`] is the one place that does this.

use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::io::AsyncWriteExt;
use volume_format::control::auth::{ChannelMode, ConnectionKind, Role};
use volume_format::control::messages::{
    ClientMessage, ControlError, ErrorCode, Request, Response, ServerMessage, DATA_CHANNEL_PREAMBLE,
};

use crate::addr::{ControlAddr, ControlStream};
use crate::framed;
use crate::handshake::{self, ClientHandshake, HandshakeError};

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("connecting to the metadata server at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// The mutual handshake failed (refused key or role, wrong server key...).
    #[error("{addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: HandshakeError,
    },
    /// The server answered the request with a refusal.
    #[error("the metadata server refused the channel: {0}")]
    Refused(ControlError),
    #[error("{addr}: {what}")]
    Transport { addr: String, what: String },
}

impl ChannelError {
    /// The server knows the key, but with another role than the one claimed
    /// (a caller may retry as that role).
    pub fn is_wrong_role(&self) -> bool {
        matches!(
            self,
            ChannelError::Handshake {
                source: HandshakeError::Refused { failure: volume_format::control::auth::AuthFailure::WrongRole, .. },
                ..
            }
        )
    }

    /// The server cannot serve the channel now (e.g. it cannot reach the
    /// device either, or it is in its grace period): worth retrying later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ChannelError::Refused(e) if e.code == ErrorCode::Unavailable)
    }
}

/// Who opens a channel: the key to prove, the server key to insist on
/// (`None` accepts any: trust on first use), and the role, name and process
/// instance to claim.
pub struct ChannelIdentity<'a> {
    pub key: &'a SigningKey,
    pub pinned: Option<&'a VerifyingKey>,
    pub role: Role,
    pub name: &'a str,
    pub instance: [u8; 16],
}

/// Opens a channel to the server at `addr`: preamble, handshake as `who`,
/// then `request` ([`Request::DataChannel`] or [`Request::BackupChannel`]).
/// Returns the protected stream, ready for the NBD handshake, and the
/// server's answer (the grant of a data channel). The channel is protected
/// in the mode `SANVOL_CHANNEL_MODE` names (encrypted by default).
pub async fn open(
    addr: &ControlAddr,
    who: &ChannelIdentity<'_>,
    request: Request,
) -> Result<(Box<dyn ControlStream>, Response), ChannelError> {
    open_with_mode(addr, who, request, handshake::channel_mode_from_env()).await
}

/// Like [`open`], with the channel mode given.
pub async fn open_with_mode(
    addr: &ControlAddr,
    who: &ChannelIdentity<'_>,
    request: Request,
    mode: ChannelMode,
) -> Result<(Box<dyn ControlStream>, Response), ChannelError> {
    let transport = |what: String| ChannelError::Transport { addr: addr.to_string(), what };
    let mut stream = addr.connect().await.map_err(|source| ChannelError::Connect { addr: addr.to_string(), source })?;
    stream.write_all(&DATA_CHANNEL_PREAMBLE).await.map_err(|e| transport(format!("sending the preamble: {e}")))?;
    let client = ClientHandshake {
        key: who.key,
        pinned: who.pinned,
        role: who.role,
        name: who.name,
        instance: who.instance,
        mode,
        kind: ConnectionKind::Channel,
    };
    let (mut stream, _) =
        client.run(stream).await.map_err(|source| ChannelError::Handshake { addr: addr.to_string(), source })?;
    stream.set_label(format!("channel to the metadata server at {addr}"));
    let ask = ClientMessage { id: 1, request };
    framed::write_message(&mut stream, &ask).await.map_err(|e| transport(format!("asking for a channel: {e}")))?;
    match framed::read_message::<ServerMessage, _>(&mut stream).await {
        Ok(ServerMessage::Reply { result: Ok(response), .. }) => Ok((Box::new(stream), response)),
        Ok(ServerMessage::Reply { result: Err(e), .. }) => Err(ChannelError::Refused(e)),
        Ok(msg) => Err(transport(format!("unexpected answer to a channel request: {msg:?}"))),
        Err(e) => Err(transport(format!("reading the answer to a channel request: {e}"))),
    }
}

/// Opens a backup channel (role admin or backup) with a fresh process
/// instance: the stream serves every snapshot of the pool over NBD.
pub async fn open_backup(
    addr: &ControlAddr,
    key: &SigningKey,
    pinned: Option<&VerifyingKey>,
    role: Role,
    name: &str,
) -> Result<Box<dyn ControlStream>, ChannelError> {
    let mut instance = [0u8; 16];
    getrandom::getrandom(&mut instance)
        .map_err(|e| ChannelError::Transport { addr: addr.to_string(), what: format!("no randomness: {e}") })?;
    let who = ChannelIdentity { key, pinned, role, name, instance };
    open(addr, &who, Request::BackupChannel).await.map(|(stream, _)| stream)
}

#[cfg(test)]
mod tests {
    use volume_format::control::auth::AuthFailure;

    use super::*;

    #[test]
    fn a_wrong_role_refusal_is_recognized_in_the_channel_error() {
        let refused = |failure| ChannelError::Handshake {
            addr: "unix:/run/mds.sock".into(),
            source: HandshakeError::Refused { failure, reason: "key of \"ops\" is authorized as admin".into() },
        };
        assert!(refused(AuthFailure::WrongRole).is_wrong_role());
        assert!(!refused(AuthFailure::UnknownKey).is_wrong_role());
        let refusal = ChannelError::Refused(ControlError::new(ErrorCode::Unavailable, "grace period"));
        assert!(!refusal.is_wrong_role());
        assert!(refusal.is_unavailable());
    }
}
