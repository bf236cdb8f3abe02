//! The OpenAI-compatible HTTP API, on the same models, manager and engines as gRPC:
//! `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health` and `GET /metrics`, shaped as OpenAI's and llama-server's so their
//! clients work unchanged. Streams are Server-Sent Events ending with `data: [DONE]`.
//! Errors are OpenAI's JSON error object with the matching status: 400 (naming the
//! field), 404 (unknown model), 413 (prompt too long), 429 (queue full, with
//! `Retry-After`), 503 (shutting down or failed). Our own figures go in a `powerinfer`
//! object (sparsity mode, hot share, active fraction) on the final chunk and in `usage`,
//! and a request may choose its `sparsity`.
//!
//! With API keys configured, every `/v1` route needs `Authorization: Bearer KEY` (401
//! otherwise); `/health`, `/metrics` and the status page at `/` stay open (the page
//! reads `/v1/status`, so it asks for the key).
//!
//! A client that disconnects drops its response: the engine's stream goes with it and
//! the sequence is cancelled at its next step, as on gRPC.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

mod error;
mod page;
mod request;

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

use super::auth::{ApiKeys, ClientKey};
use super::grpc::{Shared, available_models};
use super::manager::model_name;
use super::metrics::outcome;
use super::status::ServerError;
use crate::engine::{Engine, FinalEvent, FinishReason, Input, StreamItem, TokenEvent};
use crate::generation::sampler::random_seed;

use self::error::ApiError;
use self::request::{Common, Fields, MAX_TOP_LOGPROBS, chat_messages, common};
use crate::ids::TokenId;

/// The API's routes; with `keys`, every `/v1` route needs `Authorization: Bearer KEY`
/// (`/health` stays open for load balancers).
pub fn router(shared: Arc<Shared>, keys: Arc<ApiKeys>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/status", get(page::status))
        .route_layer(axum::middleware::from_fn_with_state(keys, require_key));
    Router::new()
        .merge(v1)
        .route("/", get(page::index))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(
            shared.max_request_bytes,
        ))
        .with_state(shared)
}

/// The request's body, or OpenAI's error for one that could not be read (413 naming the
/// limit for one too large).
fn read_body(
    shared: &Shared,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the limit of {} bytes (max_request_bytes)",
                shared.max_request_bytes
            )
        } else {
            format!("the request body could not be read: {}", r.body_text())
        };
        ApiError {
            status,
            message,
            kind: "invalid_request_error",
            param: Some("body".into()),
            code: (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large"),
        }
    })
}

async fn require_key(
    State(keys): State<Arc<ApiKeys>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let key = keys.identify(given);
    if keys.is_empty() || key.is_some() {
        if let Some(k) = key {
            req.extensions_mut().insert(k);
        }
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

/// The API key the request came with (none on a server without keys).
type Key = Option<axum::Extension<ClientKey>>;

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    key: Key,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let run = async {
        let f = Fields::parse(&read_body(&shared, body)?)?;
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
        generate(&shared, key, c, Kind::Chat, logprobs).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    key: Key,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let run = async {
        let f = Fields::parse(&read_body(&shared, body)?)?;
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
        generate(&shared, key, c, Kind::Completion, logprobs.is_some()).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn generate(
    shared: &Arc<Shared>,
    key: Key,
    c: Common,
    kind: Kind,
    logprobs: bool,
) -> Result<Response, ApiError> {
    shared.check_open()?;
    // Held while the request runs: to its reply, or in the streaming task.
    let permit = shared.streams.acquire(key.map(|k| k.0))?;
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
        let _serving = (&engine, &permit);
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
        // Not ready for a balancer until the models it was told to load are loaded.
        if shared.preloading.load(std::sync::atomic::Ordering::Acquire) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "loading"})),
            )
                .into_response();
        }
        return axum::Json(json!({"status": "ok"})).into_response();
    };
    let loaded = shared.manager.get(&model_name(&name));
    if loaded.is_none() && shared.manager.is_loading(&model_name(&name)) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading", "model": name})),
        )
            .into_response();
    }
    match loaded {
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
