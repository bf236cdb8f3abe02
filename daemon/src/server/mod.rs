//! `powerinferd serve`: the gRPC server and the OpenAI-compatible HTTP API over the
//! loaded models.
//!
//! [`serve`] takes already-bound listeners and a shutdown future, so tests bind
//! `127.0.0.1:0` and drive the real clients. Shutdown: stop accepting, mark every model not
//! serving, let running streams finish within the drain deadline, then drop the engines
//! (their actors stop after their current step).

pub mod auth;
pub mod config;
pub mod convert;
pub mod grpc;
pub mod http;
pub mod keep_alive;
pub mod limits;
pub mod manager;
pub mod metrics;
pub mod status;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use powerinfer_proto::v1::control_service_server::ControlServiceServer;
use powerinfer_proto::v1::inference_service_server::InferenceServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

pub use self::config::{ConfigError, FileConfig, FlagConfig, Preload, ServeConfig};
use self::grpc::{ControlApi, InferenceApi, Shared};
pub use self::manager::{LoadSpec, ModelManager};
use crate::engine::SparsityMode;

/// How often idle models are checked against their keep-alive.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// Serves gRPC on `listener` until `shutdown` completes, then drains and returns.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_all(listener, None, config, shutdown).await
}

/// Serves gRPC on `listener` and, when given, the HTTP API on `http`, until `shutdown`
/// completes; then both stop taking requests, running streams drain, and it returns.
pub async fn serve_all(
    listener: TcpListener,
    http: Option<TcpListener>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServiceServer<InferenceApi>>()
        .await;
    health
        .set_serving::<ControlServiceServer<ControlApi>>()
        .await;
    let manager = Arc::new(
        ModelManager::new(
            config.models_dir.clone(),
            config.allow_paths,
            config.engine.clone(),
            config.python.clone(),
            health.clone(),
        )
        .with_keep_alive(config.keep_alive)
        .with_memory_budget(config.memory_budget),
    );
    // Idle models go when their keep-alive runs out.
    let reaper = tokio::spawn({
        let manager = manager.clone();
        async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                manager.reap().await;
            }
        }
    });
    let shared = Arc::new(Shared {
        manager: manager.clone(),
        metrics: Arc::default(),
        started: Instant::now(),
        draining: AtomicBool::new(false),
        preloading: AtomicBool::new(!config.preload.is_empty()),
        max_request_bytes: config.max_request_bytes,
        streams: limits::StreamLimits::new(config.max_streams_per_key),
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(powerinfer_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let local = listener.local_addr().ok();
    let keys = Arc::new(config.api_keys.clone());
    let check = {
        let keys = keys.clone();
        move |mut req: tonic::Request<()>| {
            let given = req.metadata().get("authorization").map(|v| v.as_bytes());
            let key = keys.identify(given);
            if keys.is_empty() || key.is_some() {
                if let Some(k) = key {
                    req.extensions_mut().insert(k);
                }
                Ok(req)
            } else {
                Err(tonic::Status::unauthenticated(
                    "a valid API key is required (metadata authorization: Bearer KEY)",
                ))
            }
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            InferenceServiceServer::new(InferenceApi(shared.clone()))
                .max_decoding_message_size(config.max_request_bytes),
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ControlServiceServer::new(ControlApi(shared.clone()))
                .max_decoding_message_size(config.max_request_bytes),
            check,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
    tracing::info!(listen = ?local, models_dir = %config.models_dir.display(), "serving");
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http_task = http.map(|l| {
        tracing::info!(http_listen = ?l.local_addr().ok(), "serving the HTTP API");
        let app = http::router(shared.clone(), keys.clone());
        tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async {
                    let _ = http_stop_rx.await;
                })
                .await
        })
    });

    // Preloads run once the server answers, so clients can watch them.
    let preloads = tokio::spawn({
        let (shared, list) = (shared.clone(), config.preload.clone());
        async move {
            preload(shared.manager.clone(), list).await;
            shared.preloading.store(false, Ordering::Release);
        }
    });

    let early = tokio::select! {
        () = shutdown => None,
        r = &mut server => Some(r),
    };
    if let Some(result) = early {
        preloads.abort();
        reaper.abort();
        if let Some(t) = &http_task {
            t.abort();
        }
        manager.clear();
        return result?.map_err(ServeError::from);
    }

    tracing::info!(deadline = ?config.drain_timeout, "shutting down: draining streams");
    shared.draining.store(true, Ordering::Release);
    preloads.abort();
    reaper.abort();
    manager.drain().await;
    // The server-wide statuses last: NOT_SERVING, then cleared, which ends their watches.
    let services = [
        "",
        <InferenceServiceServer<InferenceApi> as tonic::server::NamedService>::NAME,
        <ControlServiceServer<ControlApi> as tonic::server::NamedService>::NAME,
    ];
    let mut health = health;
    for s in services {
        health
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
    for s in services {
        health.clear_service_status(s).await;
    }
    let _ = stop_tx.send(());
    let _ = http_stop_tx.send(());
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    let result = match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(r) => r?.map_err(ServeError::from),
        Err(_) => {
            tracing::warn!("drain deadline passed; closing the remaining streams");
            server.abort();
            Ok(())
        }
    };
    let result = match http_task {
        None => result,
        Some(mut t) => match tokio::time::timeout_at(deadline, &mut t).await {
            Ok(r) => result.and(r?.map_err(ServeError::Http)),
            Err(_) => {
                tracing::warn!("drain deadline passed; closing the remaining HTTP streams");
                t.abort();
                result
            }
        },
    };
    manager.clear();
    tracing::info!("stopped");
    result
}

async fn preload(manager: Arc<ModelManager>, list: Vec<Preload>) {
    for p in list {
        let spec = LoadSpec {
            reference: p.model.clone(),
            ctx: p.ctx,
            sparsity: p.sparsity.as_deref().and_then(SparsityMode::parse),
            device: p.device.clone(),
            vram_budget: p.vram_budget,
        };
        match manager.load(spec).await {
            // Preloaded: it stays until unloaded, unless a request sets a keep-alive.
            Ok(_) => manager.touch(&p.model, Some(keep_alive::KeepAlive::Forever)),
            // A failed preload is reported (log, WatchModels, health) and the server
            // goes on serving whatever else it has.
            Err(e) => tracing::error!(model = %p.model, error = %e, "preload failed"),
        }
    }
}
