//! `sanvol-backup`: full and incremental backups of sanvol snapshots. See
//! `sanvol-backup --help` and the crate docs (`backup`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = backup::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("sanvol-backup: --log {:?} is not a valid filter ({e}); using warn", cli.log);
        tracing_subscriber::EnvFilter::new("warn")
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
