//! The sanvol client agent: attaches volumes and serves them locally.
