//! A real etcd (Debian's `etcd-server`) on free loopback ports with a throwaway data
//! directory, killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;

pub struct Etcd {
    child: Child,
    /// `http://127.0.0.1:PORT` (`https://` with TLS)
    pub url: String,
    /// With TLS: the CA of the server's certificate (for etcdctl).
    ca: Option<PathBuf>,
    /// With client certificate authentication: etcdctl's certificate and key.
    etcdctl_cert: Option<(PathBuf, PathBuf)>,
    port: u16,
    pub log: PathBuf,
    dir: PathBuf,
}

impl Etcd {
    /// Starts etcd and waits (bounded) until it answers `/health`.
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// Starts etcd serving clients over TLS only (`cert` and `key` for 127.0.0.1, issued by
    /// `ca`), with simple auth tokens that lapse after one idle second (`--auth-token-ttl=1`),
    /// and waits until `etcdctl endpoint health` says it is healthy. Auth is not enabled:
    /// [`Etcd::etcdctl`] does that as a test wants it.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Etcd {
        Etcd::start_with(Some((
            cert.to_path_buf(),
            key.to_path_buf(),
            ca.to_path_buf(),
        )))
    }

    /// As [`Etcd::start_tls`], and clients must present a certificate issued by `ca`
    /// (`--client-cert-auth`); once auth is enabled, etcd takes its common name as the user.
    /// [`Etcd::etcdctl`] presents `etcdctl_cert` and `etcdctl_key`.
    pub fn start_client_cert_auth(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
        etcdctl_cert: &std::path::Path,
        etcdctl_key: &std::path::Path,
    ) -> Etcd {
        Etcd::start_full(
            Some((cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf())),
            Some((etcdctl_cert.to_path_buf(), etcdctl_key.to_path_buf())),
        )
    }

    fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Etcd {
        Etcd::start_full(tls, None)
    }

    fn start_full(
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
        etcdctl_cert: Option<(PathBuf, PathBuf)>,
    ) -> Etcd {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("tp-etcd-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let log_file = std::fs::File::create(&log).expect("etcd log file");
        let mut cmd = Command::new("etcd");
        if let Some((cert, key, _)) = &tls {
            cmd.arg(format!("--cert-file={}", cert.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg("--auth-token=simple")
                .arg("--auth-token-ttl=1");
        }
        if let (Some((_, _, ca)), Some(_)) = (&tls, &etcdctl_cert) {
            cmd.arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", ca.display()));
        }
        let child = cmd
            .arg("--name=t")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting etcd ({e}): install Debian's etcd-server (scripts/setup.sh)")
            });
        let mut etcd = Etcd {
            child,
            url,
            ca: tls.map(|(_, _, ca)| ca),
            etcdctl_cert,
            port: client,
            log,
            dir,
        };
        etcd.wait_healthy();
        etcd
    }

    /// Turns etcd's authentication on with `root` (password `root-pw`) and `user:password`,
    /// whose only role may read and write under `/tidepool/`: what an operator grants Tidepool.
    pub fn enable_auth(&self, user: &str, password: &str) {
        self.etcdctl(&["user", "add", "root:root-pw"]);
        self.etcdctl(&["role", "add", "tidepool"]);
        self.etcdctl(&[
            "role",
            "grant-permission",
            "tidepool",
            "--prefix=true",
            "readwrite",
            "/tidepool/",
        ]);
        self.etcdctl(&["user", "add", &format!("{user}:{password}")]);
        self.etcdctl(&["user", "grant-role", user, "tidepool"]);
        self.etcdctl(&["auth", "enable"]);
    }

    /// `etcdctl` (v3 API) against this etcd, with the CA under TLS; its output, or a panic
    /// with it when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_output(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "etcdctl {args:?}: {text}");
        text
    }

    fn etcdctl_output(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s");
        if let Some(ca) = &self.ca {
            cmd.arg(format!("--cacert={}", ca.display()));
        }
        if let Some((cert, key)) = &self.etcdctl_cert {
            cmd.arg(format!("--cert={}", cert.display()))
                .arg(format!("--key={}", key.display()));
        }
        cmd.args(args).output().expect("run etcdctl")
    }

    fn healthy(&self) -> bool {
        if self.ca.is_some() {
            return self
                .etcdctl_output(&["endpoint", "health"])
                .status
                .success();
        }
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = format!(
            "GET /health HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n",
            self.port
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    fn wait_healthy(&mut self) {
        let start = Instant::now();
        while !self.healthy() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "etcd exited ({status}):\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd not healthy after 30 s:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP (`"STOP"`), SIGCONT, ...
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} etcd");
    }
}

impl Etcd {
    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
