//! The engine's actors on a synthetic model: the same tokens as the direct forward path,
//! continuous batching that does not change any sequence's output, chunked prefill,
//! cancellation, queue limits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use powerinfer_daemon::engine::{
    Engine, EngineError, EngineOptions, FinishReason, GenerateSpec, Input, StreamItem,
};
use powerinfer_daemon::generation::sampler::SamplerConfig;
use powerinfer_daemon::generation::{GenParams, LoadedModel, Session, SessionOptions};
use powerinfer_daemon::ids::TokenId;
use powerinfer_ops::quant::WeightType;
use powerinfer_tests::TempDir;
use powerinfer_tests::synth::Spec;
use tokio_stream::StreamExt;

fn model(dir: &TempDir) -> PathBuf {
    Spec {
        wtype: WeightType::Q4_1,
        n_layer: 3,
        seed: 900,
        ..Spec::default()
    }
    .write_to(dir.path(), "tiny")
}

fn options(max_sequences: usize) -> EngineOptions {
    EngineOptions {
        n_ctx: 256,
        max_sequences,
        max_queue: 4,
        threads: 2,
        ..EngineOptions::default()
    }
}

fn greedy(prompt: &str, max_tokens: usize) -> GenerateSpec {
    GenerateSpec {
        max_tokens: Some(max_tokens),
        sampling: SamplerConfig::greedy(),
        ..GenerateSpec::new(Input::Text(prompt.into()))
    }
}

/// Runs a generation to its end: token ids and the final event.
async fn collect(
    engine: &Engine,
    spec: GenerateSpec,
) -> (Vec<TokenId>, powerinfer_daemon::engine::FinalEvent) {
    let mut stream = engine.generate(spec).await.unwrap();
    let mut ids = Vec::new();
    while let Some(item) = stream.next().await {
        match item.unwrap() {
            StreamItem::Token(t) => ids.push(t.id),
            StreamItem::Final(f) => return (ids, f),
        }
    }
    panic!("the stream ended without a final event");
}

/// Greedy generation on the direct path (a session, no actors): the prompt's length in
/// tokens and the generated ids.
fn direct_greedy(loaded: &LoadedModel, prompt: &str, max_tokens: usize) -> (usize, Vec<TokenId>) {
    let prompt = loaded.tokenizer.encode(prompt, true, true);
    let mut s = Session::new(loaded, SessionOptions::new(256, 2)).unwrap();
    let params = GenParams {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        stop: Vec::new(),
    };
    let out = tokio::task::block_in_place(|| {
        s.generate(&prompt, &params, |_| std::ops::ControlFlow::Continue(()))
    })
    .unwrap();
    (prompt.len(), out.generated)
}

fn prompts() -> Vec<String> {
    (0..16)
        .map(|i| format!("prompt number {i}: {}", "xyz ".repeat(i % 5)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_tokens_equal_the_direct_forward_path() {
    let dir = TempDir::new("engine-direct");
    let path = model(&dir);
    let engine = tokio::task::block_in_place(|| Engine::load("tiny", &path, options(4))).unwrap();
    let (ids, fin) = collect(&engine, greedy("hello world", 24)).await;

    let loaded = LoadedModel::load(&path).unwrap();
    let (prompt_len, direct) = direct_greedy(&loaded, "hello world", 24);
    assert_eq!(ids, direct);
    assert_eq!(fin.prompt_tokens, prompt_len);
    assert_eq!(fin.completion_tokens, ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_match_their_runs_alone() {
    let dir = TempDir::new("engine-batch");
    let path = model(&dir);
    let engine = tokio::task::block_in_place(|| Engine::load("tiny", &path, options(16))).unwrap();
    let mut alone = Vec::new();
    for p in prompts() {
        alone.push(collect(&engine, greedy(&p, 20)).await.0);
    }
    let together: Vec<_> = futures_join(
        prompts()
            .into_iter()
            .map(|p| collect(&engine, greedy(&p, 20))),
    )
    .await;
    for (i, ((ids, fin), want)) in together.into_iter().zip(&alone).enumerate() {
        assert_eq!(&ids, want, "stream {i}");
        assert!(matches!(
            fin.finish,
            FinishReason::MaxTokens | FinishReason::EndOfGeneration(_)
        ));
    }
    let info = engine.info().await.unwrap();
    assert!(info.sched.steps_total > 0);
}

/// Polls futures concurrently on the current task.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<_> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, o) in handles.iter_mut().zip(outs.iter_mut()) {
            if let Some(f) = h {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *o = Some(v);
                        *h = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outs.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_read_in_chunks_without_stalling_running_streams() {
    let dir = TempDir::new("engine-chunks");
    let path = model(&dir);
    let opts = EngineOptions {
        prefill_chunk: 8,
        ..options(2)
    };
    let engine = tokio::task::block_in_place(|| Engine::load("tiny", &path, opts)).unwrap();
    let long_prompt = "a long prompt ".repeat(12); // ~170 byte-level tokens
    let alone = collect(&engine, greedy(&long_prompt, 5)).await.0;

    // A running stream keeps producing tokens while the long prompt is read 8 at a time.
    let mut running = engine.generate(greedy("short", 60)).await.unwrap();
    let first = running.next().await.unwrap().unwrap();
    assert!(matches!(first, StreamItem::Token(_)));
    let long = engine.generate(greedy(&long_prompt, 5)).await.unwrap();
    let mut during = 0;
    let long_task = tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut long = long;
        while let Some(item) = long.next().await {
            if let StreamItem::Token(t) = item.unwrap() {
                ids.push(t.id);
            }
        }
        ids
    });
    while !long_task.is_finished() {
        match running.next().await {
            Some(Ok(StreamItem::Token(_))) => during += 1,
            _ => break,
        }
    }
    assert!(
        during >= 10,
        "only {during} tokens of the running stream while the long prompt was read"
    );
    assert_eq!(
        long_task.await.unwrap(),
        alone,
        "chunked prefill gives the same tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_frees_its_slot() {
    let dir = TempDir::new("engine-cancel");
    let path = model(&dir);
    let engine = tokio::task::block_in_place(|| Engine::load("tiny", &path, options(1))).unwrap();
    let mut first = engine.generate(greedy("endless", 200)).await.unwrap();
    let _ = first.next().await;
    let _ = first.next().await;
    drop(first);
    // With one slot, this only runs once the dropped sequence has been freed.
    let started = Instant::now();
    let (ids, _) =
        tokio::time::timeout(Duration::from_secs(30), collect(&engine, greedy("next", 3)))
            .await
            .expect("the slot was freed");
    assert_eq!(ids.len(), 3);
    assert!(started.elapsed() < Duration::from_secs(30));
    let info = engine.info().await.unwrap();
    assert_eq!(info.sched.active, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_bad_requests_are_refused() {
    let dir = TempDir::new("engine-queue");
    let path = model(&dir);
    let opts = EngineOptions {
        max_queue: 1,
        ..options(1)
    };
    let engine = tokio::task::block_in_place(|| Engine::load("tiny", &path, opts)).unwrap();
    // The first request holds the only slot while it runs (250 tokens of a tiny model:
    // tens of milliseconds); a test thread descheduled that long finds the slot free
    // again, so the scenario is retried, and must see the refusal.
    let mut refused = None;
    for _ in 0..5 {
        let mut running = engine.generate(greedy("one", 250)).await.unwrap();
        let _ = running.next().await; // admitted: holds the only slot
        let _queued = engine.generate(greedy("two", 5)).await.unwrap();
        match engine.generate(greedy("three", 5)).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => continue,
        }
    }
    assert!(
        matches!(refused, Some(EngineError::QueueFull { max: 1 })),
        "{refused:?}"
    );

    let bad = |spec| async {
        engine
            .generate(spec)
            .await
            .expect_err("refused")
            .to_string()
    };
    assert!(bad(greedy("", 5)).await.contains("empty"));
    assert!(bad(greedy(&"z".repeat(300), 5)).await.contains("limit"));
    let mut s = greedy("x", 5);
    s.sampling.top_p = 3.0;
    assert!(bad(s).await.contains("top_p"));
    let mut s = greedy("x", 5);
    s.input = Input::Tokens(vec![TokenId(99_999)]);
    assert!(bad(s).await.contains("out of range"));
    let mut s = greedy("x", 5);
    s.top_logprobs = 100;
    assert!(bad(s).await.contains("top_logprobs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_placed_on_the_simulated_device_runs_hybrid_and_reports_its_hot_share() {
    use powerinfer_daemon::model::placement::{self, DeviceProfile};

    let dir = TempDir::new("engine-hybrid");
    let path = Spec {
        wtype: WeightType::Q4_1,
        n_ff: 512,
        n_layer: 3,
        seed: 901,
        ..Spec::default()
    }
    .write_to(dir.path(), "hybrid");
    // A budget for the fixed parts and about one and a half layers of neurons.
    let mut probe = LoadedModel::load(&path).unwrap();
    probe.model.ensure_neuron_form();
    let opts = options(2);
    let solve = |budget| {
        let d = DeviceProfile::for_device("sim", budget);
        placement::solve(
            &probe.model,
            &d,
            opts.n_ctx,
            opts.max_sequences,
            opts.kv_type,
        )
    };
    let all = solve(u64::MAX / 2);
    let budget = all.fixed_bytes() + all.neuron_bytes[0] * 800;
    let hot = solve(budget).hot;
    assert!(
        hot.iter().any(|h| h.len() >= 128),
        "{:?}",
        hot.iter().map(Vec::len).collect::<Vec<_>>()
    );

    let opts = EngineOptions {
        device: format!("sim:{budget}"),
        vram_budget: budget,
        ..opts
    };
    let engine = tokio::task::block_in_place(|| Engine::load("hybrid", &path, opts)).unwrap();
    let (ids, fin) = collect(&engine, greedy("hello world", 16)).await;
    assert!(
        fin.sparsity.hot_share > 0.0 && fin.sparsity.hot_share < 1.0,
        "{:?}",
        fin.sparsity
    );
    assert!((fin.sparsity.hot_share + fin.sparsity.cold_share - 1.0).abs() < 1e-6);
    let info = engine.info().await.unwrap();
    assert!(
        info.hot_share > 0.0 && info.hot_share < 1.0,
        "{}",
        info.hot_share
    );
    assert!(info.hot.placed_bytes > 0);
    let activity = engine.activity().unwrap();
    assert!(activity.hot_hit_rate > 0.0, "{activity:?}");

    // The same placement without a device (all on the CPU pool): the same tokens.
    let mut cpu = LoadedModel::load(&path).unwrap();
    cpu.model.ensure_neuron_form();
    cpu.model.apply_placement(&hot).unwrap();
    assert_eq!(ids, direct_greedy(&cpu, "hello world", 16).1);

    // A device too small for even the fixed parts leaves every neuron cold.
    let tiny = EngineOptions {
        device: "sim:1000".into(),
        vram_budget: 1000,
        ..options(1)
    };
    let engine = tokio::task::block_in_place(|| Engine::load("cold", &path, tiny)).unwrap();
    assert_eq!(engine.info().await.unwrap().hot_share, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_ended_by_a_stop_string_reports_its_measured_sparsity() {
    use powerinfer_daemon::engine::SparsityMode;

    // A dReLU model in gate mode computes only the neurons whose gate fires (about half).
    let dir = TempDir::new("engine-stop-sparsity");
    let path = Spec {
        arch: "bamboo",
        down_t: true,
        wtype: WeightType::Q4_0,
        n_ff: 320,
        n_layer: 3,
        seed: 904,
        ..Spec::default()
    }
    .write_to(dir.path(), "relu");
    let opts = EngineOptions {
        sparsity: SparsityMode::Gate,
        ..options(1)
    };
    let engine = tokio::task::block_in_place(|| Engine::load("relu", &path, opts)).unwrap();

    // The text of a free run; the stop string is all of it up to a token some way in, so
    // the stop string completes exactly at that token.
    let mut free = engine.generate(greedy("hello", 12)).await.unwrap();
    let mut texts = Vec::new();
    while let Some(item) = free.next().await {
        match item.unwrap() {
            StreamItem::Token(t) => texts.push(t.text),
            StreamItem::Final(f) => assert_eq!(f.finish, FinishReason::MaxTokens),
        }
    }
    let at = (3..texts.len())
        .find(|&k| !texts[k].is_empty())
        .expect("some text a few tokens in");
    let mut stopped = greedy("hello", 12);
    stopped.stop = vec![texts[..=at].concat()];
    let (ids, stop) = collect(&engine, stopped).await;
    assert_eq!(stop.finish, FinishReason::StopSequence);
    assert_eq!(ids.len(), at + 1);

    // The same tokens ended by the length limit at the same point.
    let (_, length) = collect(&engine, greedy("hello", at + 1)).await;
    assert_eq!(length.finish, FinishReason::MaxTokens);
    let fractions = &stop.sparsity.active_fraction_per_layer;
    assert_eq!(fractions, &length.sparsity.active_fraction_per_layer);
    assert!(
        fractions.iter().all(|&f| f > 0.0 && f < 1.0),
        "gate mode computes a part of the neurons: {fractions:?}"
    );
    assert_eq!(stop.sparsity.mode, SparsityMode::Gate);
    assert_eq!(
        (stop.sparsity.hot_share, stop.sparsity.cold_share),
        (0.0, 1.0)
    );
}
