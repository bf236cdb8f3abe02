//! The scheduler: owns the waiting queue, the running sequences and their KV-cache slots,
//! and steps all running sequences together (continuous batching).
//!
//! [`Scheduler`] is the logic, with no channel or thread inside (as TGI's router queue):
//! requests are submitted and cancelled, each step's batch is built, and a finished step's
//! logits and active-neuron counts become every sequence's events. The `pi-sched` thread
//! in [`actor`] is the plumbing around it: control messages, closed client streams, the
//! forward step and delivery.
//!
//! Each step holds one token of every decoding sequence plus up to `prefill_chunk` prompt
//! tokens of sequences still reading their prompt, so a long prompt does not stall the
//! streams already running. Every token's arithmetic is independent of its batch-mates, so
//! a sequence's output is the same whether it runs alone or beside others.

mod actor;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

pub(crate) use actor::SchedHandle;
pub use stats::SchedStatus;
pub(crate) use stats::{SchedCounts, StatsBoard};

use super::activity::Activity;
use super::types::{
    EngineError, FinalEvent, FinishReason, SparsityMode, SparsityStats, StreamItem, Timings,
};
use crate::generation::sampler::SamplerConfig;
use crate::generation::{Generation, GenerationLimits};
use crate::ids::{SeqSlot, TokenId};
use crate::model::BatchToken;
use crate::tokenizer::Tokenizer;

/// A traced sequence gets a `step` span (with its stages) for its prompt steps and for one
/// decode step in this many: enough to see where a step's time goes, few enough that
/// exporting spans costs nothing measurable per token.
const TRACE_DECODE_EVERY: usize = 16;

/// A request of the scheduler, unique over the engine's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeqId(pub u64);

/// The sizes and limits the scheduler works within.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SchedConfig {
    /// Positions of each KV-cache slot.
    pub n_ctx: usize,
    pub max_sequences: usize,
    /// Requests that may wait for a slot; more are refused.
    pub max_queue: usize,
    /// Prompt tokens per step, over all sequences.
    pub prefill_chunk: usize,
    pub n_vocab: usize,
    pub n_layer: usize,
    pub n_ff: usize,
}

/// A generation request, its prompt checked against the model already.
pub(crate) struct SeqRequest {
    pub prompt: Vec<TokenId>,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
    pub sparsity: SparsityMode,
    pub submitted: Instant,
    /// The request's span (disabled when nothing traces it): the `queue`, `prefill`,
    /// `decode` and `step` spans hang below it, the usage is recorded on it at the end.
    pub span: tracing::Span,
}

/// What a request's stream receives: tokens, then one final event (or an error).
pub(crate) type SeqOutput = Result<StreamItem, EngineError>;

struct Waiting {
    id: SeqId,
    req: SeqRequest,
    /// Open while the request waits.
    phase: tracing::Span,
}

struct Sequence {
    id: SeqId,
    slot: SeqSlot,
    prompt: Vec<TokenId>,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    generation: Generation,
    sparsity: SparsityMode,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    span: tracing::Span,
    /// `prefill` until the first token, then `decode`; closed when the sequence leaves.
    phase: tracing::Span,
    /// Neurons this sequence's tokens computed (prompt and generated).
    activity: Activity,
}

impl Sequence {
    fn timings(&self, now: Instant) -> Timings {
        let first = self.first_token.unwrap_or(now);
        Timings {
            queue: self.admitted - self.submitted,
            prefill: first - self.admitted,
            decode: now - first,
        }
    }
}

/// A run of one sequence's tokens in the batch being computed.
struct Segment {
    seq: SeqId,
    tokens: usize,
    /// Prompt tokens (else the one token generated last).
    prompt: bool,
    /// The last token asks for logits.
    logits: bool,
}

/// Admission, batching and per-sequence generation state of one engine.
pub(crate) struct Scheduler {
    config: SchedConfig,
    tokenizer: Arc<Tokenizer>,
    queue: VecDeque<Waiting>,
    running: Vec<Sequence>,
    /// A stack: the slot freed last is reused first.
    free_slots: Vec<SeqSlot>,
    next_id: u64,
    /// The batch built last, in batch order.
    segments: Vec<Segment>,
    /// Sequences that ended in the step being completed.
    finished: Vec<(SeqId, FinishReason)>,
    /// Events for the shell to deliver, in order.
    events: Vec<(SeqId, SeqOutput)>,
    generated_total: u64,
    steps_total: u64,
}

impl Scheduler {
    pub fn new(config: SchedConfig, tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            free_slots: (0..config.max_sequences).rev().map(SeqSlot).collect(),
            config,
            tokenizer,
            queue: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            segments: Vec::new(),
            finished: Vec::new(),
            events: Vec::new(),
            generated_total: 0,
            steps_total: 0,
        }
    }

    /// Nothing running and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty()
    }

    pub fn counts(&self) -> SchedCounts {
        SchedCounts {
            active: self.running.len(),
            queued: self.queue.len(),
            generated_total: self.generated_total,
            steps_total: self.steps_total,
            // A sequence's cache holds its prompt as far as computed, and every streamed
            // token but the last (fed back in the next step).
            kv_tokens: self
                .running
                .iter()
                .map(|s| s.prefilled + s.generation.generated().saturating_sub(1))
                .sum(),
        }
    }

    /// The events produced since the last drain, for the shell to deliver in order.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, (SeqId, SeqOutput)> {
        self.events.drain(..)
    }

    /// Takes a request: a free slot admits it at once, else it waits in the queue unless
    /// `max_queue` requests wait already. A request for no tokens ends at once.
    pub fn submit(&mut self, req: SeqRequest) -> Result<SeqId, EngineError> {
        if self.free_slots.is_empty() && self.queue.len() >= self.config.max_queue {
            return Err(EngineError::QueueFull {
                max: self.config.max_queue,
            });
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        if req.max_tokens == 0 {
            let nothing_ran = Activity::new(self.config.n_layer, self.config.n_ff);
            let fin = FinalEvent {
                prompt_tokens: req.prompt.len(),
                completion_tokens: 0,
                timings: Timings::default(),
                sparsity: sparsity_stats(req.sparsity, &nothing_ran),
                finish: FinishReason::MaxTokens,
                text: String::new(),
            };
            self.emit_final(id, fin, &req.span);
            return Ok(id);
        }
        let phase = tracing::info_span!(parent: &req.span, "queue", seq = id.0);
        self.queue.push_back(Waiting { id, req, phase });
        self.admit();
        Ok(id)
    }

    /// Forgets a request, waiting or running (its client has gone): its slot is free at
    /// once and the next waiting request takes it. No event is produced for it.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        if let Some(q) = self.queue.iter().position(|w| w.id == id) {
            self.queue.remove(q);
            return true;
        }
        let Some(i) = self.running.iter().position(|s| s.id == id) else {
            return false;
        };
        let s = self.running.swap_remove(i);
        self.free_slots.push(s.slot);
        self.admit();
        true
    }

    fn admit(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(Waiting { id, req, phase }) = self.queue.pop_front() else {
                break;
            };
            drop(phase);
            let slot = self.free_slots.pop().expect("checked non-empty");
            let limits = GenerationLimits {
                max_tokens: req.max_tokens,
                n_ctx: self.config.n_ctx,
            };
            let generation = Generation::new(req.sampling, req.stop, &req.prompt, limits);
            let prefill = tracing::info_span!(parent: &req.span, "prefill", seq = id.0, prompt_tokens = req.prompt.len());
            self.running.push(Sequence {
                id,
                slot,
                prompt: req.prompt,
                prefilled: 0,
                generation,
                sparsity: req.sparsity,
                submitted: req.submitted,
                admitted: Instant::now(),
                first_token: None,
                span: req.span,
                phase: prefill,
                activity: Activity::new(self.config.n_layer, self.config.n_ff),
            });
        }
    }

    /// The next step's batch into `batch` (cleared first): the last token of every
    /// decoding sequence, then prompt tokens within `prefill_chunk`, logits asked only for
    /// the tokens whose next token is wanted. Empty when nothing runs.
    pub fn build_batch(&mut self, batch: &mut Vec<BatchToken>) {
        batch.clear();
        self.segments.clear();
        for s in &self.running {
            if s.prefilled < s.prompt.len() {
                continue;
            }
            if let Some((token, pos)) = s.generation.next_input() {
                batch.push(BatchToken {
                    token,
                    slot: s.slot,
                    pos,
                    logits: true,
                    sparsity: s.sparsity,
                });
                self.segments.push(Segment {
                    seq: s.id,
                    tokens: 1,
                    prompt: false,
                    logits: true,
                });
            }
        }
        let mut budget = self.config.prefill_chunk.max(1);
        for s in &self.running {
            if s.prefilled == s.prompt.len() || budget == 0 {
                continue;
            }
            let take = (s.prompt.len() - s.prefilled).min(budget);
            budget -= take;
            let end = s.prefilled + take;
            for (pos, &token) in s.prompt.iter().enumerate().take(end).skip(s.prefilled) {
                batch.push(BatchToken {
                    token,
                    slot: s.slot,
                    pos,
                    logits: pos + 1 == s.prompt.len(),
                    sparsity: s.sparsity,
                });
            }
            self.segments.push(Segment {
                seq: s.id,
                tokens: take,
                prompt: true,
                logits: end == s.prompt.len(),
            });
        }
    }

    /// The span of the step just built: under the phase span of the first traced
    /// sequence, when that sequence is reading its prompt or is at a sampled decode step;
    /// else disabled.
    pub fn step_span(&self, batch_tokens: usize) -> tracing::Span {
        let traced = self.running.iter().find(|s| !s.phase.is_disabled());
        match traced {
            Some(s)
                if s.first_token.is_none()
                    || s.generation.generated() % TRACE_DECODE_EVERY == 1 =>
            {
                tracing::info_span!(
                    parent: &s.phase,
                    "step",
                    step = self.steps_total,
                    batch_tokens,
                    sequences = self.running.len(),
                    prefilling = self.segments.iter().filter(|g| g.prompt).count(),
                )
            }
            _ => tracing::Span::none(),
        }
    }

    /// Takes the finished step of the batch built last: `logits` holds one row of
    /// `n_vocab` per token that asked, in batch order; `active` the active-neuron counts
    /// `[n_tok][n_layer]` followed by the hot ones among them. Samples every sequence's
    /// next token, ends the sequences that are done (their slots free at once, the next
    /// waiting requests admitted) and returns how many tokens it streamed.
    pub fn complete_step(
        &mut self,
        logits: &[f32],
        active: &[u32],
        span: &tracing::Span,
    ) -> Result<usize, EngineError> {
        let (n_vocab, n_layer) = (self.config.n_vocab, self.config.n_layer.max(1));
        let n_tok: usize = self.segments.iter().map(|g| g.tokens).sum();
        let rows = self.segments.iter().filter(|g| g.logits).count();
        if logits.len() < rows * n_vocab || active.len() != 2 * n_tok * n_layer {
            return Err(EngineError::Internal(format!(
                "the step returned {} logits and {} neuron counts for {rows} rows of {n_vocab} and {n_tok} tokens of {n_layer} layers",
                logits.len(),
                active.len()
            )));
        }
        let (counts, hot) = active.split_at(n_tok * n_layer);
        self.steps_total += 1;
        let stage = tracing::info_span!(parent: span, "sample", sequences = rows);
        let sampling = stage.enter();
        let now = Instant::now();
        let (mut first, mut row, mut streamed) = (0, 0, 0);
        for seg in &self.segments {
            let cells = first * n_layer..(first + seg.tokens) * n_layer;
            first += seg.tokens;
            let row_logits = seg.logits.then(|| {
                row += 1;
                &logits[(row - 1) * n_vocab..row * n_vocab]
            });
            // A sequence cancelled while its step ran is simply gone.
            let Some(s) = self.running.iter_mut().find(|s| s.id == seg.seq) else {
                continue;
            };
            s.activity
                .record(&counts[cells.clone()], &hot[cells.clone()]);
            if seg.prompt {
                s.prefilled += seg.tokens;
            }
            let Some(row_logits) = row_logits else {
                continue;
            };
            if s.first_token.is_none() {
                s.first_token = Some(now);
                s.phase = tracing::info_span!(parent: &s.span, "decode", seq = s.id.0);
            }
            let step = s.generation.advance(&self.tokenizer, row_logits);
            if let Some(token) = step.token {
                streamed += 1;
                self.events.push((s.id, Ok(StreamItem::Token(token))));
            }
            if let Some(finish) = step.finish {
                self.finished.push((s.id, finish));
            }
        }
        drop(sampling);
        self.generated_total += streamed as u64;
        for i in 0..self.finished.len() {
            let (id, finish) = self.finished[i];
            self.finish(id, finish, now);
        }
        self.finished.clear();
        self.admit();
        Ok(streamed)
    }

    /// Ends a running sequence: its final event with its own measured statistics, its
    /// slot free.
    fn finish(&mut self, id: SeqId, finish: FinishReason, now: Instant) {
        let Some(i) = self.running.iter().position(|s| s.id == id) else {
            return;
        };
        let mut s = self.running.swap_remove(i);
        self.free_slots.push(s.slot);
        let text = s.generation.take_tail();
        let fin = FinalEvent {
            prompt_tokens: s.prompt.len(),
            completion_tokens: s.generation.generated(),
            timings: s.timings(now),
            sparsity: sparsity_stats(s.sparsity, &s.activity),
            finish,
            text,
        };
        self.emit_final(id, fin, &s.span);
    }

    fn emit_final(&mut self, id: SeqId, fin: FinalEvent, span: &tracing::Span) {
        span.record("gen_ai.usage.input_tokens", fin.prompt_tokens);
        span.record("gen_ai.usage.output_tokens", fin.completion_tokens);
        span.record("gen_ai.response.finish_reasons", fin.finish.name());
        self.events.push((id, Ok(StreamItem::Final(fin))));
    }

    /// The step failed: every running sequence ends with `reason` and frees its slot.
    pub fn fail_step(&mut self, reason: &str) {
        for s in std::mem::take(&mut self.running) {
            self.free_slots.push(s.slot);
            self.events
                .push((s.id, Err(EngineError::Internal(reason.to_owned()))));
        }
        self.segments.clear();
        self.admit();
    }
}

fn sparsity_stats(mode: SparsityMode, activity: &Activity) -> SparsityStats {
    let report = activity.report();
    SparsityStats {
        mode,
        active_fraction_per_layer: report.active_fraction,
        hot_share: report.hot_hit_rate,
        cold_share: 1.0 - report.hot_hit_rate,
    }
}
