//! The simulated device against the CPU reference: one hybrid layer (attention and the hot
//! side on the device, the cold side on the host) and the head give the bits of the same
//! layer computed on the host; budgets, bad calls and injected faults are typed errors.

use super::*;
use crate::ids::SeqSlot;
use crate::kv::{KvShape, KvType, LayerKv};
use crate::nn::Rope;
use crate::pool::ThreadPool;
use crate::profile::Profile;
use crate::quant::WeightType;
use crate::rng::Rng;
use crate::tensor::Activations;
use crate::transformer::{
    self, AttentionBlock, AttentionExtras, AttentionScratch, FfnScratch, Head, HeadScratch,
    NeuronFfn, PredictorScratch, SparsityMode,
};

const N_EMBD: usize = 64;
const N_FF: usize = 384;
const HOT: usize = 128;
const N_VOCAB: usize = 50;

struct Weights {
    attn_norm: Vec<f32>,
    attn: [Matrix; 4],
    ffn_norm: Vec<f32>,
    ffn: [Matrix; 3],
    predictor: Predictor,
    output_norm: Vec<f32>,
    output: Matrix,
}

fn random(rng: &mut Rng, wtype: WeightType, rows: usize, cols: usize) -> Matrix {
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.2).collect();
    Matrix::quantize(wtype, &v, rows, cols)
}

fn weights(rng: &mut Rng) -> Weights {
    let norm = |rng: &mut Rng| (0..N_EMBD).map(|_| rng.uniform(0.8, 1.2)).collect();
    let q4 = WeightType::Q4_1;
    Weights {
        attn_norm: norm(rng),
        attn: [
            random(rng, q4, 64, N_EMBD),
            random(rng, q4, 32, N_EMBD),
            random(rng, q4, 32, N_EMBD),
            random(rng, q4, N_EMBD, 64),
        ],
        ffn_norm: norm(rng),
        ffn: [
            random(rng, q4, N_FF, N_EMBD),
            random(rng, q4, N_FF, N_EMBD),
            random(rng, WeightType::Q8_0, N_FF, N_EMBD),
        ],
        predictor: Predictor {
            fc1: random(rng, WeightType::F16, 32, N_EMBD),
            fc2: random(rng, WeightType::F16, N_FF, 32),
            b1: Some((0..32).map(|_| rng.normal() * 0.1).collect()),
            b2: None,
        },
        output_norm: norm(rng),
        output: random(rng, WeightType::Q8_0, N_VOCAB, N_EMBD),
    }
}

fn spec() -> ModelSpec {
    ModelSpec {
        n_layer: 1,
        attention: transformer::AttentionShape {
            n_embd: N_EMBD,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            rms_eps: 1e-5,
        },
        rope: RopeSpec {
            n_rot: 16,
            base: 10000.0,
            freq_scale: 1.0,
            style: RopeStyle::Normal,
            freq_factors: None,
        },
        n_ff: N_FF,
        n_vocab: N_VOCAB,
        glu: Glu::Relu,
        numerics: Numerics::Precise,
        kv: KvShape {
            n_slots: 2,
            n_ctx: 8,
            n_head_kv: 2,
            head_dim: 16,
            ty: KvType::F16,
        },
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn place(dev: &mut SimulatedDevice, w: &Weights) -> Result<(), DeviceError> {
    let l = LayerId(0);
    dev.configure(&spec())?;
    dev.place_attention(
        l,
        &AttentionUpload {
            attn_norm: &w.attn_norm,
            wq: &w.attn[0],
            wk: &w.attn[1],
            wv: &w.attn[2],
            wo: &w.attn[3],
            ffn_norm: &w.ffn_norm,
        },
    )?;
    let hot = w.ffn.each_ref().map(|m| m.rows(0..HOT));
    dev.place_hot(
        l,
        &HotUpload {
            gate: &hot[0],
            up: &hot[1],
            down_t: &hot[2],
            gate_threshold: 0.0,
        },
    )?;
    dev.place_predictor(
        l,
        &PredictorUpload {
            predictor: &w.predictor,
            threshold: 0.0,
        },
    )?;
    dev.place_head(&HeadUpload {
        output_norm: &w.output_norm,
        output: &w.output,
    })
}

/// Two steps (a prompt of three tokens in two slots, then one token) of one hybrid layer,
/// on the device and on the host: the same FFN inputs, predictions, residual stream,
/// logits and counts, bit for bit.
#[test]
fn a_hybrid_layer_on_the_simulated_device_has_the_bits_of_the_host() {
    let mut rng = Rng::new(91);
    let w = weights(&mut rng);
    let sp = spec();
    let pool = ThreadPool::new(2, "host").unwrap();
    let mut dev = SimulatedDevice::new(1 << 24).unwrap();
    place(&mut dev, &w).unwrap();
    assert!(dev.info().memory_used > 0);

    let rope = Rope::new(16, 10000.0, 1.0, RopeStyle::Normal, None);
    let mut host_kv = LayerKv::try_new(sp.kv).unwrap();
    let block = AttentionBlock {
        shape: sp.attention,
        rope: &rope,
        attn_norm: &w.attn_norm,
        wq: &w.attn[0],
        wk: &w.attn[1],
        wv: &w.attn[2],
        wo: &w.attn[3],
        ffn_norm: &w.ffn_norm,
        extras: AttentionExtras::default(),
    };
    let (mut attn_s, mut pred_s) = (
        AttentionScratch::new(Numerics::Precise),
        PredictorScratch::new(Numerics::Precise),
    );
    let mut head_s = HeadScratch::new(Numerics::Precise);
    let modes = [
        SparsityMode::Predictor,
        SparsityMode::Gate,
        SparsityMode::Dense,
    ];
    let steps: [Vec<StepToken>; 2] = [
        (0..3)
            .map(|i| StepToken::new(i / 2, SeqSlot(i % 2), modes[i]))
            .collect(),
        vec![StepToken::new(2, SeqSlot(1), SparsityMode::Predictor)],
    ];
    for tokens in &steps {
        let n = tokens.len();
        let x0: Vec<f32> = (0..n * N_EMBD).map(|_| rng.normal()).collect();
        let mut cs = vec![[0.0; 2]; n * 8];
        for (t, tok) in tokens.iter().enumerate() {
            rope.cos_sin(tok.pos, &mut cs[t * 8..(t + 1) * 8]);
        }
        // The host alone.
        let (mut x, mut xn) = (x0.clone(), vec![0.0; n * N_EMBD]);
        let mut profile = Profile::default();
        block.run(
            &pool,
            tokens,
            &cs,
            &mut host_kv,
            &mut x,
            &mut xn,
            &mut attn_s,
            &mut profile,
        );
        let (want_x_attn, want_xn) = (x.clone(), xn.clone());
        w.predictor.logits(&pool, &x, n, &mut pred_s);
        let mut masks = [ActiveSet::new(0), ActiveSet::new(0)];
        transformer::select(pred_s.logits(), tokens, 0.0, 0..HOT, &mut masks[0]);
        transformer::select(pred_s.logits(), tokens, 0.0, HOT..N_FF, &mut masks[1]);
        let mut sides = Vec::new();
        for (k, rows) in [0..HOT, HOT..N_FF].into_iter().enumerate() {
            let m = w.ffn.each_ref().map(|m| m.rows(rows.clone()));
            let side = NeuronFfn {
                gate: &m[0],
                up: &m[1],
                down_t: &m[2],
                glu: Glu::Relu,
                gate_threshold: 0.0,
            };
            let mut acts = Activations::new();
            acts.set(&xn, n);
            let (mut out, mut counts) = (vec![0.0; n * N_EMBD], vec![0u32; n]);
            side.run(
                &pool,
                tokens,
                &mut acts,
                Some(&masks[k]),
                &mut FfnScratch::default(),
                &mut out,
                &mut counts,
                &mut profile,
            );
            sides.push((out, counts));
        }
        for ((xi, h), c) in x.iter_mut().zip(&sides[0].0).zip(&sides[1].0) {
            *xi += h + c;
        }
        let rows: Vec<u32> = (0..n as u32).collect();
        let mut want_logits = Vec::new();
        let head = Head {
            output_norm: &w.output_norm,
            output: &w.output,
            rms_eps: 1e-5,
        };
        head.run(&pool, &x, &rows, &mut head_s, &mut want_logits);

        // The device with the host's cold side.
        let l = LayerId(0);
        dev.submit(Op::Begin { tokens }).unwrap();
        dev.submit(Op::WriteResidual { x: &x0 }).unwrap();
        dev.submit(Op::Attention { layer: l }).unwrap();
        dev.submit(Op::Predict { layer: l }).unwrap();
        dev.submit(Op::ReadFfnInput {
            layer: l,
            into: FfnInput::default(),
        })
        .unwrap();
        let e = dev.record().unwrap();
        dev.submit(Op::HotFfn { layer: l }).unwrap();
        dev.wait(e).unwrap();
        let Some(Readback::FfnInput(input)) = dev.take() else {
            panic!("the FFN input comes back first")
        };
        assert_eq!(bits(&input.x), bits(&want_x_attn));
        assert_eq!(bits(&input.xn), bits(&want_xn));
        assert!(input.predicted);
        for t in 0..n {
            assert_eq!(input.cold_mask.token(t), masks[1].token(t), "token {t}");
        }
        dev.submit(Op::Merge {
            layer: l,
            cold: Some(&sides[1].0),
        })
        .unwrap();
        dev.submit(Op::ReadResidual { into: Vec::new() }).unwrap();
        dev.submit(Op::Head {
            rows: &rows,
            into: Vec::new(),
        })
        .unwrap();
        dev.submit(Op::ReadCounts { into: Vec::new() }).unwrap();
        let e = dev.record().unwrap();
        dev.wait(e).unwrap();
        let (Some(Readback::Residual(got_x)), Some(Readback::Logits(logits))) =
            (dev.take(), dev.take())
        else {
            panic!("residual, then logits")
        };
        assert_eq!(bits(&got_x), bits(&x));
        assert_eq!(bits(&logits), bits(&want_logits));
        let Some(Readback::Counts(counts)) = dev.take() else {
            panic!("counts last")
        };
        assert_eq!(counts, sides[0].1, "hot neurons computed per token");
        assert!(dev.take().is_none());
    }
}

#[test]
fn budgets_bad_calls_and_faults_are_typed_errors() {
    let mut rng = Rng::new(92);
    let w = weights(&mut rng);
    let mut small = SimulatedDevice::new(1000).unwrap();
    small.configure(&spec()).unwrap();
    let e = place(&mut small, &w).unwrap_err();
    assert!(
        matches!(e, DeviceError::OutOfMemory { free: 1000, .. }),
        "{e}"
    );
    assert_eq!(
        small.info().memory_used,
        0,
        "a refused upload takes nothing"
    );

    // Work on a layer that was never placed fails at the wait, and the device stays failed.
    let mut dev = SimulatedDevice::new(1 << 24).unwrap();
    dev.configure(&spec()).unwrap();
    let tokens = [StepToken::new(0, SeqSlot(0), SparsityMode::Dense)];
    dev.submit(Op::Begin { tokens: &tokens }).unwrap();
    dev.submit(Op::Attention { layer: LayerId(0) }).unwrap();
    let e = dev.record().unwrap();
    let err = dev.wait(e).unwrap_err();
    assert!(
        matches!(&err, DeviceError::Invalid(m) if m.contains("not placed")),
        "{err}"
    );
    assert_eq!(dev.submit(Op::Begin { tokens: &tokens }), Err(err));

    // An injected failure after two ops.
    let mut dev = SimulatedDevice::new(1 << 24).unwrap();
    place(&mut dev, &w).unwrap();
    dev.inject_fault(SimFault {
        after_ops: 2,
        kind: FaultKind::Error,
    });
    let x = vec![0.5; N_EMBD];
    dev.submit(Op::Begin { tokens: &tokens }).unwrap();
    dev.submit(Op::WriteResidual { x: &x }).unwrap();
    dev.submit(Op::Attention { layer: LayerId(0) }).unwrap();
    let e = dev.record().unwrap();
    let err = dev.wait(e).unwrap_err();
    assert!(
        matches!(&err, DeviceError::Failed(m) if m.contains("injected")),
        "{err}"
    );

    // An injected panic on the caller's thread.
    let mut dev = SimulatedDevice::new(1 << 24).unwrap();
    place(&mut dev, &w).unwrap();
    dev.inject_fault(SimFault {
        after_ops: 0,
        kind: FaultKind::Panic,
    });
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = dev.submit(Op::Begin { tokens: &tokens });
    }));
    assert!(panicked.is_err());
}
