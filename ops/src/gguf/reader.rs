//! Parsing and validation of a GGUF header from bytes.
//!
//! Every count and length read from the file is checked against the bytes that remain
//! before anything is allocated from it, so a hostile file can neither panic the reader
//! nor make it reserve more memory than the file is long.

use std::collections::HashSet;

use super::error::GgufError;
use super::value::{Array, Metadata, Value, ValueType};
use super::{GgufHeader, KEY_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, Magic, TensorInfo};
use crate::dtype::GgmlType;

/// Default alignment of the data section and of tensor offsets.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Smallest encoding of a metadata key/value: key length (8), type (4), one byte of value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Smallest encoding of a tensor info: name length (8), n_dims (4), one dim (8), type (4),
/// offset (8).
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 8 + 4 + 8;

/// A bounds-checked little-endian reader over the header bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, field: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                field: field(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        let n = n as usize; // fits: n <= remaining, which is a usize
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(
        &mut self,
        field: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u32(&mut self, field: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array::<4>(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array::<8>(field).map(u64::from_le_bytes)
    }

    /// A count of items that each take at least `min_size` bytes: refused when the rest
    /// of the file could not hold that many.
    fn count(&mut self, min_size: u64, field: impl Fn() -> String) -> Result<u64, GgufError> {
        let count = self.u64(&field)?;
        let available = self.remaining();
        if count > available / min_size.max(1) {
            return Err(GgufError::CountTooLarge {
                field: field(),
                count,
                available,
                min_size,
            });
        }
        Ok(count)
    }

    fn string(&mut self, field: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("{} length", field()))?;
        let bytes = self.take(len, &field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { field: field() }),
        }
    }

    fn value_type(&mut self, field: impl Fn() -> String) -> Result<ValueType, GgufError> {
        let type_id = self.u32(|| format!("{} type", field()))?;
        ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            field: field(),
            type_id,
        })
    }

    fn value(&mut self, ty: ValueType, field: &dyn Fn() -> String) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(field)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(field)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(field)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(field)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            ValueType::Bool => Value::Bool(self.bool(field)?),
            ValueType::String => Value::String(self.string(field)?),
            ValueType::Array => Value::Array(self.array_value(field, 1)?),
        })
    }

    fn bool(&mut self, field: &dyn Fn() -> String) -> Result<bool, GgufError> {
        match self.array::<1>(field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool {
                field: field(),
                byte,
            }),
        }
    }

    /// An array value (element type, count, elements) at nesting depth `depth`.
    fn array_value(
        &mut self,
        field: &dyn Fn() -> String,
        depth: usize,
    ) -> Result<Array, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                field: field(),
                depth,
                max: MAX_ARRAY_DEPTH,
            });
        }
        let elem = self.value_type(|| format!("{} element", field()))?;
        let n = self.count(elem.min_encoded_size() as u64, || {
            format!("{} element count", field())
        })?;
        // `n` elements of at least one byte each fit in the remaining bytes, so `n` fits
        // in usize and the reservations below are bounded by the file length.
        let n = n as usize;

        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let size = size_of::<$t>();
                let raw = self.take((n * size) as u64, field)?;
                Array::$variant(
                    raw.chunks_exact(size)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of exact size")))
                        .collect(),
                )
            }};
        }

        Ok(match elem {
            ValueType::U8 => Array::U8(self.take(n as u64, field)?.to_vec()),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.bool(&|| format!("{}[{i}]", field()))?);
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(|| format!("{}[{i}]", field()))?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(&|| format!("{}[{i}]", field()), depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}

/// Parses and validates the header of a GGUF file whose complete contents are `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut cur = Cursor { bytes, pos: 0 };

    let magic_bytes: [u8; 4] = cur.array(|| "magic".into())?;
    let magic = Magic::from_bytes(magic_bytes).ok_or(GgufError::BadMagic { found: magic_bytes })?;

    let version = cur.u32(|| "version".into())?;
    if version & 0xffff == 0 && version != 0 {
        return Err(GgufError::BigEndian { raw: version });
    }
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { version });
    }

    // Both counts are read before either list; each is bounded by the bytes after them.
    let n_tensors = cur.u64(|| "tensor count".into())?;
    let n_kv = cur.count(MIN_KV_SIZE, || "metadata key/value count".into())?;
    if n_tensors > cur.remaining() / MIN_TENSOR_INFO_SIZE {
        return Err(GgufError::CountTooLarge {
            field: "tensor count".into(),
            count: n_tensors,
            available: cur.remaining(),
            min_size: MIN_TENSOR_INFO_SIZE,
        });
    }

    let mut metadata = Metadata::new();
    for i in 0..n_kv {
        let key = cur.string(|| format!("metadata[{i}] key"))?;
        let ty = cur.value_type(|| format!("metadata key {key:?}"))?;
        let value = cur.value(ty, &|| format!("metadata key {key:?}"))?;
        if let Err((key, _)) = metadata.insert(key, value) {
            return Err(GgufError::DuplicateKey { key });
        }
    }

    let alignment = match metadata.get(KEY_ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some(Value::U32(a)) => {
            return Err(GgufError::BadAlignment {
                value: a.to_string(),
                reason: "must be a non-zero power of two",
            });
        }
        Some(other) => {
            return Err(GgufError::BadAlignment {
                value: format!("{other} ({})", other.value_type()),
                reason: "must be of type u32",
            });
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize); // bounded by the file length above
    let mut names = HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = cur.string(|| format!("tensor[{i}] name"))?;
        let n_dims = cur.u32(|| format!("tensor {name:?} dimension count"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::BadDimCount {
                tensor: name,
                n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(cur.u64(|| format!("tensor {name:?} dimension {d}"))?);
        }
        let type_id = cur.u32(|| format!("tensor {name:?} type"))?;
        let offset = cur.u64(|| format!("tensor {name:?} offset"))?;

        // ggml counts elements in i64: the product must stay below i64::MAX.
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| GgufError::ShapeOverflow {
                tensor: name.clone(),
                dims: dims.clone(),
            })?;
        let dtype = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownDtype {
            tensor: name.clone(),
            type_id,
        })?;
        if dims[0] % dtype.block_len() as u64 != 0 {
            return Err(GgufError::SizeMismatch {
                tensor: name,
                dtype,
                row_len: dims[0],
                block_len: dtype.block_len(),
            });
        }
        let n_bytes = dtype
            .bytes_for(n_elements)
            .ok_or_else(|| GgufError::ShapeOverflow {
                tensor: name.clone(),
                dims: dims.clone(),
            })?;
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedOffset {
                tensor: name,
                offset,
                alignment,
            });
        }
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor { name });
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            dims,
            offset,
            n_bytes,
        });
    }

    let header_len = cur.pos as u64;
    let file_len = bytes.len() as u64;
    let data_offset = header_len.next_multiple_of(alignment);
    let data_len = if data_offset <= file_len {
        file_len - data_offset
    } else if tensors.is_empty() {
        // A file without tensors may end right after its header, without padding.
        0
    } else {
        return Err(GgufError::DataOutOfBounds {
            data_offset,
            file_len,
        });
    };

    for t in &tensors {
        if t.offset
            .checked_add(t.n_bytes)
            .is_none_or(|end| end > data_len)
        {
            return Err(GgufError::TensorOutOfBounds {
                tensor: t.name.clone(),
                offset: t.offset,
                n_bytes: t.n_bytes,
                data_len,
            });
        }
    }
    check_overlaps(&tensors)?;

    Ok(GgufHeader {
        magic,
        version,
        alignment,
        metadata,
        tensors,
        header_len,
        data_offset,
        data_len,
    })
}

/// Refuses two tensors whose byte ranges intersect (empty tensors overlap nothing).
fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // In bounds (checked before), so the sum cannot overflow.
        if a.offset + a.n_bytes > b.offset {
            return Err(GgufError::OverlappingTensors {
                first: a.name.clone(),
                second: b.name.clone(),
            });
        }
    }
    Ok(())
}
