//! `powerinferd synth`: llama-shaped models of real sizes (7B, 13B, ...) with random
//! weights and *planted* activation sparsity, with the predictors and activation
//! frequencies that match it — what the hybrid engine is measured on at shapes no file
//! available here has.
//!
//! How the sparsity is planted (ReLU-gated FFNs: neuron `i` fires where its gate
//! `g_i = W_i · x > 0`, `x` the normalized residual stream):
//!
//! - **A bias channel.** Dimension 0 of every token embedding is a constant `K`, and the
//!   attention and FFN output projections have an all-zero row 0, so the residual stream
//!   keeps `h_0 = K` exactly in every layer. Each gate row's column 0 is then a per-neuron
//!   bias `b_i`: since RMSNorm only rescales `h`, `g_i > 0` exactly where
//!   `Σ_j W_ij w_j h_j > 0` (`w` the `ffn_norm` weights), a random term `z_i` plus
//!   `b_i w_0 K`.
//! - **Firing probabilities.** Neuron `i` (of a random permutation per layer, so hot
//!   neurons are scattered as in real models) fires with probability
//!   `p_i = min(P_MAX, c (rank_i + 1)^-α)`, a power law: `α` is chosen so that the top
//!   `hot_fraction` of the neurons carry `hot_mass` of all activations, `c` so that a
//!   token activates `active` of the neurons on average. `b_i = σ Φ⁻¹(p_i) / (w_0 K)`,
//!   where `σ` is the spread of `z_i` over tokens (`z_i` is a sum of many independent
//!   terms: close to normal).
//! - **A predictable part.** The gate rows are `W_i = C_i A + E_i` (plus the bias): `A` is
//!   `r` random unit directions shared by the layer, `C_i` mixes 8 of them, `E_i` is
//!   independent noise of norm `predictor_noise`. The predictor
//!   `fc2 · relu(fc1 · h) + b2` with `fc1 = [A w; −A w]`, `fc2 = [C, −C]`,
//!   `b2 = b w_0 K` computes `C_i A (w h) + b_i w_0 K` exactly (`relu(a) − relu(−a) = a`),
//!   so it misses only what the noise `E_i` (and quantization) flips: the noise sets how
//!   good the predictor is. Rank `2r`.
//! - **Small residual updates.** The output projections add about 0.05 of the
//!   embeddings' spread per sublayer, so the residual stream (and with it `σ`) drifts
//!   little over the layers; `σ` of layer `l` includes the expected drift.
//!
//! The sidecar written beside the model carries the planted probabilities as activation
//! frequencies (what `place` ranks by) and the predictors, with `calibration_tokens = 0`:
//! nothing was measured. `prepare` on the model measures what was planted (the tests do).
//!
//! The weights are made a group of rows at a time, on every thread, from seeds fixed by
//! (seed, tensor, group): the same arguments give the same file on any machine and any
//! number of threads. The file is written a tensor at a time (13B shapes need no more
//! memory than their largest tensor).

use std::path::{Path, PathBuf};

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{Array, GgufFile, GgufWriter, Value};
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::rng::Rng;
use powerinfer_ops::tensor::Matrix;
use rayon::prelude::*;

use crate::model::sidecar::{self, PredictorData, SidecarData};
use crate::model::{LoadError, ModelConfig};

/// The most often a neuron fires.
pub const P_MAX: f64 = 0.995;
/// `h_0` of every token: the bias channel (exact in F16, the embeddings' type).
pub const BIAS_CHANNEL: f32 = 16.0;
/// Spread a sublayer's output adds to the residual stream, relative to the embeddings'.
pub const UPDATE_SCALE: f32 = 0.05;
/// Directions of `A` each gate row mixes.
pub const MIX: usize = 8;
/// Rows made (and quantized) per task.
const GROUP: usize = 64;

/// The FFN's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthActivation {
    /// ReGLU: `relu(gate) · up` (architecture `llama` with `powerinfer.ffn_activation`
    /// = `relu`, as ReluLLaMA files are).
    Relu,
    /// dReLU: `relu(gate) · relu(up)` (architecture `bamboo`).
    Drelu,
}

impl SynthActivation {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "relu" | "reglu" => Some(Self::Relu),
            "drelu" => Some(Self::Drelu),
            _ => None,
        }
    }

    fn arch(self) -> &'static str {
        match self {
            Self::Relu => "llama",
            Self::Drelu => "bamboo",
        }
    }
}

/// A synthetic model's shape, weight type and planted sparsity.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    pub activation: SynthActivation,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    /// The matrices' type (embeddings are F16, norms F32).
    pub wtype: WeightType,
    /// Mean share of a layer's neurons a token activates.
    pub active: f64,
    /// The hot set: this share of the neurons ...
    pub hot_fraction: f64,
    /// ... carries this share of all activations.
    pub hot_mass: f64,
    /// Predictor rank (even: `r` directions, each as `+` and `−`).
    pub predictor_rank: usize,
    /// Norm of the gate's unpredictable part (the predictable part has norm 1).
    pub predictor_noise: f32,
    pub seed: u64,
}

/// The shapes of `--shape`.
pub const SHAPES: [&str; 4] = ["tiny", "1b", "7b", "13b"];

impl SynthSpec {
    /// A named shape with the default sparsity (10% active, 20% of the neurons carrying
    /// 80% of the activations) and Q4_0 weights: `tiny` (for tests), `1b` (TinyLlama's
    /// shape: GQA 32/4), `7b` and `13b` (LLaMA 2's).
    pub fn shape(name: &str) -> Option<Self> {
        let (n_embd, n_ff, n_layer, n_head, n_head_kv, n_vocab) =
            match name.to_ascii_lowercase().as_str() {
                "tiny" => (256, 1024, 4, 4, 2, 512),
                "1b" => (2048, 5632, 22, 32, 4, 32000),
                "7b" => (4096, 11008, 32, 32, 32, 32000),
                "13b" => (5120, 13824, 40, 40, 40, 32000),
                _ => return None,
            };
        Some(Self {
            activation: SynthActivation::Relu,
            n_embd,
            n_ff,
            n_layer,
            n_head,
            n_head_kv,
            n_vocab,
            n_ctx: 4096,
            wtype: WeightType::Q4_0,
            active: 0.1,
            hot_fraction: 0.2,
            hot_mass: 0.8,
            predictor_rank: 256,
            predictor_noise: 0.2,
            seed: 1,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameters of the matrices and embeddings.
    pub fn n_params(&self) -> u64 {
        let (e, f, kv) = (
            self.n_embd as u64,
            self.n_ff as u64,
            (self.n_head_kv * self.head_dim()) as u64,
        );
        let layer = 2 * e * e + 2 * e * kv + 3 * e * f;
        self.n_layer as u64 * layer + 2 * self.n_vocab as u64 * e
    }

    /// Refuses shapes the engine cannot load or the weight type cannot hold, and
    /// sparsity a power law cannot give.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |what: String| Err(SynthError::Spec(what));
        let block = self.wtype.ggml().block_len();
        if self.n_embd == 0 || self.n_ff == 0 || self.n_layer == 0 || self.n_head == 0 {
            return bad("every dimension must be positive".into());
        }
        if self.n_vocab < 260 {
            return bad(format!(
                "the vocabulary must have at least 260 tokens (256 bytes and 4 control \
                 tokens), not {}",
                self.n_vocab
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "n_embd {} must be a multiple of n_head {} with an even head size",
                self.n_embd, self.n_head
            ));
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "n_head {} must be a multiple of n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        for (name, n) in [("n_embd", self.n_embd), ("n_ff", self.n_ff)] {
            if !n.is_multiple_of(block) {
                return bad(format!(
                    "{name} {n} is not a multiple of {}'s block of {block}",
                    self.wtype.ggml()
                ));
            }
        }
        if self.predictor_rank < 2 * MIX || !self.predictor_rank.is_multiple_of(32) {
            return bad(format!(
                "the predictor rank must be a multiple of 32 and at least {}, not {}",
                2 * MIX,
                self.predictor_rank
            ));
        }
        if !(self.predictor_noise.is_finite() && self.predictor_noise >= 0.0) {
            return bad(format!(
                "the predictor noise must be ≥ 0, not {}",
                self.predictor_noise
            ));
        }
        if !(self.active > 0.0 && self.active < P_MAX) {
            return bad(format!(
                "the active fraction must be in (0, {P_MAX}), not {}",
                self.active
            ));
        }
        if !(self.hot_fraction > 0.0 && self.hot_fraction < 1.0) {
            return bad(format!(
                "the hot fraction must be in (0, 1), not {}",
                self.hot_fraction
            ));
        }
        if !(self.hot_mass >= self.hot_fraction && self.hot_mass < 1.0) {
            return bad(format!(
                "the hot mass must be in [hot fraction {}, 1), not {}",
                self.hot_fraction, self.hot_mass
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{0}")]
    Spec(String),
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error("{0}")]
    Load(#[from] LoadError),
}

/// What was written.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthReport {
    pub model: PathBuf,
    pub sidecar: PathBuf,
    pub model_bytes: u64,
    pub n_params: u64,
    /// The power law's exponent and the planted probabilities' mean and hot mass.
    pub exponent: f64,
    pub planted_active: f64,
    pub planted_hot_mass: f64,
}

/// The planted firing probabilities of `n` neurons, by rank (most active first), and the
/// exponent: mean `active`, the top `hot_fraction` carrying `hot_mass`.
pub fn power_law(
    n: usize,
    active: f64,
    hot_fraction: f64,
    hot_mass: f64,
) -> Result<(Vec<f64>, f64), SynthError> {
    let k = ((hot_fraction * n as f64).round() as usize).clamp(1, n);
    // For an exponent: the scale giving the mean (the mean grows with the scale).
    let with = |alpha: f64| -> Vec<f64> {
        let shape: Vec<f64> = (0..n).map(|r| ((r + 1) as f64).powf(-alpha)).collect();
        let mean = |c: f64| shape.iter().map(|s| (c * s).min(P_MAX)).sum::<f64>() / n as f64;
        let (mut lo, mut hi) = (0.0, 1.0);
        while mean(hi) < active {
            hi *= 2.0;
        }
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if mean(mid) < active {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        shape.iter().map(|s| (hi * s).min(P_MAX)).collect()
    };
    let mass = |p: &[f64]| p[..k].iter().sum::<f64>() / p.iter().sum::<f64>();
    let top = mass(&with(50.0));
    if top < hot_mass {
        return Err(SynthError::Spec(format!(
            "with {:.1}% active, the top {:.1}% of the neurons can carry at most {:.1}% of \
             the activations (each fires at most {P_MAX} of the time), not {:.1}%",
            100.0 * active,
            100.0 * hot_fraction,
            100.0 * top,
            100.0 * hot_mass
        )));
    }
    let (mut lo, mut hi) = (0.0, 50.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if mass(&with(mid)) < hot_mass {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok((with(hi), hi))
}

/// The standard normal quantile Φ⁻¹(p), p in (0, 1): Acklam's rational approximation
/// (relative error below 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.024_25;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// A seed for (model seed, tensor, group) that differs in every bit for neighbours.
fn seed_for(seed: u64, tensor: u64, group: u64) -> u64 {
    let mut r = Rng::new(seed ^ tensor.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let a = r.next_u64();
    Rng::new(a ^ group.wrapping_mul(0xd1b5_4a32_d192_ed03)).next_u64()
}

/// One layer's planted structure.
struct LayerPlant {
    /// `[r][n_embd]`: unit directions, column 0 zero.
    dirs: Vec<Vec<f32>>,
    /// Per neuron: `MIX` distinct directions and their weights (a unit vector).
    mix: Vec<[(u32, f32); MIX]>,
    /// Per neuron: column 0 of its gate row.
    bias: Vec<f32>,
    /// Per neuron: its planted firing probability.
    prob: Vec<f32>,
    ffn_norm: Vec<f32>,
}

fn unit(v: &mut [f32], norm: f32) {
    let n = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if n > 0.0 {
        let s = (f64::from(norm) / n) as f32;
        v.iter_mut().for_each(|x| *x *= s);
    }
}

impl LayerPlant {
    fn new(spec: &SynthSpec, l: usize, probs_by_rank: &[f64]) -> Self {
        let (e, f, r) = (spec.n_embd, spec.n_ff, spec.predictor_rank / 2);
        let mut rng = Rng::new(seed_for(spec.seed, 1 << 40 | l as u64, 0));
        let dirs = (0..r)
            .map(|_| {
                let mut d: Vec<f32> = (0..e).map(|_| rng.normal()).collect();
                d[0] = 0.0;
                unit(&mut d, 1.0);
                d
            })
            .collect();
        let mix = (0..f)
            .map(|_| {
                let mut picked = [(0u32, 0f32); MIX];
                let mut n = 0;
                while n < MIX {
                    let k = rng.below(r as u64) as u32;
                    if picked[..n].iter().all(|&(j, _)| j != k) {
                        picked[n] = (k, rng.normal());
                        n += 1;
                    }
                }
                let norm = picked
                    .iter()
                    .map(|&(_, c)| c * c)
                    .sum::<f32>()
                    .sqrt()
                    .max(1e-6);
                picked.iter_mut().for_each(|(_, c)| *c /= norm);
                picked
            })
            .collect();
        let ffn_norm: Vec<f32> = (0..e).map(|_| rng.uniform(0.8, 1.2)).collect();
        // The neurons in a random order: rank → neuron.
        let mut order: Vec<usize> = (0..f).collect();
        for i in (1..f).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut prob = vec![0f32; f];
        for (rank, &neuron) in order.iter().enumerate() {
            prob[neuron] = probs_by_rank[rank] as f32;
        }
        // The spread of z_i over tokens: its row has norm √(1 + noise²); the residual
        // stream's entries have the embeddings' unit variance plus the updates of the
        // sublayers before this FFN, and are scaled by the norm weights.
        let mean_w2 = ffn_norm[1..]
            .iter()
            .map(|w| f64::from(*w).powi(2))
            .sum::<f64>()
            / (e - 1).max(1) as f64;
        let drift = 1.0 + (2 * l + 1) as f64 * f64::from(UPDATE_SCALE).powi(2);
        let sigma = ((1.0 + f64::from(spec.predictor_noise).powi(2)) * mean_w2 * drift).sqrt();
        let scale = f64::from(ffn_norm[0]) * f64::from(BIAS_CHANNEL);
        let bias = prob
            .iter()
            .map(|&p| (sigma * normal_quantile(f64::from(p)) / scale) as f32)
            .collect();
        Self {
            dirs,
            mix,
            bias,
            prob,
            ffn_norm,
        }
    }

    /// Gate row `i` without its noise.
    fn gate_row(&self, i: usize, row: &mut [f32]) {
        row.iter_mut().for_each(|x| *x = 0.0);
        for &(k, c) in &self.mix[i] {
            for (x, d) in row.iter_mut().zip(&self.dirs[k as usize]) {
                *x += c * d;
            }
        }
    }

    /// The predictor that computes the gate's predictable part and bias (see the module
    /// documentation).
    fn predictor(&self, spec: &SynthSpec) -> PredictorData {
        let (e, f, r) = (spec.n_embd, spec.n_ff, self.dirs.len());
        let mut fc1 = vec![0f32; 2 * r * e];
        for (k, d) in self.dirs.iter().enumerate() {
            for j in 0..e {
                let v = d[j] * self.ffn_norm[j];
                fc1[k * e + j] = v;
                fc1[(r + k) * e + j] = -v;
            }
        }
        let mut fc2 = vec![0f32; f * 2 * r];
        for (i, m) in self.mix.iter().enumerate() {
            for &(k, c) in m {
                fc2[i * 2 * r + k as usize] = c;
                fc2[i * 2 * r + r + k as usize] = -c;
            }
        }
        let scale = self.ffn_norm[0] * BIAS_CHANNEL;
        PredictorData {
            rank: 2 * r,
            fc1,
            fc2,
            b1: vec![0.0; 2 * r],
            b2: self.bias.iter().map(|b| b * scale).collect(),
        }
    }
}

/// How a matrix's rows are made.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// N(0, scale²/cols) entries; row 0 zero when `zero_row0` (the output projections:
    /// the bias channel stays exact).
    Normal { scale: f32, zero_row0: bool },
    /// A layer's planted gate.
    Gate(&'a LayerPlant, f32),
}

fn make_rows(
    spec: &SynthSpec,
    tensor: u64,
    kind: Rows<'_>,
    wtype: WeightType,
    n_rows: usize,
    n_cols: usize,
) -> Vec<u8> {
    let groups: Vec<Vec<u8>> = (0..n_rows.div_ceil(GROUP))
        .into_par_iter()
        .map(|g| {
            let mut rng = Rng::new(seed_for(spec.seed, tensor, g as u64));
            let rows = g * GROUP..((g + 1) * GROUP).min(n_rows);
            let mut v = vec![0f32; rows.len() * n_cols];
            for (i, row) in rows.clone().zip(v.chunks_exact_mut(n_cols)) {
                match kind {
                    Rows::Normal { scale, zero_row0 } => {
                        if !(zero_row0 && i == 0) {
                            let s = scale / (n_cols as f32).sqrt();
                            row.iter_mut().for_each(|x| *x = rng.normal() * s);
                        }
                    }
                    Rows::Gate(plant, noise) => {
                        plant.gate_row(i, row);
                        let mut e: Vec<f32> = (0..n_cols).map(|_| rng.normal()).collect();
                        e[0] = 0.0;
                        unit(&mut e, noise);
                        row.iter_mut().zip(&e).for_each(|(x, n)| *x += n);
                        row[0] = plant.bias[i];
                    }
                }
            }
            Matrix::quantize(wtype, &v, rows.len(), n_cols)
                .bytes()
                .to_vec()
        })
        .collect();
    groups.concat()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes the model to `path` and its sidecar beside it, on `threads` threads (0: all).
pub fn write(spec: &SynthSpec, path: &Path, threads: usize) -> Result<SynthReport, SynthError> {
    spec.validate()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("pi-synth-{i}"))
        .build()
        .map_err(|e| SynthError::Spec(e.to_string()))?;
    pool.install(|| write_on_pool(spec, path))
}

fn write_on_pool(spec: &SynthSpec, path: &Path) -> Result<SynthReport, SynthError> {
    let (probs, exponent) = power_law(spec.n_ff, spec.active, spec.hot_fraction, spec.hot_mass)?;
    let k = ((spec.hot_fraction * spec.n_ff as f64).round() as usize).clamp(1, spec.n_ff);
    let planted_active = probs.iter().sum::<f64>() / spec.n_ff as f64;
    let planted_hot_mass = probs[..k].iter().sum::<f64>() / probs.iter().sum::<f64>();
    let plants: Vec<LayerPlant> = (0..spec.n_layer)
        .into_par_iter()
        .map(|l| LayerPlant::new(spec, l, &probs))
        .collect();

    let a = spec.activation.arch();
    let mut w = GgufWriter::new();
    let mut md = |k: &str, v: Value| {
        w.add_metadata(k, v)
            .map_err(|e| SynthError::Spec(e.to_string()))
    };
    let u32v = |n: usize| Value::U32(n as u32);
    md("general.architecture", Value::String(a.into()))?;
    md(
        "general.name",
        Value::String(format!(
            "synthetic {a} {}x{} ({} layers), {:.0}% active",
            spec.n_embd,
            spec.n_ff,
            spec.n_layer,
            100.0 * spec.active
        )),
    )?;
    md("general.file_type", Value::U32(spec.wtype.ggml().id()))?;
    md(&format!("{a}.context_length"), u32v(spec.n_ctx))?;
    md(&format!("{a}.embedding_length"), u32v(spec.n_embd))?;
    md(&format!("{a}.block_count"), u32v(spec.n_layer))?;
    md(&format!("{a}.feed_forward_length"), u32v(spec.n_ff))?;
    md(&format!("{a}.attention.head_count"), u32v(spec.n_head))?;
    md(
        &format!("{a}.attention.head_count_kv"),
        u32v(spec.n_head_kv),
    )?;
    md(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-5),
    )?;
    md(&format!("{a}.rope.freq_base"), Value::F32(10000.0))?;
    if spec.activation == SynthActivation::Relu {
        md("powerinfer.ffn_activation", Value::String("relu".into()))?;
    }
    // A byte-level vocabulary (every text encodes), control tokens, and named fillers up
    // to the vocabulary size (never produced by encoding; decoded as their names).
    let table = crate::tokenizer::byte_to_char();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    tokens.extend(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
            .iter()
            .map(|s| (*s).to_owned()),
    );
    let mut types = vec![1i32; 256];
    types.extend([3; 4]);
    for i in tokens.len()..spec.n_vocab {
        tokens.push(format!("t{i}"));
        types.push(1);
    }
    md("tokenizer.ggml.model", Value::String("gpt2".into()))?;
    md("tokenizer.ggml.pre", Value::String("smollm".into()))?;
    md("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)))?;
    md("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))?;
    md(
        "tokenizer.ggml.merges",
        Value::Array(Array::String(Vec::new())),
    )?;
    md("tokenizer.ggml.bos_token_id", Value::U32(257))?;
    md("tokenizer.ggml.eos_token_id", Value::U32(256))?;
    md("tokenizer.ggml.add_bos_token", Value::Bool(true))?;
    md(
        "tokenizer.chat_template",
        Value::String(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n\
             {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                .into(),
        ),
    )?;

    let (e, f, q, kv) = (
        spec.n_embd,
        spec.n_ff,
        spec.n_embd,
        spec.n_head_kv * spec.head_dim(),
    );
    let wt = spec.wtype;
    // Each tensor's bytes are made when the writer reaches it.
    type Source<'s> = Box<dyn Fn() -> Vec<u8> + Sync + 's>;
    let mut sources: Vec<Source<'_>> = Vec::new();
    macro_rules! add {
        ($name:expr, $dtype:expr, $dims:expr, $source:expr) => {{
            sources.push(Box::new($source));
            w.add_tensor_later(&$name, $dtype, $dims)
                .map_err(|e| SynthError::Spec(e.to_string()))
        }};
    }
    // Tensor ids for the seeds: 0 embeddings, 1 output, 2 + 8·layer + k.
    let normal = |scale: f32| Rows::Normal {
        scale,
        zero_row0: false,
    };
    let update = Rows::Normal {
        scale: UPDATE_SCALE,
        zero_row0: true,
    };
    let n_vocab = spec.n_vocab;
    add!(
        "token_embd.weight",
        GgmlType::F16,
        &[e as u64, n_vocab as u64],
        move || {
            let rows = (0..n_vocab.div_ceil(GROUP))
                .into_par_iter()
                .map(|g| {
                    let mut rng = Rng::new(seed_for(spec.seed, 0, g as u64));
                    let mut out = Vec::new();
                    for _ in g * GROUP..((g + 1) * GROUP).min(n_vocab) {
                        for j in 0..e {
                            let v = if j == 0 { BIAS_CHANNEL } else { rng.normal() };
                            out.extend(half::f16::from_f32(v).to_le_bytes());
                        }
                    }
                    out
                })
                .collect::<Vec<_>>();
            rows.concat()
        }
    )?;
    for (l, plant) in plants.iter().enumerate() {
        let id = |k: u64| 2 + 8 * l as u64 + k;
        let blk = |n: &str| format!("blk.{l}.{n}.weight");
        let dims = |rows: usize, cols: usize| [cols as u64, rows as u64];
        let src = |tensor: u64, kind, rows: usize, cols: usize| (tensor, rows, cols, kind);
        for (name, (tensor, rows, cols, kind)) in [
            ("attn_q", src(id(0), normal(1.0), q, e)),
            ("attn_k", src(id(1), normal(1.0), kv, e)),
            ("attn_v", src(id(2), normal(1.0), kv, e)),
            ("attn_output", src(id(3), update, e, q)),
            (
                "ffn_gate",
                src(id(4), Rows::Gate(plant, spec.predictor_noise), f, e),
            ),
            ("ffn_up", src(id(5), normal(1.0), f, e)),
            (
                "ffn_down",
                src(
                    id(6),
                    Rows::Normal {
                        scale: UPDATE_SCALE / spec.active.sqrt() as f32,
                        zero_row0: true,
                    },
                    e,
                    f,
                ),
            ),
        ] {
            add!(blk(name), wt.ggml(), &dims(rows, cols), move || make_rows(
                spec, tensor, kind, wt, rows, cols
            ))?;
        }
        for (k, name) in [(7u64, "attn_norm"), (8, "ffn_norm")] {
            let values: Vec<f32> = if name == "ffn_norm" {
                plant.ffn_norm.clone()
            } else {
                let mut rng = Rng::new(seed_for(spec.seed, id(k), 0));
                (0..e).map(|_| rng.uniform(0.8, 1.2)).collect()
            };
            add!(blk(name), GgmlType::F32, &[e as u64], move || f32_bytes(
                &values
            ))?;
        }
    }
    add!(
        "output_norm.weight",
        GgmlType::F32,
        &[e as u64],
        move || { f32_bytes(&vec![1.0; e]) }
    )?;
    add!(
        "output.weight",
        wt.ggml(),
        &[e as u64, n_vocab as u64],
        move || make_rows(spec, 1, normal(1.0), wt, n_vocab, e)
    )?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| SynthError::Write {
            path: dir.to_owned(),
            message: e.to_string(),
        })?;
    }
    w.write_file_with(path, &mut |i, _| Ok(sources[i]()))
        .map_err(|e| SynthError::Write {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    drop((w, sources));

    let file = GgufFile::open(path).map_err(LoadError::from)?;
    let config = ModelConfig::from_metadata(file.metadata(), file.header().magic)?;
    let model_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    drop(file);
    let sidecar_path = sidecar::path_for(path);
    let data = SidecarData {
        calibration_tokens: 0,
        predictor_threshold: Some(0.0),
        frequencies: Some(plants.iter().map(|p| p.prob.clone()).collect()),
        predictors: Some(plants.par_iter().map(|p| p.predictor(spec)).collect()),
        ..SidecarData::default()
    };
    sidecar::write(&sidecar_path, &config, &data)?;
    Ok(SynthReport {
        model: path.to_owned(),
        sidecar: sidecar_path,
        model_bytes,
        n_params: spec.n_params(),
        exponent,
        planted_active,
        planted_hot_mass,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_normal_quantile_matches_known_values() {
        for (p, want) in [
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.1, -1.281_551_565_544_6),
            (0.01, -2.326_347_874_040_841),
            (0.999, 3.090_232_306_167_813),
        ] {
            let got = normal_quantile(p);
            assert!((got - want).abs() < 1e-8, "Φ⁻¹({p}) = {got}, not {want}");
        }
    }

    #[test]
    fn the_power_law_has_the_mean_and_the_hot_mass_asked_for() {
        for (n, active, hot, mass) in [
            (11008, 0.1, 0.2, 0.8),
            (1024, 0.05, 0.1, 0.5),
            (5632, 0.3, 0.3, 0.6),
        ] {
            let (p, alpha) = power_law(n, active, hot, mass).unwrap();
            let mean = p.iter().sum::<f64>() / n as f64;
            let k = (hot * n as f64).round() as usize;
            let got = p[..k].iter().sum::<f64>() / p.iter().sum::<f64>();
            assert!((mean - active).abs() < 1e-6, "mean {mean}");
            assert!((got - mass).abs() < 1e-3, "hot mass {got}");
            assert!(alpha > 0.0);
            assert!(p.windows(2).all(|w| w[0] >= w[1]));
            assert!(p.iter().all(|&x| x > 0.0 && x <= P_MAX));
        }
        // 1% of the neurons cannot carry 99% of 50% activity.
        let e = power_law(1000, 0.5, 0.01, 0.99).unwrap_err();
        assert!(e.to_string().contains("can carry at most"), "{e}");
    }

    #[test]
    fn shapes_validate_and_bad_ones_say_why() {
        for name in SHAPES {
            SynthSpec::shape(name).unwrap().validate().unwrap();
        }
        assert!(SynthSpec::shape("70b").is_none());
        let base = SynthSpec::shape("tiny").unwrap();
        let k = SynthSpec {
            wtype: WeightType::Q4_K,
            n_ff: 1000,
            ..base.clone()
        };
        assert!(
            k.validate()
                .unwrap_err()
                .to_string()
                .contains("block of 256")
        );
        let heads = SynthSpec {
            n_head_kv: 3,
            ..base.clone()
        };
        assert!(
            heads
                .validate()
                .unwrap_err()
                .to_string()
                .contains("n_head_kv")
        );
        let mass = SynthSpec {
            hot_mass: 0.1,
            ..base
        };
        assert!(
            mass.validate()
                .unwrap_err()
                .to_string()
                .contains("hot mass")
        );
    }

    #[test]
    fn seven_b_has_seven_billion_parameters() {
        let p = SynthSpec::shape("7b").unwrap().n_params();
        assert!((6.6e9..6.8e9).contains(&(p as f64)), "{p}");
    }
}
