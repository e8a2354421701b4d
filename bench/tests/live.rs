//! firehose's live view and the comparison page, against a real Postgres 15 and Tidepool:
//! - on a terminal (a pseudo-terminal from util-linux `script`) the run redraws a dashboard in
//!   place (connections, QPS, latency, errors); through a pipe it prints the plain line per
//!   second and no escape sequence;
//! - `--compare tidepool.json --compare postgres.json --html` puts both runs on each chart,
//!   with their numbers side by side.

mod common;

use common::Scratch;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testkit::{run_merged, PgCluster, Tidepool, TidepoolOpts, APP_DB, BOB};

const FIREHOSE: &str = env!("CARGO_BIN_EXE_firehose");

fn firehose(args: &[&str]) -> testkit::Output {
    let mut cmd = Command::new(FIREHOSE);
    cmd.args(args);
    run_merged(&mut cmd, None, Duration::from_secs(120))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn dashboard_on_a_terminal_and_plain_lines_through_a_pipe() {
    let pg = PgCluster::start();
    let url = pg.direct_url(BOB.0, BOB.1, APP_DB);
    let flags = ["--duration", "3", "-c", "4", "--rows", "200"];

    // Through a pipe: a line per second, no escape sequence.
    let mut args = vec!["--url", &url, "--init"];
    args.extend_from_slice(&flags);
    let plain = firehose(&args);
    assert!(plain.success(), "{}", plain.text);
    assert!(plain.text.contains("[    1s] conns"), "{}", plain.text);
    assert!(!plain.text.contains('\u{1b}'), "{}", plain.text);

    // On a terminal: the dashboard, redrawn in place; the plain lines are gone; the summary is
    // still printed at the end.
    let command = std::iter::once(FIREHOSE.to_string())
        .chain(["--url".to_string(), url.clone()])
        .chain(flags.iter().map(|s| s.to_string()))
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script");
    script
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("TERM", "xterm-256color")
        .env("COLUMNS", "160")
        .env("LINES", "40");
    let tty = run_merged(&mut script, None, Duration::from_secs(120));
    assert!(tty.success(), "{}", tty.text);
    let screen = &tty.text;
    for label in ["connections", "QPS", "latency", "errors", "read p50", "/3s"] {
        assert!(
            screen.contains(label),
            "no {label:?} on the dashboard:\n{screen}"
        );
    }
    assert!(
        screen.contains("\u{1b}["),
        "no cursor movement: not redrawn in place:\n{screen}"
    );
    assert!(
        !screen.contains("[    1s] conns"),
        "plain lines on a terminal:\n{screen}"
    );
    assert!(
        ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█']
            .iter()
            .any(|c| screen.contains(*c)),
        "no QPS sparkline:\n{screen}"
    );
    // The QPS the dashboard showed is a real rate: some second had queries.
    let qps_seen = strip_ansi(screen)
        .split("QPS")
        .skip(1)
        .filter_map(|rest| rest.split("/s").next())
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(qps_seen > 0, "QPS never above 0:\n{screen}");
    assert!(
        screen.contains("connections  peak"),
        "no summary:\n{screen}"
    );

    // --live plain on a terminal keeps the lines.
    let mut script = Command::new("script");
    script
        .args([
            "-q",
            "-e",
            "-c",
            &format!("{command} --live plain"),
            "/dev/null",
        ])
        .env("TERM", "xterm-256color");
    let forced = run_merged(&mut script, None, Duration::from_secs(120));
    assert!(forced.success(), "{}", forced.text);
    assert!(forced.text.contains("[    1s] conns"), "{}", forced.text);
}

/// The text without its ANSI escape sequences (ESC [ parameters, a final letter).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn load(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("report")).expect("json")
}

/// The `<svg>` of the chart titled `title`.
fn svg_of<'a>(page: &'a str, title: &str) -> &'a str {
    page.split(&format!("aria-label=\"{title}\""))
        .nth(1)
        .and_then(|s| s.split("</svg>").next())
        .unwrap_or_else(|| panic!("no chart {title}"))
}

#[test]
fn two_reports_tidepool_and_postgres_on_one_page() {
    let pg = PgCluster::start();
    let scratch = Scratch::new("compare");
    let direct = pg.direct_url(BOB.0, BOB.1, APP_DB);
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(4));
    let through = tp.url(BOB.0, BOB.1, APP_DB);
    let (a, b) = (scratch.path("tidepool.json"), scratch.path("postgres.json"));
    let base = [
        "--duration",
        "3",
        "-c",
        "6",
        "--rows",
        "200",
        "--live",
        "plain",
    ];
    for (url, json, init) in [(&direct, &b, true), (&through, &a, false)] {
        let json = json.display().to_string();
        let mut args = vec!["--url", url.as_str(), "--json", &json];
        if init {
            args.push("--init");
        }
        args.extend_from_slice(&base);
        let out = firehose(&args);
        assert!(out.success(), "{}\n{}", out.text, tp.logs());
    }
    let html = scratch.path("compare.html");
    let html_arg = html.display().to_string();
    let (a_arg, b_arg) = (a.display().to_string(), b.display().to_string());
    let out = firehose(&[
        "--compare",
        &a_arg,
        "--compare",
        &b_arg,
        "--html",
        &html_arg,
    ]);
    assert!(out.success(), "{}", out.text);
    let page = std::fs::read_to_string(&html).expect("compare page");
    assert!(page.contains("tidepool vs postgres"), "{page}");
    // Each run's target and its queries/s as the report has them.
    for (name, path) in [("tidepool", &a), ("postgres", &b)] {
        let r = load(path);
        assert!(
            page.contains(r["target"].as_str().unwrap_or("?")),
            "{name}'s target missing"
        );
        let qps = r["reads_per_s"].as_f64().unwrap() + r["writes_per_s"].as_f64().unwrap();
        assert!(qps > 0.0, "{name}: {r}");
        assert!(
            page.contains(&format!("<td>{qps:.1}</td>")),
            "{name}'s queries/s {qps:.1} missing"
        );
    }
    // Both runs on each chart: a line (and a legend) per run.
    for chart in ["Open connections", "Queries", "Errors"] {
        let svg = svg_of(&page, chart);
        assert_eq!(svg.matches("<path").count(), 2, "{chart}: {svg}");
        assert!(
            svg.contains(">tidepool<") && svg.contains(">postgres<"),
            "{chart}: {svg}"
        );
    }
    let latency = svg_of(&page, "Read latency");
    assert!(
        latency.contains(">tidepool p99<") && latency.contains(">postgres p99<"),
        "{latency}"
    );
    assert!(page.contains("postgres / tidepool"), "no ratio column");

    // Something that is not a report is refused with its name.
    let bogus = scratch.path("bogus.json");
    std::fs::write(&bogus, "{}").unwrap();
    let out = firehose(&[
        "--compare",
        &bogus.display().to_string(),
        "--html",
        &html_arg,
    ]);
    assert!(!out.success(), "{}", out.text);
    assert!(
        out.text.contains("not a firehose --json report"),
        "{}",
        out.text
    );
}
