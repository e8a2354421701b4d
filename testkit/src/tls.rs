//! Test certificates for the link and the agent: a CA and certificates it issues, written as
//! PEM files (keys mode 600, as the processes demand), made with rcgen as `tidepool up` does.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// A CA in a directory: `NAME-ca.crt`, and the certificates it issues beside it.
pub struct TestCa {
    dir: PathBuf,
    name: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    /// A new CA called `name`, its certificate written to `dir/NAME-ca.crt`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).expect("certificate directory");
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name
            .push(DnType::CommonName, format!("test CA {name}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).expect("CA certificate");
        let ca = TestCa {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            cert,
            key,
        };
        write(&ca.ca_file(), ca.cert.pem().as_bytes(), 0o644);
        ca
    }

    /// The CA's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.crt", self.name))
    }

    /// A server certificate for `hosts` (IP addresses or DNS names): `(cert, key)` paths,
    /// `NAME-SERVER.crt` and `.key` (mode 600).
    pub fn issue(&self, server: &str, hosts: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut p = CertificateParams::new(names).expect("server params");
        p.distinguished_name.push(DnType::CommonName, server);
        let key = KeyPair::generate().expect("server key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        let base = self.dir.join(format!("{}-{server}", self.name));
        let (c, k) = (base.with_extension("crt"), base.with_extension("key"));
        write(&c, cert.pem().as_bytes(), 0o644);
        write(&k, key.serialize_pem().as_bytes(), 0o600);
        (c, k)
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(bytes)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The flags of a pooler whose link presents `cert`/`key`.
pub fn link_tls_args(cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "--link-tls-cert".into(),
        cert.to_string_lossy().into_owned(),
        "--link-tls-key".into(),
        key.to_string_lossy().into_owned(),
    ]
}
