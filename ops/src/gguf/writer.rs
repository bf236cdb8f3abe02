//! Writing GGUF files: everything the reader reads (both magics, versions 2 and 3, every
//! value type including nested arrays, any power-of-two alignment) round-trips.
//!
//! The low-level encoders are public so tests can also build deliberately broken files.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::{self, Write};
use std::path::Path;

use super::error::WriteError;
use super::reader::DEFAULT_ALIGNMENT;
use super::value::{Array, Metadata, Value};
use super::{KEY_ALIGNMENT, MAX_DIMS, Magic};
use crate::dtype::GgmlType;

/// Makes the bytes of tensors added with [`GgufWriter::add_tensor_later`] when the
/// writer reaches them: called with the tensor's index (in the order added) and name.
pub type TensorFill<'f> = dyn FnMut(usize, &str) -> io::Result<Vec<u8>> + 'f;

/// A tensor's bytes: held, or made when written (files larger than memory stream).
enum TensorData<'a> {
    Bytes(Cow<'a, [u8]>),
    Later,
}

/// A tensor waiting to be written.
struct PendingTensor<'a> {
    name: String,
    dtype: GgmlType,
    dims: Vec<u64>,
    len: u64,
    data: TensorData<'a>,
}

/// Builds a GGUF file in memory order: metadata, tensor infos, aligned tensor data.
pub struct GgufWriter<'a> {
    magic: Magic,
    version: u32,
    metadata: Metadata,
    tensors: Vec<PendingTensor<'a>>,
    names: HashSet<String>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    /// A `GGUF` version 3 file with the default alignment.
    pub fn new() -> Self {
        Self {
            magic: Magic::Gguf,
            version: 3,
            metadata: Metadata::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    pub fn magic(mut self, magic: Magic) -> Self {
        self.magic = magic;
        self
    }

    /// The version number written (2 and 3 share the little-endian layout).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    pub fn add_metadata(&mut self, key: &str, value: Value) -> Result<(), WriteError> {
        if key == KEY_ALIGNMENT {
            check_alignment(&value)?;
        }
        self.metadata
            .insert(key.to_owned(), value)
            .map_err(|(key, _)| WriteError::DuplicateKey { key })
    }

    /// Copies every key of `metadata` (in its order).
    pub fn add_all_metadata(&mut self, metadata: &Metadata) -> Result<(), WriteError> {
        for (k, v) in metadata.iter() {
            self.add_metadata(k, v.clone())?;
        }
        Ok(())
    }

    /// Adds a tensor; `dims[0]` is the row length (GGML order). `data` must hold exactly
    /// the bytes the type and shape need.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: GgmlType,
        dims: &[u64],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<(), WriteError> {
        let data = data.into();
        let len = data.len() as u64;
        self.push_tensor(name, dtype, dims, len, TensorData::Bytes(data))
    }

    /// Adds a tensor whose bytes the `fill` of [`Self::write_to_with`] makes when the
    /// writer reaches it; they must be exactly the bytes the type and shape need, or the
    /// write fails. Files larger than memory are written this way, a tensor at a time.
    pub fn add_tensor_later(
        &mut self,
        name: &str,
        dtype: GgmlType,
        dims: &[u64],
    ) -> Result<(), WriteError> {
        let len = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| dtype.bytes_for(n))
            .unwrap_or(u64::MAX);
        self.push_tensor(name, dtype, dims, len, TensorData::Later)
    }

    fn push_tensor(
        &mut self,
        name: &str,
        dtype: GgmlType,
        dims: &[u64],
        len: u64,
        data: TensorData<'a>,
    ) -> Result<(), WriteError> {
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(WriteError::BadDimCount {
                name: name.to_owned(),
                n_dims: dims.len(),
            });
        }
        let expected = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|_| dims[0].is_multiple_of(dtype.block_len() as u64))
            .and_then(|n| dtype.bytes_for(n));
        if expected != Some(len) {
            return Err(WriteError::TensorSize {
                name: name.to_owned(),
                dtype,
                dims: dims.to_vec(),
                expected,
                actual: len as usize,
            });
        }
        if !self.names.insert(name.to_owned()) {
            return Err(WriteError::DuplicateTensor {
                name: name.to_owned(),
            });
        }
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dtype,
            dims: dims.to_vec(),
            len,
            data,
        });
        Ok(())
    }

    fn alignment(&self) -> u64 {
        match self.metadata.get(KEY_ALIGNMENT) {
            Some(Value::U32(a)) => u64::from(*a),
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// Writes the whole file to `w` (every tensor's bytes given when it was added).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        self.write_to_with(w, &mut no_fill)
    }

    /// Writes the whole file to `w`, asking `fill` for the bytes of the tensors added
    /// with [`Self::add_tensor_later`].
    pub fn write_to_with(&self, w: &mut impl Write, fill: &mut TensorFill<'_>) -> io::Result<()> {
        let alignment = self.alignment();
        let mut pos = 0u64;
        let mut out = CountingWriter {
            inner: w,
            pos: &mut pos,
        };

        out.write_all(&self.magic.bytes())?;
        out.write_all(&self.version.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in self.metadata.iter() {
            write_string(&mut out, key)?;
            out.write_all(&value.value_type().id().to_le_bytes())?;
            write_value(&mut out, value)?;
        }

        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes())?;
            }
            out.write_all(&t.dtype.id().to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
            offsets.push(offset);
            offset = (offset + t.len).next_multiple_of(alignment);
        }

        let header_len = *out.pos;
        pad(
            &mut out,
            header_len.next_multiple_of(alignment) - header_len,
        )?;
        let data_start = *out.pos;
        for (i, (t, &off)) in self.tensors.iter().zip(&offsets).enumerate() {
            let here = *out.pos - data_start;
            pad(&mut out, off - here)?;
            match &t.data {
                TensorData::Bytes(b) => out.write_all(b)?,
                TensorData::Later => {
                    let b = fill(i, &t.name)?;
                    if b.len() as u64 != t.len {
                        return Err(io::Error::other(format!(
                            "tensor {:?}: {} bytes were made for it, its shape needs {}",
                            t.name,
                            b.len(),
                            t.len
                        )));
                    }
                    out.write_all(&b)?;
                }
            }
        }
        // Pad the last tensor too, as llama.cpp does, so files concatenate cleanly.
        let here = *out.pos - data_start;
        if !self.tensors.is_empty() {
            pad(&mut out, here.next_multiple_of(alignment) - here)?;
        }
        out.flush()
    }

    /// Writes the file to `path` atomically: a temporary file beside it, then a rename.
    pub fn write_file(&self, path: &Path) -> Result<(), WriteError> {
        self.write_file_with(path, &mut no_fill)
    }

    /// [`Self::write_file`], asking `fill` for the tensors added with
    /// [`Self::add_tensor_later`] (see [`Self::write_to_with`]).
    pub fn write_file_with(
        &self,
        path: &Path,
        fill: &mut TensorFill<'_>,
    ) -> Result<(), WriteError> {
        let io_err = |source| WriteError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let result = (|| {
            let file = std::fs::File::create(&tmp)?;
            let mut w = io::BufWriter::new(file);
            self.write_to_with(&mut w, fill)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io_err)
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v).expect("writing to a Vec cannot fail");
        v
    }
}

/// The fill of the writes that take none: a tensor without bytes is an error.
fn no_fill(_: usize, name: &str) -> io::Result<Vec<u8>> {
    Err(io::Error::other(format!(
        "tensor {name:?} was added without its bytes (write it with write_to_with)"
    )))
}

fn check_alignment(value: &Value) -> Result<(), WriteError> {
    match value {
        Value::U32(a) if a.is_power_of_two() => Ok(()),
        other => Err(WriteError::BadAlignment {
            value: format!("{other} ({})", other.value_type()),
        }),
    }
}

struct CountingWriter<'w, W: Write> {
    inner: &'w mut W,
    pos: &'w mut u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        *self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pad(w: &mut impl Write, n: u64) -> io::Result<()> {
    const ZEROS: [u8; 64] = [0; 64];
    let mut left = n;
    while left > 0 {
        let k = left.min(64) as usize;
        w.write_all(&ZEROS[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Encodes a GGUF string: u64 length, then the bytes.
pub fn write_string(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Encodes a value's payload (its type id is written by the caller).
pub fn write_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_string(w, s),
        Value::Array(a) => write_array(w, a),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Encodes an array: element type id, u64 count, elements.
pub fn write_array(w: &mut impl Write, a: &Array) -> io::Result<()> {
    w.write_all(&a.elem_type().id().to_le_bytes())?;
    w.write_all(&(a.len() as u64).to_le_bytes())?;
    macro_rules! each {
        ($v:expr) => {{
            for x in $v {
                w.write_all(&x.to_le_bytes())?;
            }
            Ok(())
        }};
    }
    match a {
        Array::U8(v) => w.write_all(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => {
            for x in v {
                w.write_all(&[u8::from(*x)])?;
            }
            Ok(())
        }
        Array::String(v) => {
            for s in v {
                write_string(w, s)?;
            }
            Ok(())
        }
        Array::Array(v) => {
            for inner in v {
                write_array(w, inner)?;
            }
            Ok(())
        }
    }
}
