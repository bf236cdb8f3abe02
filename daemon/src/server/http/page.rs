//! The built-in status page at `/` (one HTML file with its script, embedded in the
//! binary) and the JSON it reads, `GET /v1/status`: the loaded models with their memory,
//! sparsity mode, hot share, per-layer active fraction and hot/cold split, requests,
//! KV-cache use and live tokens/s. The page's chat box streams from
//! `/v1/chat/completions` like any other client.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::super::grpc::Shared;
use super::super::manager::ModelSnapshot;

const PAGE: &str = include_str!("status.html");

pub(super) async fn index() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            // The page talks to this server only.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                ),
            ),
        ],
        PAGE,
    )
        .into_response()
}

fn model(s: &ModelSnapshot) -> Value {
    let i = &s.info;
    let capacity = i.options.n_ctx * i.options.max_sequences;
    json!({
        "name": i.name,
        "architecture": i.architecture,
        "parameters": i.parameters,
        "quantization": i.quantization,
        "file_bytes": i.file_size,
        "memory_bytes": i.memory_bytes,
        "device": i.options.device,
        "device_memory_used_bytes": i.hot.device.as_ref().map(|d| d.memory_used),
        "device_memory_total_bytes": i.hot.device.as_ref().map(|d| d.memory_total),
        "sparsity": i.options.sparsity.name(),
        "hot_share": i.hot_share,
        "hot_hit_rate": s.hot_hit_rate,
        "layers": s.active_fraction.iter().zip(&i.layer_hot_share)
            .map(|(a, h)| json!({"active_fraction": a, "hot_share": h}))
            .collect::<Vec<_>>(),
        "context_size": i.options.n_ctx,
        "max_sequences": i.options.max_sequences,
        "running_requests": i.sched.active,
        "queued_requests": i.sched.queued,
        "kv_cache_tokens": i.sched.kv_tokens,
        "kv_cache_usage": if capacity > 0 { i.sched.kv_tokens as f64 / capacity as f64 } else { 0.0 },
        "tokens_per_second": i.sched.tokens_per_second,
        "generated_tokens": i.sched.generated_total,
        "loaded_at_unix_ms": i.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "failure": i.failure,
    })
}

/// The server and its loaded models, as the status page shows them.
pub(super) async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let models = shared.manager.snapshots().await;
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs_f64(),
        "memory_budget_bytes": shared.manager.memory_budget(),
        "models": models.iter().map(model).collect::<Vec<_>>(),
    }))
    .into_response()
}
