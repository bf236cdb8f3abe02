//! Neuron activity: which feed-forward neurons the steps computed, per layer.
//!
//! The decision itself (every neuron, the gate's, or the predictor's) runs inline in the
//! forward pass of the executor that owns the layer (DESIGN.md §3: layers wholly on one
//! side exchange no per-layer messages); the executor reports each step's active counts
//! and this keeps the totals.

/// Active and available neurons per layer since the engine started.
pub struct Activity {
    n_ff: usize,
    active: Vec<u64>,
    total: Vec<u64>,
}

impl Activity {
    pub fn new(n_layer: usize, n_ff: usize) -> Self {
        Self {
            n_ff,
            active: vec![0; n_layer],
            total: vec![0; n_layer],
        }
    }

    /// Records one step: `counts` is `[n_tok][n_layer]` active neurons.
    pub fn record(&mut self, counts: &[u32]) {
        let n_layer = self.active.len();
        for row in counts.chunks_exact(n_layer.max(1)) {
            for (l, &c) in row.iter().enumerate() {
                self.active[l] += u64::from(c);
                self.total[l] += self.n_ff as u64;
            }
        }
    }

    /// Fraction of neurons computed per layer so far (1 for a layer not yet run).
    pub fn active_fraction(&self) -> Vec<f32> {
        fractions(&self.active, &self.total)
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
