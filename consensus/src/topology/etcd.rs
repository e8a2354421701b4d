//! The topology in etcd (v3 API), for clusters spread over machines.
//!
//! - `/tidepool/<cluster>/topology`: the topology as JSON; its version is the key's
//!   `mod_revision`, and compare-and-swap is one transaction comparing it (`create_revision
//!   == 0` when nothing is stored yet).
//! - `/tidepool/<cluster>/leader`: the leader's id, bound to a lease of the leadership's ttl.
//!   Campaigning is a transaction that creates the key only if it does not exist; renewing is
//!   a lease keep-alive; when the leader stops renewing, etcd deletes the key and the next
//!   campaign wins.
//! - `/tidepool/<cluster>/backup-lock`: the id of the process taking a backup, bound to a
//!   lease it keeps alive while the backup runs: one backup at a time across machines.
//!
//! We speak gRPC through the `etcd-client` crate (docs/decisions/2026-12-07-etcd-client.md):
//! one HTTP/2 connection per endpoint, made at the first call, not when the store is built.
//! Every call is bounded by the store's timeout as a whole (connecting and authenticating
//! included), so an etcd that is down or stuck turns into an error, never a hang.
//!
//! Access (`[etcd_access]`): `https://` endpoints are reached over TLS (rustls), their
//! certificate checked against `ca_file` and the endpoint's host; `cert_file` and `key_file`
//! give a client certificate (etcd's `--client-cert-auth`); with `user`, the client
//! authenticates with the password read from `password_file` and authenticates again when etcd
//! says the token is no longer valid (simple tokens expire).
//!
//! The connection's tasks run on the tokio runtime of the first call: a store is used from one
//! runtime (each command and the control process build their own).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::OnceCell;

use crate::config::EtcdAccess;

use super::{Leadership, StoreError, Topology, Version};

/// The default bound on one etcd call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// One etcd endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// `host:port`.
    hostport: String,
    /// `https://`.
    tls: bool,
}

impl Endpoint {
    /// The URL the client dials: always with its scheme (`etcd-client` would take a bare
    /// `host:port` for TLS whenever TLS options are set).
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.hostport)
    }
}

/// The topology in etcd (see the module documentation).
#[derive(Clone)]
pub struct EtcdStore {
    /// Each endpoint; the client balances over those it can reach.
    endpoints: Vec<Endpoint>,
    /// TLS, user and HTTP/2 keep-alive (holds the password: never printed). Boxed: it is
    /// large and `Store` holds an `EtcdStore` or a small `FileStore`.
    options: Box<ConnectOptions>,
    /// The user authenticated as, for error messages.
    user: Option<String>,
    /// Connected (and authenticated) at the first call; shared by the store's clones.
    client: Arc<OnceCell<Client>>,
    topology_key: String,
    leader_key: String,
    /// The one-backup-at-a-time lock (`tidepool backup create` on any machine).
    backup_lock_key: String,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not `options`: it holds the password.
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user)
            .field("topology_key", &self.topology_key)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EtcdStore {
    /// A store for `cluster` at `urls` (comma-separated, `http://host:port`, `https://host:port`
    /// or `host:port`), each call bounded by `timeout`, with no TLS configuration and no
    /// authentication (see [`EtcdStore::with_access`]). Nothing is contacted yet.
    pub fn new(urls: &str, cluster: &str, timeout: Duration) -> Result<EtcdStore, StoreError> {
        let mut endpoints = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let (tls, rest) = match url.strip_prefix("https://") {
                Some(rest) => (true, rest),
                None => (false, url.strip_prefix("http://").unwrap_or(url)),
            };
            let hostport = rest.trim_end_matches('/');
            if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
                return Err(StoreError::Etcd {
                    endpoint: url.to_string(),
                    message: "expected http://HOST:PORT or https://HOST:PORT".into(),
                });
            }
            endpoints.push(Endpoint {
                hostport: hostport.to_string(),
                tls,
            });
        }
        if endpoints.is_empty() {
            return Err(StoreError::Etcd {
                endpoint: urls.to_string(),
                message: "no endpoint given".into(),
            });
        }
        if endpoints.iter().any(|e| e.tls) && endpoints.iter().any(|e| !e.tls) {
            // One set of TLS options serves every endpoint of the client.
            return Err(StoreError::Etcd {
                endpoint: urls.to_string(),
                message: "either every endpoint is https:// or none is".into(),
            });
        }
        // HTTP/2 pings on an idle connection find a dead etcd before a call waits on it.
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), timeout)
            .with_auto_token_refresh(true);
        Ok(EtcdStore {
            endpoints,
            options: Box::new(options),
            user: None,
            client: Arc::new(OnceCell::new()),
            topology_key: format!("/tidepool/{cluster}/topology"),
            leader_key: format!("/tidepool/{cluster}/leader"),
            backup_lock_key: format!("/tidepool/{cluster}/backup-lock"),
            timeout,
        })
    }

    /// The store with `access`: the CA for `https://` endpoints (required by them), a client
    /// certificate and the user to authenticate as. Reads the files now: a missing or
    /// unreadable one is an error here, not at the first call.
    pub fn with_access(mut self, access: &EtcdAccess) -> Result<EtcdStore, StoreError> {
        let names = self.names();
        let fail = |message: String| StoreError::Etcd {
            endpoint: names.clone(),
            message,
        };
        let https = self.endpoints.iter().any(|e| e.tls);
        let mut tls = TlsOptions::new();
        match &access.ca_file {
            Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read_ca(ca).map_err(fail)?)),
            None if https => {
                return Err(fail(
                    "an https:// endpoint needs the CA that issued its certificate \
                     (--etcd-ca-file, [etcd_access] ca_file)"
                        .into(),
                ))
            }
            None => {}
        }
        match (&access.cert_file, &access.key_file) {
            (Some(_), Some(_)) if !https => {
                return Err(fail(
                    "a client certificate is for https:// endpoints only".into(),
                ))
            }
            (Some(cert), Some(key)) => {
                let cert = std::fs::read(cert)
                    .map_err(|e| fail(format!("etcd cert file {}: {e}", cert.display())))?;
                let key = read_secret(key, "etcd key file").map_err(fail)?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => {
                return Err(fail(
                    "a client certificate needs both cert_file and key_file \
                     (--etcd-cert-file, --etcd-key-file)"
                        .into(),
                ))
            }
        }
        if https {
            // Each endpoint's certificate is checked against its own host (the URL's), so no
            // `domain_name` override.
            *self.options = self.options.as_ref().clone().with_tls(tls);
        }
        match (&access.user, &access.password_file) {
            (Some(user), Some(file)) => {
                let password = read_secret(file, "etcd password file").map_err(fail)?;
                let password = String::from_utf8_lossy(&password);
                *self.options = self
                    .options
                    .as_ref()
                    .clone()
                    .with_user(user, password.trim_end_matches(['\r', '\n']));
                self.user = Some(user.clone());
            }
            (Some(_), None) => {
                return Err(fail(
                    "an etcd user needs its password file (--etcd-password-file)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(fail(
                    "an etcd password file without a user (--etcd-user)".into(),
                ))
            }
            (None, None) => {}
        }
        self.client = Arc::new(OnceCell::new());
        Ok(self)
    }

    fn names(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.hostport.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn etcd_error(&self, message: impl Into<String>) -> StoreError {
        StoreError::Etcd {
            endpoint: self.names(),
            message: message.into(),
        }
    }

    /// The client, connected (and authenticated) at the first call; a failed connection is
    /// tried again at the next.
    async fn client(&self) -> Result<Client, StoreError> {
        self.client
            .get_or_try_init(|| async {
                let urls: Vec<String> = self.endpoints.iter().map(Endpoint::url).collect();
                Client::connect(urls, Some(self.options.as_ref().clone()))
                    .await
                    .map_err(|e| match &self.user {
                        // With a user, connecting authenticates: an answer is etcd's refusal.
                        Some(user) if !unreachable(&e) => {
                            self.etcd_error(format!("authenticating as {user:?}: {}", describe(&e)))
                        }
                        _ => self.etcd_error(describe(&e)),
                    })
            })
            .await
            .cloned()
    }

    /// `call` on the client, bounded by the timeout as a whole (connecting included). An
    /// endpoint that cannot be reached is no answer: the call goes again, as many times as
    /// there are endpoints (the client balances over them). An error answer is final.
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let calling = async {
            let client = self.client().await?;
            let mut tries = self.endpoints.len();
            loop {
                tries -= 1;
                match call(client.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e) if tries > 0 && unreachable(&e) => {
                        tracing::debug!(endpoints = %self.names(), error = %describe(&e), "etcd endpoint unreachable");
                    }
                    Err(e) => return Err(self.etcd_error(describe(&e))),
                }
            }
        };
        match tokio::time::timeout(self.timeout, calling).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                what: format!("etcd {} {what}", self.names()),
                after_ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    /// The key `key` as it stands, if it exists.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.call("get", |mut c| async move { c.get(key, None).await })
            .await
            .map(|mut r| r.take_kvs().into_iter().next())
    }

    pub(super) async fn load(&self) -> Result<Option<(Topology, Version)>, StoreError> {
        let Some(kv) = self.get(&self.topology_key).await? else {
            return Ok(None);
        };
        let topology = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
            what: format!("etcd key {}", self.topology_key),
            message: e.to_string(),
        })?;
        Ok(Some((topology, kv.mod_revision() as Version)))
    }

    pub(super) async fn compare_and_swap(
        &self,
        expected: Option<Version>,
        new: &Topology,
    ) -> Result<bool, StoreError> {
        let key = self.topology_key.as_str();
        let value = serde_json::to_vec(new).map_err(|e| StoreError::Corrupt {
            what: format!("etcd key {key}"),
            message: e.to_string(),
        })?;
        let compare = match expected {
            None => Compare::create_revision(key, CompareOp::Equal, 0),
            Some(v) => Compare::mod_revision(key, CompareOp::Equal, v as i64),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, None)]);
        let r = self
            .call("compare-and-swap", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }

    pub(super) async fn campaign(
        &self,
        id: &str,
        ttl: Duration,
    ) -> Result<Option<Leadership>, StoreError> {
        let (lease, ttl_s) = match self.create_leased(&self.leader_key, id, ttl).await? {
            Ok(taken) => taken,
            Err(held) => {
                if let Some(kv) = held {
                    if kv.value() == id.as_bytes() {
                        // Still ours from an earlier campaign: carry on with that lease, renewed
                        // (as the file store renews on a repeated campaign).
                        let l = Leadership {
                            id: id.to_string(),
                            ttl,
                            lease: kv.lease(),
                        };
                        return Ok(self.renew(&l).await?.then_some(l));
                    }
                }
                return Ok(None);
            }
        };
        tracing::info!(id, lease, ttl_s, "leadership taken (etcd)");
        Ok(Some(Leadership {
            id: id.to_string(),
            ttl,
            lease,
        }))
    }

    pub(super) async fn renew(&self, leadership: &Leadership) -> Result<bool, StoreError> {
        if !self.keep_lease(leadership.lease).await? {
            return Ok(false);
        }
        self.is_leader(leadership).await
    }

    pub(super) async fn is_leader(&self, leadership: &Leadership) -> Result<bool, StoreError> {
        Ok(self.get(&self.leader_key).await?.is_some_and(|kv| {
            kv.value() == leadership.id.as_bytes() && kv.lease() == leadership.lease
        }))
    }

    pub(super) async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        // Revoking the lease deletes the leader key bound to it.
        self.revoke(leadership.lease).await
    }

    pub(super) async fn leader(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(&self.leader_key)
            .await?
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Takes the backup lock as `id` for `ttl` (a key created only if absent, bound to a new
    /// lease): `Ok(Ok(lease))`, or `Ok(Err(holder))` when another process holds it.
    pub(super) async fn lock_backup(
        &self,
        id: &str,
        ttl: Duration,
    ) -> Result<Result<i64, String>, StoreError> {
        Ok(
            match self.create_leased(&self.backup_lock_key, id, ttl).await? {
                Ok((lease, _)) => Ok(lease),
                Err(held) => Err(held
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .unwrap_or_else(|| "another process".into())),
            },
        )
    }

    /// Creates `key` with the value `id`, bound to a new lease of `ttl`, if the key does not
    /// exist (one transaction): `Ok(Ok((lease, ttl in seconds)))`; else `Ok(Err(kv))`, the key
    /// as it stands (`None` if it vanished meanwhile), the new lease revoked.
    async fn create_leased(
        &self,
        key: &str,
        id: &str,
        ttl: Duration,
    ) -> Result<Result<(i64, i64), Option<KeyValue>>, StoreError> {
        // etcd leases count whole seconds (and raise very short ones to its minimum).
        let ttl_s = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let lease = self
            .call("lease grant", |mut c| async move {
                c.lease_grant(ttl_s, None).await
            })
            .await?
            .id();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                id,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let answer = self
            .call("create", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                let _ = self.revoke(lease).await;
                return Err(e);
            }
        };
        if answer.succeeded() {
            return Ok(Ok((lease, ttl_s)));
        }
        // Someone holds it; the new lease is not needed either way.
        let _ = self.revoke(lease).await;
        Ok(Err(answer.op_responses().into_iter().find_map(
            |r| match r {
                TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
                _ => None,
            },
        )))
    }

    /// Keeps a lease alive once (the backup lock's, the leadership's); `false` when it lapsed
    /// (the key bound to it is gone).
    pub(super) async fn keep_lease(&self, lease: i64) -> Result<bool, StoreError> {
        // The client's keep-alive opens a stream, sends one request and reads its answer; the
        // stream closes when dropped.
        let kept = self
            .call("lease keep-alive", |mut c| async move {
                match c.lease_keep_alive(lease).await {
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(kept)
    }

    /// Gives the backup lock up (revoking its lease deletes the key).
    pub(super) async fn unlock_backup(&self, lease: i64) -> Result<(), StoreError> {
        self.revoke(lease).await
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        match self
            .call("lease revoke", |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await
        {
            Ok(_) => Ok(()),
            // Already expired: nothing to give up.
            Err(StoreError::Etcd { message, .. }) if message.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The CA file's PEM, refused when it holds no certificate (tonic would only say so at the
/// first connection).
fn read_ca(ca: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("etcd CA file {}: {e}", ca.display()))?;
    let mut found = false;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        cert.map_err(|e| format!("etcd CA file {}: {e}", ca.display()))?;
        found = true;
    }
    if !found {
        return Err(format!(
            "etcd CA file {}: no certificate found",
            ca.display()
        ));
    }
    Ok(pem)
}

/// A file holding a secret (a password, a private key), refused when group or others may
/// read it.
fn read_secret(file: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).map_err(|e| format!("{what} {}: {e}", file.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {}: mode {:o} lets others read it (chmod 600)",
            file.display(),
            mode & 0o777
        ));
    }
    std::fs::read(file).map_err(|e| format!("{what} {}: {e}", file.display()))
}

/// Whether `e` means no endpoint answered (another may), not an answer.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

/// `e` for a person: etcd's message for an answer, and each cause of a transport error (tonic
/// puts the useful part, "Connection refused" or the certificate's problem, in its sources).
fn describe(e: &etcd_client::Error) -> String {
    use std::error::Error;
    // etcd-client's error gives no source: start from what it wraps.
    let (mut text, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) => (s.message().to_string(), s.source()),
        etcd_client::Error::TransportError(t) => (t.to_string(), t.source()),
        e => (e.to_string(), e.source()),
    };
    while let Some(s) = source {
        if let Some(tls) = tls_error(s) {
            return format!("TLS handshake: {tls}");
        }
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The TLS error `e` is (or wraps, as tokio-rustls does in an `io::Error`).
fn tls_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let s = EtcdStore::new(
            "http://127.0.0.1:2379, localhost:2380/",
            "c",
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        assert_eq!(s.names(), "127.0.0.1:2379,localhost:2380");
        assert_eq!(
            s.endpoints.iter().map(Endpoint::url).collect::<Vec<_>>(),
            ["http://127.0.0.1:2379", "http://localhost:2380"]
        );
        assert_eq!(s.topology_key, "/tidepool/c/topology");
        for bad in [
            "",
            "http://h",
            "http://h:1/x",
            "https://h",
            "https://h:1,http://g:1",
        ] {
            assert!(EtcdStore::new(bad, "c", DEFAULT_TIMEOUT).is_err(), "{bad}");
        }
        let s = EtcdStore::new(
            "https://[::1]:2379,https://etcd.local:2379",
            "c",
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        assert_eq!(s.endpoints[0].url(), "https://[::1]:2379");
        // https needs a CA; a user needs a password file.
        let e = s.clone().with_access(&EtcdAccess::default()).unwrap_err();
        assert!(e.to_string().contains("needs the CA"), "{e}");
        let e = EtcdStore::new("http://h:1", "c", DEFAULT_TIMEOUT)
            .unwrap()
            .with_access(&EtcdAccess {
                user: Some("root".into()),
                ..EtcdAccess::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("password file"), "{e}");
        // A client certificate: both files, and https:// only.
        let e = s
            .clone()
            .with_access(&EtcdAccess {
                ca_file: Some("/nonexistent/ca.pem".into()),
                cert_file: Some("/nonexistent/cert.pem".into()),
                ..EtcdAccess::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("etcd CA file"), "{e}");
        let e = EtcdStore::new("http://h:1", "c", DEFAULT_TIMEOUT)
            .unwrap()
            .with_access(&EtcdAccess {
                cert_file: Some("/nonexistent/cert.pem".into()),
                key_file: Some("/nonexistent/key.pem".into()),
                ..EtcdAccess::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("https:// endpoints only"), "{e}");
        let e = EtcdStore::new("http://h:1", "c", DEFAULT_TIMEOUT)
            .unwrap()
            .with_access(&EtcdAccess {
                key_file: Some("/nonexistent/key.pem".into()),
                ..EtcdAccess::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("both cert_file and key_file"), "{e}");
    }
}
