//! A step of a model placed on a device: what each layer asks of the device and of the
//! host, the device ops of each stage, and the direct driver that runs a whole step from
//! one thread (the engine's executors run the same stages on their own threads).
//!
//! Per layer whose attention is on the device:
//!
//! - wholly on the device (every neuron hot, and no prediction needed from the host):
//!   attention, prediction, hot FFN and merge run there, and the host is not involved;
//! - split: the device runs the attention (and the predictor, when it holds it), sends
//!   the FFN input down and computes its hot side; the host computes the cold side (and
//!   the prediction, when the predictor is on the host, whose hot part goes back up) and
//!   sends its partial sum up; the device merges `x += hot + cold`.
//!
//! The residual stream comes down at the end of a run of device layers (or the logits,
//! when the head is on the device too). Each stage's arithmetic is the host's (see
//! `Model::forward`), in the same order, so on the simulated device a step has the bits
//! of the all-host step of the same placement.

use powerinfer_ops::device::{Device, DeviceError, Event, FfnInput, Op, Readback};
use powerinfer_ops::ids::LayerId;
use powerinfer_ops::kv::KvCache;
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::profile::Stage;
use powerinfer_ops::sparse::ActiveSet;
use powerinfer_ops::transformer::StepToken;

use super::forward::NeuronSide;
use super::{BatchToken, ForwardError, Model, Scratch, Side};

/// How one device layer of a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceLayer {
    /// Wholly on the device.
    Whole { predict: bool },
    /// Split with the host.
    Split {
        /// The device predicts (its predictor is placed and a token needs one).
        device_predicts: bool,
        /// The host predicts and sends the hot part of the prediction up.
        host_predicts: bool,
        /// The layer has cold neurons.
        cold: bool,
    },
}

impl Model {
    /// How device layer `layer` runs for a step of `tokens`.
    pub fn device_layer(&self, layer: usize, tokens: &[StepToken]) -> DeviceLayer {
        let p = self.partition.layers[layer];
        let predicts = self.wants_predictor(tokens);
        let cold = p.hot < self.config.n_ff;
        let device_predicts = predicts && p.predictor == Side::Device;
        if !cold && (!predicts || device_predicts) {
            DeviceLayer::Whole { predict: predicts }
        } else {
            DeviceLayer::Split {
                device_predicts,
                host_predicts: predicts && !device_predicts,
                cold,
            }
        }
    }
}

pub(crate) fn device_error(e: DeviceError) -> ForwardError {
    ForwardError::Device(e)
}

/// Queues the device's first stage of `layer`: for a whole layer, all of it (nothing to
/// wait for); for a split layer, attention, prediction and the FFN input's readback, then
/// the hot side unless it waits for the host's prediction. The event to wait for before
/// taking the FFN input, for a split layer.
pub fn submit_layer(
    dev: &mut dyn Device,
    layer: usize,
    how: DeviceLayer,
    input: FfnInput,
) -> Result<Option<Event>, DeviceError> {
    let l = LayerId(layer);
    dev.submit(Op::Attention { layer: l })?;
    match how {
        DeviceLayer::Whole { predict } => {
            if predict {
                dev.submit(Op::Predict { layer: l })?;
            }
            dev.submit(Op::HotFfn { layer: l })?;
            dev.submit(Op::Merge {
                layer: l,
                cold: None,
            })?;
            Ok(None)
        }
        DeviceLayer::Split {
            device_predicts,
            host_predicts,
            ..
        } => {
            if device_predicts {
                dev.submit(Op::Predict { layer: l })?;
            }
            dev.submit(Op::ReadFfnInput {
                layer: l,
                into: input,
            })?;
            let e = dev.record()?;
            if !host_predicts {
                dev.submit(Op::HotFfn { layer: l })?;
            }
            Ok(Some(e))
        }
    }
}

/// Queues the hot side of split layer `layer` under the host's prediction `mask`.
pub fn submit_hot_prediction(
    dev: &mut dyn Device,
    layer: usize,
    mask: &ActiveSet,
) -> Result<(), DeviceError> {
    let l = LayerId(layer);
    dev.submit(Op::WriteMask { layer: l, mask })?;
    dev.submit(Op::HotFfn { layer: l })
}

/// Queues the merge of split layer `layer` with the host's partial sum (`None` when the
/// layer has no cold neurons).
pub fn submit_merge(
    dev: &mut dyn Device,
    layer: usize,
    cold: Option<&[f32]>,
) -> Result<(), DeviceError> {
    dev.submit(Op::Merge {
        layer: LayerId(layer),
        cold,
    })
}

/// Waits for `event` and takes the FFN input it covers.
pub fn take_ffn_input(dev: &mut dyn Device, event: Event) -> Result<FfnInput, DeviceError> {
    dev.wait(event)?;
    match dev.take() {
        Some(Readback::FfnInput(i)) => Ok(i),
        other => Err(unexpected("an FFN input", other)),
    }
}

fn unexpected(what: &str, got: Option<Readback>) -> DeviceError {
    DeviceError::Invalid(format!("expected {what} from the device, got {got:?}"))
}

/// The end of a run of device layers: the residual stream (`into`) comes down, or, when
/// the run ends the model and the head is on the device, the logits of `rows` (into
/// `logits`); the step's hot counts (into `counts`) come down with whichever is last.
pub struct RunEnd<'a> {
    pub residual: Option<&'a mut Vec<f32>>,
    pub logits: Option<(&'a [u32], &'a mut Vec<f32>)>,
    pub counts: Option<&'a mut Vec<u32>>,
}

/// Queues and waits for `end`'s readbacks.
pub fn end_run(dev: &mut dyn Device, end: RunEnd<'_>) -> Result<(), DeviceError> {
    let RunEnd {
        mut residual,
        mut logits,
        mut counts,
    } = end;
    if let Some(x) = &mut residual {
        dev.submit(Op::ReadResidual {
            into: std::mem::take(*x),
        })?;
    }
    if let Some((rows, out)) = &mut logits {
        dev.submit(Op::Head {
            rows,
            into: std::mem::take(*out),
        })?;
    }
    if let Some(c) = &mut counts {
        dev.submit(Op::ReadCounts {
            into: std::mem::take(*c),
        })?;
    }
    let e = dev.record()?;
    dev.wait(e)?;
    if let Some(x) = residual {
        match dev.take() {
            Some(Readback::Residual(v)) => *x = v,
            other => return Err(unexpected("the residual stream", other)),
        }
    }
    if let Some((_, out)) = logits {
        match dev.take() {
            Some(Readback::Logits(v)) => *out = v,
            other => return Err(unexpected("logits", other)),
        }
    }
    if let Some(c) = counts {
        match dev.take() {
            Some(Readback::Counts(v)) => *c = v,
            other => return Err(unexpected("hot counts", other)),
        }
    }
    Ok(())
}

/// Buffers the host keeps for a device step.
#[derive(Default)]
pub struct DeviceBuffers {
    input: Option<FfnInput>,
    counts: Vec<u32>,
}

impl Model {
    /// The host's half of split layer `layer`, from the FFN input the device sent: the
    /// prediction when the host predicts (hot part in `s.ffn.predicted[0]`), and the cold
    /// side's partial sum (`s.ffn.side_out(NeuronSide::Cold)`), when the layer has cold
    /// neurons (the return value). `input` ends holding the host's previous buffers, for
    /// reuse.
    ///
    /// `cold_prediction`: the cold side's prediction when another thread made it (the
    /// predictor actor); else a host prediction is made here.
    pub(crate) fn host_half(
        &self,
        pool: &ThreadPool,
        layer: usize,
        how: DeviceLayer,
        input: &mut FfnInput,
        cold_prediction: Option<&ActiveSet>,
        s: &mut Scratch,
    ) -> Result<bool, ForwardError> {
        let DeviceLayer::Split {
            host_predicts,
            cold,
            ..
        } = how
        else {
            return Ok(false);
        };
        // (The residual stream has gone to the predictor actor when it predicts.)
        if !input.x.is_empty() {
            std::mem::swap(&mut s.x, &mut input.x);
        }
        std::mem::swap(&mut s.xn, &mut input.xn);
        if let Some(m) = cold_prediction {
            s.ffn.predicted[1].copy_from(m);
        } else if host_predicts {
            self.predict(pool, layer, s)?;
        } else if input.predicted {
            s.ffn.predicted[1].copy_from(&input.cold_mask);
        }
        if cold {
            s.ffn.acts.set(&s.xn, s.tokens.len());
            self.side(pool, layer, NeuronSide::Cold, s);
        }
        Ok(cold)
    }

    /// Adds the device's hot counts (`[n_tok][n_layer]`) to the step's.
    pub(crate) fn add_device_counts(&self, counts: &[u32], s: &mut Scratch) {
        for ((a, h), &c) in s
            .active_counts
            .iter_mut()
            .zip(s.hot_counts.iter_mut())
            .zip(counts)
        {
            *a += c;
            *h += c;
        }
    }

    /// Runs `batch` through the model with the parts placed on `device` (see the module
    /// docs), the host's layers writing keys and values into `kv`, from the calling
    /// thread; the logits of the tokens that asked for them into `logits`. Without any
    /// part on the device this is [`Model::forward_into`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_device(
        &self,
        pool: &ThreadPool,
        device: &mut dyn Device,
        batch: &[BatchToken],
        kv: &mut KvCache,
        s: &mut Scratch,
        db: &mut DeviceBuffers,
        logits: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        if !self.partition.uses_device() {
            return self.forward_into(pool, batch, kv, s, logits);
        }
        self.begin(batch, kv.n_ctx(), kv.n_slots(), s)?;
        device
            .submit(Op::Begin { tokens: &s.tokens })
            .map_err(device_error)?;
        let segments = self.partition.segments();
        let head_on_device = self.partition.head == Side::Device;
        let mut x_on_device = false;
        let mut counts_read = false;
        for (i, (side, range)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match side {
                Side::Host => {
                    for layer in range.clone() {
                        self.attention(pool, layer, kv, s)?;
                        self.ffn(pool, layer, batch, s)?;
                    }
                }
                Side::Device => {
                    device
                        .submit(Op::WriteResidual { x: &s.x })
                        .map_err(device_error)?;
                    for layer in range.clone() {
                        self.device_step_layer(pool, device, layer, s, db)?;
                    }
                    x_on_device = true;
                    if !(last && head_on_device) {
                        // The last run brings the step's counts down with it.
                        counts_read = last;
                        end_run(
                            device,
                            RunEnd {
                                residual: Some(&mut s.x),
                                logits: None,
                                counts: last.then_some(&mut db.counts),
                            },
                        )
                        .map_err(device_error)?;
                        x_on_device = false;
                    }
                }
            }
        }
        s.profile.mark(Stage::Exchange);
        if head_on_device {
            if !x_on_device {
                device
                    .submit(Op::WriteResidual { x: &s.x })
                    .map_err(device_error)?;
            }
            let rows = std::mem::take(&mut s.rows);
            let r = end_run(
                device,
                RunEnd {
                    residual: None,
                    logits: Some((&rows, logits)),
                    counts: Some(&mut db.counts),
                },
            );
            s.rows = rows;
            r.map_err(device_error)?;
            s.profile.mark(Stage::Head);
        } else {
            if !counts_read {
                end_run(
                    device,
                    RunEnd {
                        residual: None,
                        logits: None,
                        counts: Some(&mut db.counts),
                    },
                )
                .map_err(device_error)?;
            }
            self.head(pool, s, logits);
        }
        self.add_device_counts(&db.counts, s);
        Ok(())
    }

    /// One device layer of [`Self::forward_with_device`].
    fn device_step_layer(
        &self,
        pool: &ThreadPool,
        device: &mut dyn Device,
        layer: usize,
        s: &mut Scratch,
        db: &mut DeviceBuffers,
    ) -> Result<(), ForwardError> {
        let how = self.device_layer(layer, &s.tokens);
        let input = db.input.take().unwrap_or_default();
        let Some(e) = submit_layer(device, layer, how, input).map_err(device_error)? else {
            return Ok(());
        };
        let mut input = take_ffn_input(device, e).map_err(device_error)?;
        s.profile.mark(Stage::Exchange);
        let cold = self.host_half(pool, layer, how, &mut input, None, s)?;
        let host_predicts = matches!(
            how,
            DeviceLayer::Split {
                host_predicts: true,
                ..
            }
        );
        if host_predicts {
            submit_hot_prediction(device, layer, &s.ffn.predicted[0]).map_err(device_error)?;
        }
        submit_merge(
            device,
            layer,
            cold.then_some(s.ffn.side_out(NeuronSide::Cold)),
        )
        .map_err(device_error)?;
        db.input = Some(input);
        Ok(())
    }
}
