//! Full and incremental backups against an in-process NBD server playing
//! the backup pseudo-device, restores to fresh exports and to a real
//! nbdkit, and every way a repository can be damaged.

mod common;

use std::collections::BTreeSet;
use std::fs;

use backup::progress::ProgressMode;
use backup::repo::Kind;
use backup::verify::{self, Depth};
use backup::{SnapshotRef, Source};
use blockio::client::{ClientOptions, NbdClient};
use blockio::BlockDevice;
use common::*;

fn snap(s: &str) -> SnapshotRef {
    s.parse().unwrap()
}

async fn full(fx: &Fixture, name: &str, repo: &std::path::Path) -> backup::BackupSummary {
    backup::full(&fx.source(), &snap(name), repo, false, &quiet()).await.unwrap()
}

async fn incr(fx: &Fixture, name: &str, since: &str, repo: &std::path::Path) -> anyhow::Result<backup::BackupSummary> {
    backup::incremental(&fx.source(), &snap(name), since, repo, &quiet()).await
}

fn check(repo: &std::path::Path) -> verify::Report {
    verify::check(repo, None, Depth::Data, ProgressMode::Quiet).unwrap()
}

/// Chunks touched by a device's recorded reads.
fn chunks_read(reads: &[(u64, u32)]) -> BTreeSet<u64> {
    reads.iter().flat_map(|&(o, l)| o / CHUNK..(o + l as u64).div_ceil(CHUNK)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backup_restores_byte_for_byte_and_skips_holes_and_zeroes() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");
    let s = full(&fx, "vol@s1", &repo).await;
    let m = &s.manifest;
    assert_eq!((m.kind, m.volume.as_str(), m.snapshot.as_str(), m.size_bytes), (Kind::Full, "vol", "s1", SIZE));
    // Data: chunks 0..8, 20..40, 50 and the short last one; everything
    // else (holes, and the written zeroes in 16..20) is a zero chunk.
    assert_eq!(m.data_chunks, 8 + 20 + 1 + 1);
    assert_eq!(m.zero_chunks, 65 - 30);
    assert_eq!(m.data_bytes, 29 * CHUNK + (SIZE - 64 * CHUNK));
    // Holes are never read.
    let read = chunks_read(&fx.s1.reads());
    for hole in (8..16).chain(40..50).chain(51..64) {
        assert!(!read.contains(&hole), "chunk {hole} is a hole but was read");
    }
    assert!(s.path.starts_with(&repo) && s.path.file_name().unwrap() == "000001-full-s1");

    let target = fx.target("restore", SIZE);
    let r = backup::restore(&repo, &fx.target_uri("restore"), None, &quiet()).await.unwrap();
    assert_eq!(r.backups_applied, 1);
    assert_eq!(r.data_bytes, m.data_bytes);
    assert!(target.contents().await == fx.s1_model, "restored bytes differ from vol@s1");
    assert!(check(&repo).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_plus_incremental_restores_the_newer_snapshot_and_upto_the_older() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");
    full(&fx, "vol@s1", &repo).await;
    let s = incr(&fx, "vol@s2", "s1", &repo).await.unwrap();
    assert_eq!(s.manifest.kind, Kind::Incremental);
    assert_eq!(s.manifest.since.as_deref(), Some("s1"));
    assert_eq!(s.path.file_name().unwrap(), "000002-incr-s2");

    let t2 = fx.target("t2", SIZE);
    let r = backup::restore(&repo, &fx.target_uri("t2"), None, &quiet()).await.unwrap();
    assert_eq!(r.backups_applied, 2);
    assert!(t2.contents().await == fx.s2_model, "restore of the chain differs from vol@s2");

    // A target that already holds other bytes is overwritten everywhere,
    // zero chunks included.
    let t1 = fx.target("t1", SIZE + CHUNK);
    t1.mem.write(0, bytes::Bytes::from(vec![0xEE; (SIZE + CHUNK) as usize]), false).await.unwrap();
    let r = backup::restore(&repo, &fx.target_uri("t1"), Some("s1"), &quiet()).await.unwrap();
    assert_eq!(r.backups_applied, 1);
    let got = t1.contents().await;
    assert!(got[..SIZE as usize] == fx.s1_model[..], "restore --upto s1 differs from vol@s1");
    assert!(got[SIZE as usize..].iter().all(|&b| b == 0xEE), "bytes past the snapshot's size were touched");

    let e = backup::restore(&repo, &fx.target_uri("t1"), Some("s9"), &quiet()).await.unwrap_err();
    assert!(format!("{e:#}").contains("no readable backup of snapshot \"s9\""), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_reads_only_the_changed_chunks() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");
    full(&fx, "vol@s1", &repo).await;
    fx.s2.clear_reads();
    let s = incr(&fx, "vol@s2", "s1", &repo).await.unwrap();
    let read = chunks_read(&fx.s2.reads());
    let changed: BTreeSet<u64> = S2_CHANGED.into_iter().collect();
    assert!(read.is_subset(&changed), "read chunks {read:?}, only {changed:?} changed");
    let bytes: u64 = fx.s2.reads().iter().map(|&(_, l)| l as u64).sum();
    assert_eq!(bytes, s.manifest.bytes_read);
    assert_eq!(bytes, 6 * CHUNK + (SIZE - 64 * CHUNK), "every changed chunk read exactly once");
    assert_eq!(s.chunks_considered, 7);
    // Chunk 21 was overwritten with zeroes: a zero entry, so restore zeroes it.
    assert_eq!((s.manifest.data_chunks, s.manifest.zero_chunks), (6, 1));
    assert!(fx.s1.reads().len() > 1, "the full backup read vol@s1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coarse_changed_block_list_still_restores_exactly() {
    // 256 KiB granularity: the list names more than what changed.
    let fx = Fixture::start_with(4 * CHUNK).await;
    let repo = fx.repo("repo");
    full(&fx, "vol@s1", &repo).await;
    let s = incr(&fx, "vol@s2", "s1", &repo).await.unwrap();
    assert!(s.chunks_considered > 7);
    let t = fx.target("t", SIZE);
    backup::restore(&repo, &fx.target_uri("t"), None, &quiet()).await.unwrap();
    assert!(t.contents().await == fx.s2_model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_volume_is_backed_up_past_its_old_end() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");
    full(&fx, "vol@s1", &repo).await;
    incr(&fx, "vol@s2", "s1", &repo).await.unwrap();
    fx.s3.clear_reads();
    let s = incr(&fx, "vol@s3", "s2", &repo).await.unwrap();
    assert_eq!(s.manifest.size_bytes, SIZE3);
    // Chunk 5 changed; the old short last chunk (64) and everything after
    // it are new, though the changed-block list does not name them.
    let read = chunks_read(&fx.s3.reads());
    let want: BTreeSet<u64> = std::iter::once(5).chain(64..SIZE3.div_ceil(CHUNK)).collect();
    assert_eq!(read, want);

    let small = fx.target("small", SIZE);
    let e = backup::restore(&repo, &fx.target_uri("small"), None, &quiet()).await.unwrap_err();
    assert!(format!("{e:#}").contains("smaller than the snapshot vol@s3"), "{e:#}");
    assert_eq!(small.writes(), 0);

    let t = fx.target("t", SIZE3);
    backup::restore(&repo, &fx.target_uri("t"), None, &quiet()).await.unwrap();
    assert!(t.contents().await == fx.s3_model, "restore of the grown volume differs from vol@s3");
    let t2 = fx.target("t2", SIZE);
    backup::restore(&repo, &fx.target_uri("t2"), Some("s2"), &quiet()).await.unwrap();
    assert!(t2.contents().await == fx.s2_model);
}

/// Makes full s1 + incremental s2; returns the repository.
async fn chain(fx: &Fixture) -> std::path::PathBuf {
    let repo = fx.repo("repo");
    full(fx, "vol@s1", &repo).await;
    incr(fx, "vol@s2", "s1", &repo).await.unwrap();
    assert!(check(&repo).is_ok());
    repo
}

fn problems(r: &verify::Report) -> String {
    r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_a_flipped_byte_in_the_data() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let data = backup_dir(&repo, "000002").join("data.bin");
    let mut bytes = fs::read(&data).unwrap();
    // The second data chunk of the incremental is chunk 9.
    bytes[CHUNK as usize + 17] ^= 0x40;
    fs::write(&data, bytes).unwrap();
    let r = check(&repo);
    assert!(!r.is_ok());
    assert_eq!(r.problems.len(), 1, "{}", problems(&r));
    let p = &r.problems[0];
    assert_eq!((p.backup.as_deref(), p.chunk), (Some("000002-incr-s2"), Some(9)), "{p}");
    assert!(p.to_string().contains("damaged data"), "{p}");
    // Structure-only checks do not read data, so they pass.
    assert!(verify::check(&repo, None, Depth::Structure, ProgressMode::Quiet).unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_a_truncated_data_file() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let data = backup_dir(&repo, "000001").join("data.bin");
    let len = fs::metadata(&data).unwrap().len();
    fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(len - 3 * CHUNK - 5).unwrap();
    let r = check(&repo);
    let text = problems(&r);
    assert!(text.contains("backup 000001-full-s1: data.bin is truncated"), "{text}");
    assert!(r.problems.iter().any(|p| p.chunk.is_some() && p.message.contains("ends inside this chunk")), "{text}");
    let e = incr(&fx, "vol@s2", "s1", &fx.repo("repo")).await.unwrap_err();
    assert!(format!("{e:#}").contains("damaged"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_a_modified_index() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let index = backup_dir(&repo, "000002").join("index.bin");
    let mut bytes = fs::read(&index).unwrap();
    // The first entry's chunk number.
    bytes[16] ^= 1;
    fs::write(&index, &bytes).unwrap();
    let r = check(&repo);
    let text = problems(&r);
    assert!(text.contains("backup 000002-incr-s2: index.bin is damaged or altered"), "{text}");
    // Cut short instead: the size no longer matches the manifest.
    bytes[16] ^= 1;
    fs::write(&index, &bytes[..bytes.len() - 32]).unwrap();
    let text = problems(&check(&repo));
    assert!(text.contains("index.bin has"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_a_missing_or_garbled_manifest() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let manifest = backup_dir(&repo, "000001").join("manifest.json");
    let original = fs::read(&manifest).unwrap();
    fs::remove_file(&manifest).unwrap();
    let text = problems(&check(&repo));
    assert!(text.contains("backup 000001-full-s1: manifest.json is missing"), "{text}");

    for garbage in [&b""[..], b"{", b"[1,2]", b"\xff\xfe", &original[..original.len() / 2]] {
        fs::write(&manifest, garbage).unwrap();
        let r = check(&repo);
        assert!(r.problems.iter().any(|p| p.backup.as_deref() == Some("000001-full-s1")), "{}", problems(&r));
    }
    // An edit that keeps the JSON valid is caught by the manifest checksum.
    let edited = String::from_utf8(original.clone()).unwrap().replace("\"snapshot\": \"s1\"", "\"snapshot\": \"s0\"");
    assert_ne!(edited.as_bytes(), &original[..]);
    fs::write(&manifest, edited).unwrap();
    let text = problems(&check(&repo));
    assert!(text.contains("altered or damaged"), "{text}");
    // Deleting a whole backup breaks the chain.
    fs::write(&manifest, &original).unwrap();
    assert!(check(&repo).is_ok());
    fs::remove_dir_all(backup_dir(&repo, "000001")).unwrap();
    let text = problems(&check(&repo));
    assert!(text.contains("backup #1 is missing"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_damaged_chain_and_writes_nothing() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let data = backup_dir(&repo, "000002").join("data.bin");
    let mut bytes = fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&data, bytes).unwrap();
    let target = fx.target("t", SIZE);
    let e = backup::restore(&repo, &fx.target_uri("t"), None, &quiet()).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("refusing to restore") && msg.contains("000002-incr-s2") && msg.contains("chunk 64"), "{msg}");
    assert!(msg.contains("nothing was written"), "{msg}");
    assert_eq!(target.writes(), 0, "a damaged chain must not be restored");
    // The undamaged prefix can still be restored.
    backup::restore(&repo, &fx.target_uri("t"), Some("s1"), &quiet()).await.unwrap();
    assert!(target.contents().await == fx.s1_model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_target_smaller_than_the_snapshot() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let target = fx.target("small", SIZE - 4096);
    let e = backup::restore(&repo, &fx.target_uri("small"), None, &quiet()).await.unwrap_err();
    assert!(format!("{e:#}").contains("smaller than the snapshot vol@s2"), "{e:#}");
    assert_eq!(target.writes(), 0);
    let e = backup::restore(&repo, &fx.target_uri("vol@s1"), None, &quiet()).await.unwrap_err();
    assert!(format!("{e:#}").contains("read-only"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_refuses_a_broken_chain_link() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");
    let e = incr(&fx, "vol@s2", "s1", &repo).await.unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
    full(&fx, "vol@s1", &repo).await;
    let e = incr(&fx, "vol@s2", "s0", &repo).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("the newest backup in") && format!("{e:#}").contains("is of vol@s1, not of vol@s0"),
        "{e:#}"
    );
    let e = incr(&fx, "other@s2", "s1", &repo).await.unwrap_err();
    assert!(format!("{e:#}").contains("not of other@s1"), "{e:#}");
    let e = incr(&fx, "vol@s1", "s1", &repo).await.unwrap_err();
    assert!(format!("{e:#}").contains("is the snapshot being backed up"), "{e:#}");
    // s3's changed-block list is relative to s2, not s1.
    let e = incr(&fx, "vol@s3", "s1", &repo).await.unwrap_err();
    assert!(format!("{e:#}").contains("does not offer the changed-block list sanvol:changed-since:s1"), "{e:#}");
    // Nothing was added, nothing left behind.
    let names: Vec<String> =
        fs::read_dir(&repo).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, [".lock", "000001-full-s1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_refuses_a_used_repository_unless_forced() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let e = backup::full(&fx.source(), &snap("vol@s2"), &repo, false, &quiet()).await.unwrap_err();
    assert!(format!("{e:#}").contains("already holds a backup chain"), "{e:#}");
    let s = backup::full(&fx.source(), &snap("vol@s2"), &repo, true, &quiet()).await.unwrap();
    assert_eq!(s.manifest.sequence, 1);
    let mut names: Vec<String> =
        fs::read_dir(&repo).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, [".lock", "000001-full-s2"]);
    let t = fx.target("t", SIZE);
    backup::restore(&repo, &fx.target_uri("t"), None, &quiet()).await.unwrap();
    assert!(t.contents().await == fx.s2_model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backup_is_invisible_and_cleaned_up() {
    let fx = Fixture::start().await;
    let repo = fx.repo("repo");
    full(&fx, "vol@s1", &repo).await;
    // What a killed backup leaves: a temp dir with partial files.
    let tmp = repo.join(".tmp-3f2a");
    fs::create_dir(&tmp).unwrap();
    fs::write(tmp.join("data.bin"), vec![1u8; 1000]).unwrap();
    fs::write(tmp.join("index.bin"), b"SVBKIDX1").unwrap();
    let r = check(&repo);
    assert!(r.is_ok() && r.statuses.len() == 1, "{}", problems(&r));
    incr(&fx, "vol@s2", "s1", &repo).await.unwrap();
    assert!(!tmp.exists(), "the next backup removes interrupted ones");
    // A failing source leaves nothing either.
    let bad = Source::Uri(blockio::uri::NbdUri::unix(fx.dir.path().join("nobody.sock"), ""));
    let e = backup::incremental(&bad, &snap("vol@s3"), "s2", &repo, &quiet()).await.unwrap_err();
    assert!(format!("{e:#}").contains("opening snapshot vol@s3"), "{e:#}");
    let leftovers: Vec<_> = fs::read_dir(&repo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

async fn restore_to_nbdkit(fx: &Fixture, repo: &std::path::Path, kit: &Nbdkit) {
    // Start from other bytes, so zero chunks must really be written.
    let client = NbdClient::connect(&kit.uri(), ClientOptions::default()).await.unwrap();
    client.write(0, bytes::Bytes::from(vec![0xEE; 8 << 20]), false).await.unwrap();
    client.flush().await.unwrap();
    let r = backup::restore(repo, &kit.uri(), None, &quiet()).await.unwrap();
    assert_eq!(r.backups_applied, 2);
    let got = client.read(0, SIZE as u32).await.unwrap();
    assert!(got[..] == fx.s2_model[..], "nbdkit holds other bytes than vol@s2");
    let rest = client.read(SIZE, (8 << 20) - SIZE as u32).await.unwrap();
    assert!(rest.iter().all(|&b| b == 0xEE), "bytes past the snapshot's size were touched");
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_real_nbdkit_export() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    restore_to_nbdkit(&fx, &repo, &Nbdkit::memory(8 << 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_an_export_without_write_zeroes_writes_zeroes() {
    let fx = Fixture::start().await;
    let repo = chain(&fx).await;
    let kit = Nbdkit::start(&["--filter=nozero", "memory", "8M", "zeromode=none"]);
    let probe = NbdClient::connect(&kit.uri(), ClientOptions::default()).await.unwrap();
    assert_eq!(
        probe.info().transmission_flags & blockio::proto::TFLAG_SEND_WRITE_ZEROES,
        0,
        "nozero still offers WRITE_ZEROES"
    );
    probe.disconnect().await;
    restore_to_nbdkit(&fx, &repo, &kit).await;
}
