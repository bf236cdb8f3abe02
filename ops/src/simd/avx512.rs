//! AVX-512 kernels: 512-bit float dot products (F/BW/VL/DQ) and VNNI integer dot products
//! (`vpdpbusd` for u8 × i8, `vpdpwssd` for the i16 × scale step of the k-quants). Each is
//! the fast twin of a `dot_scalar` in `crate::quant` and is tested against it.
//!
//! The 32-element block types read prepared activations (`crate::quant::prep`): four
//! nibble blocks or two Q8_0 blocks per 512-bit `vpdpbusd` for each of the two activation
//! levels, scales in f32, and offsets removed through precomputed lane sums, so every
//! integer sum is exact.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::avx2::f16_to_f32;
use crate::quant::prep::{LEVEL2_SHIFT, NIB_GROUP, NibBlock, PrepNib, PrepQ8, Q8_GROUP};
use crate::quant::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K, kquant_scales};

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

mod lowbit;
pub use lowbit::{dot_iq4_nl, dot_iq4_xs_q8_k, dot_q2_k_q8_k, dot_q3_k_q8_k};

entry!(dot_f32, dot_f32_impl, f32, f32, Avx512);
entry!(dot_f16, dot_f16_impl, f16, f16, Avx512);
entry!(dot_bf16, dot_bf16_impl, bf16, bf16, Avx512);
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

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn load128(p: &[u8; 16]) -> __m128i {
    // SAFETY: 16 readable bytes.
    unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
}

/// One group of four nibble blocks against its prepared activation: accumulates the
/// scaled integer sums into `acc` and the minimum terms into `accm`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn nib_group<W: NibBlock, const N: usize>(
    w: &[W; N],
    p: &PrepNib,
    acc: &mut __m512,
    accm: &mut __m256,
) {
    let m4 = _mm512_set1_epi8(0x0f);
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
    // [b0 | b1 | b2 | b3] nibbles: low nibbles are values 0..16, high nibbles 16..32.
    let mut q = _mm512_castsi128_si512(nib(0));
    q = _mm512_inserti32x4::<1>(q, nib(1));
    q = _mm512_inserti32x4::<2>(q, nib(2));
    q = _mm512_inserti32x4::<3>(q, nib(3));
    let mut lo = _mm512_and_si512(q, m4);
    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
    if W::HAS_QH {
        let qh = [high_bits(0), high_bits(1), high_bits(2), high_bits(3)];
        let mask_lo = (0..4).fold(0u64, |m, b| m | (u64::from(qh[b] & 0xffff) << (16 * b)));
        let mask_hi = (0..4).fold(0u64, |m, b| m | (u64::from(qh[b] >> 16) << (16 * b)));
        let bit4 = _mm512_set1_epi8(0x10);
        lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(mask_lo, bit4));
        hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(mask_hi, bit4));
    }
    // SAFETY: PrepNib is 64-byte aligned and its fields are 64-byte arrays / 16 lanes.
    let (alo, ahi, alo2, ahi2, ad, lane_sum) = unsafe {
        (
            _mm512_load_si512(p.lo.as_ptr().cast()),
            _mm512_load_si512(p.hi.as_ptr().cast()),
            _mm512_load_si512(p.lo2.as_ptr().cast()),
            _mm512_load_si512(p.hi2.as_ptr().cast()),
            _mm512_load_ps(p.d.as_ptr()),
            _mm512_load_si512(p.lane_sum.as_ptr().cast()),
        )
    };
    let zero = _mm512_setzero_si512();
    let isum1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, alo), hi, ahi);
    // 256·Σw·q1 + Σw·q2 (below 2^24 per lane: 8 values of at most 31·127·257).
    let isum = _mm512_slli_epi32::<LEVEL2_SHIFT>(isum1);
    let mut isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(isum, lo, alo2), hi, ahi2);
    if W::OFFSET != 0 {
        let off = _mm512_mullo_epi32(lane_sum, _mm512_set1_epi32(W::OFFSET));
        isum = _mm512_sub_epi32(isum, off);
    }
    // [d0, m0, d1, m1, d2, m2, d3, m3] as f32.
    let dm = _mm256_cvtph_ps(_mm_setr_epi32(
        dm_bits(0),
        dm_bits(1),
        dm_bits(2),
        dm_bits(3),
    ));
    let idx = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    let scale = _mm512_mul_ps(_mm512_permutexvar_ps(idx, _mm512_zextps256_ps512(dm)), ad);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
    if W::HAS_MIN {
        // SAFETY: `s` is 8 floats at a 32-byte aligned offset of the 64-byte aligned struct.
        let s = unsafe { _mm256_load_ps(p.s.as_ptr()) };
        *accm = _mm256_fmadd_ps(dm, s, *accm);
    }
}

/// Sums of four 8-lane vectors: `[Σt0, Σt1, Σt2, Σt3]`. Each row's lanes are added in
/// the same order whatever the other three hold, so a row's result does not depend on
/// which rows share its tile.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn reduce4(t: [__m256; 4]) -> __m128 {
    let h = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

/// 16 lanes folded to 8, plus `extra`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn fold(acc: __m512, extra: __m256) -> __m256 {
    let lo = _mm512_castps512_ps256(acc);
    let hi = _mm512_extractf32x8_ps::<1>(acc);
    _mm256_add_ps(_mm256_add_ps(lo, hi), extra)
}

/// The first `n` (1..=4) of four rows of nibble weights against one prepared activation
/// row. Each row is summed on its own, so its bits do not depend on `n` or on the others.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn nib_tile<W: NibBlock>(rows: [&[W]; 4], n: usize, a: &[PrepNib]) -> [f32; 4] {
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut accm = [_mm256_setzero_ps(); 4];
    let full = rows[0].len() / NIB_GROUP;
    // Row by row: each row is one sequential stream, which DRAM prefetching follows best.
    for r in 0..4 {
        if r < n {
            for (g, p) in a.iter().enumerate().take(full) {
                let blocks = rows[r][NIB_GROUP * g..NIB_GROUP * g + NIB_GROUP]
                    .try_into()
                    .expect("a group of 4");
                nib_group::<W, 4>(blocks, p, &mut acc[r], &mut accm[r]);
            }
        }
    }
    if let Some(last) = a.get(full) {
        for r in 0..n {
            match &rows[r][NIB_GROUP * full..] {
                [] => {}
                [b0] => nib_group(&[*b0], last, &mut acc[r], &mut accm[r]),
                [b0, b1] => nib_group(&[*b0, *b1], last, &mut acc[r], &mut accm[r]),
                [b0, b1, b2] => nib_group(&[*b0, *b1, *b2], last, &mut acc[r], &mut accm[r]),
                _ => unreachable!("a remainder of groups of 4 is shorter than 4"),
            }
        }
    }
    let sums = reduce4(std::array::from_fn(|r| fold(acc[r], accm[r])));
    let mut out = [0f32; 4];
    // SAFETY: four floats into a four-float array.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    out
}

/// Calls `tile(rows, n)` on rows four at a time: rows `0..out.len()` of `w` (rows of
/// `bpr` blocks), or its rows `idx` when given; a partial last tile has `n` < 4 real rows
/// (its last row repeated in the other places, for valid slices). One function serves both
/// so that each kernel's tile has a single call site, which the compiler inlines.
#[inline(always)]
fn by_tiles<W>(
    w: &[W],
    bpr: usize,
    idx: Option<&[u32]>,
    out: &mut [f32],
    mut tile: impl FnMut([&[W]; 4], usize) -> [f32; 4],
) {
    if let Some(idx) = idx {
        assert_eq!(idx.len(), out.len());
    }
    for (t, o) in out.chunks_mut(4).enumerate() {
        let row = |r: usize| {
            let k = 4 * t + r.min(o.len() - 1);
            let r = idx.map_or(k, |idx| idx[k] as usize);
            &w[r * bpr..(r + 1) * bpr]
        };
        // Scattered rows: ask for the next tile's rows (consecutive rows stream anyway).
        if let Some(next) = idx.and_then(|idx| idx.get(4 * t + 4..)) {
            for &r in next.iter().take(4) {
                crate::simd::prefetch(&w[r as usize * bpr..(r as usize + 1) * bpr]);
            }
        }
        let sums = tile([row(0), row(1), row(2), row(3)], o.len());
        o.copy_from_slice(&sums[..o.len()]);
    }
}

/// Rows of nibble weights (Q4_0, Q4_1, Q5_0, Q5_1) · one prepared activation row:
/// `out[r] = w[r] · a`, `w` being `out.len()` whole rows.
pub fn rows_nib<W: NibBlock>(w: &[W], a: &[PrepNib], out: &mut [f32]) {
    assert!(!out.is_empty() && w.len().is_multiple_of(out.len()));
    let bpr = w.len() / out.len();
    assert_eq!(a.len(), bpr.div_ceil(NIB_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx512Vnni.is_supported());
    // SAFETY: handed out only by `simd::dispatch!`, which checks the CPU level.
    unsafe { rows_nib_impl(w, bpr, None, a, out) }
}

/// [`rows_nib`] on the scattered rows `idx` of `w` (rows of `bpr` blocks).
pub fn rows_nib_at<W: NibBlock>(w: &[W], bpr: usize, idx: &[u32], a: &[PrepNib], out: &mut [f32]) {
    assert_eq!(a.len(), bpr.div_ceil(NIB_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx512Vnni.is_supported());
    // SAFETY: as above.
    unsafe { rows_nib_impl(w, bpr, Some(idx), a, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_nib_impl<W: NibBlock>(
    w: &[W],
    bpr: usize,
    idx: Option<&[u32]>,
    a: &[PrepNib],
    out: &mut [f32],
) {
    by_tiles(w, bpr, idx, out, |rows, n| nib_tile(rows, n, a));
}

/// One row (the same arithmetic as a row of [`rows_nib`]).
pub fn dot_nib<W: NibBlock>(w: &[W], a: &[PrepNib]) -> f32 {
    let mut out = [0f32];
    rows_nib(w, a, &mut out);
    out[0]
}

/// Two Q8_0 blocks against their prepared activation.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn q8_pair(w: &[BlockQ8_0; 2], p: &PrepQ8, acc: &mut __m512) {
    // SAFETY: 32 readable bytes per block.
    let q = unsafe {
        join(
            _mm256_loadu_si256(w[0].qs.as_ptr().cast()),
            _mm256_loadu_si256(w[1].qs.as_ptr().cast()),
        )
    };
    let d_bits = i32::from(w[0].d.to_bits()) | (i32::from(w[1].d.to_bits()) << 16);
    q8_pair_levels(q, d_bits, p, acc);
}

/// Two blocks of signed 8-bit levels `q` (32 each) with f16 scales `d_bits` (`d0 | d1 <<
/// 16`) against their prepared activation. Levels are made unsigned by flipping the sign
/// bit (x + 128); `neg_corr` removes the offset exactly, -128 included.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn q8_pair_levels(q: __m512i, d_bits: i32, p: &PrepQ8, acc: &mut __m512) {
    // SAFETY: PrepQ8 is 64-byte aligned.
    let (aq, aq2, ad, corr) = unsafe {
        (
            _mm512_load_si512(p.qs.as_ptr().cast()),
            _mm512_load_si512(p.qs2.as_ptr().cast()),
            _mm512_load_ps(p.d.as_ptr()),
            _mm512_load_si512(p.neg_corr.as_ptr().cast()),
        )
    };
    let x = _mm512_xor_si512(q, _mm512_set1_epi8(-128));
    let isum1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, aq);
    // 256·Σ(w+128)·q1 + Σ(w+128)·q2 - 128·(256·Σq1 + Σq2): below 2^26 per lane.
    let isum = _mm512_add_epi32(_mm512_slli_epi32::<LEVEL2_SHIFT>(isum1), corr);
    let isum = _mm512_dpbusd_epi32(isum, x, aq2);
    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(d_bits));
    let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let scale = _mm512_mul_ps(_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(d)), ad);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
}

/// The first `n` (1..=4) of four rows of Q8_0 weights against one prepared activation
/// row, each summed on its own (as [`nib_tile`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
fn q8_tile(rows: [&[BlockQ8_0]; 4], n: usize, a: &[PrepQ8]) -> [f32; 4] {
    let mut acc = [_mm512_setzero_ps(); 4];
    let full = rows[0].len() / Q8_GROUP;
    for r in 0..4 {
        if r < n {
            for (g, p) in a.iter().enumerate().take(full) {
                let pair = rows[r][Q8_GROUP * g..Q8_GROUP * g + Q8_GROUP]
                    .try_into()
                    .expect("a pair");
                q8_pair(pair, p, &mut acc[r]);
            }
        }
    }
    if let Some(last) = a.get(full) {
        for r in 0..n {
            if let [b] = &rows[r][Q8_GROUP * full..] {
                q8_pair(&[*b, BlockQ8_0::default()], last, &mut acc[r]);
            }
        }
    }
    let zero = _mm256_setzero_ps();
    let sums = reduce4(std::array::from_fn(|r| fold(acc[r], zero)));
    let mut out = [0f32; 4];
    // SAFETY: four floats into a four-float array.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    out
}

/// Rows of Q8_0 weights · one prepared activation row.
pub fn rows_q8(w: &[BlockQ8_0], a: &[PrepQ8], out: &mut [f32]) {
    assert!(!out.is_empty() && w.len().is_multiple_of(out.len()));
    let bpr = w.len() / out.len();
    assert_eq!(a.len(), bpr.div_ceil(Q8_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx512Vnni.is_supported());
    // SAFETY: handed out only by `simd::dispatch!`, which checks the CPU level.
    unsafe { rows_q8_impl(w, bpr, None, a, out) }
}

/// [`rows_q8`] on the scattered rows `idx` of `w` (rows of `bpr` blocks).
pub fn rows_q8_at(w: &[BlockQ8_0], bpr: usize, idx: &[u32], a: &[PrepQ8], out: &mut [f32]) {
    assert_eq!(a.len(), bpr.div_ceil(Q8_GROUP));
    debug_assert!(crate::simd::SimdLevel::Avx512Vnni.is_supported());
    // SAFETY: as above.
    unsafe { rows_q8_impl(w, bpr, Some(idx), a, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_q8_impl(
    w: &[BlockQ8_0],
    bpr: usize,
    idx: Option<&[u32]>,
    a: &[PrepQ8],
    out: &mut [f32],
) {
    by_tiles(w, bpr, idx, out, |rows, n| q8_tile(rows, n, a));
}

/// One row of Q8_0 weights (the same arithmetic as a row of [`rows_q8`]).
pub fn dot_q8(w: &[BlockQ8_0], a: &[PrepQ8]) -> f32 {
    let mut out = [0f32];
    rows_q8(w, a, &mut out);
    out[0]
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

/// The two activation levels of one 32-value block (`crate::quant::prep`), with the same
/// operations in the same order as the scalar twin: `q1 = round(x·id)` clamped to ±127,
/// `q2 = round((x - q1·d)·id·256)` clamped, the value sum in the twin's tree order.
/// `groups[m]` gets `LEVEL2·Σq1 + Σq2` over values `4m..4m+4`. Returns `(d, sum)`, or
/// `None` when the block holds a NaN or an infinity or its scale overflows: those take
/// the scalar path.
pub fn two_levels(
    x: &[f32; 32],
    q1: &mut [i8; 32],
    q2: &mut [i8; 32],
    groups: &mut [i32; 8],
) -> Option<(f32, f32)> {
    debug_assert!(crate::simd::SimdLevel::Avx512.is_supported());
    // SAFETY: called only where `detected()` reports AVX-512.
    unsafe { two_levels_impl(x, q1, q2, groups) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn two_levels_impl(
    x: &[f32; 32],
    q1: &mut [i8; 32],
    q2: &mut [i8; 32],
    groups: &mut [i32; 8],
) -> Option<(f32, f32)> {
    // SAFETY: 32 readable floats.
    let (lo, hi) = unsafe {
        (
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        )
    };
    // QNaN, +Inf, -Inf, SNaN.
    if _mm512_fpclass_ps_mask::<0x99>(lo) | _mm512_fpclass_ps_mask::<0x99>(hi) != 0 {
        return None;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    if !id.is_finite() {
        return None;
    }
    // x[j] + x[j+16], then halves folded: the twin's order.
    let s16 = _mm512_add_ps(lo, hi);
    let s8 = _mm256_add_ps(
        _mm512_castps512_ps256(s16),
        _mm512_extractf32x8_ps::<1>(s16),
    );
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    let (vd, vid, level2) = (
        _mm512_set1_ps(d),
        _mm512_set1_ps(id),
        _mm512_set1_ps(crate::quant::prep::LEVEL2 as f32),
    );
    let (lim_lo, lim_hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let clamp_round = |v: __m512| {
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm512_min_ps(_mm512_max_ps(r, lim_lo), lim_hi)
    };
    let mut combined = [_mm512_setzero_si512(); 2];
    for (half, v) in [lo, hi].into_iter().enumerate() {
        let a = clamp_round(_mm512_mul_ps(v, vid));
        let resid = _mm512_sub_ps(v, _mm512_mul_ps(a, vd));
        let b = clamp_round(_mm512_mul_ps(_mm512_mul_ps(resid, vid), level2));
        let (a, b) = (_mm512_cvtps_epi32(a), _mm512_cvtps_epi32(b));
        combined[half] = _mm512_add_epi32(_mm512_slli_epi32::<LEVEL2_SHIFT>(a), b);
        // SAFETY: 16 bytes into each 32-byte array at offset 16·half.
        unsafe {
            _mm_storeu_si128(
                q1.as_mut_ptr().add(16 * half).cast(),
                _mm512_cvtsepi32_epi8(a),
            );
            _mm_storeu_si128(
                q2.as_mut_ptr().add(16 * half).cast(),
                _mm512_cvtsepi32_epi8(b),
            );
        }
    }
    // Groups of four lanes: pairwise sums of neighbours, twice, then the even lanes.
    let pair = |v: __m512i| {
        let s = _mm512_add_epi32(v, _mm512_srli_epi64::<32>(v));
        _mm512_add_epi32(s, _mm512_bsrli_epi128::<8>(s))
    };
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
    let both = _mm512_permutex2var_epi32(pair(combined[0]), idx, pair(combined[1]));
    // SAFETY: eight i32 into an eight-i32 array.
    unsafe { _mm256_storeu_si256(groups.as_mut_ptr().cast(), _mm512_castsi512_si256(both)) };
    Some((d, sum))
}
