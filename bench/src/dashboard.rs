//! The live view of a run on a terminal: a few lines redrawn in place every second (indicatif),
//! with the run's progress, open connections, QPS and its recent history, latency percentiles
//! and errors. Off a terminal (a pipe, a log file, CI) the run prints today's plain line per
//! second instead (`report::live_line`), which stays greppable.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::aggregate::Point;
use crate::cli::Live;
use crate::report::{errors_inline, live_line, opt_ms};

/// Seconds of QPS history in the sparkline.
const HISTORY: usize = 40;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Where each second of the run goes.
pub enum LiveView {
    /// Nothing (`--quiet`).
    Off,
    /// One line per second on stderr.
    Plain,
    Dashboard(Box<Dashboard>),
}

impl LiveView {
    /// `auto`: the dashboard when both stdout and stderr are terminals (the summary goes to
    /// stdout, the live view to stderr: redirecting either means a log is being kept);
    /// `dashboard`: whenever stderr is a terminal; `plain`: never.
    pub fn new(mode: Live, quiet: bool, title: String, duration_s: f64) -> LiveView {
        if quiet {
            return LiveView::Off;
        }
        let stderr = std::io::stderr().is_terminal();
        let dashboard = match mode {
            Live::Plain => false,
            Live::Auto => stderr && std::io::stdout().is_terminal(),
            Live::Dashboard => stderr,
        };
        if dashboard {
            LiveView::Dashboard(Box::new(Dashboard::new(title, duration_s)))
        } else {
            LiveView::Plain
        }
    }

    pub fn second(&mut self, p: &Point) {
        match self {
            LiveView::Off => {}
            LiveView::Plain => eprintln!("{}", live_line(p)),
            LiveView::Dashboard(d) => d.update(p),
        }
    }

    /// Leaves the last frame on screen, below which the summary is printed.
    pub fn finish(&mut self) {
        if let LiveView::Dashboard(d) = self {
            d.finish();
        }
    }
}

pub struct Dashboard {
    _multi: MultiProgress,
    progress: ProgressBar,
    lines: [ProgressBar; 4],
    /// The run's whole seconds: a point past them is the drain after the load stopped.
    seconds: u64,
    qps_history: VecDeque<u64>,
    peak_open: i64,
    errors_total: BTreeMap<String, u64>,
}

impl Dashboard {
    pub fn new(title: String, duration_s: f64) -> Dashboard {
        // At most 4 frames a second; indicatif draws nothing when stderr is no terminal.
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let seconds = duration_s.ceil().max(1.0) as u64;
        let progress = multi.add(ProgressBar::new(seconds));
        progress.set_style(
            ProgressStyle::with_template(
                "{prefix:.bold} {msg}\n[{elapsed_precise}] {bar:40.cyan/blue} {pos:>4}/{len}s",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        progress.set_prefix("firehose");
        progress.set_message(title);
        // The elapsed clock moves between the workers' once-a-second ticks.
        progress.enable_steady_tick(Duration::from_millis(250));
        let line = || {
            let b = multi.add(ProgressBar::new(0));
            b.set_style(
                ProgressStyle::with_template("{prefix:<12.bold} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        };
        let lines = [line(), line(), line(), line()];
        for (b, name) in lines
            .iter()
            .zip(["connections", "QPS", "latency", "errors"])
        {
            b.set_prefix(name);
            b.set_message("waiting for the first second");
        }
        Dashboard {
            _multi: multi,
            progress,
            lines,
            seconds,
            qps_history: VecDeque::with_capacity(HISTORY),
            peak_open: 0,
            errors_total: BTreeMap::new(),
        }
    }

    pub fn update(&mut self, p: &Point) {
        let c = &p.counts;
        self.peak_open = self.peak_open.max(p.conns_open);
        for (k, v) in &p.errors {
            *self.errors_total.entry(k.clone()).or_default() += v;
        }
        let errors_now: u64 = p.errors.values().sum();
        let errors_total: u64 = self.errors_total.values().sum();
        self.lines[3].set_message(if errors_total == 0 {
            "none".to_string()
        } else {
            format!(
                "{errors_now}/s, {errors_total} in all:{}",
                errors_inline(&self.errors_total, 4)
            )
        });
        self.lines[0].set_message(format!(
            "open {:>7}  peak {:>7}  connects {:>6}/s  failed {:>5}/s",
            p.conns_open, self.peak_open, c.connects_ok, c.connects_failed
        ));
        if u64::from(p.t) >= self.seconds {
            // The drain's partial second: its rates would read as a collapse.
            return;
        }
        let qps = c.reads_ok + c.writes_ok;
        if self.qps_history.len() == HISTORY {
            self.qps_history.pop_front();
        }
        self.qps_history.push_back(qps);
        self.progress.set_position(u64::from(p.t) + 1);
        self.lines[1].set_message(format!(
            "{:>8}/s  read {:>7}/s  write {:>7}/s  {}",
            qps,
            c.reads_ok,
            c.writes_ok,
            sparkline(&self.qps_history)
        ));
        self.lines[2].set_message(format!(
            "read p50 {:>8} p99 {:>8} | write p50 {:>8} p99 {:>8} | connect p99 {:>8}",
            opt_ms(p.read_p50_ms),
            opt_ms(p.read_p99_ms),
            opt_ms(p.write_p50_ms),
            opt_ms(p.write_p99_ms),
            opt_ms(p.connect_p99_ms)
        ));
    }

    pub fn finish(&mut self) {
        self.progress.disable_steady_tick();
        self.progress.abandon();
        for b in &self.lines {
            b.abandon();
        }
    }
}

/// The values as bars of eight heights, the highest value full.
pub fn sparkline(values: &VecDeque<u64>) -> String {
    let max = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&v| {
            if max == 0 {
                SPARKS[0]
            } else {
                let i = (v as f64 / max as f64 * (SPARKS.len() - 1) as f64).round() as usize;
                SPARKS[i.min(SPARKS.len() - 1)]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_the_highest_value() {
        let v: VecDeque<u64> = [0, 50, 100].into_iter().collect();
        assert_eq!(sparkline(&v), "▁▅█");
        let zeros: VecDeque<u64> = [0, 0].into_iter().collect();
        assert_eq!(sparkline(&zeros), "▁▁");
        assert_eq!(sparkline(&VecDeque::new()), "");
    }
}
