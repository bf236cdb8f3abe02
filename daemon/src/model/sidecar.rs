//! The sparsity sidecar: a GGUF file next to the model (`NAME.gguf` →
//! `NAME.sparsity.gguf`) holding what calibration learned about the model's neurons.
//!
//! Keys (all under `powerinfer.`; only the version and shape keys are required):
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `general.architecture` | string | `powerinfer.sparsity` |
//! | `powerinfer.sidecar.version` | u32 | 1 |
//! | `powerinfer.model.block_count` | u32 | layers of the model it describes |
//! | `powerinfer.model.embedding_length` | u32 | `n_embd` |
//! | `powerinfer.model.feed_forward_length` | u32 | `n_ff` |
//! | `powerinfer.calibration.tokens` | u64 | tokens the statistics were counted over |
//! | `powerinfer.gate.target_sparsity` | f32 | share of neurons the thresholds turn off |
//! | `powerinfer.gate.thresholds` | f32 array, per layer | gate mode: active where `|act(gate)| >` it |
//! | `powerinfer.sparse_threshold` | f32 | predictor mode: active where the logit `≥` it |
//!
//! Tensors: `blk.N.activation_freq` (F32 `[n_ff]`, how often each neuron fired), and the
//! predictors `blk.N.fc1.weight` (`[n_embd, rank]`) and `blk.N.fc2.weight` (`[rank, n_ff]`)
//! in PowerInfer's layout (Q8_0 where the row lengths allow, else F16), with F32 biases
//! `blk.N.fc1.bias` (`[rank]`) and `blk.N.fc2.bias` (`[n_ff]`) that PowerInfer's lack.

use std::path::{Path, PathBuf};

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{Array, GgufFile, GgufWriter, Value};
use powerinfer_ops::pod::as_bytes;
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::tensor::Matrix;

use super::Model;
use super::weights;
use super::{LoadError, ModelConfig};
use crate::ids::LayerId;

pub const ARCHITECTURE: &str = "powerinfer.sparsity";
pub const VERSION: u32 = 1;

pub mod key {
    pub const VERSION: &str = "powerinfer.sidecar.version";
    pub const BLOCK_COUNT: &str = "powerinfer.model.block_count";
    pub const EMBEDDING_LENGTH: &str = "powerinfer.model.embedding_length";
    pub const FEED_FORWARD_LENGTH: &str = "powerinfer.model.feed_forward_length";
    pub const CALIBRATION_TOKENS: &str = "powerinfer.calibration.tokens";
    pub const TARGET_SPARSITY: &str = "powerinfer.gate.target_sparsity";
    pub const GATE_THRESHOLDS: &str = "powerinfer.gate.thresholds";
    pub const SPARSE_THRESHOLD: &str = super::super::names::key::SPARSE_THRESHOLD;
}

/// `blk.N.activation_freq`
pub fn freq_name(layer: usize) -> String {
    format!("blk.{layer}.activation_freq")
}

/// The sidecar of the model at `model`: `NAME.sparsity.gguf` beside `NAME.gguf`.
pub fn path_for(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    model.with_file_name(format!("{stem}.sparsity.gguf"))
}

/// What a sidecar holds, in plain vectors (what calibration produces).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SidecarData {
    pub calibration_tokens: u64,
    pub target_sparsity: Option<f32>,
    pub gate_thresholds: Option<Vec<f32>>,
    pub predictor_threshold: Option<f32>,
    /// Per layer, `[n_ff]` firing frequencies.
    pub frequencies: Option<Vec<Vec<f32>>>,
    /// Per layer.
    pub predictors: Option<Vec<PredictorData>>,
}

/// One layer's predictor in plain vectors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PredictorData {
    pub rank: usize,
    /// `rank × n_embd`, row-major.
    pub fc1: Vec<f32>,
    /// `n_ff × rank`, row-major.
    pub fc2: Vec<f32>,
    /// `[rank]`
    pub b1: Vec<f32>,
    /// `[n_ff]`
    pub b2: Vec<f32>,
}

/// How predictor weights with rows of `n_cols` values are stored: Q8_0 when the rows are
/// whole blocks, else F16.
pub fn predictor_wtype(n_cols: usize) -> WeightType {
    if n_cols.is_multiple_of(32) {
        WeightType::Q8_0
    } else {
        WeightType::F16
    }
}

/// `values` (`n_rows × n_cols`) as the sidecar will store and load them: quantized to
/// [`predictor_wtype`] and back. `prepare` evaluates its predictors in this form.
pub fn stored_form(values: &[f32], n_rows: usize, n_cols: usize) -> (Matrix, Vec<f32>) {
    let m = Matrix::quantize(predictor_wtype(n_cols), values, n_rows, n_cols);
    let mut back = vec![0.0; values.len()];
    for (r, row) in back.chunks_exact_mut(n_cols.max(1)).enumerate() {
        m.dequantize_row(r, row);
    }
    (m, back)
}

fn bad(key: &str, value: impl std::fmt::Debug, expected: &str) -> LoadError {
    LoadError::BadKey {
        key: key.into(),
        value: format!("{value:?}"),
        expected: expected.into(),
    }
}

/// Writes `data` for a model of configuration `c` to `path` (atomically: a temporary file
/// renamed into place).
pub fn write(path: &Path, c: &ModelConfig, data: &SidecarData) -> Result<(), LoadError> {
    // The writer borrows tensor bytes until it writes, so the quantized forms live here.
    let stored: Vec<(Matrix, Matrix)> = data
        .predictors
        .iter()
        .flatten()
        .map(|p| {
            (
                Matrix::quantize(predictor_wtype(c.n_embd), &p.fc1, p.rank, c.n_embd),
                Matrix::quantize(predictor_wtype(p.rank), &p.fc2, c.n_ff, p.rank),
            )
        })
        .collect();
    let mut w = GgufWriter::new();
    let err = |e: powerinfer_ops::gguf::WriteError| LoadError::Other(e.to_string());
    let mut meta = vec![
        (
            "general.architecture",
            Value::String(ARCHITECTURE.to_owned()),
        ),
        (key::VERSION, Value::U32(VERSION)),
        (key::BLOCK_COUNT, Value::U32(c.n_layer as u32)),
        (key::EMBEDDING_LENGTH, Value::U32(c.n_embd as u32)),
        (key::FEED_FORWARD_LENGTH, Value::U32(c.n_ff as u32)),
        (key::CALIBRATION_TOKENS, Value::U64(data.calibration_tokens)),
    ];
    if let Some(t) = data.target_sparsity {
        meta.push((key::TARGET_SPARSITY, Value::F32(t)));
    }
    if let Some(t) = &data.gate_thresholds {
        meta.push((key::GATE_THRESHOLDS, Value::Array(Array::F32(t.clone()))));
    }
    if let Some(t) = data.predictor_threshold {
        meta.push((key::SPARSE_THRESHOLD, Value::F32(t)));
    }
    for (k, v) in meta {
        w.add_metadata(k, v).map_err(err)?;
    }
    if let Some(freqs) = &data.frequencies {
        for (l, f) in freqs.iter().enumerate() {
            w.add_tensor(&freq_name(l), GgmlType::F32, &[f.len() as u64], as_bytes(f))
                .map_err(err)?;
        }
    }
    for (l, (p, (m1, m2))) in data.predictors.iter().flatten().zip(&stored).enumerate() {
        let r = p.rank as u64;
        let (n1, n2) = (
            super::names::Blk::Fc1.name(LayerId(l)),
            super::names::Blk::Fc2.name(LayerId(l)),
        );
        w.add_tensor(
            &weights::bias_name(&n1),
            GgmlType::F32,
            &[r],
            as_bytes(&p.b1),
        )
        .map_err(err)?;
        let b2 = weights::bias_name(&n2);
        w.add_tensor(&b2, GgmlType::F32, &[c.n_ff as u64], as_bytes(&p.b2))
            .map_err(err)?;
        w.add_tensor(&n1, m1.wtype().ggml(), &[c.n_embd as u64, r], m1.bytes())
            .map_err(err)?;
        w.add_tensor(&n2, m2.wtype().ggml(), &[r, c.n_ff as u64], m2.bytes())
            .map_err(err)?;
    }
    w.write_file(path).map_err(err)
}

/// Reads the sidecar at `path` into `model.sparsity`, checking it describes this model.
pub fn read(path: &Path, model: &mut Model) -> Result<(), LoadError> {
    let file = GgufFile::open(path)?;
    let md = file.metadata();
    let c = &model.config;
    let arch = md.get("general.architecture").and_then(Value::as_str);
    if arch != Some(ARCHITECTURE) {
        return Err(bad("general.architecture", arch, ARCHITECTURE));
    }
    let uint = |k: &str| -> Result<u64, LoadError> {
        let v = md
            .get(k)
            .ok_or_else(|| LoadError::MissingKey { key: k.into() })?;
        v.as_u64().ok_or_else(|| bad(k, v, "an unsigned integer"))
    };
    if uint(key::VERSION)? != u64::from(VERSION) {
        return Err(bad(key::VERSION, uint(key::VERSION)?, "1"));
    }
    for (k, want) in [
        (key::BLOCK_COUNT, c.n_layer),
        (key::EMBEDDING_LENGTH, c.n_embd),
        (key::FEED_FORWARD_LENGTH, c.n_ff),
    ] {
        let got = uint(k)?;
        if got != want as u64 {
            return Err(bad(k, got, &format!("{want} (this model's)")));
        }
    }
    let s = &mut model.sparsity;
    if let Some(v) = md.get(key::GATE_THRESHOLDS) {
        let t = v
            .as_array()
            .and_then(|a| a.as_f32s())
            .filter(|t| t.len() == c.n_layer && t.iter().all(|x| x.is_finite() && *x >= 0.0))
            .ok_or_else(|| {
                bad(
                    key::GATE_THRESHOLDS,
                    v.value_type().name(),
                    "one finite threshold ≥ 0 per layer",
                )
            })?;
        s.gate_thresholds = Some(t.to_vec());
    }
    if let Some(v) = md.get(key::SPARSE_THRESHOLD) {
        s.predictor_threshold = v
            .as_f32()
            .filter(|x| x.is_finite())
            .ok_or_else(|| bad(key::SPARSE_THRESHOLD, v, "a finite float"))?;
    }
    if file.tensor(&freq_name(0)).is_some() {
        let mut freqs = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let name = freq_name(l);
            let f = file
                .tensor_data_by_name::<f32>(&name)
                .map_err(|e| LoadError::Other(format!("{name}: {e}")))?;
            if f.len() != c.n_ff {
                return Err(LoadError::Shape {
                    name,
                    dims: vec![f.len() as u64],
                    expected: format!("[{}]", c.n_ff),
                });
            }
            freqs.push(f.to_vec());
        }
        s.frequencies = Some(freqs);
    }
    let mut preds = Vec::new();
    for l in 0..c.n_layer {
        match weights::predictor(&file, c, LayerId(l))? {
            Some(p) => preds.push(p),
            None if l == 0 => break,
            None => {
                return Err(LoadError::MissingTensor {
                    name: super::names::Blk::Fc1.name(LayerId(l)),
                });
            }
        }
    }
    if !preds.is_empty() {
        model.sparsity.predictors = Some(preds);
    }
    model.sparsity.sources.push(path.display().to_string());
    Ok(())
}
