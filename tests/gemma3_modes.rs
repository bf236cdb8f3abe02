//! Gemma 3 through the command line: it runs densely on the CPU; the modes it cannot run
//! (gate mode without calibrated thresholds, predictor mode without predictors, a device
//! placement: the device ops implement the llama layer only) are refused with the reason.

use powerinfer_tests::{gemma3_model, powerinferd};

fn model() -> &'static str {
    gemma3_model().to_str().unwrap()
}

#[test]
fn gemma3_runs_greedy_on_the_cpu() {
    let out = powerinferd(&[
        "run",
        model(),
        "Monday, Tuesday, Wednesday,",
        "--temperature",
        "0",
        "-n",
        "8",
    ]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    // llama.cpp's greedy continuation (every reference run agrees on 48 tokens here).
    assert!(
        out.stdout
            .starts_with(" Thursday, Friday, Saturday, Sunday,"),
        "{:?}",
        out.stdout
    );
}

#[test]
fn gemma3_refuses_what_it_cannot_run_with_the_reason() {
    let prompt = "Monday, Tuesday,";
    let out = powerinferd(&["run", model(), prompt, "-n", "2", "--sparsity", "gate"]);
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("gate thresholds"), "{}", out.stderr);
    let out = powerinferd(&["run", model(), prompt, "-n", "2", "--sparsity", "predictor"]);
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("needs predictors"), "{}", out.stderr);
    let out = powerinferd(&[
        "run",
        model(),
        prompt,
        "-n",
        "2",
        "--device",
        "sim",
        "--vram-budget",
        "200MiB",
    ]);
    assert_ne!(out.status, 0);
    assert!(
        out.stderr.contains("gemma3") && out.stderr.contains("--device cpu"),
        "{}",
        out.stderr
    );
}
