//! The pieces of a llama-family forward pass that a device can hold and run (DESIGN.md
//! §3, the device seam): the attention block, one side of a neuron-sparse FFN, the
//! activation predictor and the output head.
//!
//! These are the CPU reference implementations of the [`crate::device`] ops: the host
//! runs them for what it computes, the simulated device runs them on its own copies of
//! the weights, and a GPU backend's kernels are tested against them. Each works on a
//! batch of tokens, each token naming its position, KV slot and neuron mode.

mod attention;
mod ffn;
mod head;
mod predictor;

pub use attention::{
    AttentionBlock, AttentionExtras, AttentionScratch, AttentionShape, rms_norm_rows,
    rms_norm_rows_in_place,
};
pub use ffn::{FfnScratch, NeuronFfn, is_side_boundary};
pub use head::{Head, HeadScratch};
pub use predictor::{Predictor, PredictorScratch, add_rows, select};

use crate::ids::SeqSlot;

/// How a token's feed-forward neurons are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SparsityMode {
    /// Every neuron.
    #[default]
    Dense,
    /// Low-rank predictors decide which neurons fire.
    Predictor,
    /// The gate decides: computed in full, then only the neurons whose activated gate
    /// passes the layer's threshold (exactly 0 for ReLU-gated models) are finished.
    Gate,
}

impl SparsityMode {
    pub const ALL: [SparsityMode; 3] = [Self::Dense, Self::Predictor, Self::Gate];

    pub fn name(self) -> &'static str {
        match self {
            Self::Dense => "dense",
            Self::Predictor => "predictor",
            Self::Gate => "gate",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

impl std::fmt::Display for SparsityMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One token of a step as the layers see it: where it goes in the KV cache and how its
/// neurons are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepToken {
    pub pos: usize,
    pub slot: SeqSlot,
    pub mode: SparsityMode,
}

impl StepToken {
    pub fn new(pos: usize, slot: SeqSlot, mode: SparsityMode) -> Self {
        Self { pos, slot, mode }
    }
}
