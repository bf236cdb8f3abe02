//! The simulated device's own thread: its memory (copies of every placed part, the KV
//! caches of placed layers, the step's activations) and its stream, executing commands in
//! order with the CPU reference of each op.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crossbeam_channel::{Receiver, Sender};

use super::{DeviceError, FfnInput, ModelSpec, Readback};
use crate::handoff::{HANDOFF_SPIN, recv_spinning};
use crate::ids::LayerId;
use crate::kv::LayerKv;
use crate::nn::Rope;
use crate::pool::ThreadPool;
use crate::profile::Profile;
use crate::sparse::ActiveSet;
use crate::tensor::{Activations, Matrix};
use crate::transformer::{
    self, AttentionBlock, AttentionExtras, AttentionScratch, FfnScratch, Head, HeadScratch,
    NeuronFfn, Predictor, PredictorScratch, SparsityMode, StepToken,
};

/// A layer's attention block in device memory.
pub(super) struct Attention {
    pub attn_norm: Vec<f32>,
    pub w: [Matrix; 4],
    pub ffn_norm: Vec<f32>,
    pub kv: LayerKv,
}

/// A layer's hot rows in device memory.
pub(super) struct Hot {
    pub w: [Matrix; 3],
    pub gate_threshold: f32,
}

/// The output head in device memory.
pub(super) struct OutputHead {
    pub output_norm: Vec<f32>,
    pub output: Matrix,
}

/// What the handle sends the worker, in stream order.
pub(super) enum Cmd {
    Configure(Box<ModelSpec>),
    PlaceAttention(LayerId, Box<Attention>),
    PlaceHot(LayerId, Box<Hot>),
    PlacePredictor(LayerId, Box<(Predictor, f32)>),
    PlaceHead(Box<OutputHead>),
    Begin(Vec<StepToken>),
    WriteResidual(Vec<f32>),
    Attention(LayerId),
    Predict(LayerId),
    ReadFfnInput(LayerId, Box<FfnInput>),
    WriteMask(LayerId, ActiveSet),
    HotFfn(LayerId),
    Merge(LayerId, Option<Vec<f32>>),
    ReadResidual(Vec<f32>),
    Head(Vec<u32>, Vec<f32>),
    ReadCounts(Vec<u32>),
    /// An injected fault: the device fails here.
    Fail(String),
    /// The stream has come this far.
    Record(u64),
}

/// What the worker reports at each [`Cmd::Record`].
pub(super) struct Completion {
    pub event: u64,
    /// The first failure, once the device has failed.
    pub error: Option<DeviceError>,
    pub readbacks: Vec<Readback>,
    /// Buffers the commands carried, for the handle to reuse.
    pub spare: Spare,
}

/// Host buffers travelling back for reuse, so steady-state steps allocate nothing.
#[derive(Default)]
pub(super) struct Spare {
    pub f32s: Vec<Vec<f32>>,
    pub tokens: Vec<Vec<StepToken>>,
    pub masks: Vec<ActiveSet>,
    pub rows: Vec<Vec<u32>>,
    pub batches: Vec<Vec<Cmd>>,
}

#[derive(Default)]
struct Layer {
    attention: Option<Attention>,
    hot: Option<Hot>,
    predictor: Option<(Predictor, f32)>,
}

struct Worker {
    spec: Option<(ModelSpec, Rope)>,
    pool: ThreadPool,
    layers: Vec<Layer>,
    head: Option<OutputHead>,
    // The step's activations.
    tokens: Vec<StepToken>,
    cos_sin: Vec<[f32; 2]>,
    x: Vec<f32>,
    xn: Vec<f32>,
    /// The layer whose FFN input `xn` is.
    xn_layer: Option<LayerId>,
    acts: Activations,
    hot_out: Vec<f32>,
    hot_layer: Option<LayerId>,
    /// Predicted neurons of the hot side and of the cold side, and their layer.
    hot_mask: ActiveSet,
    hot_mask_layer: Option<LayerId>,
    cold_mask: ActiveSet,
    cold_mask_layer: Option<LayerId>,
    /// Hot neurons computed, `[n_tok][n_layer]`.
    counts: Vec<u32>,
    side_counts: Vec<u32>,
    attn: AttentionScratch,
    ffn: FfnScratch,
    pred: PredictorScratch,
    head_s: HeadScratch,
    profile: Profile,
    readbacks: Vec<Readback>,
    failed: Option<DeviceError>,
    spare: Spare,
}

fn invalid(why: String) -> DeviceError {
    DeviceError::Invalid(why)
}

/// Runs the worker until the handle drops its sender.
pub(super) fn run(pool: ThreadPool, rx: Receiver<Vec<Cmd>>, done: Sender<Completion>) {
    let mut w = Worker {
        spec: None,
        pool,
        layers: Vec::new(),
        head: None,
        tokens: Vec::new(),
        cos_sin: Vec::new(),
        x: Vec::new(),
        xn: Vec::new(),
        xn_layer: None,
        acts: Activations::new(),
        hot_out: Vec::new(),
        hot_layer: None,
        hot_mask: ActiveSet::new(0),
        hot_mask_layer: None,
        cold_mask: ActiveSet::new(0),
        cold_mask_layer: None,
        counts: Vec::new(),
        side_counts: Vec::new(),
        attn: AttentionScratch::new(Default::default()),
        ffn: FfnScratch::default(),
        pred: PredictorScratch::new(Default::default()),
        head_s: HeadScratch::new(Default::default()),
        profile: Profile::default(),
        readbacks: Vec::new(),
        failed: None,
        spare: Spare::default(),
    };
    while let Ok(mut batch) = recv_spinning(&rx, HANDOFF_SPIN) {
        for cmd in batch.drain(..) {
            if let Cmd::Record(event) = cmd {
                let c = Completion {
                    event,
                    error: w.failed.clone(),
                    readbacks: std::mem::take(&mut w.readbacks),
                    spare: std::mem::take(&mut w.spare),
                };
                if done.send(c).is_err() {
                    return;
                }
                continue;
            }
            if w.failed.is_some() {
                continue;
            }
            let r = catch_unwind(AssertUnwindSafe(|| w.exec(cmd)));
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => w.failed = Some(e),
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    w.failed = Some(DeviceError::Failed(format!(
                        "the simulated device's worker panicked: {msg}"
                    )));
                }
            }
        }
        w.spare.batches.push(batch);
    }
}

impl Worker {
    fn spec(&self) -> Result<&ModelSpec, DeviceError> {
        self.spec
            .as_ref()
            .map(|(s, _)| s)
            .ok_or_else(|| invalid("the device is not configured".into()))
    }

    fn layer_mut(&mut self, layer: LayerId) -> Result<&mut Layer, DeviceError> {
        self.layers
            .get_mut(layer.0)
            .ok_or_else(|| invalid(format!("layer {layer} is outside the model")))
    }

    /// The residual stream's length for the step's batch.
    fn stream_len(&self) -> Result<usize, DeviceError> {
        Ok(self.tokens.len() * self.spec()?.attention.n_embd)
    }

    fn exec(&mut self, cmd: Cmd) -> Result<(), DeviceError> {
        match cmd {
            Cmd::Configure(spec) => {
                let r = &spec.rope;
                let rope = Rope::new(
                    r.n_rot,
                    r.base,
                    r.freq_scale,
                    r.style,
                    r.freq_factors.as_deref(),
                );
                self.layers = (0..spec.n_layer).map(|_| Layer::default()).collect();
                self.acts = Activations::with_numerics(spec.numerics);
                self.attn = AttentionScratch::new(spec.numerics);
                self.pred = PredictorScratch::new(spec.numerics);
                self.head_s = HeadScratch::new(spec.numerics);
                self.spec = Some((*spec, rope));
            }
            Cmd::PlaceAttention(l, a) => self.layer_mut(l)?.attention = Some(*a),
            Cmd::PlaceHot(l, h) => self.layer_mut(l)?.hot = Some(*h),
            Cmd::PlacePredictor(l, p) => self.layer_mut(l)?.predictor = Some(*p),
            Cmd::PlaceHead(h) => self.head = Some(*h),
            Cmd::Begin(tokens) => self.begin(tokens)?,
            Cmd::WriteResidual(x) => {
                if x.len() != self.stream_len()? {
                    return Err(invalid(format!(
                        "a residual stream of {} values for {} tokens",
                        x.len(),
                        self.tokens.len()
                    )));
                }
                self.x.copy_from_slice(&x);
                self.spare.f32s.push(x);
            }
            Cmd::Attention(l) => self.attention(l)?,
            Cmd::Predict(l) => self.predict(l)?,
            Cmd::ReadFfnInput(l, mut into) => {
                if self.xn_layer != Some(l) {
                    return Err(invalid(format!("no FFN input of layer {l} to read")));
                }
                into.layer = l;
                into.x.clear();
                into.x.extend_from_slice(&self.x);
                into.xn.clear();
                into.xn.extend_from_slice(&self.xn);
                into.predicted = self.cold_mask_layer == Some(l);
                if into.predicted {
                    into.cold_mask.copy_from(&self.cold_mask);
                }
                self.readbacks.push(Readback::FfnInput(*into));
            }
            Cmd::WriteMask(l, mask) => {
                if mask.n_tok() != self.tokens.len() {
                    return Err(invalid(format!(
                        "a mask of {} tokens for a step of {}",
                        mask.n_tok(),
                        self.tokens.len()
                    )));
                }
                self.hot_mask.copy_from(&mask);
                self.hot_mask_layer = Some(l);
                self.spare.masks.push(mask);
            }
            Cmd::HotFfn(l) => self.hot_ffn(l)?,
            Cmd::Merge(l, cold) => {
                let merged = self.merge(l, cold.as_deref());
                self.spare.f32s.extend(cold);
                merged?;
            }
            Cmd::ReadResidual(mut into) => {
                into.clear();
                into.extend_from_slice(&self.x);
                self.readbacks.push(Readback::Residual(into));
            }
            Cmd::Head(rows, mut into) => {
                let h = self
                    .head
                    .as_ref()
                    .ok_or_else(|| invalid("the head is not placed".into()))?;
                let eps = self.spec()?.attention.rms_eps;
                if rows.iter().any(|&r| r as usize >= self.tokens.len()) {
                    return Err(invalid("head rows outside the batch".into()));
                }
                let head = Head {
                    output_norm: &h.output_norm,
                    output: &h.output,
                    rms_eps: eps,
                };
                head.run(&self.pool, &self.x, &rows, &mut self.head_s, &mut into);
                self.readbacks.push(Readback::Logits(into));
                self.spare.rows.push(rows);
            }
            Cmd::ReadCounts(mut into) => {
                into.clear();
                into.extend_from_slice(&self.counts);
                self.readbacks.push(Readback::Counts(into));
            }
            Cmd::Fail(why) => return Err(DeviceError::Failed(why)),
            Cmd::Record(_) => {}
        }
        Ok(())
    }

    fn begin(&mut self, tokens: Vec<StepToken>) -> Result<(), DeviceError> {
        let (n_layer, n_embd, kv) = {
            let s = self.spec()?;
            (s.n_layer, s.attention.n_embd, s.kv)
        };
        if let Some(t) = tokens
            .iter()
            .find(|t| t.pos >= kv.n_ctx || t.slot.0 >= kv.n_slots)
        {
            return Err(invalid(format!(
                "token at position {} of slot {} is outside the KV cache",
                t.pos, t.slot.0
            )));
        }
        let (_, rope) = self.spec.as_ref().expect("checked above");
        let half = rope.n_rot() / 2;
        self.cos_sin.resize(tokens.len() * half, [0.0; 2]);
        for (t, tok) in tokens.iter().enumerate() {
            rope.cos_sin(tok.pos, &mut self.cos_sin[t * half..(t + 1) * half]);
        }
        let n = tokens.len();
        self.x.clear();
        self.x.resize(n * n_embd, 0.0);
        self.xn.clear();
        self.xn.resize(n * n_embd, 0.0);
        self.counts.clear();
        self.counts.resize(n * n_layer, 0);
        self.xn_layer = None;
        self.hot_layer = None;
        self.hot_mask_layer = None;
        self.cold_mask_layer = None;
        let old = std::mem::replace(&mut self.tokens, tokens);
        self.spare.tokens.push(old);
        Ok(())
    }

    fn attention(&mut self, l: LayerId) -> Result<(), DeviceError> {
        let (spec, rope) = self
            .spec
            .as_ref()
            .ok_or_else(|| invalid("the device is not configured".into()))?;
        let layer = self
            .layers
            .get_mut(l.0)
            .ok_or_else(|| invalid(format!("layer {l} is outside the model")))?;
        let a = layer
            .attention
            .as_mut()
            .ok_or_else(|| invalid(format!("layer {l}'s attention is not placed")))?;
        let block = AttentionBlock {
            shape: spec.attention,
            rope,
            attn_norm: &a.attn_norm,
            wq: &a.w[0],
            wk: &a.w[1],
            wv: &a.w[2],
            wo: &a.w[3],
            ffn_norm: &a.ffn_norm,
            extras: AttentionExtras::default(),
        };
        block.run(
            &self.pool,
            &self.tokens,
            &self.cos_sin,
            &mut a.kv,
            &mut self.x,
            &mut self.xn,
            &mut self.attn,
            &mut self.profile,
        );
        self.xn_layer = Some(l);
        Ok(())
    }

    fn predict(&mut self, l: LayerId) -> Result<(), DeviceError> {
        let n_ff = self.spec()?.n_ff;
        let layer = self
            .layers
            .get(l.0)
            .ok_or_else(|| invalid(format!("layer {l} is outside the model")))?;
        let (p, thr) = layer
            .predictor
            .as_ref()
            .ok_or_else(|| invalid(format!("layer {l}'s predictor is not placed")))?;
        let hot = layer.hot.as_ref().map_or(0, |h| h.w[0].n_rows());
        p.logits(&self.pool, &self.x, self.tokens.len(), &mut self.pred);
        let z = self.pred.logits();
        transformer::select(z, &self.tokens, *thr, 0..hot, &mut self.hot_mask);
        transformer::select(z, &self.tokens, *thr, hot..n_ff, &mut self.cold_mask);
        self.hot_mask_layer = Some(l);
        self.cold_mask_layer = Some(l);
        Ok(())
    }

    fn hot_ffn(&mut self, l: LayerId) -> Result<(), DeviceError> {
        let (n_layer, glu, n_embd) = {
            let s = self.spec()?;
            (s.n_layer, s.glu, s.attention.n_embd)
        };
        if self.xn_layer != Some(l) {
            return Err(invalid(format!(
                "no FFN input of layer {l} for its hot side"
            )));
        }
        let Some(h) = self.layers.get(l.0).and_then(|x| x.hot.as_ref()) else {
            // No hot neurons: the partial is empty and the merge adds the host's alone.
            self.hot_layer = None;
            return Ok(());
        };
        let wants_mask = self
            .tokens
            .iter()
            .any(|t| t.mode == SparsityMode::Predictor);
        if wants_mask && self.hot_mask_layer != Some(l) {
            return Err(invalid(format!(
                "layer {l}'s hot side has predictor-mode tokens but no prediction"
            )));
        }
        let ffn = NeuronFfn {
            gate: &h.w[0],
            up: &h.w[1],
            down_t: &h.w[2],
            glu,
            gate_threshold: h.gate_threshold,
        };
        let n = self.tokens.len();
        self.acts.set(&self.xn, n);
        self.hot_out.clear();
        self.hot_out.resize(n * n_embd, 0.0);
        self.side_counts.clear();
        self.side_counts.resize(n, 0);
        ffn.run(
            &self.pool,
            &self.tokens,
            &mut self.acts,
            wants_mask.then_some(&self.hot_mask),
            &mut self.ffn,
            &mut self.hot_out,
            &mut self.side_counts,
            &mut self.profile,
        );
        for (t, &c) in self.side_counts.iter().enumerate() {
            self.counts[t * n_layer + l.0] = c;
        }
        self.hot_layer = Some(l);
        Ok(())
    }

    fn merge(&mut self, l: LayerId, cold: Option<&[f32]>) -> Result<(), DeviceError> {
        let hot = (self.hot_layer == Some(l)).then_some(self.hot_out.as_slice());
        if let Some(c) = cold
            && c.len() != self.x.len()
        {
            return Err(invalid(format!(
                "a partial sum of {} values for a residual stream of {}",
                c.len(),
                self.x.len()
            )));
        }
        match (hot, cold) {
            (Some(h), Some(c)) => {
                for ((x, a), b) in self.x.iter_mut().zip(h).zip(c) {
                    *x += a + b;
                }
            }
            (Some(h), None) => crate::nn::add(&mut self.x, h),
            (None, Some(c)) => crate::nn::add(&mut self.x, c),
            (None, None) => {
                return Err(invalid(format!(
                    "layer {l} has neither a hot partial nor a host partial to merge"
                )));
            }
        }
        self.xn_layer = None;
        Ok(())
    }
}
