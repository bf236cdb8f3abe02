//! AVX2 kernels of the 2- and 3-bit k-quants and the non-linear 4-bit types, each the fast
//! twin of a `dot_scalar` (or prepared twin) in `crate::quant`.
//!
//! The non-linear types look their levels up with `vpshufb` from the 16-byte codebook and
//! multiply signed bytes with the sign trick of `dot_ss8`: |level| <= 127 and activations
//! are never -128, so pairs stay <= 32258 in `vpmaddubsw`.

use std::arch::x86_64::*;

use super::{dot_ss8, f16_to_f32, hsum_ps, load32, load32_i8, load128};
use crate::quant::prep::{LEVEL2_SHIFT_I32, PrepQ8, Q8_GROUP};
use crate::quant::{
    BlockIQ4NL, BlockIQ4XS, BlockQ2K, BlockQ3K, BlockQ8K, KVALUES_IQ4NL, iq4xs_scale, q3_scales,
};

entry!(dot_q2_k_q8_k, dot_q2_k_impl, BlockQ2K, BlockQ8K);
entry!(dot_q3_k_q8_k, dot_q3_k_impl, BlockQ3K, BlockQ8K);
entry!(dot_iq4_xs_q8_k, dot_iq4_xs_impl, BlockIQ4XS, BlockQ8K);

/// The codebook in both 128-bit lanes, for `vpshufb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codebook() -> __m256i {
    // SAFETY: 16 readable bytes.
    let k = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr().cast()) };
    _mm256_set_m128i(k, k)
}

/// i16 lanes 0..8 = `s0`, 8..16 = `s1` (one scale per 16 values of a 32-byte product).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_pair(s0: i16, s1: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0))
}

// Q2_K: levels <= 3: pairs <= 762 in `vpmaddubsw`; times a 4-bit scale in i32. The
// minimum term comes from the activation's block sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q2_k_impl(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0.0f32;
    let m2 = _mm256_set1_epi8(3);
    for (w, a) in w.iter().zip(a) {
        let sum_m: i32 = (0..16)
            .map(|k| i32::from(w.scales[k] >> 4) * i32::from(a.bsums[k]))
            .sum();
        acc_m += a.d * f16_to_f32(w.dmin) * sum_m as f32;
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let q = load32(&w.qs[32 * half..]);
            for j in 0..4 {
                let e = 128 * half + 32 * j;
                let qj = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j as i32)), m2);
                let p = _mm256_maddubs_epi16(qj, load32_i8(&a.qs[e..]));
                let s = e / 16;
                let sc = scale_pair(
                    i16::from(w.scales[s] & 0xf),
                    i16::from(w.scales[s + 1] & 0xf),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc));
            }
        }
        let d = _mm256_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - acc_m
}

// Q3_K: unsigned levels q + 4 <= 7: pairs <= 1778; signed 6-bit scales in i32, the -4
// offset through the activation's block sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q3_k_impl(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m2 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    for (w, a) in w.iter().zip(a) {
        let sc = q3_scales(&w.scales);
        let hm = load32(&w.hmask);
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let q = load32(&w.qs[32 * half..]);
            for j in 0..4 {
                let e = 128 * half + 32 * j;
                let bit = _mm256_set1_epi8((1u8 << (4 * half + j)) as i8);
                let high =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), four);
                let qj = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j as i32)), m2);
                let p = _mm256_maddubs_epi16(_mm256_or_si256(qj, high), load32_i8(&a.qs[e..]));
                let s = e / 16;
                let scales = scale_pair(i16::from(sc[s]), i16::from(sc[s + 1]));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
            }
        }
        let offset: i32 = (0..16)
            .map(|k| i32::from(sc[k]) * i32::from(a.bsums[k]))
            .sum();
        sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(4 * offset, 0, 0, 0, 0, 0, 0, 0));
        let d = _mm256_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// 32 bytes of packed nibbles of two 32-value sub-blocks as their 64 levels in order:
/// `[sub-block 0 | sub-block 1]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn iq4_levels_pair(q: __m256i, table: __m256i) -> [__m256i; 2] {
    let m4 = _mm256_set1_epi8(0x0f);
    let lo = _mm256_and_si256(q, m4);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
    [
        _mm256_shuffle_epi8(table, _mm256_permute2x128_si256::<0x20>(lo, hi)),
        _mm256_shuffle_epi8(table, _mm256_permute2x128_si256::<0x31>(lo, hi)),
    ]
}

// IQ4_XS: pairs <= 32258 (module doc) in i16, times a signed 6-bit scale: pairs of
// those <= 2^21 in i32.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_iq4_xs_impl(w: &[BlockIQ4XS], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let table = codebook();
    for (w, a) in w.iter().zip(a) {
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let levels = iq4_levels_pair(load32(&w.qs[32 * c..]), table);
            for (k, x) in levels.into_iter().enumerate() {
                let ib = 2 * c + k;
                let p = dot_ss8_i16(x, load32_i8(&a.qs[32 * ib..]));
                let s = _mm256_set1_epi16(iq4xs_scale(w, ib) as i16);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        let d = _mm256_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// Signed × signed byte products summed in pairs to i16 (the first step of `dot_ss8`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_ss8_i16(x: __m256i, y: __m256i) -> __m256i {
    _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// IQ4_NL weights · prepared activations (the layout of Q8_0's, see `dot_q8`).
pub fn dot_iq4_nl(w: &[BlockIQ4NL], a: &[PrepQ8]) -> f32 {
    assert_eq!(a.len(), w.len().div_ceil(Q8_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx2.is_supported());
    // SAFETY: handed out only by `simd::dispatch!`, which checks the CPU level.
    unsafe { dot_iq4_nl_impl(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_iq4_nl_impl(w: &[BlockIQ4NL], a: &[PrepQ8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let table = codebook();
    let m4 = _mm256_set1_epi8(0x0f);
    for (i, wb) in w.iter().enumerate() {
        let (p, b) = (&a[i / Q8_GROUP], i % Q8_GROUP);
        // SAFETY: offsets 32b..32b+32 and 8b..8b+8 of the prepared arrays.
        let (y, y2, ad) = unsafe {
            (
                _mm256_loadu_si256(p.qs.as_ptr().add(32 * b).cast()),
                _mm256_loadu_si256(p.qs2.as_ptr().add(32 * b).cast()),
                _mm256_loadu_ps(p.d.as_ptr().add(8 * b)),
            )
        };
        let q = load128(&wb.qs);
        // Values 0..16 are the low nibbles, 16..32 the high ones.
        let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), m4);
        let x = _mm256_shuffle_epi8(table, nib);
        let isum = _mm256_add_epi32(
            _mm256_slli_epi32::<LEVEL2_SHIFT_I32>(dot_ss8(x, y)),
            dot_ss8(x, y2),
        );
        let scale = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(wb.d)), ad);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc);
    }
    hsum_ps(acc)
}
