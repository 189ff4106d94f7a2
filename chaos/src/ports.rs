//! Free loopback ports for the node processes our tools start (`ephemera dev`, the chaos
//! harness, the benchmark harness, the tests).
//!
//! The problem: a port is chosen by binding port 0 and closing the listener, and the child
//! binds it later. Linux may hand the port of a listener just closed to the very next bind(0),
//! so a process choosing several ports in a row could give two nodes the same one (seen: two
//! `ephemera dev` nodes configured with one cluster port; the second failed to listen).
//!
//! The invariant: within a process, [`free_loopback_port`] never returns a port twice. A port
//! it has handed out is remembered; when bind(0) offers one again, that listener is kept open
//! (so the next bind(0) cannot offer it either) until a fresh port comes up. Another process
//! can still take a port between our close and the child's bind; that window is inherent to
//! choosing ports for children and is not what failed.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// How many already-handed-out ports one call tolerates before giving up.
const MAX_TRIES: usize = 64;

pub fn free_loopback_port() -> std::io::Result<u16> {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut given = GIVEN
        .get_or_init(Default::default)
        .lock()
        .expect("port registry lock");
    // Listeners on ports handed out before, held until this call returns.
    let mut held = Vec::new();
    for _ in 0..MAX_TRIES {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if given.insert(port) {
            return Ok(port);
        }
        held.push(listener);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no loopback port not already handed out after {MAX_TRIES} tries"),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_port_is_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let p = super::free_loopback_port().unwrap();
            assert!(seen.insert(p), "port {p} handed out twice");
        }
    }
}
