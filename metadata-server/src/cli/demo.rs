//! `sanvol demo`: placeholder until the demo lands (its owner replaces this
//! file wholesale).

use std::path::PathBuf;

/// Options of `sanvol demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's devices, keys, sockets and logs.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Set everything up, verify it, tear it down and exit instead of
    /// waiting for Ctrl-C.
    #[arg(long)]
    pub exit_after_setup: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("`sanvol demo` is not available in this build yet")
}
