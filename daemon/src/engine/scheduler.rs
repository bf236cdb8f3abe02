//! The scheduler: owns the sequences, their KV-cache slots and the admission queue, and
//! steps all running sequences together (continuous batching).
//!
//! Each step holds one token of every decoding sequence plus up to `prefill_chunk` prompt
//! tokens of sequences still reading their prompt, so a long prompt does not stall the
//! streams already running. New requests join between steps; finished ones leave; a
//! sequence whose client has gone (its event channel closed) is dropped before the next
//! step. Every token's arithmetic is independent of its batch-mates, so a sequence's
//! output is the same whether it runs alone or beside others.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::cold::ColdHandle;
use super::sampling::{SamplerHandle, SeqId};
use super::types::{EngineError, EngineOptions, FinishReason, SparsityMode, Timings};
use crate::ids::{SeqSlot, TokenId};
use crate::model::BatchToken;
use crate::sampler::{Sampled, SamplerConfig};

/// Control messages waiting for the scheduler (it drains them every step).
const INBOX: usize = 256;
/// Window over which the generation rate is reported.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// A traced sequence gets a `step` span (with its actor stages) for its prompt steps and
/// for one decode step in this many: enough to see where a step's time goes, few enough
/// that exporting spans costs nothing measurable per token.
const TRACE_DECODE_EVERY: usize = 16;

/// The sizes the scheduler keeps per-request statistics in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ModelShape {
    pub n_vocab: usize,
    pub n_layer: usize,
    pub n_ff: usize,
}

/// A request admitted to the queue.
pub(crate) struct SeqRequest {
    pub prompt: Vec<TokenId>,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    /// Bounded by `max_tokens` plus the admission and final events, so the scheduler never
    /// waits on it.
    pub events: mpsc::Sender<SeqEvent>,
    pub submitted: Instant,
    /// How this request's FFN neurons are chosen (checked against the model already).
    pub sparsity: SparsityMode,
    /// The request's span (disabled when nothing traces it); the scheduler hangs the
    /// `queue`, `prefill`, `decode` and `step` spans below it.
    pub span: tracing::Span,
}

/// A request waiting for a slot.
struct Waiting {
    req: SeqRequest,
    id: SeqId,
    /// Open while the request waits.
    phase: tracing::Span,
}

/// What the scheduler tells a request's stream.
#[derive(Debug)]
pub(crate) enum SeqEvent {
    /// The request got a slot after waiting this long.
    Admitted(Duration),
    Token(Sampled),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        timings: Timings,
        /// Mean fraction of FFN neurons computed per layer over the request's tokens.
        active_fraction_per_layer: Vec<f32>,
        /// Share of the computed neurons that were hot.
        hot_share: f32,
    },
    Failed(String),
}

pub(crate) enum SchedMsg {
    Submit {
        req: SeqRequest,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Status {
        reply: oneshot::Sender<SchedStatus>,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SchedStatus {
    /// Sequences holding a slot.
    pub active: usize,
    pub queued: usize,
    /// Tokens generated per second over the last few seconds.
    pub tokens_per_second: f64,
    pub generated_total: u64,
    pub steps_total: u64,
}

struct Sequence {
    id: SeqId,
    slot: SeqSlot,
    prompt: Vec<TokenId>,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    /// The last sampled token, to be fed at `pos` in the next step.
    pending: Option<TokenId>,
    generated: usize,
    max_tokens: usize,
    events: mpsc::Sender<SeqEvent>,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    span: tracing::Span,
    /// `prefill` until the first token, then `decode`; closed when the sequence leaves.
    phase: tracing::Span,
    sparsity: SparsityMode,
    /// Active FFN neurons summed per layer over this sequence's tokens, and the tokens.
    active_totals: Vec<u64>,
    tokens_run: u64,
    /// Of the active neurons (all layers), the hot ones.
    hot_total: u64,
}

impl Sequence {
    /// Position of the next token fed.
    fn pos(&self) -> usize {
        self.prefilled + self.generated.saturating_sub(1)
    }

    fn timings(&self) -> Timings {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        Timings {
            queue: self.admitted - self.submitted,
            prefill: first - self.admitted,
            decode: now - first,
        }
    }

    /// Share of this sequence's computed neurons that were hot.
    fn hot_share(&self) -> f32 {
        super::predictor::share(self.hot_total, self.active_totals.iter().sum())
    }

    fn active_fraction(&self, n_ff: usize) -> Vec<f32> {
        let total = self.tokens_run * n_ff as u64;
        let totals = vec![total; self.active_totals.len()];
        super::predictor::fractions(&self.active_totals, &totals)
    }
}

struct Scheduler {
    opts: EngineOptions,
    n_vocab: usize,
    n_layer: usize,
    n_ff: usize,
    /// End-of-generation tokens, sorted.
    eog: Vec<TokenId>,
    cold: ColdHandle,
    sampler: SamplerHandle,
    rx: Receiver<SchedMsg>,
    queue: VecDeque<Waiting>,
    running: Vec<Sequence>,
    free_slots: Vec<SeqSlot>,
    next_id: SeqId,
    batch: Vec<BatchToken>,
    wants: Vec<SeqId>,
    logits: Vec<f32>,
    /// Active-neuron counts of the last step, `[n_tok][n_layer]` in batch order.
    active: Vec<u32>,
    /// (when, tokens generated in that step), for the rate.
    recent: VecDeque<(Instant, usize)>,
    generated_total: u64,
    steps_total: u64,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            // Idle: block until something arrives; the engine is gone when the inbox closes.
            if self.running.is_empty() && self.queue.is_empty() {
                match self.rx.recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.running.is_empty() && self.queue.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty()
                && let Err(e) = self.step()
            {
                self.fail_all(&e.to_string());
            }
        }
    }

    fn handle(&mut self, msg: SchedMsg) {
        match msg {
            SchedMsg::Submit { req, reply } => {
                // Free slots take requests at once; only requests that must wait count
                // against the queue limit.
                self.admit();
                let r = if self.queue.len() >= self.opts.max_queue {
                    Err(EngineError::QueueFull {
                        max: self.opts.max_queue,
                    })
                } else {
                    let id = self.next_id;
                    self.next_id += 1;
                    let phase = tracing::info_span!(parent: &req.span, "queue", seq = id);
                    self.queue.push_back(Waiting { req, id, phase });
                    self.admit();
                    Ok(())
                };
                let _ = reply.send(r);
            }
            SchedMsg::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn status(&mut self) -> SchedStatus {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|&(t, _)| now - t > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        let tokens: usize = self.recent.iter().map(|&(_, n)| n).sum();
        let span = self.recent.front().map_or(RATE_WINDOW, |&(t, _)| {
            (now - t).max(Duration::from_millis(1))
        });
        SchedStatus {
            active: self.running.len(),
            queued: self.queue.len(),
            tokens_per_second: if tokens == 0 {
                0.0
            } else {
                tokens as f64 / span.as_secs_f64()
            },
            generated_total: self.generated_total,
            steps_total: self.steps_total,
        }
    }

    /// Frees the slots of sequences whose client has gone, and forgets queued ones.
    fn drop_cancelled(&mut self) {
        self.queue.retain(|w| !w.req.events.is_closed());
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let s = self.running.swap_remove(i);
                self.release(&s);
            } else {
                i += 1;
            }
        }
    }

    fn release(&mut self, s: &Sequence) {
        self.free_slots.push(s.slot);
        let _ = self.sampler.close(s.id);
    }

    fn admit(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(Waiting { req, id, phase }) = self.queue.pop_front() else {
                break;
            };
            drop(phase);
            let slot = self.free_slots.pop().expect("checked non-empty");
            if self
                .sampler
                .open(id, req.sampling, req.prompt.clone())
                .is_err()
            {
                self.free_slots.push(slot);
                let _ = req
                    .events
                    .try_send(SeqEvent::Failed("the sampler has stopped".into()));
                continue;
            }
            let _ = req
                .events
                .try_send(SeqEvent::Admitted(req.submitted.elapsed()));
            let prefill = tracing::info_span!(parent: &req.span, "prefill", seq = id, prompt_tokens = req.prompt.len());
            self.running.push(Sequence {
                id,
                slot,
                prompt: req.prompt,
                prefilled: 0,
                pending: None,
                generated: 0,
                max_tokens: req.max_tokens,
                events: req.events,
                submitted: req.submitted,
                admitted: Instant::now(),
                first_token: None,
                phase: prefill,
                span: req.span,
                sparsity: req.sparsity,
                active_totals: vec![0; self.n_layer],
                hot_total: 0,
                tokens_run: 0,
            });
        }
    }

    fn step(&mut self) -> Result<(), EngineError> {
        // Decode tokens first, then prompt chunks within the prefill budget.
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let mut wants = std::mem::take(&mut self.wants);
        wants.clear();
        for s in &self.running {
            if let Some(t) = s.pending {
                batch.push(BatchToken {
                    token: t,
                    slot: s.slot,
                    pos: s.pos(),
                    logits: true,
                    sparsity: s.sparsity,
                });
                wants.push(s.id);
            }
        }
        let mut budget = self.opts.prefill_chunk.max(1);
        let mut chunks: Vec<(usize, usize)> = Vec::new(); // (running index, tokens taken)
        for (i, s) in self.running.iter().enumerate() {
            if s.prefilled == s.prompt.len() || budget == 0 {
                continue;
            }
            let take = (s.prompt.len() - s.prefilled).min(budget);
            budget -= take;
            for k in 0..take {
                let p = s.prefilled + k;
                let last = p + 1 == s.prompt.len();
                batch.push(BatchToken {
                    token: s.prompt[p],
                    slot: s.slot,
                    pos: p,
                    logits: last,
                    sparsity: s.sparsity,
                });
                if last {
                    wants.push(s.id);
                }
            }
            chunks.push((i, take));
        }
        if batch.is_empty() {
            self.batch = batch;
            self.wants = wants;
            return Ok(());
        }

        let span = self.step_span(batch.len(), chunks.len());
        let logits = std::mem::take(&mut self.logits);
        let active = std::mem::take(&mut self.active);
        let done = self.cold.step(batch, logits, active, &span)?;
        self.batch = done.batch;
        self.active = done.active;
        self.count_active();
        if let Err(e) = done.result {
            self.logits = done.logits;
            return Err(EngineError::Internal(format!("forward pass: {e}")));
        }
        for (i, take) in chunks {
            self.running[i].prefilled += take;
        }
        let sampled = self
            .sampler
            .sample(wants, done.logits, self.n_vocab, &span)?;
        self.logits = sampled.logits;
        self.wants = sampled.seqs;
        self.steps_total += 1;
        let produced = sampled.picks.len();
        self.generated_total += produced as u64;
        self.recent.push_back((Instant::now(), produced));
        if self.recent.len() > 4096 {
            self.recent.pop_front();
        }
        for (id, s) in sampled.picks {
            self.route(id, s);
        }
        Ok(())
    }

    /// Adds the last step's active-neuron counts (and hot ones) to the sequences of its
    /// tokens.
    fn count_active(&mut self) {
        let n_layer = self.n_layer.max(1);
        let (active, hot) = self
            .active
            .split_at((self.batch.len() * n_layer).min(self.active.len()));
        for ((b, counts), hot) in self
            .batch
            .iter()
            .zip(active.chunks_exact(n_layer))
            .zip(hot.chunks_exact(n_layer))
        {
            if let Some(s) = self.running.iter_mut().find(|s| s.slot == b.slot) {
                for (t, &c) in s.active_totals.iter_mut().zip(counts) {
                    *t += u64::from(c);
                }
                s.hot_total += hot.iter().map(|&h| u64::from(h)).sum::<u64>();
                s.tokens_run += 1;
            }
        }
    }

    /// The span of this step: under the phase span of the first traced sequence, when
    /// that sequence is reading its prompt or is at a sampled decode step; else disabled.
    fn step_span(&self, batch_tokens: usize, prefilling: usize) -> tracing::Span {
        let traced = self.running.iter().find(|s| !s.phase.is_disabled());
        match traced {
            Some(s) if s.first_token.is_none() || s.generated % TRACE_DECODE_EVERY == 1 => {
                tracing::info_span!(
                    parent: &s.phase,
                    "step",
                    step = self.steps_total,
                    batch_tokens,
                    sequences = self.running.len(),
                    prefilling,
                )
            }
            _ => tracing::Span::none(),
        }
    }

    /// Delivers a sampled token to its sequence and ends the sequence when it is done.
    fn route(&mut self, id: SeqId, sampled: Sampled) {
        let Some(i) = self.running.iter().position(|s| s.id == id) else {
            return;
        };
        let eog = self.is_eog(sampled.token);
        let s = &mut self.running[i];
        if s.first_token.is_none() {
            s.first_token = Some(Instant::now());
            s.phase = tracing::info_span!(parent: &s.span, "decode", seq = id);
        }
        let finish = if eog {
            Some(FinishReason::EndOfGeneration(sampled.token))
        } else {
            s.generated += 1;
            s.pending = Some(sampled.token);
            // Capacity is max_tokens + 2: never full while the sequence runs.
            let _ = s.events.try_send(SeqEvent::Token(sampled));
            if s.generated >= s.max_tokens {
                Some(FinishReason::MaxTokens)
            } else if s.pos() >= self.opts.n_ctx {
                Some(FinishReason::ContextFull)
            } else {
                None
            }
        };
        if let Some(finish) = finish {
            let s = self.running.swap_remove(i);
            let _ = s.events.try_send(SeqEvent::Done {
                finish,
                prompt_tokens: s.prompt.len(),
                completion_tokens: s.generated,
                timings: s.timings(),
                active_fraction_per_layer: s.active_fraction(self.n_ff),
                hot_share: s.hot_share(),
            });
            self.release(&s);
        }
    }

    fn is_eog(&self, t: TokenId) -> bool {
        self.eog.binary_search(&t).is_ok()
    }

    fn fail_all(&mut self, reason: &str) {
        for s in std::mem::take(&mut self.running) {
            let _ = s.events.try_send(SeqEvent::Failed(reason.to_owned()));
            self.release(&s);
        }
    }
}

#[derive(Clone)]
pub(crate) struct SchedHandle {
    tx: SyncSender<SchedMsg>,
}

impl SchedHandle {
    /// Starts the scheduler on thread `pi-sched`.
    pub fn spawn(
        opts: &EngineOptions,
        shape: ModelShape,
        eog: &[TokenId],
        cold: ColdHandle,
        sampler: SamplerHandle,
    ) -> Result<Self, EngineError> {
        let (tx, rx) = sync_channel(INBOX);
        let mut eog = eog.to_vec();
        eog.sort();
        let sched = Scheduler {
            free_slots: (0..opts.max_sequences).rev().map(SeqSlot).collect(),
            opts: opts.clone(),
            n_vocab: shape.n_vocab,
            n_layer: shape.n_layer,
            n_ff: shape.n_ff,
            eog,
            cold,
            sampler,
            rx,
            queue: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            batch: Vec::new(),
            wants: Vec::new(),
            logits: Vec::new(),
            active: Vec::new(),
            recent: VecDeque::new(),
            generated_total: 0,
            steps_total: 0,
        };
        std::thread::Builder::new()
            .name("pi-sched".into())
            .spawn(move || sched.run())
            .map_err(|e| EngineError::Internal(format!("cannot start the scheduler: {e}")))?;
        Ok(Self { tx })
    }

    /// Queues a request; refused when the queue is full.
    pub async fn submit(&self, req: SeqRequest) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(SchedMsg::Submit { req, reply })
            .map_err(|e| match e {
                std::sync::mpsc::TrySendError::Full(_) => EngineError::QueueFull { max: INBOX },
                std::sync::mpsc::TrySendError::Disconnected(_) => EngineError::Stopped,
            })?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    pub async fn status(&self) -> Result<SchedStatus, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(SchedMsg::Status { reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }
}
