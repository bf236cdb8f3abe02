//! The non-linear 4-bit types IQ4_NL (32-element blocks, against Q8_0 activations) and
//! IQ4_XS (256-element super-blocks with 6-bit sub-block scales, against Q8_K): reference
//! dequantization, quantization and dot products.
//!
//! Each 4-bit index selects one of the 16 signed 8-bit levels of [`KVALUES_IQ4NL`], so a
//! block is an 8-bit block with a codebook: IQ4_NL multiplies the prepared activation of
//! Q8_0 weights ([`PrepQ8`]) and so gets the engine's precise numerics as Q8_0 does.

use half::f16;

use super::blocks::*;
use super::prep::{self, LEVEL2, PrepQ8, Q8_GROUP};
use super::{Block, DotFn, WeightBlock, round_even, signed_absmax};
use crate::dtype::QK_K;
use crate::simd::SimdLevel;

/// The level (-127..=113) of element `j` (0..32) of 16 packed bytes.
#[inline]
fn level(qs: &[u8; 16], j: usize) -> i8 {
    let byte = qs[j % 16];
    let nib = if j < 16 { byte & 0xf } else { byte >> 4 };
    KVALUES_IQ4NL[usize::from(nib)]
}

/// The index of the codebook level nearest to `v` (the lower one on a tie).
fn nearest(v: f32) -> u8 {
    let mut best = 0;
    for (i, &k) in KVALUES_IQ4NL.iter().enumerate().skip(1) {
        if (f32::from(k) - v).abs() < (f32::from(KVALUES_IQ4NL[best]) - v).abs() {
            best = i;
        }
    }
    best as u8
}

/// Quantizes 32 values against `step` into the IQ4_NL nibble layout.
fn pack_nearest(x: &[f32], step: f32) -> [u8; 16] {
    let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
    let q: [u8; 32] = std::array::from_fn(|j| nearest(x[j] * inv));
    std::array::from_fn(|j| q[j] | (q[j + 16] << 4))
}

/// The scale that maps the block's extreme value to the codebook's extreme, -127 (the
/// level without a positive twin).
fn extreme_scale(x: &[f32]) -> f32 {
    signed_absmax(x) / f32::from(KVALUES_IQ4NL[0])
}

/// The six-bit scale of sub-block `ib` (0..8) of an IQ4_XS block, minus 32 (-32..32).
#[inline]
pub(crate) fn iq4xs_scale(b: &BlockIQ4XS, ib: usize) -> i32 {
    let lo = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
    let hi = ((b.scales_h >> (2 * ib)) & 3) as u8;
    i32::from(lo | (hi << 4)) - 32
}

impl Block for BlockIQ4NL {
    const LEN: usize = QK;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = b.d.to_f32();
            for (j, y) in y.iter_mut().enumerate() {
                *y = d * f32::from(level(&b.qs, j));
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            b.d = f16::from_f32(extreme_scale(x));
            b.qs = pack_nearest(x, b.d.to_f32());
        }
    }
}

impl Block for BlockIQ4XS {
    const LEN: usize = QK_K;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK_K);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = b.d.to_f32();
            for (ib, y) in y.chunks_exact_mut(QK).enumerate() {
                let step = d * iq4xs_scale(b, ib) as f32;
                let qs: &[u8; 16] = b.qs[16 * ib..16 * ib + 16]
                    .try_into()
                    .expect("16 bytes per sub-block");
                for (j, y) in y.iter_mut().enumerate() {
                    *y = step * f32::from(level(qs, j));
                }
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK_K);
        for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            let scale: [f32; 8] = std::array::from_fn(|ib| extreme_scale(&x[QK * ib..][..QK]));
            // The extreme sub-block scale maps to -32, as the codebook's extreme does.
            b.d = f16::from_f32(signed_absmax(&scale) / -32.0);
            let d = b.d.to_f32();
            b.scales_h = 0;
            b.scales_l = [0; QK_K / 64];
            for (ib, sub) in x.chunks_exact(QK).enumerate() {
                let ls = if d != 0.0 {
                    round_even(scale[ib] / d).clamp(-32.0, 31.0) as i32
                } else {
                    0
                };
                let u = (ls + 32) as u8;
                b.scales_l[ib / 2] |= (u & 0xf) << (4 * (ib % 2));
                b.scales_h |= u16::from(u >> 4) << (2 * ib);
                let qs = pack_nearest(sub, d * ls as f32);
                b.qs[16 * ib..16 * ib + 16].copy_from_slice(&qs);
            }
        }
    }
}

/// Σ level·q over one 32-element block.
#[inline]
fn idot(qs: &[u8; 16], a: &[i8]) -> i32 {
    (0..QK)
        .map(|j| i32::from(level(qs, j)) * i32::from(a[j]))
        .sum()
}

/// Scalar dot product of IQ4_NL weights with prepared activations (the twin of the SIMD
/// kernels, in either numerics); [`prep::dot_q8_scalar`] with the codebook's levels.
pub fn dot_iq4nl_prep_scalar(w: &[BlockIQ4NL], a: &[PrepQ8]) -> f32 {
    assert_eq!(a.len(), w.len().div_ceil(Q8_GROUP));
    let mut acc = 0.0f32;
    for (i, wb) in w.iter().enumerate() {
        let (p, b) = (&a[i / Q8_GROUP], i % Q8_GROUP);
        let sum: i32 = (0..QK)
            .map(|j| {
                let x = 32 * b + j;
                i32::from(level(&wb.qs, j)) * (LEVEL2 * i32::from(p.qs[x]) + i32::from(p.qs2[x]))
            })
            .sum();
        acc += wb.d.to_f32() * p.d[8 * b] * sum as f32;
    }
    acc
}

impl WeightBlock for BlockIQ4NL {
    type Act = BlockQ8_0;
    type Prep = PrepQ8;
    const PREP_BLOCKS: usize = Q8_GROUP;

    fn prepare_ggml(a: &[BlockQ8_0], out: &mut [PrepQ8]) {
        prep::prepare_q8(a, out);
    }

    fn prepare_precise(x: &[f32], _: &mut Vec<BlockQ8_0>, out: &mut [PrepQ8]) {
        prep::prepare_q8_f32(x, out);
    }

    fn dot_scalar(w: &[Self], a: &[BlockQ8_0]) -> f32 {
        assert_eq!(w.len(), a.len());
        let mut acc = 0.0f32;
        for (w, a) in w.iter().zip(a) {
            acc += w.d.to_f32() * a.d.to_f32() * idot(&w.qs, &a.qs) as f32;
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_iq4_nl, dot_iq4nl_prep_scalar)
    }
}

impl WeightBlock for BlockIQ4XS {
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
            for ib in 0..QK_K / QK {
                let qs: &[u8; 16] = w.qs[16 * ib..16 * ib + 16]
                    .try_into()
                    .expect("16 bytes per sub-block");
                sum += iq4xs_scale(w, ib) * idot(qs, &a.qs[QK * ib..QK * ib + QK]);
            }
            acc += a.d * w.d.to_f32() * sum as f32;
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_iq4_xs_q8_k, Self::dot_scalar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_picks_the_closest_level() {
        for (i, &k) in KVALUES_IQ4NL.iter().enumerate() {
            assert_eq!(usize::from(nearest(f32::from(k))), i);
            assert_eq!(usize::from(nearest(f32::from(k) + 0.4)), i);
        }
        assert_eq!(nearest(-1000.0), 0);
        assert_eq!(nearest(1000.0), 15);
        // Midway between -10 and 1: the lower one.
        assert_eq!(nearest(-4.5), 7);
    }
}
