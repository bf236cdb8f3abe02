//! Tests of the neuron-sparse operators: against the dense operators, f64, their
//! parts and every thread count.

use super::ffn::COLUMN_SPLIT_MAX_BYTES;
use super::*;
use crate::nn::Glu;
use crate::quant::WeightType;
use crate::rng::Rng;

const FRACTIONS: [f64; 6] = [0.0, 0.01, 0.1, 0.5, 0.9, 1.0];

fn random_set(rng: &mut Rng, n_rows: usize, n_tok: usize, p: f64) -> ActiveSet {
    let mut a = ActiveSet::new(n_rows);
    for _ in 0..n_tok {
        let keep: Vec<bool> = (0..n_rows).map(|_| rng.next_f64() < p).collect();
        a.push_where(|i| keep[i]);
    }
    a
}

/// Random gate, up (`types[0]`) and down_t (`types[1]`) of `n_ff` neurons, and a
/// random batch of `n_tok` inputs.
fn random_ffn(
    rng: &mut Rng,
    [wtype, down_type]: [WeightType; 2],
    n_ff: usize,
    n_embd: usize,
    n_tok: usize,
) -> ([Matrix; 3], Activations) {
    let w = [
        random_matrix(rng, wtype, n_ff, n_embd),
        random_matrix(rng, wtype, n_ff, n_embd),
        random_matrix(rng, down_type, n_ff, n_embd),
    ];
    let x: Vec<f32> = (0..n_tok * n_embd).map(|_| rng.normal()).collect();
    let mut acts = Activations::new();
    acts.set(&x, n_tok);
    (w, acts)
}

fn random_matrix(rng: &mut Rng, wtype: WeightType, n_rows: usize, n_cols: usize) -> Matrix {
    let v: Vec<f32> = (0..n_rows * n_cols).map(|_| rng.normal()).collect();
    Matrix::quantize(wtype, &v, n_rows, n_cols)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn row_sparse_dot_is_the_dense_product_with_inactive_rows_zeroed() {
    let mut rng = Rng::new(11);
    let (n_rows, n_cols, n_tok) = (300, 256, 3);
    let pools: Vec<ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&n| ThreadPool::new(n, "t").unwrap())
        .collect();
    for wtype in WeightType::ALL {
        let w = random_matrix(&mut rng, wtype, n_rows, n_cols);
        let x: Vec<f32> = (0..n_tok * n_cols).map(|_| rng.normal()).collect();
        let mut acts = Activations::new();
        acts.set(&x, n_tok);
        let mut dense = vec![0.0; n_tok * n_rows];
        w.matmul(&pools[0], &mut acts, &mut dense);
        for p in FRACTIONS {
            let active = random_set(&mut rng, n_rows, n_tok, p);
            let mut want = vec![0.0f32; n_tok * n_rows];
            for t in 0..n_tok {
                for &i in active.token(t) {
                    let k = t * n_rows + i as usize;
                    want[k] = dense[k];
                }
            }
            for pool in &pools {
                let mut got = vec![f32::NAN; n_tok * n_rows];
                rows_sparse(pool, &w, &mut acts, &active, &mut got);
                assert_eq!(bits(&got), bits(&want), "{wtype:?} at {p}");
            }
        }
    }
}

#[test]
fn row_sparse_axpy_matches_f64_and_is_deterministic_and_exact_under_skips() {
    let mut rng = Rng::new(12);
    let (n_rows, n_cols, n_tok) = (300, 256, 3);
    let pools: Vec<ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&n| ThreadPool::new(n, "t").unwrap())
        .collect();
    let mut scratch = SparseScratch::default();
    for wtype in WeightType::ALL {
        let w = random_matrix(&mut rng, wtype, n_rows, n_cols);
        let mut deq = vec![0.0; n_rows * n_cols];
        for r in 0..n_rows {
            w.dequantize_row(r, &mut deq[r * n_cols..(r + 1) * n_cols]);
        }
        let h: Vec<f32> = (0..n_tok * n_rows).map(|_| rng.normal()).collect();
        for p in FRACTIONS {
            let active = random_set(&mut rng, n_rows, n_tok, p);
            // The same values through "every neuron active, the inactive ones 0".
            let mut zeroed = vec![0.0f32; n_tok * n_rows];
            let mut all = ActiveSet::new(n_rows);
            for t in 0..n_tok {
                for &i in active.token(t) {
                    zeroed[t * n_rows + i as usize] = h[t * n_rows + i as usize];
                }
                all.push_all();
            }
            let mut reference = vec![0.0f32; n_tok * n_cols];
            axpy_sparse(&pools[0], &w, &zeroed, &all, &mut scratch, &mut reference);
            for t in 0..n_tok {
                for j in 0..n_cols {
                    let (mut exact, mut mag) = (0.0f64, 0.0f64);
                    for &i in active.token(t) {
                        let v = f64::from(h[t * n_rows + i as usize])
                            * f64::from(deq[i as usize * n_cols + j]);
                        exact += v;
                        mag += v.abs();
                    }
                    let got = f64::from(reference[t * n_cols + j]);
                    assert!(
                        (got - exact).abs() <= 1e-6 * mag + 1e-30,
                        "{wtype:?} at {p}: {got} vs {exact}"
                    );
                }
            }
            for pool in &pools {
                for level in crate::simd::supported_levels() {
                    let mut got = vec![f32::NAN; n_tok * n_cols];
                    axpy_sparse_at(level, pool, &w, &h, &active, &mut scratch, &mut got);
                    // +0 and -0 may differ where nothing was added; compare values.
                    let same = got.iter().zip(&reference).all(|(a, b)| a == b);
                    assert!(
                        same,
                        "{wtype:?} at {p}, {level}, {} threads",
                        pool.n_threads()
                    );
                }
            }
        }
    }
}

#[test]
/// The fused FFN has the bits of its parts (row-sparse dots, the gated activation,
/// the row-sparse axpy and its fold) for every thread count: its column split, chosen
/// per thread count and batch size, must not show.
fn fused_ffn_equals_its_parts_for_every_glu_and_gate_source() {
    let mut rng = Rng::new(13);
    let (n_ff, n_embd) = (300, 256);
    let pools: Vec<ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&n| ThreadPool::new(n, "t").unwrap())
        .collect();
    let mut scratch = SparseScratch::default();
    for (wtype, down_type) in [
        (WeightType::Q4_1, WeightType::Q4_1),
        (WeightType::Q4_0, WeightType::Q8_0),
        (WeightType::Q4_K, WeightType::Q6_K),
        (WeightType::Q3_K, WeightType::IQ4_NL),
        (WeightType::IQ4_XS, WeightType::Q2_K),
        (WeightType::F16, WeightType::F32),
    ] {
        for n_tok in [1, 2] {
            let ([gate, up, down_t], mut acts) =
                random_ffn(&mut rng, [wtype, down_type], n_ff, n_embd, n_tok);
            for glu in [Glu::Silu, Glu::Relu, Glu::DualRelu, Glu::Gelu] {
                for p in [0.0, 0.1, 0.5, 1.0] {
                    let active = random_set(&mut rng, n_ff, n_tok, p);
                    let mut g = vec![0.0; n_tok * n_ff];
                    let mut u = vec![0.0; n_tok * n_ff];
                    rows_sparse(&pools[0], &gate, &mut acts, &active, &mut g);
                    rows_sparse(&pools[0], &up, &mut acts, &active, &mut u);
                    let mut h = g.clone();
                    glu.apply_slice(&mut h, &u);
                    let mut want = vec![0.0; n_tok * n_embd];
                    axpy_sparse(&pools[0], &down_t, &h, &active, &mut scratch, &mut want);
                    let mut g_all = vec![0.0; n_tok * n_ff];
                    gate.matmul(&pools[0], &mut acts, &mut g_all);
                    let w = [&gate, &up, &down_t];
                    let level = simd::detected();
                    // The gate computed here, or in full beforehand (gate mode).
                    for given in [None, Some(g_all.as_slice())] {
                        for pool in &pools {
                            let mut got = vec![f32::NAN; n_tok * n_embd];
                            let ffn = SparseFfn {
                                gate_given: given,
                                level,
                                ..SparseFfn::new(w[0], w[1], w[2], glu)
                            };
                            ffn.run(pool, &mut acts, &active, &mut scratch, &mut got);
                            assert_eq!(
                                got,
                                want,
                                "{wtype:?}/{down_type:?} {glu:?} at {p}, {n_tok} tokens, \
                                 {} threads, gate given: {}",
                                pool.n_threads(),
                                given.is_some()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A large, mostly active down projection with fewer tokens than threads takes the
/// neuron-range split of phase 2 (over [`COLUMN_SPLIT_MAX_BYTES`]): the same bits.
#[test]
fn large_dense_down_projections_split_by_ranges_with_the_same_bits() {
    let mut rng = Rng::new(14);
    let (n_ff, n_embd, n_tok) = (640, 1024, 1);
    let ([gate, up, down_t], mut acts) = random_ffn(
        &mut rng,
        [WeightType::Q4_0, WeightType::F32],
        n_ff,
        n_embd,
        n_tok,
    );
    assert!(n_ff / 2 * down_t.n_bytes() / n_ff > COLUMN_SPLIT_MAX_BYTES);
    let pools: Vec<ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&n| ThreadPool::new(n, "t").unwrap())
        .collect();
    let mut scratch = SparseScratch::default();
    for p in [0.5, 1.0] {
        let active = random_set(&mut rng, n_ff, n_tok, p);
        let (mut g, mut u) = (vec![0.0; n_ff], vec![0.0; n_ff]);
        rows_sparse(&pools[0], &gate, &mut acts, &active, &mut g);
        rows_sparse(&pools[0], &up, &mut acts, &active, &mut u);
        Glu::Silu.apply_slice(&mut g, &u);
        let mut want = vec![0.0; n_embd];
        axpy_sparse(&pools[0], &down_t, &g, &active, &mut scratch, &mut want);
        for pool in &pools {
            let mut got = vec![f32::NAN; n_embd];
            let w = [&gate, &up, &down_t];
            SparseFfn::new(w[0], w[1], w[2], Glu::Silu).run(
                pool,
                &mut acts,
                &active,
                &mut scratch,
                &mut got,
            );
            assert_eq!(got, want, "at {p}, {} threads", pool.n_threads());
        }
    }
}

#[test]
fn active_sets_refuse_unsorted_or_out_of_range_neurons() {
    let bad = |rows: Vec<u32>| {
        std::panic::catch_unwind(move || {
            let mut a = ActiveSet::new(10);
            a.push_token(rows);
        })
        .is_err()
    };
    assert!(bad(vec![3, 2]));
    assert!(bad(vec![1, 1]));
    assert!(bad(vec![10]));
    assert!(!bad(vec![0, 5, 9]));
    let mut a = ActiveSet::new(4);
    a.push_all();
    a.push_token([]);
    a.push_where(|i| i % 2 == 1);
    assert_eq!((a.n_tok(), a.n_active()), (3, 6));
    assert_eq!(a.token(2), &[1, 3]);
    assert!((a.fraction() - 0.5).abs() < 1e-12);
    // Popping the last token and pushing another in its place.
    a.pop_token();
    a.push_token([2]);
    assert_eq!((a.n_tok(), a.n_active()), (3, 5));
    assert_eq!(
        (a.token(0), a.token(1), a.token(2)),
        (&[0, 1, 2, 3][..], &[][..], &[2][..])
    );
    a.pop_token();
    a.pop_token();
    a.pop_token();
    a.pop_token();
    assert_eq!((a.n_tok(), a.n_active()), (0, 0));
}
