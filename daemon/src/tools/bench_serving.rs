//! Serving benchmarks.
//!
//! - `pipeline`: the actor pipeline's own cost per decoded token at batch 1: the direct
//!   generation loop (forward pass and sampler on one thread, as `powerinferd run`) against
//!   the same greedy generation through the engine's actors in-process, through the gRPC
//!   API over loopback and through the HTTP API (a streamed completion, Server-Sent
//!   Events). Repetitions are interleaved so drifting machine load hits every path alike.
//! - `server_load`: concurrent streams through the gRPC API and through the HTTP API over
//!   loopback, alternated: aggregate tokens/s, time to first token and inter-token latency
//!   percentiles, as a client sees them.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use powerinfer_proto::v1;
use powerinfer_proto::v1::inference_service_client::InferenceServiceClient;
use tokio_stream::StreamExt;

use crate::engine::{Engine, EngineOptions, GenerateSpec, Input, StreamItem};
use crate::generation::sampler::SamplerConfig;
use crate::generation::{GenParams, LoadedModel, Session, SessionOptions};
use crate::server::{ServeConfig, serve_all};

/// The prompt of the pipeline benchmark (greedy; SmolLM2 writes on for hundreds of tokens).
pub const PIPELINE_PROMPT: &str = "Once upon a time, in a small village by the sea,";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(String);

fn fail(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError(format!("{what}: {e}"))
}

/// Seconds per decoded token of each path, one entry per measured repetition.
#[derive(Clone, Debug, Default)]
pub struct PipelineReport {
    /// Tokens generated per repetition (the same on every path: greedy).
    pub tokens: usize,
    pub direct: Vec<f64>,
    pub engine: Vec<f64>,
    pub grpc: Vec<f64>,
    pub http: Vec<f64>,
}

pub fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `q` quantile (0..=1) by the nearest rank.
pub fn quantile(x: &[f64], q: f64) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail("runtime", e))
}

/// A server on 127.0.0.1:0 (gRPC, and HTTP on another port) serving the directory of
/// `path` (paths allowed): a gRPC client, the HTTP address, the stop switch, the task.
async fn local_server(
    path: &Path,
    engine: EngineOptions,
) -> Result<
    (
        InferenceServiceClient<tonic::transport::Channel>,
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    BenchError,
> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail("bind 127.0.0.1:0", e))?;
    let addr = listener.local_addr().map_err(|e| fail("bind", e))?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail("bind 127.0.0.1:0", e))?;
    let http_addr = http.local_addr().map_err(|e| fail("bind", e))?;
    let config = ServeConfig {
        listen: addr,
        http_listen: None,
        api_keys: Default::default(),
        keep_alive: Default::default(),
        memory_budget: None,
        max_request_bytes: crate::server::config::DEFAULT_MAX_REQUEST_BYTES,
        max_streams_per_key: 0,
        models_dir: path.parent().unwrap_or_else(|| Path::new(".")).to_owned(),
        allow_paths: true,
        engine,
        drain_timeout: Duration::from_secs(5),
        otlp_endpoint: None,
        preload: Vec::new(),
        python: "python3".into(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) = serve_all(listener, Some(http), config, async {
            let _ = stopped.await;
        })
        .await
        {
            eprintln!("error: bench server: {e}");
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| fail("endpoint", e))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| fail("connect", e))?;
    let mut control = v1::control_service_client::ControlServiceClient::new(channel.clone());
    control
        .load_model(v1::LoadModelRequest {
            model: path.display().to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| fail("load", e.message()))?;
    Ok((InferenceServiceClient::new(channel), http_addr, stop, task))
}

fn model_name(path: &Path) -> String {
    path.file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}

/// Client-side timings of one streamed generation.
struct StreamTimes {
    /// Arrival time of each token, from the request's start.
    arrivals: Vec<Duration>,
}

impl StreamTimes {
    /// Seconds per token after the first.
    fn per_decode_token(&self) -> Option<f64> {
        let (first, last) = (self.arrivals.first()?, self.arrivals.last()?);
        let n = self.arrivals.len().checked_sub(1).filter(|&n| n > 0)?;
        Some((*last - *first).as_secs_f64() / n as f64)
    }
}

async fn grpc_stream(
    mut client: InferenceServiceClient<tonic::transport::Channel>,
    request: v1::GenerateRequest,
) -> Result<StreamTimes, BenchError> {
    let start = Instant::now();
    let mut stream = client
        .generate(request)
        .await
        .map_err(|e| fail("generate", e.message()))?
        .into_inner();
    let mut arrivals = Vec::new();
    while let Some(item) = stream.next().await {
        match item.map_err(|e| fail("generate", e.message()))?.event {
            Some(v1::generate_response::Event::Token(_)) => arrivals.push(start.elapsed()),
            Some(v1::generate_response::Event::Final(_)) => break,
            None => {}
        }
    }
    Ok(StreamTimes { arrivals })
}

/// One streamed `POST /v1/completions` over a fresh connection (as most HTTP clients make
/// one per stream): the arrival time of each event that carries a token. Plain HTTP/1.1 on
/// a socket, so the client adds no library of its own to the figures.
async fn http_stream(addr: SocketAddr, body: String) -> Result<StreamTimes, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| fail("connect", e))?;
    s.set_nodelay(true).map_err(|e| fail("connect", e))?;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| fail("HTTP request", e))?;
    let mut arrivals = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let token_event = b"\"finish_reason\":null";
    loop {
        let n = s.read(&mut buf).await.map_err(|e| fail("HTTP stream", e))?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        // Each complete event ends with a blank line; the chunk framing between events
        // does not contain one.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            if event.windows(token_event.len()).any(|w| w == token_event) {
                arrivals.push(start.elapsed());
            }
            if event.windows(12).any(|w| w == b"data: [DONE]") {
                return Ok(StreamTimes { arrivals });
            }
            if event.windows(9).any(|w| w == b"\"error\":{") {
                return Err(BenchError(format!(
                    "HTTP stream: {}",
                    String::from_utf8_lossy(&event)
                )));
            }
        }
    }
    if pending.starts_with(b"HTTP/1.1 200") || !arrivals.is_empty() {
        Err(BenchError("HTTP stream: ended before [DONE]".into()))
    } else {
        Err(BenchError(format!(
            "HTTP stream: {}",
            String::from_utf8_lossy(&pending)
        )))
    }
}

/// Runs the pipeline benchmark: `repetitions` measured rounds (after one warm-up) of
/// `n_gen` greedy tokens on each path. With a model placed on a device (`loaded.device`,
/// opened from `device` = `(spec, budget)`), the engine and the server place theirs on a
/// device of the same spec, and the direct loop drives the loaded one.
pub fn pipeline(
    path: &Path,
    loaded: &LoadedModel,
    device: (&str, u64),
    threads: usize,
    n_gen: usize,
    repetitions: usize,
) -> Result<PipelineReport, BenchError> {
    let prompt = loaded.tokenizer.encode(PIPELINE_PROMPT, true, true);
    let n_ctx = match &loaded.device {
        Some(d) => d.sizing.n_ctx,
        None => (prompt.len() + n_gen + 1).next_multiple_of(256),
    };
    if prompt.len() + n_gen >= n_ctx {
        return Err(BenchError(format!(
            "{} prompt and {n_gen} generated tokens do not fit a context of {n_ctx}",
            prompt.len()
        )));
    }
    let greedy = SamplerConfig::greedy();
    let opts = EngineOptions {
        n_ctx,
        max_sequences: 1,
        max_prompt_tokens: n_ctx - 1,
        threads,
        device: device.0.to_owned(),
        vram_budget: device.1,
        ..EngineOptions::default()
    };
    let rt = runtime()?;
    let engine = rt.block_on(async {
        let p = path.to_owned();
        let o = opts.clone();
        tokio::task::spawn_blocking(move || Engine::load("bench", &p, o))
            .await
            .map_err(|e| fail("load", e))?
            .map_err(|e| fail("load", e))
    })?;
    let (client, http_addr, stop, server) = rt.block_on(local_server(path, opts))?;
    let mut session = Session::new(loaded, SessionOptions::new(n_ctx, threads))
        .map_err(|e| fail("session", e))?;
    let params = GenParams {
        max_tokens: n_gen,
        sampler: greedy.clone(),
        stop: Vec::new(),
    };
    let spec = GenerateSpec {
        max_tokens: Some(n_gen),
        sampling: greedy.clone(),
        ..GenerateSpec::new(Input::Tokens(prompt.clone()))
    };
    let request = v1::GenerateRequest {
        model: model_name(path),
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: prompt.iter().map(|t| t.0).collect(),
        })),
        max_tokens: n_gen as u32,
        sampling: Some(v1::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let http_body = serde_json::json!({
        "model": model_name(path),
        "prompt": prompt.iter().map(|t| t.0).collect::<Vec<_>>(),
        "max_tokens": n_gen,
        "temperature": 0,
        "stream": true,
    })
    .to_string();
    let mut report = PipelineReport::default();
    for rep in 0..=repetitions {
        let summary = session
            .generate(&prompt, &params, |_| ControlFlow::Continue(()))
            .map_err(|e| fail("direct generation", e))?;
        let direct = summary.decode_time.as_secs_f64()
            / summary.generated.len().saturating_sub(1).max(1) as f64;

        let engine_times = rt.block_on(async {
            let start = Instant::now();
            let mut stream = engine
                .generate(spec.clone())
                .await
                .map_err(|e| fail("engine", e))?;
            let mut arrivals = Vec::new();
            while let Some(item) = stream.next().await {
                match item.map_err(|e| fail("engine", e))? {
                    StreamItem::Token(_) => arrivals.push(start.elapsed()),
                    StreamItem::Final(_) => break,
                }
            }
            Ok::<_, BenchError>(StreamTimes { arrivals })
        })?;
        let grpc_times = rt.block_on(grpc_stream(client.clone(), request.clone()))?;
        let http_times = rt.block_on(http_stream(http_addr, http_body.clone()))?;
        if rep == 0 {
            report.tokens = summary.generated.len();
            if engine_times.arrivals.len() != report.tokens
                || grpc_times.arrivals.len() != report.tokens
            {
                return Err(BenchError(format!(
                    "the paths generated {}, {} and {} tokens; greedy generation should agree",
                    report.tokens,
                    engine_times.arrivals.len(),
                    grpc_times.arrivals.len()
                )));
            }
            // HTTP sends no event for a token that completes no character.
            if http_times.arrivals.len() > report.tokens
                || http_times.arrivals.len() + 8 < report.tokens
            {
                return Err(BenchError(format!(
                    "HTTP streamed {} tokens of {}",
                    http_times.arrivals.len(),
                    report.tokens
                )));
            }
            continue; // warm-up
        }
        report.direct.push(direct);
        report
            .engine
            .push(engine_times.per_decode_token().unwrap_or(f64::NAN));
        report
            .grpc
            .push(grpc_times.per_decode_token().unwrap_or(f64::NAN));
        report
            .http
            .push(http_times.per_decode_token().unwrap_or(f64::NAN));
    }
    let _ = stop.send(());
    drop(engine);
    let _ = rt.block_on(server);
    Ok(report)
}

/// What `streams` concurrent generations saw.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// "gRPC" or "HTTP".
    pub api: &'static str,
    pub streams: usize,
    pub tokens: usize,
    pub wall: Duration,
    pub ttft_p50: Duration,
    pub itl_p50: Duration,
    pub itl_p99: Duration,
}

impl LoadReport {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs `streams` concurrent generations of `n_gen` tokens (temperature 0.8, a seed per
/// stream, a prompt per stream) for each entry of `streams`, after one warm-up stream,
/// through gRPC and then through HTTP for each count.
pub fn server_load(
    path: &Path,
    threads: usize,
    streams: &[usize],
    n_gen: usize,
) -> Result<Vec<LoadReport>, BenchError> {
    let max = streams.iter().copied().max().unwrap_or(1).max(1);
    let opts = EngineOptions {
        n_ctx: (n_gen + 64).next_multiple_of(256),
        max_sequences: max,
        max_queue: max,
        threads,
        ..EngineOptions::default()
    };
    let rt = runtime()?;
    rt.block_on(async {
        let (client, http_addr, stop, server) = local_server(path, opts).await?;
        let request = |i: usize| v1::GenerateRequest {
            model: model_name(path),
            input: Some(v1::generate_request::Input::Prompt(format!(
                "Story number {i}. Once upon a time,"
            ))),
            max_tokens: n_gen as u32,
            sampling: Some(v1::SamplingParams {
                temperature: Some(0.8),
                seed: Some(1000 + i as u64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let http_body = |i: usize| {
            serde_json::json!({
                "model": model_name(path),
                "prompt": format!("Story number {i}. Once upon a time,"),
                "max_tokens": n_gen,
                "temperature": 0.8,
                "seed": 1000 + i as u64,
                "stream": true,
            })
            .to_string()
        };
        grpc_stream(client.clone(), request(0)).await?; // warm-up
        http_stream(http_addr, http_body(0)).await?;
        let mut reports = Vec::new();
        for (n, api) in streams.iter().flat_map(|&n| [(n, "gRPC"), (n, "HTTP")]) {
            let start = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|i| match api {
                    "gRPC" => tokio::spawn(grpc_stream(client.clone(), request(i))),
                    _ => tokio::spawn(http_stream(http_addr, http_body(i))),
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await.map_err(|e| fail("stream task", e))??);
            }
            let wall = start.elapsed();
            let tokens = all.iter().map(|s| s.arrivals.len()).sum();
            let ttft: Vec<f64> = all
                .iter()
                .filter_map(|s| s.arrivals.first().map(Duration::as_secs_f64))
                .collect();
            let itl: Vec<f64> = all
                .iter()
                .flat_map(|s| s.arrivals.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
                .collect();
            let secs = |x: f64| Duration::from_secs_f64(if x.is_finite() { x } else { 0.0 });
            reports.push(LoadReport {
                api,
                streams: n,
                tokens,
                wall,
                ttft_p50: secs(median(&ttft)),
                itl_p50: secs(quantile(&itl, 0.5)),
                itl_p99: secs(quantile(&itl, 0.99)),
            });
        }
        let _ = stop.send(());
        let _ = server.await;
        Ok(reports)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let x = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&x), 3.0);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
        assert_eq!(quantile(&x, 0.5), 3.0);
        assert_eq!(quantile(&x, 0.99), 5.0);
        assert_eq!(quantile(&x, 0.0), 1.0);
        let many: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&many, 0.99), 99.0);
    }
}
