//! The hot executor: owns the device and everything placed on it, and runs the device
//! half of every layer whose attention is there (DESIGN.md §3). Layers wholly on the
//! device run here with no per-layer message; for a split layer it sends the FFN input to
//! the cold executor (and the residual stream to the predictor actor when the host
//! predicts), computes the hot side meanwhile, and merges the cold partial sum that comes
//! back. Without a device it is not started.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, bounded};
use powerinfer_ops::device::{Device, DeviceError, DeviceInfo, FfnInput, Op};
use powerinfer_ops::handoff::{HANDOFF_SPIN, PEER_SPIN, recv_spinning};
use powerinfer_ops::transformer::StepToken;

use super::step::{
    EXCHANGE, FromHot, Health, PredictRequest, Prediction, RunEnd, ToHot, panic_message,
};
use super::types::EngineError;
use crate::model::Model;
use crate::model::hybrid::{
    self, DeviceLayer, submit_hot_prediction, submit_layer, submit_merge, take_ffn_input,
};

/// What the hot executor holds (fixed once the model is placed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotInfo {
    pub device: Option<DeviceInfo>,
    /// Bytes placed on the device (weights and KV caches).
    pub placed_bytes: u64,
}

/// The hot executor's ends of its channels.
pub(crate) struct HotLinks {
    pub from_cold: Receiver<ToHot>,
    pub to_cold: Sender<FromHot>,
    /// To the predictor actor and back (when the host predicts for device layers).
    pub to_pred: Option<Sender<PredictRequest>>,
    pub from_pred: Option<Receiver<Prediction>>,
}

struct HotExecutor {
    model: Arc<Model>,
    device: Box<dyn Device>,
    links: HotLinks,
    tokens: Vec<StepToken>,
    /// The previous step's tokens, back to the cold executor in the next run's end.
    begin_spare: Vec<StepToken>,
    /// Buffers circulating with the cold executor and the predictor actor.
    inputs: Vec<FfnInput>,
    partials: Vec<Vec<f32>>,
    pred_tokens: Vec<StepToken>,
    pred_x: Vec<Vec<f32>>,
    spare_masks: Vec<powerinfer_ops::sparse::ActiveSet>,
}

/// Why a run stopped before its end.
enum Stop {
    Device(DeviceError),
    /// The cold executor gave up the step, or a peer is gone.
    Peer(String),
}

impl From<DeviceError> for Stop {
    fn from(e: DeviceError) -> Self {
        Stop::Device(e)
    }
}

impl HotExecutor {
    /// Serves runs until the cold executor goes; a panic is recorded in `health` before
    /// the executor's channels close (so its peers report why it stopped).
    fn run(mut self, health: &Health) {
        while let Ok(msg) = self.links.from_cold.recv() {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| self.handle(msg))) {
                health.fail(format!("the hot executor panicked: {}", panic_message(&*p)));
                return;
            }
        }
    }

    fn handle(&mut self, msg: ToHot) {
        match msg {
            ToHot::Begin { mut tokens } => {
                std::mem::swap(&mut self.tokens, &mut tokens);
                self.begin_spare = tokens;
                if let Err(e) = self.device.submit(Op::Begin {
                    tokens: &self.tokens,
                }) {
                    let _ = self.links.to_cold.send(FromHot::Failed(e));
                }
            }
            ToHot::Run { layers, x, end } => match self.run_layers(layers, x, end) {
                Ok(()) => {}
                Err(Stop::Device(e)) => {
                    let _ = self.links.to_cold.send(FromHot::Failed(e));
                }
                Err(Stop::Peer(why)) => tracing::debug!(%why, "hot executor: run dropped"),
            },
            // A late abort for a run that already ended: nothing to drop.
            ToHot::Abort | ToHot::Partial { .. } => {}
        }
    }

    fn run_layers(
        &mut self,
        layers: std::ops::Range<usize>,
        mut x: Vec<f32>,
        end: RunEnd,
    ) -> Result<(), Stop> {
        if !layers.is_empty() || end.head.is_some() {
            self.device.submit(Op::WriteResidual { x: &x })?;
        }
        for layer in layers {
            let how = self.model.device_layer(layer, &self.tokens);
            let input = self.inputs.pop().unwrap_or_default();
            let Some(e) = submit_layer(self.device.as_mut(), layer, how, input)? else {
                continue;
            };
            let mut input = take_ffn_input(self.device.as_mut(), e)?;
            let host_predicts = matches!(
                how,
                DeviceLayer::Split {
                    host_predicts: true,
                    ..
                }
            );
            if host_predicts {
                self.ask_prediction(layer, &mut input)?;
            }
            let partial = self.partials.pop().unwrap_or_default();
            self.send_cold(FromHot::Cold {
                layer,
                how,
                input,
                partial,
            })?;
            if host_predicts {
                let p = self.recv_prediction(layer)?;
                submit_hot_prediction(self.device.as_mut(), layer, &p)?;
                self.spare_masks.push(p);
            }
            match recv_spinning(&self.links.from_cold, PEER_SPIN) {
                Ok(ToHot::Partial {
                    layer: l,
                    input,
                    cold,
                    spare_mask,
                }) if l == layer => {
                    submit_merge(self.device.as_mut(), layer, cold.as_deref())?;
                    self.inputs.push(input);
                    self.partials.extend(cold);
                    self.spare_masks.extend(spare_mask);
                }
                Ok(ToHot::Abort) => return Err(Stop::Peer("the cold executor aborted".into())),
                Ok(_) => return Err(Stop::Peer(format!("unexpected message at layer {layer}"))),
                Err(_) => return Err(Stop::Peer("the cold executor has stopped".into())),
            }
        }
        let RunEnd {
            residual,
            head,
            mut counts,
        } = end;
        let (mut rows, mut logits) = match head {
            Some((r, l)) => (Some(r), Some(l)),
            None => (None, None),
        };
        let logits_end = match (&rows, logits.as_mut()) {
            (Some(r), Some(l)) => Some((r.as_slice(), l)),
            _ => None,
        };
        hybrid::end_run(
            self.device.as_mut(),
            hybrid::RunEnd {
                residual: residual.then_some(&mut x),
                logits: logits_end,
                counts: counts.as_mut(),
            },
        )?;
        let done = FromHot::RunDone {
            x,
            rows: rows.take(),
            logits,
            counts,
            spare_tokens: std::mem::take(&mut self.begin_spare),
        };
        self.send_cold(done)
    }

    /// Sends the residual stream of split layer `layer` to the predictor actor.
    fn ask_prediction(&mut self, layer: usize, input: &mut FfnInput) -> Result<(), Stop> {
        let to = self
            .links
            .to_pred
            .as_ref()
            .ok_or_else(|| Stop::Peer("no predictor actor".into()))?;
        let mut tokens = std::mem::take(&mut self.pred_tokens);
        tokens.clear();
        tokens.extend_from_slice(&self.tokens);
        let x = std::mem::replace(&mut input.x, self.pred_x.pop().unwrap_or_default());
        let spare = [self.spare_masks.pop(), self.spare_masks.pop()];
        // The FFN input keeps an empty residual stream: the host's half knows it went to
        // the predictor actor.
        input.x.clear();
        to.send(PredictRequest {
            layer,
            x,
            tokens,
            spare,
        })
        .map_err(|_| Stop::Peer("the predictor actor has stopped".into()))
    }

    fn recv_prediction(&mut self, layer: usize) -> Result<powerinfer_ops::sparse::ActiveSet, Stop> {
        let from = self
            .links
            .from_pred
            .as_ref()
            .ok_or_else(|| Stop::Peer("no predictor actor".into()))?;
        let p = recv_spinning(from, HANDOFF_SPIN)
            .map_err(|_| Stop::Peer("the predictor actor has stopped".into()))?;
        self.pred_x.extend(p.x);
        if let Some(t) = p.tokens {
            self.pred_tokens = t;
        }
        match p.mask {
            Ok(m) if p.layer == layer => Ok(m),
            Ok(_) => Err(Stop::Peer(format!(
                "a prediction for another layer at {layer}"
            ))),
            Err(why) => Err(Stop::Peer(why)),
        }
    }

    fn send_cold(&self, msg: FromHot) -> Result<(), Stop> {
        self.links
            .to_cold
            .send(msg)
            .map_err(|_| Stop::Peer("the cold executor has stopped".into()))
    }
}

/// The hot executor's handle; the executor stops when its inbox closes.
pub(crate) struct HotHandle {
    info: HotInfo,
}

impl HotHandle {
    /// Starts the executor on thread `pi-hot` with the device the model was placed on.
    pub fn spawn(
        model: Arc<Model>,
        device: Box<dyn Device>,
        links: HotLinks,
        health: Arc<Health>,
    ) -> Result<Self, EngineError> {
        let d = device.info();
        let info = HotInfo {
            placed_bytes: d.memory_used,
            device: Some(d),
        };
        let exec = HotExecutor {
            model,
            device,
            links,
            tokens: Vec::new(),
            begin_spare: Vec::new(),
            inputs: Vec::new(),
            partials: Vec::new(),
            pred_tokens: Vec::new(),
            pred_x: Vec::new(),
            spare_masks: Vec::new(),
        };
        std::thread::Builder::new()
            .name("pi-hot".into())
            .spawn(move || exec.run(&health))
            .map_err(|e| EngineError::Internal(format!("cannot start the hot executor: {e}")))?;
        Ok(Self { info })
    }

    /// No device: nothing to start.
    pub fn none() -> Self {
        Self {
            info: HotInfo {
                device: None,
                placed_bytes: 0,
            },
        }
    }

    pub fn info(&self) -> HotInfo {
        self.info.clone()
    }
}

/// The channels between the cold and hot executors and the predictor actor.
pub(crate) fn links(with_predictor: bool) -> (HotLinks, ColdLinks, Option<PredLinks>) {
    let (to_hot, from_cold) = bounded(EXCHANGE);
    let (to_cold, from_hot) = bounded(EXCHANGE);
    let (hot, pred, from_pred_cold) = if with_predictor {
        let (to_pred, pred_rx) = bounded(EXCHANGE);
        let (pred_to_hot, from_pred) = bounded(EXCHANGE);
        let (pred_to_cold, from_pred_cold) = bounded(EXCHANGE);
        (
            HotLinks {
                from_cold,
                to_cold,
                to_pred: Some(to_pred),
                from_pred: Some(from_pred),
            },
            Some(PredLinks {
                requests: pred_rx,
                to_hot: pred_to_hot,
                to_cold: pred_to_cold,
            }),
            Some(from_pred_cold),
        )
    } else {
        (
            HotLinks {
                from_cold,
                to_cold,
                to_pred: None,
                from_pred: None,
            },
            None,
            None,
        )
    };
    (
        hot,
        ColdLinks {
            to_hot,
            from_hot,
            from_pred: from_pred_cold,
        },
        pred,
    )
}

/// The cold executor's ends of the hybrid channels.
pub(crate) struct ColdLinks {
    pub to_hot: Sender<ToHot>,
    pub from_hot: Receiver<FromHot>,
    pub from_pred: Option<Receiver<Prediction>>,
}

/// The predictor actor's ends.
pub(crate) struct PredLinks {
    pub requests: Receiver<PredictRequest>,
    pub to_hot: Sender<Prediction>,
    pub to_cold: Sender<Prediction>,
}
