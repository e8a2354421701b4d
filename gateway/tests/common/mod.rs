//! Helpers shared by the gateway's integration tests (each test file includes this module).
#![allow(dead_code)] // each test binary uses its own subset

/// A readable difference between two texts: the first differing line with a few lines of
/// context on each side, then both versions of the differing region.
pub fn diff(left_name: &str, left: &str, right_name: &str, right: &str) -> String {
    let l: Vec<&str> = left.lines().collect();
    let r: Vec<&str> = right.lines().collect();
    let prefix = l.iter().zip(&r).take_while(|(a, b)| a == b).count();
    let suffix = l[prefix..]
        .iter()
        .rev()
        .zip(r[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let context = 5;
    let from = prefix.saturating_sub(context);
    let show = |lines: &[&str], end: usize| -> String {
        let stop = (end + context).min(lines.len());
        let shown: Vec<String> = lines[from..stop]
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let n = from + i;
                let mark = if n >= prefix && n < end { '!' } else { ' ' };
                format!("{mark}{:5} {line}", n + 1)
            })
            .take(80)
            .collect();
        shown.join("\n")
    };
    format!(
        "first difference at line {}\n--- {left_name} ---\n{}\n--- {right_name} ---\n{}\n",
        prefix + 1,
        show(&l, l.len() - suffix),
        show(&r, r.len() - suffix)
    )
}

/// Writes `text` under the cargo target tmp dir so a failing comparison can be inspected whole;
/// returns the path.
pub fn keep(name: &str, text: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tidepool-tests");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(name);
    let _ = std::fs::write(&path, text);
    path.display().to_string()
}

/// A tokio-postgres session whose connection task records the server error that ended it
/// (a FATAL it sent: drain, timeouts), if one did.
pub struct Watched {
    pub client: tokio_postgres::Client,
    ended: std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>,
}

/// What a signalling call answered, one line: its rows' booleans (`[true]`), or its error's
/// severity, SQLSTATE and message.
pub fn answer(r: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>) -> String {
    match r {
        Ok(rows) => format!(
            "{:?}",
            rows.iter().map(|r| r.get::<_, bool>(0)).collect::<Vec<_>>()
        ),
        Err(e) => match e.as_db_error() {
            Some(d) => format!("{} {} {}", d.severity(), d.code().code(), d.message()),
            None => format!("<{e}>"),
        },
    }
}

/// (SQLSTATE, message) of an error.
pub fn parts(e: &tokio_postgres::Error) -> (String, String) {
    (
        e.code().map(|c| c.code().to_string()).unwrap_or_default(),
        e.as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string()),
    )
}

impl Watched {
    pub async fn connect(ep: &testkit::Endpoint) -> Result<Watched, tokio_postgres::Error> {
        let (client, conn) = ep
            .pg_config(testkit::ALICE.0, testkit::ALICE.1, testkit::APP_DB)
            .connect(tokio_postgres::NoTls)
            .await?;
        let ended = std::sync::Arc::new(std::sync::Mutex::new(None));
        let e2 = ended.clone();
        tokio::spawn(async move {
            // Only a server's error (a FATAL it sent); the end of the socket after it is not.
            if let Err(e) = conn.await {
                if e.code().is_some() {
                    *e2.lock().unwrap() = Some(parts(&e));
                }
            }
        });
        Ok(Watched { client, ended })
    }

    pub fn ended(&self) -> Option<(String, String)> {
        self.ended.lock().unwrap().clone()
    }

    /// The error that ended the session, waiting up to `limit` for it.
    pub async fn wait_ended(&self, limit: std::time::Duration) -> Option<(String, String)> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(e) = self.ended() {
                return Some(e);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        None
    }
}
