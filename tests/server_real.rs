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
