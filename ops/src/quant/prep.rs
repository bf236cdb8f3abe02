//! Prepared activations for the fast kernels of the 32-element weight types, in two
//! numerics.
//!
//! The layout puts whole blocks under one 512-bit `vpdpbusd`, in the order the weight
//! bytes unpack to, with scales as f32 converted once per activation row:
//! - [`PrepNib`] (Q4_0, Q4_1, Q5_0, Q5_1): four blocks; values 0..16 of each block in
//!   `lo`, values 16..32 in `hi`, matching a 64-byte load of four blocks' nibbles.
//! - [`PrepQ8`] (Q8_0): two blocks in natural order.
//!
//! Each activation value is held as two 8-bit levels, `x ≈ d·q1 + (d/256)·q2`, summed in
//! integers as `256·Σw·q1 + Σw·q2` (a shift, then accumulation into the same sum):
//! - **precise** ([`Numerics::Precise`], the engine's default): `q2` quantizes the residual
//!   of `q1`, so activations carry ~15 bits instead of 8. This network amplifies
//!   activation-rounding noise into logit differences of 0.1-0.5; with two levels results
//!   stay within ~0.01 of exact arithmetic and no longer depend on summation order (CPU
//!   features, thread counts).
//! - **ggml** ([`Numerics::Ggml`]): `q2 = 0` and GGML's f16 scales, reproducing exactly
//!   the dot products llama.cpp computes against its Q8_0 / Q8_1 activation blocks.

use half::f16;

use super::blocks::*;
use super::round_even;

/// Weight blocks per [`PrepNib`].
pub const NIB_GROUP: usize = 4;
/// Weight blocks per [`PrepQ8`].
pub const Q8_GROUP: usize = 2;
/// Ratio of the first level's step to the second's. A power of two, so the kernels
/// combine levels with a shift. The residual of the first level is at most half a step,
/// so `q2` reaches ±128 only in an exact tie, where it is clamped to ±127 (an error of
/// 1/256 of a step instead of 0).
pub const LEVEL2: i32 = 256;
/// `log2(LEVEL2)`.
pub const LEVEL2_SHIFT: u32 = 8;
/// The shift as the immediate the AVX2 intrinsics take.
pub const LEVEL2_SHIFT_I32: i32 = 8;
const _: () = assert!(1 << LEVEL2_SHIFT == LEVEL2 && LEVEL2_SHIFT_I32 as u32 == LEVEL2_SHIFT);

/// How activations are quantized for the integer kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// Two 8-bit levels: close to exact arithmetic, independent of summation order.
    #[default]
    Precise,
    /// GGML's Q8 activation blocks: the same dot products as llama.cpp.
    Ggml,
}

/// Four activation blocks prepared for nibble weights. Lane `4b + k` (k = 0..4) of a
/// 16-lane i32 sum covers values `4k..4k+4` of block `b` in `lo` and in `hi`.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrepNib {
    /// First level: values 0..16 of each of the four blocks, then values 16..32.
    pub lo: [i8; 64],
    pub hi: [i8; 64],
    /// Second level, same layout.
    pub lo2: [i8; 64],
    pub hi2: [i8; 64],
    /// `d[b] / 256` in lanes `4b..4b+4`: the scale of one unit of the combined integer.
    pub d: [f32; 16],
    /// Per lane, the combined integer sum (`256·Σq1 + Σq2`) of its 8 values: removes an
    /// unsigned weight offset (8 for Q4_0, 16 for Q5_0).
    pub lane_sum: [i32; 16],
    /// `[0, s0, 0, s1, 0, s2, 0, s3]`, `s` = sum of the block's values, to multiply
    /// against weight `[d0, m0, d1, m1, ...]` for the minimum term.
    pub s: [f32; 8],
}

impl Default for PrepNib {
    fn default() -> Self {
        Self {
            lo: [0; 64],
            hi: [0; 64],
            lo2: [0; 64],
            hi2: [0; 64],
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
    pub qs2: [i8; 64],
    /// `d[b] / 256` in lanes `8b..8b+8`.
    pub d: [f32; 16],
    /// `-128 ×` the combined integer sum of each lane's 4 values: undoes the +128 that
    /// makes signed weights unsigned.
    pub neg_corr: [i32; 16],
}

impl Default for PrepQ8 {
    fn default() -> Self {
        Self {
            qs: [0; 64],
            qs2: [0; 64],
            d: [0.0; 16],
            neg_corr: [0; 16],
        }
    }
}

/// One block's two levels, its scale, its value sum, and per group of four values the
/// combined integer sum `LEVEL2·Σq1 + Σq2` (what the kernels' offset corrections use).
struct Levels {
    q1: [i8; QK],
    q2: [i8; QK],
    d: f32,
    sum: f32,
    groups: [i32; 8],
}

/// `LEVEL2·Σq1 + Σq2` over each group of four values.
fn group_sums(q1: &[i8; QK], q2: &[i8; QK]) -> [i32; 8] {
    std::array::from_fn(|m| {
        (4 * m..4 * m + 4)
            .map(|j| LEVEL2 * i32::from(q1[j]) + i32::from(q2[j]))
            .sum()
    })
}

/// Two-level quantization of 32 values: `q1` as GGML's Q8 (d = amax/127), `q2` the residual
/// in steps of d/256. The fast form where the CPU has one, else [`two_levels_scalar`].
fn two_levels(x: &[f32]) -> Levels {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::detected() >= crate::simd::SimdLevel::Avx512 {
        let xb: &[f32; QK] = x.try_into().expect("a block of 32 values");
        let (mut q1, mut q2, mut groups) = ([0; QK], [0; QK], [0; 8]);
        if let Some((d, sum)) = crate::simd::avx512::two_levels(xb, &mut q1, &mut q2, &mut groups) {
            return Levels {
                q1,
                q2,
                d,
                sum,
                groups,
            };
        }
    }
    two_levels_scalar(x)
}

/// The plain twin of [`two_levels`]. The value sum adds `x[j] + x[j+16]`, then folds the
/// 16 partial sums in halves (8, 4, 2, 1): an order a vector unit follows exactly.
fn two_levels_scalar(x: &[f32]) -> Levels {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut s: [f32; 16] = std::array::from_fn(|j| x[j] + x[j + 16]);
    for width in [8, 4, 2, 1] {
        for j in 0..width {
            s[j] += s[j + width];
        }
    }
    let (mut q1, mut q2) = ([0; QK], [0; QK]);
    for (j, &v) in x.iter().enumerate() {
        let a = round_even(v * id).clamp(-127.0, 127.0);
        q1[j] = a as i8;
        q2[j] = round_even((v - a * d) * id * LEVEL2 as f32).clamp(-127.0, 127.0) as i8;
    }
    Levels {
        q1,
        q2,
        d,
        sum: s[0],
        groups: group_sums(&q1, &q2),
    }
}

fn fill_nib(blocks: impl ExactSizeIterator<Item = Levels>, out: &mut [PrepNib]) {
    assert_eq!(out.len(), blocks.len().div_ceil(NIB_GROUP));
    out.fill(PrepNib::default());
    for (i, l) in blocks.enumerate() {
        let (p, b) = (&mut out[i / NIB_GROUP], i % NIB_GROUP);
        p.lo[16 * b..16 * b + 16].copy_from_slice(&l.q1[..16]);
        p.hi[16 * b..16 * b + 16].copy_from_slice(&l.q1[16..]);
        p.lo2[16 * b..16 * b + 16].copy_from_slice(&l.q2[..16]);
        p.hi2[16 * b..16 * b + 16].copy_from_slice(&l.q2[16..]);
        p.d[4 * b..4 * b + 4].fill(l.d / LEVEL2 as f32);
        p.s[2 * b + 1] = l.sum;
        for k in 0..4 {
            p.lane_sum[4 * b + k] = l.groups[k] + l.groups[k + 4];
        }
    }
}

fn fill_q8(blocks: impl ExactSizeIterator<Item = Levels>, out: &mut [PrepQ8]) {
    assert_eq!(out.len(), blocks.len().div_ceil(Q8_GROUP));
    out.fill(PrepQ8::default());
    for (i, l) in blocks.enumerate() {
        let (p, b) = (&mut out[i / Q8_GROUP], i % Q8_GROUP);
        p.qs[32 * b..32 * b + 32].copy_from_slice(&l.q1);
        p.qs2[32 * b..32 * b + 32].copy_from_slice(&l.q2);
        p.d[8 * b..8 * b + 8].fill(l.d / LEVEL2 as f32);
        for k in 0..8 {
            p.neg_corr[8 * b + k] = -128 * l.groups[k];
        }
    }
}

/// GGML's blocks as one level: the values and f16 scales llama.cpp multiplies with.
fn ggml_level(d: f16, qs: &[i8; QK], s: f16) -> Levels {
    Levels {
        q1: *qs,
        q2: [0; QK],
        d: d.to_f32(),
        sum: s.to_f32(),
        groups: group_sums(qs, &[0; QK]),
    }
}

/// Precise preparation of f32 activations for nibble weights.
pub fn prepare_nib_f32(x: &[f32], out: &mut [PrepNib]) {
    assert!(x.len().is_multiple_of(QK));
    fill_nib(x.chunks_exact(QK).map(two_levels), out);
}

/// Precise preparation of f32 activations for Q8_0 weights.
pub fn prepare_q8_f32(x: &[f32], out: &mut [PrepQ8]) {
    assert!(x.len().is_multiple_of(QK));
    fill_q8(x.chunks_exact(QK).map(two_levels), out);
}

/// GGML numerics: Q8_0 activation blocks for Q4_0 / Q5_0 weights.
pub fn prepare_nib_q8_0(a: &[BlockQ8_0], out: &mut [PrepNib]) {
    fill_nib(a.iter().map(|b| ggml_level(b.d, &b.qs, f16::ZERO)), out);
}

/// GGML numerics: Q8_1 activation blocks for Q4_1 / Q5_1 weights (the minimum term uses
/// GGML's f16 block sum `s`).
pub fn prepare_nib_q8_1(a: &[BlockQ8_1], out: &mut [PrepNib]) {
    fill_nib(a.iter().map(|b| ggml_level(b.d, &b.qs, b.s)), out);
}

/// GGML numerics: Q8_0 activation blocks for Q8_0 weights.
pub fn prepare_q8(a: &[BlockQ8_0], out: &mut [PrepQ8]) {
    fill_q8(a.iter().map(|b| ggml_level(b.d, &b.qs, f16::ZERO)), out);
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

macro_rules! nib_block {
    ($t:ty, offset = $off:expr, min = $min:tt, qh = $qh:tt) => {
        impl NibBlock for $t {
            const OFFSET: i32 = $off;
            const HAS_MIN: bool = $min;
            const HAS_QH: bool = $qh;
            fn dm_bits(&self) -> u32 {
                nib_block!(@dm self, $min)
            }
            fn nibbles(&self) -> &[u8; 16] {
                &self.qs
            }
            fn high_bits(&self) -> u32 {
                nib_block!(@qh self, $qh)
            }
        }
    };
    (@dm $s:ident, true) => { u32::from($s.d.to_bits()) | (u32::from($s.m.to_bits()) << 16) };
    (@dm $s:ident, false) => { u32::from($s.d.to_bits()) };
    (@qh $s:ident, true) => { u32::from_le_bytes($s.qh) };
    (@qh $s:ident, false) => { 0 };
}
nib_block!(BlockQ4_0, offset = 8, min = false, qh = false);
nib_block!(BlockQ4_1, offset = 0, min = true, qh = false);
nib_block!(BlockQ5_0, offset = 16, min = false, qh = true);
nib_block!(BlockQ5_1, offset = 0, min = true, qh = true);

/// Scalar dot product of nibble weights with prepared activations (the twin of the SIMD
/// prepared kernels, in either numerics).
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
            let (x1, x2) = (16 * b + j, 16 * b + j);
            sum += (lo - W::OFFSET) * (LEVEL2 * i32::from(p.lo[x1]) + i32::from(p.lo2[x1]));
            sum += (hi - W::OFFSET) * (LEVEL2 * i32::from(p.hi[x2]) + i32::from(p.hi2[x2]));
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
            .map(|j| {
                let x = 32 * b + j;
                i32::from(wb.qs[j]) * (LEVEL2 * i32::from(p.qs[x]) + i32::from(p.qs2[x]))
            })
            .sum();
        acc += wb.d.to_f32() * p.d[8 * b] * sum as f32;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn same(a: &Levels, b: &Levels) -> bool {
        a.q1 == b.q1
            && a.q2 == b.q2
            && a.d.to_bits() == b.d.to_bits()
            && a.sum.to_bits() == b.sum.to_bits()
    }

    /// The fast two-level quantizer against its twin, bit for bit: random blocks of
    /// varied scales, exact ties, zeros, tiny and huge values, and non-finite values
    /// (which the fast form hands back to the twin).
    #[test]
    fn two_levels_match_the_twin_bit_for_bit() {
        let mut rng = Rng::new(11);
        let mut blocks: Vec<Vec<f32>> = (0..2000).map(|_| rng.varied(QK, QK)).collect();
        blocks.push(vec![0.0; QK]);
        blocks.push((0..QK).map(|j| j as f32 - 15.5).collect());
        // Ties of the first level: amax 127, so x·id = x.
        blocks.push(
            (0..QK)
                .map(|j| if j == 0 { 127.0 } else { j as f32 + 0.5 })
                .collect(),
        );
        blocks.push((0..QK).map(|j| 1e-42 * (j as f32 - 3.0)).collect());
        blocks.push((0..QK).map(|j| 3e37 * (j as f32 - 16.0)).collect());
        let mut nan = rng.varied(QK, QK);
        nan[7] = f32::NAN;
        blocks.push(nan);
        let mut inf = rng.varied(QK, QK);
        inf[30] = f32::NEG_INFINITY;
        blocks.push(inf);
        for x in &blocks {
            let (fast, twin) = (two_levels(x), two_levels_scalar(x));
            assert!(same(&fast, &twin), "block {x:?}");
        }
        let exact: f32 = blocks[0].iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
        assert!((two_levels(&blocks[0]).sum - exact).abs() <= 1e-5 * exact.abs().max(1.0));
    }
}
