//! The kernel device (the device trait as kernel launches) on the CPU execution harness
//! against the simulated device, which computes each op with the CPU reference: the same
//! op sequence of two hybrid layers and the head, over a prompt step and a decode step,
//! gives the same FFN inputs, predictions, residual stream, logits and hot-neuron counts
//! up to the rounding of f32 sums taken in another order. The simulated device holds the
//! weights' exact values as F32 (the CPU reference rounds activations for quantized and
//! half-precision weights; the kernels multiply f32 activations), so the tolerances are
//! those of f32 arithmetic and the predicted masks agree exactly. Budgets and bad calls
//! are typed errors that leave the device usable.
#![allow(clippy::unwrap_used)]

use powerinfer_kernels_cuda::harness::HarnessBackend;
use powerinfer_kernels_cuda::{Backend, KernelDevice, computes_with};
use powerinfer_ops::device::{
    AttentionUpload, Device, DeviceError, DeviceKind, FfnInput, HeadUpload, HotUpload, ModelSpec,
    Op, PredictorUpload, Readback, RopeSpec, SimulatedDevice,
};
use powerinfer_ops::ids::{LayerId, SeqSlot};
use powerinfer_ops::kv::{KvShape, KvType};
use powerinfer_ops::nn::{Glu, RopeStyle};
use powerinfer_ops::quant::{Numerics, WeightType};
use powerinfer_ops::rng::Rng;
use powerinfer_ops::sparse::ActiveSet;
use powerinfer_ops::tensor::Matrix;
use powerinfer_ops::transformer::{AttentionShape, Predictor, SparsityMode, StepToken};

/// The residual stream and FFN inputs: f32 sums of a few hundred terms in another order,
/// through two layers, relative to the largest value (measured: under 2.3e-6).
const STREAM_TOL: f32 = 1e-5;
/// Logits: the stream through the norm and one more matrix (measured: under 2.4e-6).
const LOGIT_TOL: f32 = 1e-5;

const N_FF: usize = 384;
const HOT: usize = 128;
const N_VOCAB: usize = 50;
const N_CTX: usize = 8;

pub struct Case {
    name: &'static str,
    warp: u32,
    n_embd: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    /// wq, wk, wv, wo, gate, up, down_t, output.
    types: [WeightType; 8],
    kv: KvType,
    glu: Glu,
    style: RopeStyle,
}

struct LayerWeights {
    attn_norm: Vec<f32>,
    attn: [Matrix; 4],
    ffn_norm: Vec<f32>,
    ffn: [Matrix; 3],
}

struct Weights {
    layers: [LayerWeights; 2],
    predictor: Predictor,
    output_norm: Vec<f32>,
    output: Matrix,
}

fn random(rng: &mut Rng, wtype: WeightType, rows: usize, cols: usize) -> Matrix {
    // Unit-sized outputs at every width, so attention scores stay moderate.
    let scale = 1.6 / (cols as f32).sqrt();
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * scale).collect();
    Matrix::quantize(wtype, &v, rows, cols)
}

/// `m`'s values exactly, as F32: the simulated device computes with these in plain f32
/// arithmetic, where with the quantized matrix it would first round the activations to
/// the weight type's activation format (8-bit blocks for the K-quants, f16, bf16).
fn exact(m: &Matrix) -> Matrix {
    let mut v = vec![0.0; m.n_rows() * m.n_cols()];
    for (r, row) in v.chunks_exact_mut(m.n_cols()).enumerate() {
        m.dequantize_row(r, row);
    }
    Matrix::quantize(WeightType::F32, &v, m.n_rows(), m.n_cols())
}

impl Weights {
    fn exact(&self) -> Self {
        let layer = |l: &LayerWeights| LayerWeights {
            attn_norm: l.attn_norm.clone(),
            attn: l.attn.each_ref().map(exact),
            ffn_norm: l.ffn_norm.clone(),
            ffn: l.ffn.each_ref().map(exact),
        };
        let p = &self.predictor;
        Self {
            layers: self.layers.each_ref().map(layer),
            predictor: Predictor {
                fc1: exact(&p.fc1),
                fc2: exact(&p.fc2),
                b1: p.b1.clone(),
                b2: p.b2.clone(),
            },
            output_norm: self.output_norm.clone(),
            output: exact(&self.output),
        }
    }
}

fn weights(c: &Case, rng: &mut Rng) -> Weights {
    let n = c.n_embd;
    let (q, kv) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let norm = |rng: &mut Rng| (0..n).map(|_| rng.uniform(0.8, 1.2)).collect();
    let t = c.types;
    let layer = |rng: &mut Rng| LayerWeights {
        attn_norm: norm(rng),
        attn: [
            random(rng, t[0], q, n),
            random(rng, t[1], kv, n),
            random(rng, t[2], kv, n),
            random(rng, t[3], n, q),
        ],
        ffn_norm: norm(rng),
        ffn: [
            random(rng, t[4], N_FF, n),
            random(rng, t[5], N_FF, n),
            random(rng, t[6], N_FF, n),
        ],
    };
    let layers = [layer(rng), layer(rng)];
    Weights {
        layers,
        predictor: Predictor {
            fc1: random(rng, WeightType::F16, 32, n),
            fc2: random(rng, WeightType::F16, N_FF, 32),
            b1: Some((0..32).map(|_| rng.normal() * 0.1).collect()),
            b2: Some((0..N_FF).map(|_| rng.normal() * 0.1).collect()),
        },
        output_norm: norm(rng),
        output: random(rng, t[7], N_VOCAB, n),
    }
}

fn spec(c: &Case) -> ModelSpec {
    ModelSpec {
        n_layer: 2,
        attention: AttentionShape {
            n_embd: c.n_embd,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            rms_eps: 1e-5,
        },
        rope: RopeSpec {
            n_rot: c.head_dim,
            base: 10000.0,
            freq_scale: 1.0,
            style: c.style,
            freq_factors: None,
        },
        n_ff: N_FF,
        n_vocab: N_VOCAB,
        glu: c.glu,
        numerics: Numerics::Precise,
        kv: KvShape {
            n_slots: 2,
            n_ctx: N_CTX,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            ty: c.kv,
        },
    }
}

/// Layer 0: attention, the first `HOT` neurons and the predictor (the rest are the
/// host's). Layer 1: attention and every neuron, chosen by masks from the host.
fn place(dev: &mut dyn Device, c: &Case, w: &Weights) -> Result<(), DeviceError> {
    dev.configure(&spec(c))?;
    for (l, lw) in w.layers.iter().enumerate() {
        let l = LayerId(l);
        dev.place_attention(
            l,
            &AttentionUpload {
                attn_norm: &lw.attn_norm,
                wq: &lw.attn[0],
                wk: &lw.attn[1],
                wv: &lw.attn[2],
                wo: &lw.attn[3],
                ffn_norm: &lw.ffn_norm,
            },
        )?;
        let rows = if l.0 == 0 { HOT } else { N_FF };
        let hot = lw.ffn.each_ref().map(|m| m.rows(0..rows));
        dev.place_hot(
            l,
            &HotUpload {
                gate: &hot[0],
                up: &hot[1],
                down_t: &hot[2],
                gate_threshold: 0.05,
            },
        )?;
    }
    dev.place_predictor(
        LayerId(0),
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

/// What one step returned.
#[derive(Debug)]
struct StepOut {
    ffn_input: [FfnInput; 2],
    residual: Vec<f32>,
    logits: Vec<f32>,
    counts: Vec<u32>,
}

/// A step's host data: the residual stream it starts from, layer 0's cold partial sum,
/// layer 1's masks.
struct StepIn {
    tokens: Vec<StepToken>,
    x0: Vec<f32>,
    cold: Vec<f32>,
    mask: ActiveSet,
}

fn step(dev: &mut dyn Device, s: &StepIn) -> StepOut {
    let (l0, l1) = (LayerId(0), LayerId(1));
    let n = s.tokens.len();
    dev.submit(Op::Begin { tokens: &s.tokens }).unwrap();
    dev.submit(Op::WriteResidual { x: &s.x0 }).unwrap();
    dev.submit(Op::Attention { layer: l0 }).unwrap();
    dev.submit(Op::Predict { layer: l0 }).unwrap();
    dev.submit(Op::ReadFfnInput {
        layer: l0,
        into: FfnInput::default(),
    })
    .unwrap();
    let e = dev.record().unwrap();
    dev.submit(Op::HotFfn { layer: l0 }).unwrap();
    dev.wait(e).unwrap();
    let Some(Readback::FfnInput(in0)) = dev.take() else {
        panic!("layer 0's FFN input comes back first")
    };
    dev.submit(Op::Merge {
        layer: l0,
        cold: Some(&s.cold),
    })
    .unwrap();
    dev.submit(Op::Attention { layer: l1 }).unwrap();
    dev.submit(Op::ReadFfnInput {
        layer: l1,
        into: FfnInput::default(),
    })
    .unwrap();
    dev.submit(Op::WriteMask {
        layer: l1,
        mask: &s.mask,
    })
    .unwrap();
    dev.submit(Op::HotFfn { layer: l1 }).unwrap();
    dev.submit(Op::Merge {
        layer: l1,
        cold: None,
    })
    .unwrap();
    dev.submit(Op::ReadResidual { into: Vec::new() }).unwrap();
    let rows: Vec<u32> = (0..n as u32).rev().collect();
    dev.submit(Op::Head {
        rows: &rows,
        into: Vec::new(),
    })
    .unwrap();
    dev.submit(Op::ReadCounts { into: Vec::new() }).unwrap();
    let e = dev.record().unwrap();
    dev.wait(e).unwrap();
    let mut next = || dev.take().expect("a readback per read op");
    let (
        Readback::FfnInput(in1),
        Readback::Residual(residual),
        Readback::Logits(logits),
        Readback::Counts(counts),
    ) = (next(), next(), next(), next())
    else {
        panic!("FFN input, residual, logits, counts in submission order")
    };
    assert!(dev.take().is_none());
    StepOut {
        ffn_input: [in0, in1],
        residual,
        logits,
        counts,
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

fn inputs(c: &Case, rng: &mut Rng) -> Vec<StepIn> {
    let modes = [
        SparsityMode::Predictor,
        SparsityMode::Gate,
        SparsityMode::Dense,
        SparsityMode::Predictor,
        SparsityMode::Predictor,
    ];
    let prompt: Vec<StepToken> = (0..5)
        .map(|i| StepToken::new(i / 2, SeqSlot(i % 2), modes[i]))
        .collect();
    let decode = vec![
        StepToken::new(3, SeqSlot(0), SparsityMode::Predictor),
        StepToken::new(2, SeqSlot(1), SparsityMode::Gate),
    ];
    [prompt, decode]
        .into_iter()
        .map(|tokens| {
            let n = tokens.len();
            let mut mask = ActiveSet::new(N_FF);
            for t in &tokens {
                if t.mode == SparsityMode::Predictor {
                    let rows: Vec<u32> = (0..N_FF as u32)
                        .filter(|_| rng.uniform(0.0, 1.0) < 0.3)
                        .collect();
                    mask.push_token(rows);
                } else {
                    mask.push_token([]);
                }
            }
            StepIn {
                x0: (0..n * c.n_embd).map(|_| rng.normal()).collect(),
                cold: (0..n * c.n_embd).map(|_| rng.normal() * 0.3).collect(),
                mask,
                tokens,
            }
        })
        .collect()
}

fn check(c: &Case, seed: u64) {
    check_on(c, seed, HarnessBackend::new(c.warp, 1 << 28));
}

pub fn check_on<B: Backend>(c: &Case, seed: u64, backend: B) {
    let mut rng = Rng::new(seed);
    let w = weights(c, &mut rng);
    let steps = inputs(c, &mut rng);
    let mut dev = KernelDevice::new(backend, DeviceKind::Cuda, "device".into(), 1 << 26);
    place(&mut dev, c, &w).unwrap();
    let mut sim = SimulatedDevice::new(1 << 26).unwrap();
    place(&mut sim, c, &w).unwrap();
    assert_eq!(
        dev.info().memory_used,
        sim.info().memory_used,
        "{}: the same placements take the same bytes",
        c.name
    );
    let mut sim = SimulatedDevice::new(1 << 28).unwrap();
    place(&mut sim, c, &w.exact()).unwrap();
    let mut active = 0;
    for (k, s) in steps.iter().enumerate() {
        let want = step(&mut sim, s);
        let got = step(&mut dev, s);
        let at = |what: &str| format!("{} step {k}: {what}", c.name);
        for l in 0..2 {
            let (g, w) = (&got.ffn_input[l], &want.ffn_input[l]);
            assert_close(&at(&format!("layer {l} x")), &g.x, &w.x, STREAM_TOL);
            assert_close(&at(&format!("layer {l} xn")), &g.xn, &w.xn, STREAM_TOL);
            assert_eq!(g.predicted, w.predicted, "{}", at("predicted"));
            assert_eq!(g.predicted, l == 0);
            if g.predicted {
                assert_eq!(g.cold_mask.n_tok(), s.tokens.len());
                for t in 0..s.tokens.len() {
                    assert_eq!(
                        g.cold_mask.token(t),
                        w.cold_mask.token(t),
                        "{}",
                        at(&format!("cold prediction of token {t}"))
                    );
                    active += g.cold_mask.token(t).len();
                }
            }
        }
        assert_close(&at("residual"), &got.residual, &want.residual, STREAM_TOL);
        assert_close(&at("logits"), &got.logits, &want.logits, LOGIT_TOL);
        assert_eq!(got.counts, want.counts, "{}", at("hot neurons per token"));
    }
    assert!(
        active > 0,
        "{}: the predictor chose some cold neurons",
        c.name
    );
}

pub fn q4_1_case() -> (Case, u64) {
    (
        Case {
            name: "q4_1",
            warp: 32,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            types: [
                WeightType::Q4_1,
                WeightType::Q4_1,
                WeightType::Q4_1,
                WeightType::Q4_1,
                WeightType::Q4_1,
                WeightType::Q4_1,
                WeightType::Q8_0,
                WeightType::Q8_0,
            ],
            kv: KvType::F16,
            glu: Glu::Relu,
            style: RopeStyle::Normal,
        },
        101,
    )
}

#[test]
fn q4_1_gqa_relu_at_warp_32() {
    let (c, seed) = q4_1_case();
    check(&c, seed);
}

pub fn k_quant_case() -> (Case, u64) {
    (
        Case {
            name: "k-quants",
            warp: 64,
            n_embd: 256,
            n_head: 4,
            n_head_kv: 1,
            head_dim: 64,
            types: [
                WeightType::Q4_K,
                WeightType::Q5_K,
                WeightType::Q6_K,
                WeightType::Q5_0,
                WeightType::Q5_1,
                WeightType::Q4_0,
                WeightType::F16,
                WeightType::BF16,
            ],
            kv: KvType::F32,
            glu: Glu::Silu,
            style: RopeStyle::Neox,
        },
        102,
    )
}

#[test]
fn k_quants_mqa_silu_neox_f32_cache_at_warp_64() {
    let (c, seed) = k_quant_case();
    check(&c, seed);
}

pub fn float_case() -> (Case, u64) {
    (
        Case {
            name: "f32",
            warp: 32,
            n_embd: 64,
            n_head: 2,
            n_head_kv: 2,
            head_dim: 32,
            types: [
                WeightType::F32,
                WeightType::BF16,
                WeightType::F16,
                WeightType::F32,
                WeightType::F32,
                WeightType::F16,
                WeightType::BF16,
                WeightType::F32,
            ],
            kv: KvType::F16,
            glu: Glu::Gelu,
            style: RopeStyle::Normal,
        },
        103,
    )
}

#[test]
fn float_weights_gelu_at_warp_32() {
    let (c, seed) = float_case();
    check(&c, seed);
}

fn q4_case() -> Case {
    Case {
        name: "errors",
        warp: 32,
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        types: [WeightType::Q4_1; 8],
        kv: KvType::F16,
        glu: Glu::Relu,
        style: RopeStyle::Normal,
    }
}

#[test]
fn budgets_and_bad_calls_are_typed_errors_that_leave_the_device_usable() {
    let c = q4_case();
    let mut rng = Rng::new(104);
    let w = weights(&c, &mut rng);

    // A budget too small for the first placement: refused, nothing taken.
    let mut small = KernelDevice::new(
        HarnessBackend::new(32, 1 << 28),
        DeviceKind::Cuda,
        "small".into(),
        1000,
    );
    let e = place(&mut small, &c, &w).unwrap_err();
    assert!(
        matches!(e, DeviceError::OutOfMemory { free: 1000, .. }),
        "{e}"
    );
    assert_eq!(small.info().memory_used, 0);

    // Device memory that runs out below the budget (the backend's own allocation fails).
    let mut tight = KernelDevice::new(
        HarnessBackend::new(32, 4096),
        DeviceKind::Cuda,
        "tight".into(),
        1 << 26,
    );
    let e = place(&mut tight, &c, &w).unwrap_err();
    assert!(matches!(e, DeviceError::OutOfMemory { .. }), "{e}");
    assert_eq!(tight.info().memory_used, 0, "a failed placement is undone");

    let mut dev = KernelDevice::new(
        HarnessBackend::new(32, 1 << 28),
        DeviceKind::Cuda,
        "dev".into(),
        1 << 26,
    );
    let tokens = [StepToken::new(0, SeqSlot(0), SparsityMode::Predictor)];
    // Before configuration.
    assert!(matches!(
        dev.submit(Op::Begin { tokens: &tokens }),
        Err(DeviceError::Invalid(_))
    ));
    dev.configure(&spec(&c)).unwrap();
    // An unplaced layer, a position outside the cache, a residual of the wrong size, a
    // hot side without its FFN input: each refused, the device still works after.
    dev.submit(Op::Begin { tokens: &tokens }).unwrap();
    let err = dev.submit(Op::Attention { layer: LayerId(0) }).unwrap_err();
    assert!(
        matches!(&err, DeviceError::Invalid(m) if m.contains("not placed")),
        "{err}"
    );
    let far = [StepToken::new(N_CTX, SeqSlot(0), SparsityMode::Dense)];
    let err = dev.submit(Op::Begin { tokens: &far }).unwrap_err();
    assert!(
        matches!(&err, DeviceError::Invalid(m) if m.contains("outside the KV cache")),
        "{err}"
    );
    assert!(matches!(
        dev.submit(Op::WriteResidual { x: &[1.0; 3] }),
        Err(DeviceError::Invalid(_))
    ));
    assert!(matches!(
        dev.submit(Op::Attention { layer: LayerId(9) }),
        Err(DeviceError::Invalid(_))
    ));

    // Now placed, a full step runs on the same device and matches the simulated one.
    let mut dev2 = KernelDevice::new(
        HarnessBackend::new(32, 1 << 28),
        DeviceKind::Cuda,
        "dev".into(),
        1 << 26,
    );
    place(&mut dev2, &c, &w).unwrap();
    let steps = inputs(&c, &mut rng);
    dev2.submit(Op::Begin {
        tokens: &steps[0].tokens,
    })
    .unwrap();
    let err = dev2.submit(Op::HotFfn { layer: LayerId(0) }).unwrap_err();
    assert!(
        matches!(&err, DeviceError::Invalid(m) if m.contains("no FFN input")),
        "{err}"
    );
    let mut bad_mask = ActiveSet::new(N_FF);
    bad_mask.push_token([0]);
    assert!(matches!(
        dev2.submit(Op::WriteMask {
            layer: LayerId(1),
            mask: &bad_mask,
        }),
        Err(DeviceError::Invalid(m)) if m.contains("mask of 1 tokens")
    ));
    let mut sim = SimulatedDevice::new(1 << 28).unwrap();
    place(&mut sim, &c, &w.exact()).unwrap();
    let (got, want) = (step(&mut dev2, &steps[0]), step(&mut sim, &steps[0]));
    assert_close("after errors", &got.logits, &want.logits, LOGIT_TOL);
}

#[test]
fn weight_types_the_kernels_do_not_decode_are_refused_before_any_upload() {
    let unsupported: Vec<WeightType> = WeightType::ALL
        .into_iter()
        .filter(|&t| !computes_with(t))
        .collect();
    assert!(!unsupported.is_empty());
    let mut rng = Rng::new(105);
    for t in unsupported {
        // Rows of 256 values, whole blocks of every type; the unsupported type in wq
        // (the first upload) and in the hot down_t (after a placed attention).
        for at in [0, 6] {
            let mut types = [WeightType::Q4_K; 8];
            types[at] = t;
            let c = Case {
                name: "unsupported",
                n_embd: 256,
                n_head: 4,
                n_head_kv: 1,
                head_dim: 64,
                types,
                ..q4_case()
            };
            let w = weights(&c, &mut rng);
            let mut dev = KernelDevice::new(
                HarnessBackend::new(32, 1 << 28),
                DeviceKind::Cuda,
                "dev".into(),
                1 << 26,
            );
            let e = place(&mut dev, &c, &w).unwrap_err();
            assert_eq!(e, DeviceError::UnsupportedType(t.ggml()), "{t:?} at {at}");
            if at == 0 {
                assert_eq!(dev.info().memory_used, 0, "{t:?}: nothing taken");
            }
            // Not a device failure: the same device takes a model it can compute.
            let ok = Case {
                types: [WeightType::Q4_K; 8],
                ..c
            };
            place(&mut dev, &ok, &weights(&ok, &mut rng)).unwrap();
        }
    }
}

/// The same op sequences on a CUDA device, when the machine has one (warp 32 there).
#[cfg(feature = "cuda")]
#[test]
fn every_case_on_a_cuda_device() {
    use powerinfer_kernels_cuda::cuda::{CudaBackend, CudaError};
    let open = || match CudaBackend::open(0, None) {
        Ok(b) => Some(b),
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice)) => {
            eprintln!("SKIPPED: {e}: the CUDA device test needs an NVIDIA GPU");
            None
        }
        Err(e) => panic!("{e}"),
    };
    for (c, seed) in [q4_1_case(), k_quant_case(), float_case()] {
        let Some(b) = open() else { return };
        eprintln!("{}: {}", c.name, b.name());
        check_on(&c, seed, b);
    }
}
