//! Free loopback ports for the node processes our tools start (`ephemera dev`, the chaos
//! harness, the benchmark harness, the tests, and the `sshd` the SSH tests run).
//!
//! The problem: the port is chosen here and bound later by a child process. Chosen the usual
//! way (bind port 0, close, hand the number on), the port is free for anyone in between: Linux
//! hands recently closed ports to the next bind(0), in this process or another one. With many
//! tests starting clusters at once, two nodes were given one port and the second could not
//! listen (seen twice: within one `ephemera dev`, and across concurrent ones).
//!
//! The invariant: a port handed out is reserved until the process that chose it exits, and no
//! other allocator and no kernel-chosen port can take it meanwhile. Ports come from below the
//! kernel's ephemeral range (`ip_local_port_range`), so bind(0) and outgoing connections never
//! pick them; a reservation is an exclusive `flock` on `<tmp>/ephemera-ports/<port>.lock`,
//! held by this process (the descriptor is close-on-exec and never closed) and released by the
//! kernel when it exits, so a crashed process leaks nothing. A candidate is also checked to be
//! bindable, in case something else listens there.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

/// Reserved ports are drawn from `[LOW, the ephemeral range's start)`.
const LOW: u16 = 10_000;
const MAX_TRIES: usize = 2_000;

/// The lock files this process holds (one per reserved port), kept open for its lifetime.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub fn free_loopback_port() -> std::io::Result<u16> {
    let high = ephemeral_start();
    if high <= LOW + 100 {
        return Err(std::io::Error::other(format!(
            "the ephemeral port range starts at {high}: no room below it for reserved ports"
        )));
    }
    let dir = std::env::temp_dir().join("ephemera-ports");
    std::fs::create_dir_all(&dir)?;
    let mut held = HELD.lock().expect("port registry lock");
    for _ in 0..MAX_TRIES {
        let port = rand::random::<u16>() % (high - LOW) + LOW;
        let file = File::create(dir.join(format!("{port}.lock")))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        // Locks of two open descriptions conflict even within one process, so this refuses
        // this process's own reservations too.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue; // something not using this allocator listens there
        }
        held.push(file);
        return Ok(port);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {LOW}..{high} after {MAX_TRIES} tries"),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reserved_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let high = super::ephemeral_start();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = super::free_loopback_port().unwrap();
            assert!((super::LOW..high).contains(&p), "{p}");
            assert!(seen.insert(p), "port {p} handed out twice");
            std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
        // Another process cannot reserve them while this one lives: its flock would fail.
        let dir = std::env::temp_dir().join("ephemera-ports");
        let p = *seen.iter().next().unwrap();
        let out = std::process::Command::new("flock")
            .args(["-n"])
            .arg(dir.join(format!("{p}.lock")))
            .arg("true")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "another process took reserved port {p}"
        );
    }
}
