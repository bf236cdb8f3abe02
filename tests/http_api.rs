//! The OpenAI-compatible HTTP API on the default model, through clients we did not
//! write — OpenAI's own Python package (installed on first use into the build tree) and
//! curl — and a plain HTTP/1.1 client for the framing, the errors and concurrency:
//! greedy answers equal `powerinferd run`'s, streams equal their non-streamed answers,
//! errors carry OpenAI's shape and status, and a client that goes away frees its slot.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use powerinfer_daemon::store::{self, DEFAULT_MODEL};
use powerinfer_tests::server::{TestServer, test_config};
use powerinfer_tests::{default_model, powerinferd};
use serde_json::{Value, json};

/// The `openai` package the test runs (pinned, so a new release cannot change it).
const OPENAI: &str = "openai==3.60.0";
const PROMETHEUS_CLIENT: &str = "prometheus-client==0.26.0";
pub(crate) const QUESTION: &str = "What is the capital of France?";
pub(crate) const PROMPT: &str = "The capital of France is";

pub(crate) fn server() -> TestServer {
    default_model(); // fetched before the server looks for it
    let mut config = test_config(&store::default_models_dir());
    config.engine.max_sequences = 4;
    config.engine.max_queue = 32;
    config.engine.threads = 2;
    TestServer::start_with_http(config)
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: String,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection, read to its end (chunked bodies decoded).
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let rest = &raw[split + 4..];
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// A chunked body's bytes (a chunk may end inside a character).
fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = s
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size");
        let size = std::str::from_utf8(&s[..eol]).unwrap();
        let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if n == 0 {
            return out;
        }
        let data = &s[eol + 2..];
        out.extend_from_slice(&data[..n]);
        s = &data[n + 2..];
    }
}

pub(crate) fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    http(addr, "POST", path, Some(&body.to_string()))
}

/// The `data:` payloads of an SSE body, checking the framing: every event one `data:`
/// line and a blank line, `[DONE]` last.
fn sse(body: &str) -> Vec<Value> {
    assert!(body.ends_with("data: [DONE]\n\n"), "{body:?}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}"));
        assert!(!data.contains('\n'), "{e:?}");
        if i + 1 == events.len() {
            assert_eq!(data, "[DONE]");
        } else {
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    out
}

fn greedy_chat(stream: bool, max_tokens: u32) -> Value {
    json!({
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

pub(crate) fn run_chat(n: u32) -> String {
    let n = n.to_string();
    let r = powerinferd(&[
        "run",
        DEFAULT_MODEL,
        QUESTION,
        "--chat",
        "--temperature",
        "0",
        "-n",
        &n,
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    r.stdout.trim_end_matches('\n').to_owned()
}

fn run_text(prompt: &str, n: u32) -> String {
    let n = n.to_string();
    let r = powerinferd(&["run", DEFAULT_MODEL, prompt, "--temperature", "0", "-n", &n]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    r.stdout.trim_end_matches('\n').to_owned()
}

#[test]
fn chat_and_completions_over_http_equal_powerinferd_run() {
    let server = server();
    let addr = server.http_addr.unwrap();
    let want_chat = run_chat(24);

    let r = post(addr, "/v1/chat/completions", &greedy_chat(false, 24));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], DEFAULT_MODEL);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want_chat.as_str());
    // The answer ends before the limit.
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let n_tokens = v["usage"]["completion_tokens"].clone();
    assert!((1..24).contains(&n_tokens.as_u64().unwrap()), "{v}");
    let (p, c) = (
        &v["usage"]["prompt_tokens"],
        &v["usage"]["completion_tokens"],
    );
    assert_eq!(
        v["usage"]["total_tokens"].as_u64(),
        Some(p.as_u64().unwrap() + c.as_u64().unwrap())
    );
    assert_eq!(v["powerinfer"]["sparsity"], "dense");
    assert!(v["powerinfer"]["active_fraction"].as_f64().unwrap() > 0.99);

    // Streamed: a role chunk, content deltas, the finish, the usage, [DONE].
    let r = post(addr, "/v1/chat/completions", &greedy_chat(true, 24));
    assert_eq!(r.status, 200);
    assert!(
        r.headers.contains("content-type: text/event-stream"),
        "{}",
        r.headers
    );
    let chunks = sse(&r.body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want_chat);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["powerinfer"]["sparsity"], "dense");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], n_tokens);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    // Completions: a prompt string, and the same prompt as token ids.
    let want = run_text(PROMPT, 16);
    let body =
        json!({"model": DEFAULT_MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 16});
    let v = post(addr, "/v1/completions", &body).json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    let ids = powerinferd(&["tokenize", DEFAULT_MODEL, PROMPT, "--json"]);
    let ids: Value = serde_json::from_str(&ids.stdout).unwrap();
    let ids = ids["ids"].clone();
    let body = json!({"model": DEFAULT_MODEL, "prompt": ids, "temperature": 0, "max_tokens": 16});
    let v = post(addr, "/v1/completions", &body).json();
    assert_eq!(v["choices"][0]["text"], want.as_str());

    // Streamed completions and their legacy logprobs.
    let body = json!({"model": DEFAULT_MODEL, "prompt": PROMPT, "temperature": 0,
                      "max_tokens": 16, "stream": true, "logprobs": 2});
    let chunks = sse(&post(addr, "/v1/completions", &body).body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want);
    let lp = &chunks[0]["choices"][0]["logprobs"];
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0, "{lp}");
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2, "{lp}");
}

#[test]
fn http_errors_have_openai_s_shape_and_status() {
    let server = server();
    let addr = server.http_addr.unwrap();
    let error = |r: &Reply, status: u16| {
        assert_eq!(r.status, status, "{}", r.body);
        let v = r.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"].clone()
    };
    let chat = |extra: Value| {
        let mut b = greedy_chat(false, 4);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(addr, "/v1/chat/completions", &b)
    };
    let e = error(&chat(json!({"model": "no-such-model"})), 404);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(error(&chat(json!({"n": 2})), 400)["param"], "n");
    assert_eq!(
        error(&chat(json!({"temperature": "hot"})), 400)["param"],
        "temperature"
    );
    assert_eq!(
        error(&chat(json!({"temperature": 7})), 400)["param"],
        "temperature"
    );
    assert_eq!(
        error(&chat(json!({"messages": []})), 400)["param"],
        "messages"
    );
    assert_eq!(
        error(
            &chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400
        )["param"],
        "messages"
    );
    assert_eq!(
        error(&chat(json!({"top_logprobs": 3})), 400)["param"],
        "top_logprobs"
    );
    assert_eq!(
        error(&chat(json!({"sparsity": "most"})), 400)["param"],
        "sparsity"
    );
    assert_eq!(
        error(&chat(json!({"tools": [{"type": "function"}]})), 400)["param"],
        "tools"
    );
    let e = error(&chat(json!({"sparsity": "predictor"})), 400);
    assert!(e["message"].as_str().unwrap().contains("predictor"), "{e}");
    let r = http(addr, "POST", "/v1/chat/completions", Some("{not json"));
    assert_eq!(error(&r, 400)["param"], "body");
    let r = post(addr, "/v1/completions", &json!({"model": DEFAULT_MODEL}));
    assert_eq!(error(&r, 400)["param"], "prompt");
    // Longer than the test server's 255-token prompt limit.
    let long = "word ".repeat(400);
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": long, "max_tokens": 1}),
    );
    assert_eq!(error(&r, 413)["code"], "context_length_exceeded");
    assert_eq!(
        error(&http(addr, "GET", "/v2/nothing", None), 404)["code"],
        "unknown_url"
    );
    let e = error(&http(addr, "GET", "/v1/models/no-such-model", None), 404);
    assert_eq!(e["code"], "model_not_found");

    // Models and health.
    let v = http(addr, "GET", "/v1/models", None).json();
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == DEFAULT_MODEL),
        "{v}"
    );
    let m = http(addr, "GET", &format!("/v1/models/{DEFAULT_MODEL}"), None).json();
    assert_eq!(m["object"], "model");
    assert_eq!(
        m["powerinfer"]["loaded"], true,
        "the chat requests loaded it"
    );
    assert_eq!(http(addr, "GET", "/health", None).status, 200);
    let h = http(addr, "GET", &format!("/health?model={DEFAULT_MODEL}"), None);
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("ok")));
    assert_eq!(http(addr, "GET", "/health?model=other", None).status, 404);
    server.shutdown().unwrap();
}

#[test]
fn sixteen_concurrent_http_streams_each_equal_their_answer_alone() {
    let server = server();
    let addr = server.http_addr.unwrap();
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "1, 2, 3,",
        "def main():",
    ];
    let body = |p: &str, stream: bool| {
        json!({"model": DEFAULT_MODEL, "prompt": p, "temperature": 0, "max_tokens": 12,
               "stream": stream})
    };
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            post(addr, "/v1/completions", &body(p, false)).json()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let b = body(prompts[i % 4], true);
            std::thread::spawn(move || {
                let chunks = sse(&post(addr, "/v1/completions", &b).body);
                chunks
                    .iter()
                    .filter_map(|c| c["choices"][0]["text"].as_str())
                    .collect::<String>()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[i % 4], "stream {i}");
    }
}

/// Requests running on the model, from the gRPC Status.
fn running(server: &TestServer) -> u32 {
    let client = server.client();
    let s = server.block_on(client.status()).unwrap();
    s.models
        .iter()
        .map(|m| m.active_requests + m.queued_requests)
        .sum()
}

#[test]
fn a_client_that_goes_away_mid_stream_frees_its_sequence() {
    let server = server();
    let addr = server.http_addr.unwrap();
    let body = json!({"model": DEFAULT_MODEL, "prompt": "Once upon a time", "temperature": 0,
                      "max_tokens": 200, "stream": true})
    .to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read until a few tokens have come, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(running(&server) >= 1);
    drop(s);
    let t = Instant::now();
    while running(&server) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the sequence was not freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn curl_streams_server_sent_events() {
    let server = server();
    let addr = server.http_addr.unwrap();
    let body = greedy_chat(true, 8).to_string();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ])
        .arg(format!("http://{addr}/v1/chat/completions"))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let chunks = sse(&text);
    let got: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(got, run_chat(8));
}

/// OpenAI's Python package, installed once into the build tree.
fn openai_python() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| python_package(OPENAI, "openai"))
}

/// The Prometheus project's own Python client (for its text-format parser).
fn prometheus_python() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| python_package(PROMETHEUS_CLIENT, "prometheus_client"))
}

/// `spec` pip-installed into a directory of its own in the build tree (once), for
/// PYTHONPATH.
pub(crate) fn python_package(spec: &str, module: &str) -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(spec.replace("==", "-"));
    if !dir.join(module).is_dir() {
        let tmp = base.join(format!("{module}.tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&tmp)
            .arg(spec)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "pip install {spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).unwrap();
    }
    dir
}

#[test]
fn the_openai_python_package_works_unchanged() {
    let server = server();
    let addr = server.http_addr.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{addr}/v1"))
        .arg(DEFAULT_MODEL)
        .arg(QUESTION)
        .arg(PROMPT)
        .env("PYTHONPATH", openai_python())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = run_chat(24);
    assert_eq!(v["chat"], want.as_str());
    assert_eq!(v["chat_finish"], "stop");
    assert_eq!(v["chat_stream"], want.as_str());
    assert_eq!(v["chat_stream_usage"], v["chat_tokens"]);
    assert_eq!(v["completion"], run_text(PROMPT, 16).as_str());
    assert!(
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == DEFAULT_MODEL),
        "{v}"
    );
    // Greedy: each chosen token is the first of its alternatives.
    let lp = v["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 4);
    for t in lp {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0, "{t}");
        assert_eq!(t["top"].as_array().unwrap().len(), 3, "{t}");
        assert_eq!(t["top"][0], t["token"], "{t}");
    }
    assert_eq!(v["unknown_model"], "NotFoundError");
    assert_eq!(v["bad_field"], "BadRequestError");
    assert_eq!(v["too_long"], "APIStatusError 413");
}

#[test]
fn a_full_queue_is_429_with_retry_after() {
    default_model();
    let mut config = test_config(&store::default_models_dir());
    config.engine.max_sequences = 1;
    config.engine.max_queue = 1;
    let server = TestServer::start_with_http(config);
    let addr = server.http_addr.unwrap();
    let body = json!({"model": DEFAULT_MODEL, "prompt": "Once upon a time", "temperature": 0,
                      "max_tokens": 48});
    // Loaded first, so the burst meets a running model.
    assert_eq!(
        post(
            addr,
            "/v1/completions",
            &json!({"model": DEFAULT_MODEL,
        "prompt": "Hi", "max_tokens": 1})
        )
        .status,
        200
    );
    let replies: Vec<Reply> = (0..6)
        .map(|_| {
            let b = body.clone();
            std::thread::spawn(move || post(addr, "/v1/completions", &b))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        !full.is_empty(),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
    for r in full {
        assert!(r.headers.contains("retry-after: 1"), "{}", r.headers);
        assert_eq!(r.json()["error"]["code"], "queue_full");
    }
}

#[test]
fn with_api_keys_grpc_and_http_refuse_requests_without_one() {
    default_model();
    let mut config = test_config(&store::default_models_dir());
    config.api_keys =
        powerinfer_daemon::server::auth::ApiKeys::new(["first-key-0001", "second-key-0002"])
            .unwrap();
    let server = TestServer::start_with_http(config);
    let addr = server.http_addr.unwrap();
    let models = |auth: Option<&str>| {
        let mut s = TcpStream::connect(addr).unwrap();
        let header = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        write!(
            s,
            "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{header}\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    };
    for bad in [None, Some("Bearer wrong-key-0000"), Some("first-key-0001")] {
        let r = models(bad);
        assert!(r.starts_with("HTTP/1.1 401"), "{bad:?}: {r}");
        assert!(r.contains("invalid_api_key"), "{r}");
        assert!(
            r.to_ascii_lowercase().contains("www-authenticate: bearer"),
            "{r}"
        );
    }
    assert!(models(Some("Bearer second-key-0002")).starts_with("HTTP/1.1 200"));
    assert_eq!(
        http(addr, "GET", "/health", None).status,
        200,
        "health stays open"
    );

    // gRPC: UNAUTHENTICATED without the key, served with it; health stays open.
    let client = server.client();
    let e = server.block_on(client.status()).unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    let keyed = server.client().with_api_key("first-key-0001").unwrap();
    server.block_on(keyed.status()).unwrap();
    let wrong = server.client().with_api_key("first-key-0002").unwrap();
    assert!(server.block_on(wrong.list()).is_err());
    server.block_on(client.health("")).unwrap();
    // pictl sends the key from --api-key or POWERINFER_API_KEY.
    let out = server.pictl(&["status"]);
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(out.stderr.contains("unauthenticated"), "{}", out.stderr);
    let out = server.pictl(&["--api-key", "second-key-0002", "status"]);
    assert_eq!(out.status, 0, "{}", out.stderr);

    // OpenAI's client: a wrong key is its AuthenticationError, the right one works.
    let script = "import sys, openai\n\
        base, model = sys.argv[1], sys.argv[2]\n\
        try:\n    openai.OpenAI(base_url=base, api_key='wrong-key-0000').models.list()\n    print('no error')\n\
        except openai.AuthenticationError:\n    print('AuthenticationError')\n\
        ids = [m.id for m in openai.OpenAI(base_url=base, api_key='first-key-0001').models.list()]\n\
        print(model in ids)\n";
    let out = Command::new("python3")
        .args(["-c", script, &format!("http://{addr}/v1"), DEFAULT_MODEL])
        .env("PYTHONPATH", openai_python())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "AuthenticationError\nTrue\n"
    );
}

#[test]
fn metrics_parse_with_prometheus_s_own_parser_and_match_the_requests() {
    let server = server();
    let addr = server.http_addr.unwrap();
    let mut generated = 0;
    for _ in 0..2 {
        let v = post(addr, "/v1/chat/completions", &greedy_chat(false, 8)).json();
        generated += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(
        post(addr, "/v1/chat/completions", &greedy_chat(true, 8)).status,
        200
    );
    let mut bad = greedy_chat(false, 8);
    bad["model"] = json!("no-such-model");
    assert_eq!(post(addr, "/v1/chat/completions", &bad).status, 404);
    let client = server.client();
    let g = server
        .block_on(
            client.generate_all(powerinfer_client::proto::GenerateRequest {
                max_tokens: 5,
                sampling: Some(powerinfer_client::greedy()),
                ..powerinfer_client::text_request(DEFAULT_MODEL, PROMPT)
            }),
        )
        .unwrap();
    assert_eq!(g.tokens.len(), 5);

    let r = http(addr, "GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.headers
    );
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/prometheus_parse.py"))
        .env("PYTHONPATH", prometheus_python())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(r.body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.body
    );
    let samples: Vec<(String, String, Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    let get = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|(_, n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
            .map(|s| s.3)
            .sum()
    };
    let m = DEFAULT_MODEL;
    let ok = |api| {
        get(
            "powerinfer_requests_total",
            &[("model", m), ("api", api), ("status", "ok")],
        )
    };
    assert_eq!(ok("http"), 3.0, "{}", r.body);
    assert_eq!(ok("grpc"), 1.0);
    let not_found = [("model", "no-such-model"), ("status", "not_found")];
    assert_eq!(get("powerinfer_requests_total", &not_found), 1.0);
    let http_generated = get(
        "powerinfer_generated_tokens_total",
        &[("model", m), ("api", "http")],
    );
    assert!(
        http_generated > generated as f64,
        "{http_generated}: {generated} and the stream's"
    );
    let grpc = [("model", m), ("api", "grpc")];
    assert_eq!(get("powerinfer_generated_tokens_total", &grpc), 5.0);
    let http_api = [("model", m), ("api", "http")];
    assert_eq!(
        get("powerinfer_time_to_first_token_seconds_count", &http_api),
        3.0
    );
    assert_eq!(
        get("powerinfer_inter_token_latency_seconds_count", &grpc),
        4.0
    );
    assert_eq!(get("powerinfer_running_requests", &[("model", m)]), 0.0);
    assert_eq!(get("powerinfer_kv_cache_tokens", &[("model", m)]), 0.0);
    assert_eq!(get("powerinfer_kv_cache_usage_ratio", &[("model", m)]), 0.0);
    assert!(get("powerinfer_model_memory_bytes", &[("model", m)]) > 98e6);
    assert!(get("powerinfer_model_load_seconds", &[("model", m)]) > 0.0);
    assert!(get("powerinfer_active_neuron_fraction", &[("model", m)]) > 0.99);
    let layers = samples
        .iter()
        .filter(|s| s.1 == "powerinfer_layer_active_neuron_fraction")
        .count();
    assert_eq!(layers, 30);
    assert!(samples.iter().any(|s| s.0 == "histogram"));
}
