//! Capabilities and fence orders: what a fencing device server
//! (`sanvol-target`) checks before it lets a connection write.
//!
//! Why: on a plain NBD server anyone connected may write, so keeping an
//! excluded holder's writes off the devices rests on timing
//! ([`crate::fencing`]). A device that checks who writes can do better: a
//! connection presents a **capability** — signed by a metadata server of the
//! pool — naming the holder (a handle, or the metadata server itself), a
//! **generation**, the device and the byte ranges it may write. The
//! metadata server can later raise the minimum generation of a holder with
//! a signed **fence order**; the target refuses new requests from older
//! connections at once, and acknowledges only when their in-flight requests
//! have finished and the connections are closed. After the acknowledgement
//! nothing that holder sent under an older generation can land.
//!
//! Why the capability travels in the NBD export name
//! (`EXPORT#sanvol-cap1:HEX`) rather than in a new NBD option: every NBD
//! client (ours, qemu, nbd-client) can send an export name, the name is
//! sent with `NBD_OPT_GO` on the same connection it authorizes (under TLS
//! when the device uses it), and the target refuses a bad one with
//! `NBD_REP_ERR_POLICY` and a message saying why, before any data moves.
//! The spec allows names of up to 4096 bytes, which bounds the ranges
//! ([`CAPABILITY_RANGES_MAX`]). A fence order travels the same way
//! (`EXPORT#sanvol-fence1:HEX`) and its acknowledgement is the first block
//! of that connection's export: the metadata server needs no second
//! channel, address or port to each target.
//!
//! Replaying a fence order is harmless (a minimum generation only goes up),
//! so orders carry no nonce. A capability is a bearer token for its
//! lifetime: use TLS to devices on networks you do not trust.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec;
use crate::ids::{HandleId, PublicKey};
use crate::label::ByteRange;

/// Most writable ranges one capability names (so that its export name stays
/// under the NBD limit of 4096 bytes).
pub const CAPABILITY_RANGES_MAX: usize = 64;
/// Longest a capability may be valid (`expires - issued`): a target keeps a
/// raised minimum generation at least this long (plus the skew).
pub const CAPABILITY_LIFETIME_MAX_SECS: u64 = 7 * 24 * 3600;
/// What a metadata server normally gives: a day; a holder that needs to
/// reconnect later asks for a fresh one.
pub const CAPABILITY_LIFETIME_DEFAULT_SECS: u64 = 24 * 3600;
/// Tolerated difference between the clocks of the metadata server that
/// issued a capability and the target that checks it.
pub const CLOCK_SKEW_MAX_SECS: u64 = 300;
/// Marks a capability in an export name: `EXPORT#sanvol-cap1:HEX`.
pub const CAPABILITY_MARK: &str = "#sanvol-cap1:";
/// Marks a fence order in an export name: `EXPORT#sanvol-fence1:HEX`.
pub const FENCE_ORDER_MARK: &str = "#sanvol-fence1:";
/// How a fencing target starts its export description (`NBD_INFO_DESCRIPTION`).
pub const TARGET_DESCRIPTION_PREFIX: &str = "sanvol-target fencing/1";
/// Size of the block a fence order's connection reads its acknowledgement from.
pub const FENCE_ACK_BYTES: u32 = 4096;
const FENCE_ACK_MAGIC: [u8; 8] = *b"SANVOLFA";
/// Longest encoded token accepted (an NBD export name is at most 4096 bytes).
const TOKEN_HEX_MAX: usize = 4096;

const CAPABILITY_DOMAIN: &[u8] = b"sanvol capability v1\0";
const FENCE_ORDER_DOMAIN: &[u8] = b"sanvol fence order v1\0";

/// Whether an export description says its server fences (a `sanvol-target`).
pub fn announces_fencing(description: &str) -> bool {
    description.starts_with(TARGET_DESCRIPTION_PREFIX)
}

/// Who writes under a capability; the unit a fence order fences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Holder {
    /// A metadata server of the pool (journal, leases, copies, fallback I/O).
    Server,
    /// An open handle (an agent's writes to its volume).
    Handle(HandleId),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Server => f.write_str("the metadata server"),
            Holder::Handle(h) => write!(f, "handle {h}"),
        }
    }
}

/// What a connection may do on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub holder: Holder,
    pub generation: u64,
    /// The device (label UUID) it is for. `None` only for [`Holder::Server`]:
    /// every device of the pool, including one not labelled yet (`pool init`).
    pub device_uuid: Option<Uuid>,
    /// Where it may write; the server's own capability names the whole device.
    pub writable: Vec<ByteRange>,
    pub issued_unix_secs: u64,
    pub expires_unix_secs: u64,
}

impl Capability {
    /// Whether `[offset, offset + len)` lies inside one writable range.
    pub fn may_write(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else { return false };
        self.writable.iter().any(|r| r.start <= offset && end <= r.end)
    }
}

/// An order to refuse `holder`'s connections below `min_generation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceOrder {
    pub holder: Holder,
    pub min_generation: u64,
    /// The device it is for; `None`: any target that trusts the signer.
    pub device_uuid: Option<Uuid>,
    pub issued_unix_secs: u64,
}

/// Why a capability or fence order was refused. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("malformed capability or fence order: {0}; ask the metadata server for a new one")]
    Malformed(String),
    #[error("signed by key {signer}, which this target does not trust; start sanvol-target with --server-key for each metadata server of the pool")]
    UntrustedSigner { signer: PublicKey },
    #[error("the signature does not verify (forged or corrupted); ask the metadata server for a new one")]
    BadSignature,
    #[error("the capability expired at unix time {expires_unix_secs} (now {now_unix_secs}); ask the metadata server for a new one")]
    Expired { expires_unix_secs: u64, now_unix_secs: u64 },
    #[error("the capability is issued at unix time {issued_unix_secs}, after now ({now_unix_secs}) plus the tolerated clock skew; check the clocks of the metadata server and this host")]
    FromTheFuture { issued_unix_secs: u64, now_unix_secs: u64 },
    #[error("the capability is valid for {lifetime_secs} s, more than the {max_secs} s a target accepts")]
    LifetimeTooLong { lifetime_secs: u64, max_secs: u64 },
    #[error("the capability names {ranges} writable ranges, more than {max}")]
    TooManyRanges { ranges: usize, max: usize },
    #[error("a capability for {holder} must name its device")]
    NoDevice { holder: Holder },
    #[error("issued for device {wanted}, but this target serves device {actual}; check the device URI")]
    WrongDevice { wanted: Uuid, actual: String },
}

/// A capability with the signature of a metadata server's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCapability {
    pub capability: Capability,
    pub signer: PublicKey,
    /// 64 bytes of ed25519 signature over the domain tag and the encoded
    /// capability (a `Vec` because serde has no 64-byte arrays).
    pub signature: Vec<u8>,
}

/// A fence order with the signature of a metadata server's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedFenceOrder {
    pub order: FenceOrder,
    pub signer: PublicKey,
    pub signature: Vec<u8>,
}

fn sign_body<T: Serialize>(domain: &[u8], body: &T, key: &SigningKey) -> (PublicKey, Vec<u8>) {
    let mut message = domain.to_vec();
    // Encoding plain structs of integers and vectors cannot fail.
    message.extend(codec::encode(body).unwrap_or_default());
    (PublicKey(key.verifying_key().to_bytes()), key.sign(&message).to_bytes().to_vec())
}

fn verify_body<T: Serialize>(
    domain: &[u8],
    body: &T,
    signer: &PublicKey,
    signature: &[u8],
    trusted: &[PublicKey],
) -> Result<(), CapabilityError> {
    if !trusted.contains(signer) {
        return Err(CapabilityError::UntrustedSigner { signer: *signer });
    }
    let key = VerifyingKey::from_bytes(&signer.0).map_err(|_| CapabilityError::BadSignature)?;
    let bytes: [u8; 64] = signature.try_into().map_err(|_| CapabilityError::BadSignature)?;
    let mut message = domain.to_vec();
    message.extend(codec::encode(body).map_err(|e| CapabilityError::Malformed(e.to_string()))?);
    key.verify(&message, &Signature::from_bytes(&bytes)).map_err(|_| CapabilityError::BadSignature)
}

fn check_device(wanted: Option<Uuid>, actual: Option<Uuid>) -> Result<(), CapabilityError> {
    match (wanted, actual) {
        (None, _) => Ok(()),
        (Some(w), Some(a)) if w == a => Ok(()),
        (Some(wanted), actual) => Err(CapabilityError::WrongDevice {
            wanted,
            actual: actual.map_or_else(|| "none (no sanvol label)".to_string(), |a| a.to_string()),
        }),
    }
}

fn encode_token<T: Serialize>(value: &T) -> String {
    hex::encode(codec::encode(value).unwrap_or_default())
}

fn decode_token<T: serde::de::DeserializeOwned>(token: &str) -> Result<T, CapabilityError> {
    if token.len() > TOKEN_HEX_MAX {
        return Err(CapabilityError::Malformed(format!("{} characters, more than {TOKEN_HEX_MAX}", token.len())));
    }
    let bytes = hex::decode(token).map_err(|e| CapabilityError::Malformed(format!("not hex: {e}")))?;
    codec::decode(&bytes).map_err(|e| CapabilityError::Malformed(e.to_string()))
}

impl SignedCapability {
    pub fn sign(capability: Capability, key: &SigningKey) -> SignedCapability {
        let (signer, signature) = sign_body(CAPABILITY_DOMAIN, &capability, key);
        SignedCapability { capability, signer, signature }
    }

    /// Checks everything a target checks without its own state: a trusted
    /// signer, the signature, the lifetime against `now_unix_secs`, the
    /// ranges, and that it is for `device_uuid` (the target's label; `None`
    /// if the device has none yet). The generation is the target's part.
    pub fn verify(
        &self,
        trusted: &[PublicKey],
        device_uuid: Option<Uuid>,
        now_unix_secs: u64,
    ) -> Result<&Capability, CapabilityError> {
        verify_body(CAPABILITY_DOMAIN, &self.capability, &self.signer, &self.signature, trusted)?;
        let c = &self.capability;
        if c.writable.len() > CAPABILITY_RANGES_MAX {
            return Err(CapabilityError::TooManyRanges { ranges: c.writable.len(), max: CAPABILITY_RANGES_MAX });
        }
        let lifetime_secs = c.expires_unix_secs.saturating_sub(c.issued_unix_secs);
        if lifetime_secs > CAPABILITY_LIFETIME_MAX_SECS {
            return Err(CapabilityError::LifetimeTooLong { lifetime_secs, max_secs: CAPABILITY_LIFETIME_MAX_SECS });
        }
        if c.issued_unix_secs > now_unix_secs.saturating_add(CLOCK_SKEW_MAX_SECS) {
            return Err(CapabilityError::FromTheFuture { issued_unix_secs: c.issued_unix_secs, now_unix_secs });
        }
        if c.expires_unix_secs.saturating_add(CLOCK_SKEW_MAX_SECS) < now_unix_secs {
            return Err(CapabilityError::Expired { expires_unix_secs: c.expires_unix_secs, now_unix_secs });
        }
        if c.device_uuid.is_none() && c.holder != Holder::Server {
            return Err(CapabilityError::NoDevice { holder: c.holder });
        }
        check_device(c.device_uuid, device_uuid)?;
        Ok(c)
    }

    /// The export name that presents this capability for export `base`.
    pub fn export_name(&self, base: &str) -> String {
        format!("{base}{CAPABILITY_MARK}{}", encode_token(self))
    }
}

impl SignedFenceOrder {
    pub fn sign(order: FenceOrder, key: &SigningKey) -> SignedFenceOrder {
        let (signer, signature) = sign_body(FENCE_ORDER_DOMAIN, &order, key);
        SignedFenceOrder { order, signer, signature }
    }

    /// Checks the signer, the signature and the device (no lifetime: an
    /// order only raises a minimum, so an old one replayed does nothing).
    pub fn verify(&self, trusted: &[PublicKey], device_uuid: Option<Uuid>) -> Result<&FenceOrder, CapabilityError> {
        verify_body(FENCE_ORDER_DOMAIN, &self.order, &self.signer, &self.signature, trusted)?;
        check_device(self.order.device_uuid, device_uuid)?;
        Ok(&self.order)
    }

    /// The export name that delivers this order for export `base`.
    pub fn export_name(&self, base: &str) -> String {
        format!("{base}{FENCE_ORDER_MARK}{}", encode_token(self))
    }
}

/// What a client asked for with an export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportRequest {
    /// A plain name: no capability (a probe, `NBD_OPT_INFO`, a listing).
    Plain {
        base: String,
    },
    Capability {
        base: String,
        capability: Box<SignedCapability>,
    },
    FenceOrder {
        base: String,
        order: Box<SignedFenceOrder>,
    },
}

impl ExportRequest {
    /// Splits an export name into its base and what it carries. Never
    /// panics: the name comes from the network.
    pub fn parse(name: &str) -> Result<ExportRequest, CapabilityError> {
        if let Some((base, token)) = name.split_once(CAPABILITY_MARK) {
            let capability = decode_token(token)?;
            return Ok(ExportRequest::Capability { base: base.to_string(), capability: Box::new(capability) });
        }
        if let Some((base, token)) = name.split_once(FENCE_ORDER_MARK) {
            let order = decode_token(token)?;
            return Ok(ExportRequest::FenceOrder { base: base.to_string(), order: Box::new(order) });
        }
        Ok(ExportRequest::Plain { base: name.to_string() })
    }
}

/// A target's acknowledgement of a fence order: every connection of
/// `holder` below `min_generation` has finished its requests and is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAck {
    pub holder: Holder,
    pub min_generation: u64,
    /// Connections of the holder that raises to this minimum closed (0 if
    /// there were none).
    pub connections_closed: u64,
}

impl FenceAck {
    /// The [`FENCE_ACK_BYTES`] block the target serves it as.
    pub fn encode(&self) -> Vec<u8> {
        let mut block = vec![0u8; FENCE_ACK_BYTES as usize];
        block[..8].copy_from_slice(&FENCE_ACK_MAGIC);
        let body = codec::encode(self).unwrap_or_default();
        block[8..12].copy_from_slice(&(body.len() as u32).to_be_bytes());
        block[12..12 + body.len()].copy_from_slice(&body);
        block
    }

    pub fn decode(block: &[u8]) -> Result<FenceAck, CapabilityError> {
        let bad = |what: &str| CapabilityError::Malformed(format!("fence acknowledgement: {what}"));
        if block.len() < 12 || block[..8] != FENCE_ACK_MAGIC {
            return Err(bad("no acknowledgement magic (is the device a sanvol-target?)"));
        }
        let len = u32::from_be_bytes([block[8], block[9], block[10], block[11]]) as usize;
        let body = block.get(12..12usize.saturating_add(len)).ok_or_else(|| bad("length past the block"))?;
        codec::decode(body).map_err(|e| bad(&e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn public(k: &SigningKey) -> PublicKey {
        PublicKey(k.verifying_key().to_bytes())
    }

    fn device() -> Uuid {
        Uuid::from_u128(7)
    }

    fn cap() -> Capability {
        Capability {
            holder: Holder::Handle(HandleId(5)),
            generation: 3,
            device_uuid: Some(device()),
            writable: vec![ByteRange::new(1 << 20, 2 << 20)],
            issued_unix_secs: 1_000,
            expires_unix_secs: 1_000 + CAPABILITY_LIFETIME_DEFAULT_SECS,
        }
    }

    #[test]
    fn a_signed_capability_survives_its_export_name() {
        let signed = SignedCapability::sign(cap(), &key(1));
        let name = signed.export_name("disk");
        assert!(name.len() < 4096, "{}", name.len());
        let ExportRequest::Capability { base, capability } = ExportRequest::parse(&name).unwrap() else {
            panic!("not a capability")
        };
        assert_eq!(base, "disk");
        assert_eq!(capability.verify(&[public(&key(1))], Some(device()), 2_000).unwrap(), &cap());
        assert_eq!(ExportRequest::parse("disk").unwrap(), ExportRequest::Plain { base: "disk".into() });
    }

    #[test]
    fn capability_with_the_most_ranges_fits_an_nbd_export_name() {
        let ranges = (0..CAPABILITY_RANGES_MAX as u64).map(|i| ByteRange::new(i << 30, (i << 30) + 4096)).collect();
        let signed = SignedCapability::sign(Capability { writable: ranges, ..cap() }, &key(1));
        assert!(signed.export_name("a-long-export-name").len() <= 4096);
    }

    #[test]
    fn forged_capabilities_are_refused() {
        let trusted = [public(&key(1))];
        let mut signed = SignedCapability::sign(cap(), &key(1));
        signed.capability.writable = vec![ByteRange::new(0, u64::MAX)];
        assert_eq!(signed.verify(&trusted, Some(device()), 2_000), Err(CapabilityError::BadSignature));
        let mut signed = SignedCapability::sign(cap(), &key(1));
        signed.capability.generation += 1;
        assert_eq!(signed.verify(&trusted, Some(device()), 2_000), Err(CapabilityError::BadSignature));
        let mut signed = SignedCapability::sign(cap(), &key(1));
        signed.signature.truncate(10);
        assert_eq!(signed.verify(&trusted, Some(device()), 2_000), Err(CapabilityError::BadSignature));
    }

    #[test]
    fn a_key_the_target_does_not_trust_is_named_in_the_refusal() {
        let signed = SignedCapability::sign(cap(), &key(2));
        let err = signed.verify(&[public(&key(1))], Some(device()), 2_000).unwrap_err();
        assert_eq!(err, CapabilityError::UntrustedSigner { signer: public(&key(2)) });
        assert!(err.to_string().contains("--server-key"), "{err}");
        // A forger who claims a trusted signer still needs its signature.
        let mut claimed = signed;
        claimed.signer = public(&key(1));
        assert_eq!(claimed.verify(&[public(&key(1))], Some(device()), 2_000), Err(CapabilityError::BadSignature));
    }

    #[test]
    fn expired_and_future_capabilities_are_refused() {
        let trusted = [public(&key(1))];
        let signed = SignedCapability::sign(cap(), &key(1));
        let expires = cap().expires_unix_secs;
        assert!(signed.verify(&trusted, Some(device()), expires + CLOCK_SKEW_MAX_SECS).is_ok());
        let err = signed.verify(&trusted, Some(device()), expires + CLOCK_SKEW_MAX_SECS + 1).unwrap_err();
        assert!(matches!(err, CapabilityError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("ask the metadata server"), "{err}");
        let err = signed.verify(&trusted, Some(device()), 1_000 - CLOCK_SKEW_MAX_SECS - 1).unwrap_err();
        assert!(matches!(err, CapabilityError::FromTheFuture { .. }), "{err}");
        let long = Capability { expires_unix_secs: 1_000 + CAPABILITY_LIFETIME_MAX_SECS + 1, ..cap() };
        let err = SignedCapability::sign(long, &key(1)).verify(&trusted, Some(device()), 2_000).unwrap_err();
        assert!(matches!(err, CapabilityError::LifetimeTooLong { .. }), "{err}");
    }

    #[test]
    fn capabilities_are_bound_to_their_device() {
        let trusted = [public(&key(1))];
        let signed = SignedCapability::sign(cap(), &key(1));
        let err = signed.verify(&trusted, Some(Uuid::from_u128(8)), 2_000).unwrap_err();
        assert!(matches!(err, CapabilityError::WrongDevice { .. }), "{err}");
        assert!(signed.verify(&trusted, None, 2_000).is_err(), "an unlabelled device is no handle's");
        let anywhere = Capability { device_uuid: None, ..cap() };
        let err = SignedCapability::sign(anywhere.clone(), &key(1)).verify(&trusted, None, 2_000).unwrap_err();
        assert_eq!(err, CapabilityError::NoDevice { holder: Holder::Handle(HandleId(5)) });
        let server = Capability { holder: Holder::Server, ..anywhere };
        assert!(SignedCapability::sign(server.clone(), &key(1)).verify(&trusted, None, 2_000).is_ok());
        assert!(SignedCapability::sign(server, &key(1)).verify(&trusted, Some(device()), 2_000).is_ok());
    }

    #[test]
    fn too_many_ranges_are_refused() {
        let ranges = vec![ByteRange::new(0, 1); CAPABILITY_RANGES_MAX + 1];
        let signed = SignedCapability::sign(Capability { writable: ranges, ..cap() }, &key(1));
        let err = signed.verify(&[public(&key(1))], Some(device()), 2_000).unwrap_err();
        assert!(matches!(err, CapabilityError::TooManyRanges { .. }), "{err}");
    }

    #[test]
    fn may_write_needs_the_whole_request_inside_one_range() {
        let c = cap();
        assert!(c.may_write(1 << 20, 4096));
        assert!(c.may_write((2 << 20) - 4096, 4096));
        assert!(!c.may_write((2 << 20) - 4096, 4097));
        assert!(!c.may_write(0, 4096));
        assert!(!c.may_write(u64::MAX, 2));
    }

    #[test]
    fn garbage_export_names_are_typed_errors() {
        for name in [
            format!("disk{CAPABILITY_MARK}zz"),
            format!("disk{CAPABILITY_MARK}00"),
            format!("disk{FENCE_ORDER_MARK}"),
            format!("disk{CAPABILITY_MARK}{}", "ab".repeat(3000)),
        ] {
            assert!(matches!(ExportRequest::parse(&name), Err(CapabilityError::Malformed(_))), "{name}");
        }
    }

    #[test]
    fn fence_orders_verify_and_round_trip() {
        let order = FenceOrder {
            holder: Holder::Handle(HandleId(5)),
            min_generation: 4,
            device_uuid: Some(device()),
            issued_unix_secs: 5,
        };
        let signed = SignedFenceOrder::sign(order.clone(), &key(1));
        let ExportRequest::FenceOrder { order: parsed, .. } = ExportRequest::parse(&signed.export_name("")).unwrap()
        else {
            panic!("not an order")
        };
        assert_eq!(parsed.verify(&[public(&key(1))], Some(device())).unwrap(), &order);
        assert!(parsed.verify(&[public(&key(2))], Some(device())).is_err());
        let mut forged = signed;
        forged.order.min_generation = 1;
        assert_eq!(forged.verify(&[public(&key(1))], Some(device())), Err(CapabilityError::BadSignature));
    }

    #[test]
    fn fence_acks_round_trip_and_garbage_is_refused() {
        let ack = FenceAck { holder: Holder::Server, min_generation: 9, connections_closed: 2 };
        let block = ack.encode();
        assert_eq!(block.len(), FENCE_ACK_BYTES as usize);
        assert_eq!(FenceAck::decode(&block).unwrap(), ack);
        assert!(FenceAck::decode(&[0u8; 4096]).is_err());
        let mut bad_len = block.clone();
        bad_len[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(FenceAck::decode(&bad_len).is_err());
        assert!(FenceAck::decode(&block[..5]).is_err());
    }

    #[test]
    fn descriptions_announce_fencing() {
        assert!(announces_fencing(&format!("{TARGET_DESCRIPTION_PREFIX}: /srv/disk.img")));
        assert!(!announces_fencing("nbdkit file plugin"));
    }
}
