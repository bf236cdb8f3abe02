//! Every quant type: round-trip error of its quantizer, its SIMD kernels against the
//! scalar twin at every level this CPU supports, and the scalar twin against an f64
//! reference, on fresh random inputs.

use half::{bf16, f16};

use super::*;
use crate::rng::Rng;
use crate::simd::supported_levels;

/// Kernels and twin differ only in the order f32 partial sums are added (integer sums
/// are exact): allow a few ulps per accumulated block, relative to Σ|w·a|.
const REASSOC_TOL: f64 = 2e-5;
/// f32 products of f16 scales and per-block f32 accumulation in the twin, against exact
/// f64 arithmetic on the same dequantized values, relative to Σ|w·a|.
const TWIN_VS_F64_TOL: f64 = 2e-5;
/// The Q8_1 block sum `s = d·Σq` uses the unrounded `d` and is stored as f16, while the
/// dequantized values use `d` rounded to f16: two f16 roundings, up to 2^-10 of |s|, times
/// the weight block minimum it multiplies.
const Q8_1_SUM_REL: f64 = 1.0 / 1024.0;

/// Root-mean-square error of quantize → dequantize on uniform [-1, 1) values, relative to
/// the RMS of the input: about step / sqrt(12) over 0.577 for each bit width.
fn roundtrip_tol(t: GgmlType) -> f64 {
    match t {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1e-3,
        GgmlType::BF16 => 5e-3,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
            0.11
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 0.055,
        GgmlType::Q6_K => 0.03,
        GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8_K => 0.007,
        // Levels 0..=3 over each 16 values' range (step ≈ 0.63 on uniform [-1, 1): 0.32),
        // plus 4-bit scales and minimums (measured 0.28).
        GgmlType::Q2_K => 0.4,
        // Levels -4..=3 of amax / 4 (0.125), plus 6-bit scales (measured 0.13).
        GgmlType::Q3_K => 0.2,
        other => panic!("no round-trip tolerance for {other}"),
    }
}

fn quantize_vec<B: Block>(x: &[f32]) -> Vec<B> {
    let mut out = vec![B::default(); x.len() / B::LEN];
    B::quantize(x, &mut out);
    out
}

fn dequantize_vec<B: Block>(b: &[B]) -> Vec<f32> {
    let mut out = vec![0.0; b.len() * B::LEN];
    B::dequantize(b, &mut out);
    out
}

fn check_roundtrip<B: Block>(seed: u64) {
    let mut rng = Rng::new(seed);
    let n = B::LEN.max(32) * 64;
    let x: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let y = dequantize_vec(&quantize_vec::<B>(&x));
    let err: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>();
    let norm: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
    let rel = (err / norm).sqrt();
    let tol = roundtrip_tol(B::DTYPE);
    assert!(rel <= tol, "{}: relative RMS error {rel} > {tol}", B::DTYPE);
}

/// The largest |x| of the activation block holding element `i`.
fn block_absmax(x: &[f32], len: usize, i: usize) -> f64 {
    let b = i / len * len;
    x[b..b + len]
        .iter()
        .fold(0.0f64, |m, v| m.max(f64::from(v.abs())))
}

/// Bound on |w·x − w·deq(quant(x))| from quantizing the activation `x`.
fn activation_error_bound(act: ActType, w: &[f32], x: &[f32]) -> f64 {
    let per_elem = |i: usize| -> f64 {
        let xi = f64::from(x[i].abs());
        match act {
            ActType::F32 => 0.0,
            ActType::F16 => xi / 2048.0 + 6e-8,
            ActType::BF16 => xi / 256.0,
            // Half a step of amax/127, plus the f16 rounding of the block scale.
            ActType::Q8_0 | ActType::Q8_1 => block_absmax(x, 32, i) * (0.5 / 127.0 + 1.0 / 2048.0),
            ActType::Q8_K => block_absmax(x, 256, i) * (0.5 / 127.0 + 1e-6),
        }
    };
    (0..w.len())
        .map(|i| f64::from(w[i].abs()) * per_elem(i))
        .sum::<f64>()
        * 1.01
        + 1e-9
}

fn check_dots<W: WeightBlock>(act: ActType, seed: u64) {
    let mut rng = Rng::new(seed);
    let lens: &[usize] = if W::LEN == 1 {
        &[1, 7, 8, 15, 16, 17, 33, 64, 100, 1000, 4096]
    } else {
        &[1, 2, 3, 5, 7, 16, 33]
    };
    for &n in lens {
        let n_elems = n * W::LEN;
        for trial in 0..4 {
            let wx = rng.varied(n_elems, W::LEN.max(32));
            let x = rng.varied(n_elems, W::LEN.max(32));
            let w: Vec<W> = quantize_vec(&wx);
            let a: Vec<W::Act> = quantize_vec(&x);
            let wd = dequantize_vec(&w);
            let ad = dequantize_vec(&a);
            let ctx = format!("{} n={n} trial={trial}", W::DTYPE);

            let mag: f64 = wd
                .iter()
                .zip(&ad)
                .map(|(p, q)| f64::from(p * q).abs())
                .sum();
            let exact: f64 = wd
                .iter()
                .zip(&ad)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let twin = f64::from(W::dot_scalar(&w, &a));

            // The Q8_1 sums are rounded to f16; they only matter for types with minimums.
            let sum_err = if act == ActType::Q8_1 {
                let min_abs = |i: usize| -> f64 {
                    let lo = wd[i * 32..i * 32 + 32]
                        .iter()
                        .fold(f32::INFINITY, |m, v| m.min(*v));
                    f64::from(lo.abs())
                };
                (0..n)
                    .map(|i| {
                        let s: f64 = ad[i * 32..i * 32 + 32].iter().map(|v| f64::from(*v)).sum();
                        min_abs(i) * s.abs() * Q8_1_SUM_REL * 1.01
                    })
                    .sum()
            } else {
                0.0
            };
            let tol = TWIN_VS_F64_TOL * mag + sum_err + 1e-9;
            assert!(
                (twin - exact).abs() <= tol,
                "{ctx}: twin {twin} vs f64 {exact} (tol {tol})"
            );

            // Against the unquantized activation: within the activation quantization bound.
            let ideal: f64 = wd
                .iter()
                .zip(&x)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let bound = activation_error_bound(act, &wd, &x) + tol;
            assert!(
                (twin - ideal).abs() <= bound,
                "{ctx}: twin {twin} vs unquantized {ideal} (bound {bound})"
            );

            let mut prepared = vec![W::Prep::default(); prep_len::<W>(a.len())];
            W::prepare_ggml(&a, &mut prepared);
            for level in supported_levels() {
                let fast = f64::from(W::dot_kernel(level)(&w, &prepared));
                let tol = REASSOC_TOL * mag + 1e-9;
                assert!(
                    (fast - twin).abs() <= tol,
                    "{ctx} {level}: kernel {fast} vs twin {twin} (tol {tol})"
                );
            }
        }
    }
}

/// Precise numerics: two activation levels leave at most one second-level step,
/// amax/(127·256), per value (half a step, or a whole one where a tie was clamped), plus
/// f32 rounding of the residual.
const TWO_LEVEL_REL: f64 = 1.0 / (127.0 * 256.0) + 4e-7;

fn check_precise<W: WeightBlock>(seed: u64) {
    let mut rng = Rng::new(seed);
    for n in [1, 2, 3, 4, 5, 7, 16, 33] {
        for trial in 0..4 {
            let n_elems = n * W::LEN;
            let w: Vec<W> = quantize_vec(&rng.varied(n_elems, 32));
            let x = rng.varied(n_elems, 32);
            let wd = dequantize_vec(&w);
            let prepared = prepare_f32::<W>(&x, Numerics::Precise);
            let ctx = format!("{} precise n={n} trial={trial}", W::DTYPE);
            let twin = f64::from(W::dot_kernel(crate::simd::SimdLevel::Scalar)(&w, &prepared));
            let mag: f64 = wd.iter().zip(&x).map(|(a, b)| f64::from(a * b).abs()).sum();
            let exact: f64 = wd
                .iter()
                .zip(&x)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let bound: f64 = (0..n_elems)
                .map(|i| f64::from(wd[i].abs()) * block_absmax(&x, 32, i) * TWO_LEVEL_REL)
                .sum::<f64>()
                + TWIN_VS_F64_TOL * mag
                + 1e-9;
            assert!(
                (twin - exact).abs() <= bound,
                "{ctx}: twin {twin} vs exact {exact} (bound {bound})"
            );
            for level in supported_levels() {
                let fast = f64::from(W::dot_kernel(level)(&w, &prepared));
                let tol = REASSOC_TOL * mag + 1e-9;
                assert!(
                    (fast - twin).abs() <= tol,
                    "{ctx} {level}: kernel {fast} vs twin {twin}"
                );
            }
        }
    }
}

/// Many-row kernels give every row the bits of the one-row kernel, whatever tile it is in.
fn check_row_kernels<W: WeightBlock>(seed: u64) {
    let mut rng = Rng::new(seed);
    for (n_rows, bpr) in [(1, 3), (3, 18), (4, 4), (7, 5), (9, 48)] {
        let w: Vec<W> = quantize_vec(&rng.varied(n_rows * bpr * W::LEN, 32));
        let x = prepare_f32::<W>(&rng.varied(bpr * W::LEN, 32), Numerics::Precise);
        for level in supported_levels() {
            let mut out = vec![0.0; n_rows];
            W::row_kernel(level).run(&w, &x, &mut out);
            for (r, o) in out.iter().enumerate() {
                let one = W::dot_kernel(level)(&w[r * bpr..(r + 1) * bpr], &x);
                assert_eq!(
                    o.to_bits(),
                    one.to_bits(),
                    "{} {level} row {r} of {n_rows}",
                    W::DTYPE
                );
            }
            // Scattered rows, taken straight from the matrix.
            if let RowKernel::Rows(_, rows_at) = W::row_kernel(level) {
                let idx: Vec<u32> = (0..n_rows as u32).filter(|_| rng.below(3) > 0).collect();
                let mut at = vec![0.0; idx.len()];
                rows_at(&w, bpr, &idx, &x, &mut at);
                for (&r, o) in idx.iter().zip(&at) {
                    assert_eq!(
                        o.to_bits(),
                        out[r as usize].to_bits(),
                        "{} {level} scattered row {r}",
                        W::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn row_kernels_match_one_row_kernels_bit_for_bit() {
    check_row_kernels::<BlockQ4_0>(3000);
    check_row_kernels::<BlockQ4_1>(3001);
    check_row_kernels::<BlockQ5_1>(3002);
    check_row_kernels::<BlockQ8_0>(3003);
    check_row_kernels::<BlockQ6K>(3004);
    check_row_kernels::<BlockQ2K>(3005);
    check_row_kernels::<BlockQ3K>(3006);
    check_row_kernels::<BlockIQ4NL>(3007);
    check_row_kernels::<BlockIQ4XS>(3008);
}

#[test]
fn precise_numerics_are_near_exact_at_every_level() {
    check_precise::<BlockQ4_0>(2000);
    check_precise::<BlockQ4_1>(2001);
    check_precise::<BlockQ5_0>(2002);
    check_precise::<BlockQ5_1>(2003);
    check_precise::<BlockQ8_0>(2004);
    check_precise::<BlockIQ4NL>(2005);
}

macro_rules! type_tests {
    ($($name:ident: $w:ty, $act:ident, $seed:expr;)*) => {$(
        mod $name {
            use super::*;
            #[test]
            fn quantize_roundtrip_error_is_bounded() {
                check_roundtrip::<$w>($seed);
            }
            #[test]
            fn kernels_match_scalar_twin_and_f64_reference() {
                check_dots::<$w>(ActType::$act, $seed + 1);
            }
        }
    )*};
}

type_tests! {
    f32_: f32, F32, 100;
    f16_: f16, F16, 200;
    bf16_: bf16, BF16, 300;
    q4_0: BlockQ4_0, Q8_0, 400;
    q4_1: BlockQ4_1, Q8_1, 500;
    q5_0: BlockQ5_0, Q8_0, 600;
    q5_1: BlockQ5_1, Q8_1, 700;
    q8_0: BlockQ8_0, Q8_0, 800;
    q4_k: BlockQ4K, Q8_K, 900;
    q5_k: BlockQ5K, Q8_K, 1000;
    q6_k: BlockQ6K, Q8_K, 1100;
    q2_k: BlockQ2K, Q8_K, 1700;
    q3_k: BlockQ3K, Q8_K, 1800;
    iq4_nl: BlockIQ4NL, Q8_0, 1900;
    iq4_xs: BlockIQ4XS, Q8_K, 2100;
}

#[test]
fn activation_quantizers_roundtrip() {
    check_roundtrip::<BlockQ8_1>(1200);
    check_roundtrip::<BlockQ8K>(1300);
}

#[test]
fn weight_types_pair_with_their_activation_types() {
    fn act_of<W: WeightBlock>() -> GgmlType {
        <W::Act as TensorElement>::DTYPE
    }
    let pairs = [
        (WeightType::F32, act_of::<f32>()),
        (WeightType::F16, act_of::<f16>()),
        (WeightType::BF16, act_of::<bf16>()),
        (WeightType::Q4_0, act_of::<BlockQ4_0>()),
        (WeightType::Q4_1, act_of::<BlockQ4_1>()),
        (WeightType::Q5_0, act_of::<BlockQ5_0>()),
        (WeightType::Q5_1, act_of::<BlockQ5_1>()),
        (WeightType::Q8_0, act_of::<BlockQ8_0>()),
        (WeightType::Q4_K, act_of::<BlockQ4K>()),
        (WeightType::Q5_K, act_of::<BlockQ5K>()),
        (WeightType::Q6_K, act_of::<BlockQ6K>()),
        (WeightType::Q2_K, act_of::<BlockQ2K>()),
        (WeightType::Q3_K, act_of::<BlockQ3K>()),
        (WeightType::IQ4_NL, act_of::<BlockIQ4NL>()),
        (WeightType::IQ4_XS, act_of::<BlockIQ4XS>()),
    ];
    assert_eq!(pairs.len(), WeightType::ALL.len());
    for (wt, act) in pairs {
        let expected = match wt.act_type() {
            ActType::F32 => GgmlType::F32,
            ActType::F16 => GgmlType::F16,
            ActType::BF16 => GgmlType::BF16,
            ActType::Q8_0 => GgmlType::Q8_0,
            ActType::Q8_1 => GgmlType::Q8_1,
            ActType::Q8_K => GgmlType::Q8_K,
        };
        assert_eq!(act, expected, "{wt:?}");
        assert_eq!(WeightType::from_ggml(wt.ggml()), Some(wt));
    }
}

#[test]
fn k_scale_packing_roundtrips_every_value() {
    for v in 0..64u8 {
        let sc: [u8; 8] = std::array::from_fn(|j| ((usize::from(v) + 7 * j) % 64) as u8);
        let mn: [u8; 8] = std::array::from_fn(|j| ((usize::from(v) * 3 + 11 * j) % 64) as u8);
        let packed = kquant::pack_scale_min_k4_for_tests(&sc, &mn);
        assert_eq!(kquant_scales(&packed), (sc, mn));
    }
}

#[test]
fn q3_k_scale_packing_roundtrips_every_value() {
    for v in 0..64i16 {
        let sc: [i8; 16] = std::array::from_fn(|i| ((v + 5 * i as i16) % 64 - 32) as i8);
        assert_eq!(
            kquant_low::q3_scales(&kquant_low::pack_q3_scales_for_tests(&sc)),
            sc
        );
    }
}

/// Blocks of random bits (finite scales): every level, scale and mask bit a file may hold,
/// which quantizers reach only in part (Q3_K's scale -32, IQ4_XS's every sub-block
/// scale), through every kernel against the twin.
fn check_random_bits<W: WeightBlock + crate::pod::Pod>(seed: u64, fix: impl Fn(&mut W, &mut Rng)) {
    let mut rng = Rng::new(seed);
    for n in [1, 2, 3, 7] {
        let mut w = vec![W::default(); n];
        rng.fill_bytes(crate::pod::as_bytes_mut(&mut w));
        for b in &mut w {
            fix(b, &mut rng);
        }
        let a: Vec<W::Act> = quantize_vec(&rng.varied(n * W::LEN, 32));
        let (wd, ad) = (dequantize_vec(&w), dequantize_vec(&a));
        let mag: f64 = wd
            .iter()
            .zip(&ad)
            .map(|(p, q)| f64::from(p * q).abs())
            .sum();
        let exact: f64 = wd
            .iter()
            .zip(&ad)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum();
        let twin = f64::from(W::dot_scalar(&w, &a));
        let ctx = format!("{} random bits n={n}", W::DTYPE);
        let tol = TWIN_VS_F64_TOL * mag + 1e-9;
        assert!(
            (twin - exact).abs() <= tol,
            "{ctx}: twin {twin} vs f64 {exact}"
        );
        let mut prepared = vec![W::Prep::default(); prep_len::<W>(a.len())];
        W::prepare_ggml(&a, &mut prepared);
        for level in supported_levels() {
            let fast = f64::from(W::dot_kernel(level)(&w, &prepared));
            let tol = REASSOC_TOL * mag + 1e-9;
            assert!(
                (fast - twin).abs() <= tol,
                "{ctx} {level}: kernel {fast} vs twin {twin}"
            );
        }
    }
}

#[test]
fn random_block_bits_match_the_twin_at_every_level() {
    let scale = |r: &mut Rng| f16::from_f32(r.normal() * 0.05);
    check_random_bits(3100, |b: &mut BlockQ2K, r| {
        (b.d, b.dmin) = (scale(r), scale(r))
    });
    check_random_bits(3101, |b: &mut BlockQ3K, r| b.d = scale(r));
    check_random_bits(3102, |b: &mut BlockIQ4NL, r| b.d = scale(r));
    check_random_bits(3103, |b: &mut BlockIQ4XS, r| b.d = scale(r));
    check_random_bits(3104, |b: &mut BlockQ4K, r| {
        (b.d, b.dmin) = (scale(r), scale(r))
    });
    check_random_bits(3105, |b: &mut BlockQ6K, r| b.d = scale(r));
}

#[test]
fn q8_quantizers_never_emit_minus_128() {
    let mut rng = Rng::new(1400);
    let x = rng.varied(256 * 16, 32);
    assert!(
        quantize_vec::<BlockQ8_0>(&x)
            .iter()
            .all(|b| b.qs.iter().all(|&q| q != -128))
    );
    assert!(
        quantize_vec::<BlockQ8_1>(&x)
            .iter()
            .all(|b| b.qs.iter().all(|&q| q != -128))
    );
    assert!(
        quantize_vec::<BlockQ8K>(&x)
            .iter()
            .all(|b| b.qs.iter().all(|&q| q != -128))
    );
}

#[test]
fn q8k_block_sums_match_values() {
    let mut rng = Rng::new(1500);
    let x = rng.varied(256 * 4, 256);
    for b in quantize_vec::<BlockQ8K>(&x) {
        for (k, s) in b.bsums.iter().enumerate() {
            let sum: i16 = b.qs[16 * k..16 * k + 16]
                .iter()
                .map(|&q| i16::from(q))
                .sum();
            assert_eq!(*s, sum);
        }
    }
}

#[test]
fn stored_minus_128_is_exact_in_q8_0_kernels() {
    // Weights from a file may hold -128, which our quantizer never writes.
    let mut rng = Rng::new(1600);
    let mut w: Vec<BlockQ8_0> = quantize_vec(&rng.varied(32 * 5, 32));
    for b in &mut w {
        b.qs[3] = -128;
        b.qs[17] = -128;
    }
    let a: Vec<BlockQ8_0> = quantize_vec(&rng.varied(32 * 5, 32));
    let mut prepared = vec![PrepQ8::default(); prep_len::<BlockQ8_0>(a.len())];
    BlockQ8_0::prepare_ggml(&a, &mut prepared);
    let twin = BlockQ8_0::dot_scalar(&w, &a);
    for level in supported_levels() {
        let fast = BlockQ8_0::dot_kernel(level)(&w, &prepared);
        assert!(
            (twin - fast).abs() <= 1e-4 * twin.abs().max(1.0),
            "{level}: {twin} vs {fast}"
        );
    }
}
