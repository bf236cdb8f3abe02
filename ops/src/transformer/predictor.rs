//! PowerInfer's low-rank activation predictors: which FFN neurons a token will need. The
//! CPU reference of the device trait's predictor op, run by the host (and its predictor
//! actor) for the predictors it holds and by the simulated device for those placed on it.

use std::ops::Range;

use crate::nn;
use crate::pool::ThreadPool;
use crate::quant::Numerics;
use crate::sparse::ActiveSet;
use crate::tensor::{Activations, Matrix};

use super::attention::sized;
use super::{SparsityMode, StepToken};

/// One layer's predictor: `logits = fc2 · relu(fc1 · x + b1) + b2` over the residual
/// stream `x` after attention (before `ffn_norm`); neuron `i` is predicted active where
/// `logits[i] ≥ threshold`. PowerInfer's predictors have no biases; ours (from `prepare`)
/// do.
pub struct Predictor {
    /// `[n_embd] → [rank]`
    pub fc1: Matrix,
    /// `[rank] → [n_ff]`
    pub fc2: Matrix,
    /// `[rank]`
    pub b1: Option<Vec<f32>>,
    /// `[n_ff]`
    pub b2: Option<Vec<f32>>,
}

/// Buffers of [`Predictor::logits`].
pub struct PredictorScratch {
    acts: Activations,
    hidden: Vec<f32>,
    logits: Vec<f32>,
}

impl PredictorScratch {
    pub fn new(numerics: Numerics) -> Self {
        Self {
            acts: Activations::with_numerics(numerics),
            hidden: Vec::new(),
            logits: Vec::new(),
        }
    }

    /// The logits of the last [`Predictor::logits`] (`[n_tok][n_ff]`).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

/// Adds `bias` to every row of `rows`.
pub fn add_rows(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(r, b)| *r += b);
    }
}

impl Predictor {
    pub fn rank(&self) -> usize {
        self.fc1.n_rows()
    }

    pub fn n_ff(&self) -> usize {
        self.fc2.n_rows()
    }

    pub fn n_bytes(&self) -> usize {
        let biases = self.b1.as_ref().map_or(0, Vec::len) + self.b2.as_ref().map_or(0, Vec::len);
        self.fc1.n_bytes() + self.fc2.n_bytes() + 4 * biases
    }

    /// The logits of every neuron for the `n_tok` rows of `x` (`[n_tok][n_embd]`), left in
    /// `s` (see [`PredictorScratch::logits`]).
    pub fn logits(&self, pool: &ThreadPool, x: &[f32], n_tok: usize, s: &mut PredictorScratch) {
        s.acts.set(x, n_tok);
        sized(&mut s.hidden, n_tok * self.rank());
        self.fc1.matmul(pool, &mut s.acts, &mut s.hidden); // [n][rank]
        if let Some(b) = &self.b1 {
            add_rows(&mut s.hidden, b);
        }
        nn::relu(&mut s.hidden);
        s.acts.set(&s.hidden, n_tok);
        sized(&mut s.logits, n_tok * self.n_ff());
        self.fc2.matmul(pool, &mut s.acts, &mut s.logits); // [n][n_ff]
        if let Some(b) = &self.b2 {
            add_rows(&mut s.logits, b);
        }
    }
}

/// Appends to `out` (reset for `neurons.len()` rows), per token of the batch, the neurons
/// of `neurons` whose logit reaches `threshold`, as indices from `neurons.start`; tokens
/// not in predictor mode get an empty entry. `logits` is `[n_tok][n_ff]`.
pub fn select(
    logits: &[f32],
    tokens: &[StepToken],
    threshold: f32,
    neurons: Range<usize>,
    out: &mut ActiveSet,
) {
    let n_ff = logits.len() / tokens.len().max(1);
    assert!(neurons.end <= n_ff);
    out.reset(neurons.len());
    for (t, tok) in tokens.iter().enumerate() {
        if tok.mode == SparsityMode::Predictor {
            let z = &logits[t * n_ff + neurons.start..t * n_ff + neurons.end];
            out.push_where(|i| z[i] >= threshold);
        } else {
            out.push_token([]);
        }
    }
}
