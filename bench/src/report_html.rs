//! `--html`: one self-contained page (inline CSS and SVG, no script, nothing fetched) with the
//! summary and charts of connections, throughput, latency and errors over time. The charts
//! serve `report_compare` too (two runs on one chart).

use std::fmt::Write as _;

use crate::aggregate::Point;
use crate::cli::Profile;
use crate::report::{Latency, Summary};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

pub(crate) struct Line<'a> {
    pub name: String,
    pub color: &'a str,
    pub values: Vec<Option<f64>>,
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A round axis step giving about five gridlines up to `max`.
fn nice_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let rough = max / 5.0;
    let mag = 10f64.powf(rough.log10().floor());
    let norm = rough / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        // Log axes go down to 0.001 ms.
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Scale {
    Linear,
    /// Decades: latencies span orders of magnitude, and one stall must not flatten the rest.
    Log,
}

/// The vertical axis: gridline values, and where a value lands as a fraction of the height.
struct Axis {
    scale: Scale,
    lo: f64,
    hi: f64,
    grid: Vec<f64>,
}

impl Axis {
    fn new(scale: Scale, values: impl Iterator<Item = f64> + Clone) -> Axis {
        match scale {
            Scale::Linear => {
                let max = values.fold(0.0f64, f64::max);
                let step = nice_step(max);
                let hi = (max / step).ceil().max(1.0) * step;
                let steps = (hi / step).round() as usize;
                Axis {
                    scale,
                    lo: 0.0,
                    hi,
                    grid: (0..=steps).map(|i| i as f64 * step).collect(),
                }
            }
            Scale::Log => {
                let positive = values.filter(|v| *v > 0.0);
                let min = positive.clone().fold(f64::INFINITY, f64::min);
                let max = positive.fold(0.0f64, f64::max);
                let (lo_exp, hi_exp) = if max > 0.0 {
                    let lo = min.log10().floor() as i32;
                    (lo, (max.log10().ceil() as i32).max(lo + 1))
                } else {
                    (0, 1)
                };
                Axis {
                    scale,
                    lo: 10f64.powi(lo_exp),
                    hi: 10f64.powi(hi_exp),
                    grid: (lo_exp..=hi_exp).map(|e| 10f64.powi(e)).collect(),
                }
            }
        }
    }

    /// 0 at the bottom, 1 at the top; `None` for what a log axis cannot show.
    fn frac(&self, v: f64) -> Option<f64> {
        match self.scale {
            Scale::Linear => Some((v - self.lo) / (self.hi - self.lo)),
            Scale::Log if v > 0.0 => {
                Some((v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()))
            }
            Scale::Log => None,
        }
    }
}

pub(crate) fn chart(title: &str, unit: &str, scale: Scale, xs: &[u32], lines: &[Line]) -> String {
    let mut svg = String::new();
    let axis = Axis::new(
        scale,
        lines
            .iter()
            .flat_map(|l| l.values.iter().flatten().copied()),
    );
    let max_x = xs.last().map_or(1.0, |&x| f64::from(x + 1).max(1.0));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + x / max_x * plot_w;
    let py = |f: f64| TOP + plot_h - f * plot_h;

    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{t}">"#,
        t = escape(title)
    );
    let _ = write!(
        svg,
        r#"<text x="{LEFT}" y="18" class="title">{} <tspan class="unit">({}{})</tspan></text>"#,
        escape(title),
        escape(unit),
        if scale == Scale::Log {
            ", log scale"
        } else {
            ""
        }
    );
    // Horizontal gridlines with labels.
    for &g in &axis.grid {
        let Some(f) = axis.frac(g) else { continue };
        let yy = py(f);
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" y1="{yy:.1}" x2="{x2:.1}" y2="{yy:.1}" class="grid"/><text x="{lx:.1}" y="{ty:.1}" class="axis" text-anchor="end">{label}</text>"#,
            x2 = WIDTH - RIGHT,
            lx = LEFT - 6.0,
            ty = yy + 4.0,
            label = fmt_num(g)
        );
    }
    // Time axis: about ten labels.
    let xstep = nice_step(max_x * 0.5).max(1.0);
    let mut x = 0.0;
    while x <= max_x + 1e-9 {
        let xx = px(x);
        let _ = write!(
            svg,
            r#"<line x1="{xx:.1}" y1="{y1:.1}" x2="{xx:.1}" y2="{y2:.1}" class="tick"/><text x="{xx:.1}" y="{ty:.1}" class="axis" text-anchor="middle">{x}s</text>"#,
            y1 = TOP + plot_h,
            y2 = TOP + plot_h + 5.0,
            ty = TOP + plot_h + 18.0
        );
        x += xstep;
    }
    for (i, line) in lines.iter().enumerate() {
        // A gap in the data (no samples that second) breaks the line.
        let mut path = String::new();
        let mut pen_down = false;
        for (&t, v) in xs.iter().zip(&line.values) {
            match v.and_then(|v| axis.frac(v)) {
                Some(f) => {
                    let cmd = if pen_down { 'L' } else { 'M' };
                    let _ = write!(path, "{cmd}{:.1},{:.1} ", px(f64::from(t) + 0.5), py(f));
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if !path.is_empty() {
            let _ = write!(
                svg,
                r#"<path d="{path}" fill="none" stroke="{c}" stroke-width="1.8"/>"#,
                c = line.color
            );
        }
        let lx = LEFT + 10.0 + i as f64 * 150.0;
        let _ = write!(
            svg,
            r#"<rect x="{lx:.1}" y="{ry:.1}" width="12" height="4" fill="{c}"/><text x="{tx:.1}" y="{ty:.1}" class="legend">{n}</text>"#,
            ry = HEIGHT - 10.0,
            c = line.color,
            tx = lx + 16.0,
            ty = HEIGHT - 5.0,
            n = escape(&line.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn series<F: Fn(&Point) -> Option<f64>>(points: &[Point], f: F) -> Vec<Option<f64>> {
    points.iter().map(f).collect()
}

fn latency_row(name: &str, l: &Latency) -> String {
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    format!(
        "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        l.count,
        cell(l.mean_ms),
        cell(l.p50_ms),
        cell(l.p90_ms),
        cell(l.p99_ms),
        cell(l.p999_ms),
        cell(l.max_ms)
    )
}

/// A target rate; 0 means "as fast as it goes".
fn rate(per_s: f64) -> String {
    if per_s > 0.0 {
        format!("{}/s", fmt_num(per_s))
    } else {
        "unthrottled".into()
    }
}

pub fn render(s: &Summary) -> String {
    let pts = &s.series;
    let xs: Vec<u32> = pts.iter().map(|p| p.t).collect();
    let t = &s.totals;
    let c = &s.config;
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>firehose: {target}</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}}
h1{{font-size:20px}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-variant-numeric:tabular-nums}}
td:first-child,th:first-child{{text-align:left}} .bad{{color:#b00;font-weight:bold}}
svg{{display:block;margin:10px 0 24px;background:#fcfcfc;border:1px solid #eee}}
.grid{{stroke:#e4e4e4}} .tick{{stroke:#999}} .axis{{font-size:11px;fill:#555}}
.title{{font-size:14px;font-weight:600;fill:#222}} .unit{{font-weight:normal;fill:#666}} .legend{{font-size:12px;fill:#333}}
</style></head><body><h1>firehose → {target}</h1>
<p>{profile:?} profile, {conns} connections in {procs} process(es), query mode {mode:?}, write ratio {wr}, reads {rq}, writes {wq}, churn {churn}, ramp-up {ramp}s, {run:.1}s run.</p>
<table><tr><th>connections</th><th>value</th></tr>
<tr><td>peak open</td><td>{peak}</td></tr><tr><td>connects ok</td><td>{cok}</td></tr>
<tr><td>connects/s</td><td>{cps:.1}</td></tr><tr><td>connects failed</td><td>{cfail}</td></tr>
<tr><td>disconnects</td><td>{disc}</td></tr></table>
<table><tr><th>queries</th><th>issued</th><th>ok</th><th>failed</th><th>ok/s</th></tr>
<tr><td>reads</td><td>{ri}</td><td>{ro}</td><td>{rf}</td><td>{rps:.1}</td></tr>
<tr><td>writes</td><td>{wi}</td><td>{wo}</td><td>{wf}</td><td>{wps:.1}</td></tr></table>
<table><tr><th>latency (ms)</th><th>count</th><th>mean</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>{lr}{lw}{lc}{sr}{sw}{sc}</table>
"#,
        target = escape(&s.target),
        profile = c.profile,
        conns = c.connections,
        procs = c.processes,
        mode = c.query_mode,
        wr = c.write_ratio,
        rq = rate(c.read_qps),
        wq = rate(c.write_qps),
        churn = match (c.profile, c.churn > 0.0) {
            (Profile::Steady, false) => "none".to_string(),
            _ => rate(c.churn),
        },
        ramp = c.ramp_up_s,
        run = s.run_s,
        peak = s.peak_conns_open,
        cok = t.connects_ok,
        cps = s.connects_per_s,
        cfail = t.connects_failed,
        disc = t.disconnects,
        ri = t.reads_issued,
        ro = t.reads_ok,
        rf = t.reads_failed,
        rps = s.reads_per_s,
        wi = t.writes_issued,
        wo = t.writes_ok,
        wf = t.writes_failed,
        wps = s.writes_per_s,
        lr = latency_row("read", &s.latency.read),
        lw = latency_row("write", &s.latency.write),
        lc = latency_row("connect", &s.latency.connect),
        sr = latency_row(
            &format!("read, steady {}..{}s", s.steady.from_s, s.steady.to_s),
            &s.steady.latency.read
        ),
        sw = latency_row(
            &format!("write, steady {}..{}s", s.steady.from_s, s.steady.to_s),
            &s.steady.latency.write
        ),
        sc = latency_row(
            &format!("connect, steady {}..{}s", s.steady.from_s, s.steady.to_s),
            &s.steady.latency.connect
        ),
    );
    if s.errors.is_empty() {
        h.push_str("<p>No errors.</p>");
    } else {
        let _ = write!(
            h,
            r#"<table><tr><th class="bad">errors ({})</th><th>count</th></tr>"#,
            s.error_total
        );
        for (k, v) in &s.errors {
            let _ = write!(h, "<tr><td>{}</td><td>{v}</td></tr>", escape(k));
        }
        h.push_str("</table>");
    }
    for f in &s.worker_failures {
        let _ = write!(h, r#"<p class="bad">worker failure: {}</p>"#, escape(f));
    }
    let f = |v: u64| Some(v as f64);
    h.push_str(&chart(
        "Open connections",
        "count",
        Scale::Linear,
        &xs,
        &[Line {
            name: "open".into(),
            color: "#1f77b4",
            values: series(pts, |p| Some(p.conns_open as f64)),
        }],
    ));
    h.push_str(&chart(
        "Throughput",
        "per second",
        Scale::Linear,
        &xs,
        &[
            Line {
                name: "reads/s".into(),
                color: "#2ca02c",
                values: series(pts, |p| f(p.counts.reads_ok)),
            },
            Line {
                name: "writes/s".into(),
                color: "#ff7f0e",
                values: series(pts, |p| f(p.counts.writes_ok)),
            },
            Line {
                name: "connects/s".into(),
                color: "#9467bd",
                values: series(pts, |p| f(p.counts.connects_ok)),
            },
        ],
    ));
    h.push_str(&chart(
        "Latency",
        "ms",
        Scale::Log,
        &xs,
        &[
            Line {
                name: "read p50".into(),
                color: "#98df8a",
                values: series(pts, |p| p.read_p50_ms),
            },
            Line {
                name: "read p99".into(),
                color: "#2ca02c",
                values: series(pts, |p| p.read_p99_ms),
            },
            Line {
                name: "write p50".into(),
                color: "#ffbb78",
                values: series(pts, |p| p.write_p50_ms),
            },
            Line {
                name: "write p99".into(),
                color: "#ff7f0e",
                values: series(pts, |p| p.write_p99_ms),
            },
            Line {
                name: "connect p99".into(),
                color: "#9467bd",
                values: series(pts, |p| p.connect_p99_ms),
            },
        ],
    ));
    h.push_str(&chart(
        "Errors",
        "per second",
        Scale::Linear,
        &xs,
        &[
            Line {
                name: "connect".into(),
                color: "#d62728",
                values: series(pts, |p| f(p.counts.connects_failed)),
            },
            Line {
                name: "query".into(),
                color: "#8c564b",
                values: series(pts, |p| f(p.counts.reads_failed + p.counts.writes_failed)),
            },
        ],
    ));
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axis_spans_whole_decades() {
        let a = Axis::new(Scale::Log, [0.3, 2.0, 150.0].into_iter());
        assert_eq!((a.lo, a.hi), (0.1, 1000.0));
        assert_eq!(a.grid.len(), 5);
        assert!((a.frac(10.0).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(a.frac(0.0), None);
        let lin = Axis::new(Scale::Linear, [0.0, 45.0].into_iter());
        assert_eq!(lin.hi, 50.0);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(100.0), 20.0);
        assert_eq!(nice_step(7.0), 2.0);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(45_000.0), 10_000.0);
    }

    #[test]
    fn chart_is_svg_with_a_path_per_line() {
        let svg = chart(
            "t",
            "u",
            Scale::Linear,
            &[0, 1, 2],
            &[Line {
                name: "a".into(),
                color: "#000",
                values: vec![Some(1.0), None, Some(3.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        // The gap at t=1 starts a new subpath.
        let d = svg
            .split(r#"<path d=""#)
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches('L').count(), 0, "{d}");
    }
}
