//! What is already on a device, before `pool init` overwrites it.
//!
//! Why libblkid: it knows every filesystem, partition table, RAID and
//! crypto signature that `blkid`, `wipefs` and udev know, and refusing to
//! destroy someone's data is worth the C dependency. It probes files, not NBD
//! exports, so the caller copies the device's first MiB into a temporary
//! file and we probe that (every common signature sits in the first MiB).

use std::io::Write;

use blkid::prober::{ProbeState, Prober};
use blkid::{PartitionsFlags, SuperblocksFlags};
use volume_format::label::{DeviceLabel, LabelError};

/// Bytes from the start of a device that [`describe_contents`] looks at.
pub const PROBE_BYTES: u64 = 1 << 20;

/// Says what `first_bytes` (the start of a device) carries, or `None` if
/// neither sanvol nor libblkid recognizes anything.
pub fn describe_contents(first_bytes: &[u8]) -> Result<Option<String>, String> {
    match DeviceLabel::decode(first_bytes) {
        Ok(label) => {
            return Ok(Some(format!(
                "a sanvol label (pool {}, device {} index {})",
                label.pool_uuid, label.device_uuid, label.device_index
            )))
        }
        Err(LabelError::NotSanvol { .. }) | Err(LabelError::TooShort { .. }) => {}
        Err(e) => return Ok(Some(format!("a damaged sanvol label ({e})"))),
    }
    probe_blkid(first_bytes)
}

fn probe_blkid(first_bytes: &[u8]) -> Result<Option<String>, String> {
    let mut file = tempfile::NamedTempFile::new().map_err(|e| format!("creating a temporary file to probe: {e}"))?;
    file.write_all(first_bytes).and_then(|_| file.flush()).map_err(|e| format!("writing the probe file: {e}"))?;
    let blkid_err = |e: blkid::BlkIdError| format!("libblkid: {e}");
    let prober = Prober::new_from_filename(file.path()).map_err(blkid_err)?;
    prober.enable_superblocks(true).map_err(blkid_err)?;
    prober
        .set_superblocks_flags(SuperblocksFlags::TYPE | SuperblocksFlags::USAGE | SuperblocksFlags::LABEL)
        .map_err(blkid_err)?;
    prober.enable_partitions(true).map_err(blkid_err)?;
    prober.set_partitions_flags(PartitionsFlags::MAGIC).map_err(blkid_err)?;
    match prober.do_safe_probe().map_err(blkid_err)? {
        ProbeState::NothingDetected | ProbeState::Done => Ok(None),
        ProbeState::Ambivalent => Ok(Some("several conflicting signatures".to_string())),
        ProbeState::Success => {
            let values = prober.get_values_map().map_err(blkid_err)?;
            if let Some(pt) = values.get("PTTYPE") {
                return Ok(Some(format!("a {pt} partition table")));
            }
            let Some(kind) = values.get("TYPE") else {
                return Ok(Some(format!("an unnamed signature ({values:?})")));
            };
            let label = values.get("LABEL").map(|l| format!(" labelled {l:?}")).unwrap_or_default();
            Ok(Some(match values.get("USAGE").map(String::as_str) {
                Some("filesystem") | None => format!("an {kind} filesystem{label}"),
                Some(usage) => format!("a {kind} signature ({usage}){label}"),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_is_nothing() {
        assert_eq!(describe_contents(&vec![0u8; PROBE_BYTES as usize]).unwrap(), None);
    }

    #[test]
    fn swap_signature_is_found() {
        // A swap v1 header: "SWAPSPACE2" at the end of the first 4 KiB page.
        let mut bytes = vec![0u8; PROBE_BYTES as usize];
        bytes[4096 - 10..4096].copy_from_slice(b"SWAPSPACE2");
        bytes[1024] = 1; // version 1
        bytes[1028..1032].copy_from_slice(&100u32.to_le_bytes()); // last page
        let found = describe_contents(&bytes).unwrap().expect("swap detected");
        assert!(found.contains("swap"), "{found}");
    }
}
