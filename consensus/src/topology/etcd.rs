//! The topology in etcd (v3 API), for clusters spread over machines.
//!
//! - `/tidepool/<cluster>/topology`: the topology as JSON; its version is the key's
//!   `mod_revision`, and compare-and-swap is one transaction comparing it (`create_revision
//!   == 0` when nothing is stored yet).
//! - `/tidepool/<cluster>/leader`: the leader's id, bound to a lease of the leadership's ttl.
//!   Campaigning is a transaction that creates the key only if it does not exist; renewing is
//!   a lease keep-alive; when the leader stops renewing, etcd deletes the key and the next
//!   campaign wins.
//!
//! - `/tidepool/<cluster>/backup-lock`: the id of the process taking a backup, bound to a
//!   lease it keeps alive while the backup runs: one backup at a time across machines.
//!
//! We speak etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/lease/...`, the
//! same v3 API as gRPC, bytes in base64, 64-bit numbers as strings) over HTTP/1.1: one small
//! request per call, no code generation and no gRPC stack to build (see
//! docs/decisions/2026-11-21-durability-policy.md and 2026-12-07-etcd-client.md). Every call
//! is bounded by the store's timeout, so an etcd that is down or stuck turns into an error,
//! never a hang.
//!
//! Access (`[etcd_access]`): `https://` endpoints are reached over TLS (rustls), their
//! certificate checked against `ca_file` and the endpoint's host; with `user`, the store
//! authenticates (`/v3/auth/authenticate`, the password read from `password_file`) and sends the
//! token it gets in the `Authorization` header of every call, authenticating again once when
//! etcd says the token is no longer valid (simple tokens expire).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use crate::config::EtcdAccess;

use super::{Leadership, StoreError, Topology, Version};

/// The default bound on one etcd call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers larger than this are refused (a topology is a few KiB).
const MAX_RESPONSE: usize = 16 << 20;

/// One etcd endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// `host:port`.
    hostport: String,
    /// `https://`.
    tls: bool,
}

impl Endpoint {
    /// The host part, for the TLS server name (an IPv6 address without its brackets).
    fn host(&self) -> &str {
        let host = self
            .hostport
            .rsplit_once(':')
            .map_or(self.hostport.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// An etcd user and its password, and the token etcd gave for them.
struct Auth {
    user: String,
    password: String,
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or the token.
        f.debug_struct("Auth").field("user", &self.user).finish()
    }
}

/// The topology in etcd (see the module documentation).
#[derive(Clone)]
pub struct EtcdStore {
    /// Each endpoint, tried in order.
    endpoints: Vec<Endpoint>,
    /// For `https://` endpoints (`ca_file`).
    tls: Option<TlsConnector>,
    auth: Option<Arc<Auth>>,
    topology_key: String,
    leader_key: String,
    /// The one-backup-at-a-time lock (`tidepool backup create` on any machine).
    backup_lock_key: String,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth)
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
        Ok(EtcdStore {
            endpoints,
            tls: None,
            auth: None,
            topology_key: format!("/tidepool/{cluster}/topology"),
            leader_key: format!("/tidepool/{cluster}/leader"),
            backup_lock_key: format!("/tidepool/{cluster}/backup-lock"),
            timeout,
        })
    }

    /// The store with `access`: the CA for `https://` endpoints (required by them) and the
    /// user to authenticate as. Reads the files now: a missing or unreadable one is an error
    /// here, not at the first call.
    pub fn with_access(mut self, access: &EtcdAccess) -> Result<EtcdStore, StoreError> {
        let names = self.names();
        let fail = |message: String| StoreError::Etcd {
            endpoint: names.clone(),
            message,
        };
        match &access.ca_file {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                let file = std::fs::File::open(ca)
                    .map_err(|e| fail(format!("etcd CA file {}: {e}", ca.display())))?;
                for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
                    let cert =
                        cert.map_err(|e| fail(format!("etcd CA file {}: {e}", ca.display())))?;
                    roots
                        .add(cert)
                        .map_err(|e| fail(format!("etcd CA file {}: {e}", ca.display())))?;
                }
                if roots.is_empty() {
                    return Err(fail(format!(
                        "etcd CA file {}: no certificate found",
                        ca.display()
                    )));
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| fail(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                self.tls = Some(TlsConnector::from(Arc::new(config)));
            }
            None if self.endpoints.iter().any(|e| e.tls) => {
                return Err(fail(
                    "an https:// endpoint needs the CA that issued its certificate \
                     (--etcd-ca-file, [etcd_access] ca_file)"
                        .into(),
                ))
            }
            None => {}
        }
        match (&access.user, &access.password_file) {
            (Some(user), Some(file)) => {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(file)
                    .map_err(|e| fail(format!("etcd password file {}: {e}", file.display())))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(fail(format!(
                        "etcd password file {}: mode {:o} lets others read it (chmod 600)",
                        file.display(),
                        meta.permissions().mode() & 0o777
                    )));
                }
                let password = std::fs::read_to_string(file)
                    .map_err(|e| fail(format!("etcd password file {}: {e}", file.display())))?;
                self.auth = Some(Arc::new(Auth {
                    user: user.clone(),
                    password: password.trim_end_matches(['\r', '\n']).to_string(),
                    token: Mutex::new(None),
                }));
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
        Ok(self)
    }

    fn names(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.hostport.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One call to the first endpoint that answers, bounded by the timeout as a whole
    /// (authentication included).
    async fn call(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let body = body.to_string();
        let what = format!("etcd {} {path}", self.names());
        let calling = async {
            let token = self.token(false).await?;
            match self.call_any(path, &body, token.as_deref()).await {
                // Simple tokens expire (etcd's --auth-token-ttl): once more with a new one.
                Err(StoreError::Etcd { message, .. })
                    if self.auth.is_some() && message.contains("invalid auth token") =>
                {
                    let token = self.token(true).await?;
                    self.call_any(path, &body, token.as_deref()).await
                }
                r => r,
            }
        };
        match tokio::time::timeout(self.timeout, calling).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                what,
                after_ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    /// The token to send (`None` without a user): the one held, or a new one when there is
    /// none or `fresh`.
    async fn token(&self, fresh: bool) -> Result<Option<String>, StoreError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        if !fresh {
            if let Some(t) = auth.token.lock().ok().and_then(|t| t.clone()) {
                return Ok(Some(t));
            }
        }
        let body = json!({"name": auth.user, "password": auth.password}).to_string();
        let answer = self
            .call_any("/v3/auth/authenticate", &body, None)
            .await
            .map_err(|e| match e {
                StoreError::Etcd { endpoint, message } => StoreError::Etcd {
                    endpoint,
                    message: format!("authenticating as {:?}: {message}", auth.user),
                },
                e => e,
            })?;
        let token = answer
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| self.etcd_error("authenticate: no token in the answer"))?
            .to_string();
        if let Ok(mut held) = auth.token.lock() {
            *held = Some(token.clone());
        }
        Ok(Some(token))
    }

    async fn call_any(
        &self,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> Result<Value, StoreError> {
        let mut last = None;
        for endpoint in &self.endpoints {
            match self.post(endpoint, path, body, token).await {
                Ok(v) => return Ok(v),
                // Unreachable: try the next endpoint. An error answer is final.
                Err(Failure::Unreachable(message)) => {
                    tracing::debug!(endpoint = %endpoint.hostport, %message, "etcd endpoint unreachable");
                    last = Some(StoreError::Etcd {
                        endpoint: endpoint.hostport.clone(),
                        message,
                    });
                }
                Err(Failure::Answer(message)) => {
                    return Err(StoreError::Etcd {
                        endpoint: endpoint.hostport.clone(),
                        message,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Etcd {
            endpoint: String::new(),
            message: "no endpoint".into(),
        }))
    }

    fn etcd_error(&self, message: impl Into<String>) -> StoreError {
        StoreError::Etcd {
            endpoint: self.names(),
            message: message.into(),
        }
    }

    pub(super) async fn load(&self) -> Result<Option<(Topology, Version)>, StoreError> {
        let r = self
            .call(
                "/v3/kv/range",
                json!({ "key": B64.encode(&self.topology_key) }),
            )
            .await?;
        let Some(kv) = first_kv(&r) else {
            return Ok(None);
        };
        let value = bytes_field(kv, "value").map_err(|m| self.etcd_error(m))?;
        let topology = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
            what: format!("etcd key {}", self.topology_key),
            message: e.to_string(),
        })?;
        Ok(Some((topology, int_field(kv, "mod_revision") as Version)))
    }

    pub(super) async fn compare_and_swap(
        &self,
        expected: Option<Version>,
        new: &Topology,
    ) -> Result<bool, StoreError> {
        let key = B64.encode(&self.topology_key);
        let value = serde_json::to_vec(new).map_err(|e| StoreError::Corrupt {
            what: format!("etcd key {}", self.topology_key),
            message: e.to_string(),
        })?;
        let compare = match expected {
            None => {
                json!({ "key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0" })
            }
            Some(v) => {
                json!({ "key": key, "result": "EQUAL", "target": "MOD", "mod_revision": v.to_string() })
            }
        };
        let r = self
            .call(
                "/v3/kv/txn",
                json!({
                    "compare": [compare],
                    "success": [{ "request_put": { "key": key, "value": B64.encode(value) } }],
                }),
            )
            .await?;
        Ok(r.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
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
                    let holder = bytes_field(&kv, "value").unwrap_or_default();
                    if holder == id.as_bytes() {
                        // Still ours from an earlier campaign: carry on with that lease, renewed
                        // (as the file store renews on a repeated campaign).
                        let l = Leadership {
                            id: id.to_string(),
                            ttl,
                            lease: int_field(&kv, "lease"),
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
        let r = self
            .call(
                "/v3/lease/keepalive",
                json!({ "ID": leadership.lease.to_string() }),
            )
            .await?;
        // The gateway wraps the stream's one message in "result"; a lapsed lease has TTL 0.
        let result = r.get("result").unwrap_or(&r);
        if int_field(result, "TTL") <= 0 {
            return Ok(false);
        }
        self.is_leader(leadership).await
    }

    pub(super) async fn is_leader(&self, leadership: &Leadership) -> Result<bool, StoreError> {
        let r = self
            .call(
                "/v3/kv/range",
                json!({ "key": B64.encode(&self.leader_key) }),
            )
            .await?;
        Ok(first_kv(&r).is_some_and(|kv| {
            bytes_field(kv, "value").is_ok_and(|v| v == leadership.id.as_bytes())
                && int_field(kv, "lease") == leadership.lease
        }))
    }

    pub(super) async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        // Revoking the lease deletes the leader key bound to it.
        self.revoke(leadership.lease).await
    }

    pub(super) async fn leader(&self) -> Result<Option<String>, StoreError> {
        let r = self
            .call(
                "/v3/kv/range",
                json!({ "key": B64.encode(&self.leader_key) }),
            )
            .await?;
        Ok(first_kv(&r)
            .and_then(|kv| bytes_field(kv, "value").ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
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
                    .and_then(|kv| bytes_field(&kv, "value").ok())
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
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
    ) -> Result<Result<(i64, i64), Option<Value>>, StoreError> {
        // etcd leases count whole seconds (and raise very short ones to its minimum).
        let ttl_s = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let granted = self
            .call("/v3/lease/grant", json!({ "TTL": ttl_s.to_string() }))
            .await?;
        let lease = int_field(&granted, "ID");
        if lease == 0 {
            return Err(self.etcd_error(format!("lease grant without an ID: {granted}")));
        }
        let key = B64.encode(key);
        let txn = self
            .call(
                "/v3/kv/txn",
                json!({
                    "compare": [{ "key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
                    "success": [{ "request_put": { "key": key, "value": B64.encode(id), "lease": lease.to_string() } }],
                    "failure": [{ "request_range": { "key": key } }],
                }),
            )
            .await;
        let txn = match txn {
            Ok(t) => t,
            Err(e) => {
                let _ = self.revoke(lease).await;
                return Err(e);
            }
        };
        if txn
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            return Ok(Ok((lease, ttl_s)));
        }
        // Someone holds it; the new lease is not needed either way.
        let _ = self.revoke(lease).await;
        Ok(Err(txn
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .and_then(first_kv)
            .cloned()))
    }

    /// Keeps the backup lock's lease alive; `false` when it lapsed (the key is gone).
    pub(super) async fn keep_lease(&self, lease: i64) -> Result<bool, StoreError> {
        let r = self
            .call("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        let result = r.get("result").unwrap_or(&r);
        Ok(int_field(result, "TTL") > 0)
    }

    /// Gives the backup lock up (revoking its lease deletes the key).
    pub(super) async fn unlock_backup(&self, lease: i64) -> Result<(), StoreError> {
        self.revoke(lease).await
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        match self
            .call("/v3/lease/revoke", json!({ "ID": lease.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            // Already expired: nothing to give up.
            Err(StoreError::Etcd { message, .. }) if message.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn first_kv(r: &Value) -> Option<&Value> {
    r.get("kvs").and_then(|k| k.get(0))
}

/// A 64-bit number: the gateway writes them as strings, omits them when zero.
fn int_field(v: &Value, name: &str) -> i64 {
    match v.get(name) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// A bytes field (base64); absent means empty.
fn bytes_field(v: &Value, name: &str) -> Result<Vec<u8>, String> {
    match v.get(name).and_then(Value::as_str) {
        None => Ok(Vec::new()),
        Some(s) => B64
            .decode(s)
            .map_err(|e| format!("field {name} is not base64: {e}")),
    }
}

enum Failure {
    /// No answer (connection refused, reset): another endpoint may do.
    Unreachable(String),
    /// etcd answered with an error.
    Answer(String),
}

impl EtcdStore {
    /// One HTTP/1.1 POST with a JSON body to `endpoint` (over TLS for `https://`); the
    /// connection closes after the answer.
    async fn post(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> Result<Value, Failure> {
        let stream = TcpStream::connect(&endpoint.hostport)
            .await
            .map_err(|e| Failure::Unreachable(format!("connecting: {e}")))?;
        let auth = token
            .map(|t| format!("Authorization: {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             {auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            endpoint.hostport,
            body.len()
        );
        let raw = if endpoint.tls {
            let connector = self
                .tls
                .as_ref()
                .ok_or_else(|| Failure::Answer("no CA for an https:// endpoint".into()))?;
            let name = rustls::pki_types::ServerName::try_from(endpoint.host().to_string())
                .map_err(|e| Failure::Answer(format!("TLS server name: {e}")))?;
            let tls = connector
                .connect(name, stream)
                .await
                .map_err(|e| Failure::Unreachable(format!("TLS handshake: {e}")))?;
            exchange(tls, &request).await?
        } else {
            exchange(stream, &request).await?
        };
        answer(&raw)
    }
}

/// Sends `request` and reads the whole answer, up to the server's close.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<Vec<u8>, Failure> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| Failure::Unreachable(format!("sending: {e}")))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(n) => n,
            // etcd closes TLS connections without close_notify after `Connection: close`.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => 0,
            Err(e) => return Err(Failure::Unreachable(format!("reading: {e}"))),
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX_RESPONSE {
            return Err(Failure::Answer("answer too large".into()));
        }
    }
    Ok(raw)
}

/// The JSON of a whole HTTP answer, or etcd's error in it.
fn answer(raw: &[u8]) -> Result<Value, Failure> {
    let (status, body) = parse_response(raw).map_err(Failure::Answer)?;
    // A streaming call (keep-alive) may carry several JSON lines: the first one counts.
    let first = body
        .split(|&b| b == b'\n')
        .find(|l| !l.iter().all(u8::is_ascii_whitespace))
        .unwrap_or_default();
    let value: Value = serde_json::from_slice(first).map_err(|e| {
        Failure::Answer(format!(
            "HTTP {status}, not JSON ({e}): {}",
            String::from_utf8_lossy(&first[..first.len().min(200)])
        ))
    })?;
    if status != 200 {
        let message = value
            .get("error")
            .or_else(|| value.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        return Err(Failure::Answer(format!("HTTP {status}: {message}")));
    }
    if let Some(err) = value.get("error") {
        // A stream's error arrives as {"error": {...}} with status 200.
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string());
        return Err(Failure::Answer(message));
    }
    Ok(value)
}

/// The status code and the (de-chunked) body of a whole HTTP/1.1 answer.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("answer without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line without an end")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size {
            return Err("chunk shorter than announced".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
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
        assert!(s.endpoints.iter().all(|e| !e.tls));
        assert_eq!(s.topology_key, "/tidepool/c/topology");
        for bad in ["", "http://h", "http://h:1/x", "https://h"] {
            assert!(EtcdStore::new(bad, "c", DEFAULT_TIMEOUT).is_err(), "{bad}");
        }
        let s = EtcdStore::new(
            "https://[::1]:2379,https://etcd.local:2379",
            "c",
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        assert_eq!(s.endpoints[0].host(), "::1");
        assert_eq!(s.endpoints[1].host(), "etcd.local");
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
    }

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n5\r\n\":1}\n\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (200, b"{\"a\":1}\n".to_vec())
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
