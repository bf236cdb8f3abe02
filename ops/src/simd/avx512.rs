//! AVX-512 kernels: 512-bit float dot products (F/BW/VL/DQ) and VNNI integer dot products
//! (`vpdpbusd` for u8 × i8, `vpdpwssd` for the i16 × scale step of the k-quants). Each is
//! the fast twin of a `dot_scalar` in `crate::quant` and is tested against it.
//!
//! The 32-element block types are processed two blocks per 512-bit register; signed
//! weights are made unsigned by an offset that is subtracted through a second `vpdpbusd`
//! against the same activation bytes, so every integer sum is exact.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::avx2::{f16_to_f32, hsum_ps};
use crate::quant::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, kquant_scales,
};

macro_rules! entry {
    ($name:ident, $imp:ident, $w:ty, $a:ty, $level:ident) => {
        pub fn $name(w: &[$w], a: &[$a]) -> f32 {
            assert_eq!(w.len(), a.len());
            debug_assert!(crate::simd::SimdLevel::$level.is_supported());
            // SAFETY: the kernels of this module are handed out only by
            // `simd::dispatch!`, which caps the level at what the CPU supports.
            unsafe { $imp(w, a) }
        }
    };
}

entry!(dot_f32, dot_f32_impl, f32, f32, Avx512);
entry!(dot_f16, dot_f16_impl, f16, f16, Avx512);
entry!(dot_bf16, dot_bf16_impl, bf16, bf16, Avx512);
entry!(
    dot_q4_0_q8_0,
    dot_q4_0_impl,
    BlockQ4_0,
    BlockQ8_0,
    Avx512Vnni
);
entry!(
    dot_q4_1_q8_1,
    dot_q4_1_impl,
    BlockQ4_1,
    BlockQ8_1,
    Avx512Vnni
);
entry!(
    dot_q5_0_q8_0,
    dot_q5_0_impl,
    BlockQ5_0,
    BlockQ8_0,
    Avx512Vnni
);
entry!(
    dot_q5_1_q8_1,
    dot_q5_1_impl,
    BlockQ5_1,
    BlockQ8_1,
    Avx512Vnni
);
entry!(
    dot_q8_0_q8_0,
    dot_q8_0_impl,
    BlockQ8_0,
    BlockQ8_0,
    Avx512Vnni
);
entry!(dot_q4_k_q8_k, dot_q4_k_impl, BlockQ4K, BlockQ8K, Avx512Vnni);
entry!(dot_q5_k_q8_k, dot_q5_k_impl, BlockQ5K, BlockQ8K, Avx512Vnni);
entry!(dot_q6_k_q8_k, dot_q6_k_impl, BlockQ6K, BlockQ8K, Avx512Vnni);

/// Mask of the low `n` lanes (n <= 16).
#[inline]
fn low_mask16(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

macro_rules! float_dot16 {
    ($w:expr, $a:expr, $load:expr, $load_masked:expr) => {{
        let (w, a) = ($w, $a);
        let n = w.len();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps($load(w, i + 16 * k), $load(a, i + 16 * k), *acc);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps($load(w, i), $load(a, i), acc[0]);
            i += 16;
        }
        if i < n {
            let m = low_mask16(n - i);
            acc[1] = _mm512_fmadd_ps($load_masked(w, i, m), $load_masked(a, i, m), acc[1]);
        }
        let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(v)
    }};
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn dot_f32_impl(w: &[f32], a: &[f32]) -> f32 {
    #[inline(always)]
    fn load(x: &[f32], i: usize) -> __m512 {
        debug_assert!(i + 16 <= x.len());
        // SAFETY: callers pass i + 16 <= len.
        unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) }
    }
    #[inline(always)]
    fn load_masked(x: &[f32], i: usize, m: __mmask16) -> __m512 {
        // SAFETY: the mask covers only lanes i..len; masked-off lanes are not accessed.
        unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)) }
    }
    float_dot16!(w, a, load, load_masked)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn dot_f16_impl(w: &[f16], a: &[f16]) -> f32 {
    #[inline(always)]
    fn load(x: &[f16], i: usize) -> __m512 {
        debug_assert!(i + 16 <= x.len());
        // SAFETY: callers pass i + 16 <= len.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(x.as_ptr().add(i).cast())) }
    }
    #[inline(always)]
    fn load_masked(x: &[f16], i: usize, m: __mmask16) -> __m512 {
        // SAFETY: the mask covers only lanes i..len.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x.as_ptr().add(i).cast())) }
    }
    float_dot16!(w, a, load, load_masked)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn dot_bf16_impl(w: &[bf16], a: &[bf16]) -> f32 {
    #[inline(always)]
    fn widen(h: __m256i) -> __m512 {
        // SAFETY: AVX-512F is enabled in every caller.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))) }
    }
    #[inline(always)]
    fn load(x: &[bf16], i: usize) -> __m512 {
        debug_assert!(i + 16 <= x.len());
        // SAFETY: callers pass i + 16 <= len.
        widen(unsafe { _mm256_loadu_si256(x.as_ptr().add(i).cast()) })
    }
    #[inline(always)]
    fn load_masked(x: &[bf16], i: usize, m: __mmask16) -> __m512 {
        // SAFETY: the mask covers only lanes i..len.
        widen(unsafe { _mm256_maskz_loadu_epi16(m, x.as_ptr().add(i).cast()) })
    }
    float_dot16!(w, a, load, load_masked)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn load32_i8(p: &[i8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: at least 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn load32(p: &[u8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: at least 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn load64(p: &[u8]) -> __m512i {
    assert!(p.len() >= 64);
    // SAFETY: at least 64 readable bytes.
    unsafe { _mm512_loadu_si512(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn load64_i8(p: &[i8]) -> __m512i {
    assert!(p.len() >= 64);
    // SAFETY: at least 64 readable bytes.
    unsafe { _mm512_loadu_si512(p.as_ptr().cast()) }
}

/// Two 256-bit halves as one 512-bit register (`lo` in lanes 0..8).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// `d0` in lanes 0..8, `d1` in lanes 8..16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn scales2(d0: f32, d1: f32) -> __m512 {
    _mm512_insertf32x8::<1>(_mm512_set1_ps(d0), _mm256_set1_ps(d1))
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn unpack_nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: 16 readable bytes.
    let t = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
    let m = _mm_set1_epi8(0x0f);
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(t), m),
        _mm_and_si128(t, m),
    )
}

/// Nibbles of a Q5 block with bit 4 from `qh` set as 0x10.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn unpack_q5(qs: &[u8; 16], qh: [u8; 4]) -> __m256i {
    let hb = _mm256_maskz_mov_epi8(u32::from_le_bytes(qh), _mm256_set1_epi8(0x10));
    _mm256_or_si256(unpack_nibbles(qs), hb)
}

/// Dot products of pairs of 32-element blocks. `$bytes(w)` gives a block's 32 unsigned
/// weight bytes, `$offset` is subtracted from each (0 for unsigned types), `$d(w, a)`
/// the combined scale and `$extra(w, a)` a per-block scalar term (the Q*_1 minimum).
macro_rules! pair_kernel {
    ($w:expr, $a:expr, $bytes:expr, $offset:expr, $d:expr, $extra:expr) => {{
        let (w, a) = ($w, $a);
        let zero = _mm512_setzero_si512();
        let off = _mm512_set1_epi8($offset as i8);
        let mut acc = _mm512_setzero_ps();
        let mut extra = 0.0f32;
        let mut wp = w.chunks_exact(2);
        let mut ap = a.chunks_exact(2);
        for (w2, a2) in (&mut wp).zip(&mut ap) {
            let q = join($bytes(&w2[0]), $bytes(&w2[1]));
            let y = join(load32_i8(&a2[0].qs), load32_i8(&a2[1].qs));
            let mut s = _mm512_dpbusd_epi32(zero, q, y);
            if $offset != 0 {
                s = _mm512_sub_epi32(s, _mm512_dpbusd_epi32(zero, off, y));
            }
            let d = scales2($d(&w2[0], &a2[0]), $d(&w2[1], &a2[1]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc);
            extra += $extra(&w2[0], &a2[0]) + $extra(&w2[1], &a2[1]);
        }
        let mut total = _mm512_reduce_add_ps(acc) + extra;
        if let (Some(w), Some(a)) = (wp.remainder().first(), ap.remainder().first()) {
            let z = _mm256_setzero_si256();
            let y = load32_i8(&a.qs);
            let mut s = _mm256_dpbusd_epi32(z, $bytes(w), y);
            if $offset != 0 {
                s = _mm256_sub_epi32(
                    s,
                    _mm256_dpbusd_epi32(z, _mm256_set1_epi8($offset as i8), y),
                );
            }
            total += hsum_ps(_mm256_cvtepi32_ps(s)) * $d(w, a) + $extra(w, a);
        }
        total
    }};
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_0_impl(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    pair_kernel!(
        w,
        a,
        |b: &BlockQ4_0| unpack_nibbles(&b.qs),
        8u8,
        |w: &BlockQ4_0, a: &BlockQ8_0| f16_to_f32(w.d) * f16_to_f32(a.d),
        |_: &BlockQ4_0, _: &BlockQ8_0| 0.0f32
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_1_impl(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    pair_kernel!(
        w,
        a,
        |b: &BlockQ4_1| unpack_nibbles(&b.qs),
        0u8,
        |w: &BlockQ4_1, a: &BlockQ8_1| f16_to_f32(w.d) * f16_to_f32(a.d),
        |w: &BlockQ4_1, a: &BlockQ8_1| f16_to_f32(w.m) * f16_to_f32(a.s)
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q5_0_impl(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    pair_kernel!(
        w,
        a,
        |b: &BlockQ5_0| unpack_q5(&b.qs, b.qh),
        16u8,
        |w: &BlockQ5_0, a: &BlockQ8_0| f16_to_f32(w.d) * f16_to_f32(a.d),
        |_: &BlockQ5_0, _: &BlockQ8_0| 0.0f32
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q5_1_impl(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    pair_kernel!(
        w,
        a,
        |b: &BlockQ5_1| unpack_q5(&b.qs, b.qh),
        0u8,
        |w: &BlockQ5_1, a: &BlockQ8_1| f16_to_f32(w.d) * f16_to_f32(a.d),
        |w: &BlockQ5_1, a: &BlockQ8_1| f16_to_f32(w.m) * f16_to_f32(a.s)
    )
}

// Signed weights become unsigned by flipping the sign bit (x + 128); the offset 128 is
// removed through the activation sums, which is exact for every byte value including -128.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q8_0_impl(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    pair_kernel!(
        w,
        a,
        |b: &BlockQ8_0| _mm256_xor_si256(load32_i8(&b.qs), _mm256_set1_epi8(-128)),
        128u8,
        |w: &BlockQ8_0, a: &BlockQ8_0| f16_to_f32(w.d) * f16_to_f32(a.d),
        |_: &BlockQ8_0, _: &BlockQ8_0| 0.0f32
    )
}

/// Σ over the 8 sub-blocks of `min[j] * (bsums[2j] + bsums[2j+1])`.
#[inline]
fn k_min_sum(mins: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    (0..8)
        .map(|j| i32::from(mins[j]) * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1])))
        .sum()
}

/// i16 lanes 0..16 = `s0`, 16..32 = `s1`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn scale_pair_i16(s0: u8, s1: u8) -> __m512i {
    join(
        _mm256_set1_epi16(i16::from(s0)),
        _mm256_set1_epi16(i16::from(s1)),
    )
}

// Q4_K: 64 elements per step (two sub-blocks); u8 × i8 pairs <= 3810 in i16, then the
// 6-bit scales are applied with `vpdpwssd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_k_impl(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = 0.0f32;
    let m4 = _mm512_set1_epi8(0x0f);
    for (w, a) in w.iter().zip(a) {
        let (sc, mn) = kquant_scales(&w.scales);
        acc_m += a.d * f16_to_f32(w.dmin) * k_min_sum(&mn, &a.bsums) as f32;
        let mut sumi = _mm512_setzero_si512();
        for c in 0..4 {
            let q = load32(&w.qs[32 * c..]);
            let q = _mm512_and_si512(join(q, _mm256_srli_epi16::<4>(q)), m4);
            let p = _mm512_maddubs_epi16(q, load64_i8(&a.qs[64 * c..]));
            sumi = _mm512_dpwssd_epi32(sumi, p, scale_pair_i16(sc[2 * c], sc[2 * c + 1]));
        }
        let d = _mm512_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc) - acc_m
}

// Q5_K: as Q4_K with bit 4 from `qh` (levels <= 31: pairs <= 7874).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q5_k_impl(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = 0.0f32;
    let m4 = _mm512_set1_epi8(0x0f);
    let high = _mm512_set1_epi8(0x10);
    for (w, a) in w.iter().zip(a) {
        let (sc, mn) = kquant_scales(&w.scales);
        acc_m += a.d * f16_to_f32(w.dmin) * k_min_sum(&mn, &a.bsums) as f32;
        let qh = load32(&w.qh);
        let mut sumi = _mm512_setzero_si512();
        for c in 0..4 {
            let q = load32(&w.qs[32 * c..]);
            let q = _mm512_and_si512(join(q, _mm256_srli_epi16::<4>(q)), m4);
            let lo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << (2 * c)) as i8));
            let hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8));
            let mask = u64::from(lo) | (u64::from(hi) << 32);
            let q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(mask, high));
            let p = _mm512_maddubs_epi16(q, load64_i8(&a.qs[64 * c..]));
            sumi = _mm512_dpwssd_epi32(sumi, p, scale_pair_i16(sc[2 * c], sc[2 * c + 1]));
        }
        let d = _mm512_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc) - acc_m
}

// Q6_K: 64 elements per step; unsigned levels <= 63 (pairs <= 16002), signed 8-bit
// scales per 16 elements applied with `vpdpwssd`, the -32 offset through `bsums`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q6_k_impl(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let m4 = _mm512_set1_epi8(0x0f);
    let m2 = _mm512_set1_epi8(3);
    // Lane i of the i16 scale vector takes scale i / 8 (+ 4 for the second 64 elements).
    let idx_lo = _mm512_set_epi16(
        3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0,
        0, 0,
    );
    let idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(4));
    let eight = _mm512_set1_epi16(8);
    for (w, a) in w.iter().zip(a) {
        // SAFETY: the 16 scale bytes are readable.
        let sc8 = unsafe { _mm_loadu_si128(w.scales.as_ptr().cast()) };
        let sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8));
        let mut sumi = _mm512_setzero_si512();
        for half in 0..2 {
            let l = load64(&w.ql[64 * half..]);
            let qh = load32(&w.qh[32 * half..]);
            let h = join(qh, _mm256_srli_epi16::<2>(qh));
            let q12 = _mm512_or_si512(
                _mm512_and_si512(l, m4),
                _mm512_slli_epi16::<4>(_mm512_and_si512(h, m2)),
            );
            let q34 = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(l), m4),
                _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(h), m2)),
            );
            let base = _mm512_mullo_epi16(_mm512_set1_epi16(half as i16), eight);
            let s12 = _mm512_permutexvar_epi16(_mm512_add_epi16(idx_lo, base), sc16);
            let s34 = _mm512_permutexvar_epi16(_mm512_add_epi16(idx_hi, base), sc16);
            let p12 = _mm512_maddubs_epi16(q12, load64_i8(&a.qs[128 * half..]));
            let p34 = _mm512_maddubs_epi16(q34, load64_i8(&a.qs[128 * half + 64..]));
            sumi = _mm512_dpwssd_epi32(sumi, p12, s12);
            sumi = _mm512_dpwssd_epi32(sumi, p34, s34);
        }
        // SAFETY: the 16 i16 block sums are readable.
        let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
        let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, _mm256_cvtepi8_epi16(sc8)));
        sumi = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(offset));
        let d = _mm512_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc)
}
