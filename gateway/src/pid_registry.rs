//! The sessions of every gateway process listening on this machine's port, by virtual pid
//! (issue 11): several gateway processes share a port (`SO_REUSEPORT`), and a client may call
//! `pg_cancel_backend`/`pg_terminate_backend` with the pid of a session another process holds.
//! signals.rs needs that session's role, whether it is a superuser's and its cancel secret; the
//! signal itself then goes through the poolers as a client's cancel request does (every process
//! links to every pooler).
//!
//! A table in a shared file, one per machine and layout (`/dev/shm/tidepool-gateway-v1.sessions`,
//! mode 600, 8 MiB of address space whose pages are touched as sessions land on them; each slot
//! names its port, so gateways of other ports ignore it), one slot per pid: a session's pid is
//! drawn so that its slot (`pid % SLOTS`) is free, so a lookup reads one slot. Pids are drawn
//! with their slots low in the table ([`draw`]), in a window about twice the sessions held, so
//! the pages a process touches (and keeps resident) follow the sessions it holds rather than
//! filling all 8 MiB after a few thousand logins. Each slot is a
//! seqlock: `seq` odd while its owner writes it, even otherwise; a reader takes what it read only
//! if `seq` was the same even value before and after. A slot whose owning process is gone (it
//! crashed) is free. Touched at login, logout and by signalling calls on pids this process does
//! not hold, never on a request's path.
//!
//! Not shared: sessions past the table's room (a pid is tried `TRIES` times), a role name longer
//! than 63 bytes (Postgres's own limit), gateways on other machines, and gateways of another OS
//! user than the file's owner.

use std::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Slots in the table.
const SLOTS: usize = 1 << 16;
/// Pids tried for a free slot before the session is left out of the table.
pub const TRIES: usize = 16;
/// Bytes of a role name (`NAMEDATALEN - 1`).
const ROLE_BYTES: usize = 63;

#[repr(C)]
struct Slot {
    seq: AtomicU64,
    pid: AtomicI32,
    secret: AtomicI32,
    /// The owning gateway process.
    owner: AtomicU32,
    /// Bit 8: superuser; bits 0..8: the role name's length.
    flags: AtomicU32,
    role: [AtomicU64; 8],
    /// The port of the owner's listener.
    port: AtomicU32,
    /// The role's `pg_authid.oid` (0: not known yet, or a gateway that does not write it).
    oid: AtomicU32,
    _pad: [u32; 8],
}

const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
const _: () = assert!(SLOT_BYTES == 128);

/// What another process's session is, as signals.rs needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub user: String,
    pub superuser: bool,
    pub secret: i32,
    pub oid: u32,
}

pub struct Table {
    slots: &'static [Slot],
    me: u32,
    port: u32,
}

static TABLE: OnceLock<Table> = OnceLock::new();

/// Maps the table of `port` (once per process, at start); without it, nothing is shared.
pub fn open(port: u16) {
    let path = "/dev/shm/tidepool-gateway-v1.sessions";
    match Table::map(path, std::process::id(), port) {
        Ok(t) => {
            let _ = TABLE.set(t);
        }
        Err(e) => {
            tracing::warn!(path, error = %e, "session table not shared with other gateway processes on this port")
        }
    }
}

/// A pid of at least `first` whose slot is one of the first `window` (at most all of them):
/// uniform over the window, and over the pids that share a slot.
pub fn draw(window: usize, first: i32) -> i32 {
    let slot = (rand::random::<u32>() as usize % window.clamp(1, SLOTS)) as u32;
    let slots = SLOTS as u32;
    let lo = (first.max(0) as u32).div_ceil(slots);
    let hi = (i32::MAX as u32 - slot) / slots;
    let k = lo + rand::random::<u32>() % (hi - lo + 1);
    (k * slots + slot) as i32
}

/// The window [`draw`] draws from for a process holding `held` sessions, after `failed` tries
/// found the slot taken: twice the sessions and a margin (so a try finds a free slot about half
/// the time or better), doubled after every four taken slots (other processes' sessions share
/// the low slots).
pub fn window(held: usize, failed: usize) -> usize {
    ((2 * held + 512) << (failed / 4).min(16)).min(SLOTS)
}

pub fn table() -> Option<&'static Table> {
    TABLE.get()
}

/// Whether process `pid` exists (a slot of a dead owner is free).
fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Table {
    fn map(path: &str, me: u32, port: u16) -> std::io::Result<Table> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // /dev/shm is world-writable: never follow a link planted there.
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // A file someone else made (or opened up) would let them read cancel secrets and plant
        // sessions: share only our own, private one.
        {
            use std::os::unix::fs::MetadataExt;
            let m = file.metadata()?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            if m.uid() != euid || m.mode() & 0o077 != 0 || !m.file_type().is_file() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{path} is not a private file of this user (owner {}, mode {:o})",
                        m.uid(),
                        m.mode() & 0o7777
                    ),
                ));
            }
        }
        let len = SLOTS * SLOT_BYTES;
        if file.metadata()?.len() < len as u64 {
            file.set_len(len as u64)?;
        }
        // SAFETY: a shared mapping of a file we opened read-write, `len` bytes long; it lives
        // for the rest of the process (never unmapped), so the slice below stays valid. The
        // file starts zeroed (an empty slot is all zeroes) and every field is an atomic.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: see above; `Slot` is `repr(C)` of atomics, valid for any bytes.
        let slots = unsafe { std::slice::from_raw_parts(p as *const Slot, SLOTS) };
        Ok(Table {
            slots,
            me,
            port: port as u32,
        })
    }

    fn slot(&self, pid: i32) -> &Slot {
        &self.slots[pid as u32 as usize % SLOTS]
    }

    /// Takes `pid`'s slot for a session of `user` if it is free; false if it is not (the
    /// caller draws another pid).
    pub fn claim(&self, pid: i32, user: &str, secret: i32) -> bool {
        let s = self.slot(pid);
        let seq = s.seq.load(Ordering::Acquire);
        if seq % 2 == 1 {
            return false;
        }
        let (held, owner) = (
            s.pid.load(Ordering::Relaxed),
            s.owner.load(Ordering::Relaxed),
        );
        if held != 0 && alive(owner) {
            return false;
        }
        if s.seq
            .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Ours to write; nobody claimed it between the check and the exchange (seq unchanged).
        s.pid.store(pid, Ordering::Relaxed);
        s.secret.store(secret, Ordering::Relaxed);
        s.owner.store(self.me, Ordering::Relaxed);
        s.port.store(self.port, Ordering::Relaxed);
        s.oid.store(0, Ordering::Relaxed);
        let role = user.as_bytes();
        let n = if role.len() <= ROLE_BYTES {
            role.len()
        } else {
            0
        };
        let mut words = [0u8; 64];
        words[..n].copy_from_slice(&role[..n]);
        for (i, w) in s.role.iter().enumerate() {
            let bytes: [u8; 8] = words[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]);
            w.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        // A role too long to keep: no lookup finds it (an empty name matches no session).
        s.flags.store(n as u32, Ordering::Relaxed);
        s.seq.store(seq + 2, Ordering::Release);
        true
    }

    /// Marks `pid`'s session a superuser's or not, and its role's oid (known once it logged
    /// in).
    pub fn set_role(&self, pid: i32, superuser: bool, oid: u32) {
        self.rewrite(pid, |s| {
            let f = s.flags.load(Ordering::Relaxed) & 0xff;
            s.flags
                .store(f | if superuser { 0x100 } else { 0 }, Ordering::Relaxed);
            s.oid.store(oid, Ordering::Relaxed);
        });
    }

    /// Frees `pid`'s slot (the session ended).
    pub fn release(&self, pid: i32) {
        self.rewrite(pid, |s| s.pid.store(0, Ordering::Relaxed));
    }

    /// Runs `f` on `pid`'s slot if this process holds it, as its writer.
    fn rewrite(&self, pid: i32, f: impl FnOnce(&Slot)) {
        let s = self.slot(pid);
        let seq = s.seq.load(Ordering::Acquire);
        if seq % 2 == 1
            || s.pid.load(Ordering::Relaxed) != pid
            || s.owner.load(Ordering::Relaxed) != self.me
        {
            return;
        }
        // Only the owner writes a held slot: the exchange cannot fail but for a bug elsewhere.
        if s.seq
            .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        f(s);
        s.seq.store(seq + 2, Ordering::Release);
    }

    /// The session `pid` of another living process, if the table has it.
    pub fn lookup(&self, pid: i32) -> Option<Entry> {
        let s = self.slot(pid);
        for _ in 0..4 {
            let seq = s.seq.load(Ordering::Acquire);
            if seq % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let held = s.pid.load(Ordering::Relaxed);
            let secret = s.secret.load(Ordering::Relaxed);
            let owner = s.owner.load(Ordering::Relaxed);
            let flags = s.flags.load(Ordering::Relaxed);
            let port = s.port.load(Ordering::Relaxed);
            let oid = s.oid.load(Ordering::Relaxed);
            let mut words = [0u8; 64];
            for (i, w) in s.role.iter().enumerate() {
                words[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) != seq {
                continue;
            }
            let n = (flags & 0xff) as usize;
            if held != pid || port != self.port || owner == self.me || n == 0 || !alive(owner) {
                return None;
            }
            let user = std::str::from_utf8(&words[..n]).ok()?.to_string();
            return Some(Entry {
                user,
                superuser: flags & 0x100 != 0,
                secret,
                oid,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_processes() -> (Table, Table, String) {
        let path = format!(
            "/dev/shm/tidepool-gateway-test-{}-{}.sessions",
            std::process::id(),
            rand::random::<u32>()
        );
        // Two mappings of one file, as two processes have: "owners" are this process and its
        // parent (both alive).
        let a = Table::map(&path, std::process::id(), 5432).unwrap();
        let b = Table::map(&path, std::os::unix::process::parent_id(), 5432).unwrap();
        (a, b, path)
    }

    #[test]
    fn a_session_of_one_process_is_found_by_another() {
        let (a, b, path) = two_processes();
        let pid = (1 << 22) + 12345;
        assert!(a.claim(pid, "alice", 77));
        // The same slot is not free for anyone else while its owner lives.
        assert!(!b.claim(pid, "bob", 1));
        assert!(!b.claim(pid + SLOTS as i32, "bob", 1));
        // Its owner does not look itself up there (its own registry has the session).
        assert_eq!(a.lookup(pid), None);
        let want = Entry {
            user: "alice".into(),
            superuser: false,
            secret: 77,
            oid: 0,
        };
        assert_eq!(b.lookup(pid), Some(want.clone()));
        // Another pid of the same slot is nobody's.
        assert_eq!(b.lookup(pid + SLOTS as i32), None);
        a.set_role(pid, true, 16390);
        assert_eq!(
            b.lookup(pid),
            Some(Entry {
                superuser: true,
                oid: 16390,
                ..want
            })
        );
        // Only the owner writes it.
        b.release(pid);
        assert!(b.lookup(pid).is_some());
        a.release(pid);
        assert_eq!(b.lookup(pid), None);
        assert!(b.claim(pid, "bob", 5));
        assert_eq!(a.lookup(pid).map(|e| e.user), Some("bob".into()));
        // A gateway of another port does not see it.
        let other_port = Table::map(&path, std::process::id(), 6543).unwrap();
        assert_eq!(other_port.lookup(pid), None);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_slot_of_a_dead_process_is_free_and_long_names_are_not_kept() {
        let (a, _, path) = two_processes();
        // No process has pid 0x7ffffff0 (above Linux's pid_max).
        let dead = Table::map(&path, 0x7fff_fff0, 5432).unwrap();
        let pid = (1 << 22) + 999;
        assert!(dead.claim(pid, "ghost", 1));
        assert_eq!(a.lookup(pid), None);
        assert!(a.claim(pid, "alice", 2));
        let long = "r".repeat(64);
        let other = (1 << 22) + 1000;
        let (_, b, path2) = two_processes();
        let a2 = Table::map(&path2, std::process::id(), 5432).unwrap();
        assert!(b.claim(other, &long, 3));
        assert_eq!(a2.lookup(other), None);
        let _ = std::fs::remove_file(path2);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_shared_file_others_can_read_or_a_link_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = format!(
            "/dev/shm/tidepool-gateway-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let open = format!("{base}.open");
        std::fs::write(&open, b"").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(Table::map(&open, std::process::id(), 5432).is_err());
        let link = format!("{base}.link");
        let target = format!("{base}.target");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(Table::map(&link, std::process::id(), 5432).is_err());
        assert!(
            !std::path::Path::new(&target).exists(),
            "nothing made through the link"
        );
        for f in [open, link] {
            let _ = std::fs::remove_file(f);
        }
    }

    #[test]
    fn pids_are_drawn_low_in_the_table_and_in_range() {
        let first = 1 << 22;
        for window in [1, 600, 10_000, SLOTS, 10 * SLOTS] {
            for _ in 0..2000 {
                let pid = draw(window, first);
                assert!(pid >= first, "{pid}");
                assert!((pid as usize % SLOTS) < window.min(SLOTS), "{pid} {window}");
            }
        }
        // Both ends of the range are reachable: the highest pid of the last slot fits an i32.
        assert!((i32::MAX as u32 - (SLOTS as u32 - 1)) / SLOTS as u32 * SLOTS as u32 > 0);
        assert_eq!(window(0, 0), 512);
        assert_eq!(window(1000, 0), 2512);
        assert_eq!(window(1000, 3), 2512);
        assert_eq!(window(1000, 4), 5024);
        assert_eq!(window(1000, 15), 20096);
        assert_eq!(window(1000, 80), SLOTS);
        assert_eq!(window(100_000, 0), SLOTS);
    }
}
