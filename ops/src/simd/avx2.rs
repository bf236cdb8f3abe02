//! AVX2 + FMA + F16C dot-product kernels. Each is the fast twin of a `dot_scalar` in
//! `crate::quant` and is tested against it.
//!
//! Integer kernels multiply unsigned weight bytes by signed activation bytes with
//! `vpmaddubsw` (no saturation is possible: |products| stay below 2^15 for every type
//! here, see each kernel) and sum pairs to i32 with `vpmaddwd`.

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::quant::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, kquant_scales,
};

/// Declares the safe entry point of a kernel.
macro_rules! entry {
    ($name:ident, $imp:ident, $w:ty, $a:ty) => {
        pub fn $name(w: &[$w], a: &[$a]) -> f32 {
            assert_eq!(w.len(), a.len());
            debug_assert!(crate::simd::SimdLevel::Avx2.is_supported());
            // SAFETY: the kernels of this module are handed out only by
            // `simd::dispatch!`, which caps the level at what the CPU supports.
            unsafe { $imp(w, a) }
        }
    };
}

entry!(dot_f32, dot_f32_impl, f32, f32);
entry!(dot_f16, dot_f16_impl, f16, f16);
entry!(dot_bf16, dot_bf16_impl, bf16, bf16);
entry!(dot_q4_0_q8_0, dot_q4_0_impl, BlockQ4_0, BlockQ8_0);
entry!(dot_q4_1_q8_1, dot_q4_1_impl, BlockQ4_1, BlockQ8_1);
entry!(dot_q5_0_q8_0, dot_q5_0_impl, BlockQ5_0, BlockQ8_0);
entry!(dot_q5_1_q8_1, dot_q5_1_impl, BlockQ5_1, BlockQ8_1);
entry!(dot_q8_0_q8_0, dot_q8_0_impl, BlockQ8_0, BlockQ8_0);
entry!(dot_q4_k_q8_k, dot_q4_k_impl, BlockQ4K, BlockQ8K);
entry!(dot_q5_k_q8_k, dot_q5_k_impl, BlockQ5K, BlockQ8K);
entry!(dot_q6_k_q8_k, dot_q6_k_impl, BlockQ6K, BlockQ8K);

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn f16_to_f32(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load32(p: &[u8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: at least 32 readable bytes (checked above); unaligned load.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load32_i8(p: &[i8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: as `load32`.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: 16 readable bytes.
    let t = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
    let m = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(t, m);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(t), m);
    _mm256_set_m128i(hi, lo)
}

/// Byte `j` is 0xff where bit `j` of `bits` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bytes_from_bits(bits: [u8; 4]) -> __m256i {
    let x = i32::from_le_bytes(bits);
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let v = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit)
}

/// Σ of unsigned × signed byte products, in 8 i32 lanes of 4 bytes each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_us8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Σ of signed × signed byte products (|x| × sign(y, x)), in 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_ss8(x: __m256i, y: __m256i) -> __m256i {
    dot_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// Float dot product over 8-wide loads produced by `$load(index)`.
macro_rules! float_dot {
    ($w:expr, $a:expr, $load:expr, $scalar:expr) => {{
        let (w, a) = ($w, $a);
        let n = w.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps($load(w, i + 8 * k), $load(a, i + 8 * k), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps($load(w, i), $load(a, i), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum_ps(v);
        for j in i..n {
            s += $scalar(w[j]) * $scalar(a[j]);
        }
        s
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32_impl(w: &[f32], a: &[f32]) -> f32 {
    #[inline(always)]
    fn load(x: &[f32], i: usize) -> __m256 {
        debug_assert!(i + 8 <= x.len());
        // SAFETY: callers pass i + 8 <= len.
        unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) }
    }
    float_dot!(w, a, load, |v: f32| v)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_impl(w: &[f16], a: &[f16]) -> f32 {
    #[inline(always)]
    fn load(x: &[f16], i: usize) -> __m256 {
        debug_assert!(i + 8 <= x.len());
        // SAFETY: callers pass i + 8 <= len; F16C is enabled in every caller.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i).cast())) }
    }
    float_dot!(w, a, load, |v: f16| v.to_f32())
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16_impl(w: &[bf16], a: &[bf16]) -> f32 {
    #[inline(always)]
    fn load(x: &[bf16], i: usize) -> __m256 {
        debug_assert!(i + 8 <= x.len());
        // SAFETY: callers pass i + 8 <= len; AVX2 is enabled in every caller.
        unsafe {
            let h = _mm_loadu_si128(x.as_ptr().add(i).cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    float_dot!(w, a, load, |v: bf16| v.to_f32())
}

// Q4_0: |(q - 8)| <= 8 times |y| <= 127, two per i16: 2032, no saturation.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_impl(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (w, a) in w.iter().zip(a) {
        let d = _mm256_set1_ps(f16_to_f32(w.d) * f16_to_f32(a.d));
        let qx = _mm256_sub_epi8(unpack_nibbles(&w.qs), _mm256_set1_epi8(8));
        let p = _mm256_cvtepi32_ps(dot_ss8(qx, load32_i8(&a.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc)
}

// Q4_1: q <= 15, |y| <= 127: pairs <= 3810.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_impl(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for (w, a) in w.iter().zip(a) {
        summs += f16_to_f32(w.m) * f16_to_f32(a.s);
        let d = _mm256_set1_ps(f16_to_f32(w.d) * f16_to_f32(a.d));
        let p = _mm256_cvtepi32_ps(dot_us8(unpack_nibbles(&w.qs), load32_i8(&a.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc) + summs
}

// Q5_0: |q - 16| <= 16: pairs <= 4064.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0_impl(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let high = _mm256_set1_epi8(0x10);
    for (w, a) in w.iter().zip(a) {
        let d = _mm256_set1_ps(f16_to_f32(w.d) * f16_to_f32(a.d));
        let hb = _mm256_and_si256(bytes_from_bits(w.qh), high);
        let qx = _mm256_sub_epi8(_mm256_or_si256(unpack_nibbles(&w.qs), hb), high);
        let p = _mm256_cvtepi32_ps(dot_ss8(qx, load32_i8(&a.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc)
}

// Q5_1: q <= 31: pairs <= 7874.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_1_impl(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    let high = _mm256_set1_epi8(0x10);
    for (w, a) in w.iter().zip(a) {
        summs += f16_to_f32(w.m) * f16_to_f32(a.s);
        let d = _mm256_set1_ps(f16_to_f32(w.d) * f16_to_f32(a.d));
        let hb = _mm256_and_si256(bytes_from_bits(w.qh), high);
        let qx = _mm256_or_si256(unpack_nibbles(&w.qs), hb);
        let p = _mm256_cvtepi32_ps(dot_us8(qx, load32_i8(&a.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc) + summs
}

// Q8_0: |x| <= 127 (128 for a stored -128) times |y| <= 127: pairs <= 32512.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_impl(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (w, a) in w.iter().zip(a) {
        let d = _mm256_set1_ps(f16_to_f32(w.d) * f16_to_f32(a.d));
        let p = _mm256_cvtepi32_ps(dot_ss8(load32_i8(&w.qs), load32_i8(&a.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc)
}

/// Σ over the 8 sub-blocks of `min[j] * (bsums[2j] + bsums[2j+1])`.
#[inline]
fn k_min_sum(mins: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    (0..8)
        .map(|j| i32::from(mins[j]) * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1])))
        .sum()
}

// Q4_K: nibbles <= 15: pairs <= 3810; times a 6-bit scale in i32.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k_impl(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0.0f32;
    let m4 = _mm256_set1_epi8(0x0f);
    for (w, a) in w.iter().zip(a) {
        let (sc, mn) = kquant_scales(&w.scales);
        acc_m += a.d * f16_to_f32(w.dmin) * k_min_sum(&mn, &a.bsums) as f32;
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q = load32(&w.qs[32 * c..]);
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
            let p_lo = _mm256_maddubs_epi16(lo, load32_i8(&a.qs[64 * c..]));
            let p_hi = _mm256_maddubs_epi16(hi, load32_i8(&a.qs[64 * c + 32..]));
            let p_lo = _mm256_madd_epi16(p_lo, _mm256_set1_epi16(i16::from(sc[2 * c])));
            let p_hi = _mm256_madd_epi16(p_hi, _mm256_set1_epi16(i16::from(sc[2 * c + 1])));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
        }
        let d = _mm256_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - acc_m
}

// Q5_K: levels <= 31: pairs <= 7874.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_k_impl(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0.0f32;
    let m4 = _mm256_set1_epi8(0x0f);
    let high = _mm256_set1_epi8(0x10);
    for (w, a) in w.iter().zip(a) {
        let (sc, mn) = kquant_scales(&w.scales);
        acc_m += a.d * f16_to_f32(w.dmin) * k_min_sum(&mn, &a.bsums) as f32;
        let qh = load32(&w.qh);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q = load32(&w.qs[32 * c..]);
            let bit_lo = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
            let bit_hi = _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8);
            let h_lo = _mm256_and_si256(
                _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_lo), bit_lo),
                high,
            );
            let h_hi = _mm256_and_si256(
                _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_hi), bit_hi),
                high,
            );
            let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h_lo);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), h_hi);
            let p_lo = _mm256_maddubs_epi16(lo, load32_i8(&a.qs[64 * c..]));
            let p_hi = _mm256_maddubs_epi16(hi, load32_i8(&a.qs[64 * c + 32..]));
            let p_lo = _mm256_madd_epi16(p_lo, _mm256_set1_epi16(i16::from(sc[2 * c])));
            let p_hi = _mm256_madd_epi16(p_hi, _mm256_set1_epi16(i16::from(sc[2 * c + 1])));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
        }
        let d = _mm256_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - acc_m
}

// Q6_K: unsigned levels <= 63: pairs <= 16002; the -32 offset is applied through the
// activation block sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k_impl(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(3);
    for (w, a) in w.iter().zip(a) {
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let ql0 = load32(&w.ql[64 * half..]);
            let ql1 = load32(&w.ql[64 * half + 32..]);
            let qh = load32(&w.qh[32 * half..]);
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2)),
                ),
            ];
            for (k, q) in q.into_iter().enumerate() {
                let e = 128 * half + 32 * k;
                let p = _mm256_maddubs_epi16(q, load32_i8(&a.qs[e..]));
                let s = e / 16;
                let scales = _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(w.scales[s + 1])),
                    _mm_set1_epi16(i16::from(w.scales[s])),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
            }
        }
        let offset: i32 = (0..16)
            .map(|k| i32::from(w.scales[k]) * i32::from(a.bsums[k]))
            .sum();
        sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * offset, 0, 0, 0, 0, 0, 0, 0));
        let d = _mm256_set1_ps(a.d * f16_to_f32(w.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}
