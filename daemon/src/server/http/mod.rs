//! The OpenAI-compatible HTTP API, on the same models, manager and engines as gRPC:
//! `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}` and `GET /health`, shaped as OpenAI's and llama-server's so their
//! clients work unchanged. Streams are Server-Sent Events ending with `data: [DONE]`.
//! Errors are OpenAI's JSON error object with the matching status: 400 (naming the
//! field), 404 (unknown model), 413 (prompt too long), 429 (queue full, with
//! `Retry-After`), 503 (shutting down or failed). Our own figures go in a `powerinfer`
//! object (sparsity mode, hot share, active fraction) on the final chunk and in `usage`,
//! and a request may choose its `sparsity`.
//!
//! With API keys configured, every `/v1` route needs `Authorization: Bearer KEY` (401
//! otherwise); `/health` stays open.
//!
//! A client that disconnects drops its response: the engine's stream goes with it and
//! the sequence is cancelled at its next step, as on gRPC.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::auth::ApiKeys;
use super::grpc::{Shared, available_models};
use super::keep_alive::KeepAlive;
use super::manager::model_name;
use super::metrics::outcome;
use super::status::ServerError;
use crate::engine::{
    Engine, EngineError, FinalEvent, FinishReason, GenerateSpec, Input, SparsityMode, StreamItem,
    TokenEvent,
};
use crate::generation::sampler::{SamplerConfig, random_seed};
use crate::ids::TokenId;
use crate::tokenizer::ChatMessage;

/// The most stop strings a request may give.
const MAX_STOP: usize = 16;
/// The most alternatives per token `top_logprobs` (and a completion's `logprobs`) asks.
const MAX_TOP_LOGPROBS: u64 = 20;

/// The API's routes; with `keys`, every `/v1` route needs `Authorization: Bearer KEY`
/// (`/health` stays open for load balancers).
pub fn router(shared: Arc<Shared>, keys: Arc<ApiKeys>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(axum::middleware::from_fn_with_state(keys, require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .with_state(shared)
}

async fn require_key(
    State(keys): State<Arc<ApiKeys>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if keys.allows(given) {
        return next.run(req).await;
    }
    let mut r = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "a valid API key is required (Authorization: Bearer KEY)".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// An error as OpenAI's API returns it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_owned()),
            code: None,
        }
    }

    fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        let message = e.to_string();
        let (status, kind, code) = match &e {
            ServerError::Engine(EngineError::PromptTooLong { .. }) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            ServerError::Engine(EngineError::QueueFull { .. }) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
            ),
            _ => match e.code() {
                Code::InvalidArgument | Code::FailedPrecondition => {
                    (StatusCode::BAD_REQUEST, "invalid_request_error", None)
                }
                Code::NotFound => (
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("model_not_found"),
                ),
                Code::Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("unavailable"),
                ),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            },
        };
        Self {
            status,
            message,
            kind,
            param: None,
            code,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ServerError::Engine(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::TOO_MANY_REQUESTS;
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

async fn unknown_route() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint (see /v1/chat/completions, /v1/completions, /v1/models, \
                  /health)"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
    }
}

/// The request's JSON object, with typed access that names the field in its errors.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
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
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad(name, format!("{name} must be a string"))),
        }
    }

    fn number(
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

    fn integer(
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

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::bad(name, format!("{name} must be true or false"))),
        }
    }
}

/// What both endpoints share: the model, sampling, limits, stop strings, streaming.
struct Common {
    model: String,
    spec: GenerateSpec,
    stream: bool,
    include_usage: bool,
    keep_alive: Option<KeepAlive>,
}

fn common(f: &Fields, input: Input, top_logprobs: usize) -> Result<Common, ApiError> {
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

fn chat_messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(f: FinishReason) -> Option<&'static str> {
    match f {
        FinishReason::EndOfGeneration(_) | FinishReason::StopSequence => Some("stop"),
        FinishReason::MaxTokens | FinishReason::ContextFull => Some("length"),
        FinishReason::Cancelled => None,
    }
}

fn ours(f: &FinalEvent) -> Value {
    let layers = &f.sparsity.active_fraction_per_layer;
    let mean = if layers.is_empty() {
        1.0
    } else {
        layers.iter().sum::<f32>() / layers.len() as f32
    };
    json!({
        "sparsity": f.sparsity.mode.name(),
        "hot_share": f.sparsity.hot_share,
        "active_fraction": mean,
        "active_fraction_per_layer": layers,
        "timings_ms": {
            "queue": f.timings.queue.as_secs_f64() * 1e3,
            "prefill": f.timings.prefill.as_secs_f64() * 1e3,
            "decode": f.timings.decode.as_secs_f64() * 1e3,
        },
    })
}

fn usage(f: &FinalEvent) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "powerinfer": ours(f),
    })
}

/// One token as a chat `logprobs.content` entry.
fn chat_logprob(engine: &Engine, t: &TokenEvent) -> Value {
    let piece = |id: TokenId| {
        let b = engine.tokenizer().token_bytes(id, true);
        (String::from_utf8_lossy(b).into_owned(), b.to_vec())
    };
    let (token, bytes) = piece(t.id);
    json!({
        "token": token,
        "logprob": t.logprob,
        "bytes": bytes,
        "top_logprobs": t.top_logprobs.iter().map(|(id, _, lp)| {
            let (token, bytes) = piece(*id);
            json!({"token": token, "logprob": lp, "bytes": bytes})
        }).collect::<Vec<_>>(),
    })
}

/// Tokens as a completion's legacy `logprobs` object.
fn completion_logprobs(engine: &Engine, tokens: &[TokenEvent], offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut at = offset;
    for t in tokens {
        text_offset.push(at);
        at += t.text.len();
    }
    let piece = |id: TokenId| {
        String::from_utf8_lossy(engine.tokenizer().token_bytes(id, true)).into_owned()
    };
    json!({
        "tokens": tokens.iter().map(|t| piece(t.id)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top_logprobs
                .iter()
                .map(|(id, _, lp)| (piece(*id), json!(lp)))
                .collect::<Map<String, Value>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let run = async {
        let f = Fields::parse(&body)?;
        let messages = chat_messages(&f)?;
        let logprobs = f.boolean("logprobs")?.unwrap_or(false);
        let top = f.integer("top_logprobs", 0..=MAX_TOP_LOGPROBS)?;
        if top.is_some_and(|n| n > 0) && !logprobs {
            return Err(ApiError::bad(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        let c = common(&f, Input::Chat(messages), top.unwrap_or(0) as usize)?;
        generate(&shared, c, Kind::Chat, logprobs).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let run = async {
        let f = Fields::parse(&body)?;
        let bad_prompt =
            || ApiError::bad("prompt", "prompt must be a string or a list of token ids");
        let input = match f.get("prompt") {
            Some(Value::String(s)) => Input::Text(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                Input::Text(a[0].as_str().unwrap_or_default().to_owned())
            }
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => Input::Tokens(
                a.iter()
                    .map(|v| {
                        v.as_u64()
                            .and_then(|i| u32::try_from(i).ok())
                            .map(TokenId)
                            .ok_or_else(bad_prompt)
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(Value::Array(a)) if a.len() > 1 => {
                return Err(ApiError::bad(
                    "prompt",
                    "only one prompt per request is supported",
                ));
            }
            None => return Err(ApiError::bad("prompt", "prompt is required")),
            Some(_) => return Err(bad_prompt()),
        };
        if f.boolean("echo")?.unwrap_or(false) {
            return Err(ApiError::bad("echo", "echo is not supported"));
        }
        if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad("suffix", "suffix is not supported"));
        }
        let logprobs = f.integer("logprobs", 0..=MAX_TOP_LOGPROBS)?;
        let c = common(&f, input, logprobs.unwrap_or(0) as usize)?;
        generate(&shared, c, Kind::Completion, logprobs.is_some()).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn generate(
    shared: &Arc<Shared>,
    c: Common,
    kind: Kind,
    logprobs: bool,
) -> Result<Response, ApiError> {
    shared.check_open()?;
    let name = model_name(&c.model);
    let mut tracker = shared.metrics.track(&name, "http");
    let started = async {
        let engine = shared.manager.get_or_load(&c.model).await?;
        shared.manager.touch(&c.model, c.keep_alive);
        let events = engine.generate(c.spec).await?;
        Ok::<_, ServerError>((engine, events))
    }
    .await;
    let (engine, mut events) = match started {
        Ok(x) => x,
        Err(e) => {
            tracker.fail(&outcome(e.code()));
            return Err(e.into());
        }
    };
    let (id, object) = match kind {
        Kind::Chat => (
            format!("chatcmpl-{:016x}", random_seed()),
            "chat.completion",
        ),
        Kind::Completion => (format!("cmpl-{:016x}", random_seed()), "text_completion"),
    };
    let created = now_unix();
    if !c.stream {
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut last = None;
        while let Some(item) = events.next().await {
            let item = match item {
                Ok(i) => i,
                Err(e) => {
                    let e = ServerError::Engine(e);
                    tracker.fail(&outcome(e.code()));
                    return Err(e.into());
                }
            };
            match item {
                StreamItem::Token(t) => {
                    tracker.token();
                    text.push_str(&t.text);
                    if logprobs {
                        tokens.push(t);
                    }
                }
                StreamItem::Final(f) => {
                    tracker.finish(&f);
                    last = Some(f);
                }
            }
        }
        let f = last.ok_or_else(|| {
            ApiError::from(ServerError::Internal(
                "the generation ended without a result".into(),
            ))
        })?;
        // What was held back for a stop string that never came.
        text.push_str(&f.text);
        shared.manager.touch(&c.model, None);
        let choice = match kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs.then(|| json!({
                    "content": tokens.iter().map(|t| chat_logprob(&engine, t)).collect::<Vec<_>>()
                })),
                "finish_reason": finish_reason(f.finish),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs.then(|| completion_logprobs(&engine, &tokens, 0)),
                "finish_reason": finish_reason(f.finish),
            }),
        };
        let body = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": name,
            "system_fingerprint": concat!("powerinfer-", env!("CARGO_PKG_VERSION")),
            "choices": [choice],
            "usage": usage(&f),
            "powerinfer": ours(&f),
        });
        return Ok(axum::Json(body).into_response());
    }

    // Streaming: a task turns engine events into SSE events; when the client goes, the
    // channel closes, the task ends and drops the engine's stream, which cancels it.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(16);
    let chunk_object = match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    };
    let chunk = move |choices: Value, extra: Option<(&str, Value)>| {
        let mut v = json!({
            "id": id,
            "object": chunk_object,
            "created": created,
            "model": name,
            "system_fingerprint": concat!("powerinfer-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        });
        if let (Some((k, x)), Some(o)) = (extra, v.as_object_mut()) {
            o.insert(k.to_owned(), x);
        }
        Event::default().data(v.to_string())
    };
    let include_usage = c.include_usage;
    let manager = shared.manager.clone();
    let model = c.model.clone();
    tokio::spawn(async move {
        let _serving = &engine;
        let send = |e: Event| {
            let tx = tx.clone();
            async move { tx.send(Ok(e)).await.is_ok() }
        };
        if kind == Kind::Chat
            && !send(chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": null, "finish_reason": null}]),
                None,
            ))
            .await
        {
            return;
        }
        let mut offset = 0;
        while let Some(item) = events.next().await {
            let event = match item {
                Ok(StreamItem::Token(t)) => {
                    tracker.token();
                    let lp = match kind {
                        Kind::Chat => {
                            logprobs.then(|| json!({"content": [chat_logprob(&engine, &t)]}))
                        }
                        Kind::Completion => logprobs.then(|| {
                            completion_logprobs(&engine, std::slice::from_ref(&t), offset)
                        }),
                    };
                    offset += t.text.len();
                    if t.text.is_empty() && !logprobs {
                        continue;
                    }
                    let choice = match kind {
                        Kind::Chat => json!({"index": 0, "delta": {"content": t.text},
                                             "logprobs": lp, "finish_reason": null}),
                        Kind::Completion => json!({"index": 0, "text": t.text,
                                                   "logprobs": lp, "finish_reason": null}),
                    };
                    chunk(json!([choice]), None)
                }
                Ok(StreamItem::Final(f)) => {
                    tracker.finish(&f);
                    manager.touch(&model, None);
                    if !f.text.is_empty() {
                        // What was held back for a stop string that never came.
                        let held = match kind {
                            Kind::Chat => json!({"index": 0, "delta": {"content": f.text},
                                                 "logprobs": null, "finish_reason": null}),
                            Kind::Completion => json!({"index": 0, "text": f.text,
                                                       "logprobs": null, "finish_reason": null}),
                        };
                        if !send(chunk(json!([held]), None)).await {
                            return;
                        }
                    }
                    let choice = match kind {
                        Kind::Chat => json!({"index": 0, "delta": {}, "logprobs": null,
                                             "finish_reason": finish_reason(f.finish)}),
                        Kind::Completion => json!({"index": 0, "text": "", "logprobs": null,
                                                   "finish_reason": finish_reason(f.finish)}),
                    };
                    if !send(chunk(json!([choice]), Some(("powerinfer", ours(&f))))).await {
                        return;
                    }
                    if include_usage && !send(chunk(json!([]), Some(("usage", usage(&f))))).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    // OpenAI's clients raise on an error object in the stream.
                    let e = ServerError::Engine(e);
                    tracker.fail(&outcome(e.code()));
                    let e = ApiError::from(e);
                    let _ = send(Event::default().data(e.body().to_string())).await;
                    return;
                }
            };
            if !send(event).await {
                return;
            }
        }
        let _ = send(Event::default().data("[DONE]")).await;
    });
    Ok(Sse::new(ReceiverStream::new(rx)).into_response())
}

fn model_object(id: &str, created: u64, loaded: bool) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": created,
        "owned_by": "powerinfer",
        "powerinfer": {"loaded": loaded},
    })
}

async fn models(shared: &Shared) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for s in shared.manager.snapshots().await {
        let created = s
            .info
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        out.push(model_object(&s.info.name, created, true));
    }
    let dir = shared.manager.models_dir().to_owned();
    let available = tokio::task::spawn_blocking(move || available_models(&dir))
        .await
        .map_err(|e| ApiError::from(ServerError::Internal(format!("listing models: {e}"))))?;
    for m in available {
        if !out.iter().any(|o| o["id"] == m.name.as_str()) {
            out.push(model_object(&m.name, 0, false));
        }
    }
    Ok(out)
}

async fn list_models(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let data = models(&shared).await?;
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn get_model(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match models(&shared)
        .await?
        .into_iter()
        .find(|m| m["id"] == id.as_str())
    {
        Some(m) => Ok(axum::Json(m).into_response()),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("model {id:?} is not a known model"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
    }
}

#[derive(serde::Deserialize)]
struct HealthQuery {
    model: Option<String>,
}

/// 200 while serving; 503 while shutting down. With `?model=`: 200 when that model is
/// loaded and well, 503 when it failed, 404 when it is not loaded.
async fn health(State(shared): State<Arc<Shared>>, Query(q): Query<HealthQuery>) -> Response {
    if shared.check_open().is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    let Some(name) = q.model else {
        return axum::Json(json!({"status": "ok"})).into_response();
    };
    match shared.manager.get(&model_name(&name)) {
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"status": "not loaded", "model": name})),
        )
            .into_response(),
        Some(e) => match e.health().failure() {
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "failed", "model": name, "reason": reason})),
            )
                .into_response(),
            None => axum::Json(json!({"status": "ok", "model": name})).into_response(),
        },
    }
}

/// The Prometheus exposition of the daemon's metrics.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let models = shared.manager.snapshots().await;
    let text = shared
        .metrics
        .render(&models, &shared.manager.load_seconds());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}
