//! [`KernelDevice`]: the device trait carried out with the kernels of `kernels/*.cu` on a
//! [`Backend`] (the CUDA driver on a GPU; the CPU execution harness in tests). Parts are
//! copied once into device memory at placement; each op queues kernel launches and
//! copies on the backend's stream at submit, so the host waits only for readbacks.

use std::collections::VecDeque;

use powerinfer_ops::device::{
    AttentionUpload, Device, DeviceError, DeviceInfo, DeviceKind, Event, FfnInput, HeadUpload,
    HotUpload, ModelSpec, Op, PredictorUpload, Readback,
};
use powerinfer_ops::ids::LayerId;
use powerinfer_ops::kv::KvType;
use powerinfer_ops::nn::{Glu, Rope, RopeStyle};
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::sparse::ActiveSet;
use powerinfer_ops::tensor::Matrix;
use powerinfer_ops::transformer::{SparsityMode, StepToken};

use crate::backend::{Arg, Backend, DevPtr, Dims, Staged};

/// Threads per block of the warp-per-row kernels (4 warps of 32, 2 of 64).
const ROW_BLOCK: u32 = 128;
/// Rows of down_t one block-row of the axpy sums before the splits are added.
const AXPY_ROWS_PER_SPLIT: usize = 256;
/// The most attention-score scratch one launch uses; longer batches go in chunks.
const SCORE_SCRATCH_BYTES: usize = 64 << 20;

/// Whether `kernels/quant.cuh` decodes weights of type `w` (its `pi_unit`). The kernels
/// read a type they do not know as zeros, so every other type is refused at upload.
pub fn computes_with(w: WeightType) -> bool {
    match w {
        WeightType::F32
        | WeightType::F16
        | WeightType::BF16
        | WeightType::Q4_0
        | WeightType::Q4_1
        | WeightType::Q5_0
        | WeightType::Q5_1
        | WeightType::Q8_0
        | WeightType::Q4_K
        | WeightType::Q5_K
        | WeightType::Q6_K => true,
        WeightType::Q2_K | WeightType::Q3_K | WeightType::IQ4_NL | WeightType::IQ4_XS => false,
    }
}

/// Refuses a part holding a matrix of a type the kernels do not decode, before anything of
/// it is reserved or uploaded.
fn refuse_unknown_types(ms: &[&Matrix]) -> Result<(), DeviceError> {
    match ms.iter().find(|m| !computes_with(m.wtype())) {
        Some(m) => Err(DeviceError::UnsupportedType(m.wtype().ggml())),
        None => Ok(()),
    }
}

fn invalid(why: impl Into<String>) -> DeviceError {
    DeviceError::Invalid(why.into())
}

/// A matrix in device memory.
struct DevMatrix {
    ptr: DevPtr,
    dtype: i32,
    n_rows: usize,
    n_cols: usize,
    row_bytes: usize,
}

struct DevAttention {
    attn_norm: DevPtr,
    w: [DevMatrix; 4],
    ffn_norm: DevPtr,
    k: DevPtr,
    v: DevPtr,
}

struct DevHot {
    gate: DevMatrix,
    up: DevMatrix,
    down_t: DevMatrix,
    threshold: f32,
}

struct DevPredictor {
    fc1: DevMatrix,
    fc2: DevMatrix,
    b1: DevPtr,
    b2: DevPtr,
    threshold: f32,
}

#[derive(Default)]
struct Layer {
    attention: Option<DevAttention>,
    hot: Option<DevHot>,
    predictor: Option<DevPredictor>,
}

/// A step buffer, grown to the largest batch seen.
#[derive(Default)]
struct Buf {
    ptr: DevPtr,
    bytes: usize,
}

#[derive(Default)]
struct StepBufs {
    x: Buf,
    xn: Buf,
    norm: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    att: Buf,
    h: Buf,
    part: Buf,
    hot_out: Buf,
    cold: Buf,
    hidden: Buf,
    logits: Buf,
    hot_mask: Buf,
    cold_mask: Buf,
    counts: Buf,
    modes: Buf,
    slots: Buf,
    pos: Buf,
    cos_sin: Buf,
    scores: Buf,
    rows: Buf,
    head_xn: Buf,
    head_out: Buf,
}

/// A readback whose copy is queued.
enum Pending {
    FfnInput {
        into: FfnInput,
        x: Staged,
        xn: Staged,
        cold: Option<(Staged, Vec<SparsityMode>)>,
    },
    Residual(Vec<f32>, Staged),
    Logits(Vec<f32>, Staged),
    Counts(Vec<u32>, Staged),
}

/// The device trait on kernels and a backend.
pub struct KernelDevice<B: Backend> {
    backend: B,
    kind: DeviceKind,
    name: String,
    budget: u64,
    used: u64,
    spec: Option<(ModelSpec, Rope)>,
    layers: Vec<Layer>,
    head: Option<(DevPtr, DevMatrix)>,
    bufs: StepBufs,
    /// Device allocations for the step buffers (not counted against the budget).
    scratch_bytes: u64,
    tokens: Vec<StepToken>,
    xn_layer: Option<LayerId>,
    hot_layer: Option<LayerId>,
    hot_mask_layer: Option<LayerId>,
    cold_mask_layer: Option<LayerId>,
    /// Readbacks queued since the last record, then per recorded event.
    unrecorded: Vec<Pending>,
    recorded: VecDeque<(u64, Vec<Pending>)>,
    ready: VecDeque<Readback>,
    failed: Option<DeviceError>,
    host_f32: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32_bytes(v: impl IntoIterator<Item = i32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn to_f32s(bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

fn mode_id(m: SparsityMode) -> i32 {
    match m {
        SparsityMode::Dense => 0,
        SparsityMode::Predictor => 1,
        SparsityMode::Gate => 2,
    }
}

fn glu_id(g: Glu) -> i32 {
    match g {
        Glu::Silu => 0,
        Glu::Relu => 1,
        Glu::DualRelu => 2,
        Glu::Gelu => 3,
    }
}

impl<B: Backend> KernelDevice<B> {
    /// A device on `backend` whose placements may use `budget` bytes.
    pub fn new(backend: B, kind: DeviceKind, name: String, budget: u64) -> Self {
        Self {
            backend,
            kind,
            name,
            budget,
            used: 0,
            spec: None,
            layers: Vec::new(),
            head: None,
            bufs: StepBufs::default(),
            scratch_bytes: 0,
            tokens: Vec::new(),
            xn_layer: None,
            hot_layer: None,
            hot_mask_layer: None,
            cold_mask_layer: None,
            unrecorded: Vec::new(),
            recorded: VecDeque::new(),
            ready: VecDeque::new(),
            failed: None,
            host_f32: Vec::new(),
        }
    }

    /// The backend (tests read its memory).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Device memory of the step buffers, outside the placement budget.
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch_bytes
    }

    fn check(&self) -> Result<(), DeviceError> {
        self.failed.clone().map_or(Ok(()), Err)
    }

    /// Records a failure: the device stays failed.
    fn fail<T>(&mut self, e: DeviceError) -> Result<T, DeviceError> {
        if matches!(e, DeviceError::Failed(_)) {
            self.failed = Some(e.clone());
        }
        Err(e)
    }

    fn spec(&self) -> Result<&ModelSpec, DeviceError> {
        self.spec
            .as_ref()
            .map(|(s, _)| s)
            .ok_or_else(|| invalid("the device is not configured"))
    }

    fn reserve(&mut self, bytes: u64) -> Result<(), DeviceError> {
        let free = self.budget.saturating_sub(self.used);
        if bytes > free {
            return Err(DeviceError::OutOfMemory {
                requested: bytes,
                free,
            });
        }
        self.used += bytes;
        Ok(())
    }

    fn upload_bytes(&mut self, bytes: &[u8]) -> Result<DevPtr, DeviceError> {
        let p = self.backend.alloc(bytes.len())?;
        self.backend.upload(p, bytes)?;
        Ok(p)
    }

    fn upload_vec(&mut self, v: &[f32]) -> Result<DevPtr, DeviceError> {
        self.upload_bytes(&f32_bytes(v))
    }

    fn upload_matrix(&mut self, m: &Matrix) -> Result<DevMatrix, DeviceError> {
        refuse_unknown_types(&[m])?;
        let bytes = m.bytes();
        if m.n_rows() == 0 || !bytes.len().is_multiple_of(m.n_rows()) {
            return Err(invalid(format!("matrix {m:?} has a malformed buffer")));
        }
        Ok(DevMatrix {
            ptr: self.upload_bytes(bytes)?,
            dtype: m.wtype().ggml() as i32,
            n_rows: m.n_rows(),
            n_cols: m.n_cols(),
            row_bytes: bytes.len() / m.n_rows(),
        })
    }

    fn layer_mut(&mut self, l: LayerId) -> Result<&mut Layer, DeviceError> {
        self.layers
            .get_mut(l.0)
            .ok_or_else(|| invalid(format!("layer {l} is outside the model")))
    }

    /// Grows step buffer `which` to `bytes` (waiting for the stream before freeing the
    /// old one).
    fn ensure(
        &mut self,
        which: fn(&mut StepBufs) -> &mut Buf,
        bytes: usize,
    ) -> Result<DevPtr, DeviceError> {
        let cur = which(&mut self.bufs);
        if cur.bytes >= bytes && cur.ptr != 0 {
            return Ok(cur.ptr);
        }
        let (old, old_bytes) = (cur.ptr, cur.bytes);
        if old != 0 {
            let e = self.backend.record()?;
            self.backend.wait(e)?;
            self.backend.free(old)?;
            self.scratch_bytes -= old_bytes as u64;
        }
        let want = bytes.max(16).next_power_of_two();
        let p = self.backend.alloc(want)?;
        self.scratch_bytes += want as u64;
        let b = which(&mut self.bufs);
        b.ptr = p;
        b.bytes = want;
        Ok(p)
    }

    fn matmul(
        &mut self,
        m: &DevMatrixRef,
        x: DevPtr,
        n_tok: usize,
        y: DevPtr,
        accumulate: bool,
    ) -> Result<(), DeviceError> {
        let rows_per_block = (ROW_BLOCK / self.backend.warp()) as usize;
        let dims = Dims {
            grid: [
                m.n_rows.div_ceil(rows_per_block) as u32,
                n_tok.div_ceil(4) as u32,
                1,
            ],
            block: [ROW_BLOCK, 1, 1],
        };
        self.backend.launch(
            "pi_matmul",
            dims,
            &[
                Arg::Ptr(m.ptr),
                Arg::I32(m.dtype),
                Arg::I32(m.n_rows as i32),
                Arg::I32(m.n_cols as i32),
                Arg::I64(m.row_bytes as i64),
                Arg::Ptr(x),
                Arg::I32(n_tok as i32),
                Arg::Ptr(y),
                Arg::I32(accumulate as i32),
            ],
        )
    }

    fn rms_norm(
        &mut self,
        x: DevPtr,
        rows: DevPtr,
        n_rows: usize,
        w: DevPtr,
        out: DevPtr,
    ) -> Result<(), DeviceError> {
        let (n, eps) = {
            let s = self.spec()?;
            (s.attention.n_embd, s.attention.rms_eps)
        };
        self.backend.launch(
            "pi_rms_norm",
            Dims {
                grid: [n_rows as u32, 1, 1],
                block: [256, 1, 1],
            },
            &[
                Arg::Ptr(x),
                Arg::Ptr(rows),
                Arg::Ptr(w),
                Arg::I32(n as i32),
                Arg::F32(eps),
                Arg::Ptr(out),
            ],
        )
    }

    fn rope(&mut self, x: DevPtr, n_heads: usize) -> Result<(), DeviceError> {
        let (s, rope) = self
            .spec
            .as_ref()
            .ok_or_else(|| invalid("not configured"))?;
        let (hd, n_rot, neox) = (
            s.attention.head_dim,
            rope.n_rot(),
            rope.style() == RopeStyle::Neox,
        );
        let n = self.tokens.len();
        let cs = self.bufs.cos_sin.ptr;
        self.backend.launch(
            "pi_rope",
            Dims::linear(n * n_heads * (n_rot / 2), 256),
            &[
                Arg::Ptr(x),
                Arg::I32(n as i32),
                Arg::I32(n_heads as i32),
                Arg::I32(hd as i32),
                Arg::I32(n_rot as i32),
                Arg::I32(neox as i32),
                Arg::Ptr(cs),
            ],
        )
    }

    fn begin(&mut self, tokens: &[StepToken]) -> Result<(), DeviceError> {
        let (n_layer, n_embd, kv) = {
            let s = self.spec()?;
            (s.n_layer, s.attention.n_embd, s.kv)
        };
        if tokens.is_empty() {
            return Err(invalid("a step of no tokens"));
        }
        if let Some(t) = tokens
            .iter()
            .find(|t| t.pos >= kv.n_ctx || t.slot.0 >= kv.n_slots)
        {
            return Err(invalid(format!(
                "token at position {} of slot {} is outside the KV cache",
                t.pos, t.slot.0
            )));
        }
        let n = tokens.len();
        let (_, rope) = self.spec.as_ref().expect("checked above");
        let half = rope.n_rot() / 2;
        let mut cs = vec![[0f32; 2]; n * half];
        for (t, tok) in tokens.iter().enumerate() {
            rope.cos_sin(tok.pos, &mut cs[t * half..(t + 1) * half]);
        }
        let cs: Vec<f32> = cs.into_iter().flatten().collect();
        let p = self.ensure(|b| &mut b.cos_sin, cs.len().max(1) * 4)?;
        self.backend.upload(p, &f32_bytes(&cs))?;
        let p = self.ensure(|b| &mut b.modes, n * 4)?;
        self.backend
            .upload(p, &i32_bytes(tokens.iter().map(|t| mode_id(t.mode))))?;
        let p = self.ensure(|b| &mut b.slots, n * 4)?;
        self.backend
            .upload(p, &i32_bytes(tokens.iter().map(|t| t.slot.0 as i32)))?;
        let p = self.ensure(|b| &mut b.pos, n * 4)?;
        self.backend
            .upload(p, &i32_bytes(tokens.iter().map(|t| t.pos as i32)))?;
        let p = self.ensure(|b| &mut b.counts, n * n_layer * 4)?;
        self.backend.zero(p, n * n_layer * 4)?;
        let p = self.ensure(|b| &mut b.x, n * n_embd * 4)?;
        self.backend.zero(p, n * n_embd * 4)?;
        self.ensure(|b| &mut b.xn, n * n_embd * 4)?;
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens);
        self.xn_layer = None;
        self.hot_layer = None;
        self.hot_mask_layer = None;
        self.cold_mask_layer = None;
        Ok(())
    }

    fn attention(&mut self, l: LayerId) -> Result<(), DeviceError> {
        let s = self.spec()?.clone();
        let sh = s.attention;
        let n = self.tokens.len();
        let a = self
            .layers
            .get(l.0)
            .and_then(|x| x.attention.as_ref())
            .ok_or_else(|| invalid(format!("layer {l}'s attention is not placed")))?;
        let (attn_norm, ffn_norm, kc, vc) = (a.attn_norm, a.ffn_norm, a.k, a.v);
        let w: [DevMatrixRef; 4] = [0, 1, 2, 3].map(|i| DevMatrixRef::of(&a.w[i]));
        let (wq, wkv) = (sh.n_embd_q(), sh.n_embd_kv());
        let norm = self.ensure(|b| &mut b.norm, n * sh.n_embd * 4)?;
        let q = self.ensure(|b| &mut b.q, n * wq * 4)?;
        let k = self.ensure(|b| &mut b.k, n * wkv * 4)?;
        let v = self.ensure(|b| &mut b.v, n * wkv * 4)?;
        let att = self.ensure(|b| &mut b.att, n * wq * 4)?;
        let per_tok_scores = sh.n_head * s.kv.n_ctx * 4;
        let chunk = (SCORE_SCRATCH_BYTES / per_tok_scores.max(1)).clamp(1, n);
        let scores = self.ensure(|b| &mut b.scores, chunk * per_tok_scores)?;
        let (x, xn) = (self.bufs.x.ptr, self.bufs.xn.ptr);
        let (slots, pos) = (self.bufs.slots.ptr, self.bufs.pos.ptr);

        self.rms_norm(x, 0, n, attn_norm, norm)?;
        self.matmul(&w[0], norm, n, q, false)?;
        self.matmul(&w[1], norm, n, k, false)?;
        self.matmul(&w[2], norm, n, v, false)?;
        self.rope(q, sh.n_head)?;
        self.rope(k, sh.n_head_kv)?;
        let f16 = s.kv.ty == KvType::F16;
        self.backend.launch(
            "pi_kv_write",
            Dims::linear(n * wkv, 256),
            &[
                Arg::Ptr(k),
                Arg::Ptr(v),
                Arg::I32(n as i32),
                Arg::I32(sh.n_head_kv as i32),
                Arg::I32(sh.head_dim as i32),
                Arg::I32(s.kv.n_ctx as i32),
                Arg::Ptr(slots),
                Arg::Ptr(pos),
                Arg::I32(f16 as i32),
                Arg::Ptr(kc),
                Arg::Ptr(vc),
            ],
        )?;
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        let mut t0 = 0;
        while t0 < n {
            let m = chunk.min(n - t0);
            self.backend.launch(
                "pi_attention",
                Dims {
                    grid: [m as u32, sh.n_head as u32, 1],
                    block: [128, 1, 1],
                },
                &[
                    Arg::Ptr(q + (t0 * wq * 4) as u64),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::I32(f16 as i32),
                    Arg::I32(m as i32),
                    Arg::I32(sh.n_head as i32),
                    Arg::I32(sh.n_head_kv as i32),
                    Arg::I32(sh.head_dim as i32),
                    Arg::I32(s.kv.n_ctx as i32),
                    Arg::Ptr(slots + (t0 * 4) as u64),
                    Arg::Ptr(pos + (t0 * 4) as u64),
                    Arg::F32(scale),
                    Arg::Ptr(scores),
                    Arg::Ptr(att + (t0 * wq * 4) as u64),
                ],
            )?;
            t0 += m;
        }
        self.matmul(&w[3], att, n, x, true)?;
        self.rms_norm(x, 0, n, ffn_norm, xn)?;
        self.xn_layer = Some(l);
        Ok(())
    }

    fn predict(&mut self, l: LayerId) -> Result<(), DeviceError> {
        let n_ff = self.spec()?.n_ff;
        let layer = self
            .layers
            .get(l.0)
            .ok_or_else(|| invalid(format!("layer {l} is outside the model")))?;
        let p = layer
            .predictor
            .as_ref()
            .ok_or_else(|| invalid(format!("layer {l}'s predictor is not placed")))?;
        let n_hot = layer.hot.as_ref().map_or(0, |h| h.gate.n_rows);
        let (fc1, fc2) = (DevMatrixRef::of(&p.fc1), DevMatrixRef::of(&p.fc2));
        let (b1, b2, thr) = (p.b1, p.b2, p.threshold);
        let n = self.tokens.len();
        let hidden = self.ensure(|b| &mut b.hidden, n * fc1.n_rows * 4)?;
        let logits = self.ensure(|b| &mut b.logits, n * n_ff * 4)?;
        let hot_mask = self.ensure(|b| &mut b.hot_mask, n * n_hot.max(1))?;
        let cold_mask = self.ensure(|b| &mut b.cold_mask, n * (n_ff - n_hot).max(1))?;
        let x = self.bufs.x.ptr;
        self.matmul(&fc1, x, n, hidden, false)?;
        self.backend.launch(
            "pi_bias_act",
            Dims::linear(n * fc1.n_rows, 256),
            &[
                Arg::Ptr(hidden),
                Arg::Ptr(b1),
                Arg::I32(n as i32),
                Arg::I32(fc1.n_rows as i32),
                Arg::I32(1),
            ],
        )?;
        self.matmul(&fc2, hidden, n, logits, false)?;
        if b2 != 0 {
            self.backend.launch(
                "pi_bias_act",
                Dims::linear(n * n_ff, 256),
                &[
                    Arg::Ptr(logits),
                    Arg::Ptr(b2),
                    Arg::I32(n as i32),
                    Arg::I32(n_ff as i32),
                    Arg::I32(0),
                ],
            )?;
        }
        let modes = self.bufs.modes.ptr;
        self.backend.launch(
            "pi_select",
            Dims::linear(n * n_ff, 256),
            &[
                Arg::Ptr(logits),
                Arg::I32(n as i32),
                Arg::I32(n_ff as i32),
                Arg::I32(n_hot as i32),
                Arg::Ptr(modes),
                Arg::F32(thr),
                Arg::Ptr(hot_mask),
                Arg::Ptr(cold_mask),
            ],
        )?;
        self.hot_mask_layer = Some(l);
        self.cold_mask_layer = Some(l);
        Ok(())
    }

    fn write_mask(&mut self, l: LayerId, mask: &ActiveSet) -> Result<(), DeviceError> {
        let n = self.tokens.len();
        if mask.n_tok() != n {
            return Err(invalid(format!(
                "a mask of {} tokens for a step of {n}",
                mask.n_tok()
            )));
        }
        let n_hot = mask.n_rows();
        let mut flags = vec![0u8; n * n_hot.max(1)];
        for t in 0..n {
            for &i in mask.token(t) {
                let i = i as usize;
                if i >= n_hot {
                    return Err(invalid(format!("mask row {i} of {n_hot}")));
                }
                flags[t * n_hot + i] = 1;
            }
        }
        let p = self.ensure(|b| &mut b.hot_mask, flags.len())?;
        self.backend.upload(p, &flags)?;
        self.hot_mask_layer = Some(l);
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
        let (gate, up, down_t, thr) = (
            DevMatrixRef::of(&h.gate),
            DevMatrixRef::of(&h.up),
            DevMatrixRef::of(&h.down_t),
            h.threshold,
        );
        let n = self.tokens.len();
        let n_hot = gate.n_rows;
        let hbuf = self.ensure(|b| &mut b.h, n * n_hot * 4)?;
        let n_split = n_hot.div_ceil(AXPY_ROWS_PER_SPLIT);
        let part = self.ensure(|b| &mut b.part, n_split * n * n_embd * 4)?;
        let out = self.ensure(|b| &mut b.hot_out, n * n_embd * 4)?;
        let mask = if wants_mask {
            self.bufs.hot_mask.ptr
        } else {
            // Read by predictor-mode tokens only: any valid address will do.
            self.ensure(|b| &mut b.hot_mask, 1)?
        };
        let (xn, modes, counts) = (self.bufs.xn.ptr, self.bufs.modes.ptr, self.bufs.counts.ptr);
        let rows_per_block = (ROW_BLOCK / self.backend.warp()) as usize;
        self.backend.launch(
            "pi_ffn_gate_up",
            Dims {
                grid: [n_hot.div_ceil(rows_per_block) as u32, 1, 1],
                block: [ROW_BLOCK, 1, 1],
            },
            &[
                Arg::Ptr(gate.ptr),
                Arg::I32(gate.dtype),
                Arg::I64(gate.row_bytes as i64),
                Arg::Ptr(up.ptr),
                Arg::I32(up.dtype),
                Arg::I64(up.row_bytes as i64),
                Arg::I32(n_hot as i32),
                Arg::I32(n_embd as i32),
                Arg::Ptr(xn),
                Arg::I32(n as i32),
                Arg::Ptr(modes),
                Arg::Ptr(mask),
                Arg::I32(glu_id(glu)),
                Arg::F32(thr),
                Arg::Ptr(hbuf),
                Arg::Ptr(counts + (l.0 * 4) as u64),
                Arg::I32(n_layer as i32),
            ],
        )?;
        let units = n_embd.div_ceil(32);
        self.backend.launch(
            "pi_axpy_rows",
            Dims {
                grid: [units.div_ceil(64) as u32, n_split as u32, n as u32],
                block: [64, 1, 1],
            },
            &[
                Arg::Ptr(down_t.ptr),
                Arg::I32(down_t.dtype),
                Arg::I64(down_t.row_bytes as i64),
                Arg::I32(n_hot as i32),
                Arg::I32(n_embd as i32),
                Arg::Ptr(hbuf),
                Arg::I32(n as i32),
                Arg::I32(AXPY_ROWS_PER_SPLIT as i32),
                Arg::Ptr(part),
            ],
        )?;
        let len = n * n_embd;
        self.backend.launch(
            "pi_sum_splits",
            Dims::linear(len, 256),
            &[
                Arg::Ptr(part),
                Arg::I32(n_split as i32),
                Arg::I64(len as i64),
                Arg::Ptr(out),
            ],
        )?;
        self.hot_layer = Some(l);
        Ok(())
    }

    fn merge(&mut self, l: LayerId, cold: Option<&[f32]>) -> Result<(), DeviceError> {
        let len = self.tokens.len() * self.spec()?.attention.n_embd;
        if let Some(c) = cold
            && c.len() != len
        {
            return Err(invalid(format!(
                "a partial sum of {} values for a residual stream of {len}",
                c.len()
            )));
        }
        let hot = if self.hot_layer == Some(l) {
            self.bufs.hot_out.ptr
        } else {
            0
        };
        let cold_ptr = match cold {
            Some(c) => {
                let p = self.ensure(|b| &mut b.cold, len * 4)?;
                let mut bytes = std::mem::take(&mut self.host_f32);
                bytes.clear();
                bytes.extend(c.iter().flat_map(|v| v.to_le_bytes()));
                let r = self.backend.upload(p, &bytes);
                self.host_f32 = bytes;
                r?;
                p
            }
            None => 0,
        };
        if hot == 0 && cold_ptr == 0 {
            return Err(invalid(format!(
                "layer {l} has neither a hot partial nor a host partial to merge"
            )));
        }
        let x = self.bufs.x.ptr;
        self.backend.launch(
            "pi_merge",
            Dims::linear(len, 256),
            &[
                Arg::Ptr(x),
                Arg::Ptr(hot),
                Arg::Ptr(cold_ptr),
                Arg::I64(len as i64),
            ],
        )?;
        self.xn_layer = None;
        Ok(())
    }

    fn head(&mut self, rows: &[u32], into: Vec<f32>) -> Result<(), DeviceError> {
        let (norm, out) = match &self.head {
            Some((n, m)) => (*n, DevMatrixRef::of(m)),
            None => return Err(invalid("the head is not placed")),
        };
        let n = self.tokens.len();
        if rows.iter().any(|&r| r as usize >= n) {
            return Err(invalid("head rows outside the batch"));
        }
        if rows.is_empty() {
            let s = self.backend.download(self.bufs.x.ptr, 0)?;
            self.unrecorded.push(Pending::Logits(into, s));
            return Ok(());
        }
        let n_embd = self.spec()?.attention.n_embd;
        let rp = self.ensure(|b| &mut b.rows, rows.len() * 4)?;
        self.backend
            .upload(rp, &i32_bytes(rows.iter().map(|&r| r as i32)))?;
        let xn = self.ensure(|b| &mut b.head_xn, rows.len() * n_embd * 4)?;
        let logits = self.ensure(|b| &mut b.head_out, rows.len() * out.n_rows * 4)?;
        let x = self.bufs.x.ptr;
        self.rms_norm(x, rp, rows.len(), norm, xn)?;
        self.matmul(&out, xn, rows.len(), logits, false)?;
        let s = self.backend.download(logits, rows.len() * out.n_rows * 4)?;
        self.unrecorded.push(Pending::Logits(into, s));
        Ok(())
    }

    fn read_ffn_input(&mut self, l: LayerId, mut into: FfnInput) -> Result<(), DeviceError> {
        if self.xn_layer != Some(l) {
            return Err(invalid(format!("no FFN input of layer {l} to read")));
        }
        let len = self.tokens.len() * self.spec()?.attention.n_embd * 4;
        let x = self.backend.download(self.bufs.x.ptr, len)?;
        let xn = self.backend.download(self.bufs.xn.ptr, len)?;
        into.layer = l;
        into.predicted = self.cold_mask_layer == Some(l);
        let cold = if into.predicted {
            let n_ff = self.spec()?.n_ff;
            let n_hot = self.layers[l.0].hot.as_ref().map_or(0, |h| h.gate.n_rows);
            let bytes = self.tokens.len() * (n_ff - n_hot);
            let s = self.backend.download(self.bufs.cold_mask.ptr, bytes)?;
            Some((s, self.tokens.iter().map(|t| t.mode).collect()))
        } else {
            None
        };
        self.unrecorded
            .push(Pending::FfnInput { into, x, xn, cold });
        Ok(())
    }

    fn exec(&mut self, op: Op<'_>) -> Result<(), DeviceError> {
        match op {
            Op::Begin { tokens } => self.begin(tokens),
            Op::WriteResidual { x } => {
                let len = self.tokens.len() * self.spec()?.attention.n_embd;
                if x.len() != len {
                    return Err(invalid(format!(
                        "a residual stream of {} values for {} tokens",
                        x.len(),
                        self.tokens.len()
                    )));
                }
                let p = self.bufs.x.ptr;
                self.backend.upload(p, &f32_bytes(x))
            }
            Op::Attention { layer } => self.attention(layer),
            Op::Predict { layer } => self.predict(layer),
            Op::ReadFfnInput { layer, into } => self.read_ffn_input(layer, into),
            Op::WriteMask { layer, mask } => self.write_mask(layer, mask),
            Op::HotFfn { layer } => self.hot_ffn(layer),
            Op::Merge { layer, cold } => self.merge(layer, cold),
            Op::ReadResidual { into } => {
                let len = self.tokens.len() * self.spec()?.attention.n_embd * 4;
                let s = self.backend.download(self.bufs.x.ptr, len)?;
                self.unrecorded.push(Pending::Residual(into, s));
                Ok(())
            }
            Op::Head { rows, into } => self.head(rows, into),
            Op::ReadCounts { into } => {
                let len = self.tokens.len() * self.spec()?.n_layer * 4;
                let s = self.backend.download(self.bufs.counts.ptr, len)?;
                self.unrecorded.push(Pending::Counts(into, s));
                Ok(())
            }
        }
    }

    /// Turns a finished readback into its host value.
    fn finish(&mut self, p: Pending) -> Readback {
        match p {
            Pending::FfnInput {
                mut into,
                x,
                xn,
                cold,
            } => {
                to_f32s(self.backend.staged(&x), &mut into.x);
                to_f32s(self.backend.staged(&xn), &mut into.xn);
                self.backend.release(x);
                self.backend.release(xn);
                if let Some((s, modes)) = cold {
                    let flags = self.backend.staged(&s);
                    let n = modes.len().max(1);
                    let width = flags.len() / n;
                    into.cold_mask.reset(width);
                    for (t, m) in modes.iter().enumerate() {
                        if *m == SparsityMode::Predictor {
                            let f = &flags[t * width..(t + 1) * width];
                            into.cold_mask.push_where(|i| f[i] != 0);
                        } else {
                            into.cold_mask.push_token([]);
                        }
                    }
                    self.backend.release(s);
                }
                Readback::FfnInput(into)
            }
            Pending::Residual(mut v, s) => {
                to_f32s(self.backend.staged(&s), &mut v);
                self.backend.release(s);
                Readback::Residual(v)
            }
            Pending::Logits(mut v, s) => {
                to_f32s(self.backend.staged(&s), &mut v);
                self.backend.release(s);
                Readback::Logits(v)
            }
            Pending::Counts(mut v, s) => {
                let b = self.backend.staged(&s);
                v.clear();
                v.extend(
                    b.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                self.backend.release(s);
                Readback::Counts(v)
            }
        }
    }
}

/// The launch parameters of a placed matrix.
#[derive(Clone, Copy)]
struct DevMatrixRef {
    ptr: DevPtr,
    dtype: i32,
    n_rows: usize,
    n_cols: usize,
    row_bytes: usize,
}

impl DevMatrixRef {
    fn of(m: &DevMatrix) -> Self {
        Self {
            ptr: m.ptr,
            dtype: m.dtype,
            n_rows: m.n_rows,
            n_cols: m.n_cols,
            row_bytes: m.row_bytes,
        }
    }
}

fn vector_bytes(v: &[f32]) -> u64 {
    4 * v.len() as u64
}

impl<B: Backend> Device for KernelDevice<B> {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            kind: self.kind,
            memory_total: self.budget,
            memory_used: self.used,
        }
    }

    fn configure(&mut self, spec: &ModelSpec) -> Result<(), DeviceError> {
        self.check()?;
        if spec.attention.n_head_kv == 0
            || !spec
                .attention
                .n_head
                .is_multiple_of(spec.attention.n_head_kv)
        {
            return Err(invalid("query heads must be a multiple of KV heads"));
        }
        let r = &spec.rope;
        let rope = Rope::new(
            r.n_rot,
            r.base,
            r.freq_scale,
            r.style,
            r.freq_factors.as_deref(),
        );
        self.layers = (0..spec.n_layer).map(|_| Layer::default()).collect();
        self.spec = Some((spec.clone(), rope));
        Ok(())
    }

    fn place_attention(
        &mut self,
        layer: LayerId,
        part: &AttentionUpload<'_>,
    ) -> Result<(), DeviceError> {
        self.check()?;
        let kv = self.spec()?.kv;
        self.layer_mut(layer)?;
        let w = [part.wq, part.wk, part.wv, part.wo];
        refuse_unknown_types(&w)?;
        let kv_bytes = kv.layer_bytes();
        let bytes = w.iter().map(|m| m.n_bytes() as u64).sum::<u64>()
            + vector_bytes(part.attn_norm)
            + vector_bytes(part.ffn_norm)
            + kv_bytes as u64;
        self.reserve(bytes)?;
        let made = (|| {
            let half = kv_bytes / 2;
            let k = self.backend.alloc(half)?;
            let v = self.backend.alloc(half)?;
            Ok::<_, DeviceError>(DevAttention {
                attn_norm: self.upload_vec(part.attn_norm)?,
                w: [
                    self.upload_matrix(w[0])?,
                    self.upload_matrix(w[1])?,
                    self.upload_matrix(w[2])?,
                    self.upload_matrix(w[3])?,
                ],
                ffn_norm: self.upload_vec(part.ffn_norm)?,
                k,
                v,
            })
        })();
        match made {
            Ok(a) => {
                self.layers[layer.0].attention = Some(a);
                Ok(())
            }
            Err(e) => {
                self.used -= bytes;
                self.fail(e)
            }
        }
    }

    fn place_hot(&mut self, layer: LayerId, part: &HotUpload<'_>) -> Result<(), DeviceError> {
        self.check()?;
        if self.layer_mut(layer)?.attention.is_none() {
            return Err(invalid(format!("layer {layer}'s attention is not placed")));
        }
        let n = part.gate.n_rows();
        if part.up.n_rows() != n || part.down_t.n_rows() != n {
            return Err(invalid("hot gate, up and down_t differ in rows"));
        }
        refuse_unknown_types(&[part.gate, part.up, part.down_t])?;
        let bytes = [part.gate, part.up, part.down_t]
            .iter()
            .map(|m| m.n_bytes() as u64)
            .sum();
        self.reserve(bytes)?;
        let made = (|| {
            Ok::<_, DeviceError>(DevHot {
                gate: self.upload_matrix(part.gate)?,
                up: self.upload_matrix(part.up)?,
                down_t: self.upload_matrix(part.down_t)?,
                threshold: part.gate_threshold,
            })
        })();
        match made {
            Ok(h) => {
                self.layers[layer.0].hot = Some(h);
                Ok(())
            }
            Err(e) => {
                self.used -= bytes;
                self.fail(e)
            }
        }
    }

    fn place_predictor(
        &mut self,
        layer: LayerId,
        part: &PredictorUpload<'_>,
    ) -> Result<(), DeviceError> {
        self.check()?;
        if self.layer_mut(layer)?.attention.is_none() {
            return Err(invalid(format!("layer {layer}'s attention is not placed")));
        }
        let p = part.predictor;
        refuse_unknown_types(&[&p.fc1, &p.fc2])?;
        let bytes = p.n_bytes() as u64;
        self.reserve(bytes)?;
        let made = (|| {
            Ok::<_, DeviceError>(DevPredictor {
                fc1: self.upload_matrix(&p.fc1)?,
                fc2: self.upload_matrix(&p.fc2)?,
                b1: match &p.b1 {
                    Some(b) => self.upload_vec(b)?,
                    None => 0,
                },
                b2: match &p.b2 {
                    Some(b) => self.upload_vec(b)?,
                    None => 0,
                },
                threshold: part.threshold,
            })
        })();
        match made {
            Ok(d) => {
                self.layers[layer.0].predictor = Some(d);
                Ok(())
            }
            Err(e) => {
                self.used -= bytes;
                self.fail(e)
            }
        }
    }

    fn place_head(&mut self, part: &HeadUpload<'_>) -> Result<(), DeviceError> {
        self.check()?;
        self.spec()?;
        refuse_unknown_types(&[part.output])?;
        let bytes = part.output.n_bytes() as u64 + vector_bytes(part.output_norm);
        self.reserve(bytes)?;
        let made = (|| {
            Ok::<_, DeviceError>((
                self.upload_vec(part.output_norm)?,
                self.upload_matrix(part.output)?,
            ))
        })();
        match made {
            Ok(h) => {
                self.head = Some(h);
                Ok(())
            }
            Err(e) => {
                self.used -= bytes;
                self.fail(e)
            }
        }
    }

    fn submit(&mut self, op: Op<'_>) -> Result<(), DeviceError> {
        self.check()?;
        match self.exec(op) {
            Ok(()) => Ok(()),
            // A caller's mistake leaves the device usable; a device failure does not.
            Err(e) => self.fail(e),
        }
    }

    fn record(&mut self) -> Result<Event, DeviceError> {
        self.check()?;
        let e = match self.backend.record() {
            Ok(e) => e,
            Err(err) => return self.fail(err),
        };
        let pending = std::mem::take(&mut self.unrecorded);
        self.recorded.push_back((e, pending));
        Ok(Event(e))
    }

    fn wait(&mut self, event: Event) -> Result<(), DeviceError> {
        self.check()?;
        if let Err(e) = self.backend.wait(event.0) {
            return self.fail(e);
        }
        while self.recorded.front().is_some_and(|(e, _)| *e <= event.0) {
            let (_, list) = self.recorded.pop_front().expect("checked");
            for p in list {
                let r = self.finish(p);
                self.ready.push_back(r);
            }
        }
        Ok(())
    }

    fn take(&mut self) -> Option<Readback> {
        self.ready.pop_front()
    }
}
