//! The scheduler's thread, `pi-sched`: the plumbing around [`Scheduler`]. It takes
//! submissions from its mailbox between steps, cancels the requests whose client stream
//! has closed, runs each step on the cold executor, delivers the events to the requests'
//! streams and publishes the statistics. The thread ends when the last handle is dropped
//! and nothing is left to run.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};
use tokio::sync::{mpsc, oneshot};

use super::super::cold::ColdHandle;
use super::super::types::{EngineError, StreamItem};
use super::{SchedConfig, Scheduler, SeqId, SeqOutput, SeqRequest, StatsBoard};
use crate::model::BatchToken;
use crate::tokenizer::Tokenizer;

/// Submissions waiting for the scheduler, which drains them between steps (a step lasts
/// up to one prefill chunk's compute): room for a burst from every client at once; more
/// are refused as a full queue.
const INBOX: usize = 256;
/// Items a request's stream holds beyond its tokens: the final event, and an error the
/// thread's end may add. With room for every token too, delivery never waits on a slow
/// client (the channel allocates as it fills, not up front).
const STREAM_EXTRA: usize = 2;

enum SchedMsg {
    Submit {
        req: SeqRequest,
        stream: mpsc::Sender<SeqOutput>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
}

struct SchedActor {
    sched: Scheduler,
    rx: Receiver<SchedMsg>,
    cold: ColdHandle,
    board: StatsBoard,
    /// The stream of every waiting or running request.
    streams: Vec<(SeqId, mpsc::Sender<SeqOutput>)>,
    /// Buffers moved to the executor and back every step.
    batch: Vec<BatchToken>,
    logits: Vec<f32>,
    active: Vec<u32>,
}

impl SchedActor {
    fn run(mut self) {
        loop {
            // Idle: block until something arrives; the engine is gone when the inbox closes.
            if self.sched.is_idle() {
                match self.rx.recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.sched.is_idle() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.cancel_closed();
            self.step();
            self.deliver();
        }
    }

    fn handle(&mut self, msg: SchedMsg) {
        match msg {
            SchedMsg::Submit { req, stream, reply } => {
                let r = self
                    .sched
                    .submit(req)
                    .map(|id| self.streams.push((id, stream)));
                self.deliver();
                // Published before the reply, so the submitter's next status sees it.
                self.board.publish(self.sched.counts());
                let _ = reply.send(r);
            }
        }
    }

    /// Frees the slots of requests whose client has gone, and forgets waiting ones.
    fn cancel_closed(&mut self) {
        let sched = &mut self.sched;
        self.streams.retain(|(id, stream)| {
            let closed = stream.is_closed();
            if closed {
                sched.cancel(*id);
            }
            !closed
        });
    }

    fn step(&mut self) {
        self.sched.build_batch(&mut self.batch);
        if self.batch.is_empty() {
            self.board.publish(self.sched.counts());
            return;
        }
        let span = self.sched.step_span(self.batch.len());
        let batch = std::mem::take(&mut self.batch);
        let logits = std::mem::take(&mut self.logits);
        let active = std::mem::take(&mut self.active);
        let done = match self.cold.step(batch, logits, active, &span) {
            Ok(done) => done,
            Err(e) => {
                self.sched.fail_step(&e.to_string());
                self.board.publish(self.sched.counts());
                return;
            }
        };
        self.batch = done.batch;
        self.logits = done.logits;
        self.active = done.active;
        let completed = done
            .result
            .map_err(|e| EngineError::Internal(format!("forward pass: {e}")))
            .and_then(|()| self.sched.complete_step(&self.logits, &self.active, &span));
        match completed {
            Ok(tokens) => self
                .board
                .publish_step(self.sched.counts(), tokens, &self.active),
            Err(e) => {
                self.sched.fail_step(&e.to_string());
                self.board.publish(self.sched.counts());
            }
        }
    }

    /// Hands every event to its request's stream; a final event or an error ends it.
    fn deliver(&mut self) {
        for (id, out) in self.sched.drain_events() {
            let Some(i) = self.streams.iter().position(|(s, _)| *s == id) else {
                continue;
            };
            let last = !matches!(out, Ok(StreamItem::Token(_)));
            if let Err(mpsc::error::TrySendError::Full(_)) = self.streams[i].1.try_send(out) {
                tracing::warn!(seq = id.0, "a stream had no room for an event");
            }
            if last {
                self.streams.swap_remove(i);
            }
        }
    }
}

impl Drop for SchedActor {
    /// The thread is ending (after the last handle, or in a panic): status readers learn
    /// it, and streams still open end with an error rather than silently.
    fn drop(&mut self) {
        self.board.mark_stopped();
        for (_, stream) in self.streams.drain(..) {
            let _ = stream.try_send(Err(EngineError::Stopped));
        }
    }
}

/// Submits requests to the scheduler; its thread ends when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct SchedHandle {
    tx: Sender<SchedMsg>,
}

impl SchedHandle {
    /// Starts the scheduler on thread `pi-sched`, stepping on `cold` and publishing on
    /// `board`.
    pub fn spawn(
        config: SchedConfig,
        tokenizer: Arc<Tokenizer>,
        cold: ColdHandle,
        board: StatsBoard,
    ) -> Result<Self, EngineError> {
        let (tx, rx) = bounded(INBOX);
        let actor = SchedActor {
            sched: Scheduler::new(config, tokenizer),
            rx,
            cold,
            board,
            streams: Vec::new(),
            batch: Vec::new(),
            logits: Vec::new(),
            active: Vec::new(),
        };
        std::thread::Builder::new()
            .name("pi-sched".into())
            .spawn(move || actor.run())
            .map_err(|e| EngineError::Internal(format!("cannot start the scheduler: {e}")))?;
        Ok(Self { tx })
    }

    /// Queues a request (refused when the queue is full); its tokens, then its final
    /// event, arrive on the returned stream. Dropping the stream cancels the request.
    pub async fn submit(&self, req: SeqRequest) -> Result<mpsc::Receiver<SeqOutput>, EngineError> {
        let (stream, events) = mpsc::channel(req.max_tokens + STREAM_EXTRA);
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(SchedMsg::Submit { req, stream, reply })
            .map_err(|e| match e {
                TrySendError::Full(_) => EngineError::QueueFull { max: INBOX },
                TrySendError::Disconnected(_) => EngineError::Stopped,
            })?;
        rx.await.map_err(|_| EngineError::Stopped)??;
        Ok(events)
    }
}
