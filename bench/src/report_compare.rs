//! `--compare A.json [--compare B.json] --html OUT`: earlier runs' `--json` reports on one page,
//! each chart holding every run (Tidepool and PgBouncer under the same load, say), with a table
//! of the headline numbers side by side and their ratio. Nothing is run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::report_html::{chart, escape, Line, Scale};

/// The parts of a `--json` report this page shows (`report::Summary` as written).
#[derive(Debug, Clone, Deserialize)]
pub struct RunReport {
    pub target: String,
    pub config: RunConfig,
    pub run_s: f64,
    pub peak_conns_open: i64,
    pub connects_per_s: f64,
    pub reads_per_s: f64,
    pub writes_per_s: f64,
    pub error_total: u64,
    pub latency: Latencies,
    pub series: Vec<SeriesPoint>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunConfig {
    pub profile: String,
    pub query_mode: String,
    pub connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Latencies {
    pub read: Latency,
    pub write: Latency,
    pub connect: Latency,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Latency {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One second of a run (`aggregate::Point` as written: the counts are flattened into it).
#[derive(Debug, Clone, Deserialize)]
pub struct SeriesPoint {
    pub t: u32,
    pub conns_open: i64,
    pub reads_ok: u64,
    pub writes_ok: u64,
    pub reads_failed: u64,
    pub writes_failed: u64,
    pub connects_failed: u64,
    pub read_p50_ms: Option<f64>,
    pub read_p99_ms: Option<f64>,
    pub write_p99_ms: Option<f64>,
}

/// A run and the name it goes by on the page.
pub struct Named {
    pub name: String,
    pub report: RunReport,
}

pub fn load(path: &Path) -> Result<Named> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let report: RunReport = serde_json::from_str(&text).map_err(|e| {
        Error::Report(format!(
            "{} is not a firehose --json report: {e}",
            path.display()
        ))
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(Named { name, report })
}

/// Reads the reports and writes the page.
pub fn run(reports: &[PathBuf], out: &Path) -> Result<()> {
    let mut runs = Vec::new();
    for p in reports {
        runs.push(load(p)?);
    }
    if runs.len() == 2 && runs[0].name == runs[1].name {
        runs[0].name.push_str(" (1)");
        runs[1].name.push_str(" (2)");
    }
    std::fs::write(out, render(&runs)).map_err(|e| Error::io(out.display().to_string(), e))
}

/// One value of a second of a run, for a chart.
type PointValue = fn(&SeriesPoint) -> Option<f64>;

/// `f` of each second of `r`, on a time axis of `len` seconds (`None` where `r` has none).
fn values(r: &RunReport, len: u32, f: PointValue) -> Vec<Option<f64>> {
    let mut v = vec![None; len as usize];
    for p in &r.series {
        if let Some(slot) = v.get_mut(p.t as usize) {
            *slot = f(p);
        }
    }
    v
}

/// A chart's lines: per run, one per `(label after the run's name, value, dark colour?)`.
fn lines(runs: &[Named], len: u32, metrics: &[(&str, PointValue, bool)]) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let (dark, light) = COLORS[i % COLORS.len()];
        for (label, f, strong) in metrics {
            out.push(Line {
                name: if label.is_empty() {
                    run.name.clone()
                } else {
                    format!("{} {label}", run.name)
                },
                color: if *strong { dark } else { light },
                values: values(&run.report, len, *f),
            });
        }
    }
    out
}

/// Each run's dark and light colour.
const COLORS: [(&str, &str); 2] = [("#1f77b4", "#9ecae9"), ("#ff7f0e", "#fdbf85")];

/// `b / a`, when both are there and `a` is not 0.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a != 0.0 => format!("{:.2}×", b / a),
        _ => "-".into(),
    }
}

pub fn render(runs: &[Named]) -> String {
    let names: Vec<String> = runs.iter().map(|r| escape(&r.name)).collect();
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>firehose: {title}</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}}
h1{{font-size:20px}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-variant-numeric:tabular-nums}}
td:first-child,th:first-child{{text-align:left}}
svg{{display:block;margin:10px 0 24px;background:#fcfcfc;border:1px solid #eee}}
.grid{{stroke:#e4e4e4}} .tick{{stroke:#999}} .axis{{font-size:11px;fill:#555}}
.title{{font-size:14px;font-weight:600;fill:#222}} .unit{{font-weight:normal;fill:#666}} .legend{{font-size:12px;fill:#333}}
</style></head><body><h1>firehose: {title}</h1>
"#,
        title = names.join(" vs ")
    );
    // Side by side, with B/A when there are two.
    let two = runs.len() == 2;
    h.push_str("<table><tr><th></th>");
    for n in &names {
        let _ = write!(h, "<th>{n}</th>");
    }
    if two {
        let _ = write!(h, "<th>{} / {}</th>", names[1], names[0]);
    }
    h.push_str("</tr>");
    let text_row = |h: &mut String, label: &str, f: &dyn Fn(&RunReport) -> String| {
        let _ = write!(h, "<tr><td>{label}</td>");
        for r in runs {
            let _ = write!(h, "<td>{}</td>", escape(&f(&r.report)));
        }
        if two {
            h.push_str("<td></td>");
        }
        h.push_str("</tr>");
    };
    text_row(&mut h, "target", &|r| r.target.clone());
    text_row(&mut h, "load", &|r| {
        format!(
            "{} connections, {}, {}, {:.1}s",
            r.config.connections, r.config.profile, r.config.query_mode, r.run_s
        )
    });
    type Num = dyn Fn(&RunReport) -> Option<f64>;
    // (label, value, decimals shown)
    let rows: [(&str, &Num, usize); 10] = [
        ("queries/s", &|r| Some(r.reads_per_s + r.writes_per_s), 1),
        ("reads/s", &|r| Some(r.reads_per_s), 1),
        ("writes/s", &|r| Some(r.writes_per_s), 1),
        ("connects/s", &|r| Some(r.connects_per_s), 1),
        ("read p50 (ms)", &|r| r.latency.read.p50_ms, 3),
        ("read p99 (ms)", &|r| r.latency.read.p99_ms, 3),
        ("write p50 (ms)", &|r| r.latency.write.p50_ms, 3),
        ("write p99 (ms)", &|r| r.latency.write.p99_ms, 3),
        ("connect p99 (ms)", &|r| r.latency.connect.p99_ms, 3),
        ("errors", &|r| Some(r.error_total as f64), 0),
    ];
    for (label, f, decimals) in rows {
        let _ = write!(h, "<tr><td>{label}</td>");
        for r in runs {
            let cell = f(&r.report).map_or("-".into(), |v| format!("{v:.decimals$}"));
            let _ = write!(h, "<td>{cell}</td>");
        }
        if two {
            let _ = write!(
                h,
                "<td>{}</td>",
                ratio(f(&runs[0].report), f(&runs[1].report))
            );
        }
        h.push_str("</tr>");
    }
    let _ = write!(h, "<tr><td>peak open connections</td>");
    for r in runs {
        let _ = write!(h, "<td>{}</td>", r.report.peak_conns_open);
    }
    h.push_str(if two {
        "<td></td></tr></table>"
    } else {
        "</tr></table>"
    });

    // Every run on a shared time axis (seconds since each run's start).
    let len = runs
        .iter()
        .flat_map(|r| r.report.series.iter().map(|p| p.t + 1))
        .max()
        .unwrap_or(0);
    let xs: Vec<u32> = (0..len).collect();
    h.push_str(&chart(
        "Open connections",
        "count",
        Scale::Linear,
        &xs,
        &lines(runs, len, &[("", |p| Some(p.conns_open as f64), true)]),
    ));
    h.push_str(&chart(
        "Queries",
        "per second",
        Scale::Linear,
        &xs,
        &lines(
            runs,
            len,
            &[("", |p| Some((p.reads_ok + p.writes_ok) as f64), true)],
        ),
    ));
    h.push_str(&chart(
        "Read latency",
        "ms",
        Scale::Log,
        &xs,
        &lines(
            runs,
            len,
            &[
                ("p50", |p| p.read_p50_ms, false),
                ("p99", |p| p.read_p99_ms, true),
            ],
        ),
    ));
    h.push_str(&chart(
        "Write latency p99",
        "ms",
        Scale::Log,
        &xs,
        &lines(runs, len, &[("", |p| p.write_p99_ms, true)]),
    ));
    h.push_str(&chart(
        "Errors",
        "per second",
        Scale::Linear,
        &xs,
        &lines(
            runs,
            len,
            &[(
                "",
                |p| Some((p.reads_failed + p.writes_failed + p.connects_failed) as f64),
                true,
            )],
        ),
    ));
    h.push_str(
        "<p>Runs as recorded by <code>firehose --json</code>; time is seconds since each run's \
         start. Compare runs made on the same machine in one sitting: absolute numbers drift on \
         a shared machine, ratios less.</p></body></html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, qps: u64) -> Named {
        let json = format!(
            r#"{{"target":"t-{name}","config":{{"profile":"steady","query_mode":"simple","connections":4}},
            "run_s":2.0,"peak_conns_open":4,"connects_per_s":2.0,"reads_per_s":{qps}.0,"writes_per_s":0.0,
            "error_total":0,"latency":{{"read":{{"p50_ms":0.5,"p99_ms":1.0}},"write":{{"p50_ms":null,"p99_ms":null}},
            "connect":{{"p50_ms":2.0,"p99_ms":3.0}}}},
            "series":[{{"t":0,"conns_open":4,"reads_ok":{qps},"writes_ok":0,"reads_failed":0,"writes_failed":0,
            "connects_failed":0,"read_p50_ms":0.5,"read_p99_ms":1.0,"write_p99_ms":null}},
            {{"t":1,"conns_open":4,"reads_ok":{qps},"writes_ok":0,"reads_failed":0,"writes_failed":0,
            "connects_failed":0,"read_p50_ms":0.5,"read_p99_ms":1.0,"write_p99_ms":null}}]}}"#
        );
        Named {
            name: name.into(),
            report: serde_json::from_str(&json).unwrap(),
        }
    }

    #[test]
    fn two_runs_share_each_chart_and_the_table_has_their_ratio() {
        let page = render(&[run("tidepool", 100), run("pgbouncer", 250)]);
        assert!(page.contains("tidepool vs pgbouncer"));
        assert!(page.contains("<td>2.50×</td>"), "{page}");
        // The queries chart: one path per run.
        let queries = page.split("aria-label=\"Queries\"").nth(1).unwrap();
        let queries = queries.split("</svg>").next().unwrap();
        assert_eq!(queries.matches("<path").count(), 2);
        assert!(queries.contains(">tidepool<") && queries.contains(">pgbouncer<"));
    }
}
