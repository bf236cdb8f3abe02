//! One side of a layer's neuron-sparse FFN: a contiguous range of its neurons (all of them
//! on a host without a placement; the hot ones on a device; the cold ones on the host of
//! a hybrid layer), each token choosing its active neurons by its mode. The CPU
//! reference of the device trait's hot FFN op.
//!
//! Rows are local to the side: row `j` of its matrices is neuron `first + j` of the layer.
//! Sides start on a multiple of [`NEURON_RANGE`], so a side's neuron ranges are the
//! layer's, and its partial sum over them has the same bits whether its rows sit in a
//! compact copy (a device's) or in a view of the full matrices (the host's).

use crate::nn::Glu;
use crate::pool::ThreadPool;
use crate::profile::{Profile, Stage};
use crate::sparse::{ActiveSet, NEURON_RANGE, SparseFfn, SparseScratch};
use crate::tensor::{Activations, Matrix};

use super::{SparsityMode, StepToken};
use crate::transformer::attention::sized;

/// The matrices of one side, row per neuron of the side.
#[derive(Clone, Copy)]
pub struct NeuronFfn<'a> {
    /// `[n_embd] → [n]`
    pub gate: &'a Matrix,
    pub up: &'a Matrix,
    /// `[n]` rows of `[n_embd]`.
    pub down_t: &'a Matrix,
    pub glu: Glu,
    /// Gate mode: a neuron is active where `|act(gate · x)|` exceeds this (0 on ReLU-gated
    /// FFNs, where that is exact).
    pub gate_threshold: f32,
}

/// Buffers of [`NeuronFfn::run`], grown to the largest batch seen.
#[derive(Default)]
pub struct FfnScratch {
    gate: Vec<f32>,
    gate_act: Vec<f32>,
    active: Option<ActiveSet>,
    sparse: SparseScratch,
}

/// Whether `first` may begin a side of an FFN (a multiple of [`NEURON_RANGE`]).
pub fn is_side_boundary(first: usize) -> bool {
    first.is_multiple_of(NEURON_RANGE)
}

impl NeuronFfn<'_> {
    /// Neurons of this side.
    pub fn n_neurons(&self) -> usize {
        self.gate.n_rows()
    }

    /// For every token `t` of the batch `x` (the FFN inputs after `ffn_norm`):
    /// `out[t] = Σ h_i · down_t[i]` over the side's neurons `i` that token chooses, and
    /// `counts[t]` = how many it chose. Dense tokens choose every neuron; gate tokens those
    /// whose activated gate passes the threshold (the gate computed for all the side's
    /// neurons, and reused); predictor tokens `predicted.token(t)` (local indices; the
    /// set has one entry per token of the batch, empty for the others).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        pool: &ThreadPool,
        tokens: &[StepToken],
        x: &mut Activations,
        predicted: Option<&ActiveSet>,
        s: &mut FfnScratch,
        out: &mut [f32],
        counts: &mut [u32],
        profile: &mut Profile,
    ) {
        let (n, n_rows) = (tokens.len(), self.n_neurons());
        assert_eq!(x.n_tok(), n);
        assert_eq!(counts.len(), n);
        let want_gate = tokens.iter().any(|t| t.mode == SparsityMode::Gate);
        if want_gate {
            sized(&mut s.gate, n * n_rows);
            self.gate.matmul(pool, x, &mut s.gate); // [n][n_rows]
            profile.mark(Stage::GateUp);
        }
        let mut active = s.active.take().unwrap_or_else(|| ActiveSet::new(n_rows));
        active.reset(n_rows);
        for (t, tok) in tokens.iter().enumerate() {
            match tok.mode {
                SparsityMode::Dense => active.push_all(),
                SparsityMode::Gate => {
                    s.gate_act.clear();
                    s.gate_act
                        .extend_from_slice(&s.gate[t * n_rows..(t + 1) * n_rows]);
                    self.glu.act_slice(&mut s.gate_act);
                    let (a, thr) = (&s.gate_act, self.gate_threshold);
                    active.push_where(|i| a[i].abs() > thr);
                }
                SparsityMode::Predictor => {
                    let p = predicted.expect("predictor-mode tokens come with their masks");
                    active.push_token(p.token(t).iter().copied());
                }
            }
            counts[t] = active.token(t).len() as u32;
        }
        profile.mark(Stage::Activation);
        let ffn = SparseFfn {
            gate_given: want_gate.then_some(s.gate.as_slice()),
            ..SparseFfn::new(self.gate, self.up, self.down_t, self.glu)
        };
        ffn.run(pool, x, &active, &mut s.sparse, out);
        s.active = Some(active);
        profile.mark(Stage::Down);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Numerics, WeightType};
    use crate::rng::Rng;
    use crate::transformer::StepToken;

    /// A side computed on a compact copy of its rows equals the same side computed on a
    /// view of the full matrices, for every mode, and its count is what it chose.
    #[test]
    fn a_side_has_the_same_bits_on_a_compact_copy_and_on_a_view() {
        let mut rng = Rng::new(31);
        let (n_ff, n_embd) = (3 * NEURON_RANGE + 40, 64);
        let pool = ThreadPool::new(2, "t").unwrap();
        for wtype in [WeightType::Q4_1, WeightType::Q8_0, WeightType::F16] {
            let mk = |rng: &mut Rng, r, c| {
                let v: Vec<f32> = (0..r * c).map(|_| rng.normal() * 0.3).collect();
                Matrix::quantize(wtype, &v, r, c)
            };
            let (gate, up) = (mk(&mut rng, n_ff, n_embd), mk(&mut rng, n_ff, n_embd));
            let down_t = {
                let v: Vec<f32> = (0..n_ff * n_embd).map(|_| rng.normal() * 0.3).collect();
                Matrix::quantize(WeightType::Q8_0, &v, n_ff, n_embd)
            };
            let modes = [
                SparsityMode::Dense,
                SparsityMode::Gate,
                SparsityMode::Predictor,
            ];
            let tokens: Vec<StepToken> = modes
                .iter()
                .enumerate()
                .map(|(i, &mode)| StepToken::new(i, crate::ids::SeqSlot(0), mode))
                .collect();
            let x: Vec<f32> = (0..tokens.len() * n_embd).map(|_| rng.normal()).collect();
            for first in [0, NEURON_RANGE, 2 * NEURON_RANGE] {
                let rows = first..n_ff;
                let n = rows.len();
                let mut predicted = ActiveSet::new(n);
                for tok in &tokens {
                    if tok.mode == SparsityMode::Predictor {
                        predicted.push_where(|i| i % 3 == 0);
                    } else {
                        predicted.push_token([]);
                    }
                }
                let idx: Vec<u32> = (first as u32..n_ff as u32).collect();
                let copies = [&gate, &up, &down_t].map(|m| m.select_rows(&idx).unwrap());
                let views = [&gate, &up, &down_t].map(|m| m.rows(rows.clone()));
                let mut results = Vec::new();
                for w in [&copies, &views] {
                    let side = NeuronFfn {
                        gate: &w[0],
                        up: &w[1],
                        down_t: &w[2],
                        glu: Glu::Relu,
                        gate_threshold: 0.1,
                    };
                    let mut acts = Activations::with_numerics(Numerics::Precise);
                    acts.set(&x, tokens.len());
                    let mut out = vec![f32::NAN; tokens.len() * n_embd];
                    let mut counts = vec![0; tokens.len()];
                    side.run(
                        &pool,
                        &tokens,
                        &mut acts,
                        Some(&predicted),
                        &mut FfnScratch::default(),
                        &mut out,
                        &mut counts,
                        &mut Profile::default(),
                    );
                    assert_eq!(counts[0] as usize, n, "dense takes every neuron");
                    assert_eq!(counts[2] as usize, n.div_ceil(3));
                    assert!(counts[1] > 0 && (counts[1] as usize) < n, "{counts:?}");
                    results.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                }
                assert_eq!(results[0], results[1], "{wtype:?} from {first}");
            }
        }
    }
}
