//! The k-quants Q4_K, Q5_K, Q6_K (256-element super-blocks) and their Q8_K activation
//! type: reference dequantization, quantization and dot products.

use half::f16;

use super::blocks::*;
use super::{Block, DotFn, WeightBlock, round_even, signed_absmax};
use crate::dtype::QK_K;
use crate::simd::SimdLevel;

/// Scale and minimum (6 bits each) of sub-block `j` (0..8) of a Q4_K / Q5_K block.
#[inline]
pub(crate) fn scale_min_k4(j: usize, s: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// All eight (scale, minimum) pairs of a Q4_K / Q5_K block.
#[inline]
pub(crate) fn kquant_scales(s: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        (sc[j], mn[j]) = scale_min_k4(j, s);
    }
    (sc, mn)
}

/// Inverse of [`scale_min_k4`]: packs eight 6-bit scales and minimums.
fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut s = [0u8; K_SCALE_SIZE];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xf) | ((m[j + 4] & 0xf) << 4);
    }
    s
}

#[cfg(test)]
pub(crate) fn pack_scale_min_k4_for_tests(sc: &[u8; 8], m: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    pack_scale_min_k4(sc, m)
}

/// Quantizes one 256-element super-block to `levels + 1` unsigned levels per element
/// with eight 32-element sub-blocks, each with a 6-bit scale and minimum. Returns
/// (d, dmin, packed scales, per-element levels).
fn quantize_k_asym(x: &[f32], levels: f32) -> (f32, f32, [u8; K_SCALE_SIZE], [u8; QK_K]) {
    let mut scale = [0f32; 8];
    let mut neg_min = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        // The minimum is clamped to <= 0 so it is stored as a non-negative offset.
        let lo = sub.iter().fold(0.0f32, |a, &v| a.min(v));
        let hi = sub.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        scale[j] = (hi - lo) / levels;
        neg_min[j] = -lo;
    }
    let max_scale = scale.iter().fold(0.0f32, |a, &v| a.max(v));
    let max_min = neg_min.iter().fold(0.0f32, |a, &v| a.max(v));
    let d = max_scale / 63.0;
    let dmin = max_min / 63.0;
    let (d16, dmin16) = (f16::from_f32(d), f16::from_f32(dmin));
    let (d, dmin) = (d16.to_f32(), dmin16.to_f32());

    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        sc[j] = if d > 0.0 {
            round_even(scale[j] / d).clamp(0.0, 63.0) as u8
        } else {
            0
        };
        mn[j] = if dmin > 0.0 {
            round_even(neg_min[j] / dmin).clamp(0.0, 63.0) as u8
        } else {
            0
        };
    }
    let mut q = [0u8; QK_K];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        // Quantize against the scale and minimum as they will be decoded.
        let step = d * f32::from(sc[j]);
        let offset = dmin * f32::from(mn[j]);
        for (l, &v) in sub.iter().enumerate() {
            q[32 * j + l] = if step > 0.0 {
                round_even((v + offset) / step).clamp(0.0, levels) as u8
            } else {
                0
            };
        }
    }
    (d, dmin, pack_scale_min_k4(&sc, &mn), q)
}

impl Block for BlockQ4K {
    const LEN: usize = QK_K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, &b.scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, &b.scales);
                let q = &b.qs[32 * c..32 * c + 32];
                let y = &mut y[64 * c..64 * c + 64];
                for l in 0..32 {
                    y[l] = d * f32::from(sc1) * f32::from(q[l] & 0xf) - dmin * f32::from(m1);
                    y[l + 32] = d * f32::from(sc2) * f32::from(q[l] >> 4) - dmin * f32::from(m2);
                }
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K);
        for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            let (d, dmin, scales, q) = quantize_k_asym(x, 15.0);
            b.d = f16::from_f32(d);
            b.dmin = f16::from_f32(dmin);
            b.scales = scales;
            for c in 0..4 {
                for l in 0..32 {
                    b.qs[32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
                }
            }
        }
    }
}

impl Block for BlockQ5K {
    const LEN: usize = QK_K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, &b.scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, &b.scales);
                let q = &b.qs[32 * c..32 * c + 32];
                let y = &mut y[64 * c..64 * c + 64];
                for l in 0..32 {
                    let h1 = ((b.qh[l] >> (2 * c)) & 1) << 4;
                    let h2 = ((b.qh[l] >> (2 * c + 1)) & 1) << 4;
                    y[l] = d * f32::from(sc1) * f32::from((q[l] & 0xf) | h1) - dmin * f32::from(m1);
                    y[l + 32] =
                        d * f32::from(sc2) * f32::from((q[l] >> 4) | h2) - dmin * f32::from(m2);
                }
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K);
        for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            let (d, dmin, scales, q) = quantize_k_asym(x, 31.0);
            b.d = f16::from_f32(d);
            b.dmin = f16::from_f32(dmin);
            b.scales = scales;
            b.qh = [0; QK_K / 8];
            for c in 0..4 {
                for l in 0..32 {
                    let (lo, hi) = (q[64 * c + l], q[64 * c + 32 + l]);
                    b.qs[32 * c + l] = (lo & 0xf) | ((hi & 0xf) << 4);
                    b.qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
                }
            }
        }
    }
}

/// The 6-bit level (0..64) of element `e` of a Q6_K block.
#[inline]
fn q6_level(b: &BlockQ6K, e: usize) -> u8 {
    // Elements come in halves of 128; within a half, element 32k + l (k = 0..4) keeps its
    // low nibble in ql[l + 32 (k % 2)] (low or high nibble by k / 2) and its top two bits
    // in qh[l] at bit 2k.
    let (half, r) = (e / 128, e % 128);
    let (k, l) = (r / 32, r % 32);
    let ql = b.ql[64 * half + l + 32 * (k % 2)];
    let lo = if k < 2 { ql & 0xf } else { ql >> 4 };
    let hi = (b.qh[32 * half + l] >> (2 * k)) & 3;
    lo | (hi << 4)
}

impl Block for BlockQ6K {
    const LEN: usize = QK_K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = b.d.to_f32();
            for (e, y) in y.iter_mut().enumerate() {
                let q = i32::from(q6_level(b, e)) - 32;
                *y = d * f32::from(b.scales[e / 16]) * q as f32;
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K);
        for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            // Per 16 elements: the extreme value maps to -32 (the level without a twin).
            let mut scale = [0f32; 16];
            for (k, sub) in x.chunks_exact(16).enumerate() {
                scale[k] = signed_absmax(sub) / -32.0;
            }
            let max_abs = scale.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = f16::from_f32(max_abs / 127.0);
            let df = d.to_f32();
            b.d = d;
            let mut q = [0u8; QK_K];
            for (k, sub) in x.chunks_exact(16).enumerate() {
                let sc = if df > 0.0 {
                    round_even(scale[k] / df).clamp(-127.0, 127.0)
                } else {
                    0.0
                };
                b.scales[k] = sc as i8;
                let step = df * sc;
                for (l, &v) in sub.iter().enumerate() {
                    let level = if step != 0.0 {
                        round_even(v / step).clamp(-32.0, 31.0)
                    } else {
                        0.0
                    };
                    q[16 * k + l] = (level + 32.0) as u8;
                }
            }
            b.ql = [0; QK_K / 2];
            b.qh = [0; QK_K / 4];
            for (e, &level) in q.iter().enumerate() {
                let (half, r) = (e / 128, e % 128);
                let (k, l) = (r / 32, r % 32);
                let lo = level & 0xf;
                b.ql[64 * half + l + 32 * (k % 2)] |= if k < 2 { lo } else { lo << 4 };
                b.qh[32 * half + l] |= (level >> 4) << (2 * k);
            }
        }
    }
}

impl Block for BlockQ8K {
    const LEN: usize = QK_K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            for (y, &q) in y.iter_mut().zip(&b.qs) {
                *y = b.d * f32::from(q);
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K);
        for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            let max = signed_absmax(x);
            if max == 0.0 {
                *b = Self::default();
                continue;
            }
            let iscale = -127.0 / max;
            for (q, &v) in b.qs.iter_mut().zip(x) {
                *q = round_even(iscale * v).clamp(-127.0, 127.0) as i8;
            }
            for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = qs.iter().map(|&q| i16::from(q)).sum();
            }
            b.d = 1.0 / iscale;
        }
    }
}

impl WeightBlock for BlockQ4K {
    type Act = BlockQ8K;
    type Prep = BlockQ8K;
    const PREP_BLOCKS: usize = 1;

    fn prepare_ggml(a: &[BlockQ8K], out: &mut [BlockQ8K]) {
        out.copy_from_slice(a);
    }

    fn dot_scalar(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len());
        let mut acc = 0.0f32;
        for (w, a) in w.iter().zip(a) {
            let (mut sum_q, mut sum_m) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &w.scales);
                let (c, hi) = (j / 2, j % 2 == 1);
                let mut s = 0i32;
                for l in 0..32 {
                    let byte = w.qs[32 * c + l];
                    let q = if hi { byte >> 4 } else { byte & 0xf };
                    s += i32::from(q) * i32::from(a.qs[32 * j + l]);
                }
                sum_q += i32::from(sc) * s;
                sum_m += i32::from(m) * (i32::from(a.bsums[2 * j]) + i32::from(a.bsums[2 * j + 1]));
            }
            acc += a.d * (w.d.to_f32() * sum_q as f32 - w.dmin.to_f32() * sum_m as f32);
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_q4_k_q8_k, Self::dot_scalar)
    }
}

impl WeightBlock for BlockQ5K {
    type Act = BlockQ8K;
    type Prep = BlockQ8K;
    const PREP_BLOCKS: usize = 1;

    fn prepare_ggml(a: &[BlockQ8K], out: &mut [BlockQ8K]) {
        out.copy_from_slice(a);
    }

    fn dot_scalar(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len());
        let mut acc = 0.0f32;
        for (w, a) in w.iter().zip(a) {
            let (mut sum_q, mut sum_m) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &w.scales);
                let (c, hi) = (j / 2, j % 2 == 1);
                let mut s = 0i32;
                for l in 0..32 {
                    let byte = w.qs[32 * c + l];
                    let lo4 = if hi { byte >> 4 } else { byte & 0xf };
                    let q = lo4 | (((w.qh[l] >> j) & 1) << 4);
                    s += i32::from(q) * i32::from(a.qs[32 * j + l]);
                }
                sum_q += i32::from(sc) * s;
                sum_m += i32::from(m) * (i32::from(a.bsums[2 * j]) + i32::from(a.bsums[2 * j + 1]));
            }
            acc += a.d * (w.d.to_f32() * sum_q as f32 - w.dmin.to_f32() * sum_m as f32);
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_q5_k_q8_k, Self::dot_scalar)
    }
}

impl WeightBlock for BlockQ6K {
    type Act = BlockQ8K;
    type Prep = BlockQ8K;
    const PREP_BLOCKS: usize = 1;

    fn prepare_ggml(a: &[BlockQ8K], out: &mut [BlockQ8K]) {
        out.copy_from_slice(a);
    }

    fn dot_scalar(w: &[Self], a: &[BlockQ8K]) -> f32 {
        assert_eq!(w.len(), a.len());
        let mut acc = 0.0f32;
        for (w, a) in w.iter().zip(a) {
            let mut sum = 0i32;
            for k in 0..16 {
                let mut s = 0i32;
                for l in 0..16 {
                    let e = 16 * k + l;
                    s += (i32::from(q6_level(w, e)) - 32) * i32::from(a.qs[e]);
                }
                sum += i32::from(w.scales[k]) * s;
            }
            acc += a.d * w.d.to_f32() * sum as f32;
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_q6_k_q8_k, Self::dot_scalar)
    }
}
