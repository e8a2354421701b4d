//! Where the load goes and how one client connection is opened: our own socket (so it can be
//! bound to a chosen 127.0.0.x source address), then tokio-postgres' startup and authentication
//! (trust, md5, SCRAM-SHA-256) over it via `Config::connect_raw`, with TLS when asked.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::classify;
use crate::cli::Args;
use crate::error::{Error, Result};

pub struct Target {
    pub pg: tokio_postgres::Config,
    pub addr: SocketAddr,
    /// Host name given to TLS (SNI and certificate check).
    host: String,
    tls: Option<MakeRustlsConnect>,
    /// Number of 127.0.0.x source addresses to spread over (0 = kernel's choice).
    source_addrs: u8,
    connect_timeout: Duration,
}

/// An open session plus the task that drives its socket. Closing awaits that task so that the
/// descriptor is gone before a replacement is opened: a worker never holds more sockets than
/// its slots.
pub struct Session {
    pub client: Client,
    driver: JoinHandle<()>,
}

impl Session {
    pub async fn close(self) {
        drop(self.client); // the driver sends Terminate and finishes
        let mut driver = self.driver;
        if tokio::time::timeout(Duration::from_secs(2), &mut driver)
            .await
            .is_err()
        {
            driver.abort();
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectFailure {
    Io(std::io::Error),
    Pg(tokio_postgres::Error),
    Tls(String),
    Timeout,
}

impl ConnectFailure {
    /// The counter key (see `classify`).
    pub fn kind(&self) -> String {
        match self {
            ConnectFailure::Io(e) => classify::io_error(e),
            ConnectFailure::Pg(e) => classify::pg_error(e),
            ConnectFailure::Tls(_) => "tls".into(),
            ConnectFailure::Timeout => "timeout".into(),
        }
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectFailure::Io(e) => write!(f, "connect: {e}"),
            // Display of a server error is only "db error"; its message is in the DbError.
            ConnectFailure::Pg(e) => match e.as_db_error() {
                Some(db) => write!(
                    f,
                    "{}: {} (SQLSTATE {})",
                    db.severity(),
                    db.message(),
                    db.code().code()
                ),
                None => {
                    // tokio-postgres' own text is terse ("error performing TLS handshake");
                    // the cause is in the source chain.
                    write!(f, "{e}")?;
                    let mut source = std::error::Error::source(e);
                    while let Some(s) = source {
                        write!(f, ": {s}")?;
                        source = s.source();
                    }
                    Ok(())
                }
            },
            ConnectFailure::Tls(e) => write!(f, "TLS: {e}"),
            ConnectFailure::Timeout => write!(f, "connect timed out"),
        }
    }
}

impl Target {
    pub async fn from_args(args: &Args) -> Result<Target> {
        let mut pg: tokio_postgres::Config = match &args.url {
            Some(url) => url
                .parse()
                .map_err(|e: tokio_postgres::Error| Error::Config(e.to_string()))?,
            None => tokio_postgres::Config::new(),
        };
        if let Some(h) = &args.host {
            pg = replace_host(pg, h);
        }
        if let Some(p) = args.port {
            pg = replace_port(pg, p);
        }
        if let Some(u) = &args.user {
            pg.user(u);
        }
        if let Some(p) = &args.password {
            pg.password(p);
        }
        if let Some(d) = &args.dbname {
            pg.dbname(d);
        }
        if pg.get_user().is_none() {
            pg.user("postgres");
        }
        pg.application_name("firehose");

        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => {
                return Err(Error::Config(format!(
                    "Unix socket {} not supported: use a TCP host",
                    p.display()
                )))
            }
            None => "127.0.0.1".to_string(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let addr = resolve(&host, port).await?;

        let want_tls = args.tls || pg.get_ssl_mode() == SslMode::Require;
        let tls = if want_tls {
            pg.ssl_mode(SslMode::Require);
            Some(tls_connector(args)?)
        } else {
            pg.ssl_mode(SslMode::Disable);
            None
        };
        let source_addrs = match addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => args.source_addrs,
            _ => 0,
        };
        Ok(Target {
            pg,
            addr,
            host,
            tls,
            source_addrs,
            connect_timeout: args.connect_timeout(),
        })
    }

    /// `postgres://user@addr/db` for reports: never the password.
    pub fn describe(&self) -> String {
        format!(
            "postgres://{}@{}/{}{}",
            self.pg.get_user().unwrap_or("?"),
            self.addr,
            self.pg
                .get_dbname()
                .or(self.pg.get_user())
                .unwrap_or_default(),
            if self.tls.is_some() { " (TLS)" } else { "" }
        )
    }

    pub fn source_addrs(&self) -> u8 {
        self.source_addrs
    }

    /// Opens one session for connection slot `slot` (the slot picks the source address).
    pub async fn connect(&self, slot: usize) -> std::result::Result<Session, ConnectFailure> {
        match tokio::time::timeout(self.connect_timeout, self.connect_inner(slot)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectFailure::Timeout),
        }
    }

    async fn connect_inner(&self, slot: usize) -> std::result::Result<Session, ConnectFailure> {
        let stream = self.open_socket(slot).await.map_err(ConnectFailure::Io)?;
        let (client, driver) = match &self.tls {
            None => {
                let (client, conn) = self
                    .pg
                    .connect_raw(stream, NoTls)
                    .await
                    .map_err(ConnectFailure::Pg)?;
                (client, tokio::spawn(drive(conn)))
            }
            Some(make) => {
                let mut make = make.clone();
                let tls = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(
                    &mut make, &self.host,
                )
                .map_err(|e| ConnectFailure::Tls(e.to_string()))?;
                let (client, conn) = self
                    .pg
                    .connect_raw(stream, tls)
                    .await
                    .map_err(ConnectFailure::Pg)?;
                (client, tokio::spawn(drive(conn)))
            }
        };
        Ok(Session { client, driver })
    }

    async fn open_socket(&self, slot: usize) -> std::io::Result<TcpStream> {
        let domain = Domain::for_address(self.addr);
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
        if self.source_addrs > 0 {
            // Defer the port choice to connect(): the kernel then only needs the 4-tuple to be
            // unique, instead of reserving the source port for this address alone at bind().
            set_bind_address_no_port(&socket)?;
            let octet = 1 + (slot % usize::from(self.source_addrs)) as u8;
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet)), 0);
            socket.bind(&src.into())?;
        }
        let std_stream: std::net::TcpStream = socket.into();
        TcpSocket::from_std_stream(std_stream)
            .connect(self.addr)
            .await
    }
}

async fn drive<F, E>(conn: F)
where
    F: std::future::Future<Output = std::result::Result<(), E>>,
{
    // A broken connection shows up on the client side as the next query's error; nothing to
    // do with it here.
    let _ = conn.await;
}

fn set_bind_address_no_port(socket: &Socket) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Error::io(format!("resolving {host}"), e))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| Error::Config(format!("{host} resolves to no address")))
}

fn replace_host(old: tokio_postgres::Config, host: &str) -> tokio_postgres::Config {
    // Config has no way to clear hosts; rebuild it from the parts we carry over.
    let mut pg = tokio_postgres::Config::new();
    copy_identity(&old, &mut pg);
    for p in old.get_ports() {
        pg.port(*p);
    }
    pg.host(host);
    pg
}

fn replace_port(old: tokio_postgres::Config, port: u16) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    copy_identity(&old, &mut pg);
    for h in old.get_hosts() {
        if let Host::Tcp(h) = h {
            pg.host(h);
        }
    }
    pg.port(port);
    pg
}

fn copy_identity(from: &tokio_postgres::Config, to: &mut tokio_postgres::Config) {
    if let Some(u) = from.get_user() {
        to.user(u);
    }
    if let Some(p) = from.get_password() {
        to.password(p);
    }
    if let Some(d) = from.get_dbname() {
        to.dbname(d);
    }
    to.ssl_mode(from.get_ssl_mode());
    if let Some(o) = from.get_options() {
        to.options(o);
    }
}

fn tls_connector(args: &Args) -> Result<MakeRustlsConnect> {
    use rustls::ClientConfig;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let config = if args.tls_insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::AcceptAnyCert))
            .with_no_client_auth()
    } else {
        let path = args
            .tls_ca
            .as_ref()
            .ok_or_else(|| Error::Tls("--tls-ca or --tls-insecure required".into()))?;
        let pem = std::fs::read(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(MakeRustlsConnect::new(config))
}

/// `--tls-insecure`: accepts any certificate, still checks the handshake signatures so that the
/// handshake itself is exercised as in production.
mod insecure {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    pub struct AcceptAnyCert;

    impl ServerCertVerifier for AcceptAnyCert {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
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
                &rustls::crypto::ring::default_provider().signature_verification_algorithms,
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
                &rustls::crypto::ring::default_provider().signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}
