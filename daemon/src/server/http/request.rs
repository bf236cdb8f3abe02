//! Reading a request body: the JSON object with typed fields that name themselves in
//! their errors, and what the chat and completion endpoints share.

use serde_json::{Map, Value, json};

use super::error::ApiError;
use crate::engine::{GenerateSpec, Input, SparsityMode};
use crate::generation::sampler::{SamplerConfig, random_seed};
use crate::server::keep_alive::KeepAlive;
use crate::tokenizer::ChatMessage;

/// The most alternatives per token `top_logprobs` (and a completion's `logprobs`) asks.
pub(super) const MAX_TOP_LOGPROBS: u64 = crate::engine::MAX_TOP_LOGPROBS as u64;
use crate::engine::{MAX_STOP_BYTES, MAX_STOP_STRINGS as MAX_STOP};

/// The request's JSON object, with typed access that names the field in its errors.
pub(super) struct Fields(Map<String, Value>);

impl Fields {
    pub(super) fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(_) => Err(ApiError::bad(
                "body",
                "the request body must be a JSON object",
            )),
            Err(e) => Err(ApiError::bad("body", format!("the body is not JSON: {e}"))),
        }
    }

    /// A field that is absent or null is `None`.
    pub(super) fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub(super) fn string(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad(name, format!("{name} must be a string"))),
        }
    }

    pub(super) fn number(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<Option<f32>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_f64().unwrap_or(f64::NAN);
                if range.contains(&v) {
                    Ok(Some(v as f32))
                } else {
                    Err(ApiError::bad(
                        name,
                        format!(
                            "{name} must be between {} and {}, not {v}",
                            range.start(),
                            range.end()
                        ),
                    ))
                }
            }
            Some(_) => Err(ApiError::bad(name, format!("{name} must be a number"))),
        }
    }

    pub(super) fn integer(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if range.contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::bad(
                    name,
                    format!(
                        "{name} must be a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )),
            },
        }
    }

    pub(super) fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::bad(name, format!("{name} must be true or false"))),
        }
    }
}

/// What both endpoints share: the model, sampling, limits, stop strings, streaming.
pub(super) struct Common {
    pub(super) model: String,
    pub(super) spec: GenerateSpec,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) keep_alive: Option<KeepAlive>,
}

pub(super) fn common(f: &Fields, input: Input, top_logprobs: usize) -> Result<Common, ApiError> {
    let model = f
        .string("model")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("model", "model is required"))?
        .to_owned();
    if let Some(n) = f.integer("n", 0..=u64::MAX)?
        && n != 1
    {
        return Err(ApiError::bad(
            "n",
            format!("only n = 1 is supported, not {n}"),
        ));
    }
    if let Some(b) = f.integer("best_of", 0..=u64::MAX)?
        && b > 1
    {
        return Err(ApiError::bad("best_of", "best_of > 1 is not supported"));
    }
    // Tools are refused; an empty list, or a choice of none or auto without tools, is
    // what clients send by default and means no tools.
    for unsupported in ["tools", "functions", "tool_choice", "function_call"] {
        if f.get(unsupported)
            .is_some_and(|v| v != &json!([]) && v != "none" && v != "auto")
        {
            return Err(ApiError::bad(
                unsupported,
                format!("{unsupported} is not supported by this server"),
            ));
        }
    }
    if let Some(rf) = f.get("response_format")
        && rf.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::bad(
            "response_format",
            "only response_format {\"type\": \"text\"} is supported",
        ));
    }
    if f.get("logit_bias")
        .is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty()))
    {
        return Err(ApiError::bad("logit_bias", "logit_bias is not supported"));
    }
    let d = SamplerConfig::default();
    let sampling = SamplerConfig {
        temperature: f.number("temperature", 0.0..=2.0)?.unwrap_or(d.temperature),
        top_p: f.number("top_p", 0.0..=1.0)?.unwrap_or(d.top_p),
        top_k: f
            .integer("top_k", 0..=u64::from(u32::MAX))?
            .map_or(d.top_k, |k| k as usize),
        min_p: f.number("min_p", 0.0..=1.0)?.unwrap_or(d.min_p),
        repeat_penalty: f
            .number("repeat_penalty", 0.0..=f64::from(f32::MAX))?
            .unwrap_or(d.repeat_penalty),
        presence_penalty: f
            .number("presence_penalty", -2.0..=2.0)?
            .unwrap_or(d.presence_penalty),
        frequency_penalty: f
            .number("frequency_penalty", -2.0..=2.0)?
            .unwrap_or(d.frequency_penalty),
        penalty_last_n: d.penalty_last_n,
        seed: match f.get("seed") {
            None => random_seed(),
            // OpenAI's seeds are signed; any 64-bit pattern is a seed here.
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| ApiError::bad("seed", "seed must be an integer"))?,
        },
        n_logprobs: 0,
    };
    let max_tokens = match f.integer("max_completion_tokens", 1..=u64::from(u32::MAX))? {
        Some(n) => Some(n),
        None => f.integer("max_tokens", 1..=u64::from(u32::MAX))?,
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("stop", "stop must be a string or strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::bad("stop", "stop must be a string or strings")),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad(
            "stop",
            format!("at most {MAX_STOP} stop strings, not {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop", "a stop string is empty"));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad(
            "stop",
            format!(
                "a stop string is {} bytes; the limit is {MAX_STOP_BYTES}",
                s.len()
            ),
        ));
    }
    let sparsity = match f.string("sparsity")? {
        None => None,
        Some(s) => Some(SparsityMode::parse(s).ok_or_else(|| {
            ApiError::bad(
                "sparsity",
                format!("sparsity must be dense, predictor or gate, not {s:?}"),
            )
        })?),
    };
    let keep_alive = match f.get("keep_alive") {
        None => None,
        Some(v) => Some(KeepAlive::from_json(v).ok_or_else(|| {
            ApiError::bad(
                "keep_alive",
                "keep_alive must be a duration (30s, 5m, 1h, seconds), 0 or -1 (forever)",
            )
        })?),
    };
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::bad(
                    "stream_options",
                    "stream_options.include_usage must be true or false",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::bad(
                "stream_options",
                "stream_options must be an object",
            ));
        }
    };
    Ok(Common {
        model,
        spec: GenerateSpec {
            input,
            max_tokens: max_tokens.map(|n| n as usize),
            sampling,
            stop,
            top_logprobs,
            sparsity,
        },
        stream,
        include_usage,
        keep_alive,
    })
}

pub(super) fn chat_messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: String| ApiError::bad("messages", m);
    let Some(Value::Array(list)) = f.get("messages") else {
        return Err(bad("messages is required: a list of {role, content}".into()));
    };
    if list.is_empty() {
        return Err(bad("messages is empty".into()));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("messages[{i}] has no role")))?;
            let role = match role {
                "system" | "user" | "assistant" => role.to_owned(),
                // OpenAI's newer name for the system role; chat templates know "system".
                "developer" => "system".to_owned(),
                other => {
                    return Err(bad(format!(
                        "messages[{i}]: role {other:?} is not supported (system, developer, \
                         user, assistant)"
                    )));
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            (kind, _) => {
                                return Err(bad(format!(
                                    "messages[{i}]: content parts of type {} are not \
                                     supported (text only)",
                                    kind.unwrap_or("(none)")
                                )));
                            }
                        }
                    }
                    text
                }
                None | Some(Value::Null) if role == "assistant" => String::new(),
                _ => return Err(bad(format!("messages[{i}] has no text content"))),
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}
