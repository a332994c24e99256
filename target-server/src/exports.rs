//! What a target exports: one device, seen through the credentials in the
//! export name ([`volume_format::capability::ExportRequest`]).
//!
//! - a plain name (the base export name, or `""`): the size and the
//!   description announcing fencing, no data — enough for `pool init` and
//!   `device add` to learn that the device fences;
//! - `BASE#sanvol-cap1:…`: the device, through a [`FencedDevice`] admitted
//!   under the capability;
//! - `BASE#sanvol-fence1:…`: a fence order, applied at once (older
//!   connections stop), whose one block reads as the acknowledgement.
//!
//! The capability's device binding is checked against the label on the
//! device itself, read at each connection: `pool init` and `device add`
//! rewrite it, and the target must follow without a restart.

use std::sync::Arc;

use blockio::server::{Export, ExportRefusal, ExportSource};
use blockio::BlockDevice;
use tracing::info;
use uuid::Uuid;
use volume_format::capability::{ExportRequest, TARGET_DESCRIPTION_PREFIX};
use volume_format::PublicKey;

use crate::fencer::{now_unix_secs, AckDevice, FencedDevice, Fencer, RefusingDevice};

/// Reads the UUID of the label on the device, if it has a sanvol label.
pub type LabelReader = Arc<dyn Fn() -> Option<Uuid> + Send + Sync>;

/// The export source of one target.
pub struct TargetExports {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    pub fencer: Arc<Fencer>,
    /// Keys of the pool's metadata servers: capabilities and fence orders
    /// signed by one of them are accepted.
    pub trusted: Vec<PublicKey>,
    pub device_uuid: LabelReader,
    /// Shown after the announcement (e.g. the path served).
    pub detail: String,
}

impl TargetExports {
    fn description(&self) -> String {
        format!("{TARGET_DESCRIPTION_PREFIX}: {}", self.detail)
    }

    fn export(&self, device: Arc<dyn BlockDevice>) -> Export {
        Export { name: self.name.clone(), description: self.description(), device, read_only: false }
    }

    fn check_base(&self, base: &str) -> Result<(), ExportRefusal> {
        if base.is_empty() || base == self.name {
            Ok(())
        } else {
            Err(ExportRefusal::Unknown)
        }
    }
}

fn refuse(message: String) -> ExportRefusal {
    info!(%message, "refusing a connection");
    ExportRefusal::Policy(message)
}

impl ExportSource for TargetExports {
    fn list(&self) -> Vec<(String, String)> {
        vec![(self.name.clone(), self.description())]
    }

    fn lookup(&self, name: &str) -> Option<Export> {
        self.open(name).ok()
    }

    fn open(&self, name: &str) -> Result<Export, ExportRefusal> {
        let request = ExportRequest::parse(name).map_err(|e| refuse(e.to_string()))?;
        match request {
            ExportRequest::Plain { base } => {
                self.check_base(&base)?;
                Ok(Export { read_only: true, ..self.export(Arc::new(RefusingDevice { size: self.device.size() })) })
            }
            ExportRequest::Capability { base, capability } => {
                self.check_base(&base)?;
                let device_uuid = (self.device_uuid)();
                let capability = capability
                    .verify(&self.trusted, device_uuid, now_unix_secs())
                    .map_err(|e| refuse(format!("capability refused: {e}")))?;
                let registration =
                    self.fencer.admit(capability).map_err(|e| refuse(format!("capability refused: {e}")))?;
                Ok(self.export(Arc::new(FencedDevice::new(self.device.clone(), registration))))
            }
            ExportRequest::FenceOrder { base, order } => {
                self.check_base(&base)?;
                let device_uuid = (self.device_uuid)();
                let order = order
                    .verify(&self.trusted, device_uuid)
                    .map_err(|e| refuse(format!("fence order refused: {e}")))?;
                self.fencer
                    .raise_now(order.holder, order.min_generation)
                    .map_err(|e| refuse(format!("fence order refused: {e}")))?;
                Ok(Export {
                    read_only: true,
                    ..self.export(Arc::new(AckDevice {
                        fencer: self.fencer.clone(),
                        holder: order.holder,
                        min_generation: order.min_generation,
                    }))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use blockio::memory::MemoryDevice;
    use ed25519_dalek::SigningKey;
    use volume_format::capability::{Capability, FenceOrder, Holder, SignedCapability, SignedFenceOrder};
    use volume_format::label::ByteRange;
    use volume_format::HandleId;

    use super::*;

    const DEVICE: Uuid = Uuid::from_u128(42);

    fn exports(key: &SigningKey) -> TargetExports {
        TargetExports {
            name: "disk".into(),
            device: Arc::new(MemoryDevice::new(1 << 20)),
            fencer: Fencer::new(None).unwrap(),
            trusted: vec![PublicKey(key.verifying_key().to_bytes())],
            device_uuid: Arc::new(|| Some(DEVICE)),
            detail: "memory".into(),
        }
    }

    fn capability(generation: u64) -> Capability {
        let now = now_unix_secs();
        Capability {
            holder: Holder::Handle(HandleId(3)),
            generation,
            device_uuid: Some(DEVICE),
            writable: vec![ByteRange::new(65536, 131072)],
            issued_unix_secs: now,
            expires_unix_secs: now + 60,
        }
    }

    fn policy(result: Result<Export, ExportRefusal>) -> String {
        match result {
            Err(ExportRefusal::Policy(message)) => message,
            Err(ExportRefusal::Unknown) => panic!("refused as unknown"),
            Ok(_) => panic!("admitted"),
        }
    }

    #[test]
    fn a_plain_name_announces_fencing_and_serves_nothing() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let t = exports(&key);
        let export = t.open("disk").unwrap();
        assert!(volume_format::capability::announces_fencing(&export.description), "{}", export.description);
        assert!(export.is_read_only());
        assert!(t.open("").is_ok());
        assert!(matches!(t.open("other"), Err(ExportRefusal::Unknown)));
    }

    #[tokio::test]
    async fn forged_expired_and_foreign_capabilities_are_refused_with_the_reason() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let t = exports(&key);
        let good = SignedCapability::sign(capability(1), &key);
        let export = t.open(&good.export_name("disk")).unwrap();
        export.device.write(65536, bytes::Bytes::from(vec![1u8; 512]), false).await.unwrap();
        let outside = export.device.write(0, bytes::Bytes::from(vec![1u8; 512]), false).await.unwrap_err();
        assert_eq!(outside.kind, blockio::IoErrorKind::PermissionDenied);
        assert!(outside.message.contains("outside the ranges"), "{}", outside.message);

        let mut forged = good.clone();
        forged.capability.writable = vec![ByteRange::new(0, 1 << 20)];
        assert!(policy(t.open(&forged.export_name("disk"))).contains("forged"));
        let now = now_unix_secs();
        let expired = Capability { issued_unix_secs: now - 4000, expires_unix_secs: now - 3600, ..capability(1) };
        assert!(policy(t.open(&SignedCapability::sign(expired, &key).export_name("disk"))).contains("expired"));
        let stranger = SigningKey::from_bytes(&[2; 32]);
        let foreign = SignedCapability::sign(capability(1), &stranger);
        assert!(policy(t.open(&foreign.export_name("disk"))).contains("does not trust"));
        let elsewhere = Capability { device_uuid: Some(Uuid::from_u128(43)), ..capability(1) };
        assert!(policy(t.open(&SignedCapability::sign(elsewhere, &key).export_name("disk"))).contains("device"));
        assert!(policy(t.open("disk#sanvol-cap1:nothex")).contains("malformed"));
    }

    #[tokio::test]
    async fn a_fence_order_stops_the_old_connection_and_refuses_its_generation() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let t = exports(&key);
        let old = t.open(&SignedCapability::sign(capability(1), &key).export_name("disk")).unwrap();
        let revoked = old.device.revoked().unwrap();
        let order = FenceOrder {
            holder: Holder::Handle(HandleId(3)),
            min_generation: 2,
            device_uuid: Some(DEVICE),
            issued_unix_secs: now_unix_secs(),
        };
        let ack = t.open(&SignedFenceOrder::sign(order.clone(), &key).export_name("disk")).unwrap();
        assert!(*revoked.borrow(), "the old connection is told to close");
        let refused = old.device.write(65536, bytes::Bytes::from(vec![2u8; 512]), false).await.unwrap_err();
        assert!(refused.message.contains("fenced"), "{}", refused.message);
        // Not acknowledged while the old connection is open.
        let read = ack.device.read(0, 4096);
        tokio::pin!(read);
        assert!(futures_poll_once(&mut read).await.is_none());
        drop(old);
        let block = read.await.unwrap();
        let ack = volume_format::capability::FenceAck::decode(&block).unwrap();
        assert_eq!((ack.min_generation, ack.connections_closed), (2, 1));
        let message = policy(t.open(&SignedCapability::sign(capability(1), &key).export_name("disk")));
        assert!(message.contains("fenced"), "{message}");
        assert!(t.open(&SignedCapability::sign(capability(2), &key).export_name("disk")).is_ok());
        let forged = SignedFenceOrder { order: FenceOrder { min_generation: 9, ..order }, ..forged_order(&key) };
        assert!(policy(t.open(&forged.export_name("disk"))).contains("fence order refused"));
    }

    fn forged_order(key: &SigningKey) -> SignedFenceOrder {
        let order = FenceOrder {
            holder: Holder::Handle(HandleId(3)),
            min_generation: 3,
            device_uuid: Some(DEVICE),
            issued_unix_secs: 0,
        };
        SignedFenceOrder::sign(order, key)
    }

    /// Polls once: `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        // Let spawned tasks (the saves, the request tasks) run first.
        tokio::task::yield_now().await;
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
