//! The metadata server's side of fencing devices (`sanvol-target`, see
//! `volume_format::capability`): its own capability on every device
//! connection, and fence orders.
//!
//! Why the capability is installed once per process rather than passed
//! down: every device connection of the server (the metadata copies, the
//! disk lease, copies and zeroing, snapshot reads, the fallback data path)
//! is made through [`crate::pool::device::client_options`], and all of
//! them act for the server with the same key. The client presents the
//! capability only to devices that announce fencing, so plain NBD devices
//! see the plain export name as before.
//!
//! A fence order raises the minimum generation of a holder on one device
//! and returns once the target acknowledged it (no older connection of the
//! holder open, none of its requests running). A broken handle is fenced
//! for good ([`BROKEN`]): handle ids are never reused.
//!
//! Servers fence each other the same way, by their pool-lease generation
//! ([`ServerTerm`]): while active, a server's capability carries the
//! generation of the pool lease it holds (one more at every acquisition),
//! and a server taking the pool over raises [`Holder::Server`]'s minimum to
//! its own generation on every fencing device before it reads the metadata
//! ([`fence_previous_servers`]). A previous server that is merely paused
//! then finds its connections closed (whatever it had in flight finished
//! before the acknowledgement) and every new one refused: it presents its
//! old generation until it learns it lost the lease. Outside an active term
//! (standing by, starting, `pool init`) a capability carries
//! [`OUTSIDE_TERM_GENERATION`], above every lease generation, so a standby
//! can still read the pool and keep its lease sectors; which is why a
//! standby's capability names only the lease areas as writable: a task of
//! an ended term that reconnects under it can write nothing else. The lease
//! task always connects that way ([`with_lease_credential`]), so a fenced
//! server still reads the owner sector and learns that it lost the lease.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use blockio::client::{ClientOptions, ExportCredential, NbdClient};
use blockio::uri::NbdUri;
use blockio::BlockDevice;
use ed25519_dalek::SigningKey;
use volume_format::capability::{
    announces_fencing, Capability, FenceAck, FenceOrder, Holder, SignedCapability, SignedFenceOrder,
    CAPABILITY_LIFETIME_DEFAULT_SECS, CAPABILITY_RANGES_MAX, FENCE_ACK_BYTES, TARGET_DESCRIPTION_PREFIX,
};
use volume_format::label::ByteRange;
use volume_format::HandleId;

/// The minimum generation that fences a holder for good.
pub const BROKEN: u64 = u64::MAX;
/// The generation of a server capability made outside an active term (see
/// [`ServerTerm`]): above every pool-lease generation, below [`BROKEN`].
pub const OUTSIDE_TERM_GENERATION: u64 = u64::MAX - 1;
/// The generation of a handle's capabilities. A handle is fenced only for
/// good ([`BROKEN`]) and its id is never reused, so one generation is
/// enough: its capabilities are refused once it was fenced.
pub const HANDLE_GENERATION: u64 = 1;
/// Longest a fence order may wait for its acknowledgement: the target
/// waits for the holder's requests in flight, which a device bounds only by
/// its own timeouts.
pub const FENCE_ACK_TIMEOUT: Duration = Duration::from_secs(60);

static SERVER_KEY: OnceLock<Arc<SigningKey>> = OnceLock::new();
static SERVER_TERM: Mutex<ServerTerm> = Mutex::new(ServerTerm::Standby { lease_areas: Vec::new() });

/// What this process's server capability says, by where the process is in
/// its pool-lease terms. Read at every device connection, so a connection
/// made after a change carries the new term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTerm {
    /// Starting or standing by: [`OUTSIDE_TERM_GENERATION`], writable only
    /// in the lease areas (its host sector, the owner sector when it
    /// acquires); nothing at all before they are known.
    Standby { lease_areas: Vec<ByteRange> },
    /// Serving the pool under the pool lease of `generation`: the whole
    /// device, until a newer server fences it.
    Active { generation: u64 },
    /// `sanvol pool init` (no server serves the pool yet): the whole device,
    /// [`OUTSIDE_TERM_GENERATION`].
    Init,
}

impl ServerTerm {
    /// The capability this term gives, issued at `now_unix_secs`.
    pub fn capability(&self, now_unix_secs: u64) -> Capability {
        let whole = || vec![ByteRange::new(0, u64::MAX)];
        let (generation, writable) = match self {
            ServerTerm::Standby { lease_areas } => {
                let areas: Vec<(u64, u64)> = lease_areas.iter().map(|r| (r.start, r.len_bytes())).collect();
                (OUTSIDE_TERM_GENERATION, coalesce_ranges(&areas, CAPABILITY_RANGES_MAX))
            }
            ServerTerm::Active { generation } => (*generation, whole()),
            ServerTerm::Init => (OUTSIDE_TERM_GENERATION, whole()),
        };
        Capability {
            holder: Holder::Server,
            generation,
            device_uuid: None,
            writable,
            issued_unix_secs: now_unix_secs,
            expires_unix_secs: now_unix_secs + CAPABILITY_LIFETIME_DEFAULT_SECS,
        }
    }
}

/// Makes every device connection of this process present the server's
/// capability (signed with `key`) to fencing devices. The first key wins.
pub fn install(key: Arc<SigningKey>) {
    let _ = SERVER_KEY.set(key);
}

/// Sets what the server capability of connections made from now on says.
pub fn set_term(term: ServerTerm) {
    *SERVER_TERM.lock().unwrap_or_else(|e| e.into_inner()) = term;
}

/// What the server capability says now.
pub fn term() -> ServerTerm {
    SERVER_TERM.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn now_unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The server's capability in its current term ([`term`]).
pub fn server_capability(key: &SigningKey) -> SignedCapability {
    SignedCapability::sign(term().capability(now_unix_secs()), key)
}

/// A capability for `handle` on the device `device_uuid`, writable in
/// `ranges` (`(offset, length)`, sorted and merged; empty for a read-only
/// handle), valid a day from `now_unix_secs`. More ranges than a capability
/// names are coalesced across the smallest gaps (see [`coalesce_ranges`]).
pub fn handle_capability(
    key: &SigningKey,
    handle: HandleId,
    device_uuid: uuid::Uuid,
    ranges: &[(u64, u64)],
    now_unix_secs: u64,
) -> SignedCapability {
    SignedCapability::sign(
        Capability {
            holder: Holder::Handle(handle),
            generation: HANDLE_GENERATION,
            device_uuid: Some(device_uuid),
            writable: coalesce_ranges(ranges, CAPABILITY_RANGES_MAX),
            issued_unix_secs: now_unix_secs,
            expires_unix_secs: now_unix_secs + CAPABILITY_LIFETIME_DEFAULT_SECS,
        },
        key,
    )
}

/// `ranges` (`(offset, length)`, sorted, not overlapping) as at most `max`
/// byte ranges: when there are more, the smallest gaps between neighbours
/// are closed. Why not refuse: a volume of many scattered extents must
/// still be writable; the gaps closed are the least space another volume
/// can hold, and the timing rules still cover what lies in them.
pub fn coalesce_ranges(ranges: &[(u64, u64)], max: usize) -> Vec<ByteRange> {
    let mut out: Vec<ByteRange> = ranges.iter().map(|&(o, l)| ByteRange::new(o, o.saturating_add(l))).collect();
    if out.len() <= max.max(1) {
        return out;
    }
    // Close the (len - max) smallest gaps, in one pass.
    let mut gaps: Vec<(u64, usize)> =
        out.windows(2).enumerate().map(|(i, w)| (w[1].start.saturating_sub(w[0].end), i)).collect();
    gaps.sort_unstable();
    let mut close = vec![false; out.len()];
    for &(_, i) in gaps.iter().take(out.len() - max.max(1)) {
        close[i] = true;
    }
    let mut merged: Vec<ByteRange> = Vec::with_capacity(max);
    for (i, r) in out.drain(..).enumerate() {
        match merged.last_mut() {
            Some(last) if i > 0 && close[i - 1] => last.end = r.end,
            _ => merged.push(r),
        }
    }
    merged
}

/// `opts` with the server's credential, if one is installed: the
/// capability of the term the process is in when each connection is made.
pub fn with_server_credential(mut opts: ClientOptions) -> ClientOptions {
    if let Some(key) = SERVER_KEY.get().cloned() {
        opts.credential = Some(ExportCredential {
            description_prefix: TARGET_DESCRIPTION_PREFIX.to_string(),
            export_name: Arc::new(move |base: &str| server_capability(&key).export_name(base)),
        });
    }
    opts
}

/// `opts` with the server's credential for the lease areas only
/// ([`ServerTerm::Standby`]), whatever term the process is in: the lease
/// task's connections. Why not the term's: a server fenced by a newer one
/// must still read the owner sector to learn that it lost the lease and
/// stand by; the lease areas are kept by the lease's own rules.
pub fn with_lease_credential(mut opts: ClientOptions, lease_areas: Vec<ByteRange>) -> ClientOptions {
    if let Some(key) = SERVER_KEY.get().cloned() {
        let term = ServerTerm::Standby { lease_areas };
        opts.credential = Some(ExportCredential {
            description_prefix: TARGET_DESCRIPTION_PREFIX.to_string(),
            export_name: Arc::new(move |base: &str| {
                SignedCapability::sign(term.capability(now_unix_secs()), &key).export_name(base)
            }),
        });
    }
    opts
}

/// Why a fence order did not come back acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("device {uri}: {message}")]
    Device { uri: String, message: String },
    #[error("device {uri}: no acknowledgement within {} s (a request of the fenced holder is still running there)", .after.as_secs())]
    Timeout { uri: String, after: Duration },
}

/// Whether the device behind `uri` fences (its description says so).
pub async fn fences(uri: &NbdUri, timeout: Duration) -> Result<bool, FenceError> {
    let device_error = |message: String| FenceError::Device { uri: uri.to_string(), message };
    let opts = ClientOptions { connect_timeout: timeout, ..ClientOptions::default() };
    // A plain connection: a fencing target lets it in (no data) and says so.
    let client = tokio::time::timeout(timeout, NbdClient::connect(uri, opts))
        .await
        .map_err(|_| device_error(format!("no connection within {} ms", timeout.as_millis())))?
        .map_err(|e| device_error(e.to_string()))?;
    Ok(client.info().description.as_deref().is_some_and(announces_fencing))
}

/// Raises `holder`'s minimum generation on the device behind `uri` and
/// waits for the acknowledgement.
pub async fn fence(
    uri: &NbdUri,
    key: &SigningKey,
    holder: Holder,
    min_generation: u64,
) -> Result<FenceAck, FenceError> {
    let device_error = |message: String| FenceError::Device { uri: uri.to_string(), message };
    let order = FenceOrder { holder, min_generation, device_uuid: None, issued_unix_secs: now_unix_secs() };
    let name = SignedFenceOrder::sign(order, key).export_name(&uri.export);
    let opts = ClientOptions {
        connect_timeout: crate::pool::device::CONNECT_TIMEOUT,
        request_timeout: Some(FENCE_ACK_TIMEOUT),
        ..ClientOptions::default()
    };
    let waited = async {
        let client = NbdClient::connect(&uri.with_export(name), opts).await.map_err(|e| device_error(e.to_string()))?;
        let block = client.read(0, FENCE_ACK_BYTES).await.map_err(|e| device_error(e.to_string()))?;
        let ack = FenceAck::decode(&block).map_err(|e| device_error(e.to_string()))?;
        if ack.holder != holder || ack.min_generation < min_generation {
            return Err(device_error(format!(
                "acknowledged {} ≥ {}, not the order sent",
                ack.holder, ack.min_generation
            )));
        }
        Ok(ack)
    };
    tokio::time::timeout(FENCE_ACK_TIMEOUT + crate::pool::device::CONNECT_TIMEOUT, waited)
        .await
        .map_err(|_| FenceError::Timeout { uri: uri.to_string(), after: FENCE_ACK_TIMEOUT })?
}

/// Longest the probe of a device (does it fence?) may take: a device the
/// server cannot reach is skipped (see [`fence_everywhere`]), and an open
/// that breaks a handle waits for it.
pub const FENCE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Devices probed and fenced at once.
pub const FENCE_PARALLEL_MAX: usize = 16;

/// Fences `holder` for good on every device of `uris` that fences, each
/// bounded, [`FENCE_PARALLEL_MAX`] at a time. Plain devices are skipped (the
/// timing rules cover them), and so are devices the server cannot reach
/// now (the timing rules, which have already run out when a handle is
/// broken, are what covers them — as for a plain device). A device that
/// fences and does not acknowledge fails the whole. Returns the devices
/// fenced.
pub async fn fence_everywhere(uris: &[String], key: &SigningKey, holder: Holder) -> Result<Vec<String>, String> {
    use futures::stream::{self, StreamExt};
    // Each future owns what it uses (a stream of borrowing futures is not
    // `Send` for every lifetime the job's task needs).
    let each = uris.iter().cloned().map(|uri| {
        let key = key.clone();
        fence_one(uri, key, holder)
    });
    let results: Vec<_> = stream::iter(each).buffer_unordered(FENCE_PARALLEL_MAX).collect().await;
    let mut fenced = Vec::new();
    for r in results {
        if let Some(uri) = r? {
            fenced.push(uri);
        }
    }
    Ok(fenced)
}

/// Fences `holder` on one device if it fences (see [`fence_everywhere`]).
async fn fence_one(uri: String, key: SigningKey, holder: Holder) -> Result<Option<String>, String> {
    let parsed: NbdUri = uri.parse().map_err(|e| format!("device {uri}: bad URI: {e}"))?;
    match fences(&parsed, FENCE_PROBE_TIMEOUT).await {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) => {
            tracing::warn!(%holder, device = %uri, error = %e, "cannot tell whether the device fences; the timing rules cover it");
            return Ok(None);
        }
    }
    fence(&parsed, &key, holder, BROKEN).await.map_err(|e| e.to_string())?;
    Ok(Some(uri))
}

/// One device of the pool as a server taking the pool over sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeoverDevice {
    pub uri: String,
    /// Whether it fences, as the pool metadata records it (`None`: not
    /// recorded, e.g. a pool of format 9).
    pub recorded_fencing: Option<bool>,
    /// Whether the pool uses it now (online or resyncing), rather than
    /// counting it failed.
    pub in_use: bool,
}

/// What a takeover does about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeoverStep {
    /// Fence the previous servers there (the device fences).
    Fence,
    /// Nothing to fence: the lease's wait for the longest device request
    /// (timing rules) covers it. Says why, for the log.
    TimingRules(String),
    /// The takeover cannot go on: the device is one the pool counts on
    /// to fence and it cannot be reached.
    Block(String),
}

/// The step for `device`, given what probing it found (`Ok(fences)`, or why
/// it could not be asked). A device recorded as plain is not probed.
pub fn takeover_step(device: &TakeoverDevice, probed: Result<bool, String>) -> TakeoverStep {
    match (probed, device.recorded_fencing) {
        (Ok(true), _) => TakeoverStep::Fence,
        (Ok(false), Some(true)) => TakeoverStep::TimingRules(
            "recorded as fencing but now answers as a plain NBD server; only the timing rules cover it".into(),
        ),
        (Ok(false), _) => TakeoverStep::TimingRules("a plain NBD server".into()),
        (Err(e), Some(true)) if device.in_use => TakeoverStep::Block(format!(
            "device {} fences but cannot be reached to fence the previous metadata server ({e}); this server takes \
             the pool over once it can (bring the device back, or remove it from the pool from a server that serves it)",
            device.uri
        )),
        (Err(e), Some(true)) => {
            TakeoverStep::TimingRules(format!("a failed device that cannot be reached now ({e}); the timing rules cover it"))
        }
        (Err(e), _) => TakeoverStep::TimingRules(format!(
            "cannot tell whether it fences ({e}; not recorded); the timing rules cover it"
        )),
    }
}

/// Fences every previous metadata server of the pool (every server
/// capability below `generation`, this server's pool-lease generation) on
/// each device of `devices` that fences, [`FENCE_PARALLEL_MAX`] at a time,
/// and returns the devices fenced once each acknowledged: nothing a previous
/// server sent there is still in flight, and nothing more of it gets in.
/// Fails if a device the pool counts on to fence cannot be reached or does
/// not acknowledge ([`takeover_step`]): the server must not read or commit
/// the metadata then.
pub async fn fence_previous_servers(
    devices: &[TakeoverDevice],
    key: &SigningKey,
    generation: u64,
) -> Result<Vec<String>, String> {
    use futures::stream::{self, StreamExt};
    let each = devices.iter().cloned().map(|device| {
        let key = key.clone();
        async move {
            let probed = match device.recorded_fencing {
                Some(false) => Ok(false),
                _ => match device.uri.parse::<NbdUri>() {
                    Ok(uri) => fences(&uri, FENCE_PROBE_TIMEOUT).await.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("bad URI: {e}")),
                },
            };
            match takeover_step(&device, probed) {
                TakeoverStep::Fence => {
                    let uri: NbdUri = device.uri.parse().map_err(|e| format!("device {}: bad URI: {e}", device.uri))?;
                    fence(&uri, &key, Holder::Server, generation).await.map_err(|e| {
                        format!(
                            "fencing the previous metadata server on {}: {e}; this server retries the takeover",
                            device.uri
                        )
                    })?;
                    Ok(Some(device.uri))
                }
                TakeoverStep::TimingRules(why) => {
                    tracing::debug!(device = %device.uri, "not fenced at takeover: {why}");
                    Ok(None)
                }
                TakeoverStep::Block(why) => Err(why),
            }
        }
    });
    let results: Vec<Result<Option<String>, String>> =
        stream::iter(each).buffer_unordered(FENCE_PARALLEL_MAX).collect().await;
    let mut fenced = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(Some(uri)) => fenced.push(uri),
            Ok(None) => {}
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        fenced.sort();
        Ok(fenced)
    } else {
        Err(failed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_beyond_the_most_a_capability_names_are_coalesced_across_the_smallest_gaps() {
        let ranges = [(0, 10), (12, 10), (100, 10), (111, 10), (500, 10)];
        let r = |s, e| ByteRange::new(s, e);
        assert_eq!(coalesce_ranges(&ranges, 8), vec![r(0, 10), r(12, 22), r(100, 110), r(111, 121), r(500, 510)]);
        assert_eq!(coalesce_ranges(&ranges, 3), vec![r(0, 22), r(100, 121), r(500, 510)]);
        assert_eq!(coalesce_ranges(&ranges, 1), vec![r(0, 510)]);
        let many: Vec<(u64, u64)> = (0..1000).map(|i| (i * 100, 10)).collect();
        let merged = coalesce_ranges(&many, CAPABILITY_RANGES_MAX);
        assert_eq!(merged.len(), CAPABILITY_RANGES_MAX);
        assert!(
            many.iter().all(|&(o, l)| merged.iter().any(|m| m.start <= o && o + l <= m.end)),
            "every range covered"
        );
    }

    #[test]
    fn an_active_term_writes_everywhere_and_a_standby_only_in_the_lease_areas_above_every_term() {
        let active = ServerTerm::Active { generation: 7 }.capability(100);
        assert_eq!((active.holder, active.generation), (Holder::Server, 7));
        assert_eq!(active.writable, vec![ByteRange::new(0, u64::MAX)]);
        assert_eq!(active.expires_unix_secs, 100 + CAPABILITY_LIFETIME_DEFAULT_SECS);
        let areas = vec![ByteRange::new(1 << 20, (1 << 20) + 65536), ByteRange::new(3 << 20, (3 << 20) + 65536)];
        let standby = ServerTerm::Standby { lease_areas: areas.clone() }.capability(100);
        assert_eq!(standby.writable, areas, "a task of an ended term writes nothing but lease sectors");
        assert!(standby.generation > 1 << 40 && standby.generation < BROKEN, "never below a fence of an active term");
        let starting = ServerTerm::Standby { lease_areas: Vec::new() }.capability(100);
        assert!(starting.writable.is_empty(), "before the lease areas are known: read only");
        let init = ServerTerm::Init.capability(100);
        assert_eq!((init.generation, init.writable), (OUTSIDE_TERM_GENERATION, vec![ByteRange::new(0, u64::MAX)]));
    }

    #[test]
    fn a_takeover_fences_what_fences_and_waits_for_a_fencing_device_it_cannot_reach() {
        let device = |recorded_fencing, in_use| TakeoverDevice { uri: "nbd://d".into(), recorded_fencing, in_use };
        let down = || Err("connection refused".to_string());
        assert_eq!(takeover_step(&device(Some(true), true), Ok(true)), TakeoverStep::Fence);
        assert_eq!(takeover_step(&device(None, true), Ok(true)), TakeoverStep::Fence, "learned by the probe");
        let blocked = takeover_step(&device(Some(true), true), down());
        assert!(
            matches!(&blocked, TakeoverStep::Block(why) if why.contains("nbd://d") && why.contains("connection refused")),
            "{blocked:?}"
        );
        for (recorded, in_use, probed) in [
            (Some(true), false, down()),
            (None, true, down()),
            (None, true, Ok(false)),
            (Some(false), true, Ok(false)),
            (Some(true), true, Ok(false)),
        ] {
            let step = takeover_step(&device(recorded, in_use), probed);
            assert!(matches!(step, TakeoverStep::TimingRules(_)), "{recorded:?} {in_use}: {step:?}");
        }
    }
}
