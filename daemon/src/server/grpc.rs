//! The gRPC services of `powerinfer.v1`: InferenceService (Generate, Tokenize, Detokenize)
//! and ControlService (LoadModel, UnloadModel, ListModels, Status, WatchModels,
//! PullModel). Thin:
//! requests are converted in `convert`, work is done by the manager and the engines,
//! errors are mapped in `status`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use powerinfer_proto::v1;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert;
use super::manager::{ModelManager, model_name, snapshot};
use super::metrics::outcome;
use super::status::ServerError;
use crate::engine::{Input, StreamItem};
use crate::ids::TokenId;
use crate::store;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// State shared by both services.
pub struct Shared {
    pub manager: Arc<ModelManager>,
    pub metrics: Arc<super::metrics::Metrics>,
    pub started: Instant,
    /// Set when shutdown begins: new work is refused while running streams drain.
    pub draining: AtomicBool,
    /// Set while the models to load at start are loading (`/health` answers 503).
    pub preloading: AtomicBool,
    /// The largest request body (HTTP) or message (gRPC) a client may send.
    pub max_request_bytes: usize,
    /// Concurrent streams per API key.
    pub streams: super::limits::StreamLimits,
}

impl Shared {
    pub(super) fn check_open(&self) -> Result<(), ServerError> {
        if self.draining.load(Ordering::Acquire) {
            Err(ServerError::ShuttingDown)
        } else {
            Ok(())
        }
    }
}

pub struct InferenceApi(pub Arc<Shared>);
pub struct ControlApi(pub Arc<Shared>);

#[tonic::async_trait]
impl v1::inference_service_server::InferenceService for InferenceApi {
    type GenerateStream = ResponseStream<v1::GenerateResponse>;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.0.check_open()?;
        let key = request
            .extensions()
            .get::<super::auth::ClientKey>()
            .copied();
        let req = request.into_inner();
        let spec = convert::generate_spec(&req)?;
        let permit = self.0.streams.acquire(key)?;
        let keep_alive = match req.keep_alive.trim() {
            "" => None,
            s => Some(super::keep_alive::KeepAlive::parse(s).ok_or_else(|| {
                ServerError::InvalidArgument(format!(
                    "keep_alive {s:?}: expected a duration (30s, 5m, 1h, seconds), 0 or -1"
                ))
            })?),
        };
        let operation = match spec.input {
            Input::Chat(_) => "chat",
            Input::Text(_) | Input::Tokens(_) => "text_completion",
        };
        let name = model_name(&req.model);
        let mut tracker = self.0.metrics.track(&name, "grpc");
        // One span per request; the engine hangs queue, prefill, decode and sampled step
        // spans below it and records the usage when the request ends.
        let span = tracing::info_span!(
            "generate",
            otel.name = %format_args!("{operation} {name}"),
            otel.kind = "server",
            gen_ai.operation.name = operation,
            gen_ai.provider.name = "powerinfer",
            gen_ai.request.model = %name,
            gen_ai.request.max_tokens = spec.max_tokens.unwrap_or(0),
            gen_ai.request.temperature = f64::from(spec.sampling.temperature),
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let manager = self.0.manager.clone();
        let result = async {
            let engine = manager.get_or_load(&req.model).await?;
            manager.touch(&req.model, keep_alive);
            let stream = engine.generate(spec).await?;
            Ok::<_, ServerError>((engine, stream))
        }
        .instrument(span.clone())
        .await;
        let (engine, stream) = result.inspect_err(|e| {
            span.record("otel.status_code", "ERROR");
            tracing::debug!(parent: &span, error = %e, "generate refused");
            tracker.fail(&outcome(e.code()));
        })?;
        // The stream keeps its engine alive: an unloaded model finishes what it started.
        let manager = self.0.manager.clone();
        let model = req.model.clone();
        let out = stream.map(move |item| {
            let _serving = (&engine, &permit);
            match item {
                Ok(item @ (StreamItem::Token(_) | StreamItem::Final(_))) => {
                    match &item {
                        StreamItem::Token(_) => tracker.token(),
                        StreamItem::Final(f) => {
                            tracker.finish(f);
                            manager.touch(&model, None);
                        }
                    }
                    Ok(convert::stream_item(item))
                }
                Err(e) => {
                    let s = Status::from(e);
                    tracker.fail(&outcome(s.code()));
                    Err(s)
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn tokenize(
        &self,
        request: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        self.0.check_open()?;
        let req = request.into_inner();
        let engine = self.0.manager.get_or_load(&req.model).await?;
        let ids = engine
            .tokenize(req.text, req.add_special, req.parse_special)
            .await?;
        let tok = engine.tokenizer();
        let pieces = ids
            .iter()
            .map(|&t| String::from_utf8_lossy(tok.token_bytes(t, true)).into_owned())
            .collect();
        Ok(Response::new(v1::TokenizeResponse {
            ids: ids.iter().map(|t| t.0).collect(),
            pieces,
        }))
    }

    async fn detokenize(
        &self,
        request: Request<v1::DetokenizeRequest>,
    ) -> Result<Response<v1::DetokenizeResponse>, Status> {
        self.0.check_open()?;
        let req = request.into_inner();
        let engine = self.0.manager.get_or_load(&req.model).await?;
        let n_vocab = engine.tokenizer().n_vocab();
        if let Some(bad) = req.ids.iter().find(|&&i| i as usize >= n_vocab) {
            return Err(ServerError::InvalidArgument(format!(
                "token id {bad} is out of range (vocabulary of {n_vocab})"
            ))
            .into());
        }
        let ids = req.ids.iter().map(|&i| TokenId(i)).collect();
        let text = engine.detokenize(ids, req.render_special).await?;
        Ok(Response::new(v1::DetokenizeResponse { text }))
    }
}

/// The host CPU and its memory, as `/proc/cpuinfo` and `/proc/meminfo` report them.
fn host_device() -> v1::DeviceInfo {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |k| k * 1024)
    };
    let (total, available) = (kib("MemTotal:"), kib("MemAvailable:"));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|r| r.split_once(':'))
        .map_or_else(|| "cpu".to_owned(), |(_, n)| n.trim().to_owned());
    v1::DeviceInfo {
        name: cpu,
        kind: "cpu".into(),
        memory_total_bytes: total,
        memory_used_bytes: total.saturating_sub(available),
    }
}

#[tonic::async_trait]
impl v1::control_service_server::ControlService for ControlApi {
    async fn load_model(
        &self,
        request: Request<v1::LoadModelRequest>,
    ) -> Result<Response<v1::LoadModelResponse>, Status> {
        self.0.check_open()?;
        let spec = convert::load_spec(request.get_ref())?;
        let reference = spec.reference.clone();
        let engine = self.0.manager.load(spec).await?;
        // Loaded on purpose: it stays until unloaded, unless a request sets a keep-alive.
        self.0
            .manager
            .touch(&reference, Some(super::keep_alive::KeepAlive::Forever));
        let snap = snapshot(&engine)
            .await
            .ok_or(ServerError::Engine(crate::engine::EngineError::Stopped))?;
        Ok(Response::new(v1::LoadModelResponse {
            model: Some(convert::model_info(&snap)),
        }))
    }

    async fn unload_model(
        &self,
        request: Request<v1::UnloadModelRequest>,
    ) -> Result<Response<v1::UnloadModelResponse>, Status> {
        let req = request.into_inner();
        if req.model.is_empty() {
            return Err(ServerError::InvalidArgument("model is required".into()).into());
        }
        self.0.manager.unload(&req.model).await?;
        Ok(Response::new(v1::UnloadModelResponse {}))
    }

    async fn list_models(
        &self,
        _: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let loaded: Vec<v1::ModelInfo> = self
            .0
            .manager
            .snapshots()
            .await
            .iter()
            .map(convert::model_info)
            .collect();
        let dir = self.0.manager.models_dir().to_owned();
        let available = tokio::task::spawn_blocking(move || available_models(&dir))
            .await
            .map_err(|e| ServerError::Internal(format!("listing models: {e}")))?;
        Ok(Response::new(v1::ListModelsResponse { loaded, available }))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let snaps = self.0.manager.snapshots().await;
        let mut devices = vec![host_device()];
        devices.extend(
            snaps
                .iter()
                .filter_map(|s| s.info.hot.device.as_ref())
                .map(convert::device_info),
        );
        Ok(Response::new(v1::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.0.started.elapsed().as_secs_f64(),
            devices,
            models: snaps.iter().map(convert::model_info).collect(),
            memory_budget_bytes: self.0.manager.memory_budget().unwrap_or(0),
        }))
    }

    type PullModelStream = ResponseStream<v1::PullModelResponse>;

    async fn pull_model(
        &self,
        req: Request<v1::PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        self.0.check_open()?;
        let model = req.into_inner().model;
        Ok(Response::new(pull(&self.0, model.trim())?))
    }

    type WatchModelsStream = ResponseStream<v1::WatchModelsResponse>;

    async fn watch_models(
        &self,
        _: Request<v1::WatchModelsRequest>,
    ) -> Result<Response<Self::WatchModelsStream>, Status> {
        let events = BroadcastStream::new(self.0.manager.subscribe()).filter_map(|e| match e {
            Ok(e) => Some(Ok(convert::model_event(e))),
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "a WatchModels client fell behind");
                None
            }
        });
        Ok(Response::new(Box::pin(events)))
    }
}

/// Streams a catalog model's fetch (see `PullModel` in the proto). The fetch runs on a
/// blocking thread and finishes even if the client leaves (the next pull or load then
/// finds the file); progress a slow client cannot take is skipped, the end never is.
fn pull(shared: &Shared, model: &str) -> Result<ResponseStream<v1::PullModelResponse>, Status> {
    let entry = store::catalog::lookup(model).ok_or_else(|| {
        let aliases: Vec<&str> = store::CATALOG.iter().map(|e| e.alias).collect();
        Status::not_found(format!(
            "{model:?} is not a catalog model (the catalog has: {})",
            aliases.join(", ")
        ))
    })?;
    let dest = shared.manager.models_dir().join(entry.file_name());
    let python = shared.manager.python().to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    tokio::spawn(async move {
        let present = std::fs::metadata(&dest).is_ok_and(|m| m.len() == entry.size);
        if !present {
            let progress = tx.clone();
            let fetched = tokio::task::spawn_blocking(move || {
                crate::progress::reporting_to(
                    move |r| {
                        let _ = progress.try_send(Ok(v1::PullModelResponse {
                            status: r.label.to_owned(),
                            completed_bytes: r.done,
                            total_bytes: r.total,
                            ..Default::default()
                        }));
                    },
                    || store::fetch(entry, &dest, &python),
                )
            })
            .await;
            let failed = match fetched {
                Ok(Ok(())) => None,
                Ok(Err(source)) => Some(Status::from(ServerError::Resolve(
                    store::ResolveError::Fetch {
                        alias: entry.alias.to_owned(),
                        source,
                    },
                ))),
                Err(e) => Some(Status::internal(format!("the fetch failed: {e}"))),
            };
            if let Some(status) = failed {
                tracing::warn!(model = entry.alias, error = %status.message(), "pull failed");
                let _ = tx.send(Err(status)).await;
                return;
            }
            tracing::info!(model = entry.alias, "pulled");
        }
        let _ = tx
            .send(Ok(v1::PullModelResponse {
                status: "success".into(),
                completed_bytes: entry.size,
                total_bytes: entry.size,
                done: true,
                file: entry.file_name(),
                size_bytes: entry.size,
                already_present: present,
            }))
            .await;
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// GGUF files in the models directory, and catalog models (downloaded or not).
pub(super) fn available_models(dir: &std::path::Path) -> Vec<v1::AvailableModel> {
    let mut out: Vec<v1::AvailableModel> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "gguf")
                && let Some(stem) = path.file_stem()
            {
                let name = stem.to_string_lossy().into_owned();
                let entry = store::catalog::lookup(&name);
                out.push(v1::AvailableModel {
                    in_catalog: entry.is_some(),
                    architecture: match entry {
                        Some(e) => e.architecture.to_owned(),
                        None => store::file_architecture(&path).unwrap_or_default(),
                    },
                    description: entry.map(|e| e.description.to_owned()).unwrap_or_default(),
                    downloaded: true,
                    // Through a symbolic link to the file it names.
                    size_bytes: std::fs::metadata(&path).map_or(0, |m| m.len()),
                    path: convert::file_name(&path),
                    name,
                });
            }
        }
    }
    for entry in store::CATALOG {
        if !out.iter().any(|m| m.name == entry.alias) {
            out.push(v1::AvailableModel {
                name: entry.alias.to_owned(),
                path: entry.file_name(),
                size_bytes: entry.size,
                in_catalog: true,
                downloaded: false,
                architecture: entry.architecture.to_owned(),
                description: entry.description.to_owned(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
