//! Device-defined metadata contexts (how the backup pseudo-device exposes
//! its changed-block list): listed, selectable, and answered with one
//! block-status chunk per selected context.

mod server_common;

use std::sync::Arc;

use async_trait::async_trait;
use blockio::memory::MemoryDevice;
use blockio::proto;
use blockio::server::ExportTable;
use blockio::{BlockDevice, IoError, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use server_common::{connect, server, RawClient};

const CHANGED: &str = "x-sanvol:changed";

/// Memory device that also answers `x-sanvol:changed`: the first 8 KiB
/// "changed" (flag 1), the rest not.
struct Tracked(MemoryDevice);

#[async_trait]
impl BlockDevice for Tracked {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn meta_contexts(&self) -> Vec<String> {
        vec![CHANGED.to_string()]
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.0.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.0.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, ctx: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        match ctx {
            MetaContext::Custom(name) if name == CHANGED => {
                let end = offset + len as u64;
                let mut out = Vec::new();
                if offset < 8192 {
                    out.push(StatusExtent { length: 8192 - offset, flags: 1 });
                }
                let from = offset.max(8192);
                if end > from {
                    out.push(StatusExtent { length: self.size() - from, flags: 0 });
                }
                Ok(out)
            }
            _ => self.0.block_status(ctx, offset, len).await,
        }
    }
}

fn names(r: &[server_common::OptReply]) -> Vec<(u32, String)> {
    r.iter()
        .filter(|r| r.reply_type == proto::REP_META_CONTEXT)
        .map(|r| {
            (u32::from_be_bytes(r.data[0..4].try_into().unwrap()), String::from_utf8(r.data[4..].to_vec()).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn custom_contexts_are_listed_selected_and_answered() {
    let device = Arc::new(Tracked(MemoryDevice::new(1 << 20)));
    let (mut c, task) = connect(&server(Arc::new(ExportTable::single("snap", device))));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    c.structured_reply().await;
    let all = c.option(proto::OPT_LIST_META_CONTEXT, &RawClient::meta_data("snap", &[])).await;
    assert_eq!(names(&all), [(0, "base:allocation".to_string()), (0, CHANGED.to_string())]);
    let ns = c.option(proto::OPT_LIST_META_CONTEXT, &RawClient::meta_data("snap", &["x-sanvol:"])).await;
    assert_eq!(names(&ns), [(0, CHANGED.to_string())]);
    let set = c
        .option(
            proto::OPT_SET_META_CONTEXT,
            &RawClient::meta_data("snap", &[CHANGED, "base:allocation", "x-sanvol:nope"]),
        )
        .await;
    let selected = names(&set);
    assert_eq!(selected.len(), 2);
    assert_ne!(selected[0].0, selected[1].0, "context ids must be unique");
    let id_of = |name: &str| selected.iter().find(|(_, n)| n == name).unwrap().0;
    c.go("snap").await.unwrap();

    let r = c.request(0, proto::CMD_BLOCK_STATUS, 4096, 65536, &[]).await;
    assert_eq!(r.error, 0);
    let mut status = r.status.clone();
    status.sort();
    let mut expected = vec![
        (id_of(CHANGED), vec![(4096, 1), ((1 << 20) - 8192, 0)]),
        (id_of("base:allocation"), vec![(65536, proto::STATE_HOLE | proto::STATE_ZERO)]),
    ];
    expected.sort();
    assert_eq!(status, expected);

    // REQ_ONE: exactly one extent per context, no longer than asked.
    let one = c.request(proto::CMD_FLAG_REQ_ONE, proto::CMD_BLOCK_STATUS, 8192, 1000, &[]).await;
    assert_eq!(one.status.len(), 2);
    for (id, extents) in &one.status {
        let flags = if *id == id_of(CHANGED) { 0 } else { proto::STATE_HOLE | proto::STATE_ZERO };
        assert_eq!(extents, &vec![(1000, flags)]);
    }
    c.disconnect().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn contexts_selected_for_another_export_do_not_carry_over() {
    let table = ExportTable::single("a", Arc::new(MemoryDevice::new(1 << 20)));
    table.insert(blockio::server::Export::new("b", Arc::new(MemoryDevice::new(1 << 20))));
    let (mut c, _task) = connect(&server(Arc::new(table)));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.structured_reply().await;
    let set = c.option(proto::OPT_SET_META_CONTEXT, &RawClient::meta_data("a", &["base:allocation"])).await;
    assert_eq!(names(&set).len(), 1);
    c.go("b").await.unwrap();
    assert_eq!(c.request(0, proto::CMD_BLOCK_STATUS, 0, 4096, &[]).await.error, proto::errno::EINVAL);
}
