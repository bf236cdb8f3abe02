//! The feed-forward block of [`Model::forward`]: the row-major dense FFN, and the
//! neuron path of sparse modes (active sets, the masked row-major FFN for tokens with
//! most neurons active, the neuron-sparse operator for the rest).

use powerinfer_ops::nn;
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::simd;
use powerinfer_ops::sparse::{ActiveSet, HotSplit, ffn_sparse_split};
use powerinfer_ops::tensor::{Activations, Matrix};

use super::{BatchToken, Model, Profile, Scratch, Stage, add_rows, sized};
use crate::model::config::FfnKind;
use crate::model::sparsity::SparsityMode;
use crate::model::weights::LayerWeights;
use crate::model::{ForwardError, LoadError};

/// Rows scattered over memory cost about twice as much per byte as rows streamed in
/// order (the hardware prefetchers fetch the skipped rows too), so on SmolLM2 a token
/// with 40% or more of its neurons active is decoded faster by reading every row.
/// Measure with `powerinferd bench M -p 0 -n 64 -t 1 --sparsity MODE`, alternating
/// runs with and without `POWERINFER_MASKED_MIN=2` (never masked); see the figures in
/// the README. A prompt's tokens share each row they read, so there the sparse
/// operator's saved arithmetic counts for more and gate mode at 51% active prefills
/// slower this way (`-p 512 -n 0`). The choice stays per token all the same, so a
/// token's numbers never depend on the size of the batch it is computed in.
pub const MASKED_MIN_FRACTION: f64 = 0.4;

/// Overrides [`MASKED_MIN_FRACTION`] for the models loaded in this process (a value
/// above 1 turns the masked path off), for measuring the crossover.
pub const MASKED_MIN_ENV: &str = "POWERINFER_MASKED_MIN";

/// [`MASKED_MIN_FRACTION`], or [`MASKED_MIN_ENV`] when set.
pub(super) fn masked_min_fraction() -> Result<f64, LoadError> {
    std::env::var(MASKED_MIN_ENV).map_or(Ok(MASKED_MIN_FRACTION), |v| parse_masked_min(&v))
}

fn parse_masked_min(v: &str) -> Result<f64, LoadError> {
    match v.trim().parse::<f64>() {
        Ok(f) if f >= 0.0 => Ok(f),
        _ => Err(LoadError::BadKey {
            key: MASKED_MIN_ENV.into(),
            value: v.into(),
            expected: "a fraction of neurons, 0 or more".into(),
        }),
    }
}

impl Model {
    /// How this batch's FFN runs: wholly row-major (dense requests, where the file has
    /// `ffn_down`), or through the neuron-sparse operator (dense requests then among them
    /// on the row-major path all the same, so a request's numbers never depend on its
    /// neighbours).
    pub(super) fn ffn_path(&self, batch: &[BatchToken], w: &LayerWeights) -> FfnPath {
        if w.down.is_some() && batch.iter().all(|b| b.sparsity == SparsityMode::Dense) {
            FfnPath::RowMajor
        } else {
            FfnPath::Neurons
        }
    }

    /// The FFN through the neuron-sparse operator: each token's active neurons chosen by
    /// its mode (every neuron, the gate, or the predictor), then gate, up and down rows of
    /// those neurons only. Dense tokens of a batch that also has sparse ones take the
    /// row-major path when the file has `ffn_down`, exactly as they would alone.
    pub(super) fn ffn_neurons(
        &self,
        pool: &ThreadPool,
        layer: usize,
        batch: &[BatchToken],
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        let c = &self.config;
        let w = &self.weights.layers[layer];
        let (n, n_ff, e) = (batch.len(), c.n_ff, c.n_embd);
        let glu = c.ffn.glu();
        let down_t = w
            .down_t
            .as_ref()
            .ok_or_else(|| ForwardError::Sparsity("no neuron-major down projection".into()))?;

        // Dense tokens that can take the row-major path, done first on their own rows.
        s.row_major.clear();
        if w.down.is_some() {
            s.row_major
                .extend((0..n).filter(|&t| batch[t].sparsity == SparsityMode::Dense));
        }
        if let (Some(down), false) = (&w.down, s.row_major.is_empty()) {
            gather(s, Gathered::RowMajor, n_ff, e);
            let [g, u, out] = &mut s.mixed;
            let ff = RowMajorFfn {
                kind: c.ffn,
                w,
                down,
            };
            ff.run(pool, &mut s.gathered_acts, [g, u, out], &mut s.profile);
            scatter(&s.row_major, out, e, &mut s.proj);
        }

        // Gate values in full when a token thresholds them (the same bits the fused
        // operator would compute row by row, so they are reused there).
        let want_gate = batch.iter().any(|b| b.sparsity == SparsityMode::Gate);
        if want_gate {
            w.gate.matmul(pool, &mut s.acts, &mut s.gate);
        }
        // Predictor logits for the tokens that ask for them, from the residual stream.
        let want_pred = batch.iter().any(|b| b.sparsity == SparsityMode::Predictor);
        if want_pred {
            let p = self
                .sparsity
                .predictors
                .as_ref()
                .and_then(|p| p.get(layer))
                .ok_or_else(|| ForwardError::Sparsity("this model has no predictors".into()))?;
            s.pred_acts.set(&s.x, n);
            sized(&mut s.pred_hidden, n * p.rank());
            p.fc1.matmul(pool, &mut s.pred_acts, &mut s.pred_hidden);
            if let Some(b) = &p.b1 {
                add_rows(&mut s.pred_hidden, b);
            }
            nn::relu(&mut s.pred_hidden);
            s.pred_acts.set(&s.pred_hidden, n);
            sized(&mut s.pred_logits, n * n_ff);
            p.fc2.matmul(pool, &mut s.pred_acts, &mut s.pred_logits);
            if let Some(b) = &p.b2 {
                add_rows(&mut s.pred_logits, b);
            }
        }
        s.profile.mark(Stage::GateUp);

        let mut active = s.active.take().unwrap_or_else(|| ActiveSet::new(n_ff));
        active.reset(n_ff);
        // Tokens with most neurons active move their set here and leave an empty one in
        // `active`: they take every row of the row-major matrices instead.
        let mut masked_active = s
            .masked_active
            .take()
            .unwrap_or_else(|| ActiveSet::new(n_ff));
        masked_active.reset(n_ff);
        s.masked.clear();
        let hot_layer = self.hot.as_ref().is_some_and(|h| h.layers[layer].is_some());
        let most = if w.down.is_some() && !hot_layer {
            (self.masked_min_fraction * n_ff as f64).ceil() as usize
        } else {
            usize::MAX
        };
        let gate_thr = self.sparsity.gate_threshold(layer);
        let pred_thr = self.sparsity.predictor_threshold;
        for (t, b) in batch.iter().enumerate() {
            let row = t * n_ff..(t + 1) * n_ff;
            if s.row_major.binary_search(&t).is_ok() {
                active.push_token([]);
                continue;
            }
            match b.sparsity {
                SparsityMode::Dense => active.push_all(),
                SparsityMode::Gate => {
                    s.gate_act.clear();
                    s.gate_act.extend_from_slice(&s.gate[row]);
                    glu.act_slice(&mut s.gate_act);
                    let a = &s.gate_act;
                    active.push_where(|i| a[i].abs() > gate_thr);
                }
                SparsityMode::Predictor => {
                    let z = &s.pred_logits[row];
                    active.push_where(|i| z[i] >= pred_thr);
                }
            }
            let rows = active.token(t);
            s.active_counts[t * c.n_layer + layer] = rows.len() as u32;
            let n_hot = self.hot_neurons[layer] as u32;
            s.hot_counts[t * c.n_layer + layer] = rows.partition_point(|&i| i < n_hot) as u32;
            if rows.len() >= most {
                masked_active.push_token(rows.iter().copied());
                active.pop_token();
                active.push_token([]);
                s.masked.push(t);
            }
        }
        for &t in &s.row_major {
            s.active_counts[t * c.n_layer + layer] = n_ff as u32;
        }
        s.profile.mark(Stage::Activation);

        if let (Some(down), false) = (&w.down, s.masked.is_empty()) {
            gather(s, Gathered::Masked, n_ff, e);
            let [g, u, out] = &mut s.mixed;
            let ff = RowMajorFfn {
                kind: c.ffn,
                w,
                down,
            };
            let mask = Mask {
                active: &masked_active,
                tokens: &s.masked,
                batch_gate: want_gate.then_some(s.gate.as_slice()),
            };
            ff.run_masked(
                pool,
                &mut s.gathered_acts,
                [g, u, out],
                mask,
                &mut s.profile,
            );
            scatter(&s.masked, out, e, &mut s.proj);
        }

        // (Both lists are in token order.)
        let on_rows =
            |t: &usize| s.row_major.binary_search(t).is_ok() || s.masked.binary_search(t).is_ok();
        if (0..n).any(|t| !on_rows(&t)) {
            // Tokens of the row-major and masked paths have no active neurons here and
            // get 0.
            let mut sparse_out = std::mem::take(&mut s.up);
            sized(&mut sparse_out, n * e);
            let hot = self
                .hot
                .as_ref()
                .and_then(|h| Some((h, h.layers[layer].as_ref()?)))
                .map(|(h, l)| HotSplit {
                    n_ranges: l.n_ranges,
                    pool: &h.pool,
                    w: [&l.w[0], &l.w[1], &l.w[2]],
                });
            ffn_sparse_split(
                simd::detected(),
                pool,
                [&w.gate, &w.up, down_t],
                hot,
                glu,
                &mut s.acts,
                want_gate.then_some(s.gate.as_slice()),
                &active,
                &mut s.sparse,
                &mut sparse_out,
            );
            for t in (0..n).filter(|t| !on_rows(t)) {
                s.proj[t * e..(t + 1) * e].copy_from_slice(&sparse_out[t * e..(t + 1) * e]);
            }
            s.up = sparse_out;
        }
        s.active = Some(active);
        s.masked_active = Some(masked_active);
        s.profile.mark(Stage::Down);
        Ok(())
    }
}

/// Which tokens of a batch [`gather`] collects.
#[derive(Clone, Copy)]
enum Gathered {
    RowMajor,
    Masked,
}

/// The FFN inputs of some tokens of the batch, into `gathered_acts`, with `mixed` sized
/// for their gate, up and output.
fn gather(s: &mut Scratch, which: Gathered, n_ff: usize, e: usize) {
    let tokens = match which {
        Gathered::RowMajor => &s.row_major,
        Gathered::Masked => &s.masked,
    };
    let m = tokens.len();
    s.gathered.clear();
    for &t in tokens {
        s.gathered.extend_from_slice(&s.xn[t * e..(t + 1) * e]);
    }
    s.gathered_acts.set(&s.gathered, m);
    sized(&mut s.mixed[0], m * n_ff);
    sized(&mut s.mixed[1], m * n_ff);
    sized(&mut s.mixed[2], m * e);
}

/// Row `i` of `out` (`n_embd` = `e` values) to token `tokens[i]`'s row of `proj`.
fn scatter(tokens: &[usize], out: &[f32], e: usize, proj: &mut [f32]) {
    for (i, &t) in tokens.iter().enumerate() {
        proj[t * e..(t + 1) * e].copy_from_slice(&out[i * e..(i + 1) * e]);
    }
}

/// The dense FFN on row-major matrices: `out = down · (act(gate · x) ∘ (up · x))` for the
/// batch in `acts` (which ends holding the hidden activations).
pub(super) struct RowMajorFfn<'a> {
    pub(super) kind: FfnKind,
    pub(super) w: &'a LayerWeights,
    pub(super) down: &'a Matrix,
}

/// What [`RowMajorFfn::run_masked`] keeps of each row `i` of its batch: the neurons
/// `active.token(i)`, with gate values from row `tokens[i]` of `batch_gate` when given
/// (the batch's gate, already computed) rather than computed again.
struct Mask<'a> {
    active: &'a ActiveSet,
    tokens: &'a [usize],
    batch_gate: Option<&'a [f32]>,
}

impl RowMajorFfn<'_> {
    pub(super) fn run(
        &self,
        pool: &ThreadPool,
        acts: &mut Activations,
        [gate, up, out]: [&mut Vec<f32>; 3],
        profile: &mut Profile,
    ) {
        self.w.gate.matmul(pool, acts, gate); // [n][n_ff]
        self.finish(pool, acts, [gate, up, out], None, profile);
    }

    /// [`Self::run`] with `h` zeroed outside each row's active neurons.
    fn run_masked(
        &self,
        pool: &ThreadPool,
        acts: &mut Activations,
        [gate, up, out]: [&mut Vec<f32>; 3],
        mask: Mask<'_>,
        profile: &mut Profile,
    ) {
        let n_ff = self.w.gate.n_rows();
        match mask.batch_gate {
            Some(all) => {
                for (g, &t) in gate.chunks_exact_mut(n_ff).zip(mask.tokens) {
                    g.copy_from_slice(&all[t * n_ff..(t + 1) * n_ff]);
                }
            }
            None => self.w.gate.matmul(pool, acts, gate),
        }
        self.finish(pool, acts, [gate, up, out], Some(mask.active), profile);
    }

    /// Up, the gated activation (then the mask, if any), and down, after the gate.
    fn finish(
        &self,
        pool: &ThreadPool,
        acts: &mut Activations,
        [gate, up, out]: [&mut Vec<f32>; 3],
        mask: Option<&ActiveSet>,
        profile: &mut Profile,
    ) {
        let n = acts.n_tok();
        self.w.up.matmul(pool, acts, up); // [n][n_ff]
        profile.mark(Stage::GateUp);
        gate_activation(self.kind, gate, up); // h = act(gate) ∘ up
        if let Some(active) = mask {
            let n_ff = self.w.up.n_rows();
            for (i, h) in gate.chunks_exact_mut(n_ff).enumerate() {
                let mut keep = active.token(i).iter().map(|&r| r as usize).peekable();
                for (j, v) in h.iter_mut().enumerate() {
                    if keep.next_if_eq(&j).is_none() {
                        *v = 0.0;
                    }
                }
            }
        }
        profile.mark(Stage::Activation);
        acts.set(gate, n);
        self.down.matmul(pool, acts, out); // [n][n_embd]
        profile.mark(Stage::Down);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FfnPath {
    RowMajor,
    Neurons,
}

/// `gate = act(gate) ∘ up` for the model's FFN kind.
fn gate_activation(kind: FfnKind, gate: &mut [f32], up: &[f32]) {
    match kind {
        FfnKind::SwiGlu => nn::silu_mul(gate, up),
        FfnKind::ReGlu => nn::relu_mul(gate, up),
        FfnKind::DRelu => nn::dual_relu_mul(gate, up),
        FfnKind::GeGlu => nn::gelu_mul(gate, up),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masked_crossover_override_takes_fractions_and_refuses_the_rest() {
        assert_eq!(parse_masked_min("0.25").unwrap(), 0.25);
        assert_eq!(parse_masked_min(" 2 ").unwrap(), 2.0);
        assert_eq!(parse_masked_min("0").unwrap(), 0.0);
        for bad in ["", "half", "-0.1", "NaN"] {
            let e = parse_masked_min(bad).unwrap_err().to_string();
            assert!(e.contains(MASKED_MIN_ENV), "{bad:?}: {e}");
        }
    }
}
