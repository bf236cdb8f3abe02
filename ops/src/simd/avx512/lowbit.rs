//! AVX-512 VNNI kernels of the 2- and 3-bit k-quants and the non-linear 4-bit types, each
//! the fast twin of a `dot_scalar` (or prepared twin) in `crate::quant`: 64 values per
//! step, scales applied with `vpdpwssd` (k-quants, IQ4_XS) or the prepared Q8_0 layout
//! with `vpdpbusd` (IQ4_NL).

use std::arch::x86_64::*;

use super::{f16_to_f32, join, load32, load64_i8, load128, q8_pair_levels};
use crate::quant::prep::{PrepQ8, Q8_GROUP};
use crate::quant::{
    BlockIQ4NL, BlockIQ4XS, BlockQ2K, BlockQ3K, BlockQ8K, KVALUES_IQ4NL, iq4xs_scale, q3_scales,
};

entry!(dot_q2_k_q8_k, dot_q2_k_impl, BlockQ2K, BlockQ8K, Avx512Vnni);
entry!(dot_q3_k_q8_k, dot_q3_k_impl, BlockQ3K, BlockQ8K, Avx512Vnni);
entry!(
    dot_iq4_xs_q8_k,
    dot_iq4_xs_impl,
    BlockIQ4XS,
    BlockQ8K,
    Avx512Vnni
);

/// Lane `i` of 32 i16 lanes holds `i / 8`: the sub-block of 16 values, within a 64-value
/// step, whose products (two per lane) the lane sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn sub_block_index() -> __m512i {
    let idx: [i16; 32] = std::array::from_fn(|i| (i / 8) as i16);
    // SAFETY: 64 readable bytes.
    unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
}

/// The two-bit levels of 64 values starting at value `64k` of a 128-value half whose bytes
/// are `q`: shifts `4k` and `4k + 2`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn low2_x64(q: __m256i, k: usize) -> __m512i {
    let lo = _mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * k as i32));
    let hi = _mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * k as i32 + 2));
    _mm512_and_si512(join(lo, hi), _mm512_set1_epi8(3))
}

// Q2_K: levels <= 3: pairs <= 762 in i16, 4-bit scales by `vpdpwssd`; the minimum term
// from the activation's block sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q2_k_impl(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = 0.0f32;
    let idx = sub_block_index();
    for (w, a) in w.iter().zip(a) {
        let sum_m: i32 = (0..16)
            .map(|k| i32::from(w.scales[k] >> 4) * i32::from(a.bsums[k]))
            .sum();
        acc_m += a.d * f16_to_f32(w.dmin) * sum_m as f32;
        // SAFETY: the 16 scale bytes are readable.
        let sc8 = unsafe { _mm_loadu_si128(w.scales.as_ptr().cast()) };
        let sc8 = _mm_and_si128(sc8, _mm_set1_epi8(0x0f));
        let sc16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(sc8));
        let mut sumi = _mm512_setzero_si512();
        for half in 0..2 {
            let q = load32(&w.qs[32 * half..]);
            for k in 0..2 {
                let e = 128 * half + 64 * k;
                let p = _mm512_maddubs_epi16(low2_x64(q, k), load64_i8(&a.qs[e..]));
                let base = _mm512_set1_epi16((e / 16) as i16);
                let s = _mm512_permutexvar_epi16(_mm512_add_epi16(idx, base), sc16);
                sumi = _mm512_dpwssd_epi32(sumi, p, s);
            }
        }
        let d = _mm512_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc) - acc_m
}

// Q3_K: unsigned levels q + 4 <= 7 (pairs <= 1778), signed 6-bit scales by `vpdpwssd`,
// the -4 offset through the activation's block sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q3_k_impl(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let idx = sub_block_index();
    let four = _mm512_set1_epi8(4);
    for (w, a) in w.iter().zip(a) {
        let sc = q3_scales(&w.scales);
        // SAFETY: 16 readable bytes.
        let sc16_256 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sc.as_ptr().cast()) });
        let sc16 = _mm512_castsi256_si512(sc16_256);
        let hm = load32(&w.hmask);
        let mut sumi = _mm512_setzero_si512();
        for half in 0..2 {
            let q = load32(&w.qs[32 * half..]);
            for k in 0..2 {
                let e = 128 * half + 64 * k;
                // Values e..e+32 keep their high bit at bit e / 32 of hmask, the next 32 at
                // the bit after.
                let m = e / 32;
                let lo = _mm256_test_epi8_mask(hm, _mm256_set1_epi8((1u8 << m) as i8));
                let hi = _mm256_test_epi8_mask(hm, _mm256_set1_epi8((1u8 << (m + 1)) as i8));
                let mask = u64::from(lo) | (u64::from(hi) << 32);
                let q3 = _mm512_or_si512(low2_x64(q, k), _mm512_maskz_mov_epi8(mask, four));
                let p = _mm512_maddubs_epi16(q3, load64_i8(&a.qs[e..]));
                let base = _mm512_set1_epi16((e / 16) as i16);
                let s = _mm512_permutexvar_epi16(_mm512_add_epi16(idx, base), sc16);
                sumi = _mm512_dpwssd_epi32(sumi, p, s);
            }
        }
        // SAFETY: the 16 i16 block sums are readable.
        let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
        let offset = _mm256_slli_epi32::<2>(_mm256_madd_epi16(bsums, sc16_256));
        sumi = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(offset));
        let d = _mm512_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// The codebook in all four 128-bit lanes, for `vpshufb`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn codebook() -> __m512i {
    // SAFETY: 16 readable bytes.
    let k = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr().cast()) };
    _mm512_broadcast_i32x4(k)
}

// IQ4_XS: signed levels times signed activations by the sign trick (|level| <= 127,
// activations never -128: pairs <= 32258 in i16), signed 6-bit scales by `vpdpwssd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_iq4_xs_impl(w: &[BlockIQ4XS], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let table = codebook();
    let m4 = _mm256_set1_epi8(0x0f);
    for (w, a) in w.iter().zip(a) {
        let mut sumi = _mm512_setzero_si512();
        for c in 0..4 {
            // Sub-blocks 2c and 2c + 1: low nibbles are values 0..16, high ones 16..32.
            let q = load32(&w.qs[32 * c..]);
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
            let nib = join(
                _mm256_permute2x128_si256::<0x20>(lo, hi),
                _mm256_permute2x128_si256::<0x31>(lo, hi),
            );
            let x = _mm512_shuffle_epi8(table, nib);
            let y = load64_i8(&a.qs[64 * c..]);
            let neg = _mm512_movepi8_mask(x);
            let y = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
            let p = _mm512_maddubs_epi16(_mm512_abs_epi8(x), y);
            let s = join(
                _mm256_set1_epi16(iq4xs_scale(w, 2 * c) as i16),
                _mm256_set1_epi16(iq4xs_scale(w, 2 * c + 1) as i16),
            );
            sumi = _mm512_dpwssd_epi32(sumi, p, s);
        }
        let d = _mm512_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// The 32 levels of an IQ4_NL block in order (values 0..16 from the low nibbles, 16..32
/// from the high ones) as nibble indices.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn iq4nl_nibbles(b: &BlockIQ4NL) -> __m256i {
    let q = load128(&b.qs);
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16::<4>(q), q),
        _mm256_set1_epi8(0x0f),
    )
}

/// IQ4_NL weights · prepared activations: two blocks per step as Q8_0's `dot_q8`.
pub fn dot_iq4_nl(w: &[BlockIQ4NL], a: &[PrepQ8]) -> f32 {
    assert_eq!(a.len(), w.len().div_ceil(Q8_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx512Vnni.is_supported());
    // SAFETY: handed out only by `simd::dispatch!`, which checks the CPU level.
    unsafe { dot_iq4_nl_impl(w, a) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_iq4_nl_impl(w: &[BlockIQ4NL], a: &[PrepQ8]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let table = codebook();
    let pairs = w.chunks_exact(Q8_GROUP);
    let tail = pairs.remainder();
    let mut step = |b0: &BlockIQ4NL, b1: &BlockIQ4NL, p: &PrepQ8| {
        let q = _mm512_shuffle_epi8(table, join(iq4nl_nibbles(b0), iq4nl_nibbles(b1)));
        let d_bits = i32::from(b0.d.to_bits()) | (i32::from(b1.d.to_bits()) << 16);
        q8_pair_levels(q, d_bits, p, &mut acc);
    };
    for (pair, p) in pairs.zip(a) {
        step(&pair[0], &pair[1], p);
    }
    if let [b] = tail {
        // The missing block has scale 0 and meets zeros in the activation.
        step(b, &BlockIQ4NL::default(), &a[a.len() - 1]);
    }
    _mm512_reduce_add_ps(acc)
}
