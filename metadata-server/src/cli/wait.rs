//! Requests the server may answer only after a long wait, waited for as
//! long as the server shows it is alive.
//!
//! Why: `snapshot create` and `volume cache` are recall points of a cached
//! volume. The server answers once the holder destaged its cache, or, when
//! the holder is dead, once the server replayed its cache mirror to the
//! devices — which can take longer than the control client's 30 s request
//! timeout behind slow devices. With that timeout the CLI reported a
//! failure while the server went on and made the change (a retry then
//! found the snapshot already there). So the answer is waited for while
//! the server answers a status request on the same connection every
//! [`ALIVE_POLL`]; a server that stops answering those fails the command
//! after the request timeout, saying the change may or may not have been
//! made.

use std::time::Duration;

use anyhow::{anyhow, Result};
use volume_format::control::messages::{Request, Response};

use control_client::{ControlClient, ControlClientError};

use super::progress::OPERATION_WAIT;

/// How often the server is asked whether it is alive.
pub const ALIVE_POLL: Duration = Duration::from_secs(5);

/// Sends `request` and waits for its answer as long as the server keeps
/// answering status requests; `what` names it in messages.
pub async fn request_while_alive(client: &ControlClient, request: Request, what: &str) -> Result<Response> {
    let answer = client.request_with_timeout(request, OPERATION_WAIT);
    tokio::pin!(answer);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ALIVE_POLL, ALIVE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told = false;
    loop {
        tokio::select! {
            result = &mut answer => return Ok(result?),
            _ = tick.tick() => {
                if !told {
                    told = true;
                    eprintln!("sanvol: {what}: waiting for the server (a cached volume's writes reach its devices first)");
                }
                if let Err(ControlClientError::Timeout(after)) = client.request(Request::PoolStatus).await {
                    return Err(anyhow!(
                        "the metadata server stopped answering (a status request got no answer within \
                         {after:?}); the change may or may not have been made: check before retrying"
                    ));
                }
            }
        }
    }
}
