//! TLS from the pooler to Postgres (`server_tls_sslmode`, issue 12 §2).
//!
//! As libpq does: an `SSLRequest` on the fresh TCP connection, one byte of answer, and on `S` a
//! TLS handshake (rustls, as the gateway's client side uses) before the startup packet. Exactly
//! one byte is read before the handshake, so nothing an attacker slips in after the `S` is ever
//! taken as the server's (libpq's CVE-2021-23222). The backend's relay and writer are generic
//! over the stream (`backend.rs`): a plain backend runs the same code as before TLS existed,
//! with no dispatch per read or write.
//!
//! Modes, as PgBouncer's `server_tls_sslmode` and libpq's `sslmode` name them:
//! - `disable` (default): no `SSLRequest`, as before; no extra round trip per connection;
//! - `prefer`: TLS when the server offers it, plain when it answers `N`;
//! - `require`: TLS or no connection; the certificate is not checked (encryption against a
//!   passive listener only, as libpq's `require` without a root certificate);
//! - `verify-full`: TLS, a certificate chaining to `server_tls_ca_file`, and issued for
//!   `pg_host` (a DNS name or an IP address in its subjectAltName).

use crate::login::LoginError;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use futures_rustls::rustls::{
    self,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<SslMode, String> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "server_tls_sslmode {other:?}: expected disable, prefer, require or verify-full"
            )),
        }
    }
}

/// What connections to Postgres negotiate (`None` in the config: `disable`).
#[derive(Clone)]
pub struct ServerTls {
    pub mode: SslMode,
    ca_file: Option<std::path::PathBuf>,
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("ca_file", &self.ca_file)
            .field("name", &self.name)
            .finish()
    }
}

impl ServerTls {
    /// The TLS set-up for `mode` towards `host`; `None` for `disable`. `ca_file` (PEM) is
    /// required by `verify-full` and refused by the others (which would not use it).
    pub fn new(mode: SslMode, ca_file: Option<&Path>, host: &str) -> Result<Option<Self>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match (mode, ca_file) {
            (SslMode::Disable, None) => return Ok(None),
            (SslMode::VerifyFull, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                let file = std::fs::File::open(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
                for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
                    let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{}: no certificate found", ca.display()));
                }
                builder
                    .with_root_certificates(roots)
                    .with_no_client_auth()
            }
            (SslMode::VerifyFull, None) => {
                return Err(
                    "server_tls_sslmode = verify-full needs server_tls_ca_file (the CA that \
                     issued Postgres's certificate)"
                        .into(),
                )
            }
            (SslMode::Prefer | SslMode::Require, None) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
            (_, Some(_)) => {
                return Err(format!(
                    "server_tls_ca_file is used by server_tls_sslmode = verify-full only (not {mode:?})"
                ))
            }
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("pg_host {host:?} as a TLS server name: {e}"))?;
        Ok(Some(ServerTls {
            mode,
            ca_file: ca_file.map(Path::to_path_buf),
            connector: TlsConnector::from(Arc::new(config)),
            name,
        }))
    }
}

/// A connection to Postgres after negotiation.
pub enum Opened {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Negotiates TLS on a fresh connection to the postmaster, before anything else is sent.
pub async fn open(tls: Option<&ServerTls>, mut stream: TcpStream) -> Result<Opened, LoginError> {
    let Some(tls) = tls else {
        return Ok(Opened::Plain(stream));
    };
    let io = |e: std::io::Error| LoginError::Other(format!("negotiating TLS with the server: {e}"));
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&shared::protocol::SSL_REQUEST.to_be_bytes());
    stream.write_all(&request).await.map_err(io)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.map_err(io)?;
    match (answer[0], tls.mode) {
        (b'S', _) => tls
            .connector
            .connect(tls.name.clone(), stream)
            .await
            .map(|s| Opened::Tls(Box::new(s)))
            .map_err(|e| LoginError::Other(format!("TLS handshake with the server: {e}"))),
        (b'N', SslMode::Prefer) => Ok(Opened::Plain(stream)),
        (b'N', mode) => Err(LoginError::Other(format!(
            "the server does not support SSL, but server_tls_sslmode = {} requires it",
            match mode {
                SslMode::VerifyFull => "verify-full",
                _ => "require",
            }
        ))),
        (other, _) => Err(LoginError::Other(format!(
            "unexpected answer {other:#04x} to the SSL request"
        ))),
    }
}

/// `require` and `prefer`: any certificate is taken (no CA to check it against), but the
/// handshake's signatures are still verified, so the session keys are the server's.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_ca_file_goes_with_verify_full_only() {
        assert_eq!("prefer".parse::<SslMode>(), Ok(SslMode::Prefer));
        assert_eq!("verify-full".parse::<SslMode>(), Ok(SslMode::VerifyFull));
        assert!("allow".parse::<SslMode>().is_err());
        assert!(ServerTls::new(SslMode::Disable, None, "127.0.0.1")
            .unwrap()
            .is_none());
        let t = ServerTls::new(SslMode::Require, None, "127.0.0.1").unwrap();
        assert_eq!(t.map(|t| t.mode), Some(SslMode::Require));
        assert!(ServerTls::new(SslMode::VerifyFull, None, "127.0.0.1").is_err());
        let ca = Path::new("/nonexistent/ca.pem");
        assert!(ServerTls::new(SslMode::Require, Some(ca), "127.0.0.1").is_err());
        assert!(ServerTls::new(SslMode::VerifyFull, Some(ca), "127.0.0.1").is_err());
    }
}
