//! The daemon through its gRPC API and the real client, on 127.0.0.1:0, with small
//! synthetic models: generation, every INVALID_ARGUMENT path, queue limits, cancellation,
//! loading and unloading while serving, health, the event feed, graceful shutdown.

use std::time::{Duration, Instant};

use powerinfer_client::{
    Client, ClientError, GenerateEvent, ServingStatus, chat_request, greedy, proto, text_request,
};
use powerinfer_ops::quant::WeightType;
use powerinfer_tests::server::{TestServer, test_config};
use powerinfer_tests::synth::Spec;
use powerinfer_tests::{TempDir, powerinferd};
use tokio_stream::StreamExt;
use tonic::Code;

/// A models directory with `tiny` (Q4_1) and `tiny2` (Q8_0), different random models.
pub(crate) fn models_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    Spec {
        wtype: WeightType::Q4_1,
        n_layer: 3,
        seed: 901,
        ..Spec::default()
    }
    .write_to(dir.path(), "tiny");
    Spec {
        wtype: WeightType::Q8_0,
        n_layer: 2,
        seed: 902,
        ..Spec::default()
    }
    .write_to(dir.path(), "tiny2");
    dir
}

pub(crate) fn greedy_request(model: &str, prompt: &str, max_tokens: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        max_tokens,
        sampling: Some(greedy()),
        ..text_request(model, prompt)
    }
}

fn code(e: ClientError) -> Code {
    e.code()
        .unwrap_or_else(|| panic!("not a server error: {e}"))
}

/// Polls `f` until it is true or `limit` passes.
pub(crate) async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[test]
fn greedy_generation_through_the_api_equals_powerinferd_run() {
    let dir = models_dir("api-run");
    let server = TestServer::start(test_config(dir.path()));
    let client = server.client();
    let prompt = "hello tiny model";
    let got = server
        .block_on(client.generate_all(greedy_request("tiny", prompt, 12)))
        .unwrap();
    let ids: Vec<u32> = got.tokens.iter().map(|t| t.id).collect();

    let path = dir.join("tiny.gguf");
    let run = powerinferd(&[
        "run",
        path.to_str().unwrap(),
        prompt,
        "--temperature",
        "0",
        "-n",
        "12",
        "--json",
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let run_ids: Vec<u32> = lines
        .iter()
        .filter_map(|l| l["id"].as_u64().map(|i| i as u32))
        .collect();
    assert_eq!(
        ids, run_ids,
        "the server's greedy tokens equal powerinferd run's"
    );

    let s = &got.summary;
    let usage = s.usage.unwrap();
    assert_eq!(usage.completion_tokens as usize, ids.len());
    assert!(usage.prompt_tokens > 0);
    let sparsity = s.sparsity.clone().unwrap();
    assert_eq!(sparsity.mode, proto::SparsityMode::Dense as i32);
    assert_eq!(sparsity.active_fraction_per_layer, vec![1.0; 3]);
    assert!(s.timings.is_some());

    // Tokenize and Detokenize agree with the stream.
    let tok = server
        .block_on(client.tokenize(proto::TokenizeRequest {
            model: "tiny".into(),
            text: prompt.into(),
            add_special: true,
            parse_special: true,
        }))
        .unwrap();
    assert_eq!(tok.ids.len() as u32, usage.prompt_tokens);
    assert_eq!(tok.pieces.len(), tok.ids.len());
    let text = server
        .block_on(client.detokenize(proto::DetokenizeRequest {
            model: "tiny".into(),
            ids: tok.ids.clone(),
            render_special: false,
        }))
        .unwrap();
    assert!(text.ends_with(prompt), "{text:?}");

    // Chat requests render the model's template.
    let chat = proto::GenerateRequest {
        max_tokens: 4,
        sampling: Some(greedy()),
        ..chat_request("tiny", &[("system", "be brief"), ("user", "hi")])
    };
    let c = server.block_on(client.generate_all(chat)).unwrap();
    assert!(c.summary.usage.unwrap().prompt_tokens > 10);
}

#[test]
fn every_invalid_argument_is_refused_with_its_reason() {
    let dir = models_dir("api-invalid");
    let server = TestServer::start(test_config(dir.path()));
    let client = server.client();
    server.block_on(async {
        // (request, a word the error message must contain)
        let mut cases: Vec<(proto::GenerateRequest, &str)> =
            vec![(greedy_request("", "x", 4), "model")];
        cases.push((
            proto::GenerateRequest {
                input: None,
                ..greedy_request("tiny", "x", 4)
            },
            "prompt",
        ));
        cases.push((greedy_request("tiny", "", 4), "empty"));
        cases.push((greedy_request("tiny", &"z".repeat(400), 4), "limit"));
        cases.push((
            proto::GenerateRequest {
                sparsity: 42,
                ..greedy_request("tiny", "x", 4)
            },
            "42",
        ));
        cases.push((
            proto::GenerateRequest {
                sparsity: proto::SparsityMode::Predictor.into(),
                ..greedy_request("tiny", "x", 4)
            },
            "predictor",
        ));
        cases.push((
            proto::GenerateRequest {
                top_logprobs: 500,
                ..greedy_request("tiny", "x", 4)
            },
            "top_logprobs",
        ));
        cases.push((
            proto::GenerateRequest {
                stop: vec![String::new()],
                ..greedy_request("tiny", "x", 4)
            },
            "stop",
        ));
        for (field, params) in [
            (
                "temperature",
                proto::SamplingParams {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                proto::SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
            ),
            (
                "min_p",
                proto::SamplingParams {
                    min_p: Some(-0.5),
                    ..Default::default()
                },
            ),
            (
                "repeat_penalty",
                proto::SamplingParams {
                    repeat_penalty: Some(0.0),
                    ..Default::default()
                },
            ),
        ] {
            cases.push((
                proto::GenerateRequest {
                    sampling: Some(params),
                    ..greedy_request("tiny", "x", 4)
                },
                field,
            ));
        }
        cases.push((
            proto::GenerateRequest {
                input: Some(proto::generate_request::Input::TokenIds(proto::TokenIds {
                    ids: vec![1, 2, 1_000_000],
                })),
                ..greedy_request("tiny", "", 4)
            },
            "out of range",
        ));
        cases.push((
            proto::GenerateRequest {
                input: Some(proto::generate_request::Input::Chat(
                    proto::ChatMessages::default(),
                )),
                ..greedy_request("tiny", "", 4)
            },
            "chat",
        ));
        cases.push((greedy_request("/etc/passwd", "x", 4), "path"));
        cases.push((greedy_request("../tiny.gguf", "x", 4), "path"));
        for (req, word) in cases {
            let e = match client.generate(req.clone()).await {
                Ok(mut s) => s.next().await.expect("an item").expect_err("refused"),
                Err(e) => e,
            };
            assert_eq!(e.code(), Some(Code::InvalidArgument), "{req:?}: {e}");
            assert!(e.to_string().contains(word), "{word:?} not in {e}");
        }

        // Loads: a context larger than the model's, an unknown device, a path.
        for (req, word) in [
            (
                proto::LoadModelRequest {
                    model: "tiny2".into(),
                    context_size: 1 << 20,
                    ..Default::default()
                },
                "context",
            ),
            (
                proto::LoadModelRequest {
                    model: "tiny2".into(),
                    device: "tpu:0".into(),
                    ..Default::default()
                },
                "tpu",
            ),
            (
                proto::LoadModelRequest {
                    model: dir.join("tiny2.gguf").display().to_string(),
                    ..Default::default()
                },
                "path",
            ),
            (proto::LoadModelRequest::default(), "model"),
        ] {
            let e = client.load(req).await.unwrap_err();
            assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
            assert!(e.to_string().contains(word), "{word:?} not in {e}");
        }
        // Token ids out of range for Detokenize.
        let e = client
            .detokenize(proto::DetokenizeRequest {
                model: "tiny".into(),
                ids: vec![7, 999_999],
                render_special: false,
            })
            .await
            .unwrap_err();
        assert_eq!(code(e), Code::InvalidArgument);

        // Other codes: unknown models, a GPU backend this build lacks, unloading what is
        // not loaded.
        let e = client
            .generate_all(greedy_request("nonexistent", "x", 2))
            .await;
        assert_eq!(code(e.unwrap_err()), Code::NotFound);
        let e = client
            .load(proto::LoadModelRequest {
                model: "tiny2".into(),
                device: "cuda:0".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
        assert_eq!(
            code(client.unload("tiny2").await.unwrap_err()),
            Code::NotFound
        );

        // After all of that the model still serves.
        let ok = client
            .generate_all(greedy_request("tiny", "still here", 3))
            .await
            .unwrap();
        assert_eq!(ok.tokens.len(), 3);
    });
}

fn one_slot_config(dir: &TempDir) -> powerinfer_daemon::server::ServeConfig {
    let mut config = test_config(dir.path());
    config.engine.max_sequences = 1;
    config.engine.max_queue = 1;
    config
}

pub(crate) fn model_status(models: &[proto::ModelInfo], name: &str) -> proto::ModelInfo {
    models
        .iter()
        .find(|m| m.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not in {models:?}"))
}

#[test]
fn a_full_queue_is_resource_exhausted_and_a_dropped_stream_frees_its_slot() {
    let dir = models_dir("api-queue");
    // The first request is still running while the others arrive.
    write_slow_model(&dir);
    let server = TestServer::start(one_slot_config(&dir));
    let client = server.client();
    server.block_on(async {
        let mut running = client
            .generate(greedy_request("slow", "one", 250))
            .await
            .unwrap();
        let first = running.next().await.unwrap().unwrap();
        assert!(matches!(first, GenerateEvent::Token(_)));
        let mut queued = client
            .generate(greedy_request("slow", "two", 3))
            .await
            .unwrap();
        let s = client.status().await.unwrap();
        let m = model_status(&s.models, "slow");
        assert_eq!((m.active_requests, m.queued_requests), (1, 1));

        let e = client.generate(greedy_request("slow", "three", 3)).await;
        let e = match e {
            Ok(mut s) => s.next().await.unwrap().unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");

        // The client goes away: its slot is freed within a step and the queued request runs.
        drop(running);
        let freed = eventually(Duration::from_secs(20), async || {
            let s = client.status().await.unwrap();
            let m = model_status(&s.models, "slow");
            m.queued_requests == 0
        })
        .await;
        assert!(freed, "the dropped stream's slot was not freed");
        let mut n = 0;
        while let Some(ev) = queued.next().await {
            match ev.unwrap() {
                GenerateEvent::Token(_) => n += 1,
                GenerateEvent::Final(f) => {
                    assert_eq!(f.usage.unwrap().completion_tokens, 3);
                    break;
                }
            }
        }
        assert_eq!(n, 3);
        let idle = eventually(Duration::from_secs(10), async || {
            let s = client.status().await.unwrap();
            model_status(&s.models, "slow").active_requests == 0
        })
        .await;
        assert!(idle, "status still shows a running request");
    });
}

/// A model slow enough (a few ms a token) that a 250-token request is still running
/// while the test acts: the tiny models finish 250 tokens in a few milliseconds.
pub(crate) fn write_slow_model(dir: &TempDir) {
    Spec {
        wtype: WeightType::Q8_0,
        n_embd: 512,
        n_ff: 2048,
        n_layer: 4,
        seed: 903,
        ..Spec::default()
    }
    .write_to(dir.path(), "slow");
}

#[test]
fn models_load_and_unload_while_another_serves_with_events_and_health() {
    let dir = models_dir("api-load");
    // A file that is not a model: its load fails and changes nothing.
    std::fs::write(dir.join("broken.gguf"), b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let server = TestServer::start(test_config(dir.path()));
    let client = server.client();
    server.block_on(async {
        let mut events = client.watch().await.unwrap();
        assert_eq!(client.health("").await.unwrap(), ServingStatus::Serving);
        assert_eq!(
            code(client.health("tiny").await.unwrap_err()),
            Code::NotFound,
            "a model never loaded is unknown to health"
        );
        let info = client
            .load(proto::LoadModelRequest {
                model: "tiny".into(),
                context_size: 128,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(info.name, "tiny");
        assert_eq!(info.context_size, 128);
        assert_eq!(info.quantization, "Q4_1");
        assert_eq!(info.device, "cpu");
        assert_eq!(client.health("tiny").await.unwrap(), ServingStatus::Serving);
        // Loading again with the same settings returns the loaded model; other settings
        // are refused.
        assert_eq!(
            client
                .load(proto::LoadModelRequest {
                    model: "tiny".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .loaded_at_unix_ms,
            info.loaded_at_unix_ms
        );
        let e = client
            .load(proto::LoadModelRequest {
                model: "tiny".into(),
                context_size: 64,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");

        // tiny streams while tiny2 is loaded, used and unloaded, and broken fails.
        let expected = client
            .generate_all(greedy_request("tiny", "a long one", 60))
            .await
            .unwrap();
        let mut stream = client
            .generate(greedy_request("tiny", "a long one", 60))
            .await
            .unwrap();
        let mut ids = Vec::new();
        if let Some(GenerateEvent::Token(t)) = stream.next().await.transpose().unwrap() {
            ids.push(t.id);
        }
        client
            .load(proto::LoadModelRequest {
                model: "tiny2".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let other = client
            .generate_all(greedy_request("tiny2", "meanwhile", 5))
            .await
            .unwrap();
        assert_eq!(other.tokens.len(), 5);
        let e = client
            .load(proto::LoadModelRequest {
                model: "broken".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
        client.unload("tiny2").await.unwrap();
        assert_eq!(
            client.health("tiny2").await.unwrap(),
            ServingStatus::NotServing
        );
        while let Some(ev) = stream.next().await {
            match ev.unwrap() {
                GenerateEvent::Token(t) => ids.push(t.id),
                GenerateEvent::Final(_) => break,
            }
        }
        let expected_ids: Vec<u32> = expected.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, expected_ids, "the serving model was not disturbed");
        assert_eq!(client.health("tiny").await.unwrap(), ServingStatus::Serving);

        let listed = client.list().await.unwrap();
        let loaded: Vec<&str> = listed.loaded.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(loaded, ["tiny"]);
        for name in ["tiny", "tiny2", "broken", "smollm2-135m"] {
            assert!(
                listed.available.iter().any(|m| m.name == name),
                "{name} not listed"
            );
        }
        // Clients see file names, never the server's directories.
        for p in listed
            .loaded
            .iter()
            .map(|m| &m.path)
            .chain(listed.available.iter().map(|m| &m.path))
        {
            assert!(!p.contains('/') && p.ends_with(".gguf"), "{p}");
        }
        assert_eq!(
            code(
                client
                    .generate_all(greedy_request("broken", "x", 1))
                    .await
                    .unwrap_err()
            ),
            Code::InvalidArgument
        );

        // The feed saw it all, in order.
        use proto::watch_models_response::Event;
        let mut seen = Vec::new();
        while seen.len() < 64 {
            let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await
            else {
                break;
            };
            seen.push(match ev.unwrap() {
                Event::Loading(l) => format!("loading {} {}", l.model, l.stage),
                Event::Loaded(l) => format!("loaded {}", l.model.unwrap().name),
                Event::Unloaded(u) => format!("unloaded {}", u.model),
                Event::Failed(f) => format!("failed {}", f.model),
            });
        }
        let order: Vec<&str> = seen
            .iter()
            .map(String::as_str)
            .filter(|s| !s.starts_with("loading"))
            .collect();
        assert_eq!(
            order,
            [
                "loaded tiny",
                "loaded tiny2",
                "failed broken",
                "unloaded tiny2",
                "failed broken"
            ],
            "{seen:?}"
        );
        assert!(
            seen.contains(&"loading tiny resolving".to_owned()),
            "{seen:?}"
        );
    });
}

#[test]
fn shutdown_drains_running_streams_then_stops() {
    let dir = models_dir("api-drain");
    let mut server = TestServer::start(test_config(dir.path()));
    let client = server.client();
    let mut stream = server.block_on(async {
        let mut s = client
            .generate(greedy_request("tiny", "drain me", 40))
            .await
            .unwrap();
        let first = s.next().await.unwrap().unwrap();
        assert!(matches!(first, GenerateEvent::Token(_)));
        s
    });
    let mut health = server.block_on(async {
        use tonic_health::pb::health_client::HealthClient;
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = HealthClient::new(channel);
        h.watch(tonic_health::pb::HealthCheckRequest {
            service: "tiny".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    let task = server.begin_shutdown();
    server.block_on(async {
        let mut tokens = 1;
        let final_event = loop {
            match stream.next().await.expect("the stream finishes").unwrap() {
                GenerateEvent::Token(_) => tokens += 1,
                GenerateEvent::Final(f) => break f,
            }
        };
        assert_eq!(tokens, 40);
        assert_eq!(
            final_event.finish_reason,
            proto::FinishReason::Length as i32
        );
        // The model's health went to NOT_SERVING when the drain began, then its watch ended.
        let mut statuses = Vec::new();
        while let Ok(Some(Ok(s))) =
            tokio::time::timeout(Duration::from_secs(20), health.next()).await
        {
            statuses.push(s.status);
        }
        assert_eq!(
            statuses.last(),
            Some(&(ServingStatus::NotServing as i32)),
            "{statuses:?}"
        );
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the server stopped after draining")
            .unwrap()
            .unwrap();
        let refused = Client::connect(&server.addr.to_string()).await;
        assert!(
            matches!(refused, Err(ClientError::Connect { .. })),
            "{refused:?}"
        );
    });
}

#[test]
fn pictl_commands_and_exit_codes() {
    let dir = models_dir("api-pictl");
    let server = TestServer::start(test_config(dir.path()));

    let out = server.pictl(&["load", "tiny", "--ctx", "200"]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("loaded tiny"), "{}", out.stdout);
    assert!(
        out.stderr.contains("tiny: loading"),
        "progress: {}",
        out.stderr
    );

    let out = server.pictl(&[
        "generate",
        "tiny",
        "abc",
        "--temperature",
        "0",
        "-n",
        "5",
        "--json",
        "--logprobs",
        "2",
    ]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(lines[5]["summary"]["generated_tokens"], 5);
    let client = server.client();
    let api = server
        .block_on(client.generate_all(greedy_request("tiny", "abc", 5)))
        .unwrap();
    let ids: Vec<u64> = lines[..5]
        .iter()
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        api.tokens
            .iter()
            .map(|t| u64::from(t.id))
            .collect::<Vec<_>>()
    );

    let out = server.pictl(&["status"]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    for want in [
        "NAME",
        "MEMORY",
        "host memory:",
        "PROCESSOR",
        "tiny",
        "0%/100% GPU/CPU",
        "200",
        "DEVICE",
    ] {
        assert!(
            out.stdout.contains(want),
            "{want:?} missing from\n{}",
            out.stdout
        );
    }
    let out = server.pictl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["models"][0]["name"], "tiny");
    assert_eq!(v["models"][0]["context_size"], 200);
    assert!(v["uptime_seconds"].as_f64().unwrap() > 0.0);

    // A model that is a symbolic link is listed with its file's size.
    std::os::unix::fs::symlink(dir.join("tiny2.gguf"), dir.join("linked.gguf")).unwrap();
    let out = server.pictl(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let available = v["available"].as_array().unwrap();
    let size = |name: &str| {
        available
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| m["size_bytes"].as_u64().unwrap())
    };
    let real = std::fs::metadata(dir.join("tiny2.gguf")).unwrap().len();
    assert_eq!(size("tiny2"), Some(real));
    assert_eq!(size("linked"), Some(real), "{v}");
    // Each with its architecture: from the file's header, or from the catalog.
    let arch = |name: &str| {
        available
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| m["architecture"].as_str().unwrap().to_owned())
    };
    assert_eq!(arch("tiny2").as_deref(), Some("llama"), "{v}");
    assert_eq!(arch("gemma3-270m").as_deref(), Some("gemma3"), "{v}");
    let out = server.pictl(&["list"]);
    assert!(
        out.stdout.contains("ARCHITECTURE") && out.stdout.contains("gemma3"),
        "{}",
        out.stdout
    );

    let out = server.pictl(&["tokenize", "tiny", "hi", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(!v["ids"].as_array().unwrap().is_empty());

    let out = server.pictl_with_input(
        &["chat", "tiny", "--temperature", "0", "-n", "3"],
        "hello\n\nagain\n/bye\n",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    // A prompt before each line read (the empty one is skipped), and an answer to each of
    // the two messages.
    assert_eq!(out.stderr.matches(">>> ").count(), 4, "{}", out.stderr);
    assert!(!out.stdout.is_empty());

    let out = server.pictl(&["unload", "tiny"]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    // Server errors: 1.
    let out = server.pictl(&["unload", "tiny"]);
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(out.stderr.contains("not loaded"), "{}", out.stderr);
    let out = server.pictl(&["generate", "nonexistent", "x"]);
    assert_eq!(out.status, 1, "{}", out.stderr);
    // Usage: 2.
    let out = server.pictl(&["load"]);
    assert_eq!(out.status, 2);
    let out = server.pictl(&["load", "tiny", "--vram-budget", "lots"]);
    assert_eq!(out.status, 2);
    // Cannot connect: 3 (a port that was just free).
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = powerinfer_tests::server::pictl(&["--addr", &free.to_string()], &["status"], "");
    assert_eq!(out.status, 3, "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
}
