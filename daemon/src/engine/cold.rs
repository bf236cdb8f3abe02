//! The cold executor: owns the host weights, the KV cache and the CPU thread pool, and runs
//! the steps of layers placed on the CPU (without a GPU: all of them, inside one message
//! per step).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use powerinfer_ops::pool::ThreadPool;

use super::predictor::{Activity, ActivityReport};
use super::types::{EngineError, EngineOptions};
use crate::model::{BatchToken, ForwardError, KvCache, Model, Scratch};

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
        reply: SyncSender<StepDone>,
        /// The step's span (disabled unless the step is traced).
        span: tracing::Span,
    },
    ActiveFraction {
        reply: SyncSender<ActivityReport>,
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
    pool: ThreadPool,
    kv: KvCache,
    scratch: Scratch,
    activity: Activity,
    rx: Receiver<ColdMsg>,
}

impl ColdExecutor {
    fn run(mut self) {
        while let Ok(msg) = self.rx.recv() {
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
                    let result = self.model.forward_into(
                        &self.pool,
                        &batch,
                        &mut self.kv,
                        &mut self.scratch,
                        &mut logits,
                    );
                    active.clear();
                    if result.is_ok() {
                        // Active counts, then the hot ones among them.
                        active.extend_from_slice(&self.scratch.active_counts);
                        active.extend_from_slice(&self.scratch.hot_counts);
                        self.activity
                            .record(&self.scratch.active_counts, &self.scratch.hot_counts);
                    }
                    let _ = reply.send(StepDone {
                        batch,
                        logits,
                        active,
                        result,
                    });
                }
                ColdMsg::ActiveFraction { reply } => {
                    let _ = reply.send(self.activity.report());
                }
            }
        }
    }
}

/// Sends steps to the cold executor; the executor stops when the last handle drops.
#[derive(Clone)]
pub(crate) struct ColdHandle {
    tx: SyncSender<ColdMsg>,
}

impl ColdHandle {
    /// Starts the executor on thread `pi-cold`; returns once its pool and KV cache exist
    /// (or with the error that prevented them).
    pub fn spawn(model: Arc<Model>, opts: &EngineOptions) -> Result<Self, EngineError> {
        let (tx, rx) = sync_channel(INBOX);
        let (ready_tx, ready_rx) = sync_channel::<Result<(), EngineError>>(1);
        let opts = opts.clone();
        std::thread::Builder::new()
            .name("pi-cold".into())
            .spawn(move || {
                let c = &model.config;
                let setup = (|| {
                    let pool = ThreadPool::new(opts.threads, "pi-cpu")
                        .map_err(|e| EngineError::Internal(format!("thread pool: {e}")))?;
                    let kv = KvCache::try_new(
                        c.n_layer,
                        opts.max_sequences,
                        opts.n_ctx,
                        c.n_head_kv,
                        c.head_dim,
                        opts.kv_type,
                    )
                    .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
                    Ok((pool, kv))
                })();
                match setup {
                    Ok((pool, kv)) => {
                        let activity = Activity::new(c.n_layer, c.n_ff);
                        let _ = ready_tx.send(Ok(()));
                        ColdExecutor {
                            scratch: Scratch::new(opts.numerics),
                            model,
                            pool,
                            kv,
                            activity,
                            rx,
                        }
                        .run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the cold executor: {e}")))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Self { tx })
    }

    /// Runs one step and waits for it.
    pub fn step(
        &self,
        batch: Vec<BatchToken>,
        logits: Vec<f32>,
        active: Vec<u32>,
        span: &tracing::Span,
    ) -> Result<StepDone, EngineError> {
        let (reply, rx) = sync_channel(1);
        self.tx
            .send(ColdMsg::Step {
                batch,
                logits,
                active,
                reply,
                span: span.clone(),
            })
            .map_err(|_| EngineError::Stopped)?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }

    pub fn activity(&self) -> Result<ActivityReport, EngineError> {
        let (reply, rx) = sync_channel(1);
        self.tx
            .send(ColdMsg::ActiveFraction { reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }
}
