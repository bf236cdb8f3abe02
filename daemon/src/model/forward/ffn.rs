//! The feed-forward block of [`Model::forward`] on the host.
//!
//! Where the file has the row-major `ffn_down` (a model without a placement): the
//! row-major dense FFN for dense tokens, the masked row-major FFN for sparse tokens with
//! most neurons active, and the neuron-sparse operator for the rest. Otherwise (neuron-
//! major only, always the case once a placement is applied): the layer's neurons as a hot
//! side and a cold side (`powerinfer_ops::transformer::NeuronFfn`), summed hot + cold,
//! the order a hybrid run adds the device's and the host's partial sums in.

use powerinfer_ops::nn;
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::profile::{Profile, Stage};
use powerinfer_ops::quant::Numerics;
use powerinfer_ops::sparse::{ActiveSet, SparseFfn, SparseScratch};
use powerinfer_ops::tensor::{Activations, Matrix};
use powerinfer_ops::transformer::{self, FfnScratch, NeuronFfn, PredictorScratch};

use super::{BatchToken, Scratch, sized};
use crate::model::ForwardError;
use crate::model::Model;
use crate::model::config::FfnKind;
use crate::model::sparsity::SparsityMode;
use crate::model::weights::LayerWeights;

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

/// The environment variable that overrides [`MASKED_MIN_FRACTION`] for the models a
/// command loads (a value above 1 turns the masked path off), for measuring the
/// crossover; read by `crate::settings`.
pub const MASKED_MIN_ENV: &str = "POWERINFER_MASKED_MIN";

/// Which side of a layer's neurons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NeuronSide {
    /// Neurons `0..hot`.
    Hot,
    /// Neurons `hot..n_ff`.
    Cold,
}

/// Buffers of the FFN block.
pub(crate) struct FfnBuffers {
    /// The batch's FFN inputs.
    pub(crate) acts: Activations,
    gate: Vec<f32>,
    up: Vec<f32>,
    active: Option<ActiveSet>,
    /// Sparse tokens with most neurons active, which take every row and mask `h`, and
    /// their active neurons (one entry per masked token).
    masked: Vec<usize>,
    masked_active: Option<ActiveSet>,
    sparse: SparseScratch,
    pred: PredictorScratch,
    /// Per side (hot, cold): the predicted neurons of the batch's tokens (local to the
    /// side), its operator scratch, partial sum and counts.
    pub(crate) predicted: [ActiveSet; 2],
    sides: [FfnScratch; 2],
    side_out: [Vec<f32>; 2],
    side_counts: [Vec<u32>; 2],
    /// `act(gate)` of one token, for gate mode's threshold.
    gate_act: Vec<f32>,
    /// Dense tokens that take the row-major path in a mixed batch.
    row_major: Vec<usize>,
    gathered: Vec<f32>,
    gathered_acts: Activations,
    /// Gate, up and output of the gathered tokens.
    mixed: [Vec<f32>; 3],
}

impl FfnBuffers {
    /// The partial sum of `side` from the last [`Model::side`], swapped out for `spare`
    /// (so it can be moved to another thread without a copy).
    pub(crate) fn take_side_out(&mut self, side: NeuronSide, spare: Vec<f32>) -> Vec<f32> {
        let k = match side {
            NeuronSide::Hot => 0,
            NeuronSide::Cold => 1,
        };
        std::mem::replace(&mut self.side_out[k], spare)
    }

    /// The partial sum of `side` from the last [`Model::side`].
    pub(crate) fn side_out(&self, side: NeuronSide) -> &[f32] {
        match side {
            NeuronSide::Hot => &self.side_out[0],
            NeuronSide::Cold => &self.side_out[1],
        }
    }

    pub(crate) fn new(numerics: Numerics) -> Self {
        Self {
            acts: Activations::with_numerics(numerics),
            gate: Vec::new(),
            up: Vec::new(),
            active: None,
            masked: Vec::new(),
            masked_active: None,
            sparse: SparseScratch::default(),
            pred: PredictorScratch::new(numerics),
            predicted: [ActiveSet::new(0), ActiveSet::new(0)],
            sides: [FfnScratch::default(), FfnScratch::default()],
            side_out: [Vec::new(), Vec::new()],
            side_counts: [Vec::new(), Vec::new()],
            gate_act: Vec::new(),
            row_major: Vec::new(),
            gathered: Vec::new(),
            gathered_acts: Activations::with_numerics(numerics),
            mixed: [Vec::new(), Vec::new(), Vec::new()],
        }
    }
}

impl Model {
    /// Layer `layer`'s FFN on the host, both sides: `s.x += ffn(s.xn)` (`s.x +=
    /// post_norm(ffn(s.xn))` on a layer with sandwich norms).
    pub(crate) fn ffn(
        &self,
        pool: &ThreadPool,
        layer: usize,
        batch: &[BatchToken],
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        let w = &self.weights.layers[layer];
        let n = batch.len();
        s.ffn.acts.set(&s.xn, n);
        if let Some(cap) = s.capture.as_mut() {
            cap.record(pool, &self.config, layer, w, &s.x, &mut s.ffn.acts);
        }
        match &w.down {
            Some(down) if batch.iter().all(|b| b.sparsity == SparsityMode::Dense) => {
                let ff = RowMajorFfn {
                    kind: self.config.ffn,
                    w,
                    down,
                };
                let b = &mut s.ffn;
                ff.run(
                    pool,
                    &mut b.acts,
                    [&mut b.gate, &mut b.up, &mut s.proj],
                    &mut s.profile,
                );
                let n_layer = self.config.n_layer;
                for t in 0..n {
                    s.active_counts[t * n_layer + layer] = self.config.n_ff as u32;
                }
            }
            Some(down) => self.ffn_mixed(pool, layer, batch, down, s)?,
            None => {
                if self.wants_predictor(&s.tokens) {
                    self.predict(pool, layer, s)?;
                }
                let hot = self.partition.layers[layer].hot;
                let n_ff = self.config.n_ff;
                if hot > 0 {
                    self.side(pool, layer, NeuronSide::Hot, s);
                }
                if hot < n_ff {
                    self.side(pool, layer, NeuronSide::Cold, s);
                }
                let [h, c] = &s.ffn.side_out;
                match (hot > 0, hot < n_ff) {
                    (true, true) => {
                        for ((p, a), b) in s.proj.iter_mut().zip(h).zip(c) {
                            *p = a + b;
                        }
                    }
                    (true, false) => s.proj.copy_from_slice(h),
                    _ => s.proj.copy_from_slice(c),
                }
            }
        }
        if let Some(norms) = &w.post_norms {
            transformer::rms_norm_rows_in_place(&mut s.proj, &norms.ffn, self.config.rms_eps); // [n][n_embd]
            s.profile.mark(Stage::Norm);
        }
        nn::add(&mut s.x, &s.proj);
        s.profile.mark(Stage::Residual);
        Ok(())
    }

    /// Whether any token of the step needs its layer's predictor.
    pub(crate) fn wants_predictor(
        &self,
        tokens: &[powerinfer_ops::transformer::StepToken],
    ) -> bool {
        tokens.iter().any(|t| t.mode == SparsityMode::Predictor)
    }

    /// Layer `layer`'s predictor on the residual stream `s.x`: the predicted neurons of
    /// each predictor-mode token, split into the hot and cold sides
    /// (`s.ffn.predicted`).
    pub(crate) fn predict(
        &self,
        pool: &ThreadPool,
        layer: usize,
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        let b = &mut s.ffn;
        self.predict_sides(pool, layer, &s.x, &s.tokens, &mut b.pred, &mut b.predicted)?;
        s.profile.mark(Stage::GateUp);
        Ok(())
    }

    /// Layer `layer`'s predictor on the residual stream `x` (`[n_tok][n_embd]`) of a step
    /// of `tokens`: `[hot, cold]` get the predicted neurons of each side (indices from the
    /// side's first neuron; empty for tokens not in predictor mode).
    pub fn predict_sides(
        &self,
        pool: &ThreadPool,
        layer: usize,
        x: &[f32],
        tokens: &[powerinfer_ops::transformer::StepToken],
        scratch: &mut PredictorScratch,
        [hot_set, cold_set]: &mut [ActiveSet; 2],
    ) -> Result<(), ForwardError> {
        let p = self
            .sparsity
            .predictors
            .as_ref()
            .and_then(|p| p.get(layer))
            .ok_or_else(|| ForwardError::Sparsity("this model has no predictors".into()))?;
        let (hot, n_ff) = (self.partition.layers[layer].hot, self.config.n_ff);
        p.logits(pool, x, tokens.len(), scratch);
        let thr = self.sparsity.predictor_threshold;
        transformer::select(scratch.logits(), tokens, thr, 0..hot, hot_set);
        transformer::select(scratch.logits(), tokens, thr, hot..n_ff, cold_set);
        Ok(())
    }

    /// One side of layer `layer`'s neurons on the host, from the FFN inputs in
    /// `s.ffn.acts` and the predicted sets in `s.ffn.predicted`: its partial sum, and its
    /// counts added to the step's.
    pub(crate) fn side(&self, pool: &ThreadPool, layer: usize, which: NeuronSide, s: &mut Scratch) {
        let (hot, n_ff, n_layer) = (
            self.partition.layers[layer].hot,
            self.config.n_ff,
            self.config.n_layer,
        );
        let w = &self.weights.layers[layer];
        let down_t = w
            .down_t
            .as_ref()
            .expect("layers without ffn_down have the neuron-major form");
        let (rows, k) = match which {
            NeuronSide::Hot => (0..hot, 0),
            NeuronSide::Cold => (hot..n_ff, 1),
        };
        let (gate, up, down_t) = (
            w.gate.rows(rows.clone()),
            w.up.rows(rows.clone()),
            down_t.rows(rows),
        );
        let ffn = NeuronFfn {
            gate: &gate,
            up: &up,
            down_t: &down_t,
            glu: self.config.ffn.glu(),
            gate_threshold: self.sparsity.gate_threshold(layer),
        };
        let n = s.tokens.len();
        let b = &mut s.ffn;
        sized(&mut b.side_out[k], n * self.config.n_embd);
        b.side_counts[k].clear();
        b.side_counts[k].resize(n, 0);
        let predicted = self.wants_predictor(&s.tokens).then_some(&b.predicted[k]);
        ffn.run(
            pool,
            &s.tokens,
            &mut b.acts,
            predicted,
            &mut b.sides[k],
            &mut b.side_out[k],
            &mut b.side_counts[k],
            &mut s.profile,
        );
        for (t, &c) in b.side_counts[k].iter().enumerate() {
            s.active_counts[t * n_layer + layer] += c;
            if which == NeuronSide::Hot {
                s.hot_counts[t * n_layer + layer] += c;
            }
        }
    }

    /// The FFN of a layer that still has its row-major `ffn_down`, with sparse tokens in
    /// the batch: each token's active neurons chosen by its mode (every neuron, the gate,
    /// or the predictor), then gate, up and down rows of those neurons only. Dense tokens
    /// take the row-major path exactly as they would alone.
    fn ffn_mixed(
        &self,
        pool: &ThreadPool,
        layer: usize,
        batch: &[BatchToken],
        down: &Matrix,
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
        let ff = RowMajorFfn {
            kind: c.ffn,
            w,
            down,
        };

        // Dense tokens take the row-major path, done first on their own rows.
        let b = &mut s.ffn;
        b.row_major.clear();
        b.row_major
            .extend((0..n).filter(|&t| batch[t].sparsity == SparsityMode::Dense));
        if !b.row_major.is_empty() {
            gather(b, Gathered::RowMajor, &s.xn, n_ff, e);
            let [g, u, out] = &mut b.mixed;
            ff.run(pool, &mut b.gathered_acts, [g, u, out], &mut s.profile);
            scatter(&b.row_major, out, e, &mut s.proj);
        }

        // Gate values in full when a token thresholds them (the same bits the fused
        // operator would compute row by row, so they are reused there).
        let want_gate = batch.iter().any(|b| b.sparsity == SparsityMode::Gate);
        if want_gate {
            fit(&mut b.gate, n * n_ff);
            w.gate.matmul(pool, &mut b.acts, &mut b.gate);
        }
        if self.wants_predictor(&s.tokens) {
            self.predict(pool, layer, s)?;
        }
        let b = &mut s.ffn;
        s.profile.mark(Stage::GateUp);

        let mut active = b.active.take().unwrap_or_else(|| ActiveSet::new(n_ff));
        active.reset(n_ff);
        // Tokens with most neurons active move their set here and leave an empty one in
        // `active`: they take every row of the row-major matrices instead.
        let mut masked_active = b
            .masked_active
            .take()
            .unwrap_or_else(|| ActiveSet::new(n_ff));
        masked_active.reset(n_ff);
        b.masked.clear();
        let most = (self.masked_min_fraction * n_ff as f64).ceil() as usize;
        let gate_thr = self.sparsity.gate_threshold(layer);
        for (t, tok) in batch.iter().enumerate() {
            let row = t * n_ff..(t + 1) * n_ff;
            match tok.sparsity {
                SparsityMode::Dense => {
                    active.push_token([]);
                    s.active_counts[t * c.n_layer + layer] = n_ff as u32;
                    continue;
                }
                SparsityMode::Gate => {
                    b.gate_act.clear();
                    b.gate_act.extend_from_slice(&b.gate[row]);
                    glu.act_slice(&mut b.gate_act);
                    let a = &b.gate_act;
                    active.push_where(|i| a[i].abs() > gate_thr);
                }
                // Without a hot side the cold side's set is every neuron's.
                SparsityMode::Predictor => {
                    active.push_token(b.predicted[1].token(t).iter().copied())
                }
            }
            let rows = active.token(t);
            s.active_counts[t * c.n_layer + layer] = rows.len() as u32;
            if rows.len() >= most {
                masked_active.push_token(rows.iter().copied());
                active.pop_token();
                active.push_token([]);
                b.masked.push(t);
            }
        }
        s.profile.mark(Stage::Activation);

        if !b.masked.is_empty() {
            gather(b, Gathered::Masked, &s.xn, n_ff, e);
            let [g, u, out] = &mut b.mixed;
            let mask = Mask {
                active: &masked_active,
                tokens: &b.masked,
                batch_gate: want_gate.then_some(b.gate.as_slice()),
            };
            ff.run_masked(
                pool,
                &mut b.gathered_acts,
                [g, u, out],
                mask,
                &mut s.profile,
            );
            scatter(&b.masked, out, e, &mut s.proj);
        }

        // (Both lists are in token order.)
        let on_rows =
            |t: &usize| b.row_major.binary_search(t).is_ok() || b.masked.binary_search(t).is_ok();
        if (0..n).any(|t| !on_rows(&t)) {
            // Tokens of the row-major and masked paths have no active neurons here and
            // get 0.
            let mut sparse_out = std::mem::take(&mut b.up);
            sized(&mut sparse_out, n * e);
            let ffn = SparseFfn {
                gate_given: want_gate.then_some(b.gate.as_slice()),
                ..SparseFfn::new(&w.gate, &w.up, down_t, glu)
            };
            ffn.run(pool, &mut b.acts, &active, &mut b.sparse, &mut sparse_out);
            for t in (0..n).filter(|t| !on_rows(t)) {
                s.proj[t * e..(t + 1) * e].copy_from_slice(&sparse_out[t * e..(t + 1) * e]);
            }
            b.up = sparse_out;
        }
        b.active = Some(active);
        b.masked_active = Some(masked_active);
        s.profile.mark(Stage::Down);
        Ok(())
    }
}

/// `v` at length `n`, old values kept: for outputs a product overwrites in full.
fn fit(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Which tokens of a batch [`gather`] collects.
#[derive(Clone, Copy)]
enum Gathered {
    RowMajor,
    Masked,
}

/// The FFN inputs `xn` of some tokens of the batch, into `gathered_acts`, with `mixed`
/// sized for their gate, up and output.
fn gather(b: &mut FfnBuffers, which: Gathered, xn: &[f32], n_ff: usize, e: usize) {
    let tokens = match which {
        Gathered::RowMajor => &b.row_major,
        Gathered::Masked => &b.masked,
    };
    let m = tokens.len();
    b.gathered.clear();
    for &t in tokens {
        b.gathered.extend_from_slice(&xn[t * e..(t + 1) * e]);
    }
    b.gathered_acts.set(&b.gathered, m);
    sized(&mut b.mixed[0], m * n_ff);
    sized(&mut b.mixed[1], m * n_ff);
    sized(&mut b.mixed[2], m * e);
}

/// Row `i` of `out` (`n_embd` = `e` values) to token `tokens[i]`'s row of `proj`.
fn scatter(tokens: &[usize], out: &[f32], e: usize, proj: &mut [f32]) {
    for (i, &t) in tokens.iter().enumerate() {
        proj[t * e..(t + 1) * e].copy_from_slice(&out[i * e..(i + 1) * e]);
    }
}

/// The dense FFN on row-major matrices: `out = down · (act(gate · x) ∘ (up · x))` for the
/// batch in `acts` (which ends holding the hidden activations).
struct RowMajorFfn<'a> {
    kind: FfnKind,
    w: &'a LayerWeights,
    down: &'a Matrix,
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
    fn run(
        &self,
        pool: &ThreadPool,
        acts: &mut Activations,
        [gate, up, out]: [&mut Vec<f32>; 3],
        profile: &mut Profile,
    ) {
        let n = acts.n_tok();
        fit(gate, n * self.w.gate.n_rows());
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
        fit(up, n * self.w.up.n_rows());
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

/// `gate = act(gate) ∘ up` for the model's FFN kind.
fn gate_activation(kind: FfnKind, gate: &mut [f32], up: &[f32]) {
    match kind {
        FfnKind::SwiGlu => nn::silu_mul(gate, up),
        FfnKind::ReGlu => nn::relu_mul(gate, up),
        FfnKind::DRelu => nn::dual_relu_mul(gate, up),
        FfnKind::GeGlu => nn::gelu_mul(gate, up),
    }
}
