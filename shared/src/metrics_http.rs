//! The metrics endpoint of the thread-per-core processes (gateway, pooler): `GET /metrics` over
//! HTTP/1.1 on a plain thread with a blocking std listener, so the glommio cores never see a
//! scrape. One request per connection, one connection at a time: Prometheus scrapes every few
//! seconds, and a slow or silent peer is cut after `TIMEOUT`.
//!
//! The page itself is the caller's (`render`): each process encodes its own metrics with
//! `prometheus-client` from the per-core counters it publishes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_HEAD: usize = 8 * 1024;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` now (a taken port is an error the caller reports) and answers scrapes on a
/// thread named `metrics` for the life of the process. `render(openmetrics)` makes the page:
/// OpenMetrics when the scraper's `Accept` names it (Prometheus does), else the 0.0.4 text.
pub fn serve(
    addr: &str,
    render: impl Fn(bool) -> String + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = answer(s, &render) {
                            tracing::debug!(error = %e, "metrics request");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    tracing::info!(%local, "metrics endpoint listening");
    Ok(local)
}

/// What a request head asks: (method, path, wants OpenMetrics). `None` until the head is whole.
pub fn parse_head(head: &[u8]) -> Option<(String, String, bool)> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&head[..end]);
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    Some((method, path, openmetrics))
}

fn answer(mut s: TcpStream, render: &impl Fn(bool) -> String) -> std::io::Result<()> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let parsed = loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(p) = parse_head(&head) {
            break p;
        }
        if head.len() > MAX_HEAD {
            return reply(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    };
    match parsed {
        (m, p, om) if m == "GET" && (p == "/metrics" || p.starts_with("/metrics?")) => {
            let body = render(om);
            let ty = if om { OPENMETRICS } else { PROMETHEUS_TEXT };
            reply(&mut s, "200 OK", ty, &body)
        }
        (m, _, _) if m != "GET" => reply(&mut s, "405 Method Not Allowed", "text/plain", ""),
        _ => reply(&mut s, "404 Not Found", "text/plain", "GET /metrics\n"),
    }
}

fn reply(s: &mut TcpStream, status: &str, ty: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ty}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

/// Index of a SQLSTATE class (its first two characters, `0-9A-Z` each) in a table of
/// [`CLASSES`] counters; anything else (lower case, punctuation, a short code) is the last slot.
pub fn class_index(code: &[u8]) -> usize {
    fn digit(c: u8) -> Option<usize> {
        match c {
            b'0'..=b'9' => Some((c - b'0') as usize),
            b'A'..=b'Z' => Some((c - b'A') as usize + 10),
            _ => None,
        }
    }
    match (
        code.first().copied().and_then(digit),
        code.get(1).copied().and_then(digit),
    ) {
        (Some(a), Some(b)) => a * 36 + b,
        _ => CLASSES - 1,
    }
}

/// Slots of a per-class table: every two-character class, and one for the unreadable.
pub const CLASSES: usize = 36 * 36 + 1;

/// The class a slot stands for (`"unknown"` for the last).
pub fn class_name(i: usize) -> String {
    const D: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    if i >= CLASSES - 1 {
        return "unknown".into();
    }
    String::from_utf8_lossy(&[D[i / 36], D[i % 36]]).into_owned()
}

/// A registry as a page: OpenMetrics when the scraper asked for it, else the 0.0.4 text
/// (an encoding failure is logged and leaves what was written).
pub fn encode(r: &prometheus_client::registry::Registry, openmetrics: bool) -> String {
    let mut out = String::new();
    let done = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, r)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, r)
    };
    if done.is_err() {
        tracing::warn!("metrics: encoding failed");
    }
    out
}

/// The metric families a text exposition declares (its `# TYPE name …` lines). With
/// [`documented_names`], what keeps docs/metrics.md equal to what each process exposes (each
/// process's unit test).
pub fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The metric names a page of docs lists (its `` | `name` `` table rows) that `keep` accepts.
pub fn documented_names(
    doc: &str,
    keep: impl Fn(&str) -> bool,
) -> std::collections::BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| keep(n))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_classes() {
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n"),
            Some(("GET".into(), "/metrics".into(), true))
        );
        assert_eq!(
            parse_head(b"POST /x HTTP/1.1\r\n\r\n"),
            Some(("POST".into(), "/x".into(), false))
        );
        assert_eq!(class_name(class_index(b"42601")), "42");
        assert_eq!(class_name(class_index(b"08P01")), "08");
        assert_eq!(class_name(class_index(b"P0001")), "P0");
        assert_eq!(class_name(class_index(b"x")), "unknown");
        assert_eq!(class_index(b"ZZ000"), CLASSES - 2);
    }

    #[test]
    fn serves_a_page_and_refuses_the_rest() {
        let addr = serve("127.0.0.1:0", |om| format!("page om={om}\n")).unwrap();
        let get = |req: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let r = get("GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("page om=false\n"), "{r}");
        let r = get("GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n");
        assert!(r.contains(OPENMETRICS) && r.ends_with("om=true\n"), "{r}");
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    }
}
