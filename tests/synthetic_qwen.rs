//! The `qwen2` and `qwen3` forward passes on small random-weight models against an
//! independent float64 transcription of each architecture (`synth_qwen`), batched and
//! token by token, and a Qwen 2 file missing a bias refused by name.

use powerinfer_daemon::model::{KvType, LoadError, Model, SparsityMode};
use powerinfer_ops::gguf::GgufFile;
use powerinfer_ops::rng::Rng;
use powerinfer_tests::engine_logits;
use powerinfer_tests::synth_qwen::{Qwen, QwenSpec, qwen_reference};

/// Largest |engine − reference| relative to the reference logits' spread allowed with F32
/// weights and f32 activations: float rounding only, as for the llama models.
const F32_TOLERANCE: f64 = 1e-5;

fn spec(arch: Qwen, seed: u64) -> QwenSpec {
    QwenSpec {
        arch,
        n_vocab: 80,
        n_embd: 64,
        n_ff: 96,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        rope_base: 1e6,
        rms_eps: 1e-6,
        tied_output: false,
        qwen3_biases: false,
        seed,
    }
}

/// Checks the engine against the reference, batched and token by token; returns the
/// worst relative error.
fn check(spec: &QwenSpec) -> f64 {
    let w = spec.weights();
    let bytes = spec.to_gguf(&w, &[]);
    let file = GgufFile::from_bytes(&bytes).unwrap();
    let mut rng = Rng::new(spec.seed + 100);
    let toks: Vec<u32> = (0..11)
        .map(|_| rng.below(spec.n_vocab as u64) as u32)
        .collect();
    let want = qwen_reference(spec, &w, &toks);
    let all: Vec<f64> = want.iter().flatten().copied().collect();
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let spread = (all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
    let mut worst = 0.0f64;
    for batched in [true, false] {
        let got = engine_logits(&file, &toks, KvType::F32, batched);
        assert_eq!(got.len(), want.len());
        for (g, r) in got.iter().zip(&want) {
            assert_eq!(g.len(), spec.n_vocab);
            for (a, b) in g.iter().zip(r) {
                worst = worst.max((f64::from(*a) - b).abs() / spread);
            }
        }
    }
    eprintln!(
        "{} head_dim {}: worst relative error {worst:.2e} (spread {spread:.3})",
        spec.arch.name(),
        spec.head_dim
    );
    assert!(
        worst <= F32_TOLERANCE,
        "{spec:?}: worst relative error {worst}"
    );
    worst
}

#[test]
fn qwen2_with_qkv_biases_matches_the_reference() {
    check(&spec(Qwen::Qwen2, 1));
    check(&QwenSpec {
        tied_output: true,
        n_head_kv: 1,
        n_layer: 3,
        ..spec(Qwen::Qwen2, 2)
    });
}

#[test]
fn qwen3_with_its_own_head_size_matches_the_reference() {
    // 4 heads of 24 over an embedding of 64: the query width (96) is not n_embd.
    let s = QwenSpec {
        head_dim: 24,
        ..spec(Qwen::Qwen3, 3)
    };
    let file = GgufFile::from_bytes(&s.to_gguf(&s.weights(), &[])).unwrap();
    let c = Model::load(&file).unwrap().config;
    assert_eq!((c.head_dim, c.n_embd_q(), c.n_embd_kv()), (24, 96, 48));
    check(&s);
    check(&QwenSpec {
        head_dim: 16,
        tied_output: true,
        qwen3_biases: true,
        ..spec(Qwen::Qwen3, 4)
    });
}

#[test]
fn a_qwen2_file_missing_a_bias_is_refused_by_name() {
    let s = spec(Qwen::Qwen2, 6);
    let w = s.weights();
    for missing in ["blk.1.attn_v.bias", "blk.0.attn_q.bias"] {
        let file = GgufFile::from_bytes(&s.to_gguf(&w, &[missing])).unwrap();
        let e = Model::load(&file).err().expect("refused");
        assert!(
            matches!(&e, LoadError::MissingTensor { name } if name == missing),
            "{e}"
        );
        assert!(e.to_string().contains(missing), "{e}");
    }
    // A Qwen 3 file with only some of its optional biases is refused the same way.
    let s3 = QwenSpec {
        qwen3_biases: true,
        ..spec(Qwen::Qwen3, 7)
    };
    let file = GgufFile::from_bytes(&s3.to_gguf(&s3.weights(), &["blk.0.attn_k.bias"])).unwrap();
    let e = Model::load(&file).err().expect("refused");
    assert!(e.to_string().contains("blk.0.attn_k.bias"), "{e}");
}

#[test]
fn qwen_models_refuse_a_device_placement_with_the_reason() {
    for arch in [Qwen::Qwen2, Qwen::Qwen3] {
        let s = spec(arch, 8);
        let file = GgufFile::from_bytes(&s.to_gguf(&s.weights(), &[])).unwrap();
        let model = Model::load(&file).unwrap();
        let why = model.config.device_unsupported().expect("host only");
        assert!(
            why.contains(arch.name()) && why.contains("--device cpu"),
            "{why}"
        );
        assert!(model.sparsity_unavailable(SparsityMode::Gate).is_some());
    }
}
