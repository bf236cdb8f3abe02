//! A progress bar on stderr for long jobs (transfers, calibration): redrawn in place on a
//! terminal, a line at start and end otherwise (logs stay readable). A caller may also
//! have the jobs it runs on its thread report to it ([`reporting_to`]): the daemon's
//! PullModel streams a fetch's progress to its client this way.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// One progress report: `done` of `total` (0: not known) of the job named `label`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report<'a> {
    pub label: &'a str,
    pub done: u64,
    pub total: u64,
    /// The job has ended.
    pub finished: bool,
}

type Sink = Box<dyn FnMut(Report<'_>)>;

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// Runs `job`, sending the progress of every bar it draws on this thread to `sink` too
/// (at most every [`REDRAW_EVERY`] per bar, and its end).
pub fn reporting_to<R>(sink: impl FnMut(Report<'_>) + 'static, job: impl FnOnce() -> R) -> R {
    struct Restore(Option<Sink>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SINK.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = SINK.with(|s| s.borrow_mut().replace(Box::new(sink)));
    let _restore = Restore(previous);
    job()
}

fn report(r: Report<'_>) {
    SINK.with(|s| {
        if let Some(sink) = s.borrow_mut().as_mut() {
            sink(r);
        }
    });
}

const REDRAW_EVERY: Duration = Duration::from_millis(100);
const WIDTH: usize = 30;

pub struct Progress {
    label: String,
    total: u64,
    /// `None` counts bytes (shown in MB); else the name of what is counted.
    unit: Option<&'static str>,
    tty: bool,
    last: Option<Instant>,
    /// The count last given.
    done: u64,
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
            done: 0,
            started: Instant::now(),
        };
        if !p.tty {
            if total == 0 {
                eprintln!("{} ...", p.label);
            } else {
                eprintln!("{}: {} {} ...", p.label, total, unit.unwrap_or("bytes"));
            }
        }
        p.report(false);
        p
    }

    fn report(&self, finished: bool) {
        report(Report {
            label: &self.label,
            done: self.done,
            total: self.total,
            finished,
        });
    }

    /// `done` so far (a `total` of 0 means it is not known).
    pub fn update(&mut self, done: u64) {
        self.done = done;
        if self.last.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        self.report(false);
        if self.tty {
            self.draw(done);
        }
    }

    fn draw(&self, done: u64) {
        if self.total == 0 {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{} {:.1} MB", self.label, done as f64 / 1e6);
            let _ = err.flush();
            return;
        }
        let frac = (done as f64 / self.total as f64).min(1.0);
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

    pub fn finish(mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        if self.total > 0 {
            self.done = self.total;
        }
        self.report(true);
        if self.tty {
            self.draw(self.done);
            eprintln!(" ({secs:.1}s)");
        } else {
            eprintln!("{}: done ({secs:.1}s)", self.label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_sink_gets_every_bar_s_start_updates_and_end_then_is_removed() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        reporting_to(
            move |r| {
                s.lock()
                    .unwrap()
                    .push((r.label.to_owned(), r.done, r.total, r.finished))
            },
            || {
                let mut p = Progress::new("copy", 10);
                p.update(4);
                p.finish();
                let mut q = Progress::new("fetch", 0);
                q.update(7);
                q.finish();
            },
        );
        let seen = seen.lock().unwrap().clone();
        let s = |l: &str, d, t, f| (l.to_owned(), d, t, f);
        assert_eq!(
            seen,
            [
                s("copy", 0, 10, false),
                s("copy", 4, 10, false),
                s("copy", 10, 10, true),
                s("fetch", 0, 0, false),
                s("fetch", 7, 0, false),
                s("fetch", 7, 0, true),
            ]
        );
        // Outside `reporting_to`, nothing is sent anywhere.
        SINK.with(|s| assert!(s.borrow().is_none()));
    }
}
