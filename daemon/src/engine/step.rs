//! The messages of a hybrid step between the executors (DESIGN.md §3), and the engine's
//! health that a failing actor marks.
//!
//! ```text
//! cold executor ──Begin, Run{layers, x}──────────▶ hot executor (owns the device)
//!      ▲  ◀──Cold{layer, FFN input}── per split layer ──┘   │ ▲
//!      └──Partial{layer, cold partial sum}──────────────▶   │ │ hot prediction
//!      ◀──RunDone{x | logits, counts}──                      ▼ │
//!      ◀──────────── cold prediction ──────────── predictor actor
//! ```
//!
//! Every per-layer message moves preallocated buffers (the FFN input's vectors, the
//! partial sum, the masks) and the receiver hands them back in its answer, so a step in
//! steady state allocates nothing. Channels hold one message per direction (a step has
//! at most one exchange in flight), and receivers spin briefly before they park.

use std::ops::Range;
use std::sync::Mutex;

use powerinfer_ops::device::{DeviceError, FfnInput};
use powerinfer_ops::sparse::ActiveSet;
use powerinfer_ops::transformer::StepToken;
use tokio::sync::watch;

use crate::model::hybrid::DeviceLayer;

/// Messages between two executors in flight at once: one step's exchange (its reply comes
/// before the next request).
pub(crate) const EXCHANGE: usize = 2;

/// Cold executor → hot executor.
pub(crate) enum ToHot {
    /// A step begins with these tokens.
    Begin { tokens: Vec<StepToken> },
    /// Run `layers` on the device from the residual stream `x`, then `end`.
    Run {
        layers: Range<usize>,
        x: Vec<f32>,
        end: RunEnd,
    },
    /// The host's half of split layer `layer`: its cold partial sum (`None` without cold
    /// neurons), with the buffers of the FFN input handed back.
    Partial {
        layer: usize,
        input: FfnInput,
        cold: Option<Vec<f32>>,
        /// The cold prediction's set, back for the predictor actor.
        spare_mask: Option<ActiveSet>,
    },
    /// The host failed the step: drop the run.
    Abort,
}

/// What a run brings back at its end.
pub(crate) struct RunEnd {
    /// The residual stream (the next layers or the head are on the host).
    pub residual: bool,
    /// The logits of `rows` (the run ends the model and the head is on the device).
    pub head: Option<(Vec<u32>, Vec<f32>)>,
    /// The step's hot counts (the last run of the step).
    pub counts: Option<Vec<u32>>,
}

/// Hot executor → cold executor.
pub(crate) enum FromHot {
    /// The host's half of split layer `layer`, from this FFN input; `partial` is a buffer
    /// for the cold partial sum.
    Cold {
        layer: usize,
        how: DeviceLayer,
        input: FfnInput,
        partial: Vec<f32>,
    },
    /// The run is over.
    RunDone {
        x: Vec<f32>,
        rows: Option<Vec<u32>>,
        logits: Option<Vec<f32>>,
        counts: Option<Vec<u32>>,
        /// The tokens of the previous step's `Begin`, back for reuse.
        spare_tokens: Vec<StepToken>,
    },
    Failed(DeviceError),
}

/// Hot executor → predictor actor: predict layer `layer` of this step from its residual
/// stream `x`.
pub(crate) struct PredictRequest {
    pub layer: usize,
    pub x: Vec<f32>,
    pub tokens: Vec<StepToken>,
    /// Sets from earlier predictions, back for reuse.
    pub spare: [Option<ActiveSet>; 2],
}

/// Predictor actor → an executor: one side's prediction for `layer`.
pub(crate) struct Prediction {
    pub layer: usize,
    pub mask: Result<ActiveSet, String>,
    /// The request's buffers, back for reuse (to the hot executor).
    pub x: Option<Vec<f32>>,
    pub tokens: Option<Vec<StepToken>>,
}

/// Whether an engine's actors are all well. The first failure (an actor that panicked, a
/// device that failed) is kept: the model stops serving until it is loaded again.
pub struct Health {
    failure: Mutex<Option<String>>,
    tx: watch::Sender<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            failure: Mutex::new(None),
            tx: watch::channel(None).0,
        }
    }
}

impl Health {
    /// Records a failure (the first one stays).
    pub fn fail(&self, reason: impl Into<String>) {
        let mut f = self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.is_none() {
            let reason = reason.into();
            tracing::error!(%reason, "engine failed");
            *f = Some(reason.clone());
            self.tx.send_replace(Some(reason));
        }
    }

    /// Why the engine failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes when the engine fails.
    pub fn watch(&self) -> watch::Receiver<Option<String>> {
        self.tx.subscribe()
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
