//! The sanvol metadata server: pool metadata, authentication, handles and
//! leases, reconfiguration and the fallback data path.
