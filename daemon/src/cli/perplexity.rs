//! `powerinferd perplexity MODEL FILE [-c N]`, computed as llama-perplexity does.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::common::{DeviceArgs, SparsityArg, default_threads, load_model};
use super::exit;
use crate::generation::{Session, SessionOptions};
use crate::settings::Settings;
use crate::tools::perplexity::{PerplexityError, perplexity};

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    pub model: String,
    /// A text file to score.
    pub file: PathBuf,
    /// Context (chunk) size in tokens.
    #[arg(long, short = 'c', default_value_t = 512)]
    pub ctx: usize,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// How FFN neurons are chosen: dense, predictor or gate.
    #[arg(long, value_enum, default_value_t = SparsityArg::Dense)]
    pub sparsity: SparsityArg,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub fn run(a: &PerplexityArgs, s: &Settings, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let text = match std::fs::read(&a.file) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => {
            let _ = writeln!(err, "error: cannot read {}: {e}", a.file.display());
            return exit::BAD_INPUT;
        }
    };
    let threads = a.threads.unwrap_or_else(default_threads);
    let session_opts = SessionOptions {
        sparsity: a.sparsity.into(),
        ..SessionOptions::new(a.ctx, threads)
    };
    let opts = a
        .device
        .load_options(a.sparsity.into(), session_opts.device_sizing(), s);
    let (_, loaded) = match load_model(&a.model, a.models_dir.as_deref(), &opts, s, err) {
        Ok(m) => m,
        Err(code) => return code,
    };
    // As llama-perplexity reads it: one trailing newline dropped, special tokens not
    // parsed (text that spells a control token is text).
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let tokens = loaded.tokenizer.encode(text, true, false);
    let mut session = match Session::new(&loaded, session_opts) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return exit::FAILURE;
        }
    };
    let _ = writeln!(
        err,
        "{} tokens, {} chunks of {}",
        tokens.len(),
        tokens.len() / a.ctx.max(1),
        a.ctx
    );
    let started = std::time::Instant::now();
    let result = perplexity(&mut session, &tokens, |p| {
        let _ = write!(out, "[{}]{:.4},", p.chunks, p.value());
        let _ = out.flush();
    });
    match result {
        Ok(p) => {
            let _ = writeln!(
                out,
                "\nFinal estimate: PPL = {:.4} +/- {:.5}",
                p.value(),
                p.error()
            );
            let _ = writeln!(
                err,
                "{} tokens scored in {:.1} s",
                p.scored,
                started.elapsed().as_secs_f64()
            );
            let active = session.active_fraction_per_layer();
            let mean = active.iter().sum::<f32>() / active.len().max(1) as f32;
            let _ = writeln!(
                err,
                "FFN neurons computed: {:.1}% (mean over layers; sparsity {})",
                100.0 * mean,
                crate::model::SparsityMode::from(a.sparsity)
            );
            exit::OK
        }
        Err(e @ (PerplexityError::TooShort { .. } | PerplexityError::ContextTooSmall(_))) => {
            let _ = writeln!(err, "error: {e}");
            exit::BAD_INPUT
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            exit::FAILURE
        }
    }
}
