//! Random request sequences against the server and a trivial model.
//!
//! Every read is compared with the model; block status is checked to never
//! claim "zero" for bytes the model says are not zero. Runs over both reply
//! styles (simple and structured) and both backends.

mod server_common;

use std::sync::Arc;

use blockio::file::FileDevice;
use blockio::memory::MemoryDevice;
use blockio::proto;
use blockio::server::ExportTable;
use blockio::BlockDevice;
use proptest::prelude::*;
use server_common::{connect, server};

/// Small enough to cover often, several 64 KiB memory chunks wide.
const DEVICE_BYTES: u64 = 320 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u32, seed: u8, fua: bool },
    Read { offset: u64, len: u32 },
    Trim { offset: u64, len: u32 },
    Zero { offset: u64, len: u32, no_hole: bool, fua: bool },
    Flush,
    Status { offset: u64, len: u32 },
}

fn range() -> impl Strategy<Value = (u64, u32)> {
    // Mostly 512-aligned (like real clients), sometimes byte-granular.
    (0..DEVICE_BYTES, 1u32..150_000, any::<bool>()).prop_map(|(off, len, align)| {
        let (off, len) = if align { (off & !511, (len + 511) & !511) } else { (off, len) };
        let len = len.min((DEVICE_BYTES - off) as u32).max(1);
        let off = off.min(DEVICE_BYTES - len as u64);
        (off, len)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>()).prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
        4 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (range(), any::<bool>(), any::<bool>()).prop_map(|((offset, len), no_hole, fua)| Op::Zero { offset, len, no_hole, fua }),
        1 => Just(Op::Flush),
        1 => range().prop_map(|(offset, len)| Op::Status { offset, len }),
    ]
}

fn pattern(seed: u8, len: u32) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8) | 1).collect()
}

async fn run_ops(device: Arc<dyn BlockDevice>, structured: bool, ops: Vec<Op>) {
    let srv = server(Arc::new(ExportTable::single("d", device)));
    let (mut c, task) = connect(&srv);
    let contexts: &[&str] = if structured { &["base:allocation"] } else { &[] };
    let (size, flags) = c.handshake(structured, contexts).await;
    assert_eq!(size, DEVICE_BYTES);
    assert_ne!(flags & proto::TFLAG_SEND_FLUSH, 0);
    let mut model = vec![0u8; DEVICE_BYTES as usize];
    for op in ops {
        match op {
            Op::Write { offset, len, seed, fua } => {
                let data = pattern(seed, len);
                assert_eq!(c.write(offset, &data, fua).await.error, 0);
                model[offset as usize..offset as usize + len as usize].copy_from_slice(&data);
            }
            Op::Read { offset, len } => {
                let r = c.read(offset, len).await;
                assert_eq!(r.error, 0);
                assert!(
                    r.data == model[offset as usize..offset as usize + len as usize],
                    "read {offset}+{len} differs"
                );
            }
            Op::Trim { offset, len } => {
                assert_eq!(c.request(0, proto::CMD_TRIM, offset, len, &[]).await.error, 0);
                // Our backends read trimmed ranges back as zeroes.
                model[offset as usize..offset as usize + len as usize].fill(0);
            }
            Op::Zero { offset, len, no_hole, fua } => {
                let mut f = 0;
                if no_hole {
                    f |= proto::CMD_FLAG_NO_HOLE;
                }
                if fua {
                    f |= proto::CMD_FLAG_FUA;
                }
                assert_eq!(c.request(f, proto::CMD_WRITE_ZEROES, offset, len, &[]).await.error, 0);
                model[offset as usize..offset as usize + len as usize].fill(0);
            }
            Op::Flush => assert_eq!(c.request(0, proto::CMD_FLUSH, 0, 0, &[]).await.error, 0),
            Op::Status { offset, len } => {
                if !structured {
                    continue;
                }
                let r = c.request(0, proto::CMD_BLOCK_STATUS, offset, len, &[]).await;
                assert_eq!(r.error, 0);
                assert_eq!(r.status.len(), 1);
                let mut pos = offset;
                for (i, (elen, eflags)) in r.status[0].1.iter().enumerate() {
                    assert!(*elen > 0);
                    if i + 1 < r.status[0].1.len() {
                        assert!(pos + (*elen as u64) < offset + len as u64, "non-final extents reach past the request");
                    }
                    let end = (pos + *elen as u64).min(DEVICE_BYTES);
                    if eflags & proto::STATE_ZERO != 0 {
                        assert!(model[pos as usize..end as usize].iter().all(|b| *b == 0), "claimed zero at {pos}");
                    }
                    pos = end;
                }
            }
        }
    }
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn memory_device_matches_model(structured in any::<bool>(), ops in prop::collection::vec(op(), 1..40)) {
        runtime().block_on(run_ops(Arc::new(MemoryDevice::new(DEVICE_BYTES)), structured, ops));
    }

    #[test]
    fn file_device_matches_model(structured in any::<bool>(), ops in prop::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let device = FileDevice::create(dir.path().join("disk"), DEVICE_BYTES).unwrap();
        runtime().block_on(run_ops(Arc::new(device), structured, ops));
    }
}
