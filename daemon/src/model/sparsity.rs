//! Which feed-forward neurons a token computes (DESIGN.md §4): the modes, and the
//! per-layer data they need (gate thresholds, low-rank predictors, activation counts),
//! read from the model file (PowerInfer's `PWRI` predictors) or from the sparsity sidecar
//! GGUF next to the model (see [`super::sidecar`]).

pub use powerinfer_ops::transformer::{Predictor, SparsityMode};

/// The sparsity data of a loaded model.
#[derive(Default)]
pub struct SparsityData {
    /// Gate mode for SiLU/GELU models: neuron `i` of layer `l` is active where
    /// `|act(gate_i)| > gate_thresholds[l]`. ReLU-gated models need none (0, exact).
    pub gate_thresholds: Option<Vec<f32>>,
    /// Per layer, when the file or sidecar has them.
    pub predictors: Option<Vec<Predictor>>,
    /// The predictor logit a neuron needs to be active (`powerinfer.sparse_threshold`,
    /// overridden by `LLAMA_SPARSE_PRED_THRESHOLD`; default 0).
    pub predictor_threshold: f32,
    /// Per layer, how often each neuron fired during calibration (0..=1).
    pub frequencies: Option<Vec<Vec<f32>>>,
    /// Where the data came from (file names), for status and errors.
    pub sources: Vec<String>,
}

impl SparsityData {
    /// Why `mode` cannot run on this model, if it cannot.
    pub fn unavailable(&self, mode: SparsityMode, relu_gated: bool) -> Option<String> {
        match mode {
            SparsityMode::Dense => None,
            SparsityMode::Gate if relu_gated || self.gate_thresholds.is_some() => None,
            SparsityMode::Gate => Some(
                "gate mode on a SiLU/GELU model needs calibrated gate thresholds \
                 (powerinfer.gate.thresholds) in the sparsity sidecar NAME.sparsity.gguf \
                 next to the model"
                    .into(),
            ),
            SparsityMode::Predictor if self.predictors.is_some() => None,
            SparsityMode::Predictor => Some(
                "predictor mode needs predictors: a PowerInfer (PWRI) file with \
                 blk.N.fc1/fc2, or a sparsity sidecar NAME.sparsity.gguf carrying them"
                    .into(),
            ),
        }
    }

    /// The gate threshold of `layer` (0 when none were calibrated).
    pub fn gate_threshold(&self, layer: usize) -> f32 {
        self.gate_thresholds
            .as_ref()
            .and_then(|t| t.get(layer).copied())
            .unwrap_or(0.0)
    }
}
