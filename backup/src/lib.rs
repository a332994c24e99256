//! The sanvol backup job (reads snapshots through the backup pseudo-device).
