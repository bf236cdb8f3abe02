//! The cold executor: owns the host weights' use, the host's KV caches and the CPU thread
//! pool, and drives each step (DESIGN.md §3). Layers wholly on the host run here with no
//! per-layer message (without a device: every layer, inside one message per step); a
//! run of layers whose attention is on the device goes to the hot executor, and for each
//! split layer of it this computes the cold side from the FFN input that comes down and
//! sends its partial sum back.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, bounded};
use powerinfer_ops::device::DeviceError;
use powerinfer_ops::handoff::{HANDOFF_SPIN, PEER_SPIN, recv_spinning};
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::profile::Stage;
use powerinfer_ops::transformer::StepToken;

use super::hot::ColdLinks;
use super::step::{FromHot, Health, RunEnd, ToHot, panic_message};
use super::types::{EngineError, EngineOptions};
use crate::model::hybrid::DeviceLayer;
use crate::model::{BatchToken, ForwardError, KvCache, KvShape, Model, NeuronSide, Scratch, Side};

/// Steps in flight towards the executor: the scheduler waits for each reply, so one.
const INBOX: usize = 1;

pub(crate) enum ColdMsg {
    Step {
        batch: Vec<BatchToken>,
        /// The buffer the logits are written into, moved back with the reply.
        logits: Vec<f32>,
        /// The buffer the active-neuron counts (`[n_tok][n_layer]`) are written into,
        /// followed by the hot ones among them (same shape).
        active: Vec<u32>,
        reply: Sender<StepDone>,
        /// The step's span (disabled unless the step is traced).
        span: tracing::Span,
    },
}

/// A finished step: the buffers handed back, and the logits of the tokens that asked.
pub(crate) struct StepDone {
    pub batch: Vec<BatchToken>,
    pub logits: Vec<f32>,
    pub active: Vec<u32>,
    pub result: Result<(), ForwardError>,
}

struct ColdExecutor {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    kv: KvCache,
    scratch: Scratch,
    rx: Receiver<ColdMsg>,
    /// With a device: the channels to the hot executor and the predictor actor.
    hybrid: Option<ColdLinks>,
    health: Arc<Health>,
    /// Buffers circulating with the hot executor.
    spare_tokens: Vec<StepToken>,
    counts: Vec<u32>,
}

impl ColdExecutor {
    /// Serves steps until the last handle drops; a panic is recorded in the engine's
    /// health before the executor's channels close.
    fn run(mut self) {
        while let Ok(msg) = self.rx.recv() {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| self.handle(msg))) {
                let why = format!("the cold executor panicked: {}", panic_message(&*p));
                self.health.fail(why);
                return;
            }
        }
    }

    fn handle(&mut self, msg: ColdMsg) {
        {
            match msg {
                ColdMsg::Step {
                    batch,
                    mut logits,
                    mut active,
                    reply,
                    span,
                } => {
                    let stage = tracing::info_span!(parent: &span, "cold.forward", tokens = batch.len(), layers = self.model.config.n_layer);
                    let _enter = stage.enter();
                    let result = self.step(&batch, &mut logits);
                    if let Err(ForwardError::Device(e)) = &result {
                        // A failed device stays failed: the model stops serving.
                        self.health.fail(format!("device: {e}"));
                    }
                    active.clear();
                    if result.is_ok() {
                        // Active counts, then the hot ones among them.
                        active.extend_from_slice(&self.scratch.active_counts);
                        active.extend_from_slice(&self.scratch.hot_counts);
                    }
                    let _ = reply.send(StepDone {
                        batch,
                        logits,
                        active,
                        result,
                    });
                }
            }
        }
    }

    fn step(&mut self, batch: &[BatchToken], logits: &mut Vec<f32>) -> Result<(), ForwardError> {
        match &self.hybrid {
            Some(_) if self.model.partition.uses_device() => self.hybrid_step(batch, logits),
            _ => {
                self.model
                    .forward_into(&self.pool, batch, &mut self.kv, &mut self.scratch, logits)
            }
        }
    }

    /// The step with the hot executor (see the module docs of `engine::step`).
    fn hybrid_step(
        &mut self,
        batch: &[BatchToken],
        logits: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        let (model, pool) = (self.model.clone(), self.pool.clone());
        model.begin(batch, self.kv.n_ctx(), self.kv.n_slots(), &mut self.scratch)?;
        let mut tokens = std::mem::take(&mut self.spare_tokens);
        tokens.clear();
        tokens.extend_from_slice(&self.scratch.tokens);
        self.send(ToHot::Begin { tokens })?;
        let segments = model.partition.segments();
        let head_on_device = model.partition.head == Side::Device;
        let mut counts_read = false;
        for (i, (side, range)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match side {
                Side::Host => {
                    for layer in range.clone() {
                        model.attention(&pool, layer, &mut self.kv, &mut self.scratch)?;
                        model.ffn(&pool, layer, batch, &mut self.scratch)?;
                    }
                }
                Side::Device => {
                    counts_read = last;
                    let head = last && head_on_device;
                    let s = &mut self.scratch;
                    let end = RunEnd {
                        residual: !head,
                        head: head.then(|| (std::mem::take(&mut s.rows), std::mem::take(logits))),
                        counts: last.then(|| std::mem::take(&mut self.counts)),
                    };
                    let x = std::mem::take(&mut s.x);
                    self.device_run(range.clone(), x, end, logits)?;
                }
            }
        }
        if !counts_read {
            // The last layers ran on the host: the head (if on the device) and the counts
            // still come from there; the residual stream goes up for the head (and comes
            // back either way).
            let s = &mut self.scratch;
            let end = RunEnd {
                residual: false,
                head: head_on_device.then(|| (std::mem::take(&mut s.rows), std::mem::take(logits))),
                counts: Some(std::mem::take(&mut self.counts)),
            };
            let x = std::mem::take(&mut s.x);
            self.device_run(0..0, x, end, logits)?;
        }
        if !head_on_device {
            model.head(&pool, &mut self.scratch, logits);
        }
        model.add_device_counts(&self.counts, &mut self.scratch);
        Ok(())
    }

    /// One run of device layers, serving its split layers' cold halves until it ends.
    fn device_run(
        &mut self,
        layers: std::ops::Range<usize>,
        x: Vec<f32>,
        end: RunEnd,
        logits: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        self.send(ToHot::Run { layers, x, end })?;
        loop {
            match self.recv_hot()? {
                FromHot::Cold {
                    layer,
                    how,
                    mut input,
                    partial,
                } => {
                    let model = &*self.model;
                    let prediction = match how {
                        DeviceLayer::Split {
                            host_predicts: true,
                            ..
                        } => Some(self.recv_prediction(layer)?),
                        _ => None,
                    };
                    let s = &mut self.scratch;
                    s.profile.mark(Stage::Exchange);
                    match model.host_half(
                        &self.pool,
                        layer,
                        how,
                        &mut input,
                        prediction.as_ref(),
                        s,
                    ) {
                        Ok(cold) => {
                            let cold = cold.then(|| s.ffn.take_side_out(NeuronSide::Cold, partial));
                            self.send(ToHot::Partial {
                                layer,
                                input,
                                cold,
                                spare_mask: prediction,
                            })?;
                        }
                        Err(e) => {
                            let _ = self.send(ToHot::Abort);
                            return Err(e);
                        }
                    }
                }
                FromHot::RunDone {
                    x,
                    rows,
                    logits: l,
                    counts,
                    spare_tokens,
                } => {
                    let s = &mut self.scratch;
                    // The residual stream read back, or (when it stayed on the device)
                    // the buffer it went up in.
                    s.x = x;
                    if let Some(r) = rows {
                        s.rows = r;
                    }
                    if let Some(l) = l {
                        *logits = l;
                    }
                    if let Some(c) = counts {
                        self.counts = c;
                    }
                    self.spare_tokens = spare_tokens;
                    s.profile.mark(Stage::Exchange);
                    return Ok(());
                }
                FromHot::Failed(e) => return Err(ForwardError::Device(e)),
            }
        }
    }

    fn links(&self) -> &ColdLinks {
        self.hybrid
            .as_ref()
            .expect("hybrid steps run only with the hot executor's links")
    }

    /// Why a peer is gone: the engine's recorded failure, if any.
    fn stopped(&self, who: &str) -> ForwardError {
        let why = self
            .health
            .failure()
            .map_or_else(String::new, |f| format!(": {f}"));
        ForwardError::Device(DeviceError::Failed(format!("the {who} has stopped{why}")))
    }

    fn send(&self, msg: ToHot) -> Result<(), ForwardError> {
        self.links()
            .to_hot
            .send(msg)
            .map_err(|_| self.stopped("hot executor"))
    }

    fn recv_hot(&self) -> Result<FromHot, ForwardError> {
        recv_spinning(&self.links().from_hot, PEER_SPIN).map_err(|_| self.stopped("hot executor"))
    }

    fn recv_prediction(
        &self,
        layer: usize,
    ) -> Result<powerinfer_ops::sparse::ActiveSet, ForwardError> {
        let rx = self
            .links()
            .from_pred
            .as_ref()
            .ok_or_else(|| self.stopped("predictor actor"))?;
        let p = recv_spinning(rx, HANDOFF_SPIN).map_err(|_| self.stopped("predictor actor"))?;
        match p.mask {
            Ok(m) if p.layer == layer => Ok(m),
            Ok(_) => Err(ForwardError::Sparsity(format!(
                "a prediction for layer {} came at layer {layer}",
                p.layer
            ))),
            Err(why) => Err(ForwardError::Sparsity(why)),
        }
    }
}

/// Sends steps to the cold executor; the executor stops when the last handle drops.
#[derive(Clone)]
pub(crate) struct ColdHandle {
    tx: Sender<ColdMsg>,
    health: Arc<Health>,
}

impl ColdHandle {
    /// Starts the executor on thread `pi-cold` with `pool`; returns once its KV cache
    /// exists (or with the error that prevented it). `hybrid`: the links to the hot
    /// executor, when the model is placed on a device.
    pub fn spawn(
        model: Arc<Model>,
        pool: Arc<ThreadPool>,
        opts: &EngineOptions,
        hybrid: Option<ColdLinks>,
        health: Arc<Health>,
    ) -> Result<Self, EngineError> {
        let (tx, rx) = bounded(INBOX);
        let (ready_tx, ready_rx) = bounded::<Result<(), EngineError>>(1);
        let opts = opts.clone();
        let h = health.clone();
        std::thread::Builder::new()
            .name("pi-cold".into())
            .spawn(move || {
                let c = &model.config;
                let shape = KvShape {
                    n_slots: opts.max_sequences,
                    n_ctx: opts.n_ctx,
                    n_head_kv: c.n_head_kv,
                    head_dim: c.head_dim,
                    ty: opts.kv_type,
                };
                let partition = &model.partition;
                let kv = KvCache::try_for_layers(c.n_layer, shape, |l| {
                    partition.layers[l].attention == Side::Host
                });
                match kv {
                    Ok(kv) => {
                        let _ = ready_tx.send(Ok(()));
                        let exec = ColdExecutor {
                            scratch: Scratch::new(opts.numerics),
                            model,
                            pool,
                            kv,
                            rx,
                            hybrid,
                            health: h.clone(),
                            spare_tokens: Vec::new(),
                            counts: Vec::new(),
                        };
                        if let Err(p) = catch_unwind(AssertUnwindSafe(|| exec.run())) {
                            h.fail(format!(
                                "the cold executor panicked: {}",
                                panic_message(&*p)
                            ));
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(EngineError::InvalidArgument(e.to_string())));
                    }
                }
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the cold executor: {e}")))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Self { tx, health })
    }

    /// Runs one step and waits for it.
    pub fn step(
        &self,
        batch: Vec<BatchToken>,
        logits: Vec<f32>,
        active: Vec<u32>,
        span: &tracing::Span,
    ) -> Result<StepDone, EngineError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(ColdMsg::Step {
                batch,
                logits,
                active,
                reply,
                span: span.clone(),
            })
            .map_err(|_| self.stopped())?;
        rx.recv().map_err(|_| self.stopped())
    }

    /// The executor is gone: why, when its failure was recorded.
    fn stopped(&self) -> EngineError {
        match self.health.failure() {
            Some(f) => EngineError::Failed(f),
            None => EngineError::Stopped,
        }
    }
}
