//! `pictl generate` and `pictl chat`: streamed generation, with the sampling flags of
//! `powerinferd run`.

use std::io::{BufRead, Write};

use clap::Args;
use serde_json::json;
use tokio_stream::StreamExt;

use super::models::SparsityArg;
use super::{CmdResult, Failure};
use crate::{Client, GenerateEvent, proto};

/// Sampling flags, with the names and defaults of `powerinferd run` (llama.cpp's).
#[derive(Args, Clone, Debug)]
pub struct SamplingFlags {
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: u32,
    /// Keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Subtracted per earlier occurrence of a token in the window.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Subtracted once for a token present in the window.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// How many recent tokens the penalties consider.
    #[arg(long, default_value_t = 64)]
    penalty_last_n: u32,
    /// Random seed (the same seed gives the same output); random when omitted.
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingFlags {
    fn wire(&self) -> proto::SamplingParams {
        proto::SamplingParams {
            temperature: Some(self.temperature),
            top_k: Some(self.top_k),
            top_p: Some(self.top_p),
            min_p: Some(self.min_p),
            repeat_penalty: Some(self.repeat_penalty),
            frequency_penalty: Some(self.frequency_penalty),
            presence_penalty: Some(self.presence_penalty),
            penalty_last_n: Some(self.penalty_last_n),
            seed: self.seed,
        }
    }
}

/// Flags shared by `generate` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct CommonFlags {
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: u32,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Sparsity mode for this request (default: the model's).
    #[arg(long, value_enum)]
    sparsity: Option<SparsityArg>,
    /// How long the model stays loaded once idle: 30s, 5m, 1h, 0 or -1 (forever)
    /// [default: the daemon's].
    #[arg(long, allow_hyphen_values = true)]
    keep_alive: Option<String>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A loaded model (or one the daemon can load).
    model: String,
    /// The prompt (with --chat: the user message).
    prompt: String,
    #[command(flatten)]
    common: CommonFlags,
    /// Apply the model's chat template to the prompt as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// One JSON object per token (id, text, logprob), then a summary.
    #[arg(long)]
    json: bool,
    /// Alternatives to report with each token in --json output.
    #[arg(long, default_value_t = 0)]
    logprobs: u32,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    model: String,
    #[command(flatten)]
    common: CommonFlags,
    /// System message.
    #[arg(long)]
    system: Option<String>,
}

fn request(
    model: &str,
    input: proto::generate_request::Input,
    c: &CommonFlags,
) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.to_owned(),
        input: Some(input),
        max_tokens: c.max_tokens,
        sampling: Some(c.sampling.wire()),
        stop: c.stop.clone(),
        top_logprobs: 0,
        sparsity: c
            .sparsity
            .map_or(proto::SparsityMode::Unspecified, SparsityArg::wire)
            .into(),
        keep_alive: c.keep_alive.clone().unwrap_or_default(),
    }
}

fn messages(system: Option<&str>, turns: &[(String, String)]) -> proto::ChatMessages {
    let mut m: Vec<proto::ChatMessage> = system
        .map(|s| proto::ChatMessage {
            role: "system".into(),
            content: s.to_owned(),
        })
        .into_iter()
        .collect();
    m.extend(turns.iter().map(|(role, content)| proto::ChatMessage {
        role: role.clone(),
        content: content.clone(),
    }));
    proto::ChatMessages { messages: m }
}

fn finish_name(v: i32) -> &'static str {
    match proto::FinishReason::try_from(v) {
        Ok(proto::FinishReason::Stop) => "stop",
        Ok(proto::FinishReason::Length) => "length",
        Ok(proto::FinishReason::StopSequence) => "stop_sequence",
        Ok(proto::FinishReason::Context) => "context",
        _ => "unspecified",
    }
}

/// Streams one generation to `out`; returns the text and the summary.
async fn stream(
    client: &Client,
    req: proto::GenerateRequest,
    json: bool,
    out: &mut dyn Write,
) -> Result<(String, proto::Final), Failure> {
    let mut events = client.generate(req).await?;
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        match ev? {
            GenerateEvent::Token(t) => {
                if json {
                    let mut obj = json!({"id": t.id, "text": t.text, "logprob": t.logprob});
                    if !t.top_logprobs.is_empty() {
                        obj["top_logprobs"] = t
                            .top_logprobs
                            .iter()
                            .map(|x| json!({"id": x.id, "text": x.text, "logprob": x.logprob}))
                            .collect();
                    }
                    writeln!(out, "{obj}")?;
                } else {
                    write!(out, "{}", t.text)?;
                }
                out.flush()?;
                text.push_str(&t.text);
            }
            GenerateEvent::Final(f) => {
                if !json {
                    write!(out, "{}", f.text)?;
                }
                text.push_str(&f.text);
                return Ok((text, f));
            }
        }
    }
    Err(crate::ClientError::Truncated.into())
}

fn summary_line(f: &proto::Final) -> String {
    let u = f.usage.unwrap_or_default();
    let t = f.timings.unwrap_or_default();
    format!(
        "prompt: {} tokens, {:.1} ms, {:.1} tokens/s | decode: {} tokens, {:.1} ms, {:.1} tokens/s | queue {:.1} ms | stop: {}",
        u.prompt_tokens,
        t.prefill_ms,
        t.prompt_tokens_per_second,
        u.completion_tokens,
        t.decode_ms,
        t.decode_tokens_per_second,
        t.queue_ms,
        finish_name(f.finish_reason)
    )
}

pub async fn generate(
    client: &Client,
    a: &GenerateArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdResult {
    use proto::generate_request::Input;
    let input = if a.chat {
        Input::Chat(messages(
            a.system.as_deref(),
            &[("user".into(), a.prompt.clone())],
        ))
    } else {
        Input::Prompt(a.prompt.clone())
    };
    let mut req = request(&a.model, input, &a.common);
    req.top_logprobs = a.logprobs;
    let (_, f) = stream(client, req, a.json, out).await?;
    if a.json {
        let u = f.usage.unwrap_or_default();
        let t = f.timings.unwrap_or_default();
        let s = json!({"summary": {
            "prompt_tokens": u.prompt_tokens,
            "generated_tokens": u.completion_tokens,
            "prompt_tokens_per_second": t.prompt_tokens_per_second,
            "decode_tokens_per_second": t.decode_tokens_per_second,
            "queue_ms": t.queue_ms,
            "stop_reason": finish_name(f.finish_reason),
            "active_fraction_per_layer": f.sparsity.as_ref().map(|s| s.active_fraction_per_layer.clone()),
        }});
        writeln!(out, "{s}")?;
    } else {
        writeln!(out)?;
        let _ = writeln!(err, "\n{}", summary_line(&f));
    }
    Ok(())
}

pub async fn chat(
    client: &Client,
    a: &ChatArgs,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdResult {
    use proto::generate_request::Input;
    let mut turns: Vec<(String, String)> = Vec::new();
    let mut line = String::new();
    loop {
        let _ = write!(err, ">>> ");
        let _ = err.flush();
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        let said = line.trim();
        if said == "/bye" {
            break;
        }
        if said.is_empty() {
            continue;
        }
        turns.push(("user".into(), said.to_owned()));
        let req = request(
            &a.model,
            Input::Chat(messages(a.system.as_deref(), &turns)),
            &a.common,
        );
        match stream(client, req, false, out).await {
            Ok((text, _)) => {
                writeln!(out)?;
                turns.push(("assistant".into(), text));
            }
            Err(f) => {
                // The conversation goes on without the turn that failed.
                turns.pop();
                if f.status != super::exit::SERVER_ERROR {
                    return Err(f);
                }
                let _ = writeln!(err, "error: {}", f.message);
            }
        }
    }
    Ok(())
}
