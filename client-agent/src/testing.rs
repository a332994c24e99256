//! Test helpers: instrumented in-memory devices and volume descriptions over
//! them. Compiled only for tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use blockio::memory::MemoryDevice;
use blockio::{BlockDevice, IoError, MetaContext, StatusExtent, ZeroFlags};
use bytes::Bytes;
use tokio::sync::Semaphore;
use uuid::Uuid;
use volume_format::description::DeviceEndpoint;
use volume_format::metadata::{LogicalExtent, PhysicalExtent};
use volume_format::{DeviceIndex, VolumeDescription, VolumeId};

use crate::gate::Gate;
use crate::volume::{Layout, VolumeDevice};

pub const EXTENT: u64 = 64 * 1024;
pub const DEVICE_BYTES: u64 = 64 * EXTENT;

/// A memory device that counts operations, can fail reads, and can hold
/// writes until released (to keep I/O in flight on purpose).
pub struct TestDevice {
    pub mem: MemoryDevice,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub fail_reads: AtomicBool,
    /// When set, each write takes a permit first (tests add permits to release).
    pub write_gate: Option<Arc<Semaphore>>,
    /// Writes that reached the device (before waiting on `write_gate`).
    pub writes_started: AtomicU64,
}

impl TestDevice {
    pub fn new() -> Arc<TestDevice> {
        Arc::new(TestDevice::build(None))
    }

    pub fn holding_writes(gate: Arc<Semaphore>) -> Arc<TestDevice> {
        Arc::new(TestDevice::build(Some(gate)))
    }

    fn build(write_gate: Option<Arc<Semaphore>>) -> TestDevice {
        TestDevice {
            mem: MemoryDevice::new(DEVICE_BYTES),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
            write_gate,
            writes_started: AtomicU64::new(0),
        }
    }

    pub async fn contents(&self, offset: u64, len: u32) -> Bytes {
        self.mem.read(offset, len).await.unwrap()
    }
}

#[async_trait]
impl BlockDevice for TestDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(IoError::io("injected read failure"));
        }
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.write_gate {
            gate.acquire().await.unwrap().forget();
        }
        // As an NBD connection does right before sending.
        if blockio::client::send_deadline().is_some_and(|d| d.has_passed()) {
            return Err(IoError::new(blockio::IoErrorKind::Fenced, "not sent: the send deadline had passed"));
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.mem.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.mem.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.mem.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.mem.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, context: &MetaContext, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.mem.block_status(context, offset, len).await
    }
}

/// A description of a volume of `extents` extents with `legs` legs each over
/// `devices` devices: extent `e` leg `l` sits on device `(e + l) % devices`
/// at device offset `(8 + e) * EXTENT` — deliberately not the logical offset.
pub fn description(extents: u64, legs: u32, devices: u32, generation: u64) -> VolumeDescription {
    VolumeDescription {
        pool_uuid: Uuid::from_u128(7),
        volume: VolumeId(1),
        name: "vol".into(),
        size_bytes: extents * EXTENT,
        block_bytes: 4096,
        extent_bytes: EXTENT,
        mirror_legs: legs,
        layout_generation: generation,
        devices: (0..devices)
            .map(|i| DeviceEndpoint {
                index: DeviceIndex(i),
                device_uuid: Uuid::from_u128(100 + u128::from(i)),
                uri: format!("nbd+unix:///dev{i}?socket=/nonexistent/dev{i}.sock"),
                online: true,
                resyncing: false,
            })
            .collect(),
        extents: (0..extents)
            .map(|e| LogicalExtent {
                legs: (0..legs)
                    .map(|l| PhysicalExtent {
                        device: DeviceIndex(((e as u32) + l) % devices),
                        offset: (8 + e) * EXTENT,
                    })
                    .collect(),
            })
            .collect(),
        snapshot: None,
    }
}

/// Adds a snapshot of the whole volume with `chunk_bytes` chunks whose COW
/// area extent `e` sits on device `(e + 1 + l) % devices` at offset
/// `(40 + e) * EXTENT` (clear of the volume's extents).
pub fn with_snapshot(mut d: VolumeDescription, chunk_bytes: u64) -> VolumeDescription {
    let devices = d.devices.len() as u32;
    let cow_extents = (0..d.extents.len() as u64)
        .map(|e| LogicalExtent {
            legs: (0..d.mirror_legs)
                .map(|l| PhysicalExtent {
                    device: DeviceIndex(((e as u32) + 1 + l) % devices),
                    offset: (40 + e) * EXTENT,
                })
                .collect(),
        })
        .collect();
    d.snapshot = Some(volume_format::description::SnapshotEpoch {
        id: volume_format::SnapshotId(7),
        name: "snap".into(),
        size_bytes: d.size_bytes,
        chunk_bytes,
        cow_extents,
        cow: volume_format::metadata::CowMap::new(d.size_bytes.div_ceil(chunk_bytes)),
    });
    d.check().unwrap();
    d
}

/// Where logical `offset` of `description`'s extent leg `leg` lives: (device, device offset).
pub fn placement(d: &VolumeDescription, offset: u64, leg: usize) -> (usize, u64) {
    let extent = &d.extents[(offset / d.extent_bytes) as usize];
    let p = extent.legs[leg];
    (p.device.0 as usize, p.offset + offset % d.extent_bytes)
}

pub fn layout(d: VolumeDescription, devices: &[Arc<TestDevice>]) -> Arc<Layout> {
    Arc::new(Layout::new(d, |e| Ok::<_, String>(devices[e.index.0 as usize].clone() as Arc<dyn BlockDevice>)).unwrap())
}

/// A volume over fresh test devices: (volume, its devices).
pub fn volume(extents: u64, legs: u32, devices: u32, read_only: bool) -> (Arc<VolumeDevice>, Vec<Arc<TestDevice>>) {
    let devs: Vec<_> = (0..devices).map(|_| TestDevice::new()).collect();
    let d = description(extents, legs, devices, 1);
    let gate = Arc::new(Gate::new(layout(d, &devs), 1));
    (Arc::new(VolumeDevice::new("vol", 1, read_only, gate)), devs)
}

/// `len` bytes of a position-dependent pattern (so misplaced data shows).
pub fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed).collect::<Vec<u8>>().into()
}

/// An in-process NBD server on a unix socket; stops when dropped.
pub struct Served {
    pub uri: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.abort();
    }
}

/// Serves `device` as export `name` on a unix socket in `dir`.
pub fn serve(device: Arc<dyn BlockDevice>, dir: &std::path::Path, name: &str) -> Served {
    use blockio::server::{ExportTable, NbdServer, ServerConfig};
    let socket = dir.join(format!("{name}.sock"));
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = NbdServer::new(Arc::new(ExportTable::single(name, device)), ServerConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = server
            .serve_unix(listener, async move {
                let _ = stopped.await;
            })
            .await;
    });
    Served { uri: format!("nbd+unix:///{name}?socket={}", socket.display()), stop: Some(stop), task }
}

/// A memory device carrying a sanvol label for (`pool`, `device`).
pub fn labelled_device(pool: Uuid, device: Uuid, index: u32) -> Arc<MemoryDevice> {
    use volume_format::label::DeviceLayout;
    let layout = DeviceLayout::plan(DEVICE_BYTES, EXTENT, 4 * EXTENT).unwrap();
    let label = volume_format::DeviceLabel {
        pool_uuid: pool,
        device_uuid: device,
        device_index: DeviceIndex(index),
        layout,
        created_at_unix_secs: 0,
    };
    Arc::new(MemoryDevice::with_contents(DEVICE_BYTES, &label.encode()))
}

/// A scripted metadata server on a unix socket: real handshake, canned
/// answers, events injected by the test, every request reported.
pub mod fake_mds {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use control_client::framed;
    use control_client::handshake;
    use control_client::ControlAddr;
    use ed25519_dalek::SigningKey;
    use tokio::sync::mpsc;
    use volume_format::control::auth::Role;
    use volume_format::control::messages::{
        ClientMessage, ControlError, ErrorCode, OpenedHandle, Request, Response, ServerEvent, ServerMessage,
    };
    use volume_format::VolumeDescription;

    use crate::session::SessionConfig;

    pub struct FakeMds {
        pub addr: ControlAddr,
        pub server_key: SigningKey,
        pub agent_key: SigningKey,
        /// Every request the agent sent, in order.
        pub requests: mpsc::Receiver<Request>,
        /// Events to push to the connected agent.
        pub events: mpsc::Sender<ServerEvent>,
        /// Drops the current connection when sent to.
        pub hang_up: mpsc::Sender<()>,
        /// While set, replies to `Open` are held back (other requests are
        /// answered) until [`FakeMds::release_opens`]: an attach stuck at the server.
        pub hold_opens: Arc<std::sync::atomic::AtomicBool>,
        release: mpsc::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeMds {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[derive(Default)]
    struct Script {
        volumes: HashMap<String, VolumeDescription>,
        next_handle: u64,
    }

    impl FakeMds {
        /// Serves `volumes`; a volume named `busy` is refused as held by host-b.
        pub fn start(dir: &Path, volumes: Vec<VolumeDescription>, lease_ms: u64) -> FakeMds {
            let path = dir.join("mds.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let server_key = SigningKey::from_bytes(&[1; 32]);
            let agent_key = SigningKey::from_bytes(&[2; 32]);
            let script = Arc::new(Mutex::new(Script {
                volumes: volumes.into_iter().map(|v| (v.name.clone(), v)).collect(),
                next_handle: 10,
            }));
            let (req_tx, requests) = mpsc::channel(1024);
            let (events, mut ev_rx) = mpsc::channel::<ServerEvent>(64);
            let (hang_up, mut hang_rx) = mpsc::channel::<()>(4);
            let (release, mut release_rx) = mpsc::channel::<()>(4);
            let hold_opens = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let holding = hold_opens.clone();
            let key = server_key.clone();
            let task = tokio::spawn(async move {
                let mut session = 0;
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    session += 1;
                    let acceptor = handshake::Acceptor {
                        server_key: &key,
                        session,
                        lease_ms,
                        kind: volume_format::control::auth::ConnectionKind::Control,
                        mode_min: volume_format::control::auth::ChannelMode::Integrity,
                    };
                    let accepted = acceptor.accept(stream, |_| Some((vec![Role::Agent], "test-agent".into()))).await;
                    let Ok((stream, _)) = accepted else {
                        continue;
                    };
                    let (mut r, mut w) = tokio::io::split(stream);
                    let mut held = Vec::new();
                    loop {
                        tokio::select! {
                            msg = framed::read_message::<ClientMessage, _>(&mut r) => {
                                let Ok(msg) = msg else { break };
                                let _ = req_tx.try_send(msg.request.clone());
                                let is_open = matches!(msg.request, Request::Open { .. });
                                let result = answer(&script, msg.request, lease_ms);
                                let reply = ServerMessage::Reply { id: msg.id, result };
                                if is_open && holding.load(std::sync::atomic::Ordering::SeqCst) {
                                    held.push(reply);
                                    continue;
                                }
                                if framed::write_message(&mut w, &reply).await.is_err() {
                                    break;
                                }
                            }
                            Some(()) = release_rx.recv() => {
                                holding.store(false, std::sync::atomic::Ordering::SeqCst);
                                for reply in held.drain(..) {
                                    if framed::write_message(&mut w, &reply).await.is_err() {
                                        break;
                                    }
                                }
                            }
                            Some(event) = ev_rx.recv() => {
                                if framed::write_message(&mut w, &ServerMessage::Event(event)).await.is_err() {
                                    break;
                                }
                            }
                            _ = hang_up_recv(&mut hang_rx) => break,
                        }
                    }
                }
            });
            FakeMds {
                addr: ControlAddr::Unix(path),
                server_key,
                agent_key,
                requests,
                events,
                hang_up,
                hold_opens,
                release,
                task,
            }
        }

        pub fn session_config(&self) -> SessionConfig {
            SessionConfig {
                addr: self.addr.clone(),
                more_addrs: Vec::new(),
                key: self.agent_key.clone(),
                server_key: self.server_key.verifying_key(),
                name: "test-agent".into(),
                instance: [3; 16],
            }
        }

        /// Sends the held replies to `Open` and stops holding them.
        pub async fn release_opens(&self) {
            self.release.send(()).await.unwrap();
        }

        /// Waits (at most 10 s) for the next request matching `pred`, skipping others.
        pub async fn expect(&mut self, mut pred: impl FnMut(&Request) -> bool) -> Request {
            let wait = async {
                loop {
                    let r = self.requests.recv().await.expect("fake MDS stopped");
                    if pred(&r) {
                        return r;
                    }
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), wait)
                .await
                .expect("the agent never sent the expected request")
        }
    }

    async fn hang_up_recv(rx: &mut mpsc::Receiver<()>) {
        if rx.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    fn answer(script: &Mutex<Script>, request: Request, lease_ms: u64) -> Result<Response, ControlError> {
        let mut s = script.lock().unwrap();
        match request {
            Request::Renew | Request::PoolStatus => Ok(Response::Lease { lease_ms }),
            Request::Open { volume, .. } if volume == "busy" => Err(ControlError::new(
                ErrorCode::Conflict,
                "volume busy is open exclusive by host-b (handle 9); it can be opened once host-b closes it",
            )),
            Request::Open { volume, mode } => match s.volumes.get(&volume).cloned() {
                Some(description) => {
                    s.next_handle += 1;
                    Ok(Response::Opened(OpenedHandle {
                        handle: volume_format::HandleId(s.next_handle),
                        mode,
                        description,
                        lease_ms,
                        resume_key: Vec::new(),
                    }))
                }
                None => Err(ControlError::new(ErrorCode::NotFound, format!("volume {volume} does not exist"))),
            },
            Request::Close { .. } | Request::RecallDone { .. } => Ok(Response::Done),
            // The write-intent log of mirrored volumes: recorded, nothing to copy.
            Request::IntentRecord { .. } | Request::IntentResync { .. } => Ok(Response::IntentRecorded),
            // As the real server answers for a volume without a cache.
            Request::MirrorOpen { .. } => {
                Err(ControlError::new(ErrorCode::InvalidArgument, "the volume has no cache".to_string()))
            }
            other => Err(ControlError::new(ErrorCode::PermissionDenied, format!("{other:?} is for admins"))),
        }
    }
}
