//! Long reconfigurations (`device add|evacuate|replace`, `volume move`,
//! `volume mirror add|remove`), waited for with progress.
//!
//! The server answers such a request only when it is done; meanwhile the
//! CLI asks for the operation's progress (`Request::Operations`) on the same
//! connection every [`POLL_MS`] and shows it: a bar on a terminal (stderr),
//! a line per change of state otherwise, one JSON object per change on
//! stdout with `--json` (`{"progress": OperationInfo}`, then
//! `{"result": "done", ...}` or `{"result": "failed", "error": ...}`), so
//! scripts can follow it.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use volume_format::control::messages::{OperationInfo, Request, Response};

use control_client::ControlClient;

/// How often progress is asked for.
pub const POLL_MS: u64 = 250;
/// Longest a reconfiguration is waited for (it goes on at the server if the
/// CLI stops waiting).
pub const OPERATION_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The first protocol version with the reconfiguration requests.
pub const RECONFIG_PROTOCOL_MIN: u32 = 5;

/// Sends `request` and waits for its answer, showing the operation's
/// progress meanwhile; `what` names it in messages.
pub async fn run(client: &ControlClient, request: Request, what: &str, json: bool) -> Result<()> {
    let version = client.session().version;
    if version < RECONFIG_PROTOCOL_MIN {
        bail!(
            "the metadata server speaks control protocol {version}; {what} needs {RECONFIG_PROTOCOL_MIN} or later: \
             upgrade sanvol-mds"
        );
    }
    let mut shown = Shown::new(json);
    let answer = client.request_with_timeout(request, OPERATION_WAIT);
    tokio::pin!(answer);
    let mut tick = tokio::time::interval(Duration::from_millis(POLL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            result = &mut answer => break result,
            _ = tick.tick() => {
                if let Ok(Response::Operations(ops)) = client.request(Request::Operations).await {
                    shown.update(ops.first());
                }
            }
        }
    };
    shown.finish();
    match result {
        Ok(_) => {
            if json {
                println!("{}", serde_json::json!({ "result": "done", "what": what }));
            } else {
                println!("{what}: done");
            }
            Ok(())
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "result": "failed", "what": what, "error": e.to_string() }));
            }
            Err(anyhow::Error::new(e).context(what.to_string()))
        }
    }
}

/// What was last shown.
struct Shown {
    json: bool,
    bar: Option<ProgressBar>,
    last: Option<OperationInfo>,
}

impl Shown {
    fn new(json: bool) -> Shown {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("[{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}\n{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Shown { json, bar, last: None }
    }

    fn update(&mut self, op: Option<&OperationInfo>) {
        let Some(op) = op else { return };
        if let Some(bar) = &self.bar {
            bar.set_length(op.bytes_total.max(1));
            bar.set_position(op.bytes_done);
            bar.set_message(line(op));
            return;
        }
        let changed = self.last.as_ref().is_none_or(|last| {
            last.state != op.state || last.volumes_done != op.volumes_done || (self.json && last != op)
        });
        if changed {
            if self.json {
                println!("{}", serde_json::json!({ "progress": op }));
            } else {
                eprintln!("{}", line(op));
            }
        }
        self.last = Some(op.clone());
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// "evacuate device 2: copying volume db — 1 of 3 volumes, 4 of 9 extents, 3.2 s".
fn line(op: &OperationInfo) -> String {
    format!(
        "{}: {} — {} of {} volumes, {} of {} extents moved, {:.1} s",
        op.what,
        op.state,
        op.volumes_done,
        op.volumes_total,
        op.extents_done,
        op.extents_total,
        op.elapsed_ms as f64 / 1000.0
    )
}
