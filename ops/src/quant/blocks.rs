//! GGML's quantized block layouts, byte for byte. Each struct is `#[repr(C)]` and its
//! size is checked at compile time against the size GGUF files use.

use half::f16;

use crate::dtype::{GgmlType, QK_K};
use crate::pod::{Pod, TensorElement};

/// Elements per block of the 32-element ("legacy") quant types.
pub const QK: usize = 32;

/// 4-bit, one scale: `x = (q - 8) * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    /// Element `j` in the low nibble of `qs[j]`, element `j + 16` in the high nibble.
    pub qs: [u8; QK / 2],
}

/// 4-bit, scale and minimum: `x = q * d + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// 5-bit, one scale: `x = (q - 16) * d`; bit `j` of `qh` is bit 4 of element `j`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 5-bit, scale and minimum: `x = q * d + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 8-bit, one scale: `x = q * d`. A weight type and the activation type of Q4_0/Q5_0/Q8_0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 8-bit with the block sum: the activation type of Q4_1/Q5_1. `s = d * sum(qs)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

/// Size of the packed 6-bit scales and minimums of Q4_K / Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// 4-bit k-quant: 8 sub-blocks of 32, each with a 6-bit scale and minimum;
/// `x = d * sc * q - dmin * m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    /// Per 64 elements, 32 bytes: low nibbles are the first 32, high nibbles the next 32.
    pub qs: [u8; QK_K / 2],
}

/// 5-bit k-quant: Q4_K plus one high bit per element in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 6-bit k-quant: 16 sub-blocks of 16 with signed 8-bit scales; `x = d * sc * (q - 32)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// 8-bit activation type of the k-quants, with sums of each 16 values.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// 2-bit k-quant: 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit minimum;
/// `x = d * (sc & 0xf) * q - dmin * (sc >> 4)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ2K {
    /// Per sub-block: scale in the low nibble, minimum in the high nibble.
    pub scales: [u8; QK_K / 16],
    /// Per 128 elements, 32 bytes: element `32j + l` of the half in bits `2j..2j+2` of
    /// byte `l`.
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}

/// 3-bit k-quant: 16 sub-blocks of 16 with 6-bit scales stored minus 32;
/// `x = d * (sc - 32) * (q - 4)`, `q` the two bits of `qs` (laid out as Q2_K's) plus a
/// third from `hmask`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ3K {
    /// Bit `m` of byte `l` is the high bit of element `32m + l`.
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    /// Sixteen 6-bit scales: low nibbles in bytes 0..8 (scales 0..8 low, 8..16 high
    /// nibble), top two bits in bytes 8..12 (scale `i` at bit `2 (i / 4)` of byte
    /// `8 + i % 4`).
    pub scales: [u8; 12],
    pub d: f16,
}

/// The 16 levels of the non-linear 4-bit types, GGML's `kvalues_iq4nl`.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Non-linear 4-bit, one scale: `x = d * KVALUES_IQ4NL[q]`; element `j` in the low
/// nibble of `qs[j]`, element `j + 16` in the high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockIQ4NL {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// Non-linear 4-bit with 8 sub-blocks of 32, each with a 6-bit scale stored minus 32:
/// `x = d * (ls - 32) * KVALUES_IQ4NL[q]`, sub-blocks packed as [`BlockIQ4NL`]'s `qs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockIQ4XS {
    pub d: f16,
    /// Bits `2ib..2ib+2`: the top two bits of sub-block `ib`'s scale.
    pub scales_h: u16,
    /// The low four bits of sub-block `ib`'s scale in nibble `ib % 2` of byte `ib / 2`.
    pub scales_l: [u8; QK_K / 64],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ8_1>() == 36);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockQ5K>() == 176);
const _: () = assert!(size_of::<BlockQ6K>() == 210);
const _: () = assert!(size_of::<BlockQ8K>() == 292);
const _: () = assert!(size_of::<BlockQ2K>() == 84);
const _: () = assert!(size_of::<BlockQ3K>() == 110);
const _: () = assert!(size_of::<BlockIQ4NL>() == 18);
const _: () = assert!(size_of::<BlockIQ4XS>() == 136);

macro_rules! block_element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        // SAFETY: `#[repr(C)]` structs of f16/f32/integer arrays whose sizes (checked
        // above) equal the sum of their fields: no padding, and every bit pattern valid.
        unsafe impl Pod for $t {}
        impl TensorElement for $t { const DTYPE: GgmlType = GgmlType::$d; }
        const _: () = assert!(size_of::<$t>() == GgmlType::$d.block_bytes_const());
    )*};
}
block_element!(
    BlockQ4_0 => Q4_0,
    BlockQ4_1 => Q4_1,
    BlockQ5_0 => Q5_0,
    BlockQ5_1 => Q5_1,
    BlockQ8_0 => Q8_0,
    BlockQ8_1 => Q8_1,
    BlockQ4K => Q4_K,
    BlockQ5K => Q5_K,
    BlockQ6K => Q6_K,
    BlockQ8K => Q8_K,
    BlockQ2K => Q2_K,
    BlockQ3K => Q3_K,
    BlockIQ4NL => IQ4_NL,
    BlockIQ4XS => IQ4_XS,
);

impl Default for BlockQ8_0 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            qs: [0; QK],
        }
    }
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            s: f16::ZERO,
            qs: [0; QK],
        }
    }
}

impl Default for BlockQ4K {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            dmin: f16::ZERO,
            scales: [0; K_SCALE_SIZE],
            qs: [0; QK_K / 2],
        }
    }
}

impl Default for BlockQ5K {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            dmin: f16::ZERO,
            scales: [0; K_SCALE_SIZE],
            qh: [0; QK_K / 8],
            qs: [0; QK_K / 2],
        }
    }
}

impl Default for BlockQ6K {
    fn default() -> Self {
        Self {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; QK_K / 16],
            d: f16::ZERO,
        }
    }
}

impl Default for BlockQ8K {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

impl Default for BlockQ2K {
    fn default() -> Self {
        Self {
            scales: [0; QK_K / 16],
            qs: [0; QK_K / 4],
            d: f16::ZERO,
            dmin: f16::ZERO,
        }
    }
}

impl Default for BlockQ3K {
    fn default() -> Self {
        Self {
            hmask: [0; QK_K / 8],
            qs: [0; QK_K / 4],
            scales: [0; 12],
            d: f16::ZERO,
        }
    }
}

impl Default for BlockIQ4XS {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            scales_h: 0,
            scales_l: [0; QK_K / 64],
            qs: [0; QK_K / 2],
        }
    }
}
