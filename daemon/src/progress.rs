//! A progress bar on stderr for long jobs (transfers, calibration): redrawn in place on a
//! terminal, a line at start and end otherwise (logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const REDRAW_EVERY: Duration = Duration::from_millis(100);
const WIDTH: usize = 30;

pub struct Progress {
    label: String,
    total: u64,
    /// `None` counts bytes (shown in MB); else the name of what is counted.
    unit: Option<&'static str>,
    tty: bool,
    last: Option<Instant>,
    started: Instant,
}

impl Progress {
    /// A bar over `total` bytes.
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        Self::start(label.into(), total, None)
    }

    /// A bar over `total` things called `unit` ("tokens", "layers").
    pub fn counting(label: impl Into<String>, total: u64, unit: &'static str) -> Self {
        Self::start(label.into(), total, Some(unit))
    }

    fn start(label: String, total: u64, unit: Option<&'static str>) -> Self {
        let p = Self {
            label,
            total,
            unit,
            tty: std::io::stderr().is_terminal(),
            last: None,
            started: Instant::now(),
        };
        if !p.tty {
            eprintln!("{}: {} {} ...", p.label, total, unit.unwrap_or("bytes"));
        }
        p
    }

    pub fn update(&mut self, done: u64) {
        if !self.tty || self.last.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        self.draw(done);
    }

    fn draw(&self, done: u64) {
        let frac = if self.total == 0 {
            1.0
        } else {
            (done as f64 / self.total as f64).min(1.0)
        };
        let fill = (frac * WIDTH as f64) as usize;
        let bar: String = (0..WIDTH)
            .map(|i| {
                if i < fill {
                    '='
                } else if i == fill {
                    '>'
                } else {
                    ' '
                }
            })
            .collect();
        let mb = |b: u64| b as f64 / 1e6;
        let count = match self.unit {
            None => format!("{:.1}/{:.1} MB", mb(done), mb(self.total)),
            Some(unit) => format!("{done}/{} {unit}", self.total),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{bar}] {:>3.0}% {count}",
            self.label,
            frac * 100.0,
        );
        let _ = err.flush();
    }

    pub fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64();
        if self.tty {
            self.draw(self.total);
            eprintln!(" ({secs:.1}s)");
        } else {
            eprintln!("{}: done ({secs:.1}s)", self.label);
        }
    }
}
