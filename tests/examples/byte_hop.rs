//! A transparent byte hop: the floor any userspace hop costs on a machine.
//!
//! `bench/agent.sh` puts this between fio and the device, next to the agent,
//! nbdkit's proxy and the direct path, in the same run. It parses nothing:
//! every connection accepted on LISTEN gets a connection to UPSTREAM, and
//! two threads move bytes, one per direction — with `splice(2)` through a
//! pipe (the bytes never enter this process) or with `read`/`write` through
//! a buffer. An NBD-aware hop (the agent, nbdkit's `nbd` plugin) does at
//! least this much per request, so agent / this hop says how close the
//! agent's data path is to the machine's limit.
//!
//! Usage: `byte_hop LISTEN.sock UPSTREAM.sock splice|copy`

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

/// Pipe size asked for in splice mode: a 1 MiB payload moves in one go.
const PIPE_BYTES: libc::c_int = 1 << 20;
/// Buffer per direction in copy mode.
const COPY_BYTES: usize = 1 << 20;

#[derive(Clone, Copy)]
enum Mode {
    Splice,
    Copy,
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (listen, upstream, mode) = match args.as_slice() {
        [_, l, u, m] if m == "splice" => (l.clone(), u.clone(), Mode::Splice),
        [_, l, u, m] if m == "copy" => (l.clone(), u.clone(), Mode::Copy),
        _ => {
            eprintln!("usage: byte_hop LISTEN.sock UPSTREAM.sock splice|copy");
            std::process::exit(2);
        }
    };
    let _ = std::fs::remove_file(&listen);
    let listener = UnixListener::bind(&listen)?;
    // The benchmark scripts wait for this line.
    println!("ready listen={listen}");
    std::io::stdout().flush()?;
    for client in listener.incoming() {
        let client = client?;
        let server = match UnixStream::connect(&upstream) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("byte_hop: connecting to {upstream}: {e}");
                continue;
            }
        };
        let (c2, s2) = (client.try_clone()?, server.try_clone()?);
        thread::spawn(move || forward(client, server, mode));
        thread::spawn(move || forward(s2, c2, mode));
    }
    Ok(())
}

/// Moves bytes from `from` to `to` until either side closes, then shuts
/// both down so the other direction ends too.
fn forward(mut from: UnixStream, mut to: UnixStream, mode: Mode) {
    let result = match mode {
        Mode::Splice => splice_loop(&from, &to),
        Mode::Copy => copy_loop(&mut from, &mut to),
    };
    if let Err(e) = result {
        if e.kind() != std::io::ErrorKind::BrokenPipe && e.kind() != std::io::ErrorKind::ConnectionReset {
            eprintln!("byte_hop: {e}");
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn copy_loop(from: &mut UnixStream, to: &mut UnixStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; COPY_BYTES];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

fn splice_loop(from: &UnixStream, to: &UnixStream) -> std::io::Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (pipe_rd, pipe_wr) = (fds[0], fds[1]);
    // SAFETY: fcntl on a pipe we own; failure only leaves the default size.
    unsafe { libc::fcntl(pipe_wr, libc::F_SETPIPE_SZ, PIPE_BYTES) };
    let result = (|| loop {
        let n = splice(from.as_raw_fd(), pipe_wr, PIPE_BYTES as usize)?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = splice(pipe_rd, to.as_raw_fd(), left)?;
            if m == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            left -= m;
        }
    })();
    // SAFETY: both ends are ours and closed once.
    unsafe {
        libc::close(pipe_rd);
        libc::close(pipe_wr);
    }
    result
}

fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> std::io::Result<usize> {
    loop {
        // SAFETY: plain fds, no offsets (both ends are sockets or pipes).
        let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
