//! `powerinferd serve`: the daemon. Configuration from flags over `POWERINFER_*` over the
//! TOML file over defaults; runs until SIGINT or SIGTERM, then drains and exits 0.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::exit;
use crate::server::telemetry::{Logs, Telemetry};
use crate::server::{self, FlagConfig, ServeConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// gRPC address to listen on [default: 127.0.0.1:50051].
    #[arg(long)]
    pub listen: Option<String>,
    /// OpenAI-compatible HTTP API address, or "off" [default: 127.0.0.1:8080].
    #[arg(long)]
    pub http_listen: Option<String>,
    /// An API key clients must send (repeatable; also POWERINFER_API_KEY). Needed to
    /// listen beyond loopback.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (also POWERINFER_API_KEY_FILE).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Serve a non-loopback address without API keys.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// How long idle models stay loaded: 30s, 5m, 1h, 0 or -1 (forever) [default: 5m].
    #[arg(long, allow_hyphen_values = true)]
    pub keep_alive: Option<String>,
    /// Host memory the loaded models may take together (12GiB, 8GB, bytes, off); idle
    /// models are unloaded, least recently used first, to make room [default: off].
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Models directory [default: $POWERINFER_HOME/models].
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Configuration file [default: /etc/powerinfer/powerinferd.toml, if it exists].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Let clients name model files by path (refused by default).
    #[arg(long)]
    pub allow_paths: bool,
    /// Compute threads per model [default: all CPUs].
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Context size per sequence, in tokens [default: 2048].
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Sequences decoded together per model [default: 8].
    #[arg(long)]
    pub max_sequences: Option<usize>,
    /// Default sparsity mode of loaded models (dense, predictor, gate); a load request
    /// or a preload entry may choose another, a generate request too.
    #[arg(long)]
    pub sparsity: Option<String>,
    /// Load this model at start (repeatable; adds to the configuration file's list).
    #[arg(long)]
    pub preload: Vec<String>,
    /// Export traces over OTLP/gRPC to this endpoint (also OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

impl ServeArgs {
    fn flags(&self) -> FlagConfig {
        FlagConfig {
            listen: self.listen.clone(),
            http_listen: self.http_listen.clone(),
            api_keys: self.api_keys.clone(),
            api_key_file: self.api_key_file.clone(),
            insecure_no_auth: self.insecure_no_auth,
            keep_alive: self.keep_alive.clone(),
            max_memory: self.max_memory.clone(),
            models_dir: self.models_dir.clone(),
            config: self.config.clone(),
            allow_paths: self.allow_paths,
            threads: self.threads,
            ctx: self.ctx,
            max_sequences: self.max_sequences,
            sparsity: self.sparsity.clone(),
            preload: self.preload.clone(),
            otlp_endpoint: self.otlp_endpoint.clone(),
        }
    }
}

pub fn run(a: &ServeArgs, err: &mut dyn Write) -> u8 {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let config = match ServeConfig::resolve(&a.flags(), &env) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "error: configuration: {e}");
            return exit::BAD_INPUT;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pi-io")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "error: cannot start the runtime: {e}");
            return exit::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = match Telemetry::install(config.otlp_endpoint.as_deref(), Logs::Stderr) {
            Ok(t) => t,
            Err(e) => {
                let _ = writeln!(err, "error: telemetry: {e}");
                return exit::BAD_INPUT;
            }
        };
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                let _ = writeln!(err, "error: cannot listen on {}: {e}", config.listen);
                return exit::FAILURE;
            }
        };
        if let Ok(addr) = listener.local_addr() {
            let _ = writeln!(
                err,
                "powerinferd {} listening on {addr}",
                env!("CARGO_PKG_VERSION")
            );
        }
        let http = match config.http_listen {
            None => None,
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    if let Ok(a) = l.local_addr() {
                        let _ = writeln!(err, "OpenAI-compatible HTTP API on http://{a}/v1");
                    }
                    Some(l)
                }
                Err(e) => {
                    let _ = writeln!(
                        err,
                        "error: cannot listen on {addr} for HTTP: {e} (--http-listen off \
                         turns the HTTP API off)"
                    );
                    return exit::FAILURE;
                }
            },
        };
        let result = server::serve_all(listener, http, config, shutdown_signal()).await;
        // Traces are flushed last, after the engines have stopped.
        telemetry.shutdown();
        match result {
            Ok(()) => exit::OK,
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                exit::FAILURE
            }
        }
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
