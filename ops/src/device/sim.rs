//! [`SimulatedDevice`]: the [`Device`] trait in memory of its own, on a thread of its own.
//!
//! Uploads copy every byte into the device's memory (counted against its budget); ops are
//! queued and handed to the device thread (`pi-sim`) in batches when the host records a
//! point of the stream or waits, and run there with the CPU reference of each op; the
//! host blocks only in [`Device::wait`]. So a hybrid step on it receives exactly the
//! calls and bytes a GPU would, and computes the same bits as the host would.
//!
//! For tests of what failures do, a simulated device can be told to fail after a number
//! of ops ([`SimFault`]): with a device error (as a lost GPU reports one), or with a panic
//! on the calling thread (as a driver binding that panics would).

use std::collections::VecDeque;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::worker::{self, Attention, Cmd, Completion, Hot, OutputHead, Spare};
use super::{
    AttentionUpload, Device, DeviceError, DeviceInfo, DeviceKind, Event, HeadUpload, HotUpload,
    ModelSpec, Op, PredictorUpload, Readback,
};
use crate::handoff::{HANDOFF_SPIN, recv_spinning};
use crate::ids::LayerId;
use crate::kv::{KvShape, LayerKv};
use crate::pool::ThreadPool;
use crate::tensor::Matrix;
use crate::transformer::Predictor;

/// How an injected fault shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The device reports a failure (and stays failed).
    Error,
    /// The call panics on the caller's thread.
    Panic,
}

/// Fail once `after_ops` ops have been submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimFault {
    pub after_ops: u64,
    pub kind: FaultKind,
}

/// A device in host memory with its own thread (see the module docs).
pub struct SimulatedDevice {
    name: String,
    budget: u64,
    used: u64,
    /// Each placed layer's KV cache, from the configuration.
    kv: Option<KvShape>,
    tx: Option<Sender<Vec<Cmd>>>,
    done: Receiver<Completion>,
    thread: Option<JoinHandle<()>>,
    /// Ops submitted but not yet handed to the device thread.
    pending: Vec<Cmd>,
    next_event: u64,
    passed: u64,
    readbacks: VecDeque<Readback>,
    failed: Option<DeviceError>,
    fault: Option<SimFault>,
    submitted: u64,
    spare: Spare,
}

impl SimulatedDevice {
    /// A device of `budget` bytes computing on its own thread.
    pub fn new(budget: u64) -> std::io::Result<Self> {
        Self::with_threads(budget, 1)
    }

    /// A device of `budget` bytes computing on `n_threads` threads of its own.
    pub fn with_threads(budget: u64, n_threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("pi-sim".into())
            .spawn(move || match ThreadPool::new(n_threads, "pi-sim") {
                Ok(pool) => worker::run(pool, rx, done_tx),
                // Dropping the channels makes every call report the device as lost.
                Err(e) => eprintln!("simulated device: cannot start its threads: {e}"),
            })?;
        Ok(Self {
            name: "sim:0".into(),
            budget,
            used: 0,
            kv: None,
            tx: Some(tx),
            done,
            thread: Some(thread),
            pending: Vec::new(),
            next_event: 1,
            passed: 0,
            readbacks: VecDeque::new(),
            failed: None,
            fault: None,
            submitted: 0,
            spare: Spare::default(),
        })
    }

    /// Makes the device fail once `fault.after_ops` more ops have been submitted.
    pub fn inject_fault(&mut self, fault: SimFault) {
        self.fault = Some(SimFault {
            after_ops: self.submitted + fault.after_ops,
            ..fault
        });
    }

    fn check(&self) -> Result<(), DeviceError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Counts `bytes` against the budget.
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

    /// Hands the pending ops to the device thread.
    fn flush(&mut self) -> Result<(), DeviceError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let next = self.spare.batches.pop().unwrap_or_default();
        let batch = std::mem::replace(&mut self.pending, next);
        let lost = || DeviceError::Failed("the simulated device's thread has stopped".into());
        self.tx
            .as_ref()
            .ok_or_else(lost)?
            .send(batch)
            .map_err(|_| lost())
    }

    fn push(&mut self, cmd: Cmd) -> Result<(), DeviceError> {
        self.check()?;
        self.pending.push(cmd);
        Ok(())
    }

    /// Runs a placement command to completion (uploads are synchronous).
    fn place(&mut self, cmd: Cmd) -> Result<(), DeviceError> {
        self.push(cmd)?;
        let e = self.record()?;
        self.wait(e)
    }

    fn f32s(&mut self, from: &[f32]) -> Vec<f32> {
        let mut v = self.spare.f32s.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(from);
        v
    }
}

/// The device's copy of `m`: one transfer of its bytes.
fn copy(m: &Matrix) -> Result<Matrix, DeviceError> {
    Matrix::from_bytes(m.wtype(), m.n_rows(), m.n_cols(), m.bytes())
        .ok_or_else(|| DeviceError::Invalid(format!("matrix {m:?} has a malformed buffer")))
}

fn vector_bytes(v: &[f32]) -> u64 {
    4 * v.len() as u64
}

impl Device for SimulatedDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            kind: DeviceKind::Simulated,
            memory_total: self.budget,
            memory_used: self.used,
        }
    }

    fn configure(&mut self, spec: &ModelSpec) -> Result<(), DeviceError> {
        self.place(Cmd::Configure(Box::new(spec.clone())))?;
        self.kv = Some(spec.kv);
        Ok(())
    }

    fn place_attention(
        &mut self,
        layer: LayerId,
        part: &AttentionUpload<'_>,
    ) -> Result<(), DeviceError> {
        self.check()?;
        let kv_shape = self
            .kv
            .ok_or_else(|| DeviceError::Invalid("the device is not configured".into()))?;
        let w = [part.wq, part.wk, part.wv, part.wo];
        let bytes = w.iter().map(|m| m.n_bytes() as u64).sum::<u64>()
            + vector_bytes(part.attn_norm)
            + vector_bytes(part.ffn_norm)
            + kv_shape.layer_bytes() as u64;
        self.reserve(bytes)?;
        let made = (|| {
            Ok::<_, DeviceError>(Attention {
                attn_norm: part.attn_norm.to_vec(),
                w: [copy(w[0])?, copy(w[1])?, copy(w[2])?, copy(w[3])?],
                ffn_norm: part.ffn_norm.to_vec(),
                kv: LayerKv::try_new(kv_shape).map_err(|e| DeviceError::OutOfMemory {
                    requested: e.bytes as u64,
                    free: self.budget.saturating_sub(self.used),
                })?,
            })
        })();
        match made {
            Ok(a) => self.place(Cmd::PlaceAttention(layer, Box::new(a))),
            Err(e) => {
                self.used -= bytes;
                Err(e)
            }
        }
    }

    fn place_hot(&mut self, layer: LayerId, part: &HotUpload<'_>) -> Result<(), DeviceError> {
        self.check()?;
        let w = [part.gate, part.up, part.down_t];
        let bytes = w.iter().map(|m| m.n_bytes() as u64).sum();
        self.reserve(bytes)?;
        let hot = Hot {
            w: [copy(w[0])?, copy(w[1])?, copy(w[2])?],
            gate_threshold: part.gate_threshold,
        };
        self.place(Cmd::PlaceHot(layer, Box::new(hot)))
    }

    fn place_predictor(
        &mut self,
        layer: LayerId,
        part: &PredictorUpload<'_>,
    ) -> Result<(), DeviceError> {
        self.check()?;
        let p = part.predictor;
        self.reserve(p.n_bytes() as u64)?;
        let copied = Predictor {
            fc1: copy(&p.fc1)?,
            fc2: copy(&p.fc2)?,
            b1: p.b1.clone(),
            b2: p.b2.clone(),
        };
        self.place(Cmd::PlacePredictor(
            layer,
            Box::new((copied, part.threshold)),
        ))
    }

    fn place_head(&mut self, part: &HeadUpload<'_>) -> Result<(), DeviceError> {
        self.check()?;
        self.reserve(part.output.n_bytes() as u64 + vector_bytes(part.output_norm))?;
        let head = OutputHead {
            output_norm: part.output_norm.to_vec(),
            output: copy(part.output)?,
        };
        self.place(Cmd::PlaceHead(Box::new(head)))
    }

    fn submit(&mut self, op: Op<'_>) -> Result<(), DeviceError> {
        self.check()?;
        self.submitted += 1;
        if let Some(f) = self.fault
            && self.submitted > f.after_ops
        {
            self.fault = None;
            match f.kind {
                FaultKind::Panic => {
                    panic!("simulated device: injected panic at op {}", self.submitted)
                }
                FaultKind::Error => {
                    let why = format!("injected fault at op {}", self.submitted);
                    return self.push(Cmd::Fail(why));
                }
            }
        }
        let cmd = match op {
            Op::Begin { tokens } => {
                let mut v = self.spare.tokens.pop().unwrap_or_default();
                v.clear();
                v.extend_from_slice(tokens);
                Cmd::Begin(v)
            }
            Op::WriteResidual { x } => Cmd::WriteResidual(self.f32s(x)),
            Op::Attention { layer } => Cmd::Attention(layer),
            Op::Predict { layer } => Cmd::Predict(layer),
            Op::ReadFfnInput { layer, into } => Cmd::ReadFfnInput(layer, Box::new(into)),
            Op::WriteMask { layer, mask } => {
                let mut m = self
                    .spare
                    .masks
                    .pop()
                    .unwrap_or_else(|| crate::sparse::ActiveSet::new(0));
                m.copy_from(mask);
                Cmd::WriteMask(layer, m)
            }
            Op::HotFfn { layer } => Cmd::HotFfn(layer),
            Op::Merge { layer, cold } => Cmd::Merge(layer, cold.map(|c| self.f32s(c))),
            Op::ReadResidual { into } => Cmd::ReadResidual(into),
            Op::Head { rows, into } => {
                let mut r = self.spare.rows.pop().unwrap_or_default();
                r.clear();
                r.extend_from_slice(rows);
                Cmd::Head(r, into)
            }
            Op::ReadCounts { into } => Cmd::ReadCounts(into),
        };
        self.push(cmd)
    }

    fn record(&mut self) -> Result<Event, DeviceError> {
        self.check()?;
        let e = self.next_event;
        self.next_event += 1;
        self.pending.push(Cmd::Record(e));
        self.flush()?;
        Ok(Event(e))
    }

    fn wait(&mut self, event: Event) -> Result<(), DeviceError> {
        self.check()?;
        self.flush()?;
        if event.0 >= self.next_event {
            return Err(DeviceError::Invalid(format!(
                "event {} was never recorded",
                event.0
            )));
        }
        while self.passed < event.0 {
            let c = recv_spinning(&self.done, HANDOFF_SPIN).map_err(|_| {
                DeviceError::Failed("the simulated device's thread has stopped".into())
            })?;
            self.passed = c.event;
            self.readbacks.extend(c.readbacks);
            let s = c.spare;
            self.spare.f32s.extend(s.f32s);
            self.spare.tokens.extend(s.tokens);
            self.spare.masks.extend(s.masks);
            self.spare.rows.extend(s.rows);
            self.spare.batches.extend(s.batches);
            if let Some(e) = c.error {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        Ok(())
    }

    fn take(&mut self) -> Option<Readback> {
        self.readbacks.pop_front()
    }
}

impl Drop for SimulatedDevice {
    fn drop(&mut self) {
        // Closing the stream stops the thread after what it has queued.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
