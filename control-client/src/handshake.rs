//! Both sides of the mutual challenge–response that opens a control
//! connection (transcripts defined in `volume_format::control::auth`).
//!
//! Every failure is reported to the peer (when the protocol still allows a
//! message) and returned as a [`HandshakeError`] that says what to do.

use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use tokio::io::{AsyncRead, AsyncWrite};
use volume_format::control::auth::{
    self, AuthFailure, AuthOutcome, ClientHello, ClientProof, Role, ServerHello, HELLO_MAGIC, NONCE_BYTES,
};
use volume_format::control::frame;
use volume_format::control::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

use crate::framed::{self, FramedError};

/// How long a peer may take to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("control handshake: {0}")]
    Transport(#[from] FramedError),
    #[error("control handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("refused ({failure}): {reason}")]
    Refused { failure: AuthFailure, reason: String },
    #[error("the server's key {found} is not the pinned key {pinned}: refusing to talk to it (if the server was re-keyed on purpose, update --server-key)")]
    WrongServerKey { found: String, pinned: String },
    #[error("the server's proof of its key does not verify: not talking to a genuine sanvol server")]
    BadServerSignature,
    #[error("peer sent an unexpected handshake message: {0}")]
    Protocol(String),
}

impl HandshakeError {
    /// The failure class to report to the peer, where one applies.
    pub fn failure(&self) -> AuthFailure {
        match self {
            HandshakeError::Refused { failure, .. } => *failure,
            HandshakeError::BadServerSignature | HandshakeError::WrongServerKey { .. } => AuthFailure::BadSignature,
            _ => AuthFailure::Malformed,
        }
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source failed");
    b
}

fn parse_signature(bytes: &[u8]) -> Option<Signature> {
    Some(Signature::from_bytes(bytes.try_into().ok()?))
}

/// What the client learns from a successful handshake.
#[derive(Debug, Clone)]
pub struct ClientSession {
    pub server_key: VerifyingKey,
    pub session: u64,
    pub lease_ms: u64,
    pub version: u32,
}

/// Client side. `pinned` is the server key the client trusts; `None` accepts
/// any (trust on first use — callers should pin whenever they can).
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &SigningKey,
    pinned: Option<&VerifyingKey>,
    role: Role,
    name: &str,
    instance: [u8; 16],
) -> Result<ClientSession, HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, client_inner(stream, key, pinned, role, name, instance))
        .await
        .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn client_inner<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &SigningKey,
    pinned: Option<&VerifyingKey>,
    role: Role,
    name: &str,
    instance: [u8; 16],
) -> Result<ClientSession, HandshakeError> {
    let hello = ClientHello {
        magic: HELLO_MAGIC,
        version: PROTOCOL_VERSION,
        version_min: PROTOCOL_VERSION_MIN,
        role,
        client_key: key.verifying_key().to_bytes(),
        nonce: random_bytes::<NONCE_BYTES>(),
        name: name.to_string(),
        instance,
    };
    let hello_bytes = frame::encode_payload(&hello).map_err(FramedError::from)?;
    framed::write_payload(stream, &hello_bytes).await?;

    let server_hello_bytes = framed::read_payload(stream).await?;
    let server_hello: ServerHello = frame::decode_payload(&server_hello_bytes).map_err(FramedError::from)?;
    let (version, server_key_bytes, server_nonce, signature) = match server_hello {
        ServerHello::Accept { version, server_key, nonce, signature } => (version, server_key, nonce, signature),
        ServerHello::Refuse { failure, reason } => return Err(HandshakeError::Refused { failure, reason }),
    };
    let server_key = VerifyingKey::from_bytes(&server_key_bytes).map_err(|_| HandshakeError::BadServerSignature)?;
    if let Some(pinned) = pinned {
        if pinned != &server_key {
            return Err(HandshakeError::WrongServerKey {
                found: hex::encode(server_key_bytes),
                pinned: hex::encode(pinned.as_bytes()),
            });
        }
    }
    let transcript = auth::server_transcript(&hello_bytes, &server_key_bytes, &server_nonce);
    let sig = parse_signature(&signature).ok_or(HandshakeError::BadServerSignature)?;
    server_key.verify(&transcript, &sig).map_err(|_| HandshakeError::BadServerSignature)?;
    if version < PROTOCOL_VERSION_MIN || version > PROTOCOL_VERSION {
        return Err(HandshakeError::Protocol(format!(
            "server chose protocol version {version}, which this client does not speak"
        )));
    }

    let proof = ClientProof {
        signature: key.sign(&auth::client_transcript(&hello_bytes, &server_hello_bytes)).to_bytes().to_vec(),
    };
    framed::write_message(stream, &proof).await?;
    match framed::read_message::<AuthOutcome, _>(stream).await? {
        AuthOutcome::Welcome { session, lease_ms } => Ok(ClientSession { server_key, session, lease_ms, version }),
        AuthOutcome::Refused { failure, reason } => Err(HandshakeError::Refused { failure, reason }),
    }
}

/// What the server knows about an authenticated client.
#[derive(Debug, Clone)]
pub struct Peer {
    pub key: [u8; 32],
    pub role: Role,
    /// The name the pool knows this key by.
    pub name: String,
    /// The name the client gave itself (host name).
    pub claimed_name: String,
    pub instance: [u8; 16],
    pub version: u32,
}

/// Server side. `authorize` maps a client key to the (role, name) the pool
/// grants it, or `None` if the key is unknown.
pub async fn accept<S, F>(
    stream: &mut S,
    server_key: &SigningKey,
    session: u64,
    lease_ms: u64,
    authorize: F,
) -> Result<Peer, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&[u8; 32]) -> Option<(Vec<Role>, String)>,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_inner(stream, server_key, session, lease_ms, authorize))
        .await
        .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn refuse_hello<S: AsyncWrite + Unpin>(stream: &mut S, failure: AuthFailure, reason: String) -> HandshakeError {
    let _ = framed::write_message(stream, &ServerHello::Refuse { failure, reason: reason.clone() }).await;
    HandshakeError::Refused { failure, reason }
}

async fn refuse_outcome<S: AsyncWrite + Unpin>(stream: &mut S, failure: AuthFailure, reason: String) -> HandshakeError {
    let _ = framed::write_message(stream, &AuthOutcome::Refused { failure, reason: reason.clone() }).await;
    HandshakeError::Refused { failure, reason }
}

async fn accept_inner<S, F>(
    stream: &mut S,
    server_key: &SigningKey,
    session: u64,
    lease_ms: u64,
    authorize: F,
) -> Result<Peer, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&[u8; 32]) -> Option<(Vec<Role>, String)>,
{
    let hello_bytes = framed::read_payload(stream).await?;
    let hello: ClientHello = match frame::decode_payload(&hello_bytes) {
        Ok(h) => h,
        Err(e) => {
            return Err(refuse_hello(stream, AuthFailure::Malformed, format!("not a sanvol client hello: {e}")).await)
        }
    };
    if let Err(reason) = hello.validate() {
        return Err(refuse_hello(stream, AuthFailure::Malformed, reason).await);
    }
    let Some(version) =
        auth::negotiate_version(hello.version_min, hello.version, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION)
    else {
        let reason = format!(
            "client speaks control protocol {}..={}, this server {}..={}; upgrade the older side",
            hello.version_min, hello.version, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION
        );
        return Err(refuse_hello(stream, AuthFailure::VersionMismatch, reason).await);
    };

    let server_public = server_key.verifying_key().to_bytes();
    let nonce = random_bytes::<NONCE_BYTES>();
    let signature = server_key.sign(&auth::server_transcript(&hello_bytes, &server_public, &nonce)).to_bytes().to_vec();
    let server_hello = ServerHello::Accept { version, server_key: server_public, nonce, signature };
    let server_hello_bytes = frame::encode_payload(&server_hello).map_err(FramedError::from)?;
    framed::write_payload(stream, &server_hello_bytes).await?;

    let proof: ClientProof = match framed::read_message(stream).await {
        Ok(p) => p,
        Err(FramedError::Frame(e)) => {
            return Err(refuse_outcome(stream, AuthFailure::Malformed, format!("malformed client proof: {e}")).await)
        }
        Err(e) => return Err(e.into()),
    };
    // Verify the signature before looking at authorization, so an attacker
    // learns nothing about which keys are authorized without holding one.
    let verified = VerifyingKey::from_bytes(&hello.client_key).ok().and_then(|client_key| {
        let sig = parse_signature(&proof.signature)?;
        client_key.verify(&auth::client_transcript(&hello_bytes, &server_hello_bytes), &sig).ok()
    });
    if verified.is_none() {
        let reason = format!(
            "the client's signature for key {} does not verify (forged, altered or replayed handshake)",
            hex::encode(hello.client_key)
        );
        return Err(refuse_outcome(stream, AuthFailure::BadSignature, reason).await);
    }
    let Some((roles, name)) = authorize(&hello.client_key) else {
        let reason = format!(
            "key {} is not authorized in this pool; an admin can add it with `sanvol client add KEY.pub --role {}`",
            hex::encode(hello.client_key),
            hello.role
        );
        return Err(refuse_outcome(stream, AuthFailure::UnknownKey, reason).await);
    };
    if !roles.contains(&hello.role) {
        let granted: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        let reason = format!("key of {name:?} is authorized as {}, not as {}", granted.join(", "), hello.role);
        return Err(refuse_outcome(stream, AuthFailure::WrongRole, reason).await);
    }
    framed::write_message(stream, &AuthOutcome::Welcome { session, lease_ms }).await?;
    Ok(Peer {
        key: hello.client_key,
        role: hello.role,
        name,
        claimed_name: hello.name,
        instance: hello.instance,
        version,
    })
}
