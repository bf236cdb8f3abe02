//! A powerinferd server in-process on 127.0.0.1:0 for the end-to-end tests, with the real
//! client and `pictl`'s command line pointed at it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use powerinfer_client::Client;
use powerinfer_daemon::engine::EngineOptions;
use powerinfer_daemon::server::{ServeConfig, ServeError, serve_all};

use crate::CliOutput;

/// A configuration for tests: the given models directory, small limits, one thread per
/// model (the CI machine has two cores).
pub fn test_config(models_dir: &Path) -> ServeConfig {
    ServeConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        http_listen: None,
        api_keys: Default::default(),
        keep_alive: Default::default(),
        memory_budget: None,
        max_request_bytes: powerinfer_daemon::server::config::DEFAULT_MAX_REQUEST_BYTES,
        max_streams_per_key: 0,
        models_dir: models_dir.to_owned(),
        allow_paths: false,
        engine: EngineOptions {
            n_ctx: 256,
            max_sequences: 4,
            max_queue: 4,
            max_prompt_tokens: 255,
            threads: 1,
            ..EngineOptions::default()
        },
        drain_timeout: Duration::from_secs(20),
        otlp_endpoint: None,
        preload: Vec::new(),
        python: "python3".into(),
    }
}

/// The server, its runtime, and the switch that shuts it down.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The HTTP API's address, when [`TestServer::start_with_http`] started it.
    pub http_addr: Option<SocketAddr>,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    pub fn start(config: ServeConfig) -> Self {
        Self::start_inner(config, false)
    }

    /// [`TestServer::start`] with the HTTP API on another port of 127.0.0.1.
    pub fn start_with_http(config: ServeConfig) -> Self {
        Self::start_inner(config, true)
    }

    fn start_inner(config: ServeConfig, with_http: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let http = with_http.then(|| {
            runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("bind 127.0.0.1:0")
        });
        let http_addr = http
            .as_ref()
            .map(|l| l.local_addr().expect("bound address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(serve_all(listener, http, config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            http_addr,
            runtime,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Runs `f` on the server's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    pub fn client(&self) -> Client {
        self.block_on(Client::connect(&self.addr.to_string()))
            .expect("connect to the test server")
    }

    /// Runs `pictl --addr ADDR ARGS...` in-process with `stdin` as its input.
    pub fn pictl_with_input(&self, args: &[&str], stdin: &str) -> CliOutput {
        let addr = self.addr.to_string();
        pictl(&["--addr", &addr], args, stdin)
    }

    pub fn pictl(&self, args: &[&str]) -> CliOutput {
        self.pictl_with_input(args, "")
    }

    /// Starts the shutdown (as SIGTERM does) and returns what `serve` returned.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        self.runtime.block_on(task).expect("serve did not panic")
    }

    /// Signals shutdown without waiting; returns the task to wait on.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<Result<(), ServeError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("running")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Runs `pictl GLOBAL... ARGS...` in-process.
pub fn pictl(global: &[&str], args: &[&str], stdin: &str) -> CliOutput {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut input = std::io::Cursor::new(stdin.as_bytes().to_vec());
    let argv = std::iter::once("pictl")
        .chain(global.iter().copied())
        .chain(args.iter().copied());
    let status = powerinfer_client::cli::run(argv, &mut input, &mut out, &mut err);
    CliOutput {
        status,
        stdout: String::from_utf8(out).expect("stdout is UTF-8"),
        stderr: String::from_utf8(err).expect("stderr is UTF-8"),
    }
}
