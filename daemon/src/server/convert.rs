//! Conversions between the wire types of `powerinfer.v1` and the engine's domain types,
//! all in this one file. Request fields are validated here: what leaves this file is a
//! well-formed domain value or an INVALID_ARGUMENT error naming the field.

use std::time::{Duration, UNIX_EPOCH};

use powerinfer_ops::device::DeviceInfo;
use powerinfer_proto::v1;

use super::manager::{LoadSpec, ModelEvent, ModelSnapshot};
use super::status::ServerError;
use crate::engine::{
    EngineInfo, FinalEvent, FinishReason, GenerateSpec, Input, SparsityMode, StreamItem, TokenEvent,
};
use crate::generation::sampler::{SamplerConfig, random_seed};
use crate::ids::TokenId;
use crate::tokenizer::ChatMessage;

fn invalid(msg: impl Into<String>) -> ServerError {
    ServerError::InvalidArgument(msg.into())
}

/// A wire sparsity mode; `UNSPECIFIED` is `None` (the model's or the server's default).
pub fn sparsity_from_wire(value: i32) -> Result<Option<SparsityMode>, ServerError> {
    match v1::SparsityMode::try_from(value) {
        Ok(v1::SparsityMode::Unspecified) => Ok(None),
        Ok(v1::SparsityMode::Dense) => Ok(Some(SparsityMode::Dense)),
        Ok(v1::SparsityMode::Predictor) => Ok(Some(SparsityMode::Predictor)),
        Ok(v1::SparsityMode::Gate) => Ok(Some(SparsityMode::Gate)),
        Err(_) => Err(invalid(format!("sparsity {value} is not a SparsityMode"))),
    }
}

pub fn sparsity_to_wire(mode: SparsityMode) -> v1::SparsityMode {
    match mode {
        SparsityMode::Dense => v1::SparsityMode::Dense,
        SparsityMode::Predictor => v1::SparsityMode::Predictor,
        SparsityMode::Gate => v1::SparsityMode::Gate,
    }
}

fn finish_to_wire(f: FinishReason) -> v1::FinishReason {
    match f {
        FinishReason::EndOfGeneration(_) => v1::FinishReason::Stop,
        FinishReason::MaxTokens => v1::FinishReason::Length,
        FinishReason::StopSequence => v1::FinishReason::StopSequence,
        FinishReason::ContextFull => v1::FinishReason::Context,
        // A cancelled stream has no reader to receive a final event.
        FinishReason::Cancelled => v1::FinishReason::Unspecified,
    }
}

/// Sampling parameters over llama.cpp's defaults; no seed means a fresh random one.
pub fn sampling(p: Option<&v1::SamplingParams>) -> SamplerConfig {
    let d = SamplerConfig::default();
    let Some(p) = p else {
        return SamplerConfig {
            seed: random_seed(),
            ..d
        };
    };
    SamplerConfig {
        temperature: p.temperature.unwrap_or(d.temperature),
        top_k: p.top_k.map_or(d.top_k, |k| k as usize),
        top_p: p.top_p.unwrap_or(d.top_p),
        min_p: p.min_p.unwrap_or(d.min_p),
        repeat_penalty: p.repeat_penalty.unwrap_or(d.repeat_penalty),
        frequency_penalty: p.frequency_penalty.unwrap_or(d.frequency_penalty),
        presence_penalty: p.presence_penalty.unwrap_or(d.presence_penalty),
        penalty_last_n: p.penalty_last_n.map_or(d.penalty_last_n, |n| n as usize),
        seed: p.seed.unwrap_or_else(random_seed),
        n_logprobs: 0,
    }
}

pub fn generate_spec(req: &v1::GenerateRequest) -> Result<GenerateSpec, ServerError> {
    use v1::generate_request::Input as W;
    let input = match &req.input {
        None => return Err(invalid("one of prompt, chat or token_ids is required")),
        Some(W::Prompt(p)) => Input::Text(p.clone()),
        Some(W::Chat(c)) => {
            if c.messages.is_empty() {
                return Err(invalid("chat has no messages"));
            }
            if let Some(m) = c.messages.iter().find(|m| m.role.is_empty()) {
                return Err(invalid(format!(
                    "a chat message has no role (content {:?})",
                    m.content
                )));
            }
            Input::Chat(
                c.messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            )
        }
        Some(W::TokenIds(t)) => Input::Tokens(t.ids.iter().map(|&i| TokenId(i)).collect()),
    };
    Ok(GenerateSpec {
        input,
        max_tokens: (req.max_tokens > 0).then_some(req.max_tokens as usize),
        sampling: sampling(req.sampling.as_ref()),
        stop: req.stop.clone(),
        top_logprobs: req.top_logprobs as usize,
        sparsity: sparsity_from_wire(req.sparsity)?,
    })
}

pub fn load_spec(req: &v1::LoadModelRequest) -> Result<LoadSpec, ServerError> {
    Ok(LoadSpec {
        reference: req.model.clone(),
        ctx: (req.context_size > 0).then_some(req.context_size as usize),
        sparsity: sparsity_from_wire(req.sparsity)?,
        device: (!req.device.is_empty()).then(|| req.device.clone()),
        vram_budget: (req.vram_budget_bytes > 0).then_some(req.vram_budget_bytes),
    })
}

fn token(t: TokenEvent) -> v1::Token {
    v1::Token {
        id: t.id.0,
        text: t.text,
        logprob: t.logprob,
        top_logprobs: t
            .top_logprobs
            .into_iter()
            .map(|(id, text, logprob)| v1::TopLogprob {
                id: id.0,
                text,
                logprob,
            })
            .collect(),
    }
}

fn per_second(n: usize, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

fn final_event(f: FinalEvent) -> v1::Final {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    v1::Final {
        usage: Some(v1::Usage {
            prompt_tokens: f.prompt_tokens as u32,
            completion_tokens: f.completion_tokens as u32,
        }),
        timings: Some(v1::Timings {
            queue_ms: ms(f.timings.queue),
            prefill_ms: ms(f.timings.prefill),
            decode_ms: ms(f.timings.decode),
            prompt_tokens_per_second: per_second(f.prompt_tokens, f.timings.prefill),
            // The first token comes out of the prefill step; decode time covers the rest.
            decode_tokens_per_second: per_second(
                f.completion_tokens.saturating_sub(1),
                f.timings.decode,
            ),
        }),
        sparsity: Some(v1::SparsityStats {
            mode: sparsity_to_wire(f.sparsity.mode).into(),
            active_fraction_per_layer: f.sparsity.active_fraction_per_layer,
            hot_share: f.sparsity.hot_share,
            cold_share: f.sparsity.cold_share,
        }),
        finish_reason: finish_to_wire(f.finish).into(),
        text: f.text,
    }
}

pub fn stream_item(item: StreamItem) -> v1::GenerateResponse {
    use v1::generate_response::Event;
    v1::GenerateResponse {
        event: Some(match item {
            StreamItem::Token(t) => Event::Token(token(t)),
            StreamItem::Final(f) => Event::Final(final_event(f)),
        }),
    }
}

/// A path's last component: what clients see of the server's files.
pub fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

pub fn model_info(s: &ModelSnapshot) -> v1::ModelInfo {
    let i: &EngineInfo = &s.info;
    let hot_bytes = i.hot.placed_bytes;
    v1::ModelInfo {
        name: i.name.clone(),
        path: file_name(&i.path),
        size_bytes: i.file_size,
        architecture: i.architecture.clone(),
        parameters: i.parameters,
        quantization: i.quantization.clone(),
        context_size: i.options.n_ctx as u32,
        device: i.options.device.clone(),
        sparsity: sparsity_to_wire(i.options.sparsity).into(),
        hot_bytes,
        cold_bytes: i.weight_bytes.saturating_sub(hot_bytes),
        hot_share: i.hot_share,
        hot_hit_rate: s.hot_hit_rate,
        active_requests: i.sched.active as u32,
        queued_requests: i.sched.queued as u32,
        max_sequences: i.options.max_sequences as u32,
        tokens_per_second: i.sched.tokens_per_second,
        loaded_at_unix_ms: i
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        state: match i.failure {
            None => v1::ModelState::Serving,
            Some(_) => v1::ModelState::Failed,
        }
        .into(),
        failure: i.failure.clone().unwrap_or_default(),
        memory_bytes: i.memory_bytes,
        kv_cache_tokens: i.sched.kv_tokens as u64,
    }
}

pub fn device_info(d: &DeviceInfo) -> v1::DeviceInfo {
    v1::DeviceInfo {
        name: d.name.clone(),
        kind: d.kind.name().to_owned(),
        memory_total_bytes: d.memory_total,
        memory_used_bytes: d.memory_used,
    }
}

pub fn model_event(e: ModelEvent) -> v1::WatchModelsResponse {
    use v1::watch_models_response::Event;
    let event = match e {
        ModelEvent::Loading {
            model,
            progress,
            stage,
        } => Event::Loading(v1::ModelLoading {
            model,
            progress,
            stage: stage.to_owned(),
        }),
        ModelEvent::Loaded(info) => Event::Loaded(v1::ModelLoaded {
            model: Some(model_info(&ModelSnapshot {
                active_fraction: Vec::new(),
                hot_hit_rate: 0.0,
                info: *info,
            })),
        }),
        ModelEvent::Unloaded(model) => Event::Unloaded(v1::ModelUnloaded { model }),
        ModelEvent::Failed { model, error } => Event::Failed(v1::ModelLoadFailed { model, error }),
    };
    v1::WatchModelsResponse { event: Some(event) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_validated() {
        let mut req = v1::GenerateRequest::default();
        assert!(generate_spec(&req).is_err(), "no input");
        req.input = Some(v1::generate_request::Input::Prompt("hi".into()));
        req.sparsity = 99;
        assert!(generate_spec(&req).unwrap_err().to_string().contains("99"));
        req.sparsity = v1::SparsityMode::Gate.into();
        req.max_tokens = 7;
        let spec = generate_spec(&req).unwrap();
        assert_eq!(spec.sparsity, Some(SparsityMode::Gate));
        assert_eq!(spec.max_tokens, Some(7));
        req.input = Some(v1::generate_request::Input::Chat(
            v1::ChatMessages::default(),
        ));
        assert!(generate_spec(&req).is_err(), "empty chat");
    }

    #[test]
    fn sampling_defaults_are_llama_cpp_s() {
        let p = v1::SamplingParams {
            temperature: Some(0.0),
            seed: Some(5),
            ..Default::default()
        };
        let c = sampling(Some(&p));
        assert_eq!(c.temperature, 0.0);
        assert_eq!(c.top_k, SamplerConfig::default().top_k);
        assert_eq!(c.seed, 5);
    }
}
