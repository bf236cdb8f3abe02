//! A model in memory, of the llama family (LLaMA, Mistral, SmolLM2, ReluLLaMA/ProSparse,
//! Bamboo/TurboSparse), Gemma 3 (the llama layer with q/k norms, post-norms and local
//! layers) or Qwen 2 and 3 (with q/k/v biases, or q/k norms): [`Model`] is defined here with what it is made of; its files
//! loaded by [`open`] ([`load`]), its forward pass on the host ([`forward`]), the
//! neuron-major form and renumbering ([`neurons`]), where its parts run
//! ([`partition`], [`placement`]) and its hybrid step with a device ([`hybrid`]).

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
pub use forward::{BatchToken, Capture, MASKED_MIN_ENV, MASKED_MIN_FRACTION, Scratch};
pub use load::{
    LoadOptions, LoadedModel, PlacedDevice, Tuning, memory_estimate, open, open_on, resident_bytes,
    weight_memory,
};
pub use partition::{LayerPartition, Partition, Side};
pub use powerinfer_ops::kv::{KvAllocError, KvCache, KvShape, KvType};
pub use powerinfer_ops::profile::{Profile, Stage};
pub use sparsity::{Predictor, SparsityData, SparsityMode};
pub use weights::{LayerWeights, PostNorms, QkNorms, QkvBiases, Weights};

use powerinfer_ops::gguf::{GgufError, GgufFile};
use powerinfer_ops::nn::Rope;
use powerinfer_ops::tensor::TensorError;
use powerinfer_ops::transformer::{AttentionBlock, AttentionExtras, AttentionShape, Head};

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

/// A loaded model: configuration, weights (mapped from the file), RoPE tables, and where
/// its parts are computed.
pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    pub sparsity: SparsityData,
    /// Where each part runs and each layer's hot side (set by
    /// [`Model::apply_placement`]; everything on the host before).
    pub partition: Partition,
    /// The neuron table after [`Model::apply_placement`]: per layer, the file's index of
    /// each neuron as now numbered (hot ones first). `None`: the file's order.
    pub neuron_order: Option<Vec<Vec<u32>>>,
    /// The active share from which a sparse token's FFN reads every gate, up and down
    /// row of the row-major matrices and zeroes `h` outside its set, rather than the
    /// scattered rows of its active neurons: the same values rounded in another order,
    /// used where the file has `ffn_down` and the layer has no hot side. Default
    /// [`MASKED_MIN_FRACTION`] (see `Tuning`); above 1, never.
    pub masked_min_fraction: f64,
    rope: Rope,
    /// The RoPE of local (sliding-window) layers, when the model has them.
    rope_local: Option<Rope>,
}

impl Model {
    pub fn load(file: &GgufFile) -> Result<Self, LoadError> {
        let config = ModelConfig::from_metadata(file.metadata(), file.header().magic)?;
        let weights = Weights::load(file, &config)?;
        let sparsity = load_file_sparsity(file, &config)?;
        let rope = Rope::new(
            config.n_rot,
            config.rope_base,
            config.rope_freq_scale,
            config.rope_style,
            weights.rope_freqs.as_deref(),
        );
        let rope_local = config.sliding.as_ref().map(|sw| {
            Rope::new(
                config.n_rot,
                sw.rope_base,
                sw.rope_freq_scale,
                config.rope_style,
                weights.rope_freqs.as_deref(),
            )
        });
        Ok(Self {
            partition: Partition::host(config.n_layer),
            neuron_order: None,
            masked_min_fraction: MASKED_MIN_FRACTION,
            config,
            weights,
            sparsity,
            rope,
            rope_local,
        })
    }

    /// Why `mode` cannot run on this model as loaded, if it cannot.
    pub fn sparsity_unavailable(&self, mode: SparsityMode) -> Option<String> {
        if mode != SparsityMode::Dense && !self.has_neuron_form() {
            return Some(format!(
                "sparsity mode {mode} was not prepared at load (load the model with it)"
            ));
        }
        self.sparsity.unavailable(mode, self.config.ffn.is_relu())
    }

    /// The RoPE of global layers (every layer of most models).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The RoPE of local layers, when the model has them.
    pub fn rope_local(&self) -> Option<&Rope> {
        self.rope_local.as_ref()
    }

    /// Whether `layer` rotates with [`Self::rope_local`].
    pub fn is_local(&self, layer: usize) -> bool {
        self.rope_local.is_some() && self.config.window(layer).is_some()
    }

    pub fn attention_shape(&self) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            n_embd: c.n_embd,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            rms_eps: c.rms_eps,
        }
    }

    /// Layer `layer`'s attention block as the host holds it.
    pub fn attention_block(&self, layer: usize) -> AttentionBlock<'_> {
        let (w, c) = (&self.weights.layers[layer], &self.config);
        let (qk, bias) = (w.qk_norms.as_ref(), w.qkv_bias.as_ref());
        AttentionBlock {
            shape: self.attention_shape(),
            rope: match &self.rope_local {
                Some(local) if self.is_local(layer) => local,
                _ => &self.rope,
            },
            attn_norm: &w.attn_norm,
            wq: &w.wq,
            wk: &w.wk,
            wv: &w.wv,
            wo: &w.wo,
            ffn_norm: &w.ffn_norm,
            extras: AttentionExtras {
                q_bias: bias.map(|b| b.q.as_slice()),
                k_bias: bias.map(|b| b.k.as_slice()),
                v_bias: bias.map(|b| b.v.as_slice()),
                q_norm: qk.map(|n| n.q.as_slice()),
                k_norm: qk.map(|n| n.k.as_slice()),
                post_norm: w.post_norms.as_ref().map(|n| n.attn.as_slice()),
                window: c.window(layer),
                scale: Some(c.attn_scale),
                softcap: c.attn_softcap,
            },
        }
    }

    /// The output head as the host holds it.
    pub fn head_block(&self) -> Head<'_> {
        Head {
            output_norm: &self.weights.output_norm,
            output: &self.weights.output,
            rms_eps: self.config.rms_eps,
        }
    }
}

/// The sparsity data a model file carries itself: PowerInfer's predictors and threshold.
fn load_file_sparsity(file: &GgufFile, c: &ModelConfig) -> Result<SparsityData, LoadError> {
    let mut predictors = Vec::new();
    for l in 0..c.n_layer {
        match weights::predictor(file, c, crate::ids::LayerId(l))? {
            Some(p) => predictors.push(p),
            None if predictors.is_empty() => break,
            None => {
                return Err(LoadError::MissingTensor {
                    name: names::Blk::Fc1.name(crate::ids::LayerId(l)),
                });
            }
        }
    }
    let threshold = match file.metadata().get(names::key::SPARSE_THRESHOLD) {
        None => 0.0,
        Some(v) => v.as_f32().ok_or_else(|| LoadError::BadKey {
            key: names::key::SPARSE_THRESHOLD.into(),
            value: format!("{v:?}"),
            expected: "a float".into(),
        })?,
    };
    let has = !predictors.is_empty();
    Ok(SparsityData {
        predictors: has.then_some(predictors),
        predictor_threshold: threshold,
        sources: if has {
            vec!["model file".into()]
        } else {
            Vec::new()
        },
        ..SparsityData::default()
    })
}
