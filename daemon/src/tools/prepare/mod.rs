//! `powerinferd prepare`: what the sparse modes need, learned from running the model over
//! a calibration text (DESIGN.md §4).
//!
//! 1. The model runs densely over chunks of the text, recording per layer the FFN input
//!    (the residual stream) and the activated gate `|act(gate)|` of every token.
//! 2. Gate thresholds: on ReLU-gated models a neuron fires where its gate is above 0 (no
//!    threshold needed); on SiLU/GELU ones the threshold of a layer is the quantile of
//!    `|act(gate)|` at the target sparsity.
//! 3. Activation frequencies: how often each neuron fired (what placement ranks by).
//! 4. Predictors (one per layer, in parallel): trained on the training chunks, shifted to a
//!    target recall on held-back training tokens, scored on held-out chunks. On ReLU-gated
//!    models they learn which neurons fire (`h ≠ 0`). On SiLU/GELU ones every neuron has
//!    some output, and they learn the neurons with the largest `|h| = |act(gate) · up|`, a
//!    share `1 − target` of them (the layer's quantile of `|h|`): those are the outputs a
//!    sparse FFN can least afford to drop. `|act(gate)|` alone, gate mode's criterion,
//!    ranks them worse, since `|up|` varies as much: on SmolLM2 (`powerinferd perplexity`
//!    with `--sparsity predictor` on sidecars from each labelling) predictors trained on
//!    `|act(gate)|` at the 50% target lost 18% perplexity, on `|h|` 5%.
//!
//! The result is the sidecar's data ([`crate::model::sidecar`]).

pub mod train;

use std::time::{Duration, Instant};

use crate::generation::{GenerateError, LoadedModel, PREFILL_BATCH, Session, SessionOptions};
use crate::ids::TokenId;
use crate::model::Capture;
use crate::model::sidecar::{PredictorData, SidecarData};
pub use train::{Eval, TrainConfig};

#[derive(Clone, Copy, Debug)]
pub struct PrepareOptions {
    /// Tokens per calibration chunk (each run from an empty cache).
    pub n_ctx: usize,
    pub n_threads: usize,
    /// At most this many tokens are recorded (chunks spread over the whole text).
    pub max_tokens: usize,
    /// SiLU/GELU models: the share of neurons the gate thresholds turn off.
    pub target_sparsity: f32,
    /// Share of the chunks held out to score the predictors.
    pub held_out: f32,
    /// `None`: no predictors.
    pub train: Option<TrainConfig>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            n_ctx: 512,
            n_threads: 1,
            max_tokens: 4096,
            target_sparsity: 0.5,
            held_out: 0.15,
            train: Some(TrainConfig::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "the calibration text has {tokens} tokens: at least 2 chunks of {n_ctx} are needed \
         (one to learn from, one held out); give a longer text or a smaller --ctx"
    )]
    TooShort { tokens: usize, n_ctx: usize },
    #[error("the target sparsity must be in [0, 1), not {0}")]
    BadSparsity(f32),
    #[error("the context must be at least 2 tokens, not {0}")]
    ContextTooSmall(usize),
    #[error("{0}")]
    Generate(#[from] GenerateError),
}

/// What calibration found, per layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    /// Gate threshold (0 on ReLU-gated models).
    pub threshold: f32,
    /// Share of neurons active on the recorded tokens.
    pub active: f32,
    /// The predictor on the held-out tokens, when trained.
    pub eval: Option<Eval>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PrepareReport {
    pub tokens: usize,
    pub train_tokens: usize,
    pub test_tokens: usize,
    pub layers: Vec<LayerReport>,
    pub run_time: Duration,
    pub train_time: Duration,
}

/// Progress of [`prepare`]: `(stage, done, total)` with stage "run" (tokens) or "train"
/// (layers).
pub type OnProgress<'a> = &'a mut dyn FnMut(&'static str, u64, u64);

/// Runs calibration over `tokens` and returns the sidecar data and a report.
pub fn prepare(
    loaded: &LoadedModel,
    tokens: &[TokenId],
    opts: &PrepareOptions,
    progress: OnProgress<'_>,
) -> Result<(SidecarData, PrepareReport), PrepareError> {
    let c = &loaded.model.config;
    if !(0.0..1.0).contains(&opts.target_sparsity) {
        return Err(PrepareError::BadSparsity(opts.target_sparsity));
    }
    if opts.n_ctx < 2 {
        return Err(PrepareError::ContextTooSmall(opts.n_ctx));
    }
    let n_ctx = opts.n_ctx;
    let n_avail = tokens.len() / n_ctx;
    if n_avail < 2 {
        return Err(PrepareError::TooShort {
            tokens: tokens.len(),
            n_ctx,
        });
    }
    // Chunks spread evenly over the text, the last ones held out.
    let n_use = n_avail.min((opts.max_tokens / n_ctx).max(2));
    let chunks: Vec<usize> = (0..n_use).map(|i| i * n_avail / n_use).collect();
    let n_test = ((opts.held_out * n_use as f32).round() as usize).clamp(1, n_use - 1);

    // 1. Record.
    let started = Instant::now();
    let mut session = Session::new(loaded, SessionOptions::new(n_ctx, opts.n_threads))?;
    let relu = c.ffn.is_relu();
    let learn_h = !relu && opts.train.is_some();
    let capture = Capture::new(c.n_layer);
    session.set_capture(Some(if learn_h { capture.with_h() } else { capture }));
    let total = (n_use * n_ctx) as u64;
    for (k, &ci) in chunks.iter().enumerate() {
        let chunk = &tokens[ci * n_ctx..(ci + 1) * n_ctx];
        for (b, part) in chunk.chunks(PREFILL_BATCH).enumerate() {
            session.eval(part, b * PREFILL_BATCH, |_| false)?;
            progress("run", (k * n_ctx + (b + 1) * part.len()) as u64, total);
        }
    }
    let mut cap = session.take_capture().unwrap_or_default();
    drop(session);
    let run_time = started.elapsed();

    let n_tok = n_use * n_ctx;
    let n_train_tok = (n_use - n_test) * n_ctx;
    let train_all: Vec<usize> = (0..n_train_tok).collect();
    let test: Vec<usize> = (n_train_tok..n_tok).collect();
    // Every tenth training token picks the recall shift; the rest fit the weights.
    let (val, fit): (Vec<usize>, Vec<usize>) = train_all.iter().partition(|&&t| t % 10 == 9);

    // 2. Thresholds and 3. frequencies.
    let n_ff = c.n_ff;
    let thresholds: Vec<f32> = cap
        .gate
        .iter()
        .map(|g| {
            if relu {
                0.0
            } else {
                quantile(&g[..n_train_tok * n_ff], opts.target_sparsity)
            }
        })
        .collect();
    let frequencies: Vec<Vec<f32>> = cap
        .gate
        .iter()
        .zip(&thresholds)
        .map(|(g, &thr)| {
            let mut f = vec![0f32; n_ff];
            for row in g.chunks_exact(n_ff) {
                for (fj, &v) in f.iter_mut().zip(row) {
                    *fj += f32::from(u8::from(v > thr));
                }
            }
            f.iter_mut().for_each(|v| *v /= n_tok as f32);
            f
        })
        .collect();

    // 4. Predictors, a layer per worker, on the fired neurons (ReLU-gated models) or on
    // the largest |h| (the others; the gate values are no longer needed then).
    let started = Instant::now();
    let targets = match cap.h.take() {
        Some(h) => {
            cap.gate = Vec::new();
            let thresholds = h
                .iter()
                .map(|v| quantile(&v[..n_train_tok * n_ff], opts.target_sparsity))
                .collect();
            (h, thresholds)
        }
        None => (std::mem::take(&mut cap.gate), thresholds.clone()),
    };
    let trained: Option<Vec<(PredictorData, Eval)>> = opts.train.map(|cfg| {
        let layers: Vec<train::LayerData<'_>> = (0..c.n_layer)
            .map(|l| train::LayerData {
                x: &cap.x[l],
                score: &targets.0[l],
                threshold: targets.1[l],
                n_embd: c.n_embd,
                n_ff,
            })
            .collect();
        train_layers(&layers, &fit, &val, &test, &cfg, opts.n_threads, progress)
    });
    let train_time = started.elapsed();

    let layers = (0..c.n_layer)
        .map(|l| LayerReport {
            threshold: thresholds[l],
            active: frequencies[l].iter().sum::<f32>() / n_ff as f32,
            eval: trained.as_ref().map(|t| t[l].1),
        })
        .collect();
    let data = SidecarData {
        calibration_tokens: n_tok as u64,
        target_sparsity: (!relu).then_some(opts.target_sparsity),
        gate_thresholds: (!relu).then_some(thresholds),
        predictor_threshold: trained.is_some().then_some(0.0),
        frequencies: Some(frequencies),
        predictors: trained.map(|t| t.into_iter().map(|(p, _)| p).collect()),
    };
    let report = PrepareReport {
        tokens: n_tok,
        train_tokens: n_train_tok,
        test_tokens: n_tok - n_train_tok,
        layers,
        run_time,
        train_time,
    };
    Ok((data, report))
}

/// Trains every layer's predictor on `n_threads` workers.
fn train_layers(
    layers: &[train::LayerData<'_>],
    fit: &[usize],
    val: &[usize],
    test: &[usize],
    cfg: &TrainConfig,
    n_threads: usize,
    progress: OnProgress<'_>,
) -> Vec<(PredictorData, Eval)> {
    // Bulk work off the per-token path: rayon's pool (of `n_threads`), a layer per task,
    // results back to this thread, which reports the progress.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out: Vec<Option<(PredictorData, Eval)>> = (0..layers.len()).map(|_| None).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n_threads.clamp(1, layers.len().max(1)))
        .thread_name(|i| format!("pi-train-{i}"))
        .build()
        .ok();
    scoped(pool.as_ref(), |scope| {
        for (l, data) in layers.iter().enumerate() {
            let tx = tx.clone();
            scope.spawn(move |_| {
                let cfg = TrainConfig {
                    seed: cfg.seed ^ (l as u64).wrapping_mul(0x9e37_79b9),
                    ..*cfg
                };
                let _ = tx.send((l, train::train_layer(data, fit, val, test, &cfg)));
            });
        }
        // The tasks hold the only senders now: a task that panics ends the receiving.
        drop(tx);
        for (done, (l, result)) in rx.iter().enumerate() {
            out[l] = Some(result);
            progress("train", done as u64 + 1, layers.len() as u64);
        }
    });
    out.into_iter()
        .map(|r| r.expect("every layer is trained"))
        .collect()
}

/// `op` in a scope of `pool`, or of rayon's global pool when there is none (the
/// calling thread takes part either way).
fn scoped<'scope, R>(
    pool: Option<&rayon::ThreadPool>,
    op: impl FnOnce(&rayon::Scope<'scope>) -> R,
) -> R {
    match pool {
        Some(p) => p.in_place_scope(op),
        None => rayon::in_place_scope(op),
    }
}

/// The value at quantile `q` of `values`: a share `q` of them are at or below it.
fn quantile(values: &[f32], q: f32) -> f32 {
    let k = (q * values.len() as f32) as usize;
    if k == 0 || values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    let (_, kth, _) = v.select_nth_unstable_by(k - 1, f32::total_cmp);
    *kth
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantile_splits_at_the_share() {
        let v: Vec<f32> = (0..100).rev().map(|i| i as f32).collect();
        assert_eq!(quantile(&v, 0.0), 0.0);
        assert_eq!(quantile(&v, 0.5), 49.0);
        assert_eq!(v.iter().filter(|&&x| x > quantile(&v, 0.3)).count(), 70);
    }
}
