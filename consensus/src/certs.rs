//! The cluster's certificates for its inner connections (issue 12 §1): `tidepool up` makes a
//! CA for the cluster and one certificate per node, which that node's pooler presents on its
//! link listener (gateways check it: `--link-tls-ca`) and its node agent (the control process
//! and the command line check it). `docs/decisions/2026-12-07-link-and-agent-tls.md`.
//!
//! ```text
//! DIR/tls/ca.crt       the cluster CA (public; gateways and the control process trust it)
//! DIR/tls/ca.key       its private key, mode 600: signs the nodes' certificates, nothing else
//! DIR/tls/NODE.crt     NODE's certificate, for 127.0.0.1, ::1, localhost and its addresses
//! DIR/tls/NODE.key     its private key, mode 600 (a pooler running as another user gets its
//!                      own copy in DIR/keys/, as for link.key)
//! ```
//!
//! Made once and kept, as the secrets are: a file that exists is never replaced. The CA's
//! certificate is rebuilt from its key to sign a new node's (same name, same key: what a
//! verifier checks), so the CA's certificate needs no parser here.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Error, Result};
use crate::layout::Layout;

/// The directory of the certificates in a state directory.
pub const TLS_DIR: &str = "tls";

/// The cluster CA, ready to sign.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

pub fn dir(layout: &Layout) -> PathBuf {
    layout.dir().join(TLS_DIR)
}

/// The CA certificate's path in the state directory `dir` (it may not exist: a cluster made
/// before TLS, whose agents are plain).
pub fn ca_file(state_dir: &Path) -> PathBuf {
    state_dir.join(TLS_DIR).join("ca.crt")
}

/// NODE's certificate and key paths.
pub fn node_files(layout: &Layout, node: &str) -> (PathBuf, PathBuf) {
    let d = dir(layout);
    (d.join(format!("{node}.crt")), d.join(format!("{node}.key")))
}

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    p.distinguished_name
        .push(DnType::CommonName, "Tidepool cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn tls_error(e: rcgen::Error) -> Error {
    Error::Environment(format!("making the cluster's certificates: {e}"))
}

/// The cluster CA: made (key mode 600) when `DIR/tls/ca.key` does not exist, else loaded.
pub fn ensure_ca(layout: &Layout) -> Result<Ca> {
    let d = dir(layout);
    std::fs::create_dir_all(&d).map_err(Error::io(format!("creating {}", d.display())))?;
    // Certificates are public; the keys in it are 600 each.
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io(format!("chmod {}", d.display())))?;
    let (cert_path, key_path) = (d.join("ca.crt"), d.join("ca.key"));
    if key_path.exists() {
        let pem = std::fs::read_to_string(&key_path)
            .map_err(Error::io(format!("reading {}", key_path.display())))?;
        let key = KeyPair::from_pem(&pem).map_err(tls_error)?;
        let cert = ca_params()?.self_signed(&key).map_err(tls_error)?;
        if !cert_path.exists() {
            write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
        }
        return Ok(Ca { cert, key });
    }
    // A new CA: certificates another CA issued (its key gone) would no longer chain to it.
    for entry in std::fs::read_dir(&d)
        .map_err(Error::io(format!("reading {}", d.display())))?
        .flatten()
    {
        let _ = std::fs::remove_file(entry.path());
    }
    let key = KeyPair::generate().map_err(tls_error)?;
    let cert = ca_params()?.self_signed(&key).map_err(tls_error)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Ca { cert, key })
}

/// NODE's certificate and key (made when missing), for `hosts` besides this host's loopback
/// names. Returns their paths.
pub fn ensure_node(
    layout: &Layout,
    ca: &Ca,
    node: &str,
    hosts: &[String],
) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = node_files(layout, node);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let mut names: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut p = CertificateParams::new(names).map_err(tls_error)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("Tidepool {node}"));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(tls_error)?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key).map_err(tls_error)?;
    let _ = std::fs::remove_file(&key_path);
    let _ = std::fs::remove_file(&cert_path);
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// A new file with `mode` from its creation (a key is never readable by others, even for a
/// moment).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(Error::io(format!("writing {}", path.display())))?;
    // The umask may have taken bits away from a certificate.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("chmod {}", path.display())))
}

/// The addresses a node's pooler and agent listen on (its certificate names them too).
pub fn hosts_of(node: &crate::state::NodeRecord) -> Vec<String> {
    let mut hosts = vec![node.pooler.ip().to_string()];
    if node.agent.ip() != node.pooler.ip() {
        hosts.push(node.agent.ip().to_string());
    }
    hosts
}

/// Whether the link to a pooler listening on `addr` is encrypted: only when it leaves the host.
/// On loopback TLS hides the traffic from nobody who could not read the processes' memory
/// (root), and it costs every request: 3–15 % more proxy CPU per pgbench transaction
/// (perf/RESULTS.md, 2026-12-07 13:47). The agent, off the request path, speaks TLS always.
pub fn link_needs_tls(addr: &std::net::SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// The pooler flags of NODE's certificate: the link's when `link` (see [`link_needs_tls`]),
/// and the agent's when it has one.
pub fn pooler_args(
    layout: &Layout,
    node: &str,
    link: bool,
    agent: bool,
) -> Vec<std::ffi::OsString> {
    let (cert, key) = node_files(layout, node);
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if link {
        args.extend([
            "--link-tls-cert".into(),
            cert.clone().into(),
            "--link-tls-key".into(),
            key.clone().into(),
        ]);
    }
    if agent {
        args.extend([
            "--agent-tls-cert".into(),
            cert.into(),
            "--agent-tls-key".into(),
            key.into(),
        ]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_ca_and_node_certificates_that_rustls_accepts() {
        let d = std::env::temp_dir().join(format!("tp-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let layout = Layout::new(&d).unwrap();
        let ca = ensure_ca(&layout).unwrap();
        let (cert, key) = ensure_node(&layout, &ca, "node1", &["10.0.0.7".into()]).unwrap();
        for k in [dir(&layout).join("ca.key"), key.clone()] {
            assert_eq!(std::fs::metadata(&k).unwrap().mode() & 0o777, 0o600);
        }
        // A second node signed by the CA as loaded again (not as made) chains to the same file.
        let again = ensure_ca(&layout).unwrap();
        let (cert2, key2) = ensure_node(&layout, &again, "node2", &[]).unwrap();
        let client = shared::tls::client_config(&ca_file(&d)).unwrap();
        for (cert, key, host) in [(&cert, &key, "10.0.0.7"), (&cert2, &key2, "127.0.0.1")] {
            let server = shared::tls::server_config(cert, key).unwrap();
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
            let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
            let mut s = rustls::ServerConnection::new(server).unwrap();
            // Drive the handshake in memory until both ends are done (or one fails).
            for _ in 0..10 {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
            assert!(!c.is_handshaking() && !s.is_handshaking(), "{host}");
        }
        // Made once: the files stay as they are.
        let before = std::fs::read(&cert).unwrap();
        ensure_node(&layout, &again, "node1", &[]).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), before);
        // Without its key the CA is made anew, and the certificates of the old one go with it.
        std::fs::remove_file(dir(&layout).join("ca.key")).unwrap();
        let fresh = ensure_ca(&layout).unwrap();
        assert!(!cert.exists() && !cert2.exists());
        let (cert, _) = ensure_node(&layout, &fresh, "node1", &[]).unwrap();
        assert_ne!(std::fs::read(&cert).unwrap(), before);
        let _ = std::fs::remove_dir_all(&d);
    }
}
