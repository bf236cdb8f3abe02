//! Sparsity modes on random-weight models written by the tests: gate mode is exact on
//! ReLU-gated models, a request's numbers do not depend on its batch neighbours' modes,
//! and the sidecar is read, checked and required where a mode needs it.

use powerinfer_daemon::generate::LoadedModel;
use powerinfer_daemon::ids::{SeqSlot, TokenId};
use powerinfer_daemon::model::sidecar::{self, SidecarData};
use powerinfer_daemon::model::{BatchToken, KvCache, KvType, Model, Scratch, SparsityMode};
use powerinfer_ops::gguf::{GgufFile, Magic};
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::{Numerics, WeightType};
use powerinfer_tests::TempDir;
use powerinfer_tests::synth::Spec;

/// Logits after every token of `toks`, one token per step, in `mode`; and the active
/// neuron counts of every step.
fn run(model: &Model, toks: &[u32], mode: SparsityMode) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let c = &model.config;
    let pool = ThreadPool::new(2, "test").unwrap();
    let mut kv = KvCache::new(
        c.n_layer,
        1,
        toks.len(),
        c.n_head_kv,
        c.head_dim,
        KvType::F32,
    );
    let mut s = Scratch::new(Numerics::Precise);
    let mut logits = Vec::new();
    let mut counts = Vec::new();
    for (i, &t) in toks.iter().enumerate() {
        let b = BatchToken {
            token: TokenId(t),
            slot: SeqSlot(0),
            pos: i,
            logits: true,
            sparsity: mode,
        };
        logits.push(
            model
                .forward(&pool, &[b], &mut kv, &mut s)
                .unwrap()
                .to_vec(),
        );
        counts.push(s.active_counts.clone());
    }
    (logits, counts)
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 256).collect()
}

#[test]
fn gate_mode_is_dense_mode_bit_for_bit_on_relu_gated_models() {
    for (arch, magic) in [("llama", Magic::PowerInfer), ("bamboo", Magic::Gguf)] {
        let spec = Spec {
            arch,
            magic,
            down_t: true,
            wtype: WeightType::Q4_0,
            n_ff: 320,
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
            "{arch}: gate mode must equal dense mode exactly"
        );
        let n_ff = spec.n_ff as u32;
        assert!(dense_counts.iter().flatten().all(|&c| c == n_ff));
        let active: u32 = gate_counts.iter().flatten().sum();
        let all = n_ff * gate_counts.iter().flatten().count() as u32;
        // Random ReLU gates fire about half the time (dReLU: the gate alone decides here).
        assert!(
            active > all / 5 && active < all * 4 / 5,
            "{arch}: {active} of {all}"
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
