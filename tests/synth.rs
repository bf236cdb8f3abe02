//! Small random-weight models written as GGUF files (fixed seeds), and an independent
//! float64 forward pass over their dequantized weights to check the engine against.

use powerinfer_daemon::tokenizer::byte_to_char;
use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{Array, GgufFile, GgufWriter, Magic, Value};
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::rng::Rng;
use powerinfer_ops::tensor::Matrix;

/// The shape and kind of a synthetic model.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `llama` or `bamboo`.
    pub arch: &'static str,
    pub magic: Magic,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// RoPE dimensions (default: the head size).
    pub n_rot: Option<usize>,
    pub rope_base: f32,
    pub wtype: WeightType,
    pub tied_output: bool,
    /// Explicit `powerinfer.ffn_activation`, when set.
    pub ffn_activation: Option<&'static str>,
    /// Store the down projection neuron-major as `ffn_down_t` (PowerInfer's files) in
    /// place of `ffn_down`.
    pub down_t: bool,
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            arch: "llama",
            magic: Magic::Gguf,
            n_embd: 64,
            n_ff: 96,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_rot: None,
            rope_base: 10000.0,
            wtype: WeightType::F32,
            tied_output: false,
            ffn_activation: None,
            down_t: false,
            seed: 1,
        }
    }
}

/// Control tokens appended after the 256 byte tokens.
pub const SPECIALS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"];
/// A chat template in the ChatML style the vocabulary's specials support.
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

impl Spec {
    pub fn n_vocab(&self) -> usize {
        256 + SPECIALS.len()
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The model as GGUF bytes: weights drawn from N(0, 1/sqrt(fan-in)).
    pub fn to_gguf(&self) -> Vec<u8> {
        let mut rng = Rng::new(self.seed);
        let a = self.arch;
        let mut w = GgufWriter::new().magic(self.magic);
        let mut md = |k: String, v: Value| w.add_metadata(&k, v).expect("unique key");
        md("general.architecture".into(), Value::String(a.into()));
        md(
            "general.name".into(),
            Value::String(format!("synthetic-{a}")),
        );
        md(format!("{a}.context_length"), Value::U32(256));
        md(
            format!("{a}.embedding_length"),
            Value::U32(self.n_embd as u32),
        );
        md(format!("{a}.block_count"), Value::U32(self.n_layer as u32));
        md(
            format!("{a}.feed_forward_length"),
            Value::U32(self.n_ff as u32),
        );
        md(
            format!("{a}.attention.head_count"),
            Value::U32(self.n_head as u32),
        );
        md(
            format!("{a}.attention.head_count_kv"),
            Value::U32(self.n_head_kv as u32),
        );
        md(
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        );
        md(format!("{a}.rope.freq_base"), Value::F32(self.rope_base));
        if let Some(r) = self.n_rot {
            md(format!("{a}.rope.dimension_count"), Value::U32(r as u32));
        }
        if let Some(act) = self.ffn_activation {
            md(
                "powerinfer.ffn_activation".into(),
                Value::String(act.into()),
            );
        }
        let table = byte_to_char();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        tokens.extend(SPECIALS.iter().map(|s| (*s).to_owned()));
        let mut types = vec![1i32; 256];
        types.extend([3; SPECIALS.len()]);
        md("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        md("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
        md(
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens)),
        );
        md(
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        );
        md(
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(Vec::new())),
        );
        md("tokenizer.ggml.bos_token_id".into(), Value::U32(257));
        md("tokenizer.ggml.eos_token_id".into(), Value::U32(258));
        md("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
        md(
            "tokenizer.chat_template".into(),
            Value::String(CHAT_TEMPLATE.into()),
        );

        let (e, f, q, kv) = (
            self.n_embd,
            self.n_ff,
            self.n_embd,
            self.n_head_kv * self.head_dim(),
        );
        let mut tensor = |name: &str, t: WeightType, rows: usize, cols: usize, scale: f32| {
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * scale).collect();
            let m = Matrix::quantize(t, &values, rows, cols);
            w.add_tensor(
                name,
                t.ggml(),
                &[cols as u64, rows as u64],
                m.bytes().to_vec(),
            )
            .expect("valid tensor");
        };
        let fan = |n: usize| 1.0 / (n as f32).sqrt();
        // Embeddings are read one row at a time; keep them in the matrix type too.
        tensor("token_embd.weight", self.wtype, self.n_vocab(), e, 1.0);
        for l in 0..self.n_layer {
            tensor(&format!("blk.{l}.attn_q.weight"), self.wtype, q, e, fan(e));
            tensor(&format!("blk.{l}.attn_k.weight"), self.wtype, kv, e, fan(e));
            tensor(&format!("blk.{l}.attn_v.weight"), self.wtype, kv, e, fan(e));
            tensor(
                &format!("blk.{l}.attn_output.weight"),
                self.wtype,
                e,
                q,
                fan(q),
            );
            tensor(
                &format!("blk.{l}.ffn_gate.weight"),
                self.wtype,
                f,
                e,
                fan(e),
            );
            tensor(&format!("blk.{l}.ffn_up.weight"), self.wtype, f, e, fan(e));
            if self.down_t {
                tensor(
                    &format!("blk.{l}.ffn_down_t.weight"),
                    self.wtype,
                    f,
                    e,
                    fan(f),
                );
            } else {
                tensor(
                    &format!("blk.{l}.ffn_down.weight"),
                    self.wtype,
                    e,
                    f,
                    fan(f),
                );
            }
        }
        if !self.tied_output {
            tensor("output.weight", self.wtype, self.n_vocab(), e, fan(e));
        }
        let mut norm = |name: &str| {
            let v: Vec<f32> = (0..e).map(|_| rng.uniform(0.5, 1.5)).collect();
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.add_tensor(name, GgmlType::F32, &[e as u64], bytes)
                .expect("valid tensor");
        };
        for l in 0..self.n_layer {
            norm(&format!("blk.{l}.attn_norm.weight"));
            norm(&format!("blk.{l}.ffn_norm.weight"));
        }
        norm("output_norm.weight");
        w.to_bytes()
    }
}

impl Spec {
    /// Writes the model to `dir/name.gguf` and returns the path.
    pub fn write_to(&self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, self.to_gguf()).expect("write synthetic model");
        path
    }
}

fn matrix(file: &GgufFile, name: &str) -> Vec<Vec<f64>> {
    let m = Matrix::from_gguf(file, file.tensor(name).expect("tensor")).expect("matrix");
    let mut row = vec![0f32; m.n_cols()];
    (0..m.n_rows())
        .map(|r| {
            m.dequantize_row(r, &mut row);
            row.iter().map(|&v| f64::from(v)).collect()
        })
        .collect()
}

fn vector(file: &GgufFile, name: &str) -> Vec<f64> {
    file.tensor_data_by_name::<f32>(name)
        .expect("f32 vector")
        .iter()
        .map(|&v| f64::from(v))
        .collect()
}

fn transpose(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let cols = m.first().map_or(0, Vec::len);
    (0..cols)
        .map(|j| m.iter().map(|r| r[j]).collect())
        .collect()
}

fn matvec(m: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    m.iter()
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + 1e-5).sqrt();
    x.iter().zip(w).map(|(v, g)| v * s * g).collect()
}

/// Rotates adjacent pairs of the first `n_rot` dims of each head.
fn rope(x: &mut [f64], head_dim: usize, n_rot: usize, base: f64, pos: usize) {
    for head in x.chunks_mut(head_dim) {
        for i in 0..n_rot / 2 {
            let a = pos as f64 * base.powf(-2.0 * i as f64 / n_rot as f64);
            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = x0 * a.cos() - x1 * a.sin();
            head[2 * i + 1] = x0 * a.sin() + x1 * a.cos();
        }
    }
}

/// The logits after every position of `tokens`, in float64, from the file's weights.
pub fn reference_logits(file: &GgufFile, spec: &Spec, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (hd, n_rot) = (spec.head_dim(), spec.n_rot.unwrap_or(spec.head_dim()));
    let group = spec.n_head / spec.n_head_kv;
    let embd = matrix(file, "token_embd.weight");
    let output = if spec.tied_output {
        embd.clone()
    } else {
        matrix(file, "output.weight")
    };
    let relu = |v: f64| v.max(0.0);
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let ffn_kind = spec
        .ffn_activation
        .unwrap_or(match (spec.arch, spec.magic) {
            ("bamboo", _) => "drelu",
            (_, Magic::PowerInfer) => "relu",
            _ => "silu",
        });
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| embd[t as usize].clone()).collect();
    for l in 0..spec.n_layer {
        let m = |n: &str| matrix(file, &format!("blk.{l}.{n}.weight"));
        let (wq, wk, wv, wo) = (m("attn_q"), m("attn_k"), m("attn_v"), m("attn_output"));
        let (gate, up) = (m("ffn_gate"), m("ffn_up"));
        let down = if file.tensor(&format!("blk.{l}.ffn_down_t.weight")).is_some() {
            transpose(&m("ffn_down_t"))
        } else {
            m("ffn_down")
        };
        let attn_norm = vector(file, &format!("blk.{l}.attn_norm.weight"));
        let ffn_norm = vector(file, &format!("blk.{l}.ffn_norm.weight"));
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (pos, x) in xs.iter_mut().enumerate() {
            let xn = rms_norm(x, &attn_norm);
            let mut q = matvec(&wq, &xn);
            let mut k = matvec(&wk, &xn);
            rope(&mut q, hd, n_rot, f64::from(spec.rope_base), pos);
            rope(&mut k, hd, n_rot, f64::from(spec.rope_base), pos);
            keys.push(k);
            values.push(matvec(&wv, &xn));
            let mut att = vec![0.0; spec.n_embd];
            for h in 0..spec.n_head {
                let g = h / group;
                let qh = &q[h * hd..(h + 1) * hd];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[g * hd..(g + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = p.iter().sum();
                for (pi, v) in p.iter().zip(&values) {
                    for d in 0..hd {
                        att[h * hd + d] += pi / total * v[g * hd + d];
                    }
                }
            }
            for (xi, o) in x.iter_mut().zip(matvec(&wo, &att)) {
                *xi += o;
            }
            let xn = rms_norm(x, &ffn_norm);
            let (g, u) = (matvec(&gate, &xn), matvec(&up, &xn));
            let h: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| match ffn_kind {
                    "relu" => relu(g) * u,
                    "drelu" => relu(g) * relu(u),
                    _ => silu(g) * u,
                })
                .collect();
            for (xi, o) in x.iter_mut().zip(matvec(&down, &h)) {
                *xi += o;
            }
        }
    }
    let out_norm = vector(file, "output_norm.weight");
    xs.iter()
        .map(|x| matvec(&output, &rms_norm(x, &out_norm)))
        .collect()
}
