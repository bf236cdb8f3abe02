//! `powerinferd run`, `tokenize` and `bench` on the default model, through the command line.

use powerinfer_tests::{default_model, powerinferd};

fn model() -> &'static str {
    default_model().to_str().unwrap()
}

/// `run` greedy for six tokens on the default model (with `extra` flags), checked against
/// llama.cpp's greedy continuation, which starts " Paris.\n\nThe United".
fn greedy_paris(extra: &[&str]) -> powerinfer_tests::CliOutput {
    let mut args = vec![
        "run",
        model(),
        "The capital of France is",
        "--temperature",
        "0",
        "-n",
        "6",
    ];
    args.extend_from_slice(extra);
    let out = powerinferd(&args);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with(" Paris."), "{:?}", out.stdout);
    out
}

#[test]
fn greedy_run_streams_the_reference_continuation() {
    let out = greedy_paris(&[]);
    assert!(
        out.stderr.contains("tokens/s") && out.stderr.contains("stop: max_tokens"),
        "{}",
        out.stderr
    );
}

#[test]
fn json_output_has_one_record_per_token_and_a_summary() {
    let out = powerinferd(&[
        "run",
        model(),
        "1, 2, 3,",
        "--temperature",
        "0",
        "-n",
        "5",
        "--json",
        "--logprobs",
        "3",
    ]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for t in &lines[..5] {
        assert!(t["id"].is_u64() && t["text"].is_string());
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["id"], t["id"]);
    }
    let s = &lines[5]["summary"];
    assert_eq!(s["generated_tokens"], 5);
    assert_eq!(s["stop_reason"], "max_tokens");
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let args = [
        "run",
        model(),
        "Once upon a time",
        "-n",
        "12",
        "--temperature",
        "1.0",
        "--seed",
        "42",
    ];
    let a = powerinferd(&args);
    let b = powerinferd(&args);
    assert_eq!(a.status, 0, "{}", a.stderr);
    assert_eq!(a.stdout, b.stdout);
    let mut other = args.to_vec();
    other[8] = "43";
    assert_ne!(
        powerinferd(&other).stdout,
        a.stdout,
        "another seed, another text"
    );
}

#[test]
fn chat_mode_answers_and_stops_at_end_of_turn() {
    let out = powerinferd(&[
        "run",
        model(),
        "What is the capital of Japan?",
        "--chat",
        "--temperature",
        "0",
        "-n",
        "40",
    ]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("Tokyo"), "{:?}", out.stdout);
    assert!(out.stderr.contains("end of generation"), "{}", out.stderr);
}

#[test]
fn stop_sequences_end_generation_before_them() {
    // The first tokens every correct implementation produces are " Paris.\n\nThe".
    let out = powerinferd(&[
        "run",
        model(),
        "The capital of France is",
        "--temperature",
        "0",
        "-n",
        "40",
        "--stop",
        "\n\n",
    ]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout, " Paris.\n",
        "text before the stop string, then the final newline"
    );
    assert!(out.stderr.contains("stop: stop"), "{}", out.stderr);
}

#[test]
fn tokenize_prints_the_ids_generation_sees() {
    let out = powerinferd(&["tokenize", model(), "<|im_start|>user\nHi", "--json"]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["ids"][0], 1, "<|im_start|> is one special token");
    let plain = powerinferd(&[
        "tokenize",
        model(),
        "<|im_start|>user\nHi",
        "--json",
        "--no-special",
    ]);
    let p: serde_json::Value = serde_json::from_str(&plain.stdout).unwrap();
    assert!(p["ids"].as_array().unwrap().len() > v["ids"].as_array().unwrap().len());
    let text = powerinferd(&["tokenize", model(), "Hello, world!"]);
    assert_eq!(text.stdout.lines().count(), 4);
    assert!(text.stdout.contains("19556 \"Hello\""));
}

#[test]
fn bench_json_records_line_up_with_llama_bench() {
    let out = powerinferd(&[
        "bench",
        model(),
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "-t",
        "1",
        "--json",
    ]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let recs = v.as_array().unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["test"], "pp16");
    assert_eq!(recs[1]["test"], "tg4");
    for r in recs {
        assert_eq!(r["n_threads"], 1);
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
        assert!(r["stddev_ts"].as_f64().unwrap() >= 0.0);
        assert_eq!(r["samples_ts"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn bad_input_exits_2_with_a_reason() {
    let out = powerinferd(&["run", "no-such-model", "hi"]);
    assert_eq!(out.status, 2);
    assert!(out.stderr.contains("unknown model"), "{}", out.stderr);
    let out = powerinferd(&["run", model(), "", "-n", "3"]);
    assert_eq!(out.status, 2);
    assert!(out.stderr.contains("empty"), "{}", out.stderr);
    let out = powerinferd(&["run", model(), "hi", "--top-p", "2"]);
    assert_eq!(out.status, 2);
    assert!(out.stderr.contains("top_p"), "{}", out.stderr);
    let out = powerinferd(&["run", model(), "hi", "--ctx", "1"]);
    assert_eq!(out.status, 2);
    assert!(out.stderr.contains("context"), "{}", out.stderr);
}

/// `run` and `perplexity` place the default model on a device when asked: the simulated
/// device here; the hybrid run gives llama.cpp's greedy continuation as the CPU does.
#[test]
fn run_and_perplexity_place_the_model_on_a_device() {
    let out = greedy_paris(&["--device", "sim", "--vram-budget", "80MiB"]);
    assert!(
        out.stderr.contains("sim: 31 of 31 fixed parts") && out.stderr.contains("MiB used"),
        "{}",
        out.stderr
    );

    let dir = powerinfer_tests::TempDir::new("cli-ppl-device");
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let ppl = |device: &[&str]| {
        let mut args = vec!["perplexity", model(), text.to_str().unwrap(), "-c", "128"];
        args.extend_from_slice(device);
        let out = powerinferd(&args);
        assert_eq!(out.status, 0, "{}", out.stderr);
        let v: f64 = out
            .stdout
            .rsplit("PPL = ")
            .next()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{}", out.stdout));
        v
    };
    let cpu = ppl(&[]);
    let hybrid = ppl(&["--device", "sim", "--vram-budget", "80MiB"]);
    // The placed model renumbers its neurons and sums them in another order.
    assert!((cpu - hybrid).abs() < 1e-2 * cpu, "{cpu} vs {hybrid}");

    // A backend this build lacks is refused with the reason.
    let out = powerinferd(&["run", model(), "x", "--device", "cuda:0", "-n", "1"]);
    assert_eq!(out.status, 2, "{}", out.stderr);
    assert!(out.stderr.contains("no CUDA backend"), "{}", out.stderr);
}
