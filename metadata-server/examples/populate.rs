//! Fills a running pool with volumes over one admin connection and reports
//! how long a `volume create` takes as the pool grows (for
//! `bench/metadata.sh`: a create at 10,000 volumes against one at 10).
//!
//! ```text
//! cargo run --release -p metadata-server --example populate -- \
//!     --mds unix:/path/mds.sock --key admin.key --server-key mds.key.pub \
//!     --count 10000 --prefix fill- --size-bytes 4096 [--sample 200]
//! ```
//! Prints one line: `volumes=N create_ms_median=M create_ms_p99=P` over the
//! last `--sample` creates (requests answered one at a time, each a commit).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use control_client::{keys, ControlAddr, ControlClient};
use volume_format::control::auth::Role;
use volume_format::control::messages::Request;

struct Args {
    mds: ControlAddr,
    key: std::path::PathBuf,
    server_key: String,
    count: usize,
    prefix: String,
    size_bytes: u64,
    sample: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        mds: "unix:/run/sanvol/mds.sock".parse().map_err(anyhow::Error::msg)?,
        key: "admin.key".into(),
        server_key: "mds.key.pub".into(),
        count: 10,
        prefix: "fill-".into(),
        size_bytes: 4096,
        sample: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mds" => a.mds = value.parse().map_err(anyhow::Error::msg)?,
            "--key" => a.key = value.into(),
            "--server-key" => a.server_key = value,
            "--count" => a.count = value.parse()?,
            "--prefix" => a.prefix = value,
            "--size-bytes" => a.size_bytes = value.parse()?,
            "--sample" => a.sample = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = args()?;
    let key = keys::load_private(&a.key)?;
    let (pinned, _) = keys::parse_public(&a.server_key)?;
    let (client, _events) = ControlClient::connect(&a.mds, &key, Some(&pinned), Role::Admin, "populate", [0; 16])
        .await
        .context("connecting to the metadata server")?;
    let mut times_ms = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let name = format!("{}{i}", a.prefix);
        let started = Instant::now();
        client
            .request(Request::VolumeCreate { name: name.clone(), size_bytes: a.size_bytes, legs: 1 })
            .await
            .with_context(|| format!("creating {name}"))?;
        times_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut last: Vec<f64> = times_ms.iter().rev().take(a.sample.max(1)).copied().collect();
    last.sort_by(f64::total_cmp);
    let at = |q: f64| last.get(((last.len() - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    println!("volumes={} create_ms_median={:.3} create_ms_p99={:.3}", a.count, at(0.5), at(0.99));
    client.close().await;
    Ok(())
}
