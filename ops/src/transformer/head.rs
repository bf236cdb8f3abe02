//! The output head: final norm and the vocabulary projection of the tokens whose logits
//! are wanted. The CPU reference of the device trait's head op.

use crate::nn;
use crate::pool::ThreadPool;
use crate::quant::Numerics;
use crate::tensor::{Activations, Matrix};

use super::attention::sized;

/// The head's weights, borrowed from whoever holds them.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    /// `[n_embd]`
    pub output_norm: &'a [f32],
    /// `[n_embd] → [n_vocab]`
    pub output: &'a Matrix,
    pub rms_eps: f32,
}

/// Buffers of [`Head::run`].
pub struct HeadScratch {
    xn: Vec<f32>,
    acts: Activations,
}

impl HeadScratch {
    pub fn new(numerics: Numerics) -> Self {
        Self {
            xn: Vec::new(),
            acts: Activations::with_numerics(numerics),
        }
    }
}

impl Head<'_> {
    /// `logits` (resized to `rows.len() × n_vocab`): row `i` is the logits of token
    /// `rows[i]` of the residual stream `x` (`[n_tok][n_embd]`).
    pub fn run(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        rows: &[u32],
        s: &mut HeadScratch,
        logits: &mut Vec<f32>,
    ) {
        let e = self.output_norm.len();
        logits.clear();
        if rows.is_empty() {
            return;
        }
        sized(&mut s.xn, rows.len() * e);
        for (i, &t) in rows.iter().enumerate() {
            let t = t as usize;
            nn::rms_norm(
                &x[t * e..(t + 1) * e],
                self.output_norm,
                self.rms_eps,
                &mut s.xn[i * e..(i + 1) * e],
            );
        }
        s.acts.set(&s.xn, rows.len());
        sized(logits, rows.len() * self.output.n_rows());
        self.output.matmul(pool, &mut s.acts, logits); // [n_out][n_vocab]
    }
}
