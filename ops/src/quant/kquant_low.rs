//! The 2- and 3-bit k-quants Q2_K and Q3_K (256-element super-blocks of 16 sub-blocks of
//! 16) against their Q8_K activation type: reference dequantization, quantization and dot
//! products.
//!
//! Both keep their low two bits per element the same way: per 128 elements, 32 bytes,
//! element `32j + l` of the half in bits `2j..2j+2` of byte `l`.

use half::f16;

use super::blocks::*;
use super::{Block, DotFn, WeightBlock, round_even, signed_absmax};
use crate::dtype::QK_K;
use crate::simd::SimdLevel;

/// The low two bits of element `e` of a Q2_K / Q3_K block.
#[inline]
fn low2(qs: &[u8; QK_K / 4], e: usize) -> u8 {
    let (half, r) = (e / 128, e % 128);
    let (j, l) = (r / 32, r % 32);
    (qs[32 * half + l] >> (2 * j)) & 3
}

/// Packs 256 two-bit values as [`low2`] reads them.
fn pack_low2(q: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    for (e, &v) in q.iter().enumerate() {
        let (half, r) = (e / 128, e % 128);
        let (j, l) = (r / 32, r % 32);
        qs[32 * half + l] |= (v & 3) << (2 * j);
    }
    qs
}

/// The sixteen scales of a Q3_K block, minus their offset of 32 (-32..32).
#[inline]
pub(crate) fn q3_scales(s: &[u8; 12]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let lo = if i < 8 { s[i] & 0xf } else { s[i - 8] >> 4 };
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        (lo | (hi << 4)) as i8 - 32
    })
}

/// Inverse of [`q3_scales`]: `sc[i]` in -32..32.
fn pack_q3_scales(sc: &[i8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (i, &v) in sc.iter().enumerate() {
        let u = (i16::from(v) + 32) as u8 & 63;
        if i < 8 {
            s[i] |= u & 0xf;
        } else {
            s[i - 8] |= (u & 0xf) << 4;
        }
        s[8 + i % 4] |= (u >> 4) << (2 * (i / 4));
    }
    s
}

#[cfg(test)]
pub(crate) fn pack_q3_scales_for_tests(sc: &[i8; 16]) -> [u8; 12] {
    pack_q3_scales(sc)
}

/// The signed 3-bit level (-4..4) of element `e` of a Q3_K block: the two low bits, less
/// 4 where the element's `hmask` bit is clear.
#[inline]
fn q3_level(b: &BlockQ3K, e: usize) -> i32 {
    let high = (b.hmask[e % 32] >> (e / 32)) & 1;
    i32::from(low2(&b.qs, e)) - if high == 0 { 4 } else { 0 }
}

impl Block for BlockQ2K {
    const LEN: usize = QK_K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
            for (k, y) in y.chunks_exact_mut(16).enumerate() {
                let step = d * f32::from(b.scales[k] & 0xf);
                let offset = dmin * f32::from(b.scales[k] >> 4);
                for (l, y) in y.iter_mut().enumerate() {
                    *y = step * f32::from(low2(&b.qs, 16 * k + l)) - offset;
                }
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K);
        for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            // Per 16 elements: levels 0..=3 between the minimum (clamped to <= 0, so it is
            // stored as a non-negative offset) and the maximum.
            let mut scale = [0f32; 16];
            let mut neg_min = [0f32; 16];
            for (k, sub) in x.chunks_exact(16).enumerate() {
                let lo = sub.iter().fold(0.0f32, |a, &v| a.min(v));
                let hi = sub.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                scale[k] = (hi - lo) / 3.0;
                neg_min[k] = -lo;
            }
            let max_scale = scale.iter().fold(0.0f32, |a, &v| a.max(v));
            let max_min = neg_min.iter().fold(0.0f32, |a, &v| a.max(v));
            b.d = f16::from_f32(max_scale / 15.0);
            b.dmin = f16::from_f32(max_min / 15.0);
            let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
            let mut q = [0u8; QK_K];
            for (k, sub) in x.chunks_exact(16).enumerate() {
                let sc = if d > 0.0 {
                    round_even(scale[k] / d).clamp(0.0, 15.0) as u8
                } else {
                    0
                };
                let mn = if dmin > 0.0 {
                    round_even(neg_min[k] / dmin).clamp(0.0, 15.0) as u8
                } else {
                    0
                };
                b.scales[k] = sc | (mn << 4);
                // Quantize against the scale and minimum as they will be decoded.
                let step = d * f32::from(sc);
                let offset = dmin * f32::from(mn);
                for (l, &v) in sub.iter().enumerate() {
                    q[16 * k + l] = if step > 0.0 {
                        round_even((v + offset) / step).clamp(0.0, 3.0) as u8
                    } else {
                        0
                    };
                }
            }
            b.qs = pack_low2(&q);
        }
    }
}

impl Block for BlockQ3K {
    const LEN: usize = QK_K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = b.d.to_f32();
            let sc = q3_scales(&b.scales);
            for (k, y) in y.chunks_exact_mut(16).enumerate() {
                let step = d * f32::from(sc[k]);
                for (l, y) in y.iter_mut().enumerate() {
                    *y = step * q3_level(b, 16 * k + l) as f32;
                }
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K);
        for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            // Per 16 elements the extreme value maps to -4, the level without a positive
            // twin; over the sub-block scales, the extreme one maps to -32 likewise.
            let mut scale = [0f32; 16];
            for (k, sub) in x.chunks_exact(16).enumerate() {
                scale[k] = signed_absmax(sub) / -4.0;
            }
            b.d = f16::from_f32(signed_absmax(&scale) / -32.0);
            let d = b.d.to_f32();
            let mut sc = [0i8; 16];
            let mut q = [0u8; QK_K];
            for (k, sub) in x.chunks_exact(16).enumerate() {
                sc[k] = if d != 0.0 {
                    round_even(scale[k] / d).clamp(-32.0, 31.0) as i8
                } else {
                    0
                };
                let step = d * f32::from(sc[k]);
                for (l, &v) in sub.iter().enumerate() {
                    let level = if step != 0.0 {
                        round_even(v / step).clamp(-4.0, 3.0)
                    } else {
                        0.0
                    };
                    q[16 * k + l] = (level + 4.0) as u8;
                }
            }
            b.scales = pack_q3_scales(&sc);
            b.qs = pack_low2(&q);
            b.hmask = [0; QK_K / 8];
            for (e, &v) in q.iter().enumerate() {
                b.hmask[e % 32] |= (v >> 2) << (e / 32);
            }
        }
    }
}

impl WeightBlock for BlockQ2K {
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
            for k in 0..16 {
                let s: i32 = (16 * k..16 * k + 16)
                    .map(|e| i32::from(low2(&w.qs, e)) * i32::from(a.qs[e]))
                    .sum();
                sum_q += i32::from(w.scales[k] & 0xf) * s;
                sum_m += i32::from(w.scales[k] >> 4) * i32::from(a.bsums[k]);
            }
            acc += a.d * (w.d.to_f32() * sum_q as f32 - w.dmin.to_f32() * sum_m as f32);
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_q2_k_q8_k, Self::dot_scalar)
    }
}

impl WeightBlock for BlockQ3K {
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
            let sc = q3_scales(&w.scales);
            let mut sum = 0i32;
            for (k, &sc) in sc.iter().enumerate() {
                let s: i32 = (16 * k..16 * k + 16)
                    .map(|e| q3_level(w, e) * i32::from(a.qs[e]))
                    .sum();
                sum += i32::from(sc) * s;
            }
            acc += a.d * w.d.to_f32() * sum as f32;
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_q3_k_q8_k, Self::dot_scalar)
    }
}
