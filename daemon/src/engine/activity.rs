//! Neuron activity: which feed-forward neurons the steps computed, per layer.
//!
//! Each step's executors count the neurons they computed (the device its hot ones); this
//! keeps the totals.

/// Active and available neurons per layer since the engine started.
pub struct Activity {
    n_ff: usize,
    active: Vec<u64>,
    total: Vec<u64>,
    /// Active neurons that were hot (on the device), summed over every layer.
    hot: u64,
}

/// What [`Activity`] reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivityReport {
    /// Fraction of neurons computed per layer.
    pub active_fraction: Vec<f32>,
    /// Share of the computed neurons that were hot (0 without a placement).
    pub hot_hit_rate: f32,
}

impl Activity {
    pub fn new(n_layer: usize, n_ff: usize) -> Self {
        Self {
            n_ff,
            active: vec![0; n_layer],
            total: vec![0; n_layer],
            hot: 0,
        }
    }

    /// Records one step: `counts` is `[n_tok][n_layer]` active neurons, `hot` the same
    /// for the hot ones among them.
    pub fn record(&mut self, counts: &[u32], hot: &[u32]) {
        self.hot += hot.iter().map(|&h| u64::from(h)).sum::<u64>();
        let n_layer = self.active.len();
        for row in counts.chunks_exact(n_layer.max(1)) {
            for (l, &c) in row.iter().enumerate() {
                self.active[l] += u64::from(c);
                self.total[l] += self.n_ff as u64;
            }
        }
    }

    pub fn report(&self) -> ActivityReport {
        let active: u64 = self.active.iter().sum();
        ActivityReport {
            active_fraction: fractions(&self.active, &self.total),
            hot_hit_rate: share(self.hot, active),
        }
    }
}

/// `part / whole`, 0 when the whole is 0.
pub fn share(part: u64, whole: u64) -> f32 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64) as f32
    }
}

/// `active / total` per layer, 1 where nothing ran.
pub fn fractions(active: &[u64], total: &[u64]) -> Vec<f32> {
    active
        .iter()
        .zip(total)
        .map(|(&a, &t)| {
            if t == 0 {
                1.0
            } else {
                (a as f64 / t as f64) as f32
            }
        })
        .collect()
}
