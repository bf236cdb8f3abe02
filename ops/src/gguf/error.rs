//! The typed errors of GGUF reading and writing. Each names the offending field and value,
//! so a refused file says exactly why.

use std::path::PathBuf;

use crate::dtype::GgmlType;

/// Why a GGUF file was refused.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("bad magic \"{}\": not a GGUF file (expected \"GGUF\" or \"PWRI\")", found.escape_ascii())]
    BadMagic { found: [u8; 4] },

    #[error("big-endian GGUF files are not supported (version field reads {raw:#010x})")]
    BigEndian { raw: u32 },

    #[error("unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { version: u32 },

    #[error("truncated file: {field} needs {needed} bytes at offset {offset}, {available} left")]
    Truncated {
        field: String,
        offset: u64,
        needed: u64,
        available: u64,
    },

    #[error(
        "{field} is {count}, more than the {available} remaining bytes could hold (at least {min_size} bytes each)"
    )]
    CountTooLarge {
        field: String,
        count: u64,
        available: u64,
        min_size: u64,
    },

    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: String },

    #[error("{field} has unknown value type id {type_id}")]
    UnknownValueType { field: String, type_id: u32 },

    #[error("{field} is a boolean with byte value {byte} (must be 0 or 1)")]
    InvalidBool { field: String, byte: u8 },

    #[error("{field} nests arrays {depth} deep (at most {max} allowed)")]
    NestingTooDeep {
        field: String,
        depth: usize,
        max: usize,
    },

    #[error("duplicate metadata key {key:?}")]
    DuplicateKey { key: String },

    #[error("general.alignment {value} is invalid: {reason}")]
    BadAlignment { value: String, reason: &'static str },

    #[error("tensor {tensor:?} has {n_dims} dimensions (must be 1 to {max})")]
    BadDimCount {
        tensor: String,
        n_dims: u32,
        max: usize,
    },

    #[error("tensor {tensor:?} shape {dims:?} has an element count that overflows")]
    ShapeOverflow { tensor: String, dims: Vec<u64> },

    #[error("tensor {tensor:?} has unknown type id {type_id}")]
    UnknownDtype { tensor: String, type_id: u32 },

    #[error(
        "tensor {tensor:?} of type {dtype} has rows of {row_len} elements, not a multiple of its block length {block_len}"
    )]
    SizeMismatch {
        tensor: String,
        dtype: GgmlType,
        row_len: u64,
        block_len: usize,
    },

    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor { name: String },

    #[error("tensor {tensor:?} offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error(
        "tensor {tensor:?} at offset {offset} with {n_bytes} bytes ends past the data section ({data_len} bytes)"
    )]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        n_bytes: u64,
        data_len: u64,
    },

    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    OverlappingTensors { first: String, second: String },

    #[error(
        "data section starts at offset {data_offset}, past the end of the file ({file_len} bytes)"
    )]
    DataOutOfBounds { data_offset: u64, file_len: u64 },
}

/// Why a typed view of tensor bytes could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ViewError {
    #[error("tensor {tensor:?} has type {actual}, not {expected}")]
    WrongType {
        tensor: String,
        expected: GgmlType,
        actual: GgmlType,
    },
    #[error("tensor {tensor:?} data at file offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        tensor: String,
        offset: u64,
        align: usize,
    },
    #[error("no tensor named {name:?}")]
    NotFound { name: String },
}

/// Why a GGUF file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("duplicate metadata key {key:?}")]
    DuplicateKey { key: String },
    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor { name: String },
    #[error(
        "tensor {name:?}: {dtype} shape {dims:?} needs {expected:?} bytes, {actual} were given"
    )]
    TensorSize {
        name: String,
        dtype: GgmlType,
        dims: Vec<u64>,
        expected: Option<u64>,
        actual: usize,
    },
    #[error("tensor {name:?} has {n_dims} dimensions (must be 1 to 4)")]
    BadDimCount { name: String, n_dims: usize },
    #[error("general.alignment must be a non-zero power of two u32, got {value}")]
    BadAlignment { value: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
