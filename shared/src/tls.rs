//! TLS for the inner connections: the gateway ↔ pooler link and the control process ↔ node
//! agent (issue 12 §1, `docs/decisions/2026-12-07-link-and-agent-tls.md`).
//!
//! The server (pooler, agent) holds a certificate issued by the cluster's CA; the client
//! (gateway, control process, command line) checks it against that CA and the host name or IP
//! address it dialled. The client is not identified by a certificate: inside TLS the shared-secret
//! handshake (`link::handshake`, `agent::auth`) still proves it, and binds both ends to the
//! cluster's secret as before. TLS 1.3 only: both ends are ours.
//!
//! Here: reading PEM files, building rustls configurations, the name a client checks, whether an
//! address stays on this host, and [`WriteThrough`] for the glommio writers.

use futures_lite::AsyncWrite;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain: the node's first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file, refused when group or others may read it (as the link and
/// agent secrets are: whoever reads it can pose as this pooler or agent).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: mode {:o} lets others at the private key (chmod 600)",
            path.display(),
            mode & 0o777
        ));
    }
    rustls_pemfile::private_key(&mut io::BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key found", path.display()))
}

/// The server side (pooler link, node agent): this certificate chain and key, no client
/// certificate (the client proves the shared secret inside).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = load_certs(cert)?;
    let key = load_private_key(key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

/// The client side (gateway, control process): servers must present a certificate chaining to
/// a CA of `ca` (PEM) and naming the host dialled.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A server's certificate and key, loaded (pooler link, node agent). Shown by its paths only.
#[derive(Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub config: Arc<rustls::ServerConfig>,
}

impl Identity {
    /// `cert` and `key` go together: both or neither.
    pub fn load(
        what: &str,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Identity>, String> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                let config = server_config(&cert, &key).map_err(|e| format!("{what}: {e}"))?;
                Ok(Some(Identity { cert, key, config }))
            }
            _ => Err(format!("{what}_cert and {what}_key go together")),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

/// The CA a client checks servers against, loaded (gateway links). Shown by its path only.
#[derive(Clone)]
pub struct Trust {
    pub ca: PathBuf,
    pub config: Arc<rustls::ClientConfig>,
}

impl Trust {
    pub fn load(what: &str, ca: Option<PathBuf>) -> Result<Option<Trust>, String> {
        let Some(ca) = ca else {
            return Ok(None);
        };
        let config = client_config(&ca).map_err(|e| format!("{what}: {e}"))?;
        Ok(Some(Trust { ca, config }))
    }
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("ca", &self.ca).finish()
    }
}

/// Refuses a listener that may be reached from other hosts without TLS, unless `insecure` (the
/// operator's `…_insecure_non_loopback`) says the network is trusted.
pub fn check_exposure(what: &str, listen: &str, tls: bool, insecure: bool) -> Result<(), String> {
    if tls || insecure || is_loopback(listen) {
        return Ok(());
    }
    Err(format!(
        "{what} listens on {listen}, which other hosts may reach, without TLS: give it a \
         certificate ({what}_tls_cert and {what}_tls_key), listen on a loopback address, or set \
         {what}_insecure_non_loopback = true for a network trusted with its traffic in clear"
    ))
}

/// The host of `host:port` (`[v6]:port` too), as the name the server's certificate must carry:
/// an IP address or a DNS name.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{addr:?}: no host name or address to check a certificate for: {e}"))
}

/// `addr` (`host:port`) certainly stays on this host: a loopback address or `localhost`.
/// Anything else (a wildcard, another address, a name that could resolve anywhere) may not.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
        return a.ip().is_loopback();
    }
    matches!(addr.rsplit_once(':'), Some(("localhost", _)))
}

/// A writer that reports a write only once the bytes have left for the socket.
///
/// A TLS stream (futures-rustls) takes bytes into its record buffer and answers `Ready(n)` even
/// when the socket could not take the records; `OutQueue::run_writer` then waits for new frames
/// and the records would sit there until the next write. Here each write is flushed before it
/// is reported (a `Pending` flush returns `Pending`, and the caller's `write_all` polls again
/// with the same bytes, which are then reported as taken). Only for callers that retry with the
/// same buffer (`write_all`). The plain TCP writers do not use it: they stay as they were.
pub struct WriteThrough<W> {
    inner: W,
    /// Bytes taken by `inner` whose flush is still pending.
    taken: Option<usize>,
}

impl<W> WriteThrough<W> {
    pub fn new(inner: W) -> Self {
        WriteThrough { inner, taken: None }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WriteThrough<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = match this.taken {
            Some(n) => n,
            None => {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
                this.taken = Some(n);
                n
            }
        };
        let flushed = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        this.taken = None;
        flushed.map(|()| n).into()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_loopback() {
        assert!(matches!(
            server_name("127.0.0.1:15433").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:15433").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("db-1.example:15433").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad host:1").is_err());
        assert!(is_loopback("127.0.0.1:15433"));
        assert!(is_loopback("127.0.0.2:15433"));
        assert!(is_loopback("[::1]:15433"));
        assert!(is_loopback("localhost:15433"));
        assert!(!is_loopback("0.0.0.0:15433"));
        assert!(!is_loopback("[::]:15433"));
        assert!(!is_loopback("10.0.0.5:15433"));
        assert!(!is_loopback("db-1:15433"));
    }

    #[test]
    fn a_private_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("tp-tls-key-{}.pem", std::process::id()));
        std::fs::write(&p, "not a key").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_private_key(&p).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_private_key(&p)
            .unwrap_err()
            .contains("no private key found"));
        let _ = std::fs::remove_file(&p);
    }
}
