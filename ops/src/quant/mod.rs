//! GGML quantized blocks: layouts, dequantization, quantization and the dot products
//! against the activation format GGML pairs with each weight type.
//!
//! Inner loops are static: a [`Block`] trait (layout, dequantize, quantize) and a
//! [`WeightBlock`] trait (activation type, scalar twin, SIMD kernel by level). The load
//! boundary is the [`WeightType`] enum, matched exhaustively wherever a type must be
//! handled.

pub mod axpy;
mod blocks;
mod float;
mod iq4;
mod kquant;
mod kquant_low;
mod legacy;
pub mod prep;

pub use axpy::{AxpyBlock, AxpyFn, axpy_scalar};
pub use blocks::*;
pub use iq4::dot_iq4nl_prep_scalar;
pub(crate) use iq4::iq4xs_scale;
pub(crate) use kquant::kquant_scales;
pub(crate) use kquant_low::q3_scales;
pub use prep::{Numerics, PrepNib, PrepQ8};

use crate::dtype::GgmlType;
use crate::pod::TensorElement;
use crate::simd::SimdLevel;

/// A unit of `LEN` elements stored together: a quantized block, or one float.
pub trait Block: TensorElement + Default {
    /// Elements per block.
    const LEN: usize;

    /// `out.len() == blocks.len() * LEN`.
    fn dequantize(blocks: &[Self], out: &mut [f32]);

    /// `x.len() == out.len() * LEN`. Quantizers round to nearest, ties to even, and
    /// never produce the value -128 in 8-bit blocks.
    fn quantize(x: &[f32], out: &mut [Self]);
}

/// A dot product of `n` weight blocks with the prepared activation of `n` blocks.
pub type DotFn<W> = fn(&[W], &[<W as WeightBlock>::Prep]) -> f32;

/// Rows of weights times one prepared activation row: `out[r] = w[r] · a`, `w` being
/// `out.len()` whole rows.
pub type RowsFn<W> = fn(&[W], &[<W as WeightBlock>::Prep], &mut [f32]);

/// Scattered rows times one prepared activation row: `out[k] = row idx[k] · a`, rows of
/// `bpr` blocks taken from the matrix `w`; the same bits as [`RowsFn`] on those rows.
pub type RowsAtFn<W> = fn(&[W], usize, &[u32], &[<W as WeightBlock>::Prep], &mut [f32]);

/// How a level computes many rows: a kernel that takes several rows at once (sharing
/// activation loads and reductions), or the one-row dot product in a loop. Either gives
/// each row the same bits as the one-row kernel of that level.
pub enum RowKernel<W: WeightBlock> {
    Rows(RowsFn<W>, RowsAtFn<W>),
    Dot(DotFn<W>),
}

impl<W: WeightBlock> RowKernel<W> {
    pub fn run(&self, w: &[W], a: &[W::Prep], out: &mut [f32]) {
        match self {
            Self::Rows(f, _) => f(w, a, out),
            Self::Dot(f) => {
                let bpr = w.len() / out.len().max(1);
                for (o, row) in out.iter_mut().zip(w.chunks_exact(bpr)) {
                    *o = f(row, a);
                }
            }
        }
    }
}

/// A block type that weights are stored in, with the activation format GGML multiplies
/// it against (`Q8_0`, `Q8_1`, `Q8_K`, or the float type itself), and the prepared form of
/// that activation the fast kernels read.
pub trait WeightBlock: Block {
    /// GGML's activation block for this weight type; same `LEN` as `Self`.
    type Act: Block;

    /// The activation rearranged for the kernels (`Act` itself for most types).
    type Prep: Copy + Default + Send + Sync + 'static;

    /// Weight blocks covered by one `Prep` unit.
    const PREP_BLOCKS: usize;

    /// GGML numerics: rearranges GGML's activation blocks without changing their values,
    /// so prepared kernels compute what `dot_scalar` computes.
    /// `out.len() == a.len().div_ceil(PREP_BLOCKS)`.
    fn prepare_ggml(a: &[Self::Act], out: &mut [Self::Prep]);

    /// Precise numerics from f32 activations (see [`prep`]); types without a finer form
    /// quantize as GGML does, through `scratch`.
    fn prepare_precise(x: &[f32], scratch: &mut Vec<Self::Act>, out: &mut [Self::Prep]) {
        scratch.clear();
        scratch.resize(x.len() / Self::Act::LEN, Self::Act::default());
        Self::Act::quantize(x, scratch);
        Self::prepare_ggml(scratch, out);
    }

    /// The plain reference dot product on GGML's activation blocks: the slow twin every
    /// kernel is tested against.
    fn dot_scalar(w: &[Self], a: &[Self::Act]) -> f32;

    /// The fastest kernel usable at `level` (falling back to lower levels).
    fn dot_kernel(level: SimdLevel) -> DotFn<Self>;

    /// The many-row form of `dot_kernel(level)`.
    fn row_kernel(level: SimdLevel) -> RowKernel<Self> {
        RowKernel::Dot(Self::dot_kernel(level))
    }
}

/// Prepared units per row of `n_blocks` weight blocks.
pub fn prep_len<W: WeightBlock>(n_blocks: usize) -> usize {
    n_blocks.div_ceil(W::PREP_BLOCKS)
}

/// Prepares f32 activations for `W` in the given numerics (allocating; the engine keeps
/// its own buffers).
pub fn prepare_f32<W: WeightBlock>(x: &[f32], numerics: Numerics) -> Vec<W::Prep> {
    let mut act = Vec::new();
    let mut out = vec![W::Prep::default(); prep_len::<W>(x.len() / W::LEN)];
    match numerics {
        Numerics::Precise => W::prepare_precise(x, &mut act, &mut out),
        Numerics::Ggml => {
            act.resize(x.len() / W::Act::LEN, W::Act::default());
            W::Act::quantize(x, &mut act);
            W::prepare_ggml(&act, &mut out);
        }
    }
    out
}

/// The weight types the CPU kernels compute with: the load boundary. Every other GGML
/// type is refused where a weight is loaded.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    Q2_K,
    Q3_K,
    IQ4_NL,
    IQ4_XS,
}

impl WeightType {
    pub const ALL: [WeightType; 15] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q2_K,
        Self::Q3_K,
        Self::IQ4_NL,
        Self::IQ4_XS,
    ];

    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        Some(match t {
            GgmlType::F32 => Self::F32,
            GgmlType::F16 => Self::F16,
            GgmlType::BF16 => Self::BF16,
            GgmlType::Q4_0 => Self::Q4_0,
            GgmlType::Q4_1 => Self::Q4_1,
            GgmlType::Q5_0 => Self::Q5_0,
            GgmlType::Q5_1 => Self::Q5_1,
            GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q4_K => Self::Q4_K,
            GgmlType::Q5_K => Self::Q5_K,
            GgmlType::Q6_K => Self::Q6_K,
            GgmlType::Q2_K => Self::Q2_K,
            GgmlType::Q3_K => Self::Q3_K,
            GgmlType::IQ4_NL => Self::IQ4_NL,
            GgmlType::IQ4_XS => Self::IQ4_XS,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::BF16 => GgmlType::BF16,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_K => GgmlType::Q4_K,
            Self::Q5_K => GgmlType::Q5_K,
            Self::Q6_K => GgmlType::Q6_K,
            Self::Q2_K => GgmlType::Q2_K,
            Self::Q3_K => GgmlType::Q3_K,
            Self::IQ4_NL => GgmlType::IQ4_NL,
            Self::IQ4_XS => GgmlType::IQ4_XS,
        }
    }

    /// The activation format the weights are multiplied against.
    pub fn act_type(self) -> ActType {
        match self {
            Self::F32 => ActType::F32,
            Self::F16 => ActType::F16,
            Self::BF16 => ActType::BF16,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 | Self::IQ4_NL => ActType::Q8_0,
            Self::Q4_1 | Self::Q5_1 => ActType::Q8_1,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::IQ4_XS => {
                ActType::Q8_K
            }
        }
    }
}

/// Activation formats (what an f32 activation row is converted to before a dot product).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q8_1,
    Q8_K,
}

/// Rounds to nearest, ties to even, as GGML's SIMD quantizers do.
///
/// Adding and subtracting 1.5·2^23 rounds in the FPU's default mode (nearest-even) without
/// a library call (`f32::round_ties_even` compiles to `rintf` on baseline x86-64, and the
/// quantizers run on the per-token path). Exact for |x| < 2^22; larger values are already
/// integers or out of every quantizer's range and pass through.
#[inline]
pub(crate) fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if x.abs() < 4_194_304.0 {
        (x + MAGIC) - MAGIC
    } else {
        x
    }
}

/// The element with the largest magnitude, keeping its sign (0 for an empty slice).
#[inline]
pub(crate) fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = 0.0f32;
    for &v in x {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod round_tests {
    #[test]
    fn round_even_matches_the_library_on_ties_and_randoms() {
        let mut rng = crate::rng::Rng::new(5);
        for x in [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            127.49,
            -127.5,
            0.0,
            -0.0,
            4_194_303.5,
        ] {
            assert_eq!(super::round_even(x), x.round_ties_even(), "{x}");
        }
        for _ in 0..100_000 {
            let x = rng.uniform(-300.0, 300.0);
            assert_eq!(super::round_even(x), x.round_ties_even(), "{x}");
        }
    }
}
