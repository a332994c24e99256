//! `sanvol-mds --config FILE`: the pool metadata server. See
//! `metadata_server::server` and `metadata_server::config`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use metadata_server::config::Config;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "sanvol-mds",
    version,
    about = "The sanvol metadata server: loads the pool from its devices and serves agents and admins",
    long_about = "The sanvol metadata server.\n\n\
        Loads the newest valid pool metadata from the devices named in the config, then serves \
        authenticated control connections (agents and admins). Stops cleanly on SIGINT or SIGTERM. \
        The config file format is documented in the README (\"Configuration and keys\")."
)]
struct Args {
    /// The server's TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Log filter (error, warn, info, debug, trace, or tracing directives);
    /// overrides `log` in the config. RUST_LOG overrides both.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sanvol-mds: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| args.log.clone())
        .or_else(|| config.log.clone())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = async {
        let server = metadata_server::server::Server::bind(&config).await.context("starting sanvol-mds")?;
        for addr in server.local_addrs() {
            // One line per address on stdout, so scripts can wait for it.
            println!("listening on {addr}");
        }
        server.serve(shutdown_signal()).await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sanvol-mds: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
