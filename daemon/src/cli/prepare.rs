//! `powerinferd prepare MODEL --calibration TEXT`: calibrate the sparse modes and write
//! the sparsity sidecar next to the model.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::common::{default_threads, resolve_model};
use super::exit;
use crate::model::LoadOptions;
use crate::model::sidecar;
use crate::progress::Progress;
use crate::settings::Settings;
use crate::tools::prepare::{PrepareError, PrepareOptions, TrainConfig, prepare};

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Model: a catalog alias, a name in the models directory, or a path.
    pub model: String,
    /// Calibration text (plain UTF-8).
    #[arg(long)]
    pub calibration: PathBuf,
    /// SiLU/GELU models: the share of FFN neurons the gate thresholds turn off, and the
    /// share of smallest |h| the predictors learn to leave out.
    #[arg(long, default_value_t = 0.5)]
    pub target_sparsity: f32,
    /// Predictor rank (0: no predictors).
    #[arg(long, default_value_t = 128)]
    pub rank: usize,
    /// Passes over the training tokens.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Share of the active neurons the predictors must keep catching.
    #[arg(long, default_value_t = 0.95)]
    pub recall: f32,
    /// Tokens per calibration chunk.
    #[arg(long, short = 'c', default_value_t = 512)]
    pub ctx: usize,
    /// Tokens recorded at most (memory: about 4·(n_embd + n_ff)·n_layer bytes each, and
    /// 4·n_ff·n_layer more when training predictors for a SiLU/GELU model).
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Share of the chunks held out to score the predictors.
    #[arg(long, default_value_t = 0.15)]
    pub held_out: f32,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Where to write the sidecar (default: NAME.sparsity.gguf next to the model).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub fn run(a: &PrepareArgs, s: &Settings, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let path = match resolve_model(&a.model, a.models_dir.as_deref(), s, err) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let text = match std::fs::read(&a.calibration) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => {
            let _ = writeln!(err, "error: cannot read {}: {e}", a.calibration.display());
            return exit::BAD_INPUT;
        }
    };
    if !(0.0..1.0).contains(&a.recall) || !(0.0..1.0).contains(&a.held_out) {
        let _ = writeln!(err, "error: --recall and --held-out must be in [0, 1)");
        return exit::BAD_INPUT;
    }
    // The model alone: what calibration measures is without any earlier sidecar.
    let opts = LoadOptions {
        sidecar: false,
        tuning: s.tuning,
        ..LoadOptions::default()
    };
    let loaded = match crate::model::open(&path, &opts) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(err, "error: {}: {e}", path.display());
            return exit::BAD_INPUT;
        }
    };
    let tokens = loaded.tokenizer.encode(&text, true, true);
    let c = &loaded.model.config;
    let opts = PrepareOptions {
        n_ctx: a.ctx,
        n_threads: a.threads.unwrap_or_else(default_threads),
        max_tokens: a.max_tokens,
        target_sparsity: a.target_sparsity,
        held_out: a.held_out,
        train: (a.rank > 0).then_some(TrainConfig {
            rank: a.rank,
            epochs: a.epochs,
            target_recall: a.recall,
            ..TrainConfig::default()
        }),
    };
    let _ = writeln!(
        err,
        "{}: {} layers, {} FFN neurons each ({}); calibration text {} tokens",
        path.display(),
        c.n_layer,
        c.n_ff,
        if c.ffn.is_relu() {
            "ReLU-gated: active where the gate is above 0"
        } else {
            "SiLU/GELU: thresholds to the target sparsity"
        },
        tokens.len()
    );
    let mut bar: Option<(&'static str, Progress)> = None;
    let mut on_progress = |stage: &'static str, done: u64, total: u64| {
        if bar.as_ref().is_none_or(|(s, _)| *s != stage) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let (label, unit) = match stage {
                "run" => ("recording", "tokens"),
                _ => ("training predictors", "layers"),
            };
            bar = Some((stage, Progress::counting(label, total, unit)));
        }
        if let Some((_, b)) = bar.as_mut() {
            b.update(done);
        }
    };
    let result = prepare(&loaded, &tokens, &opts, &mut on_progress);
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    let (data, report) = match result {
        Ok(r) => r,
        Err(e @ PrepareError::Generate(_)) => {
            let _ = writeln!(err, "error: {e}");
            return exit::FAILURE;
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return exit::BAD_INPUT;
        }
    };

    let _ = writeln!(
        out,
        "recorded {} tokens ({} to learn from, {} held out) in {:.1} s; predictors in {:.1} s",
        report.tokens,
        report.train_tokens,
        report.test_tokens,
        report.run_time.as_secs_f64(),
        report.train_time.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "layer  threshold  active   | held out: recall  precision  predicted  actual"
    );
    let (mut r_sum, mut p_sum, mut pred_sum, mut n_eval) = (0.0, 0.0, 0.0, 0);
    for (l, r) in report.layers.iter().enumerate() {
        let _ = write!(
            out,
            "{l:>5}  {:>9.5}  {:>6.1}%",
            r.threshold,
            100.0 * r.active
        );
        if let Some(e) = r.eval {
            let _ = write!(
                out,
                "   | {:>15.3}  {:>9.3}  {:>8.1}%  {:>5.1}%",
                e.recall,
                e.precision,
                100.0 * e.predicted,
                100.0 * e.actual
            );
            r_sum += e.recall;
            p_sum += e.precision;
            pred_sum += e.predicted;
            n_eval += 1;
        }
        let _ = writeln!(out);
    }
    if n_eval > 0 {
        let n = n_eval as f32;
        let _ = writeln!(
            out,
            "mean held-out recall {:.3}, precision {:.3}, predicted active {:.1}%",
            r_sum / n,
            p_sum / n,
            100.0 * pred_sum / n
        );
    }
    let target = a.output.clone().unwrap_or_else(|| sidecar::path_for(&path));
    if let Err(e) = sidecar::write(&target, c, &data) {
        let _ = writeln!(err, "error: cannot write {}: {e}", target.display());
        return exit::FAILURE;
    }
    let _ = writeln!(out, "wrote {}", target.display());
    exit::OK
}
