//! Models: hyper-parameters, weights and the forward pass of the llama family (LLaMA,
//! Mistral, SmolLM2, ReluLLaMA/ProSparse, Bamboo/TurboSparse).

pub mod config;
mod forward;
mod kv_cache;
pub mod names;
mod neurons;
pub mod placement;
pub mod sidecar;
pub mod sparsity;
mod weights;

pub use config::{Arch, FfnKind, ModelConfig};
pub use forward::{
    BatchToken, Capture, MASKED_MIN_ENV, MASKED_MIN_FRACTION, Model, Profile, Scratch, Stage,
};
pub use kv_cache::{KvAllocError, KvCache, KvType};
pub use neurons::{HotFfn, HotLayer};
pub use sparsity::{Predictor, SparsityData, SparsityMode};
pub use weights::{LayerWeights, Weights};

use powerinfer_ops::gguf::GgufError;
use powerinfer_ops::tensor::TensorError;

use crate::ids::TokenId;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("missing metadata key {key}")]
    MissingKey { key: String },
    #[error("metadata key {key} is {value}, expected {expected}")]
    BadKey {
        key: String,
        value: String,
        expected: String,
    },
    #[error("missing tensor {name}")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {dims:?}, expected {expected}")]
    Shape {
        name: String,
        dims: Vec<u64>,
        expected: String,
    },
    #[error(transparent)]
    Tensor(TensorError),
    #[error("unsupported {what}")]
    Unsupported { what: String },
    #[error("{0}")]
    Other(String),
}

/// Why a batch could not be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error("empty batch")]
    EmptyBatch,
    #[error("token id {token} is out of range (vocabulary of {n_vocab})")]
    TokenOutOfRange { token: TokenId, n_vocab: usize },
    #[error("position {pos} does not fit the context of {n_ctx} tokens")]
    ContextFull { pos: usize, n_ctx: usize },
    #[error("sequence slot {slot} does not exist ({n_slots} slots)")]
    BadSlot { slot: usize, n_slots: usize },
    #[error("{0}")]
    Sparsity(String),
}
