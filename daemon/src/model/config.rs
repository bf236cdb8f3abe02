//! Hyper-parameters of a model, read from GGUF metadata and validated.

use powerinfer_ops::gguf::{Magic, Metadata, Value};
use powerinfer_ops::nn::RopeStyle;

use super::LoadError;
use super::names::key;

/// Architectures the forward pass implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA 1/2/3, Mistral, SmolLM2, ReluLLaMA, ProSparse: pre-norm, RoPE, gated FFN.
    Llama,
    /// Bamboo / TurboSparse: the LLaMA layout with a dReLU FFN.
    Bamboo,
}

impl Arch {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "bamboo" => Some(Self::Bamboo),
            _ => None,
        }
    }

    /// The prefix of this architecture's metadata keys.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Bamboo => "bamboo",
        }
    }
}

/// How the FFN combines its gate and up projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// `silu(gate) · up` (LLaMA, Mistral, SmolLM2).
    SwiGlu,
    /// `relu(gate) · up` (ReluLLaMA, ProSparse).
    ReGlu,
    /// `relu(gate) · relu(up)` (Bamboo, TurboSparse).
    DRelu,
    /// `gelu(gate) · up`.
    GeGlu,
}

impl FfnKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::SwiGlu => "swiglu",
            Self::ReGlu => "reglu",
            Self::DRelu => "drelu",
            Self::GeGlu => "geglu",
        }
    }

    /// Whether inactive neurons output exactly zero (sparsity is exact, not predicted).
    pub fn is_relu(self) -> bool {
        matches!(self, Self::ReGlu | Self::DRelu)
    }

    /// The per-neuron combination the sparse operators compute.
    pub fn glu(self) -> powerinfer_ops::nn::Glu {
        use powerinfer_ops::nn::Glu;
        match self {
            Self::SwiGlu => Glu::Silu,
            Self::ReGlu => Glu::Relu,
            Self::DRelu => Glu::DualRelu,
            Self::GeGlu => Glu::Gelu,
        }
    }
}

/// Metadata key naming the FFN activation explicitly (`silu`, `relu`, `gelu`), for files
/// whose architecture name does not imply it (ReLU fine-tunes of LLaMA).
pub const KEY_FFN_ACT: &str = "powerinfer.ffn_activation";

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub name: String,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates.
    pub n_rot: usize,
    pub rope_base: f32,
    /// Position scale (1 / linear scaling factor).
    pub rope_freq_scale: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub ffn: FfnKind,
}

/// Sanity bounds: larger values are refused as corrupt before anything is allocated.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 4096;
const MAX_VOCAB: u64 = 1 << 24;

struct Keys<'a> {
    md: &'a Metadata,
    prefix: &'static str,
}

impl Keys<'_> {
    fn full(&self, k: &str) -> String {
        format!("{}.{k}", self.prefix)
    }

    fn value(&self, k: &str) -> Option<&Value> {
        self.md.get(&self.full(k))
    }

    fn uint_opt(&self, k: &str, max: u64) -> Result<Option<u64>, LoadError> {
        let Some(v) = self.value(k) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(LoadError::BadKey {
                key: self.full(k),
                value: v.to_string(),
                expected: format!("an integer from 0 to {max}"),
            }),
        }
    }

    fn uint(&self, k: &str, max: u64) -> Result<u64, LoadError> {
        self.uint_opt(k, max)?
            .ok_or_else(|| LoadError::MissingKey { key: self.full(k) })
    }

    fn float_opt(&self, k: &str) -> Result<Option<f32>, LoadError> {
        let Some(v) = self.value(k) else {
            return Ok(None);
        };
        match v.as_f32() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(LoadError::BadKey {
                key: self.full(k),
                value: v.to_string(),
                expected: "a finite float".into(),
            }),
        }
    }
}

fn positive(key: String, v: u64) -> Result<usize, LoadError> {
    if v == 0 {
        return Err(LoadError::BadKey {
            key,
            value: "0".into(),
            expected: "a positive value".into(),
        });
    }
    Ok(v as usize)
}

impl ModelConfig {
    /// Reads and validates the hyper-parameters; `n_vocab` comes from the vocabulary when
    /// the architecture does not state it. The magic matters: PowerInfer's `PWRI` files
    /// of the llama architecture are ReLU models (ReluLLaMA, ProSparse).
    pub fn from_metadata(md: &Metadata, magic: Magic) -> Result<Self, LoadError> {
        let arch_name = md
            .get(key::ARCHITECTURE)
            .and_then(Value::as_str)
            .ok_or_else(|| LoadError::MissingKey {
                key: key::ARCHITECTURE.into(),
            })?;
        let arch = Arch::parse(arch_name).ok_or_else(|| LoadError::Unsupported {
            what: format!("architecture {arch_name:?} (supported: llama, bamboo)"),
        })?;
        let k = Keys {
            md,
            prefix: arch.prefix(),
        };

        let n_embd = positive(
            k.full(key::EMBEDDING_LENGTH),
            k.uint(key::EMBEDDING_LENGTH, MAX_DIM)?,
        )?;
        let n_layer = positive(
            k.full(key::BLOCK_COUNT),
            k.uint(key::BLOCK_COUNT, MAX_LAYERS)?,
        )?;
        let n_ff = positive(
            k.full(key::FEED_FORWARD_LENGTH),
            k.uint(key::FEED_FORWARD_LENGTH, MAX_DIM)?,
        )?;
        let n_head = positive(k.full(key::HEAD_COUNT), k.uint(key::HEAD_COUNT, MAX_DIM)?)?;
        let n_head_kv = match k.uint_opt(key::HEAD_COUNT_KV, MAX_DIM)? {
            Some(v) => positive(k.full(key::HEAD_COUNT_KV), v)?,
            None => n_head,
        };
        if n_head % n_head_kv != 0 {
            return Err(LoadError::BadKey {
                key: k.full(key::HEAD_COUNT_KV),
                value: n_head_kv.to_string(),
                expected: format!("a divisor of the head count {n_head}"),
            });
        }
        let head_dim = match k.uint_opt(key::KEY_LENGTH, MAX_DIM)? {
            Some(v) => positive(k.full(key::KEY_LENGTH), v)?,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(LoadError::BadKey {
                    key: k.full(key::HEAD_COUNT),
                    value: n_head.to_string(),
                    expected: format!("a divisor of the embedding length {n_embd}"),
                });
            }
        };
        if let Some(v) = k.uint_opt(key::VALUE_LENGTH, MAX_DIM)?
            && v as usize != head_dim
        {
            return Err(LoadError::Unsupported {
                what: format!("value heads of {v} dimensions with key heads of {head_dim}"),
            });
        }
        let n_rot = k
            .uint_opt(key::ROPE_DIMS, MAX_DIM)?
            .map_or(head_dim, |v| v as usize);
        if n_rot % 2 != 0 || n_rot > head_dim {
            return Err(LoadError::BadKey {
                key: k.full(key::ROPE_DIMS),
                value: n_rot.to_string(),
                expected: format!("an even number no larger than the head size {head_dim}"),
            });
        }
        let n_ctx_train = k.uint_opt(key::CONTEXT_LENGTH, 1 << 31)?.unwrap_or(4096) as usize;
        let rope_base = k.float_opt(key::ROPE_FREQ_BASE)?.unwrap_or(10000.0);
        let rope_freq_scale = rope_scale(&k)?;
        let rms_eps = k.float_opt(key::RMS_EPS)?.unwrap_or(1e-5);
        let n_vocab = match k.uint_opt(key::VOCAB_SIZE, MAX_VOCAB)? {
            Some(v) => v as usize,
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map_or(0, |a| a.len()),
        };
        if n_vocab == 0 {
            return Err(LoadError::MissingKey {
                key: k.full(key::VOCAB_SIZE),
            });
        }

        Ok(Self {
            arch,
            name: md
                .get(key::NAME)
                .and_then(Value::as_str)
                .unwrap_or(arch_name)
                .to_owned(),
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_base,
            rope_freq_scale,
            rope_style: RopeStyle::Normal,
            rms_eps,
            ffn: ffn_kind(arch, magic, md)?,
        })
    }

    /// Query heads per key/value head.
    pub fn gqa_ratio(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    /// Width of the key (and value) projections.
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of the query projection.
    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }
}

fn rope_scale(k: &Keys<'_>) -> Result<f32, LoadError> {
    let kind = k.value(key::ROPE_SCALING_TYPE).and_then(Value::as_str);
    let factor = k.float_opt(key::ROPE_SCALING_FACTOR)?;
    match (kind, factor) {
        (None | Some("none"), _) => match k.float_opt(key::ROPE_SCALE_LINEAR)? {
            Some(f) if f > 0.0 => Ok(1.0 / f),
            _ => Ok(1.0),
        },
        (Some("linear"), Some(f)) if f > 0.0 => Ok(1.0 / f),
        (Some("linear"), _) => Ok(1.0),
        (Some(other), _) => Err(LoadError::Unsupported {
            what: format!("rope scaling type {other:?} (supported: none, linear)"),
        }),
    }
}

/// The FFN activation: an explicit key first; then as PowerInfer decides it: Bamboo is
/// `relu(gate) · relu(up)`, a llama-architecture `PWRI` file `relu(gate) · up`, and a
/// plain llama GGUF `silu(gate) · up`.
fn ffn_kind(arch: Arch, magic: Magic, md: &Metadata) -> Result<FfnKind, LoadError> {
    if let Some(v) = md.get(KEY_FFN_ACT) {
        return match v.as_str() {
            Some("silu" | "swiglu") => Ok(FfnKind::SwiGlu),
            Some("relu" | "reglu") => Ok(FfnKind::ReGlu),
            Some("drelu") => Ok(FfnKind::DRelu),
            Some("gelu" | "geglu") => Ok(FfnKind::GeGlu),
            _ => Err(LoadError::BadKey {
                key: KEY_FFN_ACT.into(),
                value: v.to_string(),
                expected: "one of silu, relu, drelu, gelu".into(),
            }),
        };
    }
    Ok(match (arch, magic) {
        (Arch::Bamboo, _) => FfnKind::DRelu,
        (Arch::Llama, Magic::PowerInfer) => FfnKind::ReGlu,
        (Arch::Llama, Magic::Gguf) => FfnKind::SwiGlu,
    })
}
