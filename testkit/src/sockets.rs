//! Which process holds which loopback TCP socket, read from `/proc`. With several processes
//! listening on one port (SO_REUSEPORT) the kernel picks the process of each new connection; a
//! test that must reach a given process (a CancelRequest landing on the *other* gateway) opens
//! connections until one lands there, and this module says where each landed.
//!
//! Linux only, and the tests run as root (they read other processes' `/proc/<pid>/fd`).

use std::collections::HashSet;
use std::fs;

/// TCP states in `/proc/net/tcp` (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// One line of `/proc/net/tcp` (IPv4; the test processes listen on 127.0.0.1 only).
#[derive(Debug, Clone, Copy)]
struct TcpEntry {
    local_port: u16,
    remote_port: u16,
    state: u8,
    inode: u64,
}

fn tcp_table() -> Vec<TcpEntry> {
    let Ok(text) = fs::read_to_string("/proc/net/tcp") else {
        return Vec::new();
    };
    let port = |addr: &str| {
        addr.split(':')
            .nth(1)
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(TcpEntry {
                local_port: port(f.get(1)?)?,
                remote_port: port(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Socket inodes among the open files of `pid` (all its threads share one table).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let target = fs::read_link(e.ok()?.path()).ok()?;
        let t = target.to_str()?;
        t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// How many sockets listening on `port` process `pid` holds (one per core for a
/// thread-per-core server that is ready).
pub fn listeners_of(pid: u32, port: u16) -> usize {
    let mine = socket_inodes(pid);
    tcp_table()
        .iter()
        .filter(|e| e.state == TCP_LISTEN && e.local_port == port && mine.contains(&e.inode))
        .count()
}

/// Which of `pids` holds the server end of the loopback connection from `client_port` to
/// `server_port`; `None` while no one has accepted it yet (or it is gone).
pub fn accepted_by(pids: &[u32], server_port: u16, client_port: u16) -> Option<u32> {
    let inodes: Vec<u64> = tcp_table()
        .iter()
        .filter(|e| {
            e.state == TCP_ESTABLISHED
                && e.local_port == server_port
                && e.remote_port == client_port
                && e.inode != 0
        })
        .map(|e| e.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    pids.iter()
        .copied()
        .find(|&pid| inodes.iter().any(|i| socket_inodes(pid).contains(i)))
}

/// Everything the peer of `s` sends until it closes, or until `wait` passes with nothing more
/// (then `closed` is false); a reset counts as closed.
pub fn read_until_closed(
    s: &mut std::net::TcpStream,
    wait: std::time::Duration,
) -> (Vec<u8>, bool) {
    use std::io::Read;
    s.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (out, true),
            Err(_) => return (out, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn finds_our_own_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        assert_eq!(listeners_of(me, port), 1);
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let client_port = client.local_addr().unwrap().port();
        assert_eq!(accepted_by(&[1, me], port, client_port), Some(me));
        assert_eq!(accepted_by(&[me], port, client_port.wrapping_add(1)), None);
    }
}
