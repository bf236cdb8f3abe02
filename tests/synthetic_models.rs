//! The forward pass on small random-weight models (ReGLU, dReLU, GQA ratios, odd sizes,
//! partial RoPE, tied embeddings, every weight type) against an independent float64
//! reference forward pass, plus batch/sequential equality and load errors.

use powerinfer_daemon::model::{FfnKind, KvType, LoadError, Model};
use powerinfer_ops::gguf::{GgufFile, Magic};
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::rng::Rng;
use powerinfer_tests::engine_logits;
use powerinfer_tests::synth::{Spec, reference_logits};

fn tokens(spec: &Spec, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| rng.below(spec.n_vocab() as u64) as u32)
        .collect()
}

/// Largest |engine − reference| relative to the reference logits' spread. F32 weights
/// meet f32 activations (float rounding only); F16 and BF16 weights meet activations
/// rounded to their own type as GGML does (2^-11 and 2^-8 per value); the 32-element
/// quant types meet two-level 8-bit activations (~2^-15); k-quants and IQ4_XS still meet GGML's
/// Q8_K (one 8-bit scale per 256 values), whose rounding this random network amplifies to
/// several percent of the logit spread.
fn tolerance(t: WeightType) -> f64 {
    match t {
        WeightType::F32 => 1e-5,
        WeightType::F16 => 4e-3,
        WeightType::BF16 => 3e-2,
        WeightType::Q2_K
        | WeightType::Q3_K
        | WeightType::Q4_K
        | WeightType::Q5_K
        | WeightType::Q6_K
        | WeightType::IQ4_XS => 1e-1,
        _ => 1e-3,
    }
}

fn check(spec: &Spec) {
    let bytes = spec.to_gguf();
    let file = GgufFile::from_bytes(&bytes).unwrap();
    let toks = tokens(spec, 9, spec.seed + 100);
    let want = reference_logits(&file, spec, &toks);
    let got = engine_logits(&file, &toks, KvType::F32, true);
    let spread = {
        let all: Vec<f64> = want.iter().flatten().copied().collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        (all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt()
    };
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((f64::from(*a) - b).abs() / spread);
        }
    }
    eprintln!(
        "{:?} {} {}: worst relative error {worst:.2e}",
        spec.wtype, spec.arch, spec.n_embd
    );
    assert!(
        worst <= tolerance(spec.wtype),
        "{spec:?}: worst relative error {worst}"
    );
}

#[test]
fn swiglu_with_every_gqa_ratio() {
    for n_head_kv in [1, 2, 3, 6] {
        check(&Spec {
            n_embd: 96,
            n_head: 6,
            n_head_kv,
            seed: 10 + n_head_kv as u64,
            ..Spec::default()
        });
    }
}

#[test]
fn reglu_from_a_powerinfer_file() {
    let spec = Spec {
        magic: Magic::PowerInfer,
        wtype: WeightType::Q8_0,
        seed: 20,
        ..Spec::default()
    };
    let file = GgufFile::from_bytes(&spec.to_gguf()).unwrap();
    assert_eq!(Model::load(&file).unwrap().config.ffn, FfnKind::ReGlu);
    check(&spec);
}

#[test]
fn drelu_bamboo() {
    let spec = Spec {
        arch: "bamboo",
        wtype: WeightType::Q4_1,
        seed: 30,
        ..Spec::default()
    };
    let file = GgufFile::from_bytes(&spec.to_gguf()).unwrap();
    assert_eq!(Model::load(&file).unwrap().config.ffn, FfnKind::DRelu);
    check(&spec);
}

#[test]
fn explicit_activation_key_marks_a_relu_llama() {
    check(&Spec {
        ffn_activation: Some("relu"),
        wtype: WeightType::F16,
        seed: 35,
        ..Spec::default()
    });
}

#[test]
fn odd_sizes_partial_rope_and_tied_output() {
    check(&Spec {
        n_embd: 96,
        n_ff: 160,
        n_head: 3,
        n_head_kv: 1,
        n_rot: Some(16),
        rope_base: 500_000.0,
        n_layer: 3,
        tied_output: true,
        wtype: WeightType::Q4_0,
        seed: 40,
        ..Spec::default()
    });
}

#[test]
fn every_weight_type() {
    for (i, wtype) in WeightType::ALL.into_iter().enumerate() {
        // k-quant (and IQ4_XS) rows are whole 256-value super-blocks.
        let wide = wtype.ggml().block_len() == 256;
        check(&Spec {
            n_embd: if wide { 256 } else { 64 },
            n_ff: if wide { 512 } else { 96 },
            wtype,
            seed: 50 + i as u64,
            ..Spec::default()
        });
    }
}

#[test]
fn a_batch_equals_token_by_token_bit_for_bit() {
    for wtype in [WeightType::Q4_1, WeightType::Q8_0, WeightType::F16] {
        let spec = Spec {
            wtype,
            seed: 60,
            ..Spec::default()
        };
        let file = GgufFile::from_bytes(&spec.to_gguf()).unwrap();
        let toks = tokens(&spec, 17, 61);
        let batched = engine_logits(&file, &toks, KvType::F16, true);
        let stepped = engine_logits(&file, &toks, KvType::F16, false);
        for (i, (a, b)) in batched.iter().zip(&stepped).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{wtype:?} position {i}"
            );
        }
    }
}

#[test]
fn f16_cache_stays_close_to_f32() {
    let spec = Spec {
        wtype: WeightType::Q8_0,
        seed: 70,
        ..Spec::default()
    };
    let file = GgufFile::from_bytes(&spec.to_gguf()).unwrap();
    let toks = tokens(&spec, 12, 71);
    let a = engine_logits(&file, &toks, KvType::F16, true);
    let b = engine_logits(&file, &toks, KvType::F32, true);
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst < 0.05, "f16 vs f32 cache: {worst}");
}

#[test]
fn broken_models_are_refused_with_the_reason() {
    use powerinfer_ops::gguf::{GgufWriter, Value};
    let spec = Spec::default();
    let file = GgufFile::from_bytes(&spec.to_gguf()).unwrap();
    // Rebuild the file without one tensor, with a wrong shape, and with an unknown arch.
    let rebuild = |skip: &str, arch: Option<&str>, reshape: Option<&str>| {
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata().iter() {
            let v = match (k, arch) {
                ("general.architecture", Some(a)) => Value::String(a.into()),
                _ => v.clone(),
            };
            w.add_metadata(k, v).unwrap();
        }
        for t in file.tensors().iter().filter(|t| t.name != skip) {
            let dims = if Some(t.name.as_str()) == reshape {
                vec![t.dims[1], t.dims[0]]
            } else {
                t.dims.clone()
            };
            w.add_tensor(&t.name, t.dtype, &dims, file.tensor_bytes(t))
                .unwrap();
        }
        GgufFile::from_bytes(&w.to_bytes()).unwrap()
    };
    let err = |f: &GgufFile| Model::load(f).err().expect("refused");
    assert!(
        matches!(err(&rebuild("blk.1.ffn_up.weight", None, None)), LoadError::MissingTensor { name } if name == "blk.1.ffn_up.weight")
    );
    assert!(matches!(
        err(&rebuild("", None, Some("blk.0.attn_k.weight"))),
        LoadError::Shape { .. }
    ));
    let e = err(&rebuild("", Some("gpt-j"), None));
    assert!(e.to_string().contains("gpt-j"), "{e}");

    // A weight in a type GGUF knows and the CPU kernels do not compute with.
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata().iter() {
        w.add_metadata(k, v.clone()).unwrap();
    }
    let retyped = "blk.0.attn_k.weight";
    let foreign = powerinfer_ops::GgmlType::MXFP4;
    assert!(WeightType::from_ggml(foreign).is_none());
    for t in file.tensors() {
        if t.name == retyped {
            let n: u64 = t.dims.iter().product();
            let bytes = vec![0u8; foreign.bytes_for(n).unwrap() as usize];
            w.add_tensor(&t.name, foreign, &t.dims, bytes).unwrap();
        } else {
            w.add_tensor(&t.name, t.dtype, &t.dims, file.tensor_bytes(t))
                .unwrap();
        }
    }
    let e = err(&GgufFile::from_bytes(&w.to_bytes()).unwrap());
    let msg = e.to_string();
    assert!(
        msg.contains(retyped) && msg.contains("MXFP4"),
        "refusal names the tensor and its type: {msg}"
    );
}

#[test]
fn neuron_major_down_from_a_powerinfer_file() {
    for (arch, magic) in [("llama", Magic::PowerInfer), ("bamboo", Magic::Gguf)] {
        check(&Spec {
            arch,
            magic,
            down_t: true,
            wtype: WeightType::Q8_0,
            seed: 60,
            ..Spec::default()
        });
    }
}
