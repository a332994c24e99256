//! `sanvol-mds --config FILE`: the pool metadata server. See
//! `metadata_server::server` and `metadata_server::config`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use metadata_server::config::Config;
use tracing::info;

/// Mirrored writes, fallback I/O and the backup pseudo-device allocate per
/// request; mimalloc costs less per allocation than glibc's malloc there
/// (bench/README.md, "The agent's allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
#[command(subcommand_negates_reqs = true)]
struct Args {
    /// The server's TOML configuration file.
    #[arg(long, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace, or tracing directives);
    /// overrides `log` in the config. RUST_LOG overrides both.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// How log lines are written on stderr: text or json; overrides `log_format` in the config.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<ops::logging::LogFormat>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9751; port 0 picks one);
    /// overrides `metrics_addr` in the config.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    generate: Option<Generate>,
}

#[derive(Debug, clap::Subcommand)]
enum Generate {
    /// Write man pages or shell completions (for packagers; see docs/operations.md).
    #[command(subcommand, hide = true)]
    Generate(ops::docs::Generate),
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
    if let Some(Generate::Generate(what)) = &args.generate {
        return match ops::docs::generate(<Args as clap::CommandFactory>::command(), what) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sanvol-mds: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let Some(config_path) = &args.config else {
        eprintln!("sanvol-mds: --config FILE is required");
        return std::process::ExitCode::FAILURE;
    };
    let config = match Config::load(config_path) {
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
    ops::logging::init(&filter, "info", args.log_format.unwrap_or(config.log_format));
    ops::host::log_idle_vcpu_note();
    let result = async {
        if let Some(addr) = args.metrics_addr.or(config.metrics_addr) {
            metadata_server::server::metrics::init();
            let bound = ops::metrics::serve(addr).await?;
            println!("metrics http://{bound}/metrics");
        }
        let server = metadata_server::server::Server::bind(&config).await.context("starting sanvol-mds")?;
        for addr in server.local_addrs() {
            // One line per address on stdout, so scripts can wait for it.
            println!("listening on {addr}");
        }
        ops::notify::ready(&format!(
            "serving pool on {}",
            config.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        ));
        server
            .serve(async {
                shutdown_signal().await;
                ops::notify::stopping();
            })
            .await?;
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
