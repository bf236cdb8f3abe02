//! The 32-element quant types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the Q8_1 activation type:
//! reference dequantization, quantization and dot products.

use half::f16;

use super::blocks::*;
use super::prep::{self, NibBlock, PrepNib, PrepQ8};
use super::{Block, DotFn, RowKernel, WeightBlock, round_even, signed_absmax};
use crate::simd::SimdLevel;

const H: usize = QK / 2;

impl Block for BlockQ4_0 {
    const LEN: usize = QK;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = b.d.to_f32();
            for j in 0..H {
                y[j] = ((b.qs[j] & 0xf) as i32 - 8) as f32 * d;
                y[j + H] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // The extreme value maps to -8, the one level without a positive twin.
            let max = signed_absmax(x);
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |v: f32| (round_even(v * id) + 8.0).clamp(0.0, 15.0) as u8;
            b.d = f16::from_f32(d);
            for j in 0..H {
                b.qs[j] = q(x[j]) | (q(x[j + H]) << 4);
            }
        }
    }
}

impl Block for BlockQ4_1 {
    const LEN: usize = QK;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            for j in 0..H {
                y[j] = (b.qs[j] & 0xf) as f32 * d + m;
                y[j + H] = (b.qs[j] >> 4) as f32 * d + m;
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (min, max) = min_max(x);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |v: f32| round_even((v - min) * id).clamp(0.0, 15.0) as u8;
            b.d = f16::from_f32(d);
            b.m = f16::from_f32(min);
            for j in 0..H {
                b.qs[j] = q(x[j]) | (q(x[j + H]) << 4);
            }
        }
    }
}

/// Bit 4 of element `j` of a Q5 block.
#[inline]
fn q5_high(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) << 4) as u8
}

impl Block for BlockQ5_0 {
    const LEN: usize = QK;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = b.d.to_f32();
            let qh = u32::from_le_bytes(b.qh);
            for j in 0..H {
                let lo = (b.qs[j] & 0xf) | q5_high(qh, j);
                let hi = (b.qs[j] >> 4) | q5_high(qh, j + H);
                y[j] = (lo as i32 - 16) as f32 * d;
                y[j + H] = (hi as i32 - 16) as f32 * d;
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let max = signed_absmax(x);
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: [u8; QK] =
                std::array::from_fn(|j| (round_even(x[j] * id) + 16.0).clamp(0.0, 31.0) as u8);
            b.d = f16::from_f32(d);
            pack_q5(&q, &mut b.qs, &mut b.qh);
        }
    }
}

impl Block for BlockQ5_1 {
    const LEN: usize = QK;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            let qh = u32::from_le_bytes(b.qh);
            for j in 0..H {
                let lo = (b.qs[j] & 0xf) | q5_high(qh, j);
                let hi = (b.qs[j] >> 4) | q5_high(qh, j + H);
                y[j] = lo as f32 * d + m;
                y[j + H] = hi as f32 * d + m;
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (min, max) = min_max(x);
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: [u8; QK] =
                std::array::from_fn(|j| round_even((x[j] - min) * id).clamp(0.0, 31.0) as u8);
            b.d = f16::from_f32(d);
            b.m = f16::from_f32(min);
            pack_q5(&q, &mut b.qs, &mut b.qh);
        }
    }
}

/// Packs 32 five-bit values: low nibbles into `qs`, bit 4 of element `j` into bit `j` of `qh`.
fn pack_q5(q: &[u8; QK], qs: &mut [u8; H], qh: &mut [u8; 4]) {
    let mut bits = 0u32;
    for j in 0..H {
        qs[j] = (q[j] & 0xf) | ((q[j + H] & 0xf) << 4);
        bits |= u32::from(q[j] >> 4) << j;
        bits |= u32::from(q[j + H] >> 4) << (j + H);
    }
    *qh = bits.to_le_bytes();
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Quantizes 32 values to 8 bits with `d = amax / 127`; returns `d` and the sum of the
/// quantized values.
fn quantize_q8(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = round_even(v * id).clamp(-127.0, 127.0) as i8;
        sum += i32::from(*q);
    }
    (d, sum)
}

impl Block for BlockQ8_0 {
    const LEN: usize = QK;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = b.d.to_f32();
            for (y, &q) in y.iter_mut().zip(&b.qs) {
                *y = f32::from(q) * d;
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (d, _) = quantize_q8(x, &mut b.qs);
            b.d = f16::from_f32(d);
        }
    }
}

impl Block for BlockQ8_1 {
    const LEN: usize = QK;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len() * QK);
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = b.d.to_f32();
            for (y, &q) in y.iter_mut().zip(&b.qs) {
                *y = f32::from(q) * d;
            }
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(x.len(), out.len() * QK);
        for (x, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (d, sum) = quantize_q8(x, &mut b.qs);
            b.d = f16::from_f32(d);
            b.s = f16::from_f32(d * sum as f32);
        }
    }
}

/// Σ over j of `w(j) * a.qs[j]` for integer-valued weights.
#[inline]
fn idot(w: impl Fn(usize) -> i32, a: &[i8; QK]) -> i32 {
    (0..QK).map(|j| w(j) * i32::from(a[j])).sum()
}

/// GGML's 8-bit activation blocks as the twins read them.
trait Q8Act {
    fn d(&self) -> f32;
    fn qs(&self) -> &[i8; QK];
    /// `d·Σq` stored with the block (Q8_1), 0 where the type has none (Q8_0).
    fn s(&self) -> f32;
}

impl Q8Act for BlockQ8_0 {
    fn d(&self) -> f32 {
        self.d.to_f32()
    }
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
    fn s(&self) -> f32 {
        0.0
    }
}

impl Q8Act for BlockQ8_1 {
    fn d(&self) -> f32 {
        self.d.to_f32()
    }
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
    fn s(&self) -> f32 {
        self.s.to_f32()
    }
}

/// The GGML dot product of nibble weights with 8-bit activation blocks, per block:
/// `d_w·d_a·Σ(level − offset)·q + m_w·s_a` (the scalar twin of every kernel).
fn ggml_nib_dot<W: NibBlock, A: Q8Act>(w: &[W], a: &[A]) -> f32 {
    assert_eq!(w.len(), a.len());
    let mut acc = 0.0f32;
    for (w, a) in w.iter().zip(a) {
        let (qs, qh) = (w.nibbles(), w.high_bits());
        let level = |j: usize| {
            let byte = qs[j % H];
            let nib = if j < H { byte & 0xf } else { byte >> 4 };
            i32::from(nib | q5_high(qh, j)) - W::OFFSET
        };
        let dm = w.dm_bits();
        let (d, m) = (
            f16::from_bits(dm as u16).to_f32(),
            f16::from_bits((dm >> 16) as u16).to_f32(),
        );
        acc += d * a.d() * idot(level, a.qs()) as f32 + m * a.s();
    }
    acc
}

/// The weight-block implementation shared by Q4_0, Q4_1, Q5_0 and Q5_1.
macro_rules! nib_weight {
    ($t:ident, $act:ty, $prepare_ggml:ident) => {
        impl WeightBlock for $t {
            type Act = $act;
            type Prep = PrepNib;
            const PREP_BLOCKS: usize = prep::NIB_GROUP;

            fn prepare_ggml(a: &[$act], out: &mut [PrepNib]) {
                prep::$prepare_ggml(a, out);
            }

            fn prepare_precise(x: &[f32], _: &mut Vec<$act>, out: &mut [PrepNib]) {
                prep::prepare_nib_f32(x, out);
            }

            fn dot_scalar(w: &[Self], a: &[$act]) -> f32 {
                ggml_nib_dot(w, a)
            }

            fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
                crate::simd::dispatch!(level, int dot_nib::<$t>, prep::dot_nib_scalar::<$t>)
            }

            fn row_kernel(level: SimdLevel) -> RowKernel<Self> {
                crate::simd::dispatch_rows!(level, rows_nib, rows_nib_at::<$t>, Self::dot_kernel(level))
            }
        }
    };
}
nib_weight!(BlockQ4_0, BlockQ8_0, prepare_nib_q8_0);
nib_weight!(BlockQ4_1, BlockQ8_1, prepare_nib_q8_1);
nib_weight!(BlockQ5_0, BlockQ8_0, prepare_nib_q8_0);
nib_weight!(BlockQ5_1, BlockQ8_1, prepare_nib_q8_1);

impl WeightBlock for BlockQ8_0 {
    type Act = BlockQ8_0;
    type Prep = PrepQ8;
    const PREP_BLOCKS: usize = prep::Q8_GROUP;

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
            acc += w.d.to_f32() * a.d.to_f32() * idot(|j| i32::from(w.qs[j]), &a.qs) as f32;
        }
        acc
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, int dot_q8, prep::dot_q8_scalar)
    }

    fn row_kernel(level: SimdLevel) -> RowKernel<Self> {
        crate::simd::dispatch_rows!(level, rows_q8, rows_q8_at, Self::dot_kernel(level))
    }
}
