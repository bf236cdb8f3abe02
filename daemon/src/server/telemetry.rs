//! Logs and traces. `tracing` everywhere; log lines to stderr (filtered by `RUST_LOG`,
//! `info` by default) and, when an endpoint is configured, spans exported over OTLP/gRPC
//! under the service name `powerinferd`.
//!
//! The span tree of one request: `generate` (the `gen_ai.*` attributes: model, tokens in
//! and out, finish reason) → `queue`, `prefill`, `decode` → sampled `step` spans → the
//! actor stages `cold.forward` and `sample`.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub const SERVICE_NAME: &str = "powerinferd";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Whether log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logs {
    Stderr,
    Off,
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the process-wide subscriber. Must run inside a tokio runtime when an
    /// endpoint is given (the OTLP client is a tonic channel on that runtime).
    pub fn install(otlp_endpoint: Option<&str>, logs: Logs) -> Result<Self, TelemetryError> {
        let provider = otlp_endpoint.map(tracer_provider).transpose()?;
        let otel = provider.as_ref().map(|p| {
            // Our spans only: the transport's own spans would swamp a trace.
            let targets = Targets::new().with_target("powerinfer_daemon", LevelFilter::INFO);
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer(SERVICE_NAME))
                .with_filter(targets)
        });
        let fmt = (logs == Logs::Stderr).then(|| {
            let filter =
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter)
        });
        tracing_subscriber::registry()
            .with(otel)
            .with(fmt)
            .try_init()
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        Ok(Self { provider })
    }

    /// Exports the finished spans now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans");
        }
    }

    /// Flushes and stops the exporter (last, after the engines are dropped).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing spans: {e}");
        }
    }
}

fn tracer_provider(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
    let resource = Resource::builder()
        .with_service_name(SERVICE_NAME)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
