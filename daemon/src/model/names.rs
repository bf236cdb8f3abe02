//! Every GGUF tensor and metadata key name the model reads, in one table.

use crate::ids::LayerId;

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT: &str = "output.weight";
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Tensors of one transformer block (`blk.{layer}.{suffix}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blk {
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Gemma 3: RMS norms of each query and key head (`[head_dim]`), and of the
    /// attention and FFN outputs before their residual adds (`[n_embd]`).
    AttnQNorm,
    AttnKNorm,
    AttnPostNorm,
    FfnPostNorm,
    /// Qwen 2: biases of the q, k and v projections (`[n_head · head_dim]`,
    /// `[n_head_kv · head_dim]`).
    AttnQBias,
    AttnKBias,
    AttnVBias,
    /// The down projection stored neuron-major (`[n_embd, n_ff]` rows per neuron), as
    /// PowerInfer's files carry it.
    FfnDownT,
    /// Predictor layers (PowerInfer): `fc1` `[n_embd] → [rank]`, `fc2` `[rank] → [n_ff]`.
    Fc1,
    Fc2,
}

impl Blk {
    pub fn suffix(self) -> &'static str {
        match self {
            Self::AttnNorm => "attn_norm.weight",
            Self::AttnQ => "attn_q.weight",
            Self::AttnK => "attn_k.weight",
            Self::AttnV => "attn_v.weight",
            Self::AttnOutput => "attn_output.weight",
            Self::FfnNorm => "ffn_norm.weight",
            Self::FfnGate => "ffn_gate.weight",
            Self::FfnUp => "ffn_up.weight",
            Self::FfnDown => "ffn_down.weight",
            Self::FfnDownT => "ffn_down_t.weight",
            Self::AttnQNorm => "attn_q_norm.weight",
            Self::AttnKNorm => "attn_k_norm.weight",
            Self::AttnPostNorm => "post_attention_norm.weight",
            Self::FfnPostNorm => "post_ffw_norm.weight",
            Self::AttnQBias => "attn_q.bias",
            Self::AttnKBias => "attn_k.bias",
            Self::AttnVBias => "attn_v.bias",
            Self::Fc1 => "fc1.weight",
            Self::Fc2 => "fc2.weight",
        }
    }

    pub fn name(self, layer: LayerId) -> String {
        format!("blk.{}.{}", layer.0, self.suffix())
    }
}

/// Metadata keys, relative to the architecture prefix (`{arch}.{key}`).
pub mod key {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const BLOCK_COUNT: &str = "block_count";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const HEAD_COUNT: &str = "attention.head_count";
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const KEY_LENGTH: &str = "attention.key_length";
    pub const VALUE_LENGTH: &str = "attention.value_length";
    pub const RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
    pub const ROPE_DIMS: &str = "rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    pub const ROPE_SCALING_TYPE: &str = "rope.scaling.type";
    pub const ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
    pub const ROPE_SCALE_LINEAR: &str = "rope.scale_linear";
    pub const VOCAB_SIZE: &str = "vocab_size";
    pub const SLIDING_WINDOW: &str = "attention.sliding_window";
    pub const SLIDING_WINDOW_PATTERN: &str = "attention.sliding_window_pattern";
    pub const ROPE_FREQ_BASE_SWA: &str = "rope.freq_base_swa";
    pub const ATTN_SOFTCAP: &str = "attn_logit_softcapping";
    pub const FINAL_SOFTCAP: &str = "final_logit_softcapping";
    /// PowerInfer: the predictor logit a neuron needs to be active (absolute key).
    pub const SPARSE_THRESHOLD: &str = "powerinfer.sparse_threshold";
    /// PowerInfer's environment override of [`SPARSE_THRESHOLD`] (read by
    /// `crate::settings`, applied at load as `Tuning::predictor_threshold`).
    pub const SPARSE_THRESHOLD_ENV: &str = "LLAMA_SPARSE_PRED_THRESHOLD";
}
