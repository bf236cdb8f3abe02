//! The scheduler's logic driven by hand, without threads or a runtime: made-up logits
//! whose argmax each test chooses, made-up neuron counts per KV slot.

use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::tokenizer::byte_level_for_tests;

const N_VOCAB: usize = 260;
const N_LAYER: usize = 2;
const N_FF: usize = 10;
/// `<|im_end|>` in the test vocabulary: ends generation.
const EOG: u32 = 258;

fn config(max_sequences: usize, max_queue: usize, prefill_chunk: usize) -> SchedConfig {
    SchedConfig {
        n_ctx: 64,
        max_sequences,
        max_queue,
        prefill_chunk,
        n_vocab: N_VOCAB,
        n_layer: N_LAYER,
        n_ff: N_FF,
    }
}

/// A greedy request for `max_tokens` after a prompt of `prompt` tokens.
fn request(prompt: usize, max_tokens: usize) -> SeqRequest {
    SeqRequest {
        prompt: (0..prompt as u32)
            .map(|i| TokenId(u32::from(b'a') + i % 26))
            .collect(),
        max_tokens,
        sampling: SamplerConfig::greedy(),
        stop: Vec::new(),
        sparsity: SparsityMode::Gate,
        submitted: Instant::now(),
        span: tracing::Span::none(),
    }
}

/// Active neurons per layer of every token in `slot` (of `N_FF`); one of them hot.
fn active_in(slot: SeqSlot) -> u32 {
    [5, 2, 8][slot.0]
}

struct Harness {
    sched: Scheduler,
    batch: Vec<BatchToken>,
}

impl Harness {
    fn new(config: SchedConfig) -> Self {
        Self {
            sched: Scheduler::new(config, Arc::new(byte_level_for_tests())),
            batch: Vec::new(),
        }
    }

    fn submit(&mut self, req: SeqRequest) -> SeqId {
        self.sched.submit(req).expect("admitted or queued")
    }

    fn build(&mut self) -> &[BatchToken] {
        self.sched.build_batch(&mut self.batch);
        &self.batch
    }

    /// Completes the batch built last: the token whose logit is highest in each row is
    /// `pick(slot)`.
    fn complete(&mut self, pick: impl Fn(SeqSlot) -> u32) -> Vec<(SeqId, SeqOutput)> {
        let mut logits = Vec::new();
        let (mut active, mut hot) = (Vec::new(), Vec::new());
        for b in &self.batch {
            active.extend([active_in(b.slot); N_LAYER]);
            hot.extend([1; N_LAYER]);
            if b.logits {
                let row = logits.len();
                logits.resize(row + N_VOCAB, 0.0);
                logits[row + pick(b.slot) as usize] = 4.0;
            }
        }
        active.extend(hot);
        self.sched
            .complete_step(&logits, &active, &tracing::Span::none())
            .expect("a well-formed step");
        self.sched.drain_events().collect()
    }

    fn step(&mut self, pick: impl Fn(SeqSlot) -> u32) -> Vec<(SeqId, SeqOutput)> {
        self.build();
        self.complete(pick)
    }
}

fn letter(_: SeqSlot) -> u32 {
    u32::from(b'x')
}

fn finals(events: &[(SeqId, SeqOutput)]) -> Vec<(SeqId, &FinalEvent)> {
    events
        .iter()
        .filter_map(|(id, e)| match e {
            Ok(StreamItem::Final(f)) => Some((*id, f)),
            _ => None,
        })
        .collect()
}

fn tokens(events: &[(SeqId, SeqOutput)], of: SeqId) -> Vec<TokenId> {
    events
        .iter()
        .filter_map(|(id, e)| match e {
            Ok(StreamItem::Token(t)) if *id == of => Some(t.id),
            _ => None,
        })
        .collect()
}

#[test]
fn requests_are_admitted_in_order_and_a_freed_slot_is_reused() {
    let mut h = Harness::new(config(2, 4, 64));
    let a = h.submit(request(3, 1));
    let b = h.submit(request(3, 5));
    let c = h.submit(request(3, 5));
    assert_eq!((h.sched.counts().active, h.sched.counts().queued), (2, 1));
    let slots: Vec<usize> = h.build().iter().map(|t| t.slot.0).collect();
    assert_eq!(slots, [0, 0, 0, 1, 1, 1], "a in slot 0, b in slot 1");
    let events = h.complete(letter);
    assert_eq!(finals(&events).len(), 1);
    assert_eq!(finals(&events)[0].0, a, "a wanted one token");
    // c took a's slot as soon as a ended: its prompt is in slot 0 of the next batch.
    assert_eq!((h.sched.counts().active, h.sched.counts().queued), (2, 0));
    let next: Vec<(usize, usize)> = h.build().iter().map(|t| (t.slot.0, t.pos)).collect();
    assert_eq!(next, [(1, 3), (0, 0), (0, 1), (0, 2)], "b decodes, c reads");
    let events = h.complete(letter);
    assert_eq!(tokens(&events, b).len(), 1);
    assert_eq!(tokens(&events, c).len(), 1);
}

#[test]
fn the_queue_limit_counts_only_requests_that_wait() {
    let mut h = Harness::new(config(1, 1, 64));
    h.submit(request(2, 5));
    h.submit(request(2, 5));
    let refused = h.sched.submit(request(2, 5));
    assert!(
        matches!(refused, Err(EngineError::QueueFull { max: 1 })),
        "{refused:?}"
    );
    // With no room to wait at all, a free slot still takes a request at once.
    let mut h = Harness::new(config(1, 0, 64));
    h.submit(request(2, 5));
    assert_eq!(h.sched.counts().active, 1);
    assert!(h.sched.submit(request(2, 5)).is_err());
}

#[test]
fn a_long_prompt_is_read_in_chunks_after_the_decode_tokens() {
    let mut h = Harness::new(config(2, 4, 4));
    let running = h.submit(request(2, 50));
    h.step(letter); // reads its prompt and samples its first token
    let long = h.submit(request(10, 3));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let batch: Vec<(usize, usize, bool)> = h
            .build()
            .iter()
            .map(|t| (t.slot.0, t.pos, t.logits))
            .collect();
        seen.push(batch);
        let events = h.complete(letter);
        assert_eq!(
            tokens(&events, running).len(),
            1,
            "one token a step meanwhile"
        );
        if seen.len() < 3 {
            assert!(tokens(&events, long).is_empty());
        } else {
            assert_eq!(tokens(&events, long).len(), 1, "its first token");
        }
    }
    let chunk = |start: usize, n: usize, last: bool| {
        (start..start + n)
            .map(move |p| (1, p, last && p == start + n - 1))
            .collect::<Vec<_>>()
    };
    assert_eq!(seen[0][0], (0, 2, true), "the decode token comes first");
    assert_eq!(seen[0][1..], chunk(0, 4, false));
    assert_eq!(seen[1][0], (0, 3, true));
    assert_eq!(seen[1][1..], chunk(4, 4, false));
    assert_eq!(seen[2][0], (0, 4, true));
    assert_eq!(
        seen[2][1..],
        chunk(8, 2, true),
        "logits only for the last prompt token"
    );
}

#[test]
fn cancelling_frees_a_waiting_or_running_request_at_once() {
    let mut h = Harness::new(config(1, 4, 64));
    let running = h.submit(request(2, 50));
    let first = h.submit(request(2, 5));
    let second = h.submit(request(2, 5));
    assert!(h.sched.cancel(first));
    assert_eq!(h.sched.counts().queued, 1);
    h.step(letter);
    // Cancelled while its step runs: that step's results are dropped, and the slot goes
    // to the next waiting request before the step completes.
    h.build();
    assert!(h.sched.cancel(running));
    assert_eq!((h.sched.counts().active, h.sched.counts().queued), (1, 0));
    let events = h.complete(letter);
    assert!(events.iter().all(|(id, _)| *id != running), "{events:?}");
    assert!(!h.sched.cancel(running), "already gone");
    let batch: Vec<usize> = h.build().iter().map(|t| t.pos).collect();
    assert_eq!(
        batch,
        [0, 1],
        "the second request reads its prompt in the freed slot"
    );
    assert_eq!(tokens(&h.complete(letter), second).len(), 1);
}

#[test]
fn each_finish_reason_ends_the_sequence_with_its_final_event() {
    let mut h = Harness::new(config(3, 4, 64));
    let eog = h.submit(request(2, 10));
    let length = h.submit(request(2, 2));
    let mut stop_string = request(2, 10);
    stop_string.stop = vec!["yz".into()];
    let stop = h.submit(stop_string);
    // Slot 0 ends at once; slot 2 writes "y", then "z".
    let events = h.step(|slot| match slot.0 {
        0 => EOG,
        1 => u32::from(b'x'),
        _ => u32::from(b'y'),
    });
    let f = finals(&events);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0, eog);
    assert_eq!(f[0].1.finish, FinishReason::EndOfGeneration(TokenId(EOG)));
    assert_eq!(f[0].1.completion_tokens, 0, "the end token is not streamed");
    let events = h.step(|_| u32::from(b'z'));
    let mut f = finals(&events);
    f.sort_by_key(|(id, _)| *id);
    assert_eq!((f[0].0, f[0].1.finish), (length, FinishReason::MaxTokens));
    assert_eq!(f[0].1.text, "", "nothing was held back");
    assert_eq!((f[1].0, f[1].1.finish), (stop, FinishReason::StopSequence));
    assert_eq!(f[1].1.completion_tokens, 2);
    assert!(h.sched.is_idle());

    // The context: a 60-token prompt in a 64-token context has room for 4 more positions;
    // the fifth token would have none.
    let mut h = Harness::new(config(1, 1, 64));
    let ctx = h.submit(request(60, 100));
    let mut ends = Vec::new();
    for _ in 0..5 {
        ends.extend(
            finals(&h.step(letter))
                .iter()
                .map(|(id, f)| (*id, f.finish)),
        );
    }
    assert_eq!(ends, [(ctx, FinishReason::ContextFull)]);
    assert!(h.sched.is_idle());
}

#[test]
fn a_request_ended_by_a_stop_string_reports_its_measured_sparsity() {
    let mut h = Harness::new(config(2, 4, 64));
    let mut stopped = request(3, 20);
    stopped.stop = vec!["xx".into()];
    let stopped = h.submit(stopped);
    let by_length = h.submit(request(3, 2));
    let mut done = Vec::new();
    while done.len() < 2 {
        let events = h.step(letter);
        done.extend(finals(&events).into_iter().map(|(id, f)| (id, f.clone())));
    }
    done.sort_by_key(|(id, _)| *id);
    let (stop, length) = (&done[0].1, &done[1].1);
    assert_eq!(
        (done[0].0, stop.finish),
        (stopped, FinishReason::StopSequence)
    );
    assert_eq!(
        (done[1].0, length.finish),
        (by_length, FinishReason::MaxTokens)
    );
    // Each sequence's own tokens: slot 0 computed 5 of 10 neurons a layer, slot 1 2 of
    // 10, one of them hot.
    assert_eq!(stop.sparsity.active_fraction_per_layer, [0.5, 0.5]);
    assert_eq!(length.sparsity.active_fraction_per_layer, [0.2, 0.2]);
    assert!((stop.sparsity.hot_share - 0.2).abs() < 1e-6);
    assert!((length.sparsity.hot_share - 0.5).abs() < 1e-6);
    assert_eq!(stop.sparsity.mode, SparsityMode::Gate);
}

#[test]
fn per_sequence_statistics_count_prompt_and_generated_tokens() {
    let mut h = Harness::new(config(1, 1, 3));
    let id = h.submit(request(5, 3));
    let mut text = String::new();
    let mut fin = None;
    while fin.is_none() {
        for (of, e) in h.step(|_| u32::from(b'q')) {
            assert_eq!(of, id);
            match e {
                Ok(StreamItem::Token(t)) => text.push_str(&t.text),
                Ok(StreamItem::Final(f)) => fin = Some(f),
                Err(e) => panic!("{e}"),
            }
        }
    }
    let fin = fin.expect("ended");
    assert_eq!(text, "qqq");
    assert_eq!((fin.prompt_tokens, fin.completion_tokens), (5, 3));
    assert_eq!(fin.finish, FinishReason::MaxTokens);
    let c = h.sched.counts();
    // Prompt in two chunks of 3 and 2, then two decode steps.
    assert_eq!((c.steps_total, c.generated_total), (4, 3));
}

#[test]
fn a_failed_step_ends_every_running_sequence_and_a_request_for_nothing_ends_at_once() {
    let mut h = Harness::new(config(2, 4, 64));
    let a = h.submit(request(2, 5));
    let b = h.submit(request(2, 5));
    h.build();
    assert!(
        h.sched
            .complete_step(&[], &[], &tracing::Span::none())
            .is_err()
    );
    h.sched.fail_step("forward pass: broken");
    let failed: Vec<SeqId> = h
        .sched
        .drain_events()
        .filter_map(|(id, e)| e.is_err().then_some(id))
        .collect();
    assert_eq!(failed, [a, b]);
    assert!(h.sched.is_idle());

    let none = h.submit(request(4, 0));
    let events: Vec<_> = h.sched.drain_events().collect();
    let f = finals(&events);
    assert_eq!((f[0].0, f[0].1.completion_tokens), (none, 0));
    assert!(h.sched.is_idle(), "it took no slot");
}
