//! The topology store against real back ends: the file store (two handles, as two control
//! processes on one machine would hold) and a real etcd (Debian's etcd-server) started on free
//! loopback ports with a fresh data directory.
//!
//! The same checks run on both: compare-and-swap conflicts, no lost update under concurrent
//! writers, exclusive leadership with expiry handing it over, and resigning. For etcd also:
//! a killed etcd gives errors (not hangs), and so does a frozen one (every call is bounded).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tidepool::topology::{
    EtcdStore, FileStore, LockAttempt, NodeRecord, Store, StoreError, TermRecord, Topology,
};

/// A fresh directory, removed however the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("tp-topo-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn topology(term: u64, primary: &str) -> Topology {
    Topology {
        cluster: "test".into(),
        term,
        primary: Some(primary.into()),
        primary_term: term,
        nodes: ["node1", "node2", "node3"]
            .iter()
            .enumerate()
            .map(|(i, n)| NodeRecord {
                name: n.to_string(),
                zone: format!("z{}", i % 2),
                pooler: format!("127.0.0.1:{}", 16000 + i).parse().unwrap(),
                agent: format!("127.0.0.1:{}", 17000 + i).parse().unwrap(),
                pg_port: 5432 + i as u16,
                data_dir: format!("/nonexistent/{n}").into(),
            })
            .collect(),
        policy: "any 2".into(),
        history: vec![TermRecord {
            term,
            primary: primary.into(),
            at_unix_ms: 1,
            reason: "test".into(),
        }],
        overrides: vec![],
    }
}

/// Two handles: the second writer loses until it reloads; versions move on every write.
async fn cas_conflict(a: &Store, b: &Store) {
    assert!(a.load().await.unwrap().is_none());
    assert!(b.load().await.unwrap().is_none());
    assert!(a
        .compare_and_swap(None, &topology(1, "node1"))
        .await
        .unwrap());
    // b still believes nothing is stored.
    assert!(!b
        .compare_and_swap(None, &topology(1, "node2"))
        .await
        .unwrap());
    let (seen, v1) = b.load().await.unwrap().expect("stored");
    assert_eq!(seen, topology(1, "node1"));
    assert!(b
        .compare_and_swap(Some(v1), &topology(2, "node2"))
        .await
        .unwrap());
    // a's version is stale now.
    assert!(!a
        .compare_and_swap(Some(v1), &topology(3, "node3"))
        .await
        .unwrap());
    let (now, v2) = a.load().await.unwrap().expect("stored");
    assert_eq!(now, topology(2, "node2"));
    assert_ne!(v1, v2);
    assert!(a
        .compare_and_swap(Some(v2), &topology(3, "node3"))
        .await
        .unwrap());
    assert_eq!(b.load().await.unwrap().expect("stored").0.term, 3);
}

/// Two writers each add 1 to the term `per_writer` times with load + CAS (bounded retries):
/// no increment may be lost.
async fn no_lost_update(a: Store, b: Store, per_writer: u64) {
    let start = a.load().await.unwrap().map(|(t, _)| t.term).unwrap_or(0);
    let writer = |s: Store| {
        tokio::spawn(async move {
            let mut done = 0;
            let mut conflicts = 0;
            for _ in 0..per_writer * 20 {
                if done == per_writer {
                    break;
                }
                let (mut t, v) = s.load().await.unwrap().expect("stored");
                t.term += 1;
                if s.compare_and_swap(Some(v), &t).await.unwrap() {
                    done += 1;
                } else {
                    conflicts += 1;
                }
            }
            (done, conflicts)
        })
    };
    let (ra, rb) = (writer(a.clone()), writer(b));
    let (da, ca) = ra.await.unwrap();
    let (db, cb) = rb.await.unwrap();
    assert_eq!((da, db), (per_writer, per_writer), "conflicts {ca} + {cb}");
    let end = a.load().await.unwrap().expect("stored").0.term;
    assert_eq!(end, start + 2 * per_writer, "conflicts {ca} + {cb}");
}

/// One leader at a time; a leader that stops renewing is replaced after its ttl; resigning
/// frees leadership at once.
async fn leadership(a: &Store, b: &Store, ttl: Duration) {
    let la = a
        .campaign("control-a", ttl)
        .await
        .unwrap()
        .expect("a leads");
    assert!(b.campaign("control-b", ttl).await.unwrap().is_none());
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("control-a"));
    assert!(a.renew(&la).await.unwrap());
    assert!(a.is_leader(&la).await.unwrap());
    // Campaigning again as the leader keeps leadership.
    let la = a
        .campaign("control-a", ttl)
        .await
        .unwrap()
        .expect("still a");
    assert!(a.is_leader(&la).await.unwrap());

    // a stops renewing (a stuck or dead control process): b takes over after the ttl.
    let started = Instant::now();
    let lb = loop {
        if let Some(lb) = b.campaign("control-b", ttl).await.unwrap() {
            break lb;
        }
        assert!(
            started.elapsed() < ttl * 4 + Duration::from_secs(5),
            "b never took over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        started.elapsed() >= ttl / 2,
        "b took over long before the ttl"
    );
    assert!(!a.is_leader(&la).await.unwrap());
    assert!(!a.renew(&la).await.unwrap(), "a lapsed leader cannot renew");
    assert!(b.is_leader(&lb).await.unwrap());
    assert!(a.campaign("control-a", ttl).await.unwrap().is_none());
    assert_eq!(a.leader().await.unwrap().as_deref(), Some("control-b"));

    // Resigning hands over without waiting.
    b.resign(lb.clone()).await.unwrap();
    assert!(!b.is_leader(&lb).await.unwrap());
    let la = a
        .campaign("control-a", ttl)
        .await
        .unwrap()
        .expect("a leads again");
    assert!(a.is_leader(&la).await.unwrap());
    a.resign(la).await.unwrap();
    assert_eq!(a.leader().await.unwrap(), None);
}

fn file_stores(dir: &TempDir) -> (Store, Store) {
    let path = dir.0.join("topology.json");
    (
        Store::File(FileStore::new(&path)),
        Store::File(FileStore::new(&path)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_cas_conflict_between_two_handles() {
    let dir = TempDir::new("cas");
    let (a, b) = file_stores(&dir);
    cas_conflict(&a, &b).await;
    no_lost_update(a, b, 25).await;
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_leadership_is_exclusive_and_expires() {
    let dir = TempDir::new("lead");
    let (a, b) = file_stores(&dir);
    leadership(&a, &b, Duration::from_millis(800)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_corrupt_file_is_a_clear_error() {
    let dir = TempDir::new("corrupt");
    let (a, _) = file_stores(&dir);
    std::fs::write(dir.0.join("topology.json"), b"{\"version\": 1, \"topo").unwrap();
    let e = a.load().await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("topology.json"), "{e}");
    // A CAS does not overwrite what it cannot read.
    assert!(a
        .compare_and_swap(Some(1), &topology(1, "node1"))
        .await
        .is_err());
    // A missing directory is an I/O error naming the path.
    let gone = Store::File(FileStore::new(dir.0.join("missing/topology.json")));
    let e = gone
        .compare_and_swap(None, &topology(1, "node1"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
}

/// A store on the test's etcd (testkit::Etcd: a real etcd on free loopback ports).
fn etcd_store(etcd: &testkit::Etcd, timeout: Duration) -> Store {
    Store::Etcd(EtcdStore::new(&etcd.url, "test", timeout).expect("etcd url"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_cas_and_leadership() {
    let etcd = testkit::Etcd::start();
    let (a, b) = (
        etcd_store(&etcd, Duration::from_secs(5)),
        etcd_store(&etcd, Duration::from_secs(5)),
    );
    cas_conflict(&a, &b).await;
    no_lost_update(a.clone(), b.clone(), 25).await;
    // etcd's shortest lease is about 2 s; a ttl under it would be raised anyway.
    leadership(&a, &b, Duration::from_secs(2)).await;
    // A leader that renews keeps leadership past several ttls.
    let la = a
        .campaign("control-a", Duration::from_secs(2))
        .await
        .unwrap()
        .expect("a");
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(a.renew(&la).await.unwrap());
        assert!(b
            .campaign("control-b", Duration::from_secs(2))
            .await
            .unwrap()
            .is_none());
    }
    a.resign(la).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_or_frozen_gives_errors_not_hangs() {
    let mut etcd = testkit::Etcd::start();
    let timeout = Duration::from_millis(1500);
    let s = etcd_store(&etcd, timeout);
    assert!(s
        .compare_and_swap(None, &topology(1, "node1"))
        .await
        .unwrap());
    let (_, v) = s.load().await.unwrap().expect("stored");
    let l = s
        .campaign("control-a", Duration::from_secs(2))
        .await
        .unwrap()
        .expect("leads");

    // Frozen: the port accepts (the kernel does), nothing answers: every call times out.
    etcd.signal("STOP");
    let bound = timeout + Duration::from_secs(5);
    let e = tokio::time::timeout(bound, s.load())
        .await
        .expect("load bounded")
        .unwrap_err();
    assert!(matches!(e, StoreError::Timeout { .. }), "{e:?}");
    let e = tokio::time::timeout(bound, s.compare_and_swap(Some(v), &topology(2, "node2")))
        .await
        .expect("cas bounded")
        .unwrap_err();
    assert!(matches!(e, StoreError::Timeout { .. }), "{e:?}");
    let e = tokio::time::timeout(bound, s.renew(&l))
        .await
        .expect("renew bounded")
        .unwrap_err();
    assert!(matches!(e, StoreError::Timeout { .. }), "{e:?}");

    // Killed: connection refused, an error at once.
    etcd.signal("CONT");
    etcd.kill();
    let e = tokio::time::timeout(bound, s.load())
        .await
        .expect("load bounded")
        .unwrap_err();
    assert!(matches!(e, StoreError::Etcd { .. }), "{e:?}");
    assert!(e.to_string().contains("127.0.0.1"), "{e}");
    let e = tokio::time::timeout(bound, s.compare_and_swap(Some(v), &topology(2, "node2")))
        .await
        .expect("cas bounded")
        .unwrap_err();
    assert!(matches!(e, StoreError::Etcd { .. }), "{e:?}");
    let e = tokio::time::timeout(bound, s.campaign("control-b", Duration::from_secs(2)))
        .await
        .expect("campaign bounded")
        .unwrap_err();
    assert!(matches!(e, StoreError::Etcd { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backup_lock_is_one_at_a_time_and_lapses_with_a_dead_holder() {
    let etcd = testkit::Etcd::start();
    let (a, b) = (
        etcd_store(&etcd, Duration::from_secs(5)),
        etcd_store(&etcd, Duration::from_secs(5)),
    );
    let ttl = Duration::from_secs(2);
    let (ida, idb) = ("backup host-a pid 1", "backup host-b pid 2");
    let LockAttempt::Taken(la) = a.lock_backup(ida, ttl).await.unwrap() else {
        panic!("a takes the free lock");
    };
    assert_eq!(
        b.lock_backup(idb, ttl).await.unwrap(),
        LockAttempt::HeldBy(ida.into())
    );
    // Kept alive, it holds past several ttls.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(a.keep_backup_lock(&la).await.unwrap());
        assert_eq!(
            b.lock_backup(idb, ttl).await.unwrap(),
            LockAttempt::HeldBy(ida.into())
        );
    }
    // Given up, the other takes it at once.
    a.unlock_backup(la).await.unwrap();
    let LockAttempt::Taken(lb) = b.lock_backup(idb, ttl).await.unwrap() else {
        panic!("b takes the released lock");
    };
    // Its holder dies (no more keep-alives): the lock lapses within a few seconds.
    let start = Instant::now();
    loop {
        match a.lock_backup(ida, ttl).await.unwrap() {
            LockAttempt::Taken(_) => break,
            LockAttempt::HeldBy(h) => assert_eq!(h, idb),
            LockAttempt::Local => panic!("etcd is not local"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the dead holder's lock did not lapse"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!b.keep_backup_lock(&lb).await.unwrap(), "b's lease lapsed");

    // The file store is one machine's: the lock file covers it.
    let dir = TempDir::new("backup-lock");
    let f = Store::File(FileStore::new(dir.0.join("topology.json")));
    assert_eq!(f.lock_backup(ida, ttl).await.unwrap(), LockAttempt::Local);
}

/// `openssl` with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In `d`: two CAs (`ca.pem`, `other-ca.pem`, with their keys) and etcd's certificate for
/// 127.0.0.1 issued by the first (`server.pem`, `server.key`).
fn test_pki(d: &std::path::Path) {
    for ca in ["ca", "other-ca"] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
         extendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
}

/// In `d`: a client certificate for `name` issued by `ca.pem` (`NAME.pem`, `NAME.key`, mode
/// 600).
fn client_certificate(d: &std::path::Path, name: &str) {
    use std::os::unix::fs::PermissionsExt;
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(
        d.join(format!("{name}.ext")),
        "basicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
    std::fs::set_permissions(
        d.join(format!("{name}.key")),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

/// etcd over TLS with authentication (`[etcd_access]`, issue 12 §1): a store with the CA and a
/// user granted only `/tidepool/` does compare-and-swap and leadership, and keeps working when
/// its token lapses (etcd here forgets a token after one idle second); without a user, with a
/// wrong password, or with another CA it gets a clear error, not an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_over_tls_with_a_user() {
    use std::os::unix::fs::PermissionsExt;
    use tidepool::config::EtcdAccess;
    let dir = TempDir::new("etcd-tls");
    let d = dir.0.as_path();
    test_pki(d);
    let etcd = testkit::Etcd::start_tls(
        &d.join("server.pem"),
        &d.join("server.key"),
        &d.join("ca.pem"),
    );
    assert!(etcd.url.starts_with("https://"), "{}", etcd.url);
    etcd.enable_auth("tp", "tp-pw");
    let password = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let access = EtcdAccess {
        ca_file: Some(d.join("ca.pem")),
        user: Some("tp".into()),
        password_file: Some(password("tp.password", "tp-pw\n")),
        ..EtcdAccess::default()
    };
    let store = |access: &EtcdAccess| {
        EtcdStore::new(&etcd.url, "test", Duration::from_secs(5))
            .and_then(|s| s.with_access(access))
            .map(Store::Etcd)
    };
    let (a, b) = (store(&access).unwrap(), store(&access).unwrap());
    cas_conflict(&a, &b).await;
    leadership(&a, &b, Duration::from_secs(2)).await;
    // The token lapses after a second without use: the next call authenticates again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, version) = a.load().await.unwrap().expect("a stored topology");
    assert!(a
        .compare_and_swap(Some(version), &topology(9, "node2"))
        .await
        .unwrap());

    // No user: etcd refuses.
    let anonymous = store(&EtcdAccess {
        user: None,
        password_file: None,
        ..access.clone()
    })
    .unwrap();
    let e = anonymous.load().await.unwrap_err().to_string();
    assert!(e.contains("user name is empty"), "{e}");
    // A wrong password: refused, saying so.
    let wrong = store(&EtcdAccess {
        password_file: Some(password("wrong.password", "nope")),
        ..access.clone()
    })
    .unwrap();
    let e = wrong.load().await.unwrap_err().to_string();
    assert!(
        e.contains("authenticating as \"tp\"") && e.contains("invalid user ID or password"),
        "{e}"
    );
    // A CA that did not issue etcd's certificate: no connection.
    let stranger = store(&EtcdAccess {
        ca_file: Some(d.join("other-ca.pem")),
        ..access.clone()
    })
    .unwrap();
    let e = stranger.load().await.unwrap_err().to_string();
    assert!(
        e.contains("TLS handshake") && e.contains("certificate"),
        "{e}"
    );
    // A password file others may read is refused before anything is sent.
    let open = password("open.password", "tp-pw");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = store(&EtcdAccess {
        password_file: Some(open),
        ..access
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("chmod 600"), "{e}");
}

/// etcd requiring client certificates (`--client-cert-auth`) with auth enabled: a store with a
/// certificate whose common name is a user granted only `/tidepool/` (`cert_file`, `key_file`,
/// no password) does compare-and-swap and leadership; without a certificate it gets an error,
/// not an answer; a key file others may read is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_with_a_client_certificate() {
    use std::os::unix::fs::PermissionsExt;
    use tidepool::config::EtcdAccess;
    let dir = TempDir::new("etcd-mtls");
    let d = dir.0.as_path();
    test_pki(d);
    client_certificate(d, "root");
    client_certificate(d, "tp");
    let etcd = testkit::Etcd::start_client_cert_auth(
        &d.join("server.pem"),
        &d.join("server.key"),
        &d.join("ca.pem"),
        &d.join("root.pem"),
        &d.join("root.key"),
    );
    etcd.enable_auth("tp", "unused-pw");
    let access = EtcdAccess {
        ca_file: Some(d.join("ca.pem")),
        cert_file: Some(d.join("tp.pem")),
        key_file: Some(d.join("tp.key")),
        ..EtcdAccess::default()
    };
    let store = |access: &EtcdAccess| {
        EtcdStore::new(&etcd.url, "test", Duration::from_secs(5))
            .and_then(|s| s.with_access(access))
            .map(Store::Etcd)
    };
    let (a, b) = (store(&access).unwrap(), store(&access).unwrap());
    cas_conflict(&a, &b).await;
    leadership(&a, &b, Duration::from_secs(2)).await;

    // A certificate of the same CA for a name that is no etcd user: refused (etcd takes the
    // common name as the user).
    client_certificate(d, "nobody");
    let nobody = store(&EtcdAccess {
        cert_file: Some(d.join("nobody.pem")),
        key_file: Some(d.join("nobody.key")),
        ..access.clone()
    })
    .unwrap();
    let e = nobody.load().await.unwrap_err().to_string();
    assert!(e.contains("permission denied"), "{e}");
    // No certificate: etcd closes the connection (under TLS 1.3 after the handshake, so
    // rustls has no certificate error to give): an error, not a timeout.
    let anonymous = store(&EtcdAccess {
        cert_file: None,
        key_file: None,
        ..access.clone()
    })
    .unwrap();
    let e = anonymous.load().await.unwrap_err();
    assert!(matches!(e, StoreError::Etcd { .. }), "{e:?}");
    // A key file others may read is refused before anything is sent.
    std::fs::set_permissions(d.join("tp.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = store(&access).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
}
