//! The handshake that opens every control connection and channel, the
//! bytes each side signs, and what the Noise handshake is bound to.
//!
//! ```text
//! client → server  ClientHello   { magic, versions, role, client key, client nonce, name, instance }   (clear)
//! server → client  ServerHello   Noise { version } | Refuse { failure, reason }                         (clear)
//! client → server  Noise msg 1   -> e              payload NoiseRequest { mode }
//! server → client  Noise msg 2   <- e, ee          payload NoiseAnswer  Proceed { mode } | Refuse
//!   ---- from here on every byte is in protected records (see `record`) ----
//! server → client  ServerProof   { server key, sig_server(B_s) }
//! client → server  ClientProof   { sig_client(B_c) }
//! server → client  AuthOutcome   Welcome { session, lease_ms } | Refused { failure, reason }
//!
//! prologue = "sanvol/3 noise prologue" ‖ kind ‖ len ‖ ClientHello bytes ‖ len ‖ ServerHello bytes
//! B_s = "sanvol/3 server-proof" ‖ h        B_c = "sanvol/3 client-proof" ‖ h
//! h   = the Noise handshake hash (Noise_NN_25519_AESGCM_SHA256)
//! ```
//!
//! Why this shape:
//! - The cleartext hello is exactly the one every version pinned
//!   ([`ClientHello`]'s golden bytes), so a peer of another version gets a
//!   clean `Refuse` naming both version ranges instead of unreadable bytes.
//! - The Noise handshake (an ephemeral–ephemeral Diffie–Hellman) gives both
//!   sides fresh session keys that nobody on the path learns. NN alone
//!   authenticates nobody; the ed25519 proofs that follow sign the
//!   handshake hash `h`, which covers the prologue (both hellos, and whether
//!   the connection is a control connection or a channel), both ephemeral
//!   keys and both payloads (the channel mode). A relay that runs its own
//!   Noise handshake with each side has a different `h` on each side, so it
//!   can forward neither side's proof (channel binding); a recorded proof is
//!   useless on a new connection (fresh ephemerals); neither side's version,
//!   role or mode can be changed in flight.
//! - The proofs travel inside protected records, so the first byte an
//!   attacker could alter after the handshake is already authenticated.
//! - Domain-separation prefixes keep a signature made for one purpose from
//!   being valid for another (or for protocol 2's transcripts).

use serde::{Deserialize, Serialize};

/// First bytes of every `ClientHello`: lets the server tell a sanvol client
/// from a stray connection (an NBD client, a port scanner) at once.
pub const HELLO_MAGIC: [u8; 8] = *b"SANVOLC1";

/// Length of the nonces each side contributes.
pub const NONCE_BYTES: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Longest client name accepted.
pub const CLIENT_NAME_BYTES_MAX: usize = 256;

/// What a key is allowed to do: the role stored with each authorized key
/// in the pool metadata is the one a client asks for in its hello.
pub use crate::metadata::ClientRole as Role;

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Backup => "backup",
            Role::Server => "server",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "agent" => Ok(Role::Agent),
            "admin" => Ok(Role::Admin),
            "backup" => Ok(Role::Backup),
            other => Err(format!("unknown role {other:?}: expected agent, admin or backup")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    pub magic: [u8; 8],
    /// Newest protocol version the client speaks.
    pub version: u32,
    /// Oldest protocol version the client accepts.
    pub version_min: u32,
    pub role: Role,
    pub client_key: [u8; 32],
    pub nonce: [u8; NONCE_BYTES],
    /// Human-readable client name (host name), for logs and listings.
    pub name: String,
    /// Identifies this run of the agent (new on every start).
    pub instance: [u8; 16],
}

/// The server's cleartext answer to a [`ClientHello`].
///
/// Variants are never reordered: `Refuse` is what a peer of any version
/// must be able to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerHello {
    /// Protocol 2's answer (proofs in the clear, no session keys). No longer
    /// sent; kept so that `Refuse` keeps its tag.
    Accept {
        version: u32,
        server_key: [u8; 32],
        nonce: [u8; NONCE_BYTES],
        signature: Vec<u8>,
    },
    Refuse {
        failure: AuthFailure,
        reason: String,
    },
    /// Protocol 3 and later: continue with the Noise handshake
    /// ([`NOISE_PARAMS`]) and speak `version` after it.
    Noise {
        version: u32,
    },
}

/// The Noise protocol every connection runs after the cleartext hellos.
///
/// Why AES-GCM and SHA-256 rather than ChaCha20-Poly1305 and BLAKE2s: the
/// data path of storage servers runs on CPUs with AES instructions (AES-NI,
/// VAES, ARMv8 crypto extensions), where AES-GCM is the fastest AEAD: ring's
/// seals about 8 GB/s on one core of the development machine.
/// ChaCha20-Poly1305 wins only without those instructions, and the
/// integrity-only mode is the answer for such hosts.
pub const NOISE_PARAMS: &str = "Noise_NN_25519_AESGCM_SHA256";

/// How a channel's records are protected after the handshake.
///
/// Both modes authenticate every record with keys from the handshake and an
/// implicit sequence number (a flipped byte, a replayed, reordered, dropped
/// or injected record is detected). `Encrypted` also hides the bytes;
/// `Integrity` leaves them readable on the wire, for trusted storage
/// networks where the data path's CPU matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub enum ChannelMode {
    /// Authenticated, not encrypted (a BLAKE3 keyed hash per record).
    Integrity,
    /// Authenticated and encrypted (AEAD per record). The default.
    #[default]
    Encrypted,
}

impl ChannelMode {
    /// Whether this mode gives at least what `min` gives.
    pub fn satisfies(self, min: ChannelMode) -> bool {
        self >= min
    }
}

impl std::fmt::Display for ChannelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelMode::Integrity => "integrity",
            ChannelMode::Encrypted => "encrypted",
        })
    }
}

impl std::str::FromStr for ChannelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ChannelMode, String> {
        match s {
            "encrypted" => Ok(ChannelMode::Encrypted),
            "integrity" | "integrity-only" => Ok(ChannelMode::Integrity),
            other => Err(format!("unknown channel mode {other:?}: expected encrypted or integrity")),
        }
    }
}

/// Whether a connection is a control connection or a channel (it started
/// with the data-channel preamble); bound into the Noise prologue, so a
/// preamble added or stripped on the way fails the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    Control,
    Channel,
}

/// Payload of Noise message 1 (authenticated by the handshake hash, not
/// encrypted): what the client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseRequest {
    pub mode: ChannelMode,
}

/// Payload of Noise message 2 (encrypted): the server's decision on the mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoiseAnswer {
    Proceed { mode: ChannelMode },
    Refuse { failure: AuthFailure, reason: String },
}

/// The server's proof of its key, first record after the Noise handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerProof {
    pub server_key: [u8; 32],
    /// Signature over [`server_binding`]; 64 bytes.
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientProof {
    /// Signature over [`client_binding`]; 64 bytes.
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthOutcome {
    Welcome {
        /// Server-assigned id of this session, for logs.
        session: u64,
        /// How long the session's lease lasts after each renewal.
        lease_ms: u64,
    },
    Refused {
        failure: AuthFailure,
        reason: String,
    },
}

/// Why a handshake failed; each side reports it in its own words too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthFailure {
    /// The client's key is not authorized in this pool.
    UnknownKey,
    /// The key is authorized, but not for the role it asked for.
    WrongRole,
    /// A signature did not verify (forged, altered or replayed).
    BadSignature,
    /// No protocol version in common.
    VersionMismatch,
    /// The peer sent something that is not a valid handshake message.
    Malformed,
    /// The server is not serving this kind of client right now.
    Unavailable,
    /// The client asked for a channel mode weaker than the server's minimum.
    ChannelMode,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthFailure::UnknownKey => "unknown key",
            AuthFailure::WrongRole => "wrong role",
            AuthFailure::BadSignature => "bad signature",
            AuthFailure::VersionMismatch => "protocol version mismatch",
            AuthFailure::Malformed => "malformed handshake",
            AuthFailure::Unavailable => "unavailable",
            AuthFailure::ChannelMode => "channel mode refused",
        })
    }
}

const PROLOGUE_DOMAIN: &[u8] = b"sanvol/3 noise prologue\0";
const SERVER_PROOF_DOMAIN: &[u8] = b"sanvol/3 server-proof\0";
const CLIENT_PROOF_DOMAIN: &[u8] = b"sanvol/3 client-proof\0";

fn push_with_len(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The Noise prologue: both cleartext hellos, exactly as sent, and the kind
/// of connection. Both sides must compute the same bytes or the handshake
/// fails, so nothing said in the clear can be changed on the way.
pub fn noise_prologue(kind: ConnectionKind, client_hello_bytes: &[u8], server_hello_bytes: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(PROLOGUE_DOMAIN.len() + 17 + client_hello_bytes.len() + server_hello_bytes.len());
    p.extend_from_slice(PROLOGUE_DOMAIN);
    p.push(match kind {
        ConnectionKind::Control => b'C',
        ConnectionKind::Channel => b'D',
    });
    push_with_len(&mut p, client_hello_bytes);
    push_with_len(&mut p, server_hello_bytes);
    p
}

/// The bytes the server signs: the handshake hash of this connection.
pub fn server_binding(handshake_hash: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(SERVER_PROOF_DOMAIN.len() + 8 + handshake_hash.len());
    t.extend_from_slice(SERVER_PROOF_DOMAIN);
    push_with_len(&mut t, handshake_hash);
    t
}

/// The bytes the client signs: the handshake hash of this connection.
pub fn client_binding(handshake_hash: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(CLIENT_PROOF_DOMAIN.len() + 8 + handshake_hash.len());
    t.extend_from_slice(CLIENT_PROOF_DOMAIN);
    push_with_len(&mut t, handshake_hash);
    t
}

/// Picks the version both sides speak, if any.
pub fn negotiate_version(client_min: u32, client_max: u32, server_min: u32, server_max: u32) -> Option<u32> {
    let high = client_max.min(server_max);
    (high >= client_min.max(server_min)).then_some(high)
}

impl ClientHello {
    /// Checks what the server can check before any cryptography: magic,
    /// name length, version range sanity.
    pub fn validate(&self) -> Result<(), String> {
        if self.magic != HELLO_MAGIC {
            return Err("not a sanvol control client (bad hello magic)".into());
        }
        if self.name.len() > CLIENT_NAME_BYTES_MAX {
            return Err(format!("client name longer than {CLIENT_NAME_BYTES_MAX} bytes"));
        }
        if self.version_min > self.version {
            return Err(format!("client version range {}..={} is empty", self.version_min, self.version));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(1, 1, 1, 1), Some(1));
        assert_eq!(negotiate_version(1, 3, 2, 5), Some(3));
        assert_eq!(negotiate_version(2, 3, 1, 1), None);
        assert_eq!(negotiate_version(1, 1, 2, 2), None);
    }

    #[test]
    fn bindings_differ_by_domain_and_bind_every_input() {
        assert_ne!(server_binding(&[1; 32]), client_binding(&[1; 32]));
        assert_ne!(server_binding(&[1; 32]), server_binding(&[2; 32]));
        assert!(!client_binding(b"h").starts_with(SERVER_PROOF_DOMAIN));
        let p = |kind, c: &[u8], s: &[u8]| noise_prologue(kind, c, s);
        assert_ne!(p(ConnectionKind::Control, b"c", b"s"), p(ConnectionKind::Channel, b"c", b"s"));
        // Length prefixes stop shifting bytes between fields from giving the same prologue.
        assert_ne!(p(ConnectionKind::Control, b"ab", b"c"), p(ConnectionKind::Control, b"a", b"bc"));
    }

    #[test]
    fn channel_modes_order_by_strength() {
        assert!(ChannelMode::Encrypted.satisfies(ChannelMode::Integrity));
        assert!(ChannelMode::Encrypted.satisfies(ChannelMode::Encrypted));
        assert!(!ChannelMode::Integrity.satisfies(ChannelMode::Encrypted));
        assert_eq!(ChannelMode::default(), ChannelMode::Encrypted);
        for m in [ChannelMode::Integrity, ChannelMode::Encrypted] {
            assert_eq!(m.to_string().parse::<ChannelMode>().unwrap(), m);
        }
        assert!("plain".parse::<ChannelMode>().is_err());
    }

    #[test]
    fn hello_validation() {
        let mut h = ClientHello {
            magic: HELLO_MAGIC,
            version: 1,
            version_min: 1,
            role: Role::Agent,
            client_key: [0; 32],
            nonce: [0; 32],
            name: "host".into(),
            instance: [0; 16],
        };
        assert!(h.validate().is_ok());
        h.magic = *b"NBDMAGIC";
        assert!(h.validate().is_err());
    }

    /// Golden bytes: the hello's encoding is the one thing every future
    /// version must still understand, so pin it.
    #[test]
    fn client_hello_golden_bytes() {
        let h = ClientHello {
            magic: HELLO_MAGIC,
            version: 1,
            version_min: 1,
            role: Role::Admin,
            client_key: [0xaa; 32],
            nonce: [0xbb; 32],
            name: "n".into(),
            instance: [0xcc; 16],
        };
        let bytes = crate::control::frame::encode_payload(&h).unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(b"SANVOLC1");
        expected.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 1]); // Role::Admin as a u32 variant index
        expected.extend_from_slice(&[0xaa; 32]);
        expected.extend_from_slice(&[0xbb; 32]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, b'n']);
        expected.extend_from_slice(&[0xcc; 16]);
        assert_eq!(bytes, expected);
    }
}
