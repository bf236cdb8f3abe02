//! The device seam (DESIGN.md §3): what an accelerator must do to hold and run the hot
//! half of a hybrid model. GPU crates (`kernels-cuda`, `kernels-hip`) implement
//! [`Device`]; [`SimulatedDevice`] implements it in memory of its own on a thread of its
//! own, so the hybrid split runs and is tested on machines without a GPU.
//!
//! The trait is shaped after what a GPU does:
//!
//! - **Memory, at load.** A device is configured once with the model's dimensions
//!   ([`ModelSpec`]), then parts are placed on it: a layer's attention block (its norms,
//!   projections and a KV cache of its own), a layer's hot neurons (the first rows of
//!   gate, up and `down_t`, neurons being renumbered hot-first on the host, so row `j` on
//!   the device is neuron `j` of the layer; the host keeps the table back to the file's
//!   numbering), a layer's predictor, the output head. Each matrix goes over in one copy
//!   of its bytes; nothing is shared with host memory afterwards.
//! - **Work, asynchronous.** [`Device::submit`] queues an [`Op`] on the device's stream
//!   and returns at once; ops run in submission order. Host data an op carries (the
//!   residual stream at the start of a device run, a mask, the host's partial sum) is
//!   copied before `submit` returns. [`Device::record`] marks a point in the stream;
//!   [`Device::wait`] blocks until the device has passed it, after which the readbacks of
//!   the ops before it ([`Readback`], into host buffers the ops carried) can be
//!   [taken](Device::take) in order. So the host waits for the device only where it needs
//!   a result: the FFN input of a split layer, the residual stream at the end of a run,
//!   the logits.
//! - **Errors are values.** Every call returns a [`DeviceError`]; after a failure the
//!   device stays failed and every later call says so (as GPU runtimes' sticky errors do).
//!
//! Per split layer `l` a step exchanges `n_embd` floats per token each way: the FFN input
//! down ([`Op::ReadFfnInput`]) and the host's partial sum up ([`Op::Merge`]).
//!
//! The ops' arithmetic is defined by the CPU reference in [`crate::transformer`]; the
//! simulated device runs exactly that, so a hybrid run on it has the bits of the all-host
//! run. A GPU's results differ in the last bits.

mod sim;
mod worker;

#[cfg(test)]
mod tests;

pub use sim::{FaultKind, SimFault, SimulatedDevice};

use crate::ids::LayerId;
use crate::kv::KvShape;
use crate::nn::{Glu, RopeStyle};
use crate::quant::Numerics;
use crate::sparse::ActiveSet;
use crate::tensor::Matrix;
use crate::transformer::{AttentionShape, Predictor, StepToken};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Memory and a thread of its own standing in for a device (tests, planning).
    Simulated,
    Cuda,
    Hip,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Simulated => "simulated",
            Self::Cuda => "cuda",
            Self::Hip => "hip",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: DeviceKind,
    pub memory_total: u64,
    pub memory_used: u64,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("device out of memory: {requested} bytes requested, {free} free")]
    OutOfMemory { requested: u64, free: u64 },
    /// A call the device cannot carry out as made (a part that was never placed, sizes
    /// that do not match the configuration): a fault of the caller.
    #[error("invalid device call: {0}")]
    Invalid(String),
    /// A matrix of a weight type the device's kernels do not compute with, refused before
    /// anything of it is uploaded.
    #[error("the device's kernels do not compute with {0} weights")]
    UnsupportedType(crate::GgmlType),
    /// The device failed (a driver error, a lost device).
    #[error("device failure: {0}")]
    Failed(String),
}

/// RoPE as the device computes it (see [`crate::nn::Rope::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub n_rot: usize,
    pub base: f32,
    pub freq_scale: f32,
    pub style: RopeStyle,
    pub freq_factors: Option<Vec<f32>>,
}

/// The dimensions and arithmetic of the model whose parts a device holds.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub n_layer: usize,
    pub attention: AttentionShape,
    pub rope: RopeSpec,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub glu: Glu,
    /// How activations meet quantized weights.
    pub numerics: Numerics,
    /// The KV cache of each placed layer.
    pub kv: KvShape,
}

/// A layer's attention block for [`Device::place_attention`].
#[derive(Clone, Copy)]
pub struct AttentionUpload<'a> {
    pub attn_norm: &'a [f32],
    pub wq: &'a Matrix,
    pub wk: &'a Matrix,
    pub wv: &'a Matrix,
    pub wo: &'a Matrix,
    /// The norm of the FFN input that follows the block.
    pub ffn_norm: &'a [f32],
}

/// A layer's hot neurons for [`Device::place_hot`]: the first `gate.n_rows()` neurons,
/// row per neuron in each matrix.
#[derive(Clone, Copy)]
pub struct HotUpload<'a> {
    pub gate: &'a Matrix,
    pub up: &'a Matrix,
    pub down_t: &'a Matrix,
    /// Gate mode's threshold of this layer.
    pub gate_threshold: f32,
}

/// A layer's predictor for [`Device::place_predictor`].
#[derive(Clone, Copy)]
pub struct PredictorUpload<'a> {
    pub predictor: &'a Predictor,
    /// The logit a neuron needs to be predicted active.
    pub threshold: f32,
}

/// The output head for [`Device::place_head`].
#[derive(Clone, Copy)]
pub struct HeadUpload<'a> {
    pub output_norm: &'a [f32],
    pub output: &'a Matrix,
}

/// What a split layer sends to the host: the residual stream `x` after attention (what
/// predictors read), the FFN input `xn = ffn_norm(x)` (`[n_tok][n_embd]` each) and, when
/// the layer's predictor ran on the device, the predicted neurons of the cold side
/// (`cold_mask`, indices from the first cold neuron, one entry per token).
#[derive(Clone, Debug)]
pub struct FfnInput {
    pub layer: LayerId,
    pub x: Vec<f32>,
    pub xn: Vec<f32>,
    pub cold_mask: ActiveSet,
    /// Whether `cold_mask` holds this step's prediction.
    pub predicted: bool,
}

impl Default for FfnInput {
    fn default() -> Self {
        Self {
            layer: LayerId(0),
            x: Vec::new(),
            xn: Vec::new(),
            cold_mask: ActiveSet::new(0),
            predicted: false,
        }
    }
}

/// Work for the device's stream.
pub enum Op<'a> {
    /// Starts a step: the batch's tokens (position, KV slot, neuron mode). Per-step
    /// counters restart.
    Begin { tokens: &'a [StepToken] },
    /// Sets the residual stream (`[n_tok][n_embd]`), from the host.
    WriteResidual { x: &'a [f32] },
    /// The attention block of a placed layer on the residual stream (its keys and values
    /// into the layer's cache), then the layer's FFN input.
    Attention { layer: LayerId },
    /// The layer's predictor on the residual stream: the predicted neurons of its
    /// predictor-mode tokens, for the hot side here and the cold side's readback.
    Predict { layer: LayerId },
    /// Copies the FFN input (and the cold side's prediction, if any) to the host.
    ReadFfnInput { layer: LayerId, into: FfnInput },
    /// The predicted hot neurons of the layer's predictor-mode tokens, from the host
    /// (one entry per token, empty for other tokens).
    WriteMask { layer: LayerId, mask: &'a ActiveSet },
    /// The hot side of the layer's FFN: each token's chosen hot neurons (every one for
    /// dense tokens, the gate's for gate tokens, the prediction for predictor tokens),
    /// summed into the hot partial; their count is kept for [`Op::ReadCounts`]. Without
    /// hot neurons the partial is empty.
    HotFfn { layer: LayerId },
    /// The merge: `x += hot + cold` per element (`x += hot` without a host part,
    /// `x += cold` without a hot side), `cold` being the host's partial sum
    /// (`[n_tok][n_embd]`).
    Merge {
        layer: LayerId,
        cold: Option<&'a [f32]>,
    },
    /// Copies the residual stream to the host.
    ReadResidual { into: Vec<f32> },
    /// The output norm and head for tokens `rows` of the residual stream; logits
    /// (`[rows][n_vocab]`) to the host.
    Head { rows: &'a [u32], into: Vec<f32> },
    /// Copies the step's hot-neuron counts (`[n_tok][n_layer]`) to the host.
    ReadCounts { into: Vec<u32> },
}

/// A result the device copied to the host.
#[derive(Debug)]
pub enum Readback {
    FfnInput(FfnInput),
    Residual(Vec<f32>),
    Logits(Vec<f32>),
    Counts(Vec<u32>),
}

/// A point in a device's stream (see [`Device::record`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Event(pub u64);

/// An accelerator the hot executor computes on.
pub trait Device: Send {
    fn info(&self) -> DeviceInfo;

    /// Prepares the device for a model; called once, before anything is placed.
    fn configure(&mut self, spec: &ModelSpec) -> Result<(), DeviceError>;

    /// Places a layer's attention block and allocates its KV cache.
    fn place_attention(
        &mut self,
        layer: LayerId,
        part: &AttentionUpload<'_>,
    ) -> Result<(), DeviceError>;

    /// Places a layer's hot neurons (the layer's attention must be placed).
    fn place_hot(&mut self, layer: LayerId, part: &HotUpload<'_>) -> Result<(), DeviceError>;

    /// Places a layer's predictor (the layer's attention must be placed).
    fn place_predictor(
        &mut self,
        layer: LayerId,
        part: &PredictorUpload<'_>,
    ) -> Result<(), DeviceError>;

    /// Places the output head.
    fn place_head(&mut self, part: &HeadUpload<'_>) -> Result<(), DeviceError>;

    /// Queues `op` on the stream.
    fn submit(&mut self, op: Op<'_>) -> Result<(), DeviceError>;

    /// A mark after the ops submitted so far.
    fn record(&mut self) -> Result<Event, DeviceError>;

    /// Blocks until the stream has passed `event`.
    fn wait(&mut self, event: Event) -> Result<(), DeviceError>;

    /// The oldest readback of the ops the last waits covered, if any.
    fn take(&mut self) -> Option<Readback>;
}
