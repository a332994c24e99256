//! Reading a cache log back after a crash: every record from the
//! superblock's tail with consecutive sequence numbers and a good checksum,
//! up to the first one that is not there — or a [`ScanError::Corrupt`] when
//! a record in the middle went bad.
//!
//! The end of the log is the first position, following the chain from the
//! tail, that holds no valid record with the expected sequence number. What
//! is there is either never-acknowledged (a torn last batch, an old record of
//! a previous lap) or damage. The scanner tells them apart by looking past
//! it, at every aligned position up to the tail: a valid record of this log
//! whose batch started *after* the expected sequence number means the bad
//! record's batch had been made durable (batches are written one after the
//! other, each synced before the next), so the bad record was acknowledged
//! and is now damaged.
//!
//! A bit flipped in the *newest* batch cannot be told from a torn write by
//! the log alone; those records are dropped like a torn tail. The mirror at
//! the metadata server is what covers that case.
//!
//! The scan returns where each record is, not its data, so replaying a log
//! of any size holds only the index in memory; [`read_record`] reads and
//! re-checks one record's data when it is destaged.

use super::record::{RecordFault, RecordHeader, RecordKind, RECORD_HEADER_BYTES};
use super::ring::LogRing;
use super::superblock::{Superblock, SuperblockError, DATA_START_BYTES};
use super::RECORD_ALIGN_BYTES;

/// Random-access reads of a log image (a file, or a buffer in tests).
pub trait LogSource {
    /// Fills `buf` from `pos`; bytes past the end of the source read as zero.
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl LogSource for [u8] {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        let start = (pos as usize).min(self.len());
        let end = start.saturating_add(buf.len()).min(self.len());
        buf[..end - start].copy_from_slice(&self[start..end]);
        Ok(())
    }
}

impl LogSource for std::fs::File {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            let n = FileExt::read_at(self, &mut buf[done..], pos + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}

/// One live data record found by the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedRecord {
    /// File offset of the record's header.
    pub pos: u64,
    pub header: RecordHeader,
    pub crc: u32,
}

/// A log read back: its superblock, the live data records in sequence order
/// and where the next record would go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedLog {
    pub superblock: Superblock,
    pub records: Vec<ScannedRecord>,
    pub head_pos: u64,
    pub next_seq: u64,
}

impl ScannedLog {
    /// The ring as it stands after the scan (tail at the superblock's tail,
    /// head after the last live record).
    pub fn ring(&self) -> LogRing {
        LogRing::new(self.superblock.log_bytes, self.superblock.tail_pos, self.head_pos)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read cache log {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("cache log {path}: {source}")]
    Superblock { path: String, source: SuperblockError },
    #[error(
        "cache log {path} is corrupt at file offset {pos}: the record with sequence number {seq} is damaged \
         ({fault}), yet a later batch (record {later_seq} at offset {later_pos}) was written after it was made \
         durable; nothing from this log is replayed — recover the volume's cached writes from the mirror and move \
         the log aside"
    )]
    Corrupt { path: String, pos: u64, seq: u64, fault: String, later_seq: u64, later_pos: u64 },
    #[error(
        "cache log {path}: record {seq} at file offset {pos} is damaged ({fault}) although the scan found it \
         valid; the file changed or the disk returns bad data — do not replay it"
    )]
    DataChanged { path: String, pos: u64, seq: u64, fault: String },
}

/// What is at a position, as far as the chain is concerned.
enum Probe {
    Valid(RecordHeader, u32),
    Bad(String),
}

fn probe(source: &(impl LogSource + ?Sized), pos: u64, end: u64, log_id: u64) -> std::io::Result<Probe> {
    let mut header_bytes = [0u8; RECORD_HEADER_BYTES];
    source.read_at(pos, &mut header_bytes)?;
    let (header, crc) = match RecordHeader::decode(&header_bytes) {
        Ok(decoded) => decoded,
        Err(fault) => return Ok(Probe::Bad(fault.to_string())),
    };
    if header.log_id != log_id {
        return Ok(Probe::Bad(format!("record of another log (id {:#x})", header.log_id)));
    }
    if pos + header.span_bytes() > end {
        return Ok(Probe::Bad(format!("record of {} bytes runs past the end of the ring", header.length)));
    }
    let mut data = vec![0u8; if header.kind == RecordKind::Data { header.length as usize } else { 0 }];
    source.read_at(pos + RECORD_HEADER_BYTES as u64, &mut data)?;
    match header.check(crc, &data) {
        Ok(()) => Ok(Probe::Valid(header, crc)),
        Err(fault) => Ok(Probe::Bad(fault.to_string())),
    }
}

/// Reads the log in `source` (named `path` in errors) from its superblock's
/// tail. See the module doc for what counts as the end and as corruption.
pub fn scan(source: &(impl LogSource + ?Sized), path: &str) -> Result<ScannedLog, ScanError> {
    let io = |source| ScanError::Io { path: path.to_string(), source };
    let mut head = vec![0u8; DATA_START_BYTES as usize];
    source.read_at(0, &mut head).map_err(io)?;
    let superblock =
        Superblock::decode(&head).map_err(|source| ScanError::Superblock { path: path.to_string(), source })?;
    let ring = LogRing::new(superblock.log_bytes, superblock.tail_pos, superblock.tail_pos);
    let end = ring.end();
    let mut pos = superblock.tail_pos;
    let mut seq = superblock.tail_seq;
    let mut walked_bytes = 0u64;
    let mut records = Vec::new();
    let fault = loop {
        if pos == end {
            pos = DATA_START_BYTES;
        }
        if walked_bytes >= ring.capacity_bytes() {
            // Went all the way round: cannot happen with a ring that always
            // keeps one unit free, so the chain is not this log's.
            break "the record chain runs all the way round the ring".to_string();
        }
        match probe(source, pos, end, superblock.log_id).map_err(io)? {
            Probe::Valid(header, _) if header.seq != seq || header.volume != superblock.volume => {
                break format!("record with sequence {} of volume {} (expected {seq})", header.seq, header.volume);
            }
            Probe::Valid(header, crc) => {
                seq += 1;
                match header.kind {
                    RecordKind::Data => {
                        records.push(ScannedRecord { pos, header, crc });
                        pos += header.span_bytes();
                        walked_bytes += header.span_bytes();
                    }
                    RecordKind::Wrap => {
                        walked_bytes += end - pos;
                        pos = DATA_START_BYTES;
                    }
                }
            }
            Probe::Bad(fault) => break fault,
        }
    };
    // Look past the end for a record of a later batch (see the module doc).
    let stop_pos = superblock.tail_pos;
    let mut candidate = pos + RECORD_ALIGN_BYTES;
    let mut remaining = ring.capacity_bytes().saturating_sub(walked_bytes + RECORD_ALIGN_BYTES);
    while remaining > 0 {
        if candidate >= end {
            candidate = DATA_START_BYTES;
        }
        if candidate == stop_pos {
            break;
        }
        if let Probe::Valid(later, _) = probe(source, candidate, end, superblock.log_id).map_err(io)? {
            if later.batch_first_seq > seq && later.volume == superblock.volume {
                return Err(ScanError::Corrupt {
                    path: path.to_string(),
                    pos,
                    seq,
                    fault,
                    later_seq: later.seq,
                    later_pos: candidate,
                });
            }
        }
        candidate += RECORD_ALIGN_BYTES;
        remaining -= RECORD_ALIGN_BYTES;
    }
    Ok(ScannedLog { superblock, records, head_pos: pos, next_seq: seq })
}

/// Reads a scanned record's data and checks it again (the file may have
/// changed since the scan; bad data is never handed out).
pub fn read_record(
    source: &(impl LogSource + ?Sized),
    path: &str,
    record: &ScannedRecord,
) -> Result<Vec<u8>, ScanError> {
    let mut data = vec![0u8; record.header.length as usize];
    source
        .read_at(record.pos + RECORD_HEADER_BYTES as u64, &mut data)
        .map_err(|source| ScanError::Io { path: path.to_string(), source })?;
    record.header.check(record.crc, &data).map_err(|fault: RecordFault| ScanError::DataChanged {
        path: path.to_string(),
        pos: record.pos,
        seq: record.header.seq,
        fault: fault.to_string(),
    })?;
    Ok(data)
}
