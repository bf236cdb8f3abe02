//! `powerinferd run MODEL PROMPT`: generate text in-process and stream it to stdout.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::common::{
    DeviceArgs, SamplingArgs, SparsityArg, default_threads, load_model, place_loaded,
};
use super::exit;
use crate::generation::{FinishReason, GenParams, GenerateError, Session, SessionOptions};
use crate::model::LoadOptions;
use crate::settings::Settings;
use crate::tokenizer::{ChatMessage, TokenizerError};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Model: a catalog alias (smollm2-135m), a name in the models directory, or a path.
    pub model: String,
    /// The prompt (with --chat: the user message).
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Apply the model's chat template to the prompt as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Compute threads (default: all CPUs).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// How FFN neurons are chosen: dense, predictor or gate.
    #[arg(long, value_enum, default_value_t = SparsityArg::Dense)]
    pub sparsity: SparsityArg,
    /// Context size in tokens (default: prompt + max tokens, within the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// One JSON object per token (id, text, logprob), then a summary.
    #[arg(long)]
    pub json: bool,
    /// Alternatives to report with each token in --json output.
    #[arg(long, default_value_t = 0)]
    pub logprobs: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Models directory (default: $POWERINFER_HOME/models).
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub fn run(a: &RunArgs, s: &Settings, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let host = LoadOptions {
        sparsity: a.sparsity.into(),
        tuning: s.tuning,
        ..LoadOptions::default()
    };
    let (path, mut loaded) = match load_model(&a.model, a.models_dir.as_deref(), &host, s, err) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let tok = &loaded.tokenizer;
    let text = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &a.prompt));
        match tok.render_chat(&messages) {
            Ok(s) => s,
            Err(TokenizerError::NoChatTemplate) => {
                let _ = writeln!(
                    err,
                    "error: the model has no chat template; run without --chat"
                );
                return exit::BAD_INPUT;
            }
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return exit::BAD_INPUT;
            }
        }
    } else {
        a.prompt.clone()
    };
    let prompt = tok.encode(&text, true, true);
    let n_ctx_train = loaded.model.config.n_ctx_train;
    let n_ctx = a
        .ctx
        .unwrap_or_else(|| (prompt.len() + a.max_tokens + 1).next_multiple_of(256))
        .min(n_ctx_train.max(1));
    let threads = a.threads.unwrap_or_else(default_threads).max(1);
    let session_opts = SessionOptions {
        sparsity: a.sparsity.into(),
        ..SessionOptions::new(n_ctx, threads)
    };
    // The device's caches hold the context the prompt asks for, so it is placed now.
    if let Err(code) = place_loaded(
        &path,
        &mut loaded,
        &a.device,
        a.sparsity.into(),
        session_opts.device_sizing(),
        s,
        err,
    ) {
        return code;
    }
    let mut session = match Session::new(&loaded, session_opts) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return exit::FAILURE;
        }
    };
    let params = GenParams {
        max_tokens: a.max_tokens,
        sampler: a.sampling.config(a.logprobs),
        stop: a.stop.clone(),
    };
    let seed = params.sampler.seed;
    let mut write_failed = None;
    let result = session.generate(&prompt, &params, |ev| {
        let written = if a.json {
            let top: Vec<_> = ev
                .top_logprobs
                .iter()
                .map(|(t, text, lp)| json!({"id": t.0, "text": text, "logprob": lp}))
                .collect();
            let mut obj = json!({"id": ev.id.0, "text": ev.text, "logprob": ev.logprob});
            if a.logprobs > 0 {
                obj["top_logprobs"] = json!(top);
            }
            writeln!(out, "{obj}")
        } else {
            write!(out, "{}", ev.text)
        };
        match written.and_then(|()| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_failed = Some(e);
                ControlFlow::Break(())
            }
        }
    });
    let summary = match result {
        Ok(s) => s,
        Err(
            e @ (GenerateError::PromptTooLong { .. }
            | GenerateError::EmptyPrompt
            | GenerateError::Sampling(_)),
        ) => {
            let _ = writeln!(err, "error: {e}");
            return exit::BAD_INPUT;
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return exit::FAILURE;
        }
    };
    if let Some(e) = write_failed
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        let _ = writeln!(err, "error: writing output: {e}");
        return exit::FAILURE;
    }
    if a.json {
        let s = json!({"summary": {
            "prompt_tokens": summary.prompt_tokens,
            "generated_tokens": summary.generated.len(),
            "prompt_tokens_per_second": summary.prompt_tps(),
            "decode_tokens_per_second": summary.decode_tps(),
            "stop_reason": stop_reason(summary.stop),
            "seed": seed,
            "threads": threads,
        }});
        let _ = writeln!(out, "{s}");
    } else {
        let _ = writeln!(out);
    }
    let _ = writeln!(
        err,
        "\nprompt: {} tokens, {:.1} ms, {:.1} tokens/s | decode: {} tokens, {:.1} ms, {:.1} tokens/s | stop: {} | seed {seed}",
        summary.prompt_tokens,
        summary.prompt_time.as_secs_f64() * 1e3,
        summary.prompt_tps(),
        summary.generated.len(),
        summary.decode_time.as_secs_f64() * 1e3,
        summary.decode_tps(),
        match summary.stop {
            FinishReason::EndOfGeneration(t) => format!("end of generation (token {t})"),
            other => stop_reason(other).to_owned(),
        },
    );
    exit::OK
}

/// The `stop_reason` of the JSON summary and the stderr line (this command's own names,
/// older than the API's).
fn stop_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::EndOfGeneration(_) => "eog",
        FinishReason::MaxTokens => "max_tokens",
        FinishReason::StopSequence => "stop",
        FinishReason::ContextFull => "context",
        FinishReason::Cancelled => "cancelled",
    }
}
