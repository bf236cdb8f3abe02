//! `acc += h · row` for one quantized weight row: the inner step of the row-sparse down
//! projection (`Σ h[i]·down_t[i,:]` over the active neurons i).
//!
//! The weight is dequantized exactly as [`Block::dequantize`] does and the product added
//! without fusing (`acc + h·w`, two roundings), so every kernel gives the same bits as the
//! scalar twin [`axpy_scalar`]: the SIMD forms only do several columns at once.

use half::{bf16, f16};

use super::{
    Block, BlockIQ4NL, BlockIQ4XS, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0,
    BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
};
use crate::dtype::QK_K;
use crate::simd::SimdLevel;

/// `acc[j] += h · w[j]` over one row: `acc.len() == w.len() * LEN`.
pub type AxpyFn<W> = fn(&[W], f32, &mut [f32]);

/// A block type with a row axpy.
pub trait AxpyBlock: Block {
    /// The plain twin the kernels are tested against (and the kernel without SIMD).
    fn axpy_twin() -> AxpyFn<Self> {
        axpy_scalar::<Self>
    }

    /// The fastest axpy usable at `level`.
    fn axpy_kernel(level: SimdLevel) -> AxpyFn<Self> {
        let _ = level;
        Self::axpy_twin()
    }
}

/// The plain twin: dequantize a block, multiply, add.
pub fn axpy_scalar<W: Block>(w: &[W], h: f32, acc: &mut [f32]) {
    assert_eq!(acc.len(), w.len() * W::LEN, "accumulator must be one row");
    let mut tmp = [0.0f32; QK_K];
    for (b, a) in w.iter().zip(acc.chunks_exact_mut(W::LEN)) {
        let t = &mut tmp[..W::LEN];
        W::dequantize(std::slice::from_ref(b), t);
        for (x, &y) in a.iter_mut().zip(t.iter()) {
            *x += h * y;
        }
    }
}

/// The Q8_0 twin (the neuron-major form the sparse FFN reads most): `h` times the block
/// scale once per block, then times each integer value and added, so a kernel spends one
/// multiply per value instead of two.
fn axpy_q8_0_scalar(w: &[BlockQ8_0], h: f32, acc: &mut [f32]) {
    assert_eq!(
        acc.len(),
        w.len() * BlockQ8_0::LEN,
        "accumulator must be one row"
    );
    for (b, a) in w.iter().zip(acc.chunks_exact_mut(BlockQ8_0::LEN)) {
        let s = h * b.d.to_f32();
        for (x, &q) in a.iter_mut().zip(&b.qs) {
            *x += s * f32::from(q);
        }
    }
}

/// A float row needs no block loop.
fn axpy_f32_scalar(w: &[f32], h: f32, acc: &mut [f32]) {
    assert_eq!(acc.len(), w.len(), "accumulator must be one row");
    for (x, &y) in acc.iter_mut().zip(w) {
        *x += h * y;
    }
}

macro_rules! avx2_or {
    ($level:expr, $name:ident, $fallback:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if $level.min(crate::simd::hardware_level()) >= SimdLevel::Avx2 {
            return x86::$name;
        }
        let _ = $level;
        $fallback
    }};
}

/// The AVX-512 kernel where the level allows it, else the AVX2 one, else `fallback`.
macro_rules! avx512_or_avx2_or {
    ($level:expr, $name512:ident, $name2:ident, $fallback:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if $level.min(crate::simd::hardware_level()) >= SimdLevel::Avx512 {
            return x86::$name512;
        }
        avx2_or!($level, $name2, $fallback)
    }};
}

impl AxpyBlock for f32 {
    fn axpy_kernel(level: SimdLevel) -> AxpyFn<Self> {
        avx512_or_avx2_or!(level, axpy_f32_512, axpy_f32, axpy_f32_scalar)
    }
}
impl AxpyBlock for f16 {
    fn axpy_kernel(level: SimdLevel) -> AxpyFn<Self> {
        avx2_or!(level, axpy_f16, axpy_scalar::<f16>)
    }
}
impl AxpyBlock for bf16 {}
impl AxpyBlock for BlockQ4_0 {
    fn axpy_kernel(level: SimdLevel) -> AxpyFn<Self> {
        avx2_or!(level, axpy_q4_0, axpy_scalar::<BlockQ4_0>)
    }
}
impl AxpyBlock for BlockQ4_1 {
    fn axpy_kernel(level: SimdLevel) -> AxpyFn<Self> {
        avx2_or!(level, axpy_q4_1, axpy_scalar::<BlockQ4_1>)
    }
}
impl AxpyBlock for BlockQ5_0 {}
impl AxpyBlock for BlockQ5_1 {}
impl AxpyBlock for BlockQ8_0 {
    fn axpy_twin() -> AxpyFn<Self> {
        axpy_q8_0_scalar
    }

    fn axpy_kernel(level: SimdLevel) -> AxpyFn<Self> {
        avx512_or_avx2_or!(level, axpy_q8_0_512, axpy_q8_0, axpy_q8_0_scalar)
    }
}
impl AxpyBlock for BlockQ4K {}
impl AxpyBlock for BlockQ5K {}
impl AxpyBlock for BlockQ6K {}
impl AxpyBlock for BlockQ2K {}
impl AxpyBlock for BlockQ3K {}
impl AxpyBlock for BlockIQ4NL {}
impl AxpyBlock for BlockIQ4XS {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};
    use crate::simd::avx2::f16_to_f32;

    /// `acc[0..8] += h · w` (multiply, then add: the twin's two roundings).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn step(acc: &mut [f32], h: __m256, w: __m256) {
        assert!(acc.len() >= 8);
        // SAFETY: 8 floats checked above.
        unsafe {
            let p = acc.as_mut_ptr();
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(h, w)));
        }
    }

    /// The 32 4-bit levels of a block as four vectors of 8 (elements 0..8, 8..16, 16..24,
    /// 24..32), as signed integers minus `offset`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nibbles(qs: &[u8; 16], offset: i32) -> [__m256; 4] {
        // SAFETY: 16 bytes.
        let v = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
        let m4 = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(v, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        let off = _mm256_set1_epi32(offset);
        let f = |x: __m128i| _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(x), off));
        [
            f(lo),
            f(_mm_srli_si128(lo, 8)),
            f(hi),
            f(_mm_srli_si128(hi, 8)),
        ]
    }

    pub fn axpy_f32(w: &[f32], h: f32, acc: &mut [f32]) {
        assert_eq!(acc.len(), w.len(), "accumulator must be one row");
        // SAFETY: the dispatcher hands this out only where AVX2 runs.
        unsafe { axpy_f32_impl(w, h, acc) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn axpy_f32_impl(w: &[f32], h: f32, acc: &mut [f32]) {
        let n = w.len() / 8 * 8;
        let hv = _mm256_set1_ps(h);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= w.len().
            let wv = unsafe { _mm256_loadu_ps(w.as_ptr().add(i)) };
            step(&mut acc[i..], hv, wv);
        }
        for i in n..w.len() {
            acc[i] += h * w[i];
        }
    }

    pub fn axpy_f16(w: &[f16], h: f32, acc: &mut [f32]) {
        assert_eq!(acc.len(), w.len(), "accumulator must be one row");
        // SAFETY: the dispatcher hands this out only where AVX2 (with F16C) runs.
        unsafe { axpy_f16_impl(w, h, acc) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn axpy_f16_impl(w: &[f16], h: f32, acc: &mut [f32]) {
        let n = w.len() / 8 * 8;
        let hv = _mm256_set1_ps(h);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= w.len(); f16 is two bytes.
            let wv = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i).cast())) };
            step(&mut acc[i..], hv, wv);
        }
        for i in n..w.len() {
            acc[i] += h * w[i].to_f32();
        }
    }

    pub fn axpy_q4_0(w: &[BlockQ4_0], h: f32, acc: &mut [f32]) {
        assert_eq!(acc.len(), w.len() * QK, "accumulator must be one row");
        // SAFETY: the dispatcher hands this out only where AVX2 runs.
        unsafe { axpy_q4_0_impl(w, h, acc) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn axpy_q4_0_impl(w: &[BlockQ4_0], h: f32, acc: &mut [f32]) {
        let hv = _mm256_set1_ps(h);
        for (b, a) in w.iter().zip(acc.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_to_f32(b.d));
            for (k, q) in nibbles(&b.qs, 8).into_iter().enumerate() {
                step(&mut a[8 * k..], hv, _mm256_mul_ps(q, d));
            }
        }
    }

    pub fn axpy_q4_1(w: &[BlockQ4_1], h: f32, acc: &mut [f32]) {
        assert_eq!(acc.len(), w.len() * QK, "accumulator must be one row");
        // SAFETY: the dispatcher hands this out only where AVX2 runs.
        unsafe { axpy_q4_1_impl(w, h, acc) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn axpy_q4_1_impl(w: &[BlockQ4_1], h: f32, acc: &mut [f32]) {
        let hv = _mm256_set1_ps(h);
        for (b, a) in w.iter().zip(acc.chunks_exact_mut(QK)) {
            let d = _mm256_set1_ps(f16_to_f32(b.d));
            let m = _mm256_set1_ps(f16_to_f32(b.m));
            for (k, q) in nibbles(&b.qs, 0).into_iter().enumerate() {
                step(&mut a[8 * k..], hv, _mm256_add_ps(_mm256_mul_ps(q, d), m));
            }
        }
    }

    pub fn axpy_f32_512(w: &[f32], h: f32, acc: &mut [f32]) {
        assert_eq!(acc.len(), w.len(), "accumulator must be one row");
        // SAFETY: the dispatcher hands this out only where AVX-512 runs.
        unsafe { axpy_f32_512_impl(w, h, acc) }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn axpy_f32_512_impl(w: &[f32], h: f32, acc: &mut [f32]) {
        let n = w.len() / 16 * 16;
        let hv = _mm512_set1_ps(h);
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= w.len() == acc.len().
            unsafe {
                let p = acc.as_mut_ptr().add(i);
                let wv = _mm512_loadu_ps(w.as_ptr().add(i));
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), _mm512_mul_ps(hv, wv)));
            }
        }
        for i in n..w.len() {
            acc[i] += h * w[i];
        }
    }

    pub fn axpy_q8_0_512(w: &[BlockQ8_0], h: f32, acc: &mut [f32]) {
        assert_eq!(acc.len(), w.len() * QK, "accumulator must be one row");
        // SAFETY: the dispatcher hands this out only where AVX-512 runs.
        unsafe { axpy_q8_0_512_impl(w, h, acc) }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn axpy_q8_0_512_impl(w: &[BlockQ8_0], h: f32, acc: &mut [f32]) {
        for (b, a) in w.iter().zip(acc.chunks_exact_mut(QK)) {
            let s = _mm512_set1_ps(h * f16_to_f32(b.d));
            for k in 0..2 {
                // SAFETY: 16 of the block's 32 bytes, and 16 of its 32 accumulators.
                unsafe {
                    let q = _mm_loadu_si128(b.qs.as_ptr().add(16 * k).cast());
                    let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                    let p = a.as_mut_ptr().add(16 * k);
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), _mm512_mul_ps(s, q)));
                }
            }
        }
    }

    pub fn axpy_q8_0(w: &[BlockQ8_0], h: f32, acc: &mut [f32]) {
        assert_eq!(acc.len(), w.len() * QK, "accumulator must be one row");
        // SAFETY: the dispatcher hands this out only where AVX2 runs.
        unsafe { axpy_q8_0_impl(w, h, acc) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn axpy_q8_0_impl(w: &[BlockQ8_0], h: f32, acc: &mut [f32]) {
        for (b, a) in w.iter().zip(acc.chunks_exact_mut(QK)) {
            let s = _mm256_set1_ps(h * f16_to_f32(b.d));
            for k in 0..4 {
                // SAFETY: 8 of the block's 32 bytes.
                let q = unsafe { _mm_loadl_epi64(b.qs.as_ptr().add(8 * k).cast()) };
                step(
                    &mut a[8 * k..],
                    s,
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::simd::supported_levels;

    fn check<W: AxpyBlock>(seed: u64) {
        let mut rng = Rng::new(seed);
        let n_cols = 2 * QK_K;
        let x = rng.varied(n_cols, 32);
        let mut w = vec![W::default(); n_cols / W::LEN];
        W::quantize(&x, &mut w);
        let mut deq = vec![0.0; n_cols];
        W::dequantize(&w, &mut deq);
        let start: Vec<f32> = (0..n_cols).map(|_| rng.normal()).collect();
        let h = rng.normal();
        let mut twin = start.clone();
        W::axpy_twin()(&w, h, &mut twin);
        for (j, t) in twin.iter().enumerate() {
            let exact = f64::from(start[j]) + f64::from(h) * f64::from(deq[j]);
            let tol = 1e-6 * (f64::from(start[j]).abs() + (f64::from(h) * f64::from(deq[j])).abs());
            assert!(
                (f64::from(*t) - exact).abs() <= tol + 1e-30,
                "{} col {j}",
                W::DTYPE
            );
        }
        for level in supported_levels() {
            let mut fast = start.clone();
            W::axpy_kernel(level)(&w, h, &mut fast);
            let same = fast
                .iter()
                .zip(&twin)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{} at {level}: the kernel must give the twin's bits",
                W::DTYPE
            );
        }
    }

    #[test]
    fn every_kernel_gives_the_twin_s_bits_and_the_twin_is_exact_to_rounding() {
        check::<f32>(1);
        check::<f16>(2);
        check::<bf16>(3);
        check::<BlockQ4_0>(4);
        check::<BlockQ4_1>(5);
        check::<BlockQ5_0>(6);
        check::<BlockQ5_1>(7);
        check::<BlockQ8_0>(8);
        check::<BlockQ4K>(9);
        check::<BlockQ5K>(10);
        check::<BlockQ6K>(11);
        check::<BlockQ2K>(12);
        check::<BlockQ3K>(13);
        check::<BlockIQ4NL>(14);
        check::<BlockIQ4XS>(15);
    }
}
