//! GGUF files: the reader (strict validation, memory-mapped data, zero-copy typed tensor
//! views) and the writer.
//!
//! Layout (little-endian): magic `GGUF` (or PowerInfer's `PWRI`, same layout), version
//! u32, tensor count u64, metadata count u64, metadata key/values, tensor infos (name,
//! n_dims u32, dims u64 each with `dims[0]` the row length, type u32, offset u64 relative
//! to the data section), padding to `general.alignment` (default 32), then tensor data.

mod error;
mod reader;
mod value;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{GgufError, ViewError, WriteError};
pub use reader::{DEFAULT_ALIGNMENT, parse_header};
pub use value::{Array, Metadata, Value, ValueType};
pub use writer::{GgufWriter, TensorFill, write_array, write_string, write_value};

use crate::dtype::GgmlType;
use crate::pod::{TensorElement, cast_slice};
use crate::storage::{AlignedBytes, Storage};

/// The metadata key holding the data alignment.
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// GGML tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays may nest this deep (an array of arrays is depth 2).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// The file magic: plain GGUF, or PowerInfer's sparse-model variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Magic {
    Gguf,
    /// `PWRI`: a PowerInfer model carrying predictors and transposed down projections.
    PowerInfer,
}

impl Magic {
    pub fn from_bytes(b: [u8; 4]) -> Option<Self> {
        match &b {
            b"GGUF" => Some(Self::Gguf),
            b"PWRI" => Some(Self::PowerInfer),
            _ => None,
        }
    }

    pub fn bytes(self) -> [u8; 4] {
        match self {
            Self::Gguf => *b"GGUF",
            Self::PowerInfer => *b"PWRI",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gguf => "GGUF",
            Self::PowerInfer => "PWRI",
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: GgmlType,
    /// GGML order: `dims[0]` is the number of elements in a row.
    pub dims: Vec<u64>,
    /// Offset of the first byte, relative to the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }
}

/// Everything before the data section, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub magic: Magic,
    pub version: u32,
    pub alignment: u64,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Bytes of magic, counts, metadata and tensor infos (before padding).
    pub header_len: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub data_len: u64,
}

/// How an open file's bytes are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileMemory {
    /// Mapped read-only: shared with the page cache, read from disk on first touch.
    Map,
    /// Read into memory of the process's own, in huge pages where the system allows
    /// ([`crate::storage::huge_pages_available`]): more memory per process, but the
    /// weights then miss the TLB far less often (SmolLM2 decode at one thread, `powerinferd
    /// bench` with and without `POWERINFER_MMAP=1`: 126 to 161 tokens/s on this project's
    /// test machine).
    Read,
}

/// An open GGUF file: its validated header and its bytes (mapped or on the heap).
pub struct GgufFile {
    path: Option<PathBuf>,
    storage: Arc<Storage>,
    header: GgufHeader,
}

impl GgufFile {
    /// Maps and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        Self::open_as(path, FileMemory::Map)
    }

    /// Validates `path`, its bytes held as `memory` says.
    pub fn open_as(path: impl AsRef<Path>, memory: FileMemory) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let storage = match memory {
            FileMemory::Map => Storage::map(path),
            FileMemory::Read => Storage::read(path),
        }
        .map_err(|source| GgufError::Io {
            path: path.to_owned(),
            source,
        })?;
        let header = parse_header(&storage)?;
        Ok(Self {
            path: Some(path.to_owned()),
            storage: Arc::new(storage),
            header,
        })
    }

    /// Validates a file held in memory (copied to an aligned buffer).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        let header = parse_header(bytes)?;
        Ok(Self {
            path: None,
            storage: Arc::new(Storage::Heap(AlignedBytes::from_slice(bytes))),
            header,
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The storage the file's bytes live in, for tensors that outlive this value.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Absolute byte range of a tensor's data within the file.
    pub fn tensor_range(&self, info: &TensorInfo) -> std::ops::Range<usize> {
        // The header validated offset + n_bytes <= data_len, and data_offset + data_len is
        // the file length, so these casts and sums are in range.
        let start = (self.header.data_offset + info.offset) as usize;
        start..start + info.n_bytes as usize
    }

    /// The raw bytes of a tensor, borrowed from the file.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.storage[self.tensor_range(info)]
    }

    /// A tensor's data as a slice of its element type (`f32`, `f16`, a quant block...),
    /// without copying.
    pub fn tensor_data<T: TensorElement>(&self, info: &TensorInfo) -> Result<&[T], ViewError> {
        if info.dtype != T::DTYPE {
            return Err(ViewError::WrongType {
                tensor: info.name.clone(),
                expected: T::DTYPE,
                actual: info.dtype,
            });
        }
        cast_slice(self.tensor_bytes(info)).ok_or_else(|| ViewError::Misaligned {
            tensor: info.name.clone(),
            offset: self.header.data_offset + info.offset,
            align: align_of::<T>(),
        })
    }

    /// [`Self::tensor_data`] by tensor name.
    pub fn tensor_data_by_name<T: TensorElement>(&self, name: &str) -> Result<&[T], ViewError> {
        let info = self.tensor(name).ok_or_else(|| ViewError::NotFound {
            name: name.to_owned(),
        })?;
        self.tensor_data(info)
    }
}
