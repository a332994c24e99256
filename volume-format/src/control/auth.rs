//! The handshake that opens every control connection, and the exact bytes
//! each side signs.
//!
//! ```text
//! client → server  ClientHello   { magic, versions, role, client key, client nonce, name, instance }
//! server → client  ServerHello   Accept { version, server key, server nonce, sig_server(T_s) } | Refuse
//! client → server  ClientProof   { sig_client(T_c) }
//! server → client  AuthOutcome   Welcome { session, lease_ms } | Refused { failure, reason }
//!
//! T_s = "sanvol/1 server-proof" ‖ len ‖ ClientHello bytes ‖ server key ‖ server nonce
//! T_c = "sanvol/1 client-proof" ‖ len ‖ ClientHello bytes ‖ len ‖ ServerHello bytes
//! ```
//!
//! Why these transcripts: the server's signature covers the client's fresh
//! nonce, so a recorded `ServerHello` cannot impersonate a server; the
//! client's signature covers the server's fresh nonce (inside the
//! `ServerHello` bytes), so a recorded `ClientProof` cannot be replayed on a
//! new connection. Both cover the whole hello, so neither side's version or
//! role can be changed in flight. Domain-separation prefixes keep a
//! signature made for one purpose from being valid for another.

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerHello {
    Accept {
        /// The version both sides will speak.
        version: u32,
        server_key: [u8; 32],
        nonce: [u8; NONCE_BYTES],
        /// Signature over [`server_transcript`]; 64 bytes.
        signature: Vec<u8>,
    },
    Refuse {
        failure: AuthFailure,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientProof {
    /// Signature over [`client_transcript`]; 64 bytes.
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
        })
    }
}

const SERVER_PROOF_DOMAIN: &[u8] = b"sanvol/1 server-proof\0";
const CLIENT_PROOF_DOMAIN: &[u8] = b"sanvol/1 client-proof\0";

fn push_with_len(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The bytes the server signs: binds its key and nonce to this client's hello.
pub fn server_transcript(
    client_hello_bytes: &[u8],
    server_key: &[u8; 32],
    server_nonce: &[u8; NONCE_BYTES],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(SERVER_PROOF_DOMAIN.len() + 8 + client_hello_bytes.len() + 64);
    t.extend_from_slice(SERVER_PROOF_DOMAIN);
    push_with_len(&mut t, client_hello_bytes);
    t.extend_from_slice(server_key);
    t.extend_from_slice(server_nonce);
    t
}

/// The bytes the client signs: binds its key to both hellos, including the
/// server's fresh nonce.
pub fn client_transcript(client_hello_bytes: &[u8], server_hello_bytes: &[u8]) -> Vec<u8> {
    let mut t =
        Vec::with_capacity(CLIENT_PROOF_DOMAIN.len() + 16 + client_hello_bytes.len() + server_hello_bytes.len());
    t.extend_from_slice(CLIENT_PROOF_DOMAIN);
    push_with_len(&mut t, client_hello_bytes);
    push_with_len(&mut t, server_hello_bytes);
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
    fn transcripts_differ_by_domain_and_bind_every_input() {
        let hello = b"hello";
        let a = server_transcript(hello, &[1; 32], &[2; 32]);
        let b = server_transcript(hello, &[1; 32], &[3; 32]);
        assert_ne!(a, b);
        let c = client_transcript(hello, b"server");
        let d = client_transcript(hello, b"servex");
        assert_ne!(c, d);
        assert!(!c.starts_with(SERVER_PROOF_DOMAIN));
        // Length prefixes stop shifting bytes between fields from giving the same transcript.
        assert_ne!(client_transcript(b"ab", b"c"), client_transcript(b"a", b"bc"));
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
