//! Hyper-parameters of a model, read from GGUF metadata and validated.

use powerinfer_ops::gguf::{Array, Magic, Metadata, Value};
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
    /// Gemma 3: scaled embeddings, RMS norms before and after attention and FFN, q/k
    /// norms, a GELU FFN, sliding-window attention on most layers (with their own RoPE
    /// base), NeoX RoPE.
    Gemma3,
    /// Qwen 2 / 2.5: the LLaMA layer with biases on the q, k and v projections, NeoX RoPE.
    Qwen2,
    /// Qwen 3: the LLaMA layer with q/k norms (before RoPE), NeoX RoPE, and a head size
    /// of its own (`attention.key_length`, not always `n_embd / n_head`).
    Qwen3,
}

/// Every architecture [`Arch::parse`] knows, as GGUF names them.
pub const SUPPORTED_ARCHS: &[&str] = &["llama", "bamboo", "gemma3", "qwen2", "qwen3"];

/// Whether a layer's q, k and v projections carry biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvBias {
    /// The file has none (any there are not read).
    Absent,
    /// Used when the file has them (all three or none).
    Optional,
    /// The file must have all three.
    Required,
}

impl Arch {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "bamboo" => Some(Self::Bamboo),
            "gemma3" => Some(Self::Gemma3),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }

    /// The prefix of this architecture's metadata keys.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Bamboo => "bamboo",
            Self::Gemma3 => "gemma3",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// Whether every query and key head is RMS-normed (`[head_dim]` weights) before RoPE.
    pub fn has_qk_norms(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Qwen3)
    }

    /// Whether the attention and FFN outputs are RMS-normed before their residual adds.
    pub fn has_post_norms(self) -> bool {
        matches!(self, Self::Gemma3)
    }

    /// Biases on the q, k and v projections: Qwen 2 has them; Qwen 3 files may (llama.cpp
    /// reads them when present).
    pub fn qkv_bias(self) -> QkvBias {
        match self {
            Self::Qwen2 => QkvBias::Required,
            Self::Qwen3 => QkvBias::Optional,
            Self::Llama | Self::Bamboo | Self::Gemma3 => QkvBias::Absent,
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
    /// What the token embedding is multiplied by (Gemma: `sqrt(n_embd)`; else 1).
    pub embd_scale: f32,
    /// What query·key products are multiplied by before the softmax.
    pub attn_scale: f32,
    /// Attention scores become `cap · tanh(score / cap)` when set.
    pub attn_softcap: Option<f32>,
    /// Logits become `cap · tanh(logit / cap)` when set.
    pub final_softcap: Option<f32>,
    /// Local attention on some layers, when the model has it.
    pub sliding: Option<SlidingWindow>,
}

/// Sliding-window attention: on the layers it covers, a token at position `p` attends to
/// positions `p - window + 1 ..= p` only, and RoPE has its own base and scale there.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    /// Per layer, whether it is local (sliding) rather than global.
    pub layers: Vec<bool>,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
}

/// Gemma 3's default layer pattern: of every 6 layers the first 5 are local.
const GEMMA3_SWA_PERIOD: u64 = 6;
/// RoPE base of Gemma 3's local layers when the file does not say.
const GEMMA3_LOCAL_ROPE_BASE: f32 = 10000.0;
/// Gemma 3 27B: its `query_pre_attn_scalar` is `n_embd / n_head`, not the head size
/// (as llama.cpp recognises it, by its layer count).
const GEMMA3_27B_LAYERS: usize = 62;

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
            what: format!(
                "architecture {arch_name:?} (supported: {})",
                SUPPORTED_ARCHS.join(", ")
            ),
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
        if rope_base <= 0.0 {
            return Err(LoadError::BadKey {
                key: k.full(key::ROPE_FREQ_BASE),
                value: rope_base.to_string(),
                expected: "a positive float".into(),
            });
        }
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
            rope_style: match arch {
                Arch::Llama | Arch::Bamboo => RopeStyle::Normal,
                Arch::Gemma3 | Arch::Qwen2 | Arch::Qwen3 => RopeStyle::Neox,
            },
            rms_eps,
            ffn: ffn_kind(arch, magic, md)?,
            embd_scale: match arch {
                Arch::Llama | Arch::Bamboo | Arch::Qwen2 | Arch::Qwen3 => 1.0,
                Arch::Gemma3 => (n_embd as f32).sqrt(),
            },
            attn_scale: match arch {
                Arch::Gemma3 if n_layer == GEMMA3_27B_LAYERS => {
                    1.0 / ((n_embd / n_head) as f32).sqrt()
                }
                _ => 1.0 / (head_dim as f32).sqrt(),
            },
            attn_softcap: softcap(&k, key::ATTN_SOFTCAP)?,
            final_softcap: softcap(&k, key::FINAL_SOFTCAP)?,
            sliding: match arch {
                Arch::Llama | Arch::Bamboo | Arch::Qwen2 | Arch::Qwen3 => None,
                Arch::Gemma3 => sliding_window(&k, n_layer)?,
            },
        })
    }

    /// The attention window of `layer`: `Some(window)` on a local layer.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let s = self.sliding.as_ref()?;
        s.layers
            .get(layer)
            .copied()
            .unwrap_or(false)
            .then_some(s.window)
    }

    /// Why the model's layers cannot run on a device, if they cannot: the device ops
    /// implement the llama layer only.
    pub fn device_unsupported(&self) -> Option<String> {
        let host_only = |what: &str| {
            Some(format!(
                "placing {} layers on a device ({what} computed on the host only; load it \
                 with --device cpu)",
                self.arch.prefix()
            ))
        };
        match self.arch {
            Arch::Llama | Arch::Bamboo => None,
            Arch::Gemma3 => host_only("q/k norms, post-norms and sliding windows are"),
            Arch::Qwen2 => host_only("q, k and v biases are"),
            Arch::Qwen3 => host_only("q/k norms are"),
        }
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

/// A soft-capping value: absent, or 0 (as converters write "none"), means no capping.
fn softcap(k: &Keys<'_>, name: &str) -> Result<Option<f32>, LoadError> {
    match k.float_opt(name)? {
        None | Some(0.0) => Ok(None),
        Some(c) if c > 0.0 => Ok(Some(c)),
        Some(c) => Err(LoadError::BadKey {
            key: k.full(name),
            value: c.to_string(),
            expected: "a positive float (or 0 for none)".into(),
        }),
    }
}

/// Gemma 3's local layers, as llama.cpp reads them: a window from
/// `attention.sliding_window` (none, or 0: every layer global); which layers are local
/// from `attention.sliding_window_pattern`, an array of booleans or a period `n` (the
/// last layer of every `n` is global; 0: all local), by default 6; the local layers'
/// RoPE base from `rope.freq_base_swa` (default 10000) and no position scaling there.
fn sliding_window(k: &Keys<'_>, n_layer: usize) -> Result<Option<SlidingWindow>, LoadError> {
    let window = match k.uint_opt(key::SLIDING_WINDOW, 1 << 31)? {
        None | Some(0) => return Ok(None),
        Some(w) => w as usize,
    };
    let pattern_key = k.full(key::SLIDING_WINDOW_PATTERN);
    let layers = match k.value(key::SLIDING_WINDOW_PATTERN) {
        Some(Value::Array(a)) => match a {
            Array::Bool(b) if b.len() == n_layer => b.clone(),
            _ => {
                return Err(LoadError::BadKey {
                    key: pattern_key,
                    value: format!("an array of {} values", a.len()),
                    expected: format!("{n_layer} booleans, one per layer"),
                });
            }
        },
        _ => {
            let period = k
                .uint_opt(key::SLIDING_WINDOW_PATTERN, MAX_LAYERS)?
                .unwrap_or(GEMMA3_SWA_PERIOD) as usize;
            (0..n_layer)
                .map(|l| period == 0 || l % period < period - 1)
                .collect()
        }
    };
    let rope_base = k
        .float_opt(key::ROPE_FREQ_BASE_SWA)?
        .unwrap_or(GEMMA3_LOCAL_ROPE_BASE);
    if rope_base <= 0.0 {
        return Err(LoadError::BadKey {
            key: k.full(key::ROPE_FREQ_BASE_SWA),
            value: rope_base.to_string(),
            expected: "a positive float".into(),
        });
    }
    Ok(Some(SlidingWindow {
        window,
        layers,
        rope_base,
        rope_freq_scale: 1.0,
    }))
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
        (Arch::Gemma3, _) => FfnKind::GeGlu,
        (Arch::Qwen2 | Arch::Qwen3, _) => FfnKind::SwiGlu,
        (Arch::Llama, Magic::PowerInfer) => FfnKind::ReGlu,
        (Arch::Llama, Magic::Gguf) => FfnKind::SwiGlu,
    })
}

#[cfg(test)]
mod tests {
    use powerinfer_ops::gguf::{Array, Magic, Metadata, Value};

    use super::*;

    /// Gemma 3 270M's hyper-parameters as its GGUF states them.
    fn gemma3() -> Metadata {
        let mut md = Metadata::new();
        md.set(key::ARCHITECTURE, Value::String("gemma3".into()));
        for (k, v) in [
            (key::EMBEDDING_LENGTH, 640),
            (key::BLOCK_COUNT, 18),
            (key::FEED_FORWARD_LENGTH, 2048),
            (key::HEAD_COUNT, 4),
            (key::HEAD_COUNT_KV, 1),
            (key::KEY_LENGTH, 256),
            (key::VALUE_LENGTH, 256),
            (key::SLIDING_WINDOW, 512),
            (key::VOCAB_SIZE, 262_144),
        ] {
            md.set(&format!("gemma3.{k}"), Value::U32(v));
        }
        md.set("gemma3.rope.freq_base", Value::F32(1e6));
        md.set("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6));
        md
    }

    #[test]
    fn gemma3_has_local_layers_with_their_rope_and_global_ones_every_sixth() {
        let c = ModelConfig::from_metadata(&gemma3(), Magic::Gguf).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        assert_eq!((c.n_embd_q(), c.n_embd_kv(), c.n_rot), (1024, 256, 256));
        assert_eq!(c.rope_style, RopeStyle::Neox);
        assert_eq!(c.ffn, FfnKind::GeGlu);
        assert_eq!(c.embd_scale, 640f32.sqrt());
        assert_eq!(c.attn_scale, 1.0 / 16.0);
        assert_eq!((c.attn_softcap, c.final_softcap), (None, None));
        let global: Vec<usize> = (0..18).filter(|&l| c.window(l).is_none()).collect();
        assert_eq!(global, [5, 11, 17]);
        assert_eq!(c.window(0), Some(512));
        let sw = c.sliding.as_ref().unwrap();
        assert_eq!(
            (sw.rope_base, sw.rope_freq_scale, c.rope_base),
            (1e4, 1.0, 1e6)
        );
        assert!(c.device_unsupported().is_some());
    }

    #[test]
    fn gemma3_keys_that_change_the_layers_are_read_and_bad_ones_named() {
        let mut md = gemma3();
        md.set(
            "gemma3.attention.sliding_window_pattern",
            Value::Array(Array::Bool((0..18).map(|l| l % 2 == 0).collect())),
        );
        md.set("gemma3.rope.freq_base_swa", Value::F32(5e4));
        md.set("gemma3.final_logit_softcapping", Value::F32(30.0));
        md.set("gemma3.attn_logit_softcapping", Value::F32(0.0));
        let c = ModelConfig::from_metadata(&md, Magic::Gguf).unwrap();
        assert_eq!((c.window(0), c.window(1)), (Some(512), None));
        assert_eq!(c.sliding.as_ref().unwrap().rope_base, 5e4);
        assert_eq!((c.attn_softcap, c.final_softcap), (None, Some(30.0)));

        md.set(
            "gemma3.attention.sliding_window_pattern",
            Value::Array(Array::Bool(vec![true; 3])),
        );
        let e = ModelConfig::from_metadata(&md, Magic::Gguf).unwrap_err();
        assert!(e.to_string().contains("sliding_window_pattern"), "{e}");

        let mut md = gemma3();
        md.set("gemma3.attention.sliding_window_pattern", Value::U32(3));
        let c = ModelConfig::from_metadata(&md, Magic::Gguf).unwrap();
        assert_eq!((c.window(1), c.window(2)), (Some(512), None));
        md.set("gemma3.attention.sliding_window", Value::U32(0));
        let c = ModelConfig::from_metadata(&md, Magic::Gguf).unwrap();
        assert!(c.sliding.is_none() && c.window(0).is_none());

        let mut md = gemma3();
        md.set(key::ARCHITECTURE, Value::String("gemma4".into()));
        let e = ModelConfig::from_metadata(&md, Magic::Gguf).unwrap_err();
        assert!(
            e.to_string()
                .contains("supported: llama, bamboo, gemma3, qwen2, qwen3"),
            "{e}"
        );
    }

    /// Qwen 3 0.6B's attention shape: 16 heads of `head_dim` (128 there) over an embedding
    /// of 1024; no key length stated when `head_dim` is `None`.
    fn qwen(arch: &str, head_dim: Option<u32>) -> Metadata {
        let mut md = Metadata::new();
        md.set(key::ARCHITECTURE, Value::String(arch.into()));
        for (k, v) in [
            (key::EMBEDDING_LENGTH, 1024),
            (key::BLOCK_COUNT, 28),
            (key::FEED_FORWARD_LENGTH, 3072),
            (key::HEAD_COUNT, 16),
            (key::HEAD_COUNT_KV, 8),
            (key::VOCAB_SIZE, 151_936),
        ] {
            md.set(&format!("{arch}.{k}"), Value::U32(v));
        }
        if let Some(d) = head_dim {
            md.set(&format!("{arch}.{}", key::KEY_LENGTH), Value::U32(d));
            md.set(&format!("{arch}.{}", key::VALUE_LENGTH), Value::U32(d));
        }
        md
    }

    #[test]
    fn qwen_heads_neox_rope_and_swiglu() {
        let c = ModelConfig::from_metadata(&qwen("qwen3", Some(128)), Magic::Gguf).unwrap();
        assert_eq!(c.arch, Arch::Qwen3);
        assert_eq!((c.head_dim, c.n_embd_q(), c.n_embd_kv()), (128, 2048, 1024));
        assert_eq!(
            (c.n_rot, c.rope_style, c.ffn),
            (128, RopeStyle::Neox, FfnKind::SwiGlu)
        );
        assert_eq!(c.attn_scale, 1.0 / 128f32.sqrt());
        assert!(c.arch.has_qk_norms() && !c.arch.has_post_norms());
        assert_eq!(c.arch.qkv_bias(), QkvBias::Optional);
        assert!(c.device_unsupported().unwrap().contains("qwen3"));

        let c = ModelConfig::from_metadata(&qwen("qwen2", None), Magic::Gguf).unwrap();
        assert_eq!(
            (c.arch, c.head_dim, c.rope_style),
            (Arch::Qwen2, 64, RopeStyle::Neox)
        );
        assert!(!c.arch.has_qk_norms() && c.arch.qkv_bias() == QkvBias::Required);
        assert_eq!((c.embd_scale, c.sliding.is_none()), (1.0, true));
    }
}
