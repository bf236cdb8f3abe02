//! Every kernel, run on the CPU execution harness (the kernel sources compiled for the
//! host), against its reference twin in `powerinfer-ops` on random inputs, at both warp
//! widths (32: NVIDIA, RDNA; 64: CDNA), and on a GPU too when the `cuda` feature finds
//! one. Tolerances are named and relative to the size of the terms summed, so they bound
//! rounding, not bugs.
#![allow(clippy::unwrap_used)]

use half::f16;
use powerinfer_kernels_cuda::harness::HarnessBackend;
use powerinfer_kernels_cuda::{Arg, Backend, DevPtr, Dims, computes_with};
use powerinfer_ops::nn::{self, Glu, Rope, RopeStyle};
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::rng::Rng;
use powerinfer_ops::tensor::Matrix;

/// f32 sums of up to a few thousand products against f64: relative to Σ|terms|.
const DOT_TOL: f64 = 2e-6;
/// exp/tanh of the device against the host's approximations.
const ACT_TOL: f64 = 2e-5;
const WARPS: [u32; 2] = [32, 64];
/// Active fractions of the sparse kernels.
const SPARSITY: [f64; 5] = [0.0, 0.01, 0.1, 0.5, 1.0];

struct Dev {
    b: Box<dyn Backend>,
    warp: u32,
}

/// The harness at both warp widths, and with the `cuda` feature the machine's first
/// GPU when it has one (every comparison then also runs on real hardware).
fn devices() -> Vec<Dev> {
    WARPS
        .iter()
        .map(|&warp| Dev {
            b: Box::new(HarnessBackend::new(warp, 1 << 30)),
            warp,
        })
        .chain(gpu())
        .collect()
}

#[cfg(feature = "cuda")]
fn gpu() -> Option<Dev> {
    use powerinfer_kernels_cuda::cuda::{CudaBackend, CudaError};
    match CudaBackend::open(0, None) {
        Ok(b) => {
            eprintln!("also on {}", b.name());
            Some(Dev {
                warp: b.warp(),
                b: Box::new(b),
            })
        }
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice)) => {
            eprintln!("harness only: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu() -> Option<Dev> {
    None
}

impl Dev {
    fn bytes(&mut self, v: &[u8]) -> DevPtr {
        let p = self.b.alloc(v.len().max(1)).unwrap();
        self.b.upload(p, v).unwrap();
        p
    }
    fn f32s(&mut self, v: &[f32]) -> DevPtr {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.bytes(&b)
    }
    fn i32s(&mut self, v: &[i32]) -> DevPtr {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.bytes(&b)
    }
    fn zeros(&mut self, n: usize) -> DevPtr {
        self.f32s(&vec![0.0; n])
    }
    fn read(&mut self, p: DevPtr, bytes: usize) -> Vec<u8> {
        let s = self.b.download(p, bytes).unwrap();
        let done = self.b.record().unwrap();
        self.b.wait(done).unwrap();
        let v = self.b.staged(&s).to_vec();
        self.b.release(s);
        v
    }
    fn read_f32(&mut self, p: DevPtr, n: usize) -> Vec<f32> {
        self.read(p, 4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    fn launch(&mut self, name: &'static str, dims: Dims, args: &[Arg]) {
        self.b.launch(name, dims, args).unwrap();
    }
}

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn dequantized(m: &Matrix) -> Vec<Vec<f32>> {
    (0..m.n_rows())
        .map(|r| {
            let mut row = vec![0.0; m.n_cols()];
            m.dequantize_row(r, &mut row);
            row
        })
        .collect()
}

fn close(got: f32, want: f64, scale: f64, tol: f64, what: &str) {
    let err = (f64::from(got) - want).abs();
    assert!(
        err <= tol * scale.max(1e-30) + 1e-30,
        "{what}: got {got}, want {want} (error {err:e}, allowed {:e})",
        tol * scale
    );
}

/// (dtype, n_cols): every type the device holds; float types also with a ragged tail.
fn shapes() -> Vec<(WeightType, usize)> {
    let mut v: Vec<_> = WeightType::ALL
        .into_iter()
        .filter(|&w| computes_with(w))
        .map(|w| (w, 512))
        .collect();
    v.extend([
        (WeightType::F32, 100),
        (WeightType::F16, 72),
        (WeightType::BF16, 40),
    ]);
    v
}

fn upload_matrix(d: &mut Dev, m: &Matrix) -> (DevPtr, i32, i64) {
    let p = d.bytes(m.bytes());
    (
        p,
        m.wtype().ggml() as i32,
        (m.n_bytes() / m.n_rows()) as i64,
    )
}

#[test]
fn matmul_every_dtype_matches_the_dequantized_reference() {
    let mut rng = Rng::new(1);
    for mut d in devices() {
        let warp = d.warp;
        for (wtype, n_cols) in shapes() {
            for n_tok in [1, 6] {
                let n_rows = 37;
                let m = Matrix::quantize(
                    wtype,
                    &random(&mut rng, n_rows * n_cols, 0.5),
                    n_rows,
                    n_cols,
                );
                let w = dequantized(&m);
                let x = random(&mut rng, n_tok * n_cols, 1.0);
                let (wp, dt, rb) = upload_matrix(&mut d, &m);
                let xp = d.f32s(&x);
                let base = random(&mut rng, n_tok * n_rows, 1.0);
                for accumulate in [0, 1] {
                    let y = d.f32s(&base);
                    d.launch(
                        "pi_matmul",
                        Dims {
                            grid: [
                                n_rows.div_ceil(128 / warp as usize) as u32,
                                n_tok.div_ceil(4) as u32,
                                1,
                            ],
                            block: [128, 1, 1],
                        },
                        &[
                            Arg::Ptr(wp),
                            Arg::I32(dt),
                            Arg::I32(n_rows as i32),
                            Arg::I32(n_cols as i32),
                            Arg::I64(rb),
                            Arg::Ptr(xp),
                            Arg::I32(n_tok as i32),
                            Arg::Ptr(y),
                            Arg::I32(accumulate),
                        ],
                    );
                    let got = d.read_f32(y, n_tok * n_rows);
                    for t in 0..n_tok {
                        for r in 0..n_rows {
                            let xs = &x[t * n_cols..(t + 1) * n_cols];
                            let want: f64 = w[r]
                                .iter()
                                .zip(xs)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum();
                            let scale: f64 = w[r]
                                .iter()
                                .zip(xs)
                                .map(|(a, b)| f64::from((a * b).abs()))
                                .sum();
                            let prior = if accumulate == 1 {
                                f64::from(base[t * n_rows + r])
                            } else {
                                0.0
                            };
                            close(
                                got[t * n_rows + r],
                                want + prior,
                                scale + prior.abs(),
                                DOT_TOL,
                                &format!(
                                    "{wtype:?} cols {n_cols} tok {t} row {r} warp {warp} acc {accumulate}"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A mask with about `frac` of `n` neurons active per token (exactly none at 0, all at 1).
fn mask(rng: &mut Rng, n_tok: usize, n: usize, frac: f64) -> Vec<u8> {
    (0..n_tok * n)
        .map(|_| u8::from(frac >= 1.0 || (frac > 0.0 && rng.next_f64() < frac)))
        .collect()
}

fn glu_id(g: Glu) -> i32 {
    match g {
        Glu::Silu => 0,
        Glu::Relu => 1,
        Glu::DualRelu => 2,
        Glu::Gelu => 3,
    }
}

#[test]
fn ffn_gate_up_and_the_sparse_axpy_match_the_reference_at_every_sparsity() {
    let mut rng = Rng::new(2);
    let (n_rows, n_cols, n_tok) = (300, 256, 3);
    for mut d in devices() {
        let warp = d.warp;
        for (wtype, glu) in [
            (WeightType::Q4_0, Glu::Relu),
            (WeightType::Q4_1, Glu::DualRelu),
            (WeightType::Q5_0, Glu::Silu),
            (WeightType::Q5_1, Glu::Gelu),
            (WeightType::Q8_0, Glu::Relu),
            (WeightType::Q4_K, Glu::Silu),
            (WeightType::Q5_K, Glu::Relu),
            (WeightType::Q6_K, Glu::Relu),
            (WeightType::F16, Glu::Silu),
            (WeightType::BF16, Glu::Relu),
            (WeightType::F32, Glu::Gelu),
        ] {
            let gate = Matrix::quantize(
                wtype,
                &random(&mut rng, n_rows * n_cols, 0.3),
                n_rows,
                n_cols,
            );
            let up = Matrix::quantize(
                wtype,
                &random(&mut rng, n_rows * n_cols, 0.3),
                n_rows,
                n_cols,
            );
            let down_t = Matrix::quantize(
                wtype,
                &random(&mut rng, n_rows * n_cols, 0.3),
                n_rows,
                n_cols,
            );
            let (gw, uw, dw) = (dequantized(&gate), dequantized(&up), dequantized(&down_t));
            let x = random(&mut rng, n_tok * n_cols, 1.0);
            let (gp, gdt, grb) = upload_matrix(&mut d, &gate);
            let (up_p, udt, urb) = upload_matrix(&mut d, &up);
            let (dp, ddt, drb) = upload_matrix(&mut d, &down_t);
            let xp = d.f32s(&x);
            for frac in SPARSITY {
                // Token 0 predictor mode under the mask, token 1 dense, token 2 gate mode.
                let modes = [1, 0, 2];
                let m = mask(&mut rng, n_tok, n_rows, frac);
                let thr = 0.05f32;
                let (modes_p, mask_p) = (d.i32s(&modes), d.bytes(&m));
                let h = d.zeros(n_tok * n_rows);
                let counts = d.i32s(&[0; 3 * 2]);
                d.launch(
                    "pi_ffn_gate_up",
                    Dims {
                        grid: [n_rows.div_ceil(128 / warp as usize) as u32, 1, 1],
                        block: [128, 1, 1],
                    },
                    &[
                        Arg::Ptr(gp),
                        Arg::I32(gdt),
                        Arg::I64(grb),
                        Arg::Ptr(up_p),
                        Arg::I32(udt),
                        Arg::I64(urb),
                        Arg::I32(n_rows as i32),
                        Arg::I32(n_cols as i32),
                        Arg::Ptr(xp),
                        Arg::I32(n_tok as i32),
                        Arg::Ptr(modes_p),
                        Arg::Ptr(mask_p),
                        Arg::I32(glu_id(glu)),
                        Arg::F32(thr),
                        Arg::Ptr(h),
                        Arg::Ptr(counts + 4),
                        Arg::I32(2),
                    ],
                );
                let hv = d.read_f32(h, n_tok * n_rows);
                let cv: Vec<u32> = d
                    .read(counts, 24)
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let mut want_h = vec![0f64; n_tok * n_rows];
                for t in 0..n_tok {
                    let xs = &x[t * n_cols..(t + 1) * n_cols];
                    let mut chosen = 0;
                    for r in 0..n_rows {
                        let dot = |w: &[f32]| {
                            w.iter()
                                .zip(xs)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum::<f64>()
                        };
                        let (g, u) = (dot(&gw[r]), dot(&uw[r]));
                        let mut ga = [g as f32];
                        glu.act_slice(&mut ga);
                        let on = match modes[t] {
                            0 => true,
                            1 => m[t * n_rows + r] != 0,
                            _ => {
                                if (f64::from(ga[0].abs()) - f64::from(thr)).abs() < 1e-4 {
                                    // Too close to call in f32: take the kernel's choice.
                                    hv[t * n_rows + r] != 0.0
                                        || (glu.gate_is_exact() && ga[0] == 0.0)
                                } else {
                                    ga[0].abs() > thr
                                }
                            }
                        };
                        let mut v = [g as f32];
                        glu.apply_slice(&mut v, &[u as f32]);
                        if on {
                            chosen += 1;
                            want_h[t * n_rows + r] = f64::from(v[0]);
                            let scale = gw[r]
                                .iter()
                                .chain(&uw[r])
                                .zip(xs.iter().chain(xs))
                                .map(|(a, b)| f64::from((a * b).abs()))
                                .sum::<f64>();
                            close(
                                hv[t * n_rows + r],
                                f64::from(v[0]),
                                scale * (1.0 + f64::from(v[0].abs())),
                                ACT_TOL,
                                &format!("h {wtype:?} {glu:?} frac {frac} t {t} r {r} warp {warp}"),
                            );
                        } else {
                            assert_eq!(hv[t * n_rows + r], 0.0, "unchosen neuron {r} of token {t}");
                        }
                    }
                    if modes[t] != 2 {
                        assert_eq!(
                            cv[t * 2 + 1],
                            chosen as u32,
                            "count of token {t} ({wtype:?}, {frac})"
                        );
                    }
                    assert_eq!(cv[t * 2], 0, "another layer's count");
                }
                if frac == 0.0 {
                    assert_eq!(cv[1], 0);
                }

                // down_t: out[t] = Σ h[t][i] down_t[i] over chosen rows, in splits of 128.
                let split = 128;
                let n_split = n_rows.div_ceil(split);
                let part = d.zeros(n_split * n_tok * n_cols);
                let out = d.zeros(n_tok * n_cols);
                d.launch(
                    "pi_axpy_rows",
                    Dims {
                        grid: [
                            (n_cols / 32).div_ceil(64) as u32,
                            n_split as u32,
                            n_tok as u32,
                        ],
                        block: [64, 1, 1],
                    },
                    &[
                        Arg::Ptr(dp),
                        Arg::I32(ddt),
                        Arg::I64(drb),
                        Arg::I32(n_rows as i32),
                        Arg::I32(n_cols as i32),
                        Arg::Ptr(h),
                        Arg::I32(n_tok as i32),
                        Arg::I32(split as i32),
                        Arg::Ptr(part),
                    ],
                );
                let len = n_tok * n_cols;
                d.launch(
                    "pi_sum_splits",
                    Dims::linear(len, 256),
                    &[
                        Arg::Ptr(part),
                        Arg::I32(n_split as i32),
                        Arg::I64(len as i64),
                        Arg::Ptr(out),
                    ],
                );
                let ov = d.read_f32(out, len);
                // The twin: ops' row-sparse axpy over the kernel's own h.
                for t in 0..n_tok {
                    let mut want = vec![0f32; n_cols];
                    let ht = &hv[t * n_rows..(t + 1) * n_rows];
                    for (i, &a) in ht.iter().enumerate() {
                        if a != 0.0 {
                            nn::add(&mut want, &dw[i].iter().map(|w| a * w).collect::<Vec<_>>());
                        }
                    }
                    for c in 0..n_cols {
                        let scale: f64 = ht
                            .iter()
                            .enumerate()
                            .map(|(i, a)| f64::from((a * dw[i][c]).abs()))
                            .sum();
                        close(
                            ov[t * n_cols + c],
                            f64::from(want[c]),
                            scale,
                            DOT_TOL * 4.0,
                            &format!("down {wtype:?} frac {frac} t {t} c {c}"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rms_norm_rope_and_elementwise_kernels_match_ops() {
    let mut rng = Rng::new(3);
    for mut d in devices() {
        // RMSNorm over all rows and over a gathered subset.
        let (n_tok, n) = (5, 576);
        let x = random(&mut rng, n_tok * n, 2.0);
        let w: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 1.5)).collect();
        let (xp, wp) = (d.f32s(&x), d.f32s(&w));
        let rows = [4i32, 1];
        let rp = d.i32s(&rows);
        for (gather, n_out) in [(false, n_tok), (true, 2)] {
            let out = d.zeros(n_out * n);
            d.launch(
                "pi_rms_norm",
                Dims {
                    grid: [n_out as u32, 1, 1],
                    block: [256, 1, 1],
                },
                &[
                    Arg::Ptr(xp),
                    Arg::Ptr(if gather { rp } else { 0 }),
                    Arg::Ptr(wp),
                    Arg::I32(n as i32),
                    Arg::F32(1e-5),
                    Arg::Ptr(out),
                ],
            );
            let got = d.read_f32(out, n_out * n);
            for b in 0..n_out {
                let src = if gather { rows[b] as usize } else { b };
                let mut want = vec![0.0; n];
                nn::rms_norm(&x[src * n..(src + 1) * n], &w, 1e-5, &mut want);
                for i in 0..n {
                    close(
                        got[b * n + i],
                        f64::from(want[i]),
                        f64::from(want[i].abs()),
                        1e-6,
                        "rms_norm",
                    );
                }
            }
        }
        // RoPE, both layouts, partial rotation.
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let (n_tok, n_heads, hd, n_rot) = (3, 4, 64, 32);
            let rope = Rope::new(n_rot, 10000.0, 1.0, style, None);
            let pos = [0usize, 17, 3000];
            let mut cs = vec![[0f32; 2]; n_tok * n_rot / 2];
            for (t, &p) in pos.iter().enumerate() {
                rope.cos_sin(p, &mut cs[t * n_rot / 2..(t + 1) * n_rot / 2]);
            }
            let flat: Vec<f32> = cs.iter().flatten().copied().collect();
            let x = random(&mut rng, n_tok * n_heads * hd, 1.0);
            let (xp, csp) = (d.f32s(&x), d.f32s(&flat));
            d.launch(
                "pi_rope",
                Dims::linear(n_tok * n_heads * n_rot / 2, 64),
                &[
                    Arg::Ptr(xp),
                    Arg::I32(n_tok as i32),
                    Arg::I32(n_heads as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(n_rot as i32),
                    Arg::I32((style == RopeStyle::Neox) as i32),
                    Arg::Ptr(csp),
                ],
            );
            let got = d.read_f32(xp, x.len());
            let mut want = x.clone();
            for t in 0..n_tok {
                let w = n_heads * hd;
                rope.apply(
                    &mut want[t * w..(t + 1) * w],
                    hd,
                    &cs[t * n_rot / 2..(t + 1) * n_rot / 2],
                );
            }
            assert_eq!(got, want, "rope {style:?} (same operations, same bits)");
        }
        // Activations and their GLU forms; bias + ReLU; the merge.
        let n = 1000;
        let g = random(&mut rng, n, 3.0);
        let u = random(&mut rng, n, 1.0);
        for glu in [Glu::Silu, Glu::Relu, Glu::DualRelu, Glu::Gelu] {
            for with_up in [false, true] {
                let (gp, upp) = (d.f32s(&g), d.f32s(&u));
                d.launch(
                    "pi_glu_elementwise",
                    Dims::linear(n, 256),
                    &[
                        Arg::Ptr(gp),
                        Arg::Ptr(if with_up { upp } else { 0 }),
                        Arg::I64(n as i64),
                        Arg::I32(glu_id(glu)),
                    ],
                );
                let got = d.read_f32(gp, n);
                let mut want = g.clone();
                if with_up {
                    glu.apply_slice(&mut want, &u)
                } else {
                    glu.act_slice(&mut want)
                }
                for i in 0..n {
                    close(
                        got[i],
                        f64::from(want[i]),
                        f64::from(g[i].abs()).max(1.0),
                        ACT_TOL,
                        &format!("{glu:?} up {with_up}"),
                    );
                }
            }
        }
        let (rows, cols) = (3, 70);
        let xv = random(&mut rng, rows * cols, 1.0);
        let bias = random(&mut rng, cols, 1.0);
        let (xp, bp) = (d.f32s(&xv), d.f32s(&bias));
        d.launch(
            "pi_bias_act",
            Dims::linear(rows * cols, 64),
            &[
                Arg::Ptr(xp),
                Arg::Ptr(bp),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
                Arg::I32(1),
            ],
        );
        let mut want = xv.clone();
        powerinfer_ops::transformer::add_rows(&mut want, &bias);
        nn::relu(&mut want);
        assert_eq!(d.read_f32(xp, rows * cols), want);
        let (a, h, c) = (
            random(&mut rng, n, 1.0),
            random(&mut rng, n, 1.0),
            random(&mut rng, n, 1.0),
        );
        for (use_h, use_c) in [(true, true), (true, false), (false, true)] {
            let (ap, hp, cp) = (d.f32s(&a), d.f32s(&h), d.f32s(&c));
            d.launch(
                "pi_merge",
                Dims::linear(n, 256),
                &[
                    Arg::Ptr(ap),
                    Arg::Ptr(if use_h { hp } else { 0 }),
                    Arg::Ptr(if use_c { cp } else { 0 }),
                    Arg::I64(n as i64),
                ],
            );
            let want: Vec<f32> = (0..n)
                .map(|i| match (use_h, use_c) {
                    (true, true) => a[i] + (h[i] + c[i]),
                    (true, false) => a[i] + h[i],
                    _ => a[i] + c[i],
                })
                .collect();
            assert_eq!(d.read_f32(ap, n), want, "merge {use_h} {use_c}");
        }
    }
}

#[test]
fn the_predictor_threshold_splits_hot_and_cold_masks_like_ops_select() {
    use powerinfer_ops::ids::SeqSlot;
    use powerinfer_ops::sparse::ActiveSet;
    use powerinfer_ops::transformer::{SparsityMode, StepToken, select};
    let mut rng = Rng::new(4);
    let (n_ff, n_hot) = (700, 256);
    let modes = [
        SparsityMode::Predictor,
        SparsityMode::Dense,
        SparsityMode::Predictor,
        SparsityMode::Gate,
    ];
    let tokens: Vec<StepToken> = modes
        .iter()
        .enumerate()
        .map(|(i, &m)| StepToken::new(i, SeqSlot(0), m))
        .collect();
    let n = tokens.len();
    for mut d in devices() {
        for thr in [-10.0f32, 0.0, 0.8, 10.0] {
            let logits = random(&mut rng, n * n_ff, 1.0);
            let ids: Vec<i32> = modes
                .iter()
                .map(|m| match m {
                    SparsityMode::Dense => 0,
                    SparsityMode::Predictor => 1,
                    SparsityMode::Gate => 2,
                })
                .collect();
            let (lp, mp) = (d.f32s(&logits), d.i32s(&ids));
            let (hot, cold) = (
                d.bytes(&vec![7; n * n_hot]),
                d.bytes(&vec![7; n * (n_ff - n_hot)]),
            );
            d.launch(
                "pi_select",
                Dims::linear(n * n_ff, 256),
                &[
                    Arg::Ptr(lp),
                    Arg::I32(n as i32),
                    Arg::I32(n_ff as i32),
                    Arg::I32(n_hot as i32),
                    Arg::Ptr(mp),
                    Arg::F32(thr),
                    Arg::Ptr(hot),
                    Arg::Ptr(cold),
                ],
            );
            for (range, p) in [(0..n_hot, hot), (n_hot..n_ff, cold)] {
                let width = range.len();
                let flags = d.read(p, n * width);
                let mut want = ActiveSet::new(0);
                select(&logits, &tokens, thr, range, &mut want);
                for t in 0..n {
                    let got: Vec<u32> = (0..width as u32)
                        .filter(|&i| flags[t * width + i as usize] != 0)
                        .collect();
                    assert_eq!(got, want.token(t), "threshold {thr} token {t}");
                }
            }
        }
    }
}

#[test]
fn kv_write_stores_f16_bits_like_the_host_and_attention_matches_ops() {
    let mut rng = Rng::new(5);
    let (n_head, n_head_kv, hd, n_ctx, n_slots) = (8, 2, 32, 40, 2);
    for mut d in devices() {
        for f16_cache in [true, false] {
            let elem = if f16_cache { 2 } else { 4 };
            let cache_bytes = n_slots * n_head_kv * n_ctx * hd * elem;
            let (kc, vc) = (
                d.bytes(&vec![0; cache_bytes]),
                d.bytes(&vec![0; cache_bytes]),
            );
            // Fill positions 0..n of slot 1 (a prompt), then attend from three tokens.
            let n_fill = 33;
            let width = n_head_kv * hd;
            // One more token, in slot 0, carries values at the edges of the half range.
            let n_write = n_fill + 1;
            let mut k = random(&mut rng, n_write * width, 1.0);
            let mut v = random(&mut rng, n_write * width, 1.0);
            let edge = n_fill * width;
            for (i, x) in [1e-6, 70000.0, 0.000_060_975, -2.5e-8, 65519.0, 65520.0]
                .into_iter()
                .enumerate()
            {
                k[edge + i] = x;
                v[edge + i] = -x;
            }
            let mut slots = vec![1i32; n_fill];
            slots.push(0);
            let mut pos: Vec<i32> = (0..n_fill as i32).collect();
            pos.push(0);
            let (kp, vp, sp, pp) = (d.f32s(&k), d.f32s(&v), d.i32s(&slots), d.i32s(&pos));
            d.launch(
                "pi_kv_write",
                Dims::linear(n_write * width, 128),
                &[
                    Arg::Ptr(kp),
                    Arg::Ptr(vp),
                    Arg::I32(n_write as i32),
                    Arg::I32(n_head_kv as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(n_ctx as i32),
                    Arg::Ptr(sp),
                    Arg::Ptr(pp),
                    Arg::I32(f16_cache as i32),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                ],
            );
            let kb = d.read(kc, cache_bytes);
            let vb = d.read(vc, cache_bytes);
            let load = |b: &[u8], i: usize| -> f32 {
                if f16_cache {
                    f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32()
                } else {
                    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
                }
            };
            let at = |slot: usize, h: usize, p: usize, e: usize| {
                ((slot * n_head_kv + h) * n_ctx + p) * hd + e
            };
            for p in 0..n_write {
                for e in 0..width {
                    let (h, dd) = (e / hd, e % hd);
                    let i = at(slots[p] as usize, h, pos[p] as usize, dd);
                    let (wk, wv) = (k[p * width + e], v[p * width + e]);
                    if f16_cache {
                        assert_eq!(
                            u16::from_le_bytes([kb[2 * i], kb[2 * i + 1]]),
                            f16::from_f32(wk).to_bits(),
                            "f16 of {wk}"
                        );
                        assert_eq!(
                            u16::from_le_bytes([vb[2 * i], vb[2 * i + 1]]),
                            f16::from_f32(wv).to_bits(),
                            "f16 of {wv}"
                        );
                    } else {
                        assert_eq!((load(&kb, i), load(&vb, i)), (wk, wv));
                    }
                }
            }
            // Queries at positions 0, 12 and 32 of slot 1.
            let qpos = [0i32, 12, 32];
            let nq = qpos.len();
            let q = random(&mut rng, nq * n_head * hd, 1.0);
            let (qp, qsp, qpp) = (d.f32s(&q), d.i32s(&[1, 1, 1]), d.i32s(&qpos));
            let scores = d.zeros(nq * n_head * n_ctx);
            let out = d.zeros(nq * n_head * hd);
            let scale = 1.0 / (hd as f32).sqrt();
            d.launch(
                "pi_attention",
                Dims {
                    grid: [nq as u32, n_head as u32, 1],
                    block: [64, 1, 1],
                },
                &[
                    Arg::Ptr(qp),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::I32(f16_cache as i32),
                    Arg::I32(nq as i32),
                    Arg::I32(n_head as i32),
                    Arg::I32(n_head_kv as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(n_ctx as i32),
                    Arg::Ptr(qsp),
                    Arg::Ptr(qpp),
                    Arg::F32(scale),
                    Arg::Ptr(scores),
                    Arg::Ptr(out),
                ],
            );
            let got = d.read_f32(out, nq * n_head * hd);
            for (t, &p) in qpos.iter().enumerate() {
                for h in 0..n_head {
                    let kvh = h / (n_head / n_head_kv);
                    let n = p as usize + 1;
                    let keys: Vec<f32> = (0..n)
                        .flat_map(|pp| (0..hd).map(move |e| (pp, e)))
                        .map(|(pp, e)| load(&kb, at(1, kvh, pp, e)))
                        .collect();
                    let vals: Vec<f32> = (0..n)
                        .flat_map(|pp| (0..hd).map(move |e| (pp, e)))
                        .map(|(pp, e)| load(&vb, at(1, kvh, pp, e)))
                        .collect();
                    let mut sc = vec![0.0; n];
                    let mut want = vec![0.0; hd];
                    let qh = &q[(t * n_head + h) * hd..(t * n_head + h + 1) * hd];
                    nn::attend(qh, &keys, &vals, scale, &mut sc, &mut want);
                    let vmax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for e in 0..hd {
                        close(
                            got[(t * n_head + h) * hd + e],
                            f64::from(want[e]),
                            f64::from(vmax),
                            1e-5,
                            &format!(
                                "attention f16={f16_cache} t {t} h {h} e {e} warp {d_w}",
                                d_w = d.warp
                            ),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bad_launches_are_refused_with_a_reason() {
    let r = powerinfer_kernels_cuda::harness::launch(
        32,
        "pi_rms_norm",
        Dims {
            grid: [1, 1, 1],
            block: [0, 1, 1],
        },
        &[],
    );
    assert!(r.unwrap_err().contains("bad launch"));
    let r = powerinfer_kernels_cuda::harness::launch(32, "no_such_kernel", Dims::linear(1, 1), &[]);
    assert!(r.unwrap_err().contains("no such kernel"));
}
