//! `sanvol`: the admin CLI. See `metadata_server::cli`.

use clap::Parser;
use metadata_server::cli::{self, Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes
    // away (`sanvol volume show db | head`) instead of panicking on EPIPE.
    // SAFETY: restoring the default disposition of one signal; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    // Logs go to stderr and stay quiet unless asked for (RUST_LOG).
    ops::logging::init(&std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()), "warn", cli.log_format);
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sanvol: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
