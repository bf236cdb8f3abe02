//! Sparsity modes on random-weight models written by the tests: gate mode is exact on
//! ReLU-gated models, a request's numbers do not depend on its batch neighbours' modes,
//! and the sidecar is read, checked and required where a mode needs it.

use powerinfer_daemon::generation::LoadedModel;
use powerinfer_daemon::ids::{SeqSlot, TokenId};
use powerinfer_daemon::model::sidecar::{self, PredictorData, SidecarData};
use powerinfer_daemon::model::{BatchToken, KvCache, KvType, Model, Scratch, SparsityMode};
use powerinfer_ops::gguf::{GgufFile, Magic};
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::{Numerics, WeightType};
use powerinfer_ops::rng::Rng;
use powerinfer_tests::synth::Spec;
use powerinfer_tests::{TempDir, powerinferd, run_steps};

/// Logits after every token of `toks`, one token per step, in `mode`; and the active
/// neuron counts of every step.
fn run(model: &Model, toks: &[u32], mode: SparsityMode) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let steps = run_steps(model, toks, mode);
    (steps.logits, steps.active)
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 256).collect()
}

#[test]
fn gate_mode_is_dense_mode_bit_for_bit_on_relu_gated_models() {
    // A 32-element type, and a k-quant (whole 256-value rows) for its row-sparse dot and
    // neuron-major axpy.
    for (arch, magic, wtype, n_embd, n_ff) in [
        ("llama", Magic::PowerInfer, WeightType::Q4_0, 64, 320),
        ("bamboo", Magic::Gguf, WeightType::Q4_0, 64, 320),
        ("llama", Magic::PowerInfer, WeightType::Q3_K, 256, 512),
    ] {
        let spec = Spec {
            arch,
            magic,
            down_t: true,
            wtype,
            n_embd,
            n_ff,
            seed: 71,
            ..Spec::default()
        };
        let file = GgufFile::from_bytes(&spec.to_gguf()).unwrap();
        let model = Model::load(&file).unwrap();
        assert!(model.sparsity_unavailable(SparsityMode::Gate).is_none());
        let toks = tokens(12);
        let (dense, dense_counts) = run(&model, &toks, SparsityMode::Dense);
        let (gate, gate_counts) = run(&model, &toks, SparsityMode::Gate);
        assert_eq!(
            dense, gate,
            "{arch} {wtype:?}: gate mode must equal dense mode exactly"
        );
        let n_ff = spec.n_ff as u32;
        assert!(dense_counts.iter().flatten().all(|&c| c == n_ff));
        let active: u32 = gate_counts.iter().flatten().sum();
        let all = n_ff * gate_counts.iter().flatten().count() as u32;
        // Random ReLU gates fire about half the time (dReLU: the gate alone decides here).
        assert!(
            active > all / 5 && active < all * 4 / 5,
            "{arch} {wtype:?}: {active} of {all}"
        );
    }
}

#[test]
fn a_request_s_numbers_do_not_depend_on_its_neighbours_modes() {
    let dir = TempDir::new("sparsity-mixed");
    let spec = Spec {
        wtype: WeightType::Q4_1,
        n_ff: 256,
        seed: 72,
        ..Spec::default()
    };
    let path = spec.write_to(dir.path(), "mixed");
    let probe = LoadedModel::load(&path).unwrap();
    let c = probe.model.config.clone();
    sidecar::write(
        &sidecar::path_for(&path),
        &c,
        &SidecarData {
            calibration_tokens: 1,
            gate_thresholds: Some(vec![0.05; c.n_layer]),
            ..SidecarData::default()
        },
    )
    .unwrap();
    let loaded = LoadedModel::load_for(&path, SparsityMode::Gate).unwrap();
    let model = &loaded.model;
    let toks = tokens(10);
    let (dense_alone, _) = run(model, &toks, SparsityMode::Dense);
    let (gate_alone, _) = run(model, &toks, SparsityMode::Gate);
    assert_ne!(
        dense_alone, gate_alone,
        "thresholds must switch neurons off"
    );

    // Both sequences in every step: slot 0 dense, slot 1 gate.
    let pool = ThreadPool::new(2, "test").unwrap();
    let mut kv = KvCache::new(
        c.n_layer,
        2,
        toks.len(),
        c.n_head_kv,
        c.head_dim,
        KvType::F32,
    );
    let mut s = Scratch::new(Numerics::Precise);
    for (i, &t) in toks.iter().enumerate() {
        let b = |slot, sparsity| BatchToken {
            token: TokenId(t),
            slot: SeqSlot(slot),
            pos: i,
            logits: true,
            sparsity,
        };
        let batch = [b(0, SparsityMode::Dense), b(1, SparsityMode::Gate)];
        let out = model.forward(&pool, &batch, &mut kv, &mut s).unwrap();
        let (a, g) = out.split_at(c.n_vocab);
        assert_eq!(a, dense_alone[i].as_slice(), "dense request at step {i}");
        assert_eq!(g, gate_alone[i].as_slice(), "gate request at step {i}");
    }
}

#[test]
fn tokens_with_most_neurons_active_read_every_row_and_mask_the_others() {
    // A one-layer SiLU model with gate thresholds and random predictors (some of the
    // neurons of each token fire in either mode). One layer: both ways see the same FFN
    // input at every step, and with F32 weights (`down_t` is `down` transposed exactly)
    // they differ only in the order of the sums.
    let dir = TempDir::new("sparsity-masked");
    let spec = Spec {
        n_layer: 1,
        n_ff: 256,
        seed: 75,
        ..Spec::default()
    };
    let path = spec.write_to(dir.path(), "masked");
    let c = LoadedModel::load(&path).unwrap().model.config.clone();
    let mut rng = Rng::new(76);
    let rank = 16;
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect() };
    let predictors = (0..c.n_layer)
        .map(|_| PredictorData {
            rank,
            fc1: random(rank * c.n_embd),
            fc2: random(c.n_ff * rank),
            b1: random(rank),
            b2: random(c.n_ff),
        })
        .collect();
    sidecar::write(
        &sidecar::path_for(&path),
        &c,
        &SidecarData {
            calibration_tokens: 1,
            gate_thresholds: Some(vec![0.2; c.n_layer]),
            predictor_threshold: Some(0.0),
            predictors: Some(predictors),
            ..SidecarData::default()
        },
    )
    .unwrap();
    let mut model = LoadedModel::load_for(&path, SparsityMode::Predictor)
        .unwrap()
        .model;
    let toks = tokens(10);
    for mode in [SparsityMode::Gate, SparsityMode::Predictor] {
        model.masked_min_fraction = f64::INFINITY;
        let (scattered, counts) = run(&model, &toks, mode);
        model.masked_min_fraction = 0.0;
        let (masked, masked_counts) = run(&model, &toks, mode);
        assert_eq!(counts, masked_counts, "{mode:?}: the same neurons");
        // Both ways ran: their sums are made in different orders.
        assert_ne!(scattered, masked, "{mode:?}");
        let share = active_share(&counts, c.n_ff);
        assert!(share > 0.2 && share < 0.8, "{mode:?}: active share {share}");
        // Dense differs from both by far more than they differ from each other.
        let (dense, _) = run(&model, &toks, SparsityMode::Dense);
        for ((a, b), d) in scattered.iter().zip(&masked).zip(&dense) {
            let gap = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0f32, f32::max)
            };
            let (rounding, sparsity) = (gap(a, b), gap(a, d));
            assert!(
                rounding < 1e-4 * sparsity,
                "{mode:?}: masked rows differ by {rounding}, dense by {sparsity}"
            );
        }
    }

    // On a ReLU-gated model the masked rows are dense mode's, bit for bit.
    let spec = Spec {
        arch: "bamboo",
        wtype: WeightType::Q4_0,
        n_ff: 256,
        seed: 77,
        ..Spec::default()
    };
    let file = GgufFile::from_bytes(&spec.to_gguf()).unwrap();
    let mut model = Model::load(&file).unwrap();
    model.ensure_neuron_form();
    model.masked_min_fraction = 0.0;
    let (dense, _) = run(&model, &toks, SparsityMode::Dense);
    let (gate, counts) = run(&model, &toks, SparsityMode::Gate);
    assert_eq!(dense, gate);
    assert!(active_share(&counts, spec.n_ff) < 0.8);
}

#[test]
fn modes_without_their_data_are_refused_and_sidecars_are_checked() {
    let dir = TempDir::new("sparsity-refuse");
    let spec = Spec {
        n_ff: 128,
        seed: 73,
        ..Spec::default()
    };
    let path = spec.write_to(dir.path(), "silu");
    let why = |mode| match LoadedModel::load_for(&path, mode) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    assert!(
        why(SparsityMode::Gate).contains("sidecar"),
        "{}",
        why(SparsityMode::Gate)
    );
    assert!(why(SparsityMode::Predictor).contains("predictor"));
    assert_eq!(why(SparsityMode::Dense), "");

    // A dense load does not prepare the neuron form, so a sparse request is refused.
    let dense = LoadedModel::load(&path).unwrap();
    assert!(
        dense
            .model
            .sparsity_unavailable(SparsityMode::Gate)
            .is_some()
    );

    // A sidecar for another shape is refused, naming the key.
    let mut c = dense.model.config.clone();
    c.n_ff += 32;
    sidecar::write(&sidecar::path_for(&path), &c, &SidecarData::default()).unwrap();
    let e = why(SparsityMode::Dense);
    assert!(e.contains("feed_forward_length"), "{e}");

    // The right one gives gate mode its thresholds.
    let c = dense.model.config.clone();
    let thresholds = vec![0.5; c.n_layer];
    sidecar::write(
        &sidecar::path_for(&path),
        &c,
        &SidecarData {
            calibration_tokens: 100,
            target_sparsity: Some(0.5),
            gate_thresholds: Some(thresholds.clone()),
            frequencies: Some(vec![vec![0.25; c.n_ff]; c.n_layer]),
            ..SidecarData::default()
        },
    )
    .unwrap();
    let loaded = LoadedModel::load_for(&path, SparsityMode::Gate).unwrap();
    let s = &loaded.model.sparsity;
    assert_eq!(s.gate_thresholds.as_deref(), Some(thresholds.as_slice()));
    assert_eq!(s.frequencies.as_ref().map(Vec::len), Some(c.n_layer));
}

/// A free English text shipped by Debian (the tests' calibration text).
const CALIBRATION: &str = "/usr/share/common-licenses/GPL-2";

/// Mean of the active shares of every step and layer.
fn active_share(counts: &[Vec<u32>], n_ff: usize) -> f64 {
    let all: Vec<u32> = counts.iter().flatten().copied().collect();
    all.iter().map(|&c| f64::from(c)).sum::<f64>() / (all.len() * n_ff) as f64
}

/// A SiLU test model of 256 neurons per layer, written to `dir`.
fn silu_model(dir: &TempDir, seed: u64) -> (Spec, std::path::PathBuf) {
    let spec = Spec {
        n_ff: 256,
        seed,
        ..Spec::default()
    };
    let path = spec.write_to(dir.path(), "silu");
    (spec, path)
}

/// `powerinferd prepare` on a test model: the calibration text in chunks of 128 tokens,
/// and `extra`.
fn prepare_small(model: &str, extra: &[&str]) -> powerinfer_tests::CliOutput {
    let mut args = vec!["prepare", model, "--calibration", CALIBRATION, "-c", "128"];
    args.extend_from_slice(extra);
    powerinferd(&args)
}

/// The held-out recall column of `prepare`'s table.
fn held_out_recalls(table: &str) -> Vec<f32> {
    table
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter_map(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn prepare_trains_predictors_that_catch_the_neurons_of_relu_models() {
    let dir = TempDir::new("sparsity-prepare-relu");
    for (arch, magic) in [("llama", Magic::PowerInfer), ("bamboo", Magic::Gguf)] {
        let spec = Spec {
            arch,
            magic,
            down_t: true,
            n_ff: 256,
            seed: 73,
            ..Spec::default()
        };
        let path = spec.write_to(dir.path(), arch);
        let p = path.to_str().unwrap();
        let o = prepare_small(
            p,
            &[
                "--max-tokens",
                "3072",
                "--rank",
                "64",
                "--recall",
                "0.97",
                "-t",
                "2",
            ],
        );
        assert_eq!(o.status, 0, "{arch}: {}\n{}", o.stdout, o.stderr);
        assert!(o.stderr.contains("ReLU-gated"), "{}", o.stderr);
        eprintln!("{arch} ({magic:?}):\n{}", o.stdout);
        let recalls = held_out_recalls(&o.stdout);
        assert_eq!(recalls.len(), spec.n_layer, "{}", o.stdout);
        assert!(
            recalls.iter().all(|&r| r >= 0.9),
            "{arch}: recall {recalls:?}\n{}",
            o.stdout
        );
        assert!(sidecar::path_for(&path).exists());

        // Load picks the sidecar up: predictor mode runs and computes fewer neurons than
        // dense while catching most of the gate's.
        let loaded = LoadedModel::load_for(&path, SparsityMode::Predictor).unwrap();
        let model = &loaded.model;
        assert!(model.sparsity.frequencies.is_some());
        let toks: Vec<u32> = loaded
            .tokenizer
            .encode("The licenses for most software are designed", true, false)
            .iter()
            .map(|t| t.0)
            .collect();
        let (_, pred) = run(model, &toks, SparsityMode::Predictor);
        let (_, gate) = run(model, &toks, SparsityMode::Gate);
        let (p_share, g_share) = (
            active_share(&pred, spec.n_ff),
            active_share(&gate, spec.n_ff),
        );
        assert!(
            p_share < 0.95 && p_share >= g_share * 0.9,
            "{arch}: predictor {p_share}, gate {g_share}"
        );
    }
}

#[test]
fn prepare_trains_predictors_of_silu_models_on_the_largest_outputs() {
    let dir = TempDir::new("sparsity-prepare-silu-pred");
    let (spec, path) = silu_model(&dir, 75);
    let p = path.to_str().unwrap();
    let o = prepare_small(
        p,
        &[
            "--max-tokens",
            "3072",
            "--target-sparsity",
            "0.5",
            "--rank",
            "64",
            "-t",
            "2",
        ],
    );
    assert_eq!(o.status, 0, "{}\n{}", o.stdout, o.stderr);
    eprintln!("{}", o.stdout);
    // The held-out columns: recall of the top half by |h|, and that half's share.
    let recalls = held_out_recalls(&o.stdout);
    assert_eq!(recalls.len(), spec.n_layer, "{}", o.stdout);
    assert!(recalls.iter().all(|&r| r >= 0.85), "recall {recalls:?}");
    let actual: Vec<f32> = o
        .stdout
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter_map(|(_, r)| {
            r.split_whitespace()
                .last()?
                .trim_end_matches('%')
                .parse()
                .ok()
        })
        .collect();
    assert!(
        actual.iter().all(|&a| (a - 50.0).abs() < 10.0),
        "positives {actual:?}"
    );
    let loaded = LoadedModel::load_for(&path, SparsityMode::Predictor).unwrap();
    let toks: Vec<u32> = loaded
        .tokenizer
        .encode("The licenses for most software are designed", true, false)
        .iter()
        .map(|t| t.0)
        .collect();
    let (_, pred) = run(&loaded.model, &toks, SparsityMode::Predictor);
    let share = active_share(&pred, spec.n_ff);
    assert!(
        share > 0.4 && share < 0.95,
        "predictor active share {share}"
    );
}

#[test]
fn prepare_calibrates_gate_thresholds_of_silu_models_to_the_target() {
    let dir = TempDir::new("sparsity-prepare-silu");
    let (spec, path) = silu_model(&dir, 74);
    let p = path.to_str().unwrap();
    // Before prepare, gate mode is refused with the way out named.
    let o = powerinferd(&[
        "perplexity",
        p,
        CALIBRATION,
        "-c",
        "64",
        "--sparsity",
        "gate",
    ]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    assert!(o.stderr.contains("sidecar"), "{}", o.stderr);

    let o = prepare_small(
        p,
        &[
            "--max-tokens",
            "2048",
            "--target-sparsity",
            "0.7",
            "--rank",
            "0",
        ],
    );
    assert_eq!(o.status, 0, "{}\n{}", o.stdout, o.stderr);
    let data = GgufFile::open(sidecar::path_for(&path)).unwrap();
    assert!(
        data.tensor("blk.0.fc1.weight").is_none(),
        "--rank 0 trains no predictors"
    );
    let loaded = LoadedModel::load_for(&path, SparsityMode::Gate).unwrap();
    let thresholds = loaded.model.sparsity.gate_thresholds.clone().unwrap();
    assert!(thresholds.iter().all(|&t| t > 0.0), "{thresholds:?}");
    let toks: Vec<u32> = loaded
        .tokenizer
        .encode(
            &std::fs::read_to_string(CALIBRATION).unwrap()[..2000],
            true,
            false,
        )
        .iter()
        .map(|t| t.0)
        .take(200)
        .collect();
    let (_, gate) = run(&loaded.model, &toks, SparsityMode::Gate);
    let share = active_share(&gate, spec.n_ff);
    assert!(
        (share - 0.3).abs() < 0.08,
        "active share {share}, target 0.3"
    );

    // The same command on a file that is not a model is refused cleanly.
    let o = powerinferd(&["prepare", CALIBRATION, "--calibration", CALIBRATION]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    // Bad targets too.
    let o = powerinferd(&[
        "prepare",
        p,
        "--calibration",
        CALIBRATION,
        "--target-sparsity",
        "1.5",
    ]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    assert!(o.stderr.contains("target sparsity"), "{}", o.stderr);
}
