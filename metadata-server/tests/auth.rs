//! Every way a control handshake can fail: each gives a clear error to the
//! client, a log line on the server naming the peer and the reason, and the
//! server keeps serving. Scripted peers speak the handshake step by step
//! with the real client's building blocks, changing one thing each.

mod common;

use common::{wait_for_log, Pool};
use control_client::framed;
use control_client::handshake::{self, HandshakeError};
use control_client::{ControlClient, ControlClientError};
use ed25519_dalek::{Signer, SigningKey};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use volume_format::control::auth::{
    self, AuthFailure, AuthOutcome, ChannelMode, ClientHello, ClientProof, ConnectionKind, Role, ServerHello,
    HELLO_MAGIC,
};
use volume_format::control::messages::{Request, Response};
use volume_format::control::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

fn hello(key: &SigningKey, role: Role, version: u32, nonce: u8) -> ClientHello {
    ClientHello {
        magic: HELLO_MAGIC,
        version,
        version_min: version,
        role,
        client_key: key.verifying_key().to_bytes(),
        nonce: [nonce; 32],
        name: "scripted".into(),
        instance: [1; 16],
    }
}

async fn connect_raw(pool: &Pool) -> UnixStream {
    UnixStream::connect(pool.dir.path().join("mds.sock")).await.unwrap()
}

/// Runs the client side with `hello` (which names the key it claims) up to
/// the client's proof, sends the proof `prove` makes from this connection's
/// handshake hash; returns the outcome and the proof sent.
async fn scripted(
    pool: &Pool,
    hello: &ClientHello,
    prove: impl FnOnce(&[u8]) -> ClientProof,
) -> (AuthOutcome, ClientProof) {
    let mut s = connect_raw(pool).await;
    let hellos = handshake::client_hellos(&mut s, hello, ConnectionKind::Control).await.unwrap();
    let (mut secure, hash) = handshake::noise_initiator(s, &hellos.prologue, ChannelMode::Encrypted).await.unwrap();
    handshake::verify_server(&mut secure, &hash, Some(&pool.server_key.public)).await.unwrap();
    let proof = prove(&hash);
    framed::write_message(&mut secure, &proof).await.unwrap();
    (framed::read_message::<AuthOutcome, _>(&mut secure).await.unwrap(), proof)
}

fn refused(outcome: AuthOutcome) -> (AuthFailure, String) {
    match outcome {
        AuthOutcome::Refused { failure, reason } => (failure, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn handshake_error(e: ControlClientError) -> HandshakeError {
    match e {
        ControlClientError::Handshake { source, .. } => source,
        other => panic!("expected a handshake error, got {other}"),
    }
}

async fn still_serving(pool: &Pool) {
    let admin = pool.admin().await;
    assert!(matches!(admin.request(Request::PoolStatus).await.unwrap(), Response::Pool(_)));
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authentication_failure_is_clear_logged_and_harmless() {
    let pool = Pool::start(10_000).await;
    let peer = format!("peer=unix:{}", pool.dir.path().join("mds.sock").display());

    // Unknown key.
    let stranger = SigningKey::from_bytes(&[42; 32]);
    let e = ControlClient::connect(&pool.addr(), &stranger, Some(&pool.server_key.public), Role::Agent, "x", [0; 16])
        .await
        .err()
        .expect("refused");
    let HandshakeError::Refused { failure, reason } = handshake_error(e) else { panic!() };
    assert_eq!(failure, AuthFailure::UnknownKey);
    assert!(reason.contains("not authorized in this pool") && reason.contains("sanvol client add"), "{reason}");
    wait_for_log(&[
        "control handshake failed",
        &peer,
        &hex::encode(stranger.verifying_key().to_bytes()),
        "not authorized",
    ])
    .await;
    still_serving(&pool).await;

    // Wrong role: an agent key asking to be an admin.
    let e = ControlClient::connect(
        &pool.addr(),
        &pool.agent_a.signing,
        Some(&pool.server_key.public),
        Role::Admin,
        "x",
        [0; 16],
    )
    .await
    .err()
    .expect("refused");
    let HandshakeError::Refused { failure, reason } = handshake_error(e) else { panic!() };
    assert_eq!(failure, AuthFailure::WrongRole);
    assert!(reason.contains("authorized as agent, not as admin"), "{reason}");
    wait_for_log(&["control handshake failed", &peer, "authorized as agent, not as admin"]).await;

    // Bad signature: claims agent_a's key, signs with another.
    let h = hello(&pool.agent_a.signing, Role::Agent, PROTOCOL_VERSION, 1);
    let (outcome, _) = scripted(&pool, &h, |hash| ClientProof {
        signature: stranger.sign(&auth::client_binding(hash)).to_bytes().to_vec(),
    })
    .await;
    let (failure, reason) = refused(outcome);
    assert_eq!(failure, AuthFailure::BadSignature);
    assert!(reason.contains("does not verify"), "{reason}");
    wait_for_log(&["control handshake failed", &peer, "bad signature", "does not verify"]).await;

    // Replayed proof: a genuine handshake recorded, then its proof replayed
    // on a new connection with the same hello (the fresh key exchange gives
    // the new connection another handshake hash: the old proof is useless).
    let h = hello(&pool.agent_a.signing, Role::Agent, PROTOCOL_VERSION, 2);
    let agent = pool.agent_a.signing.clone();
    let (outcome, recorded_proof) = scripted(&pool, &h, |hash| ClientProof {
        signature: agent.sign(&auth::client_binding(hash)).to_bytes().to_vec(),
    })
    .await;
    assert!(matches!(outcome, AuthOutcome::Welcome { .. }), "the genuine handshake works: {outcome:?}");
    let (outcome, _) = scripted(&pool, &h, |_| recorded_proof).await;
    let (failure, reason) = refused(outcome);
    assert_eq!(failure, AuthFailure::BadSignature);
    assert!(reason.contains("replayed"), "{reason}");

    // Wrong pinned server key: the client refuses the server.
    let e = ControlClient::connect(
        &pool.addr(),
        &pool.admin.signing,
        Some(&stranger.verifying_key()),
        Role::Admin,
        "x",
        [0; 16],
    )
    .await
    .err()
    .expect("refused");
    let err = handshake_error(e);
    assert!(matches!(err, HandshakeError::WrongServerKey { .. }), "{err}");
    assert!(err.to_string().contains("is not the pinned key"), "{err}");
    wait_for_log(&["control handshake failed", &peer, "closed"]).await;

    // Version mismatch.
    let mut s = connect_raw(&pool).await;
    framed::write_message(&mut s, &hello(&pool.admin.signing, Role::Admin, 99, 3)).await.unwrap();
    match framed::read_message::<ServerHello, _>(&mut s).await.unwrap() {
        ServerHello::Refuse { failure, reason } => {
            assert_eq!(failure, AuthFailure::VersionMismatch);
            assert!(reason.contains("99..=99") && reason.contains("upgrade"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    wait_for_log(&["control handshake failed", &peer, "protocol version mismatch"]).await;

    // A peer of the previous protocol (version 1, whose message tags differ)
    // is refused with both ranges named, not misread.
    let mut s = connect_raw(&pool).await;
    framed::write_message(&mut s, &hello(&pool.agent_a.signing, Role::Agent, 1, 4)).await.unwrap();
    match framed::read_message::<ServerHello, _>(&mut s).await.unwrap() {
        ServerHello::Refuse { failure, reason } => {
            assert_eq!(failure, AuthFailure::VersionMismatch);
            let server_range = format!("this server {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}");
            assert!(reason.contains("1..=1") && reason.contains(&server_range), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    // Garbage: a frame that is not a hello, and bytes that are not frames.
    let mut s = connect_raw(&pool).await;
    framed::write_payload(&mut s, &[0xee; 40]).await.unwrap();
    match framed::read_message::<ServerHello, _>(&mut s).await.unwrap() {
        ServerHello::Refuse { failure, .. } => assert_eq!(failure, AuthFailure::Malformed),
        other => panic!("{other:?}"),
    }
    wait_for_log(&["control handshake failed", &peer, "malformed handshake"]).await;
    let mut s = connect_raw(&pool).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(framed::read_payload(&mut s).await.is_err(), "the server closes the connection");
    wait_for_log(&["control handshake failed", &peer, "exceeds"]).await;

    // After all that, the server still serves, and agents still get in.
    still_serving(&pool).await;
    let (agent, _) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    assert!(matches!(agent.request(Request::Renew).await.unwrap(), Response::Lease { .. }));
}

/// The `server` role (protocol 16, a server fetching a cache mirror from
/// another) is the pool's server key's alone: a client key cannot claim it,
/// the server key is nothing else, and a mirror fetch from any other role
/// is refused before it reaches the server's state. The active server
/// hands out none of its mirror files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_pools_server_key_is_a_server_and_only_a_server_may_fetch_a_mirror() {
    let pool = Pool::start(10_000).await;
    let fetch = Request::MirrorFetch { volume: volume_format::VolumeId(1), generation: 1, offset: 0 };

    let addr = pool.addr();
    let pinned = pool.server_key.public;
    let claims = |key: SigningKey, role: Role| {
        let addr = addr.clone();
        async move { ControlClient::connect(&addr, &key, Some(&pinned), role, "x", [0; 16]).await }
    };
    let e = claims(pool.admin.signing.clone(), Role::Server).await.err().expect("an admin key is not a server");
    let HandshakeError::Refused { failure, reason } = handshake_error(e) else { panic!() };
    assert_eq!(failure, AuthFailure::WrongRole);
    assert!(reason.contains("authorized as admin, not as server"), "{reason}");
    let e = claims(pool.server_key.signing.clone(), Role::Admin).await.err().expect("the server key is no admin");
    let HandshakeError::Refused { failure, .. } = handshake_error(e) else { panic!() };
    assert_eq!(failure, AuthFailure::WrongRole);

    let admin = pool.admin().await;
    let e = admin.request(fetch.clone()).await.expect_err("an admin may not fetch a mirror");
    assert!(e.to_string().contains("needs the server role"), "{e}");
    admin.close().await;

    let (server, _) = claims(pool.server_key.signing.clone(), Role::Server).await.expect("the server key is a server");
    let e = server.request(fetch).await.expect_err("the active server hands out no mirror");
    assert!(e.to_string().contains("this metadata server is active"), "{e}");
    server.close().await;
    still_serving(&pool).await;
}
