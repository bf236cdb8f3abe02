//! Small random-weight Qwen 2 and Qwen 3 models written as GGUF files (F32 weights, fixed
//! seeds), and a float64 forward pass of each architecture written from its definition
//! over the same weights: RMS norm, q/k/v projections (Qwen 2: plus biases; Qwen 3: each
//! query and key head RMS-normed), NeoX RoPE (dimension `i` of a head rotates with
//! dimension `i + head_dim / 2`), grouped-query softmax attention, SwiGLU FFN.

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{Array, GgufWriter, Value};
use powerinfer_ops::rng::Rng;

/// Which Qwen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qwen {
    Qwen2,
    Qwen3,
}

impl Qwen {
    pub fn name(self) -> &'static str {
        match self {
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

/// The shape of a synthetic Qwen model.
#[derive(Clone, Debug)]
pub struct QwenSpec {
    pub arch: Qwen,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Written as `attention.key_length` when it is not `n_embd / n_head`.
    pub head_dim: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub tied_output: bool,
    /// Qwen 3 only: write q/k/v biases too (llama.cpp reads them when present).
    pub qwen3_biases: bool,
    pub seed: u64,
}

type Mat = Vec<Vec<f64>>;

/// One layer's weights, rows are outputs.
pub struct QwenLayer {
    attn_norm: Vec<f64>,
    wq: Mat,
    wk: Mat,
    wv: Mat,
    wo: Mat,
    /// `(q, k, v)` biases.
    bias: Option<(Vec<f64>, Vec<f64>, Vec<f64>)>,
    /// `(q, k)` per-head norm weights.
    qk_norm: Option<(Vec<f64>, Vec<f64>)>,
    ffn_norm: Vec<f64>,
    gate: Mat,
    up: Mat,
    down: Mat,
}

/// Every weight of a synthetic model, as drawn (each value exactly an f32).
pub struct QwenWeights {
    embd: Mat,
    layers: Vec<QwenLayer>,
    out_norm: Vec<f64>,
    output: Mat,
}

impl QwenSpec {
    /// Draws the weights: matrices from N(0, 1/fan-in), norms from U(0.5, 1.5), biases
    /// from N(0, 0.5).
    pub fn weights(&self) -> QwenWeights {
        let mut rng = Rng::new(self.seed);
        let mut mat = |rows: usize, cols: usize, scale: f32| -> Mat {
            (0..rows)
                .map(|_| (0..cols).map(|_| f64::from(rng.normal() * scale)).collect())
                .collect()
        };
        let (e, f, q, kv) = (
            self.n_embd,
            self.n_ff,
            self.n_head * self.head_dim,
            self.n_head_kv * self.head_dim,
        );
        let fan = |n: usize| 1.0 / (n as f32).sqrt();
        let embd = mat(self.n_vocab, e, 1.0);
        let mut layers = Vec::new();
        for _ in 0..self.n_layer {
            let (wq, wk, wv, wo) = (
                mat(q, e, fan(e)),
                mat(kv, e, fan(e)),
                mat(kv, e, fan(e)),
                mat(e, q, fan(q)),
            );
            let (gate, up, down) = (mat(f, e, fan(e)), mat(f, e, fan(e)), mat(e, f, fan(f)));
            layers.push(QwenLayer {
                attn_norm: Vec::new(),
                wq,
                wk,
                wv,
                wo,
                bias: None,
                qk_norm: None,
                ffn_norm: Vec::new(),
                gate,
                up,
                down,
            });
        }
        let output = mat(self.n_vocab, e, fan(e));
        let mut vec_of = |n: usize, lo: f32, hi: f32| -> Vec<f64> {
            (0..n).map(|_| f64::from(rng.uniform(lo, hi))).collect()
        };
        for l in &mut layers {
            l.attn_norm = vec_of(e, 0.5, 1.5);
            l.ffn_norm = vec_of(e, 0.5, 1.5);
            if self.arch == Qwen::Qwen2 || self.qwen3_biases {
                l.bias = Some((
                    vec_of(q, -1.0, 1.0),
                    vec_of(kv, -1.0, 1.0),
                    vec_of(kv, -1.0, 1.0),
                ));
            }
            if self.arch == Qwen::Qwen3 {
                l.qk_norm = Some((
                    vec_of(self.head_dim, 0.5, 1.5),
                    vec_of(self.head_dim, 0.5, 1.5),
                ));
            }
        }
        let out_norm = vec_of(e, 0.5, 1.5);
        QwenWeights {
            output: if self.tied_output {
                embd.clone()
            } else {
                output
            },
            embd,
            layers,
            out_norm,
        }
    }

    /// The model as GGUF bytes, leaving out the tensors named in `skip`.
    pub fn to_gguf(&self, w: &QwenWeights, skip: &[&str]) -> Vec<u8> {
        let a = self.arch.name();
        let mut g = GgufWriter::new();
        let mut md = |k: String, v: Value| g.add_metadata(&k, v).expect("unique key");
        md("general.architecture".into(), Value::String(a.into()));
        for (k, v) in [
            ("context_length", 256),
            ("embedding_length", self.n_embd),
            ("block_count", self.n_layer),
            ("feed_forward_length", self.n_ff),
            ("attention.head_count", self.n_head),
            ("attention.head_count_kv", self.n_head_kv),
        ] {
            md(format!("{a}.{k}"), Value::U32(v as u32));
        }
        if self.head_dim * self.n_head != self.n_embd {
            md(
                format!("{a}.attention.key_length"),
                Value::U32(self.head_dim as u32),
            );
            md(
                format!("{a}.attention.value_length"),
                Value::U32(self.head_dim as u32),
            );
        }
        md(
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(self.rms_eps as f32),
        );
        md(
            format!("{a}.rope.freq_base"),
            Value::F32(self.rope_base as f32),
        );
        md("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        md("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
        md(
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(
                (0..self.n_vocab).map(|i| format!("t{i}")).collect(),
            )),
        );
        md(
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(Vec::new())),
        );
        let mut tensor = |name: String, dims: Vec<u64>, values: Vec<f64>| {
            if skip.contains(&name.as_str()) {
                return;
            }
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            g.add_tensor(&name, GgmlType::F32, &dims, bytes)
                .expect("valid tensor");
        };
        let mut matrix = |name: String, m: &Mat| {
            let dims = vec![m[0].len() as u64, m.len() as u64];
            tensor(name, dims, m.iter().flatten().copied().collect());
        };
        matrix("token_embd.weight".into(), &w.embd);
        if !self.tied_output {
            matrix("output.weight".into(), &w.output);
        }
        for (i, l) in w.layers.iter().enumerate() {
            matrix(format!("blk.{i}.attn_q.weight"), &l.wq);
            matrix(format!("blk.{i}.attn_k.weight"), &l.wk);
            matrix(format!("blk.{i}.attn_v.weight"), &l.wv);
            matrix(format!("blk.{i}.attn_output.weight"), &l.wo);
            matrix(format!("blk.{i}.ffn_gate.weight"), &l.gate);
            matrix(format!("blk.{i}.ffn_up.weight"), &l.up);
            matrix(format!("blk.{i}.ffn_down.weight"), &l.down);
        }
        let mut vector = |name: String, v: &[f64]| {
            tensor(name, vec![v.len() as u64], v.to_vec());
        };
        vector("output_norm.weight".into(), &w.out_norm);
        for (i, l) in w.layers.iter().enumerate() {
            vector(format!("blk.{i}.attn_norm.weight"), &l.attn_norm);
            vector(format!("blk.{i}.ffn_norm.weight"), &l.ffn_norm);
            if let Some((q, k, v)) = &l.bias {
                vector(format!("blk.{i}.attn_q.bias"), q);
                vector(format!("blk.{i}.attn_k.bias"), k);
                vector(format!("blk.{i}.attn_v.bias"), v);
            }
            if let Some((q, k)) = &l.qk_norm {
                vector(format!("blk.{i}.attn_q_norm.weight"), q);
                vector(format!("blk.{i}.attn_k_norm.weight"), k);
            }
        }
        g.to_bytes()
    }
}

fn matvec(m: &Mat, x: &[f64]) -> Vec<f64> {
    m.iter()
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * s * g).collect()
}

/// NeoX RoPE of one head: dimension `i` and `i + d/2` rotate together by
/// `pos · base^(-2i/d)`.
fn rope_neox(head: &mut [f64], base: f64, pos: usize) {
    let half = head.len() / 2;
    for i in 0..half {
        let a = pos as f64 * base.powf(-2.0 * i as f64 / head.len() as f64);
        let (x0, x1) = (head[i], head[i + half]);
        head[i] = x0 * a.cos() - x1 * a.sin();
        head[i + half] = x0 * a.sin() + x1 * a.cos();
    }
}

/// The logits after every position of `tokens`, in float64.
pub fn qwen_reference(spec: &QwenSpec, w: &QwenWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (hd, eps) = (spec.head_dim, spec.rms_eps);
    let group = spec.n_head / spec.n_head_kv;
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| w.embd[t as usize].clone()).collect();
    for l in &w.layers {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (pos, x) in xs.iter_mut().enumerate() {
            let xn = rms_norm(x, &l.attn_norm, eps);
            let (mut q, mut k, mut v) =
                (matvec(&l.wq, &xn), matvec(&l.wk, &xn), matvec(&l.wv, &xn));
            if let Some((bq, bk, bv)) = &l.bias {
                for (p, b) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    p.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
            }
            for (p, norm) in [
                (&mut q, l.qk_norm.as_ref().map(|n| &n.0)),
                (&mut k, l.qk_norm.as_ref().map(|n| &n.1)),
            ] {
                for head in p.chunks_mut(hd) {
                    if let Some(nw) = norm {
                        let normed = rms_norm(head, nw, eps);
                        head.copy_from_slice(&normed);
                    }
                    rope_neox(head, spec.rope_base, pos);
                }
            }
            keys.push(k);
            values.push(v);
            let mut att = vec![0.0; spec.n_head * hd];
            for h in 0..spec.n_head {
                let kvh = h / group;
                let qh = &q[h * hd..(h + 1) * hd];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k: &Vec<f64>| {
                        qh.iter()
                            .zip(&k[kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = p.iter().sum();
                for (pi, v) in p.iter().zip(&values) {
                    for d in 0..hd {
                        att[h * hd + d] += pi / total * v[kvh * hd + d];
                    }
                }
            }
            for (xi, o) in x.iter_mut().zip(matvec(&l.wo, &att)) {
                *xi += o;
            }
            let xn = rms_norm(x, &l.ffn_norm, eps);
            let hidden: Vec<f64> = matvec(&l.gate, &xn)
                .iter()
                .zip(matvec(&l.up, &xn))
                .map(|(&g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (xi, o) in x.iter_mut().zip(matvec(&l.down, &hidden)) {
                *xi += o;
            }
        }
    }
    xs.iter()
        .map(|x| matvec(&w.output, &rms_norm(x, &w.out_norm, eps)))
        .collect()
}
