//! Free loopback ports for the processes a test starts.
//!
//! A port is found by binding `127.0.0.1:0` and releasing it; the kernel hands out ephemeral
//! ports in sequence, so two tests of one process asking at the same moment cannot get the same
//! one back, but a port released and not yet taken by its process could be handed out again.
//! A process-wide set remembers every port given out so that never happens within one test
//! binary. Another process (another test binary) may still race us; the ephemeral range is
//! large and test binaries run one after the other under `cargo test`, so that is left alone.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback TCP port that was free a moment ago and that no other caller in this process has
/// been given.
pub fn free_port() -> u16 {
    let mut given = handed_out().lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0 for a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of a bound listener")
            .port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no free loopback port after 1000 tries");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
    }
}
