//! What goes into and comes out of an engine: requests, streamed events, limits, errors.
//! Plain domain types; the gRPC layer converts to and from the wire types in one place.

use std::time::Duration;

use powerinfer_ops::quant::Numerics;

use crate::device::DeviceOpenError;
use crate::generation::sampler::SamplerConfig;
use crate::ids::TokenId;
use crate::model::{KvType, LoadError, Tuning};
use crate::tokenizer::ChatMessage;

pub use crate::generation::{FinishReason, TokenEvent};
pub use crate::model::SparsityMode;

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Raw text; special-token text is parsed, BOS added as the model asks.
    Text(String),
    /// Messages rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as given.
    Tokens(Vec<TokenId>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateSpec {
    pub input: Input,
    /// `None`: the engine's default.
    pub max_tokens: Option<usize>,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
    pub top_logprobs: usize,
    /// `None`: the model's mode.
    pub sparsity: Option<SparsityMode>,
}

impl GenerateSpec {
    pub fn new(input: Input) -> Self {
        Self {
            input,
            max_tokens: None,
            sampling: SamplerConfig::default(),
            stop: Vec::new(),
            top_logprobs: 0,
            sparsity: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    pub queue: Duration,
    pub prefill: Duration,
    pub decode: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SparsityStats {
    pub mode: SparsityMode,
    pub active_fraction_per_layer: Vec<f32>,
    pub hot_share: f32,
    pub cold_share: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FinalEvent {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
    pub sparsity: SparsityStats,
    pub finish: FinishReason,
    /// Text released only at the end (held back while it could begin a stop string).
    pub text: String,
}

/// One item of a generation stream: tokens, then exactly one final event.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamItem {
    Token(TokenEvent),
    Final(FinalEvent),
}

/// Limits and settings of one loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineOptions {
    /// Context size of every sequence, in tokens.
    pub n_ctx: usize,
    /// Sequences decoded together (each has its own KV-cache slot).
    pub max_sequences: usize,
    /// Requests waiting for a slot; more are refused.
    pub max_queue: usize,
    /// Longest prompt accepted.
    pub max_prompt_tokens: usize,
    /// Tokens generated when a request does not say.
    pub default_max_tokens: usize,
    /// Prompt tokens processed per step in total, so a long prompt does not stall the
    /// streams already running.
    pub prefill_chunk: usize,
    pub threads: usize,
    pub kv_type: KvType,
    pub numerics: Numerics,
    pub sparsity: SparsityMode,
    /// `cpu`, `sim[:BYTES]`, `cuda:N`, `hip:N`.
    pub device: String,
    pub vram_budget: u64,
    /// How the model is loaded (from the environment, see `crate::settings`).
    pub tuning: Tuning,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            n_ctx: 2048,
            max_sequences: 8,
            max_queue: 64,
            max_prompt_tokens: 2047,
            default_max_tokens: 256,
            prefill_chunk: 256,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kv_type: KvType::F16,
            numerics: Numerics::Precise,
            sparsity: SparsityMode::Dense,
            device: "cpu".into(),
            vram_budget: 0,
            tuning: Tuning::default(),
        }
    }
}

/// Why an engine refused or failed something.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Load(#[from] LoadError),
    /// The request is malformed or exceeds a limit.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the queue is full ({max} requests waiting)")]
    QueueFull { max: usize },
    #[error("the prompt has {tokens} tokens, more than the limit of {limit} (context {n_ctx})")]
    PromptTooLong {
        tokens: usize,
        limit: usize,
        n_ctx: usize,
    },
    #[error(transparent)]
    Device(#[from] DeviceOpenError),
    #[error("the engine has stopped")]
    Stopped,
    /// An actor of the model panicked or its device failed; the model serves nothing
    /// until it is loaded again.
    #[error("the model has failed: {0}")]
    Failed(String),
    #[error("{0}")]
    Internal(String),
}
