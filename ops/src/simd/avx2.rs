//! AVX2 + FMA + F16C dot-product kernels. Each is the fast twin of a `dot_scalar` in
//! `crate::quant` and is tested against it.
//!
//! Integer kernels multiply unsigned weight bytes by signed activation bytes with
//! `vpmaddubsw` (no saturation is possible: |products| stay below 2^15 for every type
//! here, see each kernel) and sum pairs to i32 with `vpmaddwd`.

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::quant::prep::{LEVEL2_SHIFT_I32, NIB_GROUP, NibBlock, PrepNib, PrepQ8, Q8_GROUP};
use crate::quant::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K, kquant_scales};

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

mod lowbit;
pub use lowbit::{dot_iq4_nl, dot_iq4_xs_q8_k, dot_q2_k_q8_k, dot_q3_k_q8_k};

entry!(dot_f32, dot_f32_impl, f32, f32);
entry!(dot_f16, dot_f16_impl, f16, f16);
entry!(dot_bf16, dot_bf16_impl, bf16, bf16);
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

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load128(p: &[u8; 16]) -> __m128i {
    // SAFETY: 16 readable bytes.
    unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
}

/// One group of four nibble blocks against its prepared activation, as two halves of two
/// blocks. Levels are at most 31, so u8 × i8 pairs stay below 2^15 (7874).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nib_group<W: NibBlock, const N: usize>(
    w: &[W; N],
    p: &PrepNib,
    acc: &mut __m256,
    accm: &mut __m256,
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    // A group holds N <= 4 blocks; missing ones read as zero (scale 0, no contribution).
    let nib = |i: usize| {
        if i < N {
            load128(w[i].nibbles())
        } else {
            _mm_setzero_si128()
        }
    };
    let dm_bits = |i: usize| if i < N { w[i].dm_bits() as i32 } else { 0 };
    let high_bits = |i: usize| if i < N { w[i].high_bits() } else { 0 };
    // [d0, m0, d1, m1, d2, m2, d3, m3] as f32.
    let dm = _mm256_cvtph_ps(_mm_setr_epi32(
        dm_bits(0),
        dm_bits(1),
        dm_bits(2),
        dm_bits(3),
    ));
    for h in 0..2 {
        if 2 * h >= N {
            break;
        }
        let q = _mm256_set_m128i(nib(2 * h + 1), nib(2 * h));
        let mut lo = _mm256_and_si256(q, m4);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
        if W::HAS_QH {
            let (h0, h1) = (high_bits(2 * h), high_bits(2 * h + 1));
            let bit4 = _mm256_set1_epi8(0x10);
            let mask_lo = (h0 & 0xffff) | (h1 << 16);
            let mask_hi = (h0 >> 16) | (h1 & 0xffff_0000);
            lo = _mm256_or_si256(
                lo,
                _mm256_and_si256(bytes_from_bits(mask_lo.to_le_bytes()), bit4),
            );
            hi = _mm256_or_si256(
                hi,
                _mm256_and_si256(bytes_from_bits(mask_hi.to_le_bytes()), bit4),
            );
        }
        // SAFETY: offsets 32h..32h+32 of 64-byte arrays and 8h..8h+8 of 16-lane arrays.
        let (alo, ahi, alo2, ahi2, ad, lane_sum) = unsafe {
            (
                _mm256_loadu_si256(p.lo.as_ptr().add(32 * h).cast()),
                _mm256_loadu_si256(p.hi.as_ptr().add(32 * h).cast()),
                _mm256_loadu_si256(p.lo2.as_ptr().add(32 * h).cast()),
                _mm256_loadu_si256(p.hi2.as_ptr().add(32 * h).cast()),
                _mm256_loadu_ps(p.d.as_ptr().add(8 * h)),
                _mm256_loadu_si256(p.lane_sum.as_ptr().add(8 * h).cast()),
            )
        };
        let dot = |a_lo, a_hi| {
            _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), ones),
            )
        };
        let mut isum = _mm256_add_epi32(
            _mm256_slli_epi32::<LEVEL2_SHIFT_I32>(dot(alo, ahi)),
            dot(alo2, ahi2),
        );
        if W::OFFSET != 0 {
            isum = _mm256_sub_epi32(
                isum,
                _mm256_mullo_epi32(lane_sum, _mm256_set1_epi32(W::OFFSET)),
            );
        }
        let base = 4 * h as i32;
        let idx = _mm256_setr_epi32(
            base,
            base,
            base,
            base,
            base + 2,
            base + 2,
            base + 2,
            base + 2,
        );
        let scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(dm, idx), ad);
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
    }
    if W::HAS_MIN {
        // SAFETY: 8 floats.
        let s = unsafe { _mm256_loadu_ps(p.s.as_ptr()) };
        *accm = _mm256_fmadd_ps(dm, s, *accm);
    }
}

/// Nibble weights (Q4_0, Q4_1, Q5_0, Q5_1) · prepared activations.
pub fn dot_nib<W: NibBlock>(w: &[W], a: &[PrepNib]) -> f32 {
    assert_eq!(a.len(), w.len().div_ceil(NIB_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx2.is_supported());
    // SAFETY: handed out only by `simd::dispatch!`, which checks the CPU level.
    unsafe { dot_nib_impl(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_nib_impl<W: NibBlock>(w: &[W], a: &[PrepNib]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    let groups = w.chunks_exact(NIB_GROUP);
    let tail = groups.remainder();
    for (g, p) in groups.zip(a) {
        nib_group::<W, 4>(g.try_into().expect("chunk of 4"), p, &mut acc, &mut accm);
    }
    let last = &a[a.len().saturating_sub(1)];
    match tail {
        [] => {}
        [b0] => nib_group(&[*b0], last, &mut acc, &mut accm),
        [b0, b1] => nib_group(&[*b0, *b1], last, &mut acc, &mut accm),
        [b0, b1, b2] => nib_group(&[*b0, *b1, *b2], last, &mut acc, &mut accm),
        _ => unreachable!("a remainder of chunks of 4 is shorter than 4"),
    }
    hsum_ps(_mm256_add_ps(acc, accm))
}

/// Q8_0 weights · prepared activations. |x| <= 128 (a stored -128) times |y| <= 127:
/// pairs <= 32512, no saturation in `vpmaddubsw`.
pub fn dot_q8(w: &[BlockQ8_0], a: &[PrepQ8]) -> f32 {
    assert_eq!(a.len(), w.len().div_ceil(Q8_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx2.is_supported());
    // SAFETY: handed out only by `simd::dispatch!`, which checks the CPU level.
    unsafe { dot_q8_impl(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_impl(w: &[BlockQ8_0], a: &[PrepQ8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
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
        let x = load32_i8(&wb.qs);
        let isum = _mm256_add_epi32(
            _mm256_slli_epi32::<LEVEL2_SHIFT_I32>(dot_ss8(x, y)),
            dot_ss8(x, y2),
        );
        let scale = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(wb.d)), ad);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc);
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
