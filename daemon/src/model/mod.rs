//! Models: hyper-parameters, weights and the forward pass of the llama family (LLaMA,
//! Mistral, SmolLM2, ReluLLaMA/ProSparse, Bamboo/TurboSparse).

pub mod config;
mod forward;
pub mod hybrid;
mod load;
pub mod names;
mod neurons;
pub mod partition;
pub mod placement;
pub mod sidecar;
pub mod sparsity;
mod weights;

pub use config::{Arch, FfnKind, ModelConfig};
pub(crate) use forward::NeuronSide;
pub use forward::{BatchToken, Capture, MASKED_MIN_ENV, MASKED_MIN_FRACTION, Model, Scratch};
pub use load::{LoadOptions, LoadedModel, PlacedDevice, Tuning, open, open_on, weight_memory};
pub use partition::{LayerPartition, Partition, Side};
pub use powerinfer_ops::kv::{KvAllocError, KvCache, KvShape, KvType};
pub use powerinfer_ops::profile::{Profile, Stage};
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
    #[error(transparent)]
    Device(crate::device::DeviceOpenError),
    #[error("placement: {0}")]
    Placement(Box<placement::PlacementError>),
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
    #[error("layer {layer} is not computed on the host (its attention is on the device)")]
    NotOnHost { layer: usize },
    #[error("{0}")]
    Device(powerinfer_ops::device::DeviceError),
}
