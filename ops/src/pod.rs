//! Plain-old-data element types and zero-copy casts from bytes.

use half::{bf16, f16};

use crate::dtype::GgmlType;

/// A type for which every bit pattern of `size_of::<Self>()` bytes is a valid value and
/// which has no padding, so a byte slice can be viewed as a slice of it.
///
/// # Safety
/// Implementors must be `#[repr(C)]` (or primitive) with no padding bytes and no invalid
/// bit patterns.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

/// A tensor element type with its GGML type: a float, an integer, or a quantized block.
pub trait TensorElement: Pod {
    const DTYPE: GgmlType;
}

macro_rules! primitive {
    ($($t:ty => $d:ident),*) => {$(
        // SAFETY: primitive numeric types have no padding and no invalid bit patterns.
        unsafe impl Pod for $t {}
        impl TensorElement for $t { const DTYPE: GgmlType = GgmlType::$d; }
    )*};
}
primitive!(f32 => F32, f16 => F16, bf16 => BF16, f64 => F64, i8 => I8, i16 => I16, i32 => I32, i64 => I64);
// SAFETY: as above.
unsafe impl Pod for u8 {}

/// Views `bytes` as `&[T]`; `None` when the address is not aligned for `T` or the length is
/// not a whole number of `T`.
pub fn cast_slice<T: Pod>(bytes: &[u8]) -> Option<&[T]> {
    let size = size_of::<T>();
    if size == 0
        || !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(align_of::<T>())
    {
        return None;
    }
    // SAFETY: alignment and length were checked above; `T: Pod` accepts any bit pattern;
    // the lifetime is tied to `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Views `&[T]` as its bytes.
pub fn as_bytes<T: Pod>(items: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so every byte is initialized; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), std::mem::size_of_val(items)) }
}

/// Views `&mut [T]` as mutable bytes.
pub fn as_bytes_mut<T: Pod>(items: &mut [T]) -> &mut [u8] {
    // SAFETY: as `as_bytes`; any bytes written back are a valid `T` because `T: Pod`.
    unsafe {
        std::slice::from_raw_parts_mut(
            items.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(items),
        )
    }
}
