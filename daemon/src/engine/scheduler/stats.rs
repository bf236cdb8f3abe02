//! What the scheduler publishes for readers on other threads (Status, ListModels,
//! LoadModel): its queue, its generation rate and the engine-wide neuron activity. The
//! scheduler writes the board after every step and control message, under a lock held
//! for the time of a few copies, so a status request never waits for a forward step.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::super::activity::{Activity, ActivityReport};
use super::super::types::EngineError;

/// Window over which the generation rate is reported.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Steps remembered for the rate: more than a window holds at any plausible step rate
/// (a step takes at least a few hundred microseconds), and a bound on memory.
const RATE_STEPS: usize = 4096;

/// The scheduler's state as Status reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SchedStatus {
    /// Sequences holding a slot.
    pub active: usize,
    pub queued: usize,
    /// Tokens generated per second over the last few seconds.
    pub tokens_per_second: f64,
    pub generated_total: u64,
    pub steps_total: u64,
    /// Positions the running sequences hold in the KV cache.
    pub kv_tokens: usize,
}

/// The scheduler's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SchedCounts {
    pub active: usize,
    pub queued: usize,
    pub generated_total: u64,
    pub steps_total: u64,
    pub kv_tokens: usize,
}

/// Tokens streamed per step over the last [`RATE_WINDOW`].
#[derive(Debug, Default)]
struct RateWindow {
    /// (when the step ended, tokens it streamed), oldest first.
    steps: VecDeque<(Instant, usize)>,
}

impl RateWindow {
    fn record(&mut self, at: Instant, tokens: usize) {
        if self.steps.len() == RATE_STEPS {
            self.steps.pop_front();
        }
        self.steps.push_back((at, tokens));
    }

    /// Tokens per second since the oldest step inside the window (0 when none is).
    fn per_second(&mut self, now: Instant) -> f64 {
        while self
            .steps
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > RATE_WINDOW)
        {
            self.steps.pop_front();
        }
        let tokens: usize = self.steps.iter().map(|&(_, n)| n).sum();
        let Some(&(oldest, _)) = self.steps.front() else {
            return 0.0;
        };
        if tokens == 0 {
            return 0.0;
        }
        let span = now
            .saturating_duration_since(oldest)
            .max(Duration::from_millis(1));
        tokens as f64 / span.as_secs_f64()
    }
}

struct Board {
    counts: SchedCounts,
    rate: RateWindow,
    /// Every step's neurons since the engine started.
    activity: Activity,
    /// The scheduler's thread has ended: nothing will change any more.
    stopped: bool,
}

/// The published statistics: written by the scheduler, read by anyone holding a clone.
#[derive(Clone)]
pub(crate) struct StatsBoard(Arc<Mutex<Board>>);

impl StatsBoard {
    pub fn new(n_layer: usize, n_ff: usize) -> Self {
        Self(Arc::new(Mutex::new(Board {
            counts: SchedCounts::default(),
            rate: RateWindow::default(),
            activity: Activity::new(n_layer, n_ff),
            stopped: false,
        })))
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        // Every write leaves the board consistent (plain stores), so a panic while one
        // held the lock leaves nothing half-done.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The scheduler's state now; `Stopped` once its thread has ended.
    pub fn status(&self) -> Result<SchedStatus, EngineError> {
        let mut b = self.board();
        if b.stopped {
            return Err(EngineError::Stopped);
        }
        let c = b.counts;
        Ok(SchedStatus {
            active: c.active,
            queued: c.queued,
            tokens_per_second: b.rate.per_second(Instant::now()),
            generated_total: c.generated_total,
            steps_total: c.steps_total,
            kv_tokens: c.kv_tokens,
        })
    }

    /// Neurons computed per layer since the load, and the share of them that were hot.
    pub fn activity(&self) -> Result<ActivityReport, EngineError> {
        let b = self.board();
        if b.stopped {
            return Err(EngineError::Stopped);
        }
        Ok(b.activity.report())
    }

    /// After a control message: the queue changed.
    pub fn publish(&self, counts: SchedCounts) {
        self.board().counts = counts;
    }

    /// After a step that streamed `tokens`: `active` is the step's active-neuron counts
    /// `[n_tok][n_layer]` followed by the hot ones among them.
    pub fn publish_step(&self, counts: SchedCounts, tokens: usize, active: &[u32]) {
        let (active, hot) = active.split_at(active.len() / 2);
        let mut b = self.board();
        b.counts = counts;
        b.rate.record(Instant::now(), tokens);
        b.activity.record(active, hot);
    }

    pub fn mark_stopped(&self) {
        self.board().stopped = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_the_last_window_only() {
        let mut r = RateWindow::default();
        let t0 = Instant::now();
        assert_eq!(r.per_second(t0), 0.0);
        r.record(t0, 10);
        r.record(t0 + Duration::from_secs(1), 10);
        let rate = r.per_second(t0 + Duration::from_secs(2));
        assert!((rate - 10.0).abs() < 1e-9, "{rate}");
        // The first step falls out of the window, then the second.
        let rate = r.per_second(t0 + Duration::from_millis(5500));
        assert!((rate - 10.0 / 4.5).abs() < 1e-9, "{rate}");
        assert_eq!(r.per_second(t0 + Duration::from_secs(7)), 0.0);
    }

    #[test]
    fn the_board_adds_up_steps_and_reports_stopped() {
        let board = StatsBoard::new(2, 10);
        let counts = SchedCounts {
            active: 1,
            queued: 2,
            generated_total: 3,
            steps_total: 1,
            kv_tokens: 7,
        };
        // Two tokens over two layers: 4 and 6 of 10 neurons in layer 0, all in layer 1;
        // 5 of the 30 active ones hot.
        board.publish_step(counts, 1, &[4, 10, 6, 10, 1, 2, 0, 2]);
        let s = board.status().unwrap();
        assert_eq!((s.active, s.queued, s.generated_total), (1, 2, 3));
        assert_eq!(s.kv_tokens, 7);
        assert!(s.tokens_per_second > 0.0);
        let a = board.activity().unwrap();
        assert_eq!(a.active_fraction, [0.5, 1.0]);
        assert!((a.hot_hit_rate - 5.0 / 30.0).abs() < 1e-6, "{a:?}");
        board.publish(SchedCounts::default());
        assert_eq!(board.status().unwrap().queued, 0);
        board.mark_stopped();
        assert!(matches!(board.status(), Err(EngineError::Stopped)));
        assert!(matches!(board.activity(), Err(EngineError::Stopped)));
    }
}
