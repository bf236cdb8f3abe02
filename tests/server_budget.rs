//! The daemon's memory budget through the gRPC API, on small synthetic models: idle
//! models unloaded least recently used first to make room, busy ones skipped, a load
//! refused naming them when only busy ones could make room, and a model larger than the
//! whole budget refused before it is read.

use std::time::Duration;

use powerinfer_client::{Client, GenerateEvent, proto};
use powerinfer_tests::server::{TestServer, test_config};
use tokio_stream::StreamExt;
use tonic::Code;

use super::server_api::{eventually, greedy_request, model_status, models_dir, write_slow_model};

fn load_named(name: &str) -> proto::LoadModelRequest {
    proto::LoadModelRequest {
        model: name.into(),
        ..Default::default()
    }
}

async fn loaded_names(client: &Client) -> Vec<String> {
    let mut names: Vec<String> = client
        .status()
        .await
        .unwrap()
        .models
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.sort();
    names
}

#[test]
fn a_memory_budget_unloads_the_least_recently_used_idle_model_and_refuses_when_all_are_busy() {
    let dir = models_dir("api-budget");
    write_slow_model(&dir);
    // What each model takes (its file and its KV cache), from a server without a budget.
    let sizes: std::collections::BTreeMap<String, u64> = {
        let server = TestServer::start(test_config(dir.path()));
        let client = server.client();
        server.block_on(async {
            for m in ["tiny", "tiny2", "slow"] {
                client.load(load_named(m)).await.unwrap();
            }
            let s = client.status().await.unwrap();
            assert_eq!(s.memory_budget_bytes, 0);
            s.models
                .into_iter()
                .map(|m| {
                    assert!(m.memory_bytes > m.size_bytes, "{m:?}");
                    (m.name, m.memory_bytes)
                })
                .collect()
        })
    };
    let (tiny, tiny2, slow) = (sizes["tiny"], sizes["tiny2"], sizes["slow"]);

    // Any two fit, not all three.
    let mut config = test_config(dir.path());
    config.memory_budget = Some(tiny + tiny2 + slow - 1);
    let server = TestServer::start(config);
    let client = server.client();
    server.block_on(async {
        client.load(load_named("tiny")).await.unwrap();
        client.load(load_named("tiny2")).await.unwrap();
        // tiny used after tiny2 was loaded: tiny2 is the least recently used.
        client
            .generate_all(greedy_request("tiny", "one", 2))
            .await
            .unwrap();
        client.load(load_named("slow")).await.unwrap();
        assert_eq!(loaded_names(&client).await, ["slow", "tiny"]);
        let s = client.status().await.unwrap();
        assert_eq!(s.memory_budget_bytes, tiny + tiny2 + slow - 1);

        // slow is busy and least recently used (tiny ran after it started): skipped,
        // tiny goes instead.
        let mut running = client
            .generate(greedy_request("slow", "one", 250))
            .await
            .unwrap();
        assert!(matches!(
            running.next().await.unwrap().unwrap(),
            GenerateEvent::Token(_)
        ));
        client
            .generate_all(greedy_request("tiny", "two", 2))
            .await
            .unwrap();
        client.load(load_named("tiny2")).await.unwrap();
        assert_eq!(loaded_names(&client).await, ["slow", "tiny2"]);
        drop(running);
    });
    drop(server);

    // Room for slow and nothing else: with slow busy, a load is refused and names it.
    let mut config = test_config(dir.path());
    config.memory_budget = Some(slow + 1);
    let server = TestServer::start(config);
    let client = server.client();
    server.block_on(async {
        client.load(load_named("slow")).await.unwrap();
        let mut running = client
            .generate(greedy_request("slow", "one", 250))
            .await
            .unwrap();
        assert!(matches!(
            running.next().await.unwrap().unwrap(),
            GenerateEvent::Token(_)
        ));
        // Its prompt and tokens are in the KV cache.
        let s = client.status().await.unwrap();
        let kv = model_status(&s.models, "slow").kv_cache_tokens;
        assert!((1..=256).contains(&kv), "{kv}");
        let e = client.load(load_named("tiny")).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("budget") && msg.contains("slow"), "{msg}");
        assert_eq!(loaded_names(&client).await, ["slow"]);
        // Once slow is idle, the same load evicts it.
        drop(running);
        let idle = eventually(Duration::from_secs(20), async || {
            let s = client.status().await.unwrap();
            model_status(&s.models, "slow").active_requests == 0
        })
        .await;
        assert!(idle);
        client.load(load_named("tiny")).await.unwrap();
        assert_eq!(loaded_names(&client).await, ["tiny"]);
    });
    drop(server);
    // A model larger than the whole budget is refused before it is read.
    let mut config = test_config(dir.path());
    config.memory_budget = Some(tiny - 1);
    let server = TestServer::start(config);
    let client = server.client();
    let e = server
        .block_on(client.load(load_named("tiny")))
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("more than the whole budget"), "{e}");
}
