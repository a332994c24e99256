//! Property tests over random and mutated bytes for every parser of the
//! control protocol's wire: frame headers, the cleartext hellos, the Noise
//! payloads, the proofs and outcome, record headers, and the messages after
//! authentication. Run in the normal test suite with a bounded number of
//! cases (cargo-fuzz needs a nightly toolchain; these need nothing).
//!
//! What they check: no input panics or allocates without bound; a decoded
//! value re-encodes to the same bytes (nothing is silently dropped or
//! invented); a mutated valid message is refused or decodes to a value that
//! encodes back to the mutated bytes.

use proptest::prelude::*;
use volume_format::control::auth::{
    AuthFailure, AuthOutcome, ChannelMode, ClientHello, ClientProof, NoiseAnswer, NoiseRequest, Role, ServerHello,
    ServerProof, HELLO_MAGIC,
};
use volume_format::control::frame::{check_frame_header, decode_payload, encode_payload, FRAME_BYTES_MAX};
use volume_format::control::messages::{ClientMessage, Request, ServerMessage};
use volume_format::control::record::{check_record_header, RECORD_BODY_BYTES_MAX};

/// Cases per property: enough to find shallow bugs on every run, bounded so
/// the suite stays fast.
const CASES: u32 = 512;

/// Decodes `bytes` as `T`; if it decodes, it must encode back to `bytes`.
fn round_trips_or_refuses<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    if let Ok(value) = decode_payload::<T>(bytes) {
        let again = encode_payload(&value).expect("a decoded value encodes");
        prop_assert_eq!(&again[..], bytes, "{:?} decoded from bytes it does not encode to", value);
    }
    Ok(())
}

fn every_parser(bytes: &[u8]) -> Result<(), TestCaseError> {
    round_trips_or_refuses::<ServerHello>(bytes)?;
    round_trips_or_refuses::<NoiseRequest>(bytes)?;
    round_trips_or_refuses::<NoiseAnswer>(bytes)?;
    round_trips_or_refuses::<ServerProof>(bytes)?;
    round_trips_or_refuses::<ClientProof>(bytes)?;
    round_trips_or_refuses::<AuthOutcome>(bytes)?;
    round_trips_or_refuses::<ClientMessage>(bytes)?;
    round_trips_or_refuses::<ServerMessage>(bytes)?;
    if let Ok(hello) = decode_payload::<ClientHello>(bytes) {
        let _ = hello.validate();
        prop_assert_eq!(encode_payload(&hello).unwrap(), bytes.to_vec());
    }
    Ok(())
}

/// Valid encodings of one message of each handshake type.
fn samples() -> Vec<Vec<u8>> {
    let hello = ClientHello {
        magic: HELLO_MAGIC,
        version: 3,
        version_min: 3,
        role: Role::Agent,
        client_key: [1; 32],
        nonce: [2; 32],
        name: "host-a".into(),
        instance: [3; 16],
    };
    vec![
        encode_payload(&hello).unwrap(),
        encode_payload(&ServerHello::Noise { version: 3 }).unwrap(),
        encode_payload(&ServerHello::Refuse { failure: AuthFailure::VersionMismatch, reason: "r".into() }).unwrap(),
        encode_payload(&NoiseRequest { mode: ChannelMode::Integrity }).unwrap(),
        encode_payload(&NoiseAnswer::Proceed { mode: ChannelMode::Encrypted }).unwrap(),
        encode_payload(&ServerProof { server_key: [4; 32], signature: vec![5; 64] }).unwrap(),
        encode_payload(&ClientProof { signature: vec![6; 64] }).unwrap(),
        encode_payload(&AuthOutcome::Welcome { session: 7, lease_ms: 8 }).unwrap(),
        encode_payload(&ClientMessage { id: 9, request: Request::VolumeShow { name: "db".into() } }).unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_bytes_never_panic_any_parser(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        every_parser(&bytes)?;
    }

    #[test]
    fn mutated_messages_are_refused_or_exact(
        which in any::<proptest::sample::Index>(),
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<proptest::sample::Index>()),
        tail in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let all = samples();
        let mut bytes = which.get(&all).clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        bytes.extend_from_slice(&tail);
        every_parser(&bytes)?;
    }

    /// A huge length in a string or vector field is refused, not allocated:
    /// a hello whose name claims 2^60 bytes decodes to an error at once.
    #[test]
    fn huge_lengths_are_refused(len in (1u64 << 32)..u64::MAX) {
        let mut bytes = samples()[0].clone();
        // The name's length prefix sits after magic, versions, role, key and nonce.
        let at = 8 + 4 + 4 + 4 + 32 + 32;
        bytes[at..at + 8].copy_from_slice(&len.to_be_bytes());
        prop_assert!(decode_payload::<ClientHello>(&bytes).is_err());
    }

    #[test]
    fn frame_and_record_headers_are_bounded(header in any::<[u8; 4]>()) {
        if let Ok(len) = check_frame_header(header) {
            prop_assert!(len > 0 && len as u64 <= u64::from(FRAME_BYTES_MAX));
        }
        for mode in [ChannelMode::Encrypted, ChannelMode::Integrity] {
            if let Ok(body) = check_record_header([header[0], header[1]], mode) {
                prop_assert!(body <= RECORD_BODY_BYTES_MAX);
            }
        }
    }
}
