//! Where a volume's bytes live: the one answer to "which device, which
//! offset, which legs" for the agent's data path, the metadata server's
//! snapshot chunk I/O and the backup pseudo-device.
//!
//! The questions, each answered by exactly one function here:
//! - a byte range of a volume (or of a snapshot's copy-on-write area) →
//!   [`Segment`]s, one per extent it touches ([`ExtentSpace::segments`]);
//! - a segment → its legs, each with its device, the byte offset on that
//!   device and its [`LegState`] ([`Segment::legs`]);
//! - which legs a write goes to: every leg that takes writes
//!   ([`Segment::write_legs`]); which may serve a read, in the order to try
//!   them: the legs that serve reads, rotated so mirrors share the load
//!   ([`Segment::read_legs`]);
//! - where the pre-image of a volume byte lives in a snapshot's COW area
//!   ([`CowArea::pre_image`]), for the newest snapshot (agents copy there)
//!   and for any older one (the server reads there); which snapshot's area
//!   a chunk of an older snapshot reads from is the fall-through rule of
//!   [`PoolMetadata::snapshot_source`], which [`PoolMetadata::source_segment`]
//!   turns into a place;
//! - how a snapshot's chunks sit on extents ([`ChunkLayout`]): which chunks a
//!   write touches, the pieces of a read, and which chunks one device
//!   request can move together (never across an extent).
//!
//! **One mapping type, two builders.** A volume is mapped by
//! [`VolumeMap`], a borrowed view (a few references, nothing allocated)
//! built either from a [`VolumeDescription`] (what agents get over the wire,
//! [`VolumeDescription::mapping`]) or from [`PoolMetadata`] and a volume id
//! (what the server has, [`PoolMetadata::volume_map`]). Both builders only
//! point the view at their extent lists; every rule above is written once,
//! on the view. Why not have the server build a `VolumeDescription` and map
//! that: a description carries only the newest snapshot (the server reads
//! older ones too) and building one clones the extent list and the COW map,
//! which the pseudo-device would pay on every read. Why not convert both into
//! an owned mapping type: the agent would keep two copies of its layout, and
//! the server would rebuild one per metadata generation.
//!
//! **Device state** comes from a [`DeviceTable`]: the description's device
//! list, the pool's device records, or a table that adds what only its owner
//! knows (the agent's "marked failed" flags, set between two layouts). A
//! table also gives each device a *slot*, its position in the table, so
//! callers keep connections in a plain vector parallel to it and a leg finds
//! its connection without a map lookup. The views hold the table as
//! `&dyn DeviceTable`: a virtual call per leg costs nothing next to a device
//! request, and it keeps the types plain (`Segment<'a>`, `Copy`, `Debug`).
//!
//! **Per-leg states to come.** Recovery will add states that belong to one
//! leg rather than one device (a stale region after a degraded write, a leg
//! being resynchronized). They enter through [`DeviceTable::leg`], which
//! sees the physical extent, and through [`LegState`]'s two rules
//! ([`LegState::serves_reads`], [`LegState::takes_writes`]), which are what
//! [`Segment::read_legs`] and [`Segment::write_legs`] consult; a state that
//! covers only part of an extent will also need [`Segments`] to split at its
//! boundaries.
//!
//! The agent's hot path uses this module per request, so nothing here
//! allocates except on an error: legs come back in [`Legs`], an inline list
//! of at most [`MIRROR_LEGS_MAX`] entries.

use std::fmt;
use std::ops::{Deref, RangeInclusive};

use crate::description::{DeviceEndpoint, SnapshotEpoch, VolumeDescription};
use crate::ids::{DeviceIndex, SnapshotId, VolumeId};
use crate::label::extent_bytes_valid;
use crate::metadata::{
    ChunkSource, DeviceRecord, DeviceState, LogicalExtent, PhysicalExtent, PoolMetadata, SnapshotRecord,
    MIRROR_LEGS_MAX,
};

/// Most legs one extent can have (the size of [`Legs`]).
const LEGS_MAX: usize = MIRROR_LEGS_MAX as usize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("volume {0} does not exist")]
    NoSuchVolume(VolumeId),
    #[error("snapshot {0} does not exist")]
    NoSuchSnapshot(SnapshotId),
    #[error("I/O of {len_bytes} bytes at offset {offset} is beyond the end of the {what} ({size_bytes} bytes)")]
    OutOfRange { what: &'static str, offset: u64, len_bytes: u64, size_bytes: u64 },
    /// A chunk-sized access that would cross an extent: a caller's bug.
    #[error("{area}: {len_bytes} bytes at offset {offset} cross an extent boundary")]
    CrossesExtent { area: String, offset: u64, len_bytes: u64 },
    /// No leg of the extent can do what was asked (its devices failed).
    #[error(
        "{area}: extent {extent_index} has no leg to {action}: {legs}; its data is unavailable until a device is back"
    )]
    Unavailable { area: String, extent_index: u64, action: &'static str, legs: String },
    /// The extent lists disagree with themselves or the device table.
    #[error("inconsistent layout: {0}")]
    Inconsistent(String),
}

/// What a leg can do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LegState {
    Online,
    /// The pool marked the leg's device failed: the leg is skipped; the
    /// device's extents are due for recovery.
    DeviceFailed,
    /// The leg's device came back and is being resynchronized: writes go
    /// to it (so the copy and new writes both land), reads do not (it may
    /// hold data older than its other legs') — unless it is the extent's
    /// only leg (a plain volume), which nothing newer exists for.
    Resyncing,
}

impl LegState {
    /// The state of legs on a device in `state`.
    pub fn of_device(state: &DeviceState) -> LegState {
        match state {
            DeviceState::Online => LegState::Online,
            DeviceState::Failed { .. } => LegState::DeviceFailed,
            DeviceState::Resyncing { .. } => LegState::Resyncing,
        }
    }

    /// Whether the leg holds current data a read may return.
    #[inline]
    pub fn serves_reads(self) -> bool {
        matches!(self, LegState::Online)
    }

    /// Whether a write must reach the leg (and fails if it cannot).
    #[inline]
    pub fn takes_writes(self) -> bool {
        matches!(self, LegState::Online | LegState::Resyncing)
    }
}

impl fmt::Display for LegState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LegState::Online => "online",
            LegState::DeviceFailed => "marked failed in the pool",
            LegState::Resyncing => "resyncing (takes writes, serves no reads)",
        })
    }
}

/// The devices a mapping's legs are on, with their states.
pub trait DeviceTable: fmt::Debug + Sync {
    /// Position of device `index` in the table, or `None` if it is not in
    /// it. Callers keep per-device things (connections) parallel to it.
    fn slot(&self, index: DeviceIndex) -> Option<usize>;

    /// The state of every leg on the device at `slot`.
    fn device_state(&self, slot: usize) -> LegState;

    /// The slot of `leg`'s device and the leg's state: where states that
    /// belong to one leg (stale, resyncing) will come in. One call per leg
    /// on the data path.
    #[inline]
    fn leg(&self, leg: &PhysicalExtent) -> Option<(usize, LegState)> {
        let slot = self.slot(leg.device)?;
        Some((slot, self.device_state(slot)))
    }

    /// "device dev3 (URI)", for messages.
    fn describe(&self, slot: usize) -> String;
}

/// The description's device list (sorted by index, see
/// [`VolumeDescription::check`]).
impl DeviceTable for Vec<DeviceEndpoint> {
    #[inline]
    fn slot(&self, index: DeviceIndex) -> Option<usize> {
        self.binary_search_by_key(&index, |d| d.index).ok()
    }

    #[inline]
    fn device_state(&self, slot: usize) -> LegState {
        match self.get(slot) {
            Some(d) if d.online => LegState::Online,
            Some(d) if d.resyncing => LegState::Resyncing,
            _ => LegState::DeviceFailed,
        }
    }

    fn describe(&self, slot: usize) -> String {
        self.get(slot).map_or_else(|| format!("device slot {slot}"), |d| format!("device {} ({})", d.index, d.uri))
    }
}

/// The pool's device records.
impl DeviceTable for Vec<DeviceRecord> {
    fn slot(&self, index: DeviceIndex) -> Option<usize> {
        self.iter().position(|d| d.index == index)
    }

    fn device_state(&self, slot: usize) -> LegState {
        self.get(slot).map_or(LegState::DeviceFailed, |d| LegState::of_device(&d.state))
    }

    fn describe(&self, slot: usize) -> String {
        self.get(slot).map_or_else(|| format!("device slot {slot}"), |d| format!("device {} ({})", d.index, d.uri))
    }
}

/// Which address space a segment belongs to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area<'a> {
    /// A volume, by name.
    Volume(&'a str),
    /// A snapshot's copy-on-write area, by snapshot name.
    Cow(&'a str),
}

impl fmt::Display for Area<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Area::Volume(name) => write!(f, "volume {name}"),
            Area::Cow(name) => write!(f, "snapshot {name}'s copy-on-write area"),
        }
    }
}

/// An address space laid out on fixed-size extents, each on one or more
/// legs: a volume, or a snapshot's copy-on-write area.
#[derive(Debug, Clone, Copy)]
pub struct ExtentSpace<'a> {
    area: Area<'a>,
    size_bytes: u64,
    extent_bytes: u64,
    extents: &'a [LogicalExtent],
    devices: &'a dyn DeviceTable,
}

impl<'a> ExtentSpace<'a> {
    fn new(
        area: Area<'a>,
        size_bytes: u64,
        extent_bytes: u64,
        extents: &'a [LogicalExtent],
        devices: &'a dyn DeviceTable,
    ) -> ExtentSpace<'a> {
        ExtentSpace { area, size_bytes, extent_bytes, extents, devices }
    }

    pub fn area(&self) -> Area<'a> {
        self.area
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    /// Every leg of every extent.
    pub fn physical_extents(&self) -> impl Iterator<Item = &'a PhysicalExtent> + 'a {
        self.extents.iter().flat_map(|e| e.legs.iter())
    }

    /// Checks that `[offset, offset + len_bytes)` is inside the space and
    /// that the extents cover it; returns its end.
    #[inline]
    fn check_range(&self, offset: u64, len_bytes: u64) -> Result<u64, MapError> {
        let what = match self.area {
            Area::Volume(_) => "volume",
            Area::Cow(_) => "snapshot",
        };
        let out_of_range = || MapError::OutOfRange { what, offset, len_bytes, size_bytes: self.size_bytes };
        let end = offset.checked_add(len_bytes).ok_or_else(out_of_range)?;
        if end > self.size_bytes {
            return Err(out_of_range());
        }
        if !extent_bytes_valid(self.extent_bytes) {
            return Err(MapError::Inconsistent(format!("extent size {}", self.extent_bytes)));
        }
        // Segments index `extents` directly: check the last index once, so
        // an inconsistent layout is an error, never a panic.
        if len_bytes > 0 && (end - 1) / self.extent_bytes >= self.extents.len() as u64 {
            return Err(MapError::Inconsistent(format!(
                "{}: {} extents cannot hold {} bytes",
                self.area,
                self.extents.len(),
                self.size_bytes
            )));
        }
        Ok(end)
    }

    /// Splits `[offset, offset + len_bytes)` at extent boundaries. A
    /// zero-length range yields no segments.
    #[inline]
    pub fn segments(&self, offset: u64, len_bytes: u64) -> Result<Segments<'a>, MapError> {
        let end = self.check_range(offset, len_bytes)?;
        Ok(Segments { space: *self, offset, end })
    }

    /// The one segment of `[offset, offset + len_bytes)`, which must lie
    /// within one extent (chunk I/O: chunks never cross an extent).
    #[inline]
    pub fn segment(&self, offset: u64, len_bytes: u64) -> Result<Segment<'a>, MapError> {
        let mut segments = self.segments(offset, len_bytes)?;
        match (segments.next(), segments.next()) {
            (Some(segment), None) => Ok(segment),
            _ => Err(MapError::CrossesExtent { area: self.area.to_string(), offset, len_bytes }),
        }
    }

    #[inline]
    fn segment_at(&self, offset: u64, end: u64) -> Segment<'a> {
        let extent_index = offset / self.extent_bytes;
        let extent_offset = offset % self.extent_bytes;
        Segment {
            logical_offset: offset,
            len_bytes: (self.extent_bytes - extent_offset).min(end - offset),
            extent_index,
            extent_offset,
            area: self.area,
            legs: &self.extents[extent_index as usize].legs,
            devices: self.devices,
        }
    }
}

/// Iterator returned by [`ExtentSpace::segments`].
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    space: ExtentSpace<'a>,
    offset: u64,
    end: u64,
}

impl<'a> Iterator for Segments<'a> {
    type Item = Segment<'a>;

    #[inline]
    fn next(&mut self) -> Option<Segment<'a>> {
        if self.offset >= self.end {
            return None;
        }
        let segment = self.space.segment_at(self.offset, self.end);
        self.offset += segment.len_bytes;
        Some(segment)
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.offset >= self.end {
            return (0, Some(0));
        }
        let extent_bytes = self.space.extent_bytes;
        let n = ((self.end - 1) / extent_bytes - self.offset / extent_bytes + 1) as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Segments<'_> {}

/// The part of a range that falls in one extent.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// Offset in the space (volume or COW area).
    pub logical_offset: u64,
    pub len_bytes: u64,
    pub extent_index: u64,
    /// Offset of `logical_offset` within its extent.
    pub extent_offset: u64,
    area: Area<'a>,
    legs: &'a [PhysicalExtent],
    devices: &'a dyn DeviceTable,
}

/// One leg of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leg {
    pub device: DeviceIndex,
    /// Position of the device in the mapping's [`DeviceTable`].
    pub slot: usize,
    /// Byte offset on the device where the segment starts.
    pub device_offset: u64,
    pub state: LegState,
}

impl Leg {
    const NONE: Leg = Leg { device: DeviceIndex(0), slot: 0, device_offset: 0, state: LegState::DeviceFailed };
}

/// The legs of one segment, inline (no allocation on the data path).
#[derive(Clone, Copy)]
pub struct Legs {
    legs: [Leg; LEGS_MAX],
    len: usize,
}

impl Legs {
    #[inline]
    fn new() -> Legs {
        Legs { legs: [Leg::NONE; LEGS_MAX], len: 0 }
    }

    #[inline]
    fn push(&mut self, leg: Leg) {
        self.legs[self.len] = leg;
        self.len += 1;
    }
}

impl Deref for Legs {
    type Target = [Leg];

    #[inline]
    fn deref(&self) -> &[Leg] {
        &self.legs[..self.len]
    }
}

impl fmt::Debug for Legs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl IntoIterator for Legs {
    type Item = Leg;
    type IntoIter = std::iter::Take<std::array::IntoIter<Leg, LEGS_MAX>>;

    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        self.legs.into_iter().take(self.len)
    }
}

impl<'a> Segment<'a> {
    pub fn area(&self) -> Area<'a> {
        self.area
    }

    /// The extent's legs as recorded (device, extent offset).
    pub fn physical_legs(&self) -> &'a [PhysicalExtent] {
        self.legs
    }

    /// Every leg, in the extent's order, with its device slot, the device
    /// offset of this segment and its state.
    #[inline]
    pub fn legs(&self) -> Result<Legs, MapError> {
        self.collect_legs(|_| true)
    }

    /// The legs `keep` accepts, in the extent's order.
    #[inline]
    fn collect_legs(&self, keep: impl Fn(LegState) -> bool) -> Result<Legs, MapError> {
        if self.legs.len() > LEGS_MAX {
            return Err(MapError::Inconsistent(format!(
                "{}: extent {} has {} legs, more than {LEGS_MAX}",
                self.area,
                self.extent_index,
                self.legs.len()
            )));
        }
        let mut out = Legs::new();
        for leg in self.legs {
            let (slot, state) = self.devices.leg(leg).ok_or_else(|| {
                MapError::Inconsistent(format!(
                    "{}: extent {} has a leg on device {}, which is not in the device table",
                    self.area, self.extent_index, leg.device
                ))
            })?;
            let device_offset = leg.offset.checked_add(self.extent_offset).ok_or_else(|| {
                MapError::Inconsistent(format!("{}: extent {} leg {leg} is out of range", self.area, self.extent_index))
            })?;
            if keep(state) {
                out.push(Leg { device: leg.device, slot, device_offset, state });
            }
        }
        Ok(out)
    }

    /// The legs a write goes to: every leg that takes writes. An error if
    /// none does (the extent's data is unavailable).
    #[inline]
    pub fn write_legs(&self) -> Result<Legs, MapError> {
        self.legs_that(true, 0)
    }

    /// The legs a read may be served from, in the order to try them: the
    /// legs that serve reads, starting with the `rotation`-th (modulo their
    /// number), so that readers passing a counter spread over a mirror's
    /// legs. An error if none serves reads.
    #[inline]
    pub fn read_legs(&self, rotation: usize) -> Result<Legs, MapError> {
        self.legs_that(false, rotation)
    }

    #[inline]
    fn legs_that(&self, writing: bool, rotation: usize) -> Result<Legs, MapError> {
        // The only copy of an extent is read even while its device resyncs:
        // no other leg can be newer (a resync holds back reads only where
        // another leg may have taken writes this one missed).
        let only_copy = self.legs.len() == 1;
        let mut legs = self.collect_legs(|state| match (writing, state) {
            (true, state) => state.takes_writes(),
            (false, LegState::Resyncing) => only_copy,
            (false, state) => state.serves_reads(),
        })?;
        if legs.len == 0 {
            return Err(self.unavailable(writing));
        }
        if rotation % legs.len != 0 {
            let n = legs.len;
            legs.legs[..n].rotate_left(rotation % n);
        }
        Ok(legs)
    }

    /// Why no leg can serve: every leg with its state.
    #[cold]
    fn unavailable(&self, writing: bool) -> MapError {
        let legs = match self.legs() {
            Ok(legs) => legs
                .iter()
                .map(|l| format!("{} is {}", self.devices.describe(l.slot), l.state))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => return e,
        };
        MapError::Unavailable {
            area: self.area.to_string(),
            extent_index: self.extent_index,
            action: if writing { "write to" } else { "read from" },
            legs,
        }
    }
}

/// How a snapshot divides the volume into chunks, the copy-on-write unit:
/// chunk `c` covers volume bytes `c * chunk_bytes ..`, the last one may be
/// short. Chunks never cross an extent (the chunk size divides the extent
/// size), so the extent-related rules take the extent size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    pub chunk_bytes: u64,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
}

/// The part of a byte range that falls in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPiece {
    pub chunk: u64,
    /// Offset of the piece within its chunk.
    pub within: u64,
    pub len_bytes: u64,
}

impl ChunkLayout {
    /// Chunks the snapshot covers.
    pub fn chunk_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_bytes.max(1))
    }

    /// Volume byte range `(offset, len)` of `count` chunks from `first` (the
    /// last chunk of the snapshot may be short; nothing beyond it counts).
    pub fn chunks_range(&self, first: u64, count: u64) -> (u64, u64) {
        let start = first.saturating_mul(self.chunk_bytes);
        (start, count.saturating_mul(self.chunk_bytes).min(self.size_bytes.saturating_sub(start)))
    }

    /// Volume byte range `(offset, len)` of `chunk`.
    pub fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        self.chunks_range(chunk, 1)
    }

    /// Volume offset of `piece`.
    pub fn offset_of(&self, piece: &ChunkPiece) -> u64 {
        piece.chunk * self.chunk_bytes + piece.within
    }

    /// The chunks of the snapshot that `[offset, offset + len_bytes)` of the
    /// volume touches (none beyond the snapshot's size).
    pub fn chunks_touched(&self, offset: u64, len_bytes: u64) -> Option<RangeInclusive<u64>> {
        let end = offset.saturating_add(len_bytes).min(self.size_bytes);
        if offset >= end || self.chunk_bytes == 0 {
            return None;
        }
        Some(offset / self.chunk_bytes..=(end - 1) / self.chunk_bytes)
    }

    /// Splits `[offset, offset + len_bytes)` at chunk boundaries.
    pub fn pieces(&self, offset: u64, len_bytes: u64) -> impl Iterator<Item = ChunkPiece> {
        let chunk_bytes = self.chunk_bytes.max(1);
        let end = offset.saturating_add(len_bytes);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let within = at % chunk_bytes;
            let piece = ChunkPiece { chunk: at / chunk_bytes, within, len_bytes: (chunk_bytes - within).min(end - at) };
            at += piece.len_bytes;
            Some(piece)
        })
    }

    /// The extent (of `extent_bytes`) chunk `chunk` is in.
    pub fn extent_of(&self, chunk: u64, extent_bytes: u64) -> u64 {
        chunk.saturating_mul(self.chunk_bytes) / extent_bytes.max(1)
    }

    /// Whether `b` directly follows `a` in the same extent, so one device
    /// request per leg moves both.
    pub fn joins(&self, a: &ChunkPiece, b: &ChunkPiece, extent_bytes: u64) -> bool {
        b.chunk == a.chunk + 1
            && a.within + a.len_bytes == self.chunk_bytes
            && b.within == 0
            && self.extent_of(a.chunk, extent_bytes) == self.extent_of(b.chunk, extent_bytes)
    }

    /// Sorted chunk numbers grouped into runs `(first, count)` of
    /// consecutive chunks within one extent: one device request per leg
    /// moves a run.
    pub fn runs(&self, chunks: &[u64], extent_bytes: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &c in chunks {
            match runs.last_mut() {
                Some((first, count))
                    if *first + *count == c
                        && self.extent_of(*first, extent_bytes) == self.extent_of(c, extent_bytes) =>
                {
                    *count += 1
                }
                _ => runs.push((c, 1)),
            }
        }
        runs
    }
}

/// A snapshot's copy-on-write area. It is direct-mapped: the pre-image of
/// volume byte `b` lives at byte `b` of the area (so chunk `c` at
/// `c * chunk_bytes`), on the area's own extents and legs.
#[derive(Debug, Clone, Copy)]
pub struct CowArea<'a> {
    pub snapshot: SnapshotId,
    pub name: &'a str,
    pub chunks: ChunkLayout,
    space: ExtentSpace<'a>,
}

impl<'a> CowArea<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        snapshot: SnapshotId,
        name: &'a str,
        chunk_bytes: u64,
        size_bytes: u64,
        extent_bytes: u64,
        extents: &'a [LogicalExtent],
        devices: &'a dyn DeviceTable,
    ) -> CowArea<'a> {
        CowArea {
            snapshot,
            name,
            chunks: ChunkLayout { chunk_bytes, size_bytes },
            space: ExtentSpace::new(Area::Cow(name), size_bytes, extent_bytes, extents, devices),
        }
    }

    pub fn space(&self) -> ExtentSpace<'a> {
        self.space
    }

    /// Where the pre-image of volume bytes `[offset, offset + len_bytes)`
    /// lives; the range must lie within one extent and the snapshot.
    pub fn pre_image(&self, offset: u64, len_bytes: u64) -> Result<Segment<'a>, MapError> {
        self.space.segment(offset, len_bytes)
    }

    /// Where the pre-image of `len_bytes` from byte `within` of chunk
    /// `chunk` on lives (a run of chunks within one extent, as
    /// [`ChunkLayout::runs`] and [`ChunkLayout::joins`] make).
    pub fn chunk(&self, chunk: u64, within: u64, len_bytes: u64) -> Result<Segment<'a>, MapError> {
        let offset = chunk.checked_mul(self.chunks.chunk_bytes).and_then(|o| o.checked_add(within));
        let offset = offset.ok_or(MapError::OutOfRange {
            what: "snapshot",
            offset: u64::MAX,
            len_bytes,
            size_bytes: self.chunks.size_bytes,
        })?;
        self.pre_image(offset, len_bytes)
    }
}

/// A volume mapped onto its devices: the live extents, and the newest
/// snapshot's COW area (where writers copy pre-images), if any.
#[derive(Debug, Clone, Copy)]
pub struct VolumeMap<'a> {
    pub volume: VolumeId,
    pub name: &'a str,
    pub live: ExtentSpace<'a>,
    pub newest: Option<CowArea<'a>>,
}

impl<'a> VolumeMap<'a> {
    /// [`ExtentSpace::segments`] of the live volume.
    #[inline]
    pub fn segments(&self, offset: u64, len_bytes: u64) -> Result<Segments<'a>, MapError> {
        self.live.segments(offset, len_bytes)
    }

    /// Every physical extent a holder of the volume reads or writes: the
    /// volume's legs, then the newest snapshot's COW area's.
    pub fn physical_extents(&self) -> impl Iterator<Item = &'a PhysicalExtent> + 'a {
        self.live.physical_extents().chain(self.newest.into_iter().flat_map(|c| c.space.physical_extents()))
    }
}

impl VolumeDescription {
    /// This volume over `devices`: the description's own device list
    /// (`self.devices.as_slice()`), or a table that adds what its owner
    /// knows on top (the agent's "marked failed" flags).
    #[inline]
    pub fn mapping<'a>(&'a self, devices: &'a dyn DeviceTable) -> VolumeMap<'a> {
        VolumeMap {
            volume: self.volume,
            name: &self.name,
            live: ExtentSpace::new(
                Area::Volume(&self.name),
                self.size_bytes,
                self.extent_bytes,
                &self.extents,
                devices,
            ),
            newest: self.snapshot.as_ref().map(|s| {
                CowArea::new(s.id, &s.name, s.chunk_bytes, s.size_bytes, self.extent_bytes, &s.cow_extents, devices)
            }),
        }
    }

    /// [`ExtentSpace::segments`] of the volume, with the description's own
    /// device states.
    pub fn map(&self, offset: u64, len_bytes: u64) -> Result<Segments<'_>, MapError> {
        self.mapping(&self.devices).segments(offset, len_bytes)
    }
}

impl SnapshotRecord {
    pub fn chunk_layout(&self) -> ChunkLayout {
        ChunkLayout { chunk_bytes: self.chunk_bytes, size_bytes: self.size_bytes }
    }
}

impl SnapshotEpoch {
    pub fn chunk_layout(&self) -> ChunkLayout {
        ChunkLayout { chunk_bytes: self.chunk_bytes, size_bytes: self.size_bytes }
    }
}

impl PoolMetadata {
    /// Volume `id` over the pool's devices, with its newest snapshot's COW
    /// area.
    pub fn volume_map(&self, id: VolumeId) -> Result<VolumeMap<'_>, MapError> {
        let v = self.volume(id).ok_or(MapError::NoSuchVolume(id))?;
        let devices = &self.devices;
        Ok(VolumeMap {
            volume: id,
            name: &v.name,
            live: ExtentSpace::new(Area::Volume(&v.name), v.size_bytes, self.extent_bytes, &v.extents, devices),
            newest: self.newest_snapshot(id).map(|s| self.cow_area_of(s)),
        })
    }

    /// The COW area of snapshot `id` (the newest of its volume or not).
    pub fn cow_area(&self, id: SnapshotId) -> Result<CowArea<'_>, MapError> {
        self.snapshot(id).map(|s| self.cow_area_of(s)).ok_or(MapError::NoSuchSnapshot(id))
    }

    fn cow_area_of<'a>(&'a self, s: &'a SnapshotRecord) -> CowArea<'a> {
        CowArea::new(s.id, &s.name, s.chunk_bytes, s.size_bytes, self.extent_bytes, &s.cow_extents, &self.devices)
    }

    /// Where volume bytes `[offset, offset + len_bytes)` (within one extent)
    /// of a snapshot of `volume` are read from, given where their chunks
    /// read from ([`PoolMetadata::snapshot_source`]): the live volume, or the
    /// COW area of the snapshot named by the source.
    pub fn source_segment(
        &self,
        volume: VolumeId,
        source: ChunkSource,
        offset: u64,
        len_bytes: u64,
    ) -> Result<Segment<'_>, MapError> {
        match source {
            ChunkSource::Live => self.volume_map(volume)?.live.segment(offset, len_bytes),
            ChunkSource::Cow(id) => self.cow_area(id)?.pre_image(offset, len_bytes),
        }
    }
}

#[cfg(test)]
mod tests;
