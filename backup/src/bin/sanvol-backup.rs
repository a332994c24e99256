//! `sanvol-backup`: full and incremental backups of sanvol snapshots. See
//! `sanvol-backup --help` and the crate docs (`backup`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = backup::cli::Cli::parse();
    ops::logging::init(&cli.log, "warn", cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sanvol-backup: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(backup::cli::run(cli));
    // Do not wait long for blocking work (a verification) an interrupt cut short.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sanvol-backup: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
