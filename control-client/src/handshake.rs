//! Both sides of the handshake that opens every control connection and
//! channel (messages and signed bytes in `volume_format::control::auth`):
//! cleartext hellos, a Noise NN handshake, then mutual ed25519 proofs over
//! its handshake hash, sent inside the protected records that carry the
//! rest of the connection ([`SecureStream`]).
//!
//! The whole handshake is [`ClientHandshake::run`] and [`Acceptor::accept`].
//! Their steps are public too ([`client_hellos`], [`noise_initiator`],
//! [`verify_server`], [`prove_client`], [`noise_responder`]) so that tests
//! can script a misbehaving peer — a forged proof, a relay in the middle —
//! with the same code the real peers run.
//!
//! Every failure is reported to the peer (when the protocol still allows a
//! message) and returned as a [`HandshakeError`] that says what to do.
//! Every frame before authentication is at most
//! [`HANDSHAKE_FRAME_BYTES_MAX`] bytes.

use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use tokio::io::{AsyncRead, AsyncWrite};
use volume_format::control::auth::{
    self, AuthFailure, AuthOutcome, ChannelMode, ClientHello, ClientProof, ConnectionKind, NoiseAnswer, NoiseRequest,
    Role, ServerHello, ServerProof, HELLO_MAGIC, NOISE_PARAMS, NONCE_BYTES,
};
use volume_format::control::frame;
use volume_format::control::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

use crate::framed::{self, FramedError};
use crate::secure::{Protection, SecureStream};

/// How long a client waits for a server to complete the handshake. A
/// server that is taking the pool lease over (its own previous run's, after
/// a restart) keeps clients in its listen queue until it serves: about
/// `5T + 4T + D` plus loading the metadata, 14 s at the defaults
/// (`volume_format::lease`); this covers that with room.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest frame either side reads before the peer is authenticated: the
/// hellos, Noise messages, proofs and outcome are a few hundred bytes, so
/// an unauthenticated peer cannot make us allocate more than this.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = 4096;
/// Room for a Noise handshake message (an ephemeral key, a payload, a tag).
const NOISE_MESSAGE_BYTES_MAX: usize = HANDSHAKE_FRAME_BYTES_MAX;
/// Environment variable clients read for their channel mode.
pub const CHANNEL_MODE_ENV: &str = "SANVOL_CHANNEL_MODE";

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
    #[error("the server's proof of its key does not verify for this connection: not a genuine sanvol server, or someone is relaying the connection")]
    BadServerSignature,
    #[error("peer sent an unexpected handshake message: {0}")]
    Protocol(String),
    /// The Noise handshake failed: its messages were altered on the way, or
    /// the peer does not speak it.
    #[error("the key exchange failed ({0}): the connection was altered on the way, or the peer is not a sanvol peer")]
    Noise(String),
    /// This side gave up on the handshake (e.g. the server closed an
    /// unauthenticated connection to make room for others).
    #[error("handshake abandoned: {0}")]
    Abandoned(String),
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

fn noise_error(e: snow::Error) -> HandshakeError {
    HandshakeError::Noise(e.to_string())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source failed");
    b
}

fn parse_signature(bytes: &[u8]) -> Option<Signature> {
    Some(Signature::from_bytes(bytes.try_into().ok()?))
}

/// A Noise builder whose ciphers and hashes come from *ring* (its AES-GCM
/// uses the CPU's AES and carry-less multiply instructions: several times
/// the throughput of the portable implementation on the data path), with
/// X25519 from the default resolver.
fn noise_builder(prologue: &[u8]) -> Result<snow::Builder<'_>, HandshakeError> {
    use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
    let params = NOISE_PARAMS.parse().map_err(noise_error)?;
    let resolver = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
    snow::Builder::with_resolver(params, Box::new(resolver)).prologue(prologue).map_err(noise_error)
}

/// [`noise_builder`] without a prologue (tests of the record layer).
pub(crate) fn plain_noise_builder() -> snow::Builder<'static> {
    noise_builder(&[]).expect("the Noise parameters parse")
}

/// The channel mode clients ask for unless told otherwise:
/// `SANVOL_CHANNEL_MODE` (`encrypted` or `integrity`), else encrypted. An
/// unreadable value falls back to encrypted (the stronger mode) with a
/// warning.
pub fn channel_mode_from_env() -> ChannelMode {
    match std::env::var(CHANNEL_MODE_ENV) {
        Ok(v) => v.parse().unwrap_or_else(|e| {
            tracing::warn!("{CHANNEL_MODE_ENV}: {e}; using encrypted channels");
            ChannelMode::Encrypted
        }),
        Err(_) => ChannelMode::Encrypted,
    }
}

/// What the client learns from a successful handshake.
#[derive(Debug, Clone)]
pub struct ClientSession {
    pub server_key: VerifyingKey,
    pub session: u64,
    pub lease_ms: u64,
    pub version: u32,
    /// How the connection's records are protected.
    pub mode: ChannelMode,
}

/// Who a client is and what it asks for.
#[derive(Debug, Clone)]
pub struct ClientHandshake<'a> {
    pub key: &'a SigningKey,
    /// The server key the client trusts; `None` accepts any (trust on first
    /// use — callers should pin whenever they can).
    pub pinned: Option<&'a VerifyingKey>,
    pub role: Role,
    pub name: &'a str,
    pub instance: [u8; 16],
    pub mode: ChannelMode,
    pub kind: ConnectionKind,
}

impl ClientHandshake<'_> {
    /// The hello this client sends.
    pub fn hello(&self) -> ClientHello {
        ClientHello {
            magic: HELLO_MAGIC,
            version: PROTOCOL_VERSION,
            version_min: PROTOCOL_VERSION_MIN,
            role: self.role,
            client_key: self.key.verifying_key().to_bytes(),
            nonce: random_bytes::<NONCE_BYTES>(),
            name: self.name.to_string(),
            instance: self.instance,
        }
    }

    /// The whole client side, bounded by [`HANDSHAKE_TIMEOUT`]. Returns the
    /// protected stream, positioned after the server's welcome.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> Result<(SecureStream<S>, ClientSession), HandshakeError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.run_inner(stream))
            .await
            .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn run_inner<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
    ) -> Result<(SecureStream<S>, ClientSession), HandshakeError> {
        let hellos = client_hellos(&mut stream, &self.hello(), self.kind).await?;
        let (mut secure, hash) = noise_initiator(stream, &hellos.prologue, self.mode).await?;
        let server_key = verify_server(&mut secure, &hash, self.pinned).await?;
        let proof = ClientProof { signature: self.key.sign(&auth::client_binding(&hash)).to_bytes().to_vec() };
        let (session, lease_ms) = prove_client(&mut secure, &proof).await?;
        let mode = secure.mode();
        Ok((secure, ClientSession { server_key, session, lease_ms, version: hellos.version, mode }))
    }
}

/// What the cleartext part of the handshake settled.
#[derive(Debug, Clone)]
pub struct Hellos {
    pub version: u32,
    /// The Noise prologue both sides derived from the hellos.
    pub prologue: Vec<u8>,
}

/// Client step 1: sends `hello` in the clear and reads the server's answer.
pub async fn client_hellos<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    hello: &ClientHello,
    kind: ConnectionKind,
) -> Result<Hellos, HandshakeError> {
    let hello_bytes = frame::encode_payload(hello).map_err(FramedError::from)?;
    framed::write_payload(stream, &hello_bytes).await?;
    let server_hello_bytes = framed::read_payload_max(stream, HANDSHAKE_FRAME_BYTES_MAX).await?;
    let server_hello: ServerHello = frame::decode_payload(&server_hello_bytes).map_err(FramedError::from)?;
    let version = match server_hello {
        ServerHello::Noise { version } => version,
        ServerHello::Refuse { failure, reason } => return Err(HandshakeError::Refused { failure, reason }),
        ServerHello::Accept { version, .. } => {
            return Err(HandshakeError::Protocol(format!(
                "the server answered with protocol {version}'s unprotected handshake; upgrade the server"
            )))
        }
    };
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&version) {
        return Err(HandshakeError::Protocol(format!(
            "server chose protocol version {version}, which this client does not speak"
        )));
    }
    Ok(Hellos { version, prologue: auth::noise_prologue(kind, &hello_bytes, &server_hello_bytes) })
}

/// Client step 2: the Noise handshake, asking for `mode`. Returns the
/// protected stream and the handshake hash the proofs sign.
pub async fn noise_initiator<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    prologue: &[u8],
    mode: ChannelMode,
) -> Result<(SecureStream<S>, Vec<u8>), HandshakeError> {
    let mut hs = noise_builder(prologue)?.build_initiator().map_err(noise_error)?;
    let request = frame::encode_payload(&NoiseRequest { mode }).map_err(FramedError::from)?;
    let mut msg = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
    let n = hs.write_message(&request, &mut msg).map_err(noise_error)?;
    framed::write_payload(&mut stream, &msg[..n]).await?;
    let reply = framed::read_payload_max(&mut stream, HANDSHAKE_FRAME_BYTES_MAX).await?;
    let mut payload = vec![0u8; reply.len()];
    let n = hs.read_message(&reply, &mut payload).map_err(noise_error)?;
    let answer: NoiseAnswer = frame::decode_payload(&payload[..n]).map_err(FramedError::from)?;
    match answer {
        NoiseAnswer::Proceed { mode: granted } if granted == mode => {}
        NoiseAnswer::Proceed { mode: granted } => {
            return Err(HandshakeError::Protocol(format!("asked for a {mode} channel, the server answered {granted}")))
        }
        NoiseAnswer::Refuse { failure, reason } => return Err(HandshakeError::Refused { failure, reason }),
    }
    let hash = hs.get_handshake_hash().to_vec();
    let protection = Protection::from_handshake(hs, true, mode).map_err(noise_error)?;
    Ok((SecureStream::new(stream, protection), hash))
}

/// Client step 3: reads the server's proof and checks it against the pin
/// and this connection's handshake hash.
pub async fn verify_server<S: AsyncRead + AsyncWrite + Unpin>(
    secure: &mut SecureStream<S>,
    hash: &[u8],
    pinned: Option<&VerifyingKey>,
) -> Result<VerifyingKey, HandshakeError> {
    let proof: ServerProof = framed::read_message_max(secure, HANDSHAKE_FRAME_BYTES_MAX).await?;
    let server_key = VerifyingKey::from_bytes(&proof.server_key).map_err(|_| HandshakeError::BadServerSignature)?;
    if let Some(pinned) = pinned {
        if pinned != &server_key {
            return Err(HandshakeError::WrongServerKey {
                found: hex::encode(proof.server_key),
                pinned: hex::encode(pinned.as_bytes()),
            });
        }
    }
    let sig = parse_signature(&proof.signature).ok_or(HandshakeError::BadServerSignature)?;
    server_key.verify(&auth::server_binding(hash), &sig).map_err(|_| HandshakeError::BadServerSignature)?;
    Ok(server_key)
}

/// Client step 4: sends `proof` and reads the outcome: (session, lease_ms).
pub async fn prove_client<S: AsyncRead + AsyncWrite + Unpin>(
    secure: &mut SecureStream<S>,
    proof: &ClientProof,
) -> Result<(u64, u64), HandshakeError> {
    framed::write_message(secure, proof).await?;
    match framed::read_message_max::<AuthOutcome, _>(secure, HANDSHAKE_FRAME_BYTES_MAX).await? {
        AuthOutcome::Welcome { session, lease_ms } => Ok((session, lease_ms)),
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
    /// How the connection's records are protected.
    pub mode: ChannelMode,
    /// A control connection, or a data or backup channel.
    pub kind: ConnectionKind,
}

/// The server side of the handshake for one connection.
#[derive(Debug, Clone)]
pub struct Acceptor<'a> {
    pub server_key: &'a SigningKey,
    /// Server-assigned id of the session, sent in the welcome.
    pub session: u64,
    pub lease_ms: u64,
    pub kind: ConnectionKind,
    /// The weakest channel mode this server accepts.
    pub mode_min: ChannelMode,
}

async fn refuse_hello<S: AsyncWrite + Unpin>(stream: &mut S, failure: AuthFailure, reason: String) -> HandshakeError {
    let _ = framed::write_message(stream, &ServerHello::Refuse { failure, reason: reason.clone() }).await;
    HandshakeError::Refused { failure, reason }
}

async fn refuse_outcome<S: AsyncWrite + Unpin>(stream: &mut S, failure: AuthFailure, reason: String) -> HandshakeError {
    let _ = framed::write_message(stream, &AuthOutcome::Refused { failure, reason: reason.clone() }).await;
    HandshakeError::Refused { failure, reason }
}

/// Server step 2: the Noise handshake. `decide` answers the client's
/// requested mode. Returns the protected stream, the handshake hash and the
/// mode, or the refusal it sent.
pub async fn noise_responder<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    prologue: &[u8],
    decide: impl FnOnce(ChannelMode) -> NoiseAnswer,
) -> Result<(SecureStream<S>, Vec<u8>), HandshakeError> {
    let mut hs = noise_builder(prologue)?.build_responder().map_err(noise_error)?;
    let first = framed::read_payload_max(&mut stream, HANDSHAKE_FRAME_BYTES_MAX).await?;
    let mut payload = vec![0u8; first.len()];
    let n = hs.read_message(&first, &mut payload).map_err(noise_error)?;
    let answer = match frame::decode_payload::<NoiseRequest>(&payload[..n]) {
        Ok(NoiseRequest { mode }) => decide(mode),
        Err(e) => {
            NoiseAnswer::Refuse { failure: AuthFailure::Malformed, reason: format!("malformed Noise request: {e}") }
        }
    };
    let answer_bytes = frame::encode_payload(&answer).map_err(FramedError::from)?;
    let mut msg = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
    let n = hs.write_message(&answer_bytes, &mut msg).map_err(noise_error)?;
    framed::write_payload(&mut stream, &msg[..n]).await?;
    let mode = match answer {
        NoiseAnswer::Proceed { mode } => mode,
        NoiseAnswer::Refuse { failure, reason } => return Err(HandshakeError::Refused { failure, reason }),
    };
    let hash = hs.get_handshake_hash().to_vec();
    let protection = Protection::from_handshake(hs, false, mode).map_err(noise_error)?;
    Ok((SecureStream::new(stream, protection), hash))
}

impl Acceptor<'_> {
    /// The whole server side. `authorize` maps a client key to the roles
    /// and name the pool grants it, or `None` if the key is unknown. The
    /// caller bounds it in time (the accept path's handshake deadline).
    pub async fn accept<S, F>(&self, stream: S, authorize: F) -> Result<(SecureStream<S>, Peer), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F: FnOnce(&[u8; 32]) -> Option<(Vec<Role>, String)>,
    {
        self.accept_with(stream, |_| {}, authorize).await
    }

    /// Like [`Acceptor::accept`]; `on_hello` sees the client's (not yet
    /// proven) hello as soon as it is read, before the key exchange — the
    /// server's admission control uses it to tell connections that name a
    /// known key from anonymous ones.
    pub async fn accept_with<S, H, F>(
        &self,
        mut stream: S,
        on_hello: H,
        authorize: F,
    ) -> Result<(SecureStream<S>, Peer), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
        H: FnOnce(&ClientHello),
        F: FnOnce(&[u8; 32]) -> Option<(Vec<Role>, String)>,
    {
        let hello_bytes = framed::read_payload_max(&mut stream, HANDSHAKE_FRAME_BYTES_MAX).await?;
        let hello: ClientHello = match frame::decode_payload(&hello_bytes) {
            Ok(h) => h,
            Err(e) => {
                let reason = format!("not a sanvol client hello: {e}");
                return Err(refuse_hello(&mut stream, AuthFailure::Malformed, reason).await);
            }
        };
        if let Err(reason) = hello.validate() {
            return Err(refuse_hello(&mut stream, AuthFailure::Malformed, reason).await);
        }
        on_hello(&hello);
        let Some(version) =
            auth::negotiate_version(hello.version_min, hello.version, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION)
        else {
            let reason = format!(
                "client speaks control protocol {}..={}, this server {}..={}; upgrade the older side",
                hello.version_min, hello.version, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION
            );
            return Err(refuse_hello(&mut stream, AuthFailure::VersionMismatch, reason).await);
        };
        let server_hello_bytes = frame::encode_payload(&ServerHello::Noise { version }).map_err(FramedError::from)?;
        framed::write_payload(&mut stream, &server_hello_bytes).await?;

        let prologue = auth::noise_prologue(self.kind, &hello_bytes, &server_hello_bytes);
        let mode_min = self.mode_min;
        let (mut secure, hash) = noise_responder(stream, &prologue, |mode| {
            if mode.satisfies(mode_min) {
                NoiseAnswer::Proceed { mode }
            } else {
                NoiseAnswer::Refuse {
                    failure: AuthFailure::ChannelMode,
                    reason: format!(
                        "this server requires {mode_min} channels (channel_mode_min in its config); \
                         the client asked for {mode}: unset {CHANNEL_MODE_ENV} or set it to {mode_min}"
                    ),
                }
            }
        })
        .await?;

        let proof = ServerProof {
            server_key: self.server_key.verifying_key().to_bytes(),
            signature: self.server_key.sign(&auth::server_binding(&hash)).to_bytes().to_vec(),
        };
        framed::write_message(&mut secure, &proof).await?;
        let proof: ClientProof = match framed::read_message_max(&mut secure, HANDSHAKE_FRAME_BYTES_MAX).await {
            Ok(p) => p,
            Err(FramedError::Frame(e)) => {
                let reason = format!("malformed client proof: {e}");
                return Err(refuse_outcome(&mut secure, AuthFailure::Malformed, reason).await);
            }
            Err(e) => return Err(e.into()),
        };
        // Verify the signature before looking at authorization, so an
        // attacker learns nothing about which keys are authorized without
        // holding one.
        let verified = VerifyingKey::from_bytes(&hello.client_key).ok().and_then(|client_key| {
            let sig = parse_signature(&proof.signature)?;
            client_key.verify(&auth::client_binding(&hash), &sig).ok()
        });
        if verified.is_none() {
            let reason = format!(
                "the client's signature for key {} does not verify for this connection (forged, replayed or \
                 relayed handshake)",
                hex::encode(hello.client_key)
            );
            return Err(refuse_outcome(&mut secure, AuthFailure::BadSignature, reason).await);
        }
        let Some((roles, name)) = authorize(&hello.client_key) else {
            let reason = format!(
                "key {} is not authorized in this pool; an admin can add it with `sanvol client add KEY.pub --role {}`",
                hex::encode(hello.client_key),
                hello.role
            );
            return Err(refuse_outcome(&mut secure, AuthFailure::UnknownKey, reason).await);
        };
        if !roles.contains(&hello.role) {
            let granted: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
            let reason = format!("key of {name:?} is authorized as {}, not as {}", granted.join(", "), hello.role);
            return Err(refuse_outcome(&mut secure, AuthFailure::WrongRole, reason).await);
        }
        framed::write_message(&mut secure, &AuthOutcome::Welcome { session: self.session, lease_ms: self.lease_ms })
            .await?;
        let mode = secure.mode();
        let peer = Peer {
            key: hello.client_key,
            role: hello.role,
            name,
            claimed_name: hello.name,
            instance: hello.instance,
            version,
            mode,
            kind: self.kind,
        };
        Ok((secure, peer))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn keys() -> (SigningKey, SigningKey) {
        (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]))
    }

    fn client<'a>(key: &'a SigningKey, pinned: Option<&'a VerifyingKey>, mode: ChannelMode) -> ClientHandshake<'a> {
        ClientHandshake {
            key,
            pinned,
            role: Role::Agent,
            name: "host",
            instance: [3; 16],
            mode,
            kind: ConnectionKind::Control,
        }
    }

    fn acceptor(key: &SigningKey, mode_min: ChannelMode) -> Acceptor<'_> {
        Acceptor { server_key: key, session: 9, lease_ms: 1000, kind: ConnectionKind::Control, mode_min }
    }

    #[tokio::test]
    async fn both_modes_authenticate_both_sides_and_carry_bytes() {
        let (server_key, client_key) = keys();
        for mode in [ChannelMode::Encrypted, ChannelMode::Integrity] {
            let (a, b) = tokio::io::duplex(1 << 16);
            let pinned = server_key.verifying_key();
            let client_side = client(&client_key, Some(&pinned), mode);
            let acc = acceptor(&server_key, ChannelMode::Integrity);
            let (c, s) =
                tokio::join!(client_side.run(a), acc.accept(b, |_| Some((vec![Role::Agent], "host-a".to_string()))));
            let (mut cs, session) = c.unwrap();
            let (mut ss, peer) = s.unwrap();
            assert_eq!((session.session, session.lease_ms, session.mode), (9, 1000, mode));
            assert_eq!((peer.name.as_str(), peer.role, peer.mode), ("host-a", Role::Agent, mode));
            assert_eq!(peer.key, client_key.verifying_key().to_bytes());
            cs.write_all(b"ping").await.unwrap();
            cs.flush().await.unwrap();
            let mut got = [0u8; 4];
            ss.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }
    }

    #[tokio::test]
    async fn a_server_requiring_encryption_refuses_integrity_only_clearly() {
        let (server_key, client_key) = keys();
        let (a, b) = tokio::io::duplex(1 << 16);
        let client_side = client(&client_key, None, ChannelMode::Integrity);
        let acc = acceptor(&server_key, ChannelMode::Encrypted);
        let (c, s) = tokio::join!(client_side.run(a), acc.accept(b, |_| Some((vec![Role::Agent], "h".into()))));
        let Err(HandshakeError::Refused { failure, reason }) = c else { panic!("{c:?}") };
        assert_eq!(failure, AuthFailure::ChannelMode);
        assert!(reason.contains("requires encrypted channels") && reason.contains(CHANNEL_MODE_ENV), "{reason}");
        assert!(matches!(s, Err(HandshakeError::Refused { failure: AuthFailure::ChannelMode, .. })));
    }

    #[tokio::test]
    async fn a_preamble_added_or_stripped_on_the_way_fails_the_key_exchange() {
        let (server_key, client_key) = keys();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut client_side = client(&client_key, None, ChannelMode::Encrypted);
        client_side.kind = ConnectionKind::Channel;
        let acc = acceptor(&server_key, ChannelMode::Integrity);
        let (c, _) = tokio::join!(client_side.run(a), acc.accept(b, |_| Some((vec![Role::Agent], "h".into()))));
        assert!(matches!(c, Err(HandshakeError::Noise(_))), "{c:?}");
    }

    fn hex_of(bytes: &[u8]) -> String {
        hex::encode(bytes)
    }

    /// Golden bytes of a whole key exchange with fixed ephemeral keys: the
    /// Noise messages, the handshake hash the proofs sign, and the first
    /// record each way in both modes. Any change to the Noise protocol, the
    /// prologue, the payloads or the record layout shows up here (and needs
    /// a `PROTOCOL_VERSION` bump).
    #[test]
    fn the_key_exchange_and_first_records_are_pinned() {
        let prologue = auth::noise_prologue(ConnectionKind::Control, b"client hello", b"server hello");
        let mut results = Vec::new();
        for mode in [ChannelMode::Encrypted, ChannelMode::Integrity] {
            let mut i = noise_builder(&prologue)
                .unwrap()
                .fixed_ephemeral_key_for_testing_only(&[0x11; 32])
                .build_initiator()
                .unwrap();
            let mut r = noise_builder(&prologue)
                .unwrap()
                .fixed_ephemeral_key_for_testing_only(&[0x22; 32])
                .build_responder()
                .unwrap();
            let (mut m1, mut m2, mut p) = (vec![0u8; 512], vec![0u8; 512], vec![0u8; 512]);
            let request = frame::encode_payload(&NoiseRequest { mode }).unwrap();
            let n1 = i.write_message(&request, &mut m1).unwrap();
            r.read_message(&m1[..n1], &mut p).unwrap();
            let answer = frame::encode_payload(&NoiseAnswer::Proceed { mode }).unwrap();
            let n2 = r.write_message(&answer, &mut m2).unwrap();
            i.read_message(&m2[..n2], &mut p).unwrap();
            assert_eq!(i.get_handshake_hash(), r.get_handshake_hash());
            let hash = i.get_handshake_hash().to_vec();
            let mut client = Protection::from_handshake(i, true, mode).unwrap();
            let mut server = Protection::from_handshake(r, false, mode).unwrap();
            let (mut up, mut down) = (Vec::new(), Vec::new());
            server.seal(&[b"server proof"], &mut down).unwrap();
            client.seal(&[b"client proof"], &mut up).unwrap();
            results.push((hex_of(&m1[..n1]), hex_of(&m2[..n2]), hex_of(&hash), hex_of(&down), hex_of(&up)));
        }
        let pinned = include_str!("../tests/golden/key-exchange.txt");
        let now: String = results
            .iter()
            .zip(["encrypted", "integrity"])
            .map(|((m1, m2, h, down, up), mode)| {
                format!("{mode} msg1 {m1}\n{mode} msg2 {m2}\n{mode} hash {h}\n{mode} record-down {down}\n{mode} record-up {up}\n")
            })
            .collect();
        if std::env::var_os("SANVOL_BLESS").is_some() {
            std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/key-exchange.txt"), &now).unwrap();
            return;
        }
        assert_eq!(now, pinned, "the key exchange changed: bump PROTOCOL_VERSION, then SANVOL_BLESS=1");
    }

    #[tokio::test]
    async fn a_large_frame_before_authentication_is_refused_before_allocation() {
        let (server_key, _) = keys();
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&(HANDSHAKE_FRAME_BYTES_MAX as u32 + 1).to_be_bytes()).await.unwrap();
        let acc = acceptor(&server_key, ChannelMode::Integrity);
        let e = acc.accept(b, |_| None).await.unwrap_err();
        assert!(e.to_string().contains("exceeds the 4096-byte limit before authentication"), "{e}");
    }

    /// Runs `f` to completion on a fresh current-thread runtime (for async
    /// code inside property tests).
    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    /// What a peer sends: a valid hello (or junk), then random frames.
    fn script(valid_hello: bool, junk: &[u8]) -> Vec<u8> {
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut out = Vec::new();
        if valid_hello {
            let hello = client(&key, None, ChannelMode::Encrypted).hello();
            let bytes = frame::encode_payload(&hello).unwrap();
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(&bytes);
        }
        out.extend_from_slice(junk);
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// The server side fed a valid or junk hello followed by random
        /// bytes (as Noise messages, proofs, frames) never panics and never
        /// authenticates anyone.
        #[test]
        fn random_client_bytes_never_authenticate(
            valid_hello in proptest::prelude::any::<bool>(),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        ) {
            let server_key = SigningKey::from_bytes(&[9; 32]);
            let result = block_on(async {
                let (mut a, b) = tokio::io::duplex(1 << 16);
                a.write_all(&script(valid_hello, &junk)).await.unwrap();
                drop(a);
                let acc = acceptor(&server_key, ChannelMode::Integrity);
                acc.accept(b, |_| Some((vec![Role::Agent], "x".into()))).await.map(|_| ())
            });
            proptest::prop_assert!(result.is_err());
        }

        /// The client side fed random bytes as the server's answers never
        /// panics and never accepts a server.
        #[test]
        fn random_server_bytes_never_pass_as_a_server(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            framed_hello in proptest::prelude::any::<bool>(),
        ) {
            let key = SigningKey::from_bytes(&[1; 32]);
            let result = block_on(async {
                let (a, b) = tokio::io::duplex(1 << 16);
                let mut answer = Vec::new();
                if framed_hello {
                    let hello = frame::encode_payload(&ServerHello::Noise { version: PROTOCOL_VERSION }).unwrap();
                    answer.extend_from_slice(&(hello.len() as u32).to_be_bytes());
                    answer.extend_from_slice(&hello);
                }
                answer.extend_from_slice(&junk);
                // Everything the "server" says, then its end of the stream:
                // the client must give up at once, not wait for a timeout.
                let (mut from_client, mut to_client) = tokio::io::split(b);
                to_client.write_all(&answer).await.unwrap();
                to_client.shutdown().await.unwrap();
                let peer = tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = from_client.read_to_end(&mut sink).await;
                });
                let r = client(&key, None, ChannelMode::Encrypted).run(a).await.map(|_| ());
                peer.abort();
                r
            });
            proptest::prop_assert!(result.is_err());
        }
    }
}
