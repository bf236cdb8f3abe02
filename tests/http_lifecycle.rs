//! Over the HTTP API on the default model: models unloaded when idle past their
//! keep_alive, `/health` while loading, the status page in a real browser (headless
//! Chromium through Selenium), and the limits refused naming themselves on both APIs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use powerinfer_daemon::store::{self, DEFAULT_MODEL};
use powerinfer_tests::default_model;
use powerinfer_tests::server::{TestServer, test_config};
use serde_json::{Value, json};

use super::http_api::{PROMPT, QUESTION, http, post, python_package, run_chat, server};

const SELENIUM: &str = "selenium==4.38.0";

#[test]
fn idle_models_unload_when_their_keep_alive_runs_out() {
    use powerinfer_daemon::server::keep_alive::KeepAlive;
    default_model();
    let mut config = test_config(&store::default_models_dir());
    config.keep_alive = KeepAlive::For(Duration::from_secs(1));
    let server = TestServer::start_with_http(config);
    let addr = server.http_addr.unwrap();
    let loaded = || {
        http(addr, "GET", &format!("/v1/models/{DEFAULT_MODEL}"), None).json()["powerinfer"]["loaded"]
            == true
    };
    let complete = |keep: Value| {
        let mut b = json!({"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 2});
        if !keep.is_null() {
            b["keep_alive"] = keep;
        }
        post(addr, "/v1/completions", &b)
    };
    let gone_within = |limit: Duration| {
        let t = Instant::now();
        while loaded() {
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    };
    // The server's default (1 s here): loaded by the request, gone once idle past it.
    assert_eq!(complete(Value::Null).status, 200);
    assert!(loaded());
    assert!(
        gone_within(Duration::from_secs(5)),
        "not unloaded after its keep_alive"
    );
    // -1 keeps it past the default.
    assert_eq!(complete(json!(-1)).status, 200);
    std::thread::sleep(Duration::from_millis(1800));
    assert!(loaded(), "keep_alive -1 unloaded it");
    // 0: unloaded as soon as its requests are done.
    assert_eq!(complete(json!("0")).status, 200);
    assert!(gone_within(Duration::from_secs(2)), "keep_alive 0 kept it");
    // A keep_alive that is not one is refused by name, on both APIs.
    let r = complete(json!("soon"));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "keep_alive");
    let client = server.client();
    let e = server
        .block_on(
            client.generate_all(powerinfer_client::proto::GenerateRequest {
                keep_alive: "soon".into(),
                ..powerinfer_client::text_request(DEFAULT_MODEL, PROMPT)
            }),
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    // gRPC sets it too.
    server
        .block_on(
            client.generate_all(powerinfer_client::proto::GenerateRequest {
                keep_alive: "-1".into(),
                max_tokens: 2,
                ..powerinfer_client::text_request(DEFAULT_MODEL, PROMPT)
            }),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(loaded(), "gRPC keep_alive -1 unloaded it");
    // Loaded on purpose, it stays past the default.
    server.block_on(client.unload(DEFAULT_MODEL)).unwrap();
    server
        .block_on(client.load(powerinfer_client::proto::LoadModelRequest {
            model: DEFAULT_MODEL.into(),
            ..Default::default()
        }))
        .unwrap();
    assert_eq!(complete(Value::Null).status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(loaded(), "a model loaded on purpose was unloaded");
}

#[test]
fn health_is_503_loading_until_the_preloads_are_done() {
    use std::os::unix::fs::PermissionsExt;
    let dir = powerinfer_tests::TempDir::new("http-health-loading");
    // The catalog model is not in this models directory, so preloading it fetches it:
    // with a "Python" that takes three seconds to fail.
    let python = dir.join("slow-python");
    std::fs::write(&python, "#!/bin/sh\nsleep 3\nexit 1\n").unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = test_config(&dir.join("models"));
    config.python = python.to_string_lossy().into_owned();
    config.preload = vec![powerinfer_daemon::server::Preload {
        model: DEFAULT_MODEL.into(),
        ..Default::default()
    }];
    let server = TestServer::start_with_http(config);
    let addr = server.http_addr.unwrap();
    let r = http(addr, "GET", "/health", None);
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (503, json!("loading"))
    );
    let r = http(addr, "GET", &format!("/health?model={DEFAULT_MODEL}"), None);
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (503, json!("loading"))
    );
    // The preload fails: the server serves (what it has), the model is not loaded.
    let t = Instant::now();
    while http(addr, "GET", "/health", None).status != 200 {
        assert!(t.elapsed() < Duration::from_secs(30), "still loading");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = http(addr, "GET", &format!("/health?model={DEFAULT_MODEL}"), None);
    assert_eq!(r.status, 404);
}

/// Debian's Chromium and its WebDriver (`.ci/run` installs them).
fn browser() -> (PathBuf, PathBuf) {
    let find = |names: &[&str]| {
        names
            .iter()
            .map(|n| PathBuf::from("/usr/bin").join(n))
            .find(|p| p.is_file())
    };
    let chromium = find(&["chromium", "chromium-browser"]);
    let driver = find(&["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => (c, d),
        _ => panic!(
            "the status page test needs headless Chromium and its driver: \
             apt-get install chromium chromium-driver (.ci/run does)"
        ),
    }
}

#[test]
fn the_status_page_in_a_real_browser_shows_the_model_and_streams_a_chat_answer() {
    let server = server();
    let addr = server.http_addr.unwrap();
    // The page itself: one embedded file.
    let page = http(addr, "GET", "/", None);
    assert_eq!(page.status, 200);
    assert!(
        page.headers.contains("content-type: text/html"),
        "{}",
        page.headers
    );
    assert!(page.body.contains("/v1/chat/completions"));
    // Loaded by a request, so the page has a row to show.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let status = http(addr, "GET", "/v1/status", None).json();
    let m = &status["models"][0];
    assert_eq!(m["name"], DEFAULT_MODEL);
    assert_eq!(m["layers"].as_array().unwrap().len(), 30);
    assert!(m["memory_bytes"].as_u64().unwrap() > 98_000_000);

    let (chromium, driver) = browser();
    let selenium = python_package(SELENIUM, "selenium");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/status_page.py");
    let n = 16;
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{addr}/"))
        .arg(DEFAULT_MODEL)
        .arg(QUESTION)
        .arg(n.to_string())
        .arg(&chromium)
        .arg(&driver)
        .env("PYTHONPATH", selenium)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["title"], "powerinferd");
    let row: Vec<&str> = seen["row"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(row[0], DEFAULT_MODEL, "{row:?}");
    assert_eq!(row[1], "llama", "{row:?}");
    assert!(row.contains(&"dense"), "{row:?}");
    // Each of the 30 layers: a frame, the computed share, the hot share.
    assert_eq!(seen["layer_bars"], 90);
    assert_eq!(seen["user"], QUESTION);
    assert!(
        !seen["answer_class"].as_str().unwrap().contains("error"),
        "{seen}"
    );
    // Streamed into the page, the greedy answer is `powerinferd run --chat`'s.
    assert_eq!(seen["answer"], run_chat(n), "{seen}");
}

#[test]
fn limits_are_refused_naming_the_limit_on_both_apis() {
    default_model();
    let mut config = test_config(&store::default_models_dir());
    config.max_request_bytes = 64 << 10;
    let server = TestServer::start_with_http(config);
    let addr = server.http_addr.unwrap();
    let client = server.client();
    let big = "word ".repeat(20_000); // 100 kB, over the 64 KiB limit

    // Request size: HTTP 413 in OpenAI's shape; gRPC's own OUT_OF_RANGE with the limit.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": big}),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "request_too_large");
    assert!(e["message"].as_str().unwrap().contains("65536"), "{e}");
    let grpc = |req: powerinfer_client::proto::GenerateRequest| {
        server.block_on(client.generate_all(req)).unwrap_err()
    };
    let text = |p: &str| powerinfer_client::text_request(DEFAULT_MODEL, p);
    let err = grpc(text(&big));
    assert_eq!(err.code(), Some(tonic::Code::OutOfRange), "{err}");
    assert!(err.to_string().contains("65536"), "{err}");

    // Stop strings: count and length; max_tokens beyond the context; top_logprobs.
    let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let long_stop = "x".repeat(300);
    let cases: [(Value, &str); 4] = [
        (json!({"stop": stops}), "16"),
        (json!({"stop": long_stop}), "256"),
        (json!({"max_tokens": 100_000}), "context size 256"),
        (json!({"logprobs": 21}), "20"),
    ];
    for (extra, limit) in cases {
        let mut body = json!({"model": DEFAULT_MODEL, "prompt": PROMPT});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = post(addr, "/v1/completions", &body);
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(limit), "{extra}: {msg}");
    }
    let refused = [
        (
            powerinfer_client::proto::GenerateRequest {
                stop: (0..17).map(|i| format!("s{i}")).collect(),
                ..text(PROMPT)
            },
            "16",
        ),
        (
            powerinfer_client::proto::GenerateRequest {
                stop: vec!["x".repeat(300)],
                ..text(PROMPT)
            },
            "256",
        ),
        (
            powerinfer_client::proto::GenerateRequest {
                max_tokens: 100_000,
                ..text(PROMPT)
            },
            "context size 256",
        ),
        (
            powerinfer_client::proto::GenerateRequest {
                top_logprobs: 21,
                ..text(PROMPT)
            },
            "20",
        ),
    ];
    for (req, limit) in refused {
        let err = grpc(req);
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains(limit), "{limit}: {err}");
    }
    // Under every limit, the same server answers.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 2, "stop": ["\n"]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn streams_per_api_key_are_limited_on_both_apis() {
    use tokio_stream::StreamExt;
    default_model();
    let mut config = test_config(&store::default_models_dir());
    config.api_keys =
        powerinfer_daemon::server::auth::ApiKeys::new(["first-key-0001", "second-key-0002"])
            .unwrap();
    config.max_streams_per_key = 1;
    let server = TestServer::start_with_http(config);
    let addr = server.http_addr.unwrap();
    let complete = |key: &str| {
        let body = json!({"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 2}).to_string();
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    };
    let first = server.client().with_api_key("first-key-0001").unwrap();
    let mut running = server.block_on(async {
        let mut s = first
            .generate(powerinfer_client::proto::GenerateRequest {
                max_tokens: 200,
                ..powerinfer_client::text_request(DEFAULT_MODEL, PROMPT)
            })
            .await
            .unwrap();
        s.next().await.unwrap().unwrap();
        s
    });
    // The same key: refused on both APIs while its stream runs, naming the limit.
    let e = server
        .block_on(first.generate_all(powerinfer_client::text_request(DEFAULT_MODEL, PROMPT)))
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("max_streams_per_key"), "{e}");
    let r = complete("first-key-0001");
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(r.contains("too_many_streams"), "{r}");
    // Another key is served meanwhile.
    assert!(complete("second-key-0002").starts_with("HTTP/1.1 200"));
    // The stream ends (its client goes): the key may stream again.
    server.block_on(async { while running.next().await.is_some() {} });
    drop(running);
    let t = Instant::now();
    loop {
        let r = complete("first-key-0001");
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
