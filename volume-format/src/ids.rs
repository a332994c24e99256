//! Identifier newtypes. Why: a volume id, a handle id and a device index are
//! all integers, and mixing them up is exactly the bug a type checker should
//! catch in a storage system.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        pub struct $name(pub $inner);

        impl $name {
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// A volume, unique within a pool and never reused.
    VolumeId(u64),
    "vol"
);
id_newtype!(
    /// A device's position in the pool, written into its label.
    DeviceIndex(u32),
    "dev"
);
id_newtype!(
    /// An open handle, unique within a pool and never reused.
    HandleId(u64),
    "h"
);
id_newtype!(
    /// A snapshot, unique within a pool and never reused.
    SnapshotId(u64),
    "snap"
);

/// An ed25519 public key (agents, admins, the metadata server), as raw
/// bytes: comparing and storing keys needs no crypto (the journal turns the
/// server's into a verifying key where it checks signatures).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        assert_eq!(VolumeId(3).to_string(), "vol3");
        assert_eq!(DeviceIndex(0).to_string(), "dev0");
        assert_eq!(PublicKey([0xab; 32]).to_string().len(), 64);
    }
}
