//! The float weight types F32, F16 and BF16 as one-element "blocks". Each is multiplied
//! against activations of its own type, as GGML does.

use half::{bf16, f16};

use super::{Block, DotFn, WeightBlock};
use crate::simd::SimdLevel;

impl Block for f32 {
    const LEN: usize = 1;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        out.copy_from_slice(blocks);
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        out.copy_from_slice(x);
    }
}

impl Block for f16 {
    const LEN: usize = 1;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len());
        for (y, x) in out.iter_mut().zip(blocks) {
            *y = x.to_f32();
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(out.len(), x.len());
        for (y, &x) in out.iter_mut().zip(x) {
            *y = f16::from_f32(x);
        }
    }
}

impl Block for bf16 {
    const LEN: usize = 1;

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(out.len(), blocks.len());
        for (y, x) in out.iter_mut().zip(blocks) {
            *y = x.to_f32();
        }
    }

    fn quantize(x: &[f32], out: &mut [Self]) {
        assert_eq!(out.len(), x.len());
        for (y, &x) in out.iter_mut().zip(x) {
            *y = bf16::from_f32(x);
        }
    }
}

impl WeightBlock for f32 {
    type Act = f32;
    type Prep = f32;
    const PREP_BLOCKS: usize = 1;

    fn prepare_ggml(a: &[f32], out: &mut [f32]) {
        out.copy_from_slice(a);
    }

    fn dot_scalar(w: &[f32], a: &[f32]) -> f32 {
        assert_eq!(w.len(), a.len());
        w.iter().zip(a).map(|(w, a)| w * a).sum()
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, float dot_f32, Self::dot_scalar)
    }
}

impl WeightBlock for f16 {
    type Act = f16;
    type Prep = f16;
    const PREP_BLOCKS: usize = 1;

    fn prepare_ggml(a: &[f16], out: &mut [f16]) {
        out.copy_from_slice(a);
    }

    fn dot_scalar(w: &[f16], a: &[f16]) -> f32 {
        assert_eq!(w.len(), a.len());
        w.iter().zip(a).map(|(w, a)| w.to_f32() * a.to_f32()).sum()
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, float dot_f16, Self::dot_scalar)
    }
}

impl WeightBlock for bf16 {
    type Act = bf16;
    type Prep = bf16;
    const PREP_BLOCKS: usize = 1;

    fn prepare_ggml(a: &[bf16], out: &mut [bf16]) {
        out.copy_from_slice(a);
    }

    fn dot_scalar(w: &[bf16], a: &[bf16]) -> f32 {
        assert_eq!(w.len(), a.len());
        w.iter().zip(a).map(|(w, a)| w.to_f32() * a.to_f32()).sum()
    }

    fn dot_kernel(level: SimdLevel) -> DotFn<Self> {
        crate::simd::dispatch!(level, float dot_bf16, Self::dot_scalar)
    }
}
