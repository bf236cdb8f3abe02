//! The model's tensors, looked up by name, shape-checked against the configuration, and
//! borrowed from the mapped file without copying (norm vectors are copied: they are tiny).

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufFile, TensorInfo};
use powerinfer_ops::tensor::Matrix;

use super::LoadError;
use super::config::{FfnKind, ModelConfig, QkvBias};
use super::names::{self, Blk};
use super::sparsity::Predictor;
use crate::ids::LayerId;

/// One transformer block.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// `[n_embd] → [n_head · head_dim]`
    pub wq: Matrix,
    /// `[n_embd] → [n_head_kv · head_dim]`
    pub wk: Matrix,
    pub wv: Matrix,
    /// `[n_head · head_dim] → [n_embd]`
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    /// `[n_embd] → [n_ff]`
    pub gate: Matrix,
    pub up: Matrix,
    /// `[n_ff] → [n_embd]`, row per output (absent from PowerInfer files that carry
    /// `down_t` instead).
    pub down: Option<Matrix>,
    /// The same map neuron-major: row `i` is neuron `i`'s `[n_embd]` contribution. From
    /// the file, or transposed from `down` when a sparse mode needs it.
    pub down_t: Option<Matrix>,
    /// Norms of every query and key head (Gemma 3, Qwen 3), absent otherwise.
    pub qk_norms: Option<QkNorms>,
    /// Norms of the attention and FFN outputs (Gemma 3), absent otherwise.
    pub post_norms: Option<PostNorms>,
    /// Biases of the q, k and v projections (Qwen 2), absent otherwise.
    pub qkv_bias: Option<QkvBiases>,
}

/// RMS norm weights of every query and key head, applied before RoPE.
pub struct QkNorms {
    /// `[head_dim]`
    pub q: Vec<f32>,
    /// `[head_dim]`
    pub k: Vec<f32>,
}

/// RMS norm weights of a layer's outputs, applied before their residual adds.
pub struct PostNorms {
    /// `[n_embd]`: the attention output.
    pub attn: Vec<f32>,
    /// `[n_embd]`: the FFN output.
    pub ffn: Vec<f32>,
}

/// What is added to the q, k and v projections of every token.
pub struct QkvBiases {
    /// `[n_head · head_dim]`
    pub q: Vec<f32>,
    /// `[n_head_kv · head_dim]`
    pub k: Vec<f32>,
    /// `[n_head_kv · head_dim]`
    pub v: Vec<f32>,
}

impl LayerWeights {
    /// Norm and bias values besides `attn_norm` and `ffn_norm`.
    fn n_extra_params(&self) -> u64 {
        let qk = self.qk_norms.as_ref().map_or(0, |n| n.q.len() + n.k.len());
        let post = self
            .post_norms
            .as_ref()
            .map_or(0, |n| n.attn.len() + n.ffn.len());
        let bias = self
            .qkv_bias
            .as_ref()
            .map_or(0, |b| b.q.len() + b.k.len() + b.v.len());
        (qk + post + bias) as u64
    }
}

impl LayerWeights {
    /// The FFN matrices one dense step reads.
    pub fn ffn_bytes(&self) -> usize {
        let down = self
            .down
            .as_ref()
            .or(self.down_t.as_ref())
            .map_or(0, Matrix::n_bytes);
        self.gate.n_bytes() + self.up.n_bytes() + down
    }

    /// Attention matrices.
    pub fn attn_bytes(&self) -> usize {
        [&self.wq, &self.wk, &self.wv, &self.wo]
            .iter()
            .map(|m| m.n_bytes())
            .sum()
    }
}

pub struct Weights {
    /// `[n_vocab]` rows of `[n_embd]`.
    pub token_embd: Matrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// `[n_embd] → [n_vocab]`: `output.weight`, or the embedding when the file ties them.
    pub output: Matrix,
    pub output_tied: bool,
    /// Per-pair RoPE frequency divisors (LLaMA 3.1 style), when the file has them.
    pub rope_freqs: Option<Vec<f32>>,
}

fn info<'a>(file: &'a GgufFile, name: &str) -> Result<&'a TensorInfo, LoadError> {
    file.tensor(name).ok_or_else(|| LoadError::MissingTensor {
        name: name.to_owned(),
    })
}

fn shape_error(t: &TensorInfo, expected: String) -> LoadError {
    LoadError::Shape {
        name: t.name.clone(),
        dims: t.dims.clone(),
        expected,
    }
}

/// A `[n_cols, n_rows]` matrix.
fn matrix(file: &GgufFile, name: &str, n_cols: usize, n_rows: usize) -> Result<Matrix, LoadError> {
    let t = info(file, name)?;
    let m = Matrix::from_gguf(file, t).map_err(LoadError::Tensor)?;
    if (m.n_cols(), m.n_rows()) != (n_cols, n_rows) {
        return Err(shape_error(t, format!("[{n_cols}, {n_rows}]")));
    }
    Ok(m)
}

/// A `[n_cols, n_rows]` matrix that may be absent.
fn optional(
    file: &GgufFile,
    name: &str,
    n_cols: usize,
    n_rows: usize,
) -> Result<Option<Matrix>, LoadError> {
    match file.tensor(name) {
        Some(_) => matrix(file, name, n_cols, n_rows).map(Some),
        None => Ok(None),
    }
}

/// PowerInfer's predictor of layer `l` (`fc1` `[n_embd, rank]`, `fc2` `[rank, n_ff]`),
/// if the file has one; the rank may differ from layer to layer.
pub fn predictor(
    file: &GgufFile,
    c: &ModelConfig,
    l: LayerId,
) -> Result<Option<Predictor>, LoadError> {
    let (n1, n2) = (Blk::Fc1.name(l), Blk::Fc2.name(l));
    match (file.tensor(&n1), file.tensor(&n2)) {
        (None, None) => Ok(None),
        (Some(t1), Some(_)) => {
            let rank = match t1.dims.as_slice() {
                [_, r, ..] if *r > 0 => *r as usize,
                _ => return Err(shape_error(t1, format!("[{}, rank]", c.n_embd))),
            };
            let bias = |name: String, len: usize| -> Result<Option<Vec<f32>>, LoadError> {
                match file.tensor(&name) {
                    Some(_) => vector(file, &name, len).map(Some),
                    None => Ok(None),
                }
            };
            Ok(Some(Predictor {
                fc1: matrix(file, &n1, c.n_embd, rank)?,
                fc2: matrix(file, &n2, rank, c.n_ff)?,
                b1: bias(bias_name(&n1), rank)?,
                b2: bias(bias_name(&n2), c.n_ff)?,
            }))
        }
        (None, Some(_)) => Err(LoadError::MissingTensor { name: n1 }),
        (Some(_), None) => Err(LoadError::MissingTensor { name: n2 }),
    }
}

/// `blk.N.fc1.weight` → `blk.N.fc1.bias`
pub fn bias_name(weight: &str) -> String {
    format!("{}.bias", weight.strip_suffix(".weight").unwrap_or(weight))
}

/// An f32 vector of `len` values (norm weights are stored as F32 by every converter).
fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
    let t = info(file, name)?;
    if t.dims.iter().product::<u64>() != len as u64 {
        return Err(shape_error(t, format!("[{len}]")));
    }
    match t.dtype {
        GgmlType::F32 => Ok(file
            .tensor_data::<f32>(t)
            .map_err(|e| LoadError::Other(e.to_string()))?
            .to_vec()),
        other => Err(LoadError::Unsupported {
            what: format!("{other} for the vector {name} (expected F32)"),
        }),
    }
}

/// Layer `l`'s q, k and v biases as its architecture has them: all three when required
/// (a missing one is refused by name), all three or none when optional.
fn qkv_biases(
    file: &GgufFile,
    c: &ModelConfig,
    l: LayerId,
) -> Result<Option<QkvBiases>, LoadError> {
    let names = [Blk::AttnQBias, Blk::AttnKBias, Blk::AttnVBias].map(|b| b.name(l));
    match c.arch.qkv_bias() {
        QkvBias::Absent => return Ok(None),
        QkvBias::Optional if names.iter().all(|n| file.tensor(n).is_none()) => return Ok(None),
        QkvBias::Optional | QkvBias::Required => {}
    }
    if let Some(name) = names.iter().find(|n| file.tensor(n).is_none()) {
        return Err(LoadError::MissingTensor { name: name.clone() });
    }
    let [q, k, v] = names;
    Ok(Some(QkvBiases {
        q: vector(file, &q, c.n_embd_q())?,
        k: vector(file, &k, c.n_embd_kv())?,
        v: vector(file, &v, c.n_embd_kv())?,
    }))
}

impl Weights {
    pub fn load(file: &GgufFile, c: &ModelConfig) -> Result<Self, LoadError> {
        let token_embd = matrix(file, names::TOKEN_EMBD, c.n_embd, c.n_vocab)?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let l = LayerId(l);
            let m = |blk: Blk, cols, rows| matrix(file, &blk.name(l), cols, rows);
            let v = |blk: Blk, len| vector(file, &blk.name(l), len);
            layers.push(LayerWeights {
                attn_norm: v(Blk::AttnNorm, c.n_embd)?,
                wq: m(Blk::AttnQ, c.n_embd, c.n_embd_q())?,
                wk: m(Blk::AttnK, c.n_embd, c.n_embd_kv())?,
                wv: m(Blk::AttnV, c.n_embd, c.n_embd_kv())?,
                wo: m(Blk::AttnOutput, c.n_embd_q(), c.n_embd)?,
                ffn_norm: v(Blk::FfnNorm, c.n_embd)?,
                gate: m(Blk::FfnGate, c.n_embd, c.n_ff)?,
                up: m(Blk::FfnUp, c.n_embd, c.n_ff)?,
                down: optional(file, &Blk::FfnDown.name(l), c.n_ff, c.n_embd)?,
                down_t: optional(file, &Blk::FfnDownT.name(l), c.n_embd, c.n_ff)?,
                qk_norms: if c.arch.has_qk_norms() {
                    Some(QkNorms {
                        q: v(Blk::AttnQNorm, c.head_dim)?,
                        k: v(Blk::AttnKNorm, c.head_dim)?,
                    })
                } else {
                    None
                },
                post_norms: if c.arch.has_post_norms() {
                    Some(PostNorms {
                        attn: v(Blk::AttnPostNorm, c.n_embd)?,
                        ffn: v(Blk::FfnPostNorm, c.n_embd)?,
                    })
                } else {
                    None
                },
                qkv_bias: qkv_biases(file, c, l)?,
            });
            if layers
                .last()
                .is_some_and(|w| w.down.is_none() && w.down_t.is_none())
            {
                return Err(LoadError::MissingTensor {
                    name: Blk::FfnDown.name(l),
                });
            }
        }
        let (output, output_tied) = if file.tensor(names::OUTPUT).is_some() {
            (matrix(file, names::OUTPUT, c.n_embd, c.n_vocab)?, false)
        } else {
            (token_embd.clone(), true)
        };
        let rope_freqs = match file.tensor(names::ROPE_FREQS) {
            Some(_) => Some(vector(file, names::ROPE_FREQS, c.n_rot / 2)?),
            None => None,
        };
        // Unused by this FFN kind today; kept explicit so a new kind fails to compile here.
        match c.ffn {
            FfnKind::SwiGlu | FfnKind::ReGlu | FfnKind::DRelu | FfnKind::GeGlu => {}
        }
        Ok(Self {
            token_embd,
            layers,
            output_norm: vector(file, names::OUTPUT_NORM, c.n_embd)?,
            output,
            output_tied,
            rope_freqs,
        })
    }

    /// Parameters: matrix elements and norm vectors, a tied output counted once, the down
    /// projection once whichever forms are loaded.
    pub fn n_params(&self) -> u64 {
        let m = |x: &Matrix| (x.n_rows() * x.n_cols()) as u64;
        let mut n = m(&self.token_embd) + self.output_norm.len() as u64;
        if !self.output_tied {
            n += m(&self.output);
        }
        for l in &self.layers {
            n += [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up]
                .iter()
                .map(|x| m(x))
                .sum::<u64>();
            n += l.down.as_ref().or(l.down_t.as_ref()).map_or(0, m);
            n += (l.attn_norm.len() + l.ffn_norm.len()) as u64;
            n += l.n_extra_params();
        }
        n
    }

    /// Bytes of weights one decode step reads (every matrix once).
    pub fn bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.attn_bytes() + l.ffn_bytes())
            .sum();
        layers + self.output.n_bytes()
    }
}
