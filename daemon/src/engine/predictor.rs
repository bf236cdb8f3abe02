//! The predictor: which feed-forward neurons of each layer a step computes.
//!
//! For layers that live wholly on one side (all of them without a GPU) it runs inline in
//! that side's executor, so it costs no message per layer. This engine computes
//! densely: every neuron is active; the sparse modes add their decision here.

/// Per-layer decisions and the activity they produced.
pub struct Predictor {
    n_ff: usize,
    /// Neurons computed and neurons available, per layer, since the engine started.
    active: Vec<u64>,
    total: Vec<u64>,
}

impl Predictor {
    /// A dense predictor (the engine refuses other modes until they are implemented).
    pub fn dense(n_layer: usize, n_ff: usize) -> Self {
        Self {
            n_ff,
            active: vec![0; n_layer],
            total: vec![0; n_layer],
        }
    }

    /// Records one step of `n_tokens` tokens: in dense mode every neuron of every layer.
    pub fn record_dense_step(&mut self, n_tokens: usize) {
        let n = (n_tokens * self.n_ff) as u64;
        for (a, t) in self.active.iter_mut().zip(&mut self.total) {
            *a += n;
            *t += n;
        }
    }

    /// Fraction of neurons computed per layer so far (1 for a layer not yet run).
    pub fn active_fraction(&self) -> Vec<f32> {
        self.active
            .iter()
            .zip(&self.total)
            .map(|(&a, &t)| {
                if t == 0 {
                    1.0
                } else {
                    (a as f64 / t as f64) as f32
                }
            })
            .collect()
    }
}
