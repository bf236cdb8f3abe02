//! The predictor actor: owns the host copy of the model's activation predictors and,
//! during a step, predicts the layers whose attention runs on the device but whose
//! predictor does not fit there: it receives the layer's residual stream from the hot
//! executor and sends the hot side's prediction back to it and the cold side's to the
//! cold executor, which compute their sides from them. (A predictor placed on the device
//! runs there, inside the hot executor's layer; a layer wholly on the host evaluates its
//! predictor inline in the cold executor, from the same read-only weights, since a
//! per-layer message would cost as much as the prediction.)
//!
//! It computes on the cold executor's thread pool, which is idle while the cold executor
//! waits for the prediction.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::Numerics;
use powerinfer_ops::sparse::ActiveSet;
use powerinfer_ops::transformer::PredictorScratch;

use super::hot::PredLinks;
use super::step::{Health, PredictRequest, Prediction, panic_message};
use super::types::EngineError;
use crate::model::Model;

struct PredictorActor {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    links: PredLinks,
    scratch: PredictorScratch,
}

impl PredictorActor {
    /// Serves predictions until the hot executor goes; a panic is recorded in `health`
    /// before the actor's channels close.
    fn run(mut self, health: &Health) {
        while let Ok(req) = self.links.requests.recv() {
            match catch_unwind(AssertUnwindSafe(|| self.predict(req))) {
                Ok(true) => {}
                Ok(false) => return,
                Err(p) => {
                    health.fail(format!(
                        "the predictor actor panicked: {}",
                        panic_message(&*p)
                    ));
                    return;
                }
            }
        }
    }

    /// Answers one request; false when a peer has gone.
    fn predict(&mut self, req: PredictRequest) -> bool {
        {
            let PredictRequest {
                layer,
                x,
                tokens,
                spare,
            } = req;
            let [a, b] = spare;
            let mut sets = [
                a.unwrap_or_else(|| ActiveSet::new(0)),
                b.unwrap_or_else(|| ActiveSet::new(0)),
            ];
            let r = self.model.predict_sides(
                &self.pool,
                layer,
                &x,
                &tokens,
                &mut self.scratch,
                &mut sets,
            );
            let (hot, cold) = match r {
                Ok(()) => {
                    let [h, c] = sets;
                    (Ok(h), Ok(c))
                }
                Err(e) => (Err(e.to_string()), Err(e.to_string())),
            };
            let to_cold = Prediction {
                layer,
                mask: cold,
                x: None,
                tokens: None,
            };
            let to_hot = Prediction {
                layer,
                mask: hot,
                x: Some(x),
                tokens: Some(tokens),
            };
            self.links.to_cold.send(to_cold).is_ok() && self.links.to_hot.send(to_hot).is_ok()
        }
    }
}

/// Starts the predictor actor on thread `pi-pred`; it stops when the hot executor drops
/// its request channel.
pub(crate) fn spawn(
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    links: PredLinks,
    numerics: Numerics,
    health: Arc<Health>,
) -> Result<(), EngineError> {
    let actor = PredictorActor {
        model,
        pool,
        links,
        scratch: PredictorScratch::new(numerics),
    };
    std::thread::Builder::new()
        .name("pi-pred".into())
        .spawn(move || actor.run(&health))
        .map_err(|e| EngineError::Internal(format!("cannot start the predictor actor: {e}")))?;
    Ok(())
}
