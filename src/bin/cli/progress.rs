//! A progress bar for long CLI commands (pretraining, fine-tuning, evaluation, tokenizer
//! training). On a terminal it redraws one line in place; when stderr is a file or a pipe (CI
//! logs, `scripts/run | tee`) it prints a plain line at most every few seconds and at the end,
//! so logs stay readable and short.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Seconds between plain lines when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Redraws per second at most on a terminal.
const DRAW_INTERVAL: Duration = Duration::from_millis(100);
const BAR_WIDTH: usize = 30;

pub struct Progress {
    label: String,
    total: u64,
    /// Where the count started (a resumed run starts past 0): rates and the ETA use only the work
    /// done in this process.
    first: u64,
    start: Instant,
    last_draw: Option<Instant>,
    terminal: bool,
}

impl Progress {
    pub fn new(label: &str, first: u64, total: u64) -> Self {
        Progress {
            label: label.to_string(),
            total,
            first,
            start: Instant::now(),
            last_draw: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Reports that `done` of `total` units are finished; `detail` follows the bar (loss, rate).
    pub fn update(&mut self, done: u64, detail: &str) {
        let now = Instant::now();
        let finished = done >= self.total;
        let interval = if self.terminal { DRAW_INTERVAL } else { LOG_INTERVAL };
        if !finished && self.last_draw.is_some_and(|t| now - t < interval) {
            return;
        }
        self.last_draw = Some(now);
        let line = self.line(done, detail, now);
        let mut err = std::io::stderr().lock();
        // A failed write to stderr is not worth failing the run for.
        let _ = if self.terminal {
            write!(err, "\r{line}\x1b[K{}", if finished { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    fn line(&self, done: u64, detail: &str, now: Instant) -> String {
        let frac = if self.total == 0 { 1.0 } else { (done as f64 / self.total as f64).min(1.0) };
        let filled = (frac * BAR_WIDTH as f64).round() as usize;
        let bar: String = "#".repeat(filled) + &".".repeat(BAR_WIDTH - filled);
        let elapsed = (now - self.start).as_secs_f64();
        let done_here = done.saturating_sub(self.first);
        let eta = if done_here > 0 && done < self.total {
            let left = (self.total - done) as f64 * elapsed / done_here as f64;
            format!(", ETA {}", clock(left))
        } else {
            String::new()
        };
        let detail = if detail.is_empty() { String::new() } else { format!(" {detail}") };
        format!("{} [{bar}] {:3.0}% {done}/{} {}{eta}{detail}", self.label, frac * 100.0, self.total, clock(elapsed))
    }
}

/// `95.2` → `1m35s`; under a minute `12s`; over an hour `1h02m`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_formats() {
        assert_eq!(clock(0.4), "0s");
        assert_eq!(clock(59.4), "59s");
        assert_eq!(clock(95.2), "1m35s");
        assert_eq!(clock(3725.0), "1h02m");
    }

    #[test]
    fn line_shows_fraction_and_eta_of_this_process() {
        let start = Instant::now();
        let p = Progress { label: "pretrain".into(), total: 100, first: 50, start, last_draw: None, terminal: false };
        // 25 of the 50 steps left to this process done in 10 s: 25 more take 10 s.
        let line = p.line(75, "loss 2.0", start + Duration::from_secs(10));
        assert!(
            line.starts_with("pretrain [#######################.......]  75% 75/100 10s, ETA 10s loss 2.0"),
            "{line}"
        );
        let end = p.line(100, "", start + Duration::from_secs(20));
        assert!(end.contains("100% 100/100 20s") && !end.contains("ETA"), "{end}");
    }
}
