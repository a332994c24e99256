//! Pre-authentication limits (issue 16): a flood of idle connections from
//! one peer — more than the server has session slots — does not keep an
//! agent from resuming its handle, and the server closes every idle
//! connection by its handshake deadline.

mod common;

use std::time::Duration;

use common::{Pool, MIB};
use metadata_server::server::admission::HANDSHAKE_DEADLINE;
use metadata_server::server::SESSIONS_MAX;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use volume_format::control::auth::Role;
use volume_format::control::messages::{OpenMode, Request, Response};

/// More idle connections than the server has session slots: before
/// admission control, they held every slot and the agent was turned away.
const FLOOD: usize = SESSIONS_MAX + 100;

/// Lets this process hold the flood's sockets (both ends, the server being
/// embedded), whatever the soft limit it was started with.
fn raise_fd_limit(needed: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < needed {
            assert!(lim.rlim_max >= needed, "the hard open-file limit {} is below {needed}", lim.rlim_max);
            lim.rlim_cur = needed;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_peer_do_not_keep_an_agent_from_resuming() {
    raise_fd_limit(2 * FLOOD as u64 + 512);
    let pool = Pool::start(10_000).await;
    let admin = pool.admin().await;
    admin.request(Request::VolumeCreate { name: "v".into(), size_bytes: 4 * MIB, legs: 1 }).await.unwrap();
    admin.close().await;
    let (agent, _events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    let Response::Opened(opened) =
        agent.request(Request::Open { volume: "v".into(), mode: OpenMode::Exclusive }).await.unwrap()
    else {
        panic!("open")
    };
    agent.close().await;

    // The same peer (this process's uid) opens more connections than the
    // server has slots, and says nothing on any of them.
    let socket = pool.dir.path().join("mds.sock");
    let mut idle = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        idle.push(UnixStream::connect(&socket).await.unwrap());
    }

    // The agent comes back (from the same peer) and resumes its handle.
    let (agent, _events) = pool.connect(&pool.agent_a, Role::Agent, "host-a").await;
    match agent.request(Request::Resume { key: opened.resume_key.clone() }).await.unwrap() {
        Response::Opened(h) => assert_eq!(h.handle, opened.handle),
        other => panic!("resume answered {other:?}"),
    }

    // Every idle connection is closed by the server: most at once to make
    // room, the newest few at the handshake deadline.
    let all_closed = async {
        for mut s in idle {
            let mut b = [0u8; 1];
            let n = s.read(&mut b).await.unwrap_or(0);
            assert_eq!(n, 0, "an idle connection got bytes from the server");
        }
    };
    tokio::time::timeout(HANDSHAKE_DEADLINE + Duration::from_secs(10), all_closed)
        .await
        .expect("the server closed every idle connection by its handshake deadline");
    // And the agent's session is untouched by all that.
    assert!(matches!(agent.request(Request::Renew).await.unwrap(), Response::Lease { .. }));
}
