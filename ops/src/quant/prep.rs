//! Activations prepared for the fast kernels of the 32-element weight types.
//!
//! GGML multiplies Q4_0/Q5_0/Q8_0 weights against Q8_0 activation blocks and Q4_1/Q5_1
//! against Q8_1. The quantized integers are exactly GGML's (the prepared forms are made
//! from those blocks), but they are laid out so one 512-bit `vpdpbusd` covers whole blocks
//! in the order the weight bytes unpack to, with the scales converted to f32 once per
//! activation row instead of once per weight row:
//!
//! - [`PrepNib`] (Q4_0, Q4_1, Q5_0, Q5_1): four blocks; the first 16 values of each block
//!   in `lo`, the last 16 in `hi`, matching a 64-byte load of four blocks' nibbles.
//! - [`PrepQ8`] (Q8_0): two blocks in natural order, with the sums that undo the +128
//!   offset that makes signed weights unsigned.
//!
//! The scalar kernels here read the prepared forms directly; every level is tested
//! against the GGML-format scalar twins (`WeightBlock::dot_scalar`).

use half::f16;

use super::blocks::*;

/// Weight blocks per [`PrepNib`].
pub const NIB_GROUP: usize = 4;
/// Weight blocks per [`PrepQ8`].
pub const Q8_GROUP: usize = 2;

/// Four activation blocks prepared for nibble weights. Lane `4b + k` (k = 0..4) of a
/// 16-lane i32 sum covers values `4k..4k+4` of block `b` in `lo` and in `hi`.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrepNib {
    /// Values 0..16 of each of the four blocks.
    pub lo: [i8; 64],
    /// Values 16..32 of each block.
    pub hi: [i8; 64],
    /// Block scale `d[b]` in lanes `4b..4b+4`.
    pub d: [f32; 16],
    /// Sum of the 8 values lane `l` covers (4 in `lo`, 4 in `hi`): undoes an unsigned
    /// weight offset (8 for Q4_0, 16 for Q5_0).
    pub lane_sum: [i32; 16],
    /// `[0, s0, 0, s1, 0, s2, 0, s3]` with `s = d·Σq` of Q8_1 blocks (f16-rounded as GGML
    /// stores it), to multiply against weight `[d0, m0, d1, m1, ...]`.
    pub s: [f32; 8],
}

impl Default for PrepNib {
    fn default() -> Self {
        Self {
            lo: [0; 64],
            hi: [0; 64],
            d: [0.0; 16],
            lane_sum: [0; 16],
            s: [0.0; 8],
        }
    }
}

/// Two activation blocks prepared for Q8_0 weights.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrepQ8 {
    pub qs: [i8; 64],
    /// `d[b]` in lanes `8b..8b+8`.
    pub d: [f32; 16],
    /// `-128 ×` the sum of the 4 values of each lane.
    pub neg_corr: [i32; 16],
}

impl Default for PrepQ8 {
    fn default() -> Self {
        Self {
            qs: [0; 64],
            d: [0.0; 16],
            neg_corr: [0; 16],
        }
    }
}

/// Fills `out` (`ceil(n / 4)` groups; missing blocks of the last group are zero) from
/// activation blocks given as (d, values, s).
fn prepare_nib<'a>(
    blocks: impl ExactSizeIterator<Item = (f16, &'a [i8; QK], f16)>,
    out: &mut [PrepNib],
) {
    assert_eq!(out.len(), blocks.len().div_ceil(NIB_GROUP));
    out.fill(PrepNib::default());
    for (i, (d, qs, s)) in blocks.enumerate() {
        let (p, b) = (&mut out[i / NIB_GROUP], i % NIB_GROUP);
        p.lo[16 * b..16 * b + 16].copy_from_slice(&qs[..16]);
        p.hi[16 * b..16 * b + 16].copy_from_slice(&qs[16..]);
        p.d[4 * b..4 * b + 4].fill(d.to_f32());
        p.s[2 * b + 1] = s.to_f32();
        for k in 0..4 {
            let sum = |v: &[i8]| {
                v[4 * k..4 * k + 4]
                    .iter()
                    .map(|&x| i32::from(x))
                    .sum::<i32>()
            };
            p.lane_sum[4 * b + k] = sum(&qs[..16]) + sum(&qs[16..]);
        }
    }
}

/// Prepares Q8_0 activation blocks for Q4_0 / Q5_0 weights.
pub fn prepare_nib_q8_0(a: &[BlockQ8_0], out: &mut [PrepNib]) {
    prepare_nib(a.iter().map(|b| (b.d, &b.qs, f16::ZERO)), out);
}

/// Prepares Q8_1 activation blocks for Q4_1 / Q5_1 weights.
pub fn prepare_nib_q8_1(a: &[BlockQ8_1], out: &mut [PrepNib]) {
    prepare_nib(a.iter().map(|b| (b.d, &b.qs, b.s)), out);
}

/// Prepares Q8_0 activation blocks for Q8_0 weights.
pub fn prepare_q8(a: &[BlockQ8_0], out: &mut [PrepQ8]) {
    assert_eq!(out.len(), a.len().div_ceil(Q8_GROUP));
    out.fill(PrepQ8::default());
    for (i, blk) in a.iter().enumerate() {
        let (p, b) = (&mut out[i / Q8_GROUP], i % Q8_GROUP);
        p.qs[32 * b..32 * b + 32].copy_from_slice(&blk.qs);
        p.d[8 * b..8 * b + 8].fill(blk.d.to_f32());
        for k in 0..8 {
            let sum: i32 = blk.qs[4 * k..4 * k + 4].iter().map(|&x| i32::from(x)).sum();
            p.neg_corr[8 * b + k] = -128 * sum;
        }
    }
}

/// Uniform access to the four nibble block types for the prepared kernels.
pub trait NibBlock: Copy + Default + 'static {
    /// Subtracted from every unsigned level (8 for Q4_0, 16 for Q5_0, 0 with a minimum).
    const OFFSET: i32;
    const HAS_MIN: bool;
    const HAS_QH: bool;
    /// `d | m << 16` as f16 bits (m = 0 for types without a minimum).
    fn dm_bits(&self) -> u32;
    fn nibbles(&self) -> &[u8; 16];
    /// Bit `j` is bit 4 of value `j` (0 for 4-bit types).
    fn high_bits(&self) -> u32;
}

impl NibBlock for BlockQ4_0 {
    const OFFSET: i32 = 8;
    const HAS_MIN: bool = false;
    const HAS_QH: bool = false;
    fn dm_bits(&self) -> u32 {
        u32::from(self.d.to_bits())
    }
    fn nibbles(&self) -> &[u8; 16] {
        &self.qs
    }
    fn high_bits(&self) -> u32 {
        0
    }
}

impl NibBlock for BlockQ4_1 {
    const OFFSET: i32 = 0;
    const HAS_MIN: bool = true;
    const HAS_QH: bool = false;
    fn dm_bits(&self) -> u32 {
        u32::from(self.d.to_bits()) | (u32::from(self.m.to_bits()) << 16)
    }
    fn nibbles(&self) -> &[u8; 16] {
        &self.qs
    }
    fn high_bits(&self) -> u32 {
        0
    }
}

impl NibBlock for BlockQ5_0 {
    const OFFSET: i32 = 16;
    const HAS_MIN: bool = false;
    const HAS_QH: bool = true;
    fn dm_bits(&self) -> u32 {
        u32::from(self.d.to_bits())
    }
    fn nibbles(&self) -> &[u8; 16] {
        &self.qs
    }
    fn high_bits(&self) -> u32 {
        u32::from_le_bytes(self.qh)
    }
}

impl NibBlock for BlockQ5_1 {
    const OFFSET: i32 = 0;
    const HAS_MIN: bool = true;
    const HAS_QH: bool = true;
    fn dm_bits(&self) -> u32 {
        u32::from(self.d.to_bits()) | (u32::from(self.m.to_bits()) << 16)
    }
    fn nibbles(&self) -> &[u8; 16] {
        &self.qs
    }
    fn high_bits(&self) -> u32 {
        u32::from_le_bytes(self.qh)
    }
}

/// Scalar dot product of nibble weights with prepared activations.
pub fn dot_nib_scalar<W: NibBlock>(w: &[W], a: &[PrepNib]) -> f32 {
    assert_eq!(a.len(), w.len().div_ceil(NIB_GROUP));
    let mut acc = 0.0f32;
    for (i, wb) in w.iter().enumerate() {
        let (p, b) = (&a[i / NIB_GROUP], i % NIB_GROUP);
        let (qs, qh) = (wb.nibbles(), wb.high_bits());
        let mut sum = 0i32;
        for (j, &byte) in qs.iter().enumerate() {
            let lo = i32::from(byte & 0xf) | ((((qh >> j) & 1) as i32) << 4);
            let hi = i32::from(byte >> 4) | ((((qh >> (j + 16)) & 1) as i32) << 4);
            sum += (lo - W::OFFSET) * i32::from(p.lo[16 * b + j]);
            sum += (hi - W::OFFSET) * i32::from(p.hi[16 * b + j]);
        }
        let dm = wb.dm_bits();
        let d = f16::from_bits(dm as u16).to_f32();
        let m = f16::from_bits((dm >> 16) as u16).to_f32();
        acc += d * p.d[4 * b] * sum as f32 + m * p.s[2 * b + 1];
    }
    acc
}

/// Scalar dot product of Q8_0 weights with prepared activations.
pub fn dot_q8_scalar(w: &[BlockQ8_0], a: &[PrepQ8]) -> f32 {
    assert_eq!(a.len(), w.len().div_ceil(Q8_GROUP));
    let mut acc = 0.0f32;
    for (i, wb) in w.iter().enumerate() {
        let (p, b) = (&a[i / Q8_GROUP], i % Q8_GROUP);
        let sum: i32 = (0..QK)
            .map(|j| i32::from(wb.qs[j]) * i32::from(p.qs[32 * b + j]))
            .sum();
        acc += wb.d.to_f32() * p.d[8 * b] * sum as f32;
    }
    acc
}
