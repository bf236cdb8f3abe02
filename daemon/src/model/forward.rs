//! The llama-family forward pass on the CPU.
//!
//! One call runs a batch of tokens through every layer: the tokens of a prompt (prefill),
//! one token of each running sequence (decode), or a mix. Each token names its sequence's
//! KV-cache slot and its position, and attends to positions `0..=pos` of that slot.

use powerinfer_ops::gguf::GgufFile;
use powerinfer_ops::nn::{self, KvElem, Rope};
use powerinfer_ops::pool::{SharedMut, ThreadPool};
use powerinfer_ops::quant::Numerics;
use powerinfer_ops::sparse::{ActiveSet, SparseScratch};
use powerinfer_ops::tensor::Activations;

use super::config::ModelConfig;
use super::kv_cache::{KvCache, KvData};
use super::names::key;
use super::neurons::HotFfn;
use super::sparsity::{SparsityData, SparsityMode};
use super::weights::{self, Weights};
use super::{ForwardError, LoadError};
use crate::ids::{SeqSlot, TokenId};

mod ffn;

use ffn::{FfnPath, RowMajorFfn};
pub use ffn::{MASKED_MIN_ENV, MASKED_MIN_FRACTION};

/// A loaded model: configuration, weights (mapped from the file), RoPE tables.
pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    pub sparsity: SparsityData,
    /// Per layer, the hot neurons (after [`Model::apply_placement`] they are the first
    /// ones); all 0 without a placement.
    pub hot_neurons: Vec<usize>,
    /// The hot neurons' rows on a device computing in host memory, when placed there.
    pub hot: Option<HotFfn>,
    /// The neuron table after [`Model::apply_placement`]: per layer, the file's index of
    /// each neuron as now numbered (hot ones first). `None`: the file's order.
    pub neuron_order: Option<Vec<Vec<u32>>>,
    /// The active share from which a sparse token's FFN reads every gate, up and down
    /// row of the row-major matrices and zeroes `h` outside its set, rather than the
    /// scattered rows of its active neurons: the same values rounded in another order,
    /// used where the file has `ffn_down` and the layer has no hot part. Default
    /// [`MASKED_MIN_FRACTION`] or [`MASKED_MIN_ENV`]; above 1, never.
    pub masked_min_fraction: f64,
    rope: Rope,
}

/// One token of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchToken {
    pub token: TokenId,
    pub slot: SeqSlot,
    pub pos: usize,
    /// Whether this token's next-token logits are wanted.
    pub logits: bool,
    /// How this token's FFN neurons are chosen.
    pub sparsity: SparsityMode,
}

/// Stages of a forward pass, for [`Profile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Embed,
    Norm,
    QkvProj,
    RopeKv,
    Attention,
    OutProj,
    GateUp,
    Activation,
    Down,
    Residual,
    Head,
}

impl Stage {
    pub const ALL: [Stage; 11] = [
        Self::Embed,
        Self::Norm,
        Self::QkvProj,
        Self::RopeKv,
        Self::Attention,
        Self::OutProj,
        Self::GateUp,
        Self::Activation,
        Self::Down,
        Self::Residual,
        Self::Head,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Embed => "embedding",
            Self::Norm => "rms_norm",
            Self::QkvProj => "q/k/v projections",
            Self::RopeKv => "rope + kv write",
            Self::Attention => "attention",
            Self::OutProj => "output projection",
            Self::GateUp => "ffn gate/up",
            Self::Activation => "ffn activation",
            Self::Down => "ffn down",
            Self::Residual => "residual adds",
            Self::Head => "norm + lm head",
        }
    }
}

/// Wall time per stage, summed over forward passes; off unless `POWERINFER_PROFILE` is set
/// (then it costs two clock reads per stage).
#[derive(Default)]
pub struct Profile {
    enabled: bool,
    last: Option<std::time::Instant>,
    pub totals: [std::time::Duration; Stage::ALL.len()],
    pub passes: u64,
}

impl Profile {
    fn start(&mut self) {
        if self.enabled {
            self.passes += 1;
            self.last = Some(std::time::Instant::now());
        }
    }

    /// Charges the time since the previous mark to `stage`.
    fn mark(&mut self, stage: Stage) {
        if let Some(last) = self.last {
            let now = std::time::Instant::now();
            self.totals[stage as usize] += now - last;
            self.last = Some(now);
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `(stage, total)` for every stage that took time.
    pub fn report(&self) -> Vec<(Stage, std::time::Duration)> {
        Stage::ALL
            .iter()
            .map(|&s| (s, self.totals[s as usize]))
            .filter(|(_, d)| !d.is_zero())
            .collect()
    }
}

/// Buffers reused from step to step, grown to the largest batch seen.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: Activations,
    cos_sin: Vec<[f32; 2]>,
    scores: Vec<Vec<f32>>,
    logits: Vec<f32>,
    // The neuron-sparse FFN: active sets, operator scratch, predictor buffers, and the
    // tokens that take the row-major dense path in a mixed batch.
    active: Option<ActiveSet>,
    sparse: SparseScratch,
    pred_acts: Activations,
    pred_hidden: Vec<f32>,
    pred_logits: Vec<f32>,
    /// `act(gate)` of one token, for gate mode's threshold.
    gate_act: Vec<f32>,
    row_major: Vec<usize>,
    /// Sparse tokens with most neurons active, which take every row and mask `h`.
    masked: Vec<usize>,
    /// Their active neurons, one entry per masked token.
    masked_active: Option<ActiveSet>,
    gathered: Vec<f32>,
    gathered_acts: Activations,
    /// Gate, up and output of those row-major tokens.
    mixed: [Vec<f32>; 3],
    /// Active neurons of each token of the last batch, per layer (`[n_tok][n_layer]`).
    pub active_counts: Vec<u32>,
    /// Of those, the hot ones (placed on the device).
    pub hot_counts: Vec<u32>,
    pub profile: Profile,
    /// What calibration records, when set.
    pub capture: Option<Capture>,
}

/// What [`Model::forward`] records for calibration when [`Scratch::capture`] is set: per
/// layer, the FFN input (the residual stream before `ffn_norm`, what predictors read), the
/// activated gate `|act(gate)|` of every token and, when asked, each neuron's `|h|`,
/// appended batch after batch.
#[derive(Default)]
pub struct Capture {
    /// `[layer]` → `[tokens × n_embd]`
    pub x: Vec<Vec<f32>>,
    /// `[layer]` → `[tokens × n_ff]`
    pub gate: Vec<Vec<f32>>,
    /// `[layer]` → `[tokens × n_ff]`: `|h| = |glu(gate, up)|`, the size of the neuron's
    /// output weight (see [`Capture::with_h`]).
    pub h: Option<Vec<Vec<f32>>>,
    buf: Vec<f32>,
    up: Vec<f32>,
    hbuf: Vec<f32>,
}

impl Capture {
    pub fn new(n_layer: usize) -> Self {
        Self {
            x: vec![Vec::new(); n_layer],
            gate: vec![Vec::new(); n_layer],
            h: None,
            buf: Vec::new(),
            up: Vec::new(),
            hbuf: Vec::new(),
        }
    }

    /// Records `|h|` too (the up rows once more per layer, and as much memory again as
    /// the gate values).
    pub fn with_h(mut self) -> Self {
        self.h = Some(vec![Vec::new(); self.x.len()]);
        self
    }

    /// Tokens recorded so far.
    pub fn n_tokens(&self, n_embd: usize) -> usize {
        self.x.first().map_or(0, |x| x.len() / n_embd.max(1))
    }
}

impl Scratch {
    /// Buffers whose activations are prepared in the given numerics.
    pub fn new(numerics: Numerics) -> Self {
        Self {
            acts: Activations::with_numerics(numerics),
            pred_acts: Activations::with_numerics(numerics),
            gathered_acts: Activations::with_numerics(numerics),
            profile: Profile {
                enabled: std::env::var_os("POWERINFER_PROFILE").is_some(),
                ..Profile::default()
            },
            ..Self::default()
        }
    }
}

impl Scratch {
    /// The logits of the last [`Model::forward`].
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

/// Adds `bias` to every row of `rows`.
fn add_rows(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(r, b)| *r += b);
    }
}

fn sized(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

impl Model {
    pub fn load(file: &GgufFile) -> Result<Self, LoadError> {
        let config = ModelConfig::from_metadata(file.metadata(), file.header().magic)?;
        let weights = Weights::load(file, &config)?;
        let sparsity = load_file_sparsity(file, &config)?;
        let rope = Rope::new(
            config.n_rot,
            config.rope_base,
            config.rope_freq_scale,
            config.rope_style,
            weights.rope_freqs.as_deref(),
        );
        Ok(Self {
            hot_neurons: vec![0; config.n_layer],
            hot: None,
            neuron_order: None,
            masked_min_fraction: ffn::masked_min_fraction()?,
            config,
            weights,
            sparsity,
            rope,
        })
    }

    /// Why `mode` cannot run on this model as loaded, if it cannot.
    pub fn sparsity_unavailable(&self, mode: SparsityMode) -> Option<String> {
        if mode != SparsityMode::Dense && !self.has_neuron_form() {
            return Some(format!(
                "sparsity mode {mode} was not prepared at load (load the model with it)"
            ));
        }
        self.sparsity.unavailable(mode, self.config.ffn.is_relu())
    }

    /// Runs `batch` through the model, writing keys and values into `kv`, and returns the
    /// logits (`n_vocab` each) of the tokens that asked for them, in batch order.
    pub fn forward<'s>(
        &self,
        pool: &ThreadPool,
        batch: &[BatchToken],
        kv: &mut KvCache,
        s: &'s mut Scratch,
    ) -> Result<&'s [f32], ForwardError> {
        let mut logits = std::mem::take(&mut s.logits);
        let result = self.forward_into(pool, batch, kv, s, &mut logits);
        s.logits = logits;
        result.map(|()| s.logits.as_slice())
    }

    /// [`Self::forward`] writing the logits into a caller's buffer (resized as needed), so
    /// a pipeline can move one buffer between stages instead of copying.
    pub fn forward_into(
        &self,
        pool: &ThreadPool,
        batch: &[BatchToken],
        kv: &mut KvCache,
        s: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        let c = &self.config;
        self.check(batch, kv)?;
        let (n, e, eps) = (batch.len(), c.n_embd, c.rms_eps);
        let half_rot = c.n_rot / 2;
        let n_layer = c.n_layer;
        self.size_scratch(s, n, kv.n_ctx(), pool.n_threads());
        s.profile.start();

        for (t, b) in batch.iter().enumerate() {
            self.weights
                .token_embd
                .dequantize_row(b.token.index(), &mut s.x[t * e..(t + 1) * e]);
            self.rope
                .cos_sin(b.pos, &mut s.cos_sin[t * half_rot..(t + 1) * half_rot]);
        }
        s.profile.mark(Stage::Embed);

        for (layer, w) in self.weights.layers.iter().enumerate() {
            // Attention block.
            rms_norm_rows(&s.x, &w.attn_norm, eps, &mut s.xn); // [n][n_embd]
            s.profile.mark(Stage::Norm);
            s.acts.set(&s.xn, n);
            w.wq.matmul(pool, &mut s.acts, &mut s.q); // [n][n_head · head_dim]
            w.wk.matmul(pool, &mut s.acts, &mut s.k); // [n][n_head_kv · head_dim]
            w.wv.matmul(pool, &mut s.acts, &mut s.v); // [n][n_head_kv · head_dim]
            s.profile.mark(Stage::QkvProj);
            self.rotate(&mut s.q, &mut s.k, &s.cos_sin);
            for (t, b) in batch.iter().enumerate() {
                let kv_w = c.n_embd_kv();
                kv.write(
                    layer,
                    b.slot,
                    b.pos,
                    &s.k[t * kv_w..(t + 1) * kv_w],
                    &s.v[t * kv_w..(t + 1) * kv_w],
                );
            }
            s.profile.mark(Stage::RopeKv);
            self.attention(pool, layer, batch, kv, &s.q, &mut s.scores, &mut s.att); // [n][n_head · head_dim]
            s.profile.mark(Stage::Attention);
            s.acts.set(&s.att, n);
            w.wo.matmul(pool, &mut s.acts, &mut s.proj); // [n][n_embd]
            s.profile.mark(Stage::OutProj);
            nn::add(&mut s.x, &s.proj);
            s.profile.mark(Stage::Residual);

            // Feed-forward block.
            rms_norm_rows(&s.x, &w.ffn_norm, eps, &mut s.xn); // [n][n_embd]
            s.profile.mark(Stage::Norm);
            s.acts.set(&s.xn, n);
            if let Some(cap) = s.capture.as_mut() {
                // Calibration only: the gate once more, whatever path the FFN takes.
                cap.x[layer].extend_from_slice(&s.x);
                sized(&mut cap.buf, n * c.n_ff);
                w.gate.matmul(pool, &mut s.acts, &mut cap.buf);
                if let Some(h) = cap.h.as_mut() {
                    sized(&mut cap.up, n * c.n_ff);
                    w.up.matmul(pool, &mut s.acts, &mut cap.up);
                    cap.hbuf.clear();
                    cap.hbuf.extend_from_slice(&cap.buf);
                    c.ffn.glu().apply_slice(&mut cap.hbuf, &cap.up);
                    h[layer].extend(cap.hbuf.iter().map(|v| v.abs()));
                }
                c.ffn.glu().act_slice(&mut cap.buf);
                cap.gate[layer].extend(cap.buf.iter().map(|g| g.abs()));
            }
            match (&w.down, self.ffn_path(batch, w)) {
                (Some(down), FfnPath::RowMajor) => {
                    let ff = RowMajorFfn {
                        kind: c.ffn,
                        w,
                        down,
                    };
                    ff.run(
                        pool,
                        &mut s.acts,
                        [&mut s.gate, &mut s.up, &mut s.proj],
                        &mut s.profile,
                    );
                    s.active_counts[layer..]
                        .iter_mut()
                        .step_by(n_layer)
                        .for_each(|a| {
                            *a = c.n_ff as u32;
                        });
                }
                _ => self.ffn_neurons(pool, layer, batch, s)?,
            }
            nn::add(&mut s.x, &s.proj);
            s.profile.mark(Stage::Residual);
        }

        // Output head, only for the tokens whose logits are wanted.
        let wanted: Vec<usize> = (0..n).filter(|&t| batch[t].logits).collect();
        logits.clear();
        if wanted.is_empty() {
            return Ok(());
        }
        sized(&mut s.xn, wanted.len() * e);
        for (i, &t) in wanted.iter().enumerate() {
            nn::rms_norm(
                &s.x[t * e..(t + 1) * e],
                &self.weights.output_norm,
                eps,
                &mut s.xn[i * e..(i + 1) * e],
            );
        }
        s.acts.set(&s.xn, wanted.len());
        sized(logits, wanted.len() * c.n_vocab);
        self.weights.output.matmul(pool, &mut s.acts, logits); // [n_out][n_vocab]
        s.profile.mark(Stage::Head);
        Ok(())
    }

    fn check(&self, batch: &[BatchToken], kv: &KvCache) -> Result<(), ForwardError> {
        if batch.is_empty() {
            return Err(ForwardError::EmptyBatch);
        }
        for b in batch {
            if let Some(why) = self.sparsity_unavailable(b.sparsity) {
                return Err(ForwardError::Sparsity(why));
            }
            if b.token.index() >= self.config.n_vocab {
                return Err(ForwardError::TokenOutOfRange {
                    token: b.token,
                    n_vocab: self.config.n_vocab,
                });
            }
            if b.pos >= kv.n_ctx() {
                return Err(ForwardError::ContextFull {
                    pos: b.pos,
                    n_ctx: kv.n_ctx(),
                });
            }
            if b.slot.0 >= kv.n_slots() {
                return Err(ForwardError::BadSlot {
                    slot: b.slot.0,
                    n_slots: kv.n_slots(),
                });
            }
        }
        Ok(())
    }

    fn size_scratch(&self, s: &mut Scratch, n: usize, n_ctx: usize, n_threads: usize) {
        let c = &self.config;
        sized(&mut s.x, n * c.n_embd);
        sized(&mut s.xn, n * c.n_embd);
        sized(&mut s.q, n * c.n_embd_q());
        sized(&mut s.k, n * c.n_embd_kv());
        sized(&mut s.v, n * c.n_embd_kv());
        sized(&mut s.att, n * c.n_embd_q());
        sized(&mut s.proj, n * c.n_embd);
        sized(&mut s.gate, n * c.n_ff);
        sized(&mut s.up, n * c.n_ff);
        s.cos_sin.resize(n * c.n_rot / 2, [0.0; 2]);
        s.active_counts.clear();
        s.active_counts.resize(n * c.n_layer, 0);
        s.hot_counts.clear();
        s.hot_counts.resize(n * c.n_layer, 0);
        s.scores.resize_with(n_threads, Vec::new);
        for sc in &mut s.scores {
            sc.resize(n_ctx, 0.0);
        }
    }

    /// Applies RoPE to every query and key head of every token.
    fn rotate(&self, q: &mut [f32], k: &mut [f32], cos_sin: &[[f32; 2]]) {
        let c = &self.config;
        let half = c.n_rot / 2;
        for (t, cs) in cos_sin.chunks_exact(half).enumerate() {
            self.rope.apply(
                &mut q[t * c.n_embd_q()..(t + 1) * c.n_embd_q()],
                c.head_dim,
                cs,
            );
            self.rope.apply(
                &mut k[t * c.n_embd_kv()..(t + 1) * c.n_embd_kv()],
                c.head_dim,
                cs,
            );
        }
    }

    /// Every (token, query head) pair attends over its sequence's positions `0..=pos`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        pool: &ThreadPool,
        layer: usize,
        batch: &[BatchToken],
        kv: &KvCache,
        q: &[f32],
        scores: &mut [Vec<f32>],
        att: &mut [f32],
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let out = SharedMut::new(att);
        let scores: Vec<SharedMut<'_, f32>> =
            scores.iter_mut().map(|v| SharedMut::new(v)).collect();
        let n_ctx = kv.n_ctx();
        pool.for_each_chunk_on(batch.len() * c.n_head, 1, |thread, items| {
            // SAFETY: each thread index is used by one thread at a time.
            let sc = unsafe { scores[thread].slice(0..n_ctx) };
            for item in items {
                let (t, h) = (item / c.n_head, item % c.n_head);
                let b = &batch[t];
                let base = kv.head_offset(layer, b.slot, h / c.gqa_ratio());
                let span = base..base + (b.pos + 1) * hd;
                let qh = &q[item * hd..(item + 1) * hd];
                // SAFETY: (token, head) items are disjoint head_dim ranges of `att`.
                let o = unsafe { out.slice(item * hd..(item + 1) * hd) };
                match &kv.data {
                    KvData::F16 { k, v } => attend(qh, &k[span.clone()], &v[span], scale, sc, o),
                    KvData::F32 { k, v } => attend(qh, &k[span.clone()], &v[span], scale, sc, o),
                }
            }
        });
    }
}

fn attend<K: KvElem>(q: &[f32], k: &[K], v: &[K], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    nn::attend(q, k, v, scale, scores, out);
}

fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let e = weight.len();
    for (xr, or) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        nn::rms_norm(xr, weight, eps, or);
    }
}

/// The sparsity data a model file carries itself: PowerInfer's predictors and threshold.
fn load_file_sparsity(file: &GgufFile, c: &ModelConfig) -> Result<SparsityData, LoadError> {
    let mut predictors = Vec::new();
    for l in 0..c.n_layer {
        match weights::predictor(file, c, crate::ids::LayerId(l))? {
            Some(p) => predictors.push(p),
            None if predictors.is_empty() => break,
            None => {
                return Err(LoadError::MissingTensor {
                    name: super::names::Blk::Fc1.name(crate::ids::LayerId(l)),
                });
            }
        }
    }
    let mut threshold = match file.metadata().get(key::SPARSE_THRESHOLD) {
        None => 0.0,
        Some(v) => v.as_f32().ok_or_else(|| LoadError::BadKey {
            key: key::SPARSE_THRESHOLD.into(),
            value: format!("{v:?}"),
            expected: "a float".into(),
        })?,
    };
    if let Ok(v) = std::env::var(key::SPARSE_THRESHOLD_ENV) {
        threshold = v.trim().parse().map_err(|_| LoadError::BadKey {
            key: key::SPARSE_THRESHOLD_ENV.into(),
            value: v.clone(),
            expected: "a float".into(),
        })?;
    }
    let has = !predictors.is_empty();
    Ok(SparsityData {
        predictors: has.then_some(predictors),
        predictor_threshold: threshold,
        sources: if has {
            vec!["model file".into()]
        } else {
            Vec::new()
        },
        ..SparsityData::default()
    })
}
