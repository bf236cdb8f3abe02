//! The sampler actor: one seeded sampler (and its penalty window) per sequence; turns a
//! step's logits into tokens.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::types::EngineError;
use crate::ids::TokenId;
use crate::sampler::{Sampled, Sampler, SamplerConfig};

/// Messages waiting for the sampler: opens and closes of a step plus the step's sampling.
const INBOX: usize = 64;

/// A sequence of the scheduler.
pub(crate) type SeqId = u64;

pub(crate) enum SamplerMsg {
    Open {
        seq: SeqId,
        config: SamplerConfig,
        /// Prompt tokens, for the penalty window.
        prompt: Vec<TokenId>,
    },
    Close {
        seq: SeqId,
    },
    /// Sample row `i` of `logits` (`n_vocab` each) for `seqs[i]`.
    Sample {
        seqs: Vec<SeqId>,
        logits: Vec<f32>,
        n_vocab: usize,
        reply: SyncSender<SampleDone>,
        span: tracing::Span,
    },
}

pub(crate) struct SampleDone {
    pub picks: Vec<(SeqId, Sampled)>,
    pub seqs: Vec<SeqId>,
    pub logits: Vec<f32>,
}

struct SamplerActor {
    samplers: HashMap<SeqId, Sampler>,
    rx: Receiver<SamplerMsg>,
}

impl SamplerActor {
    fn run(mut self) {
        while let Ok(msg) = self.rx.recv() {
            match msg {
                SamplerMsg::Open {
                    seq,
                    config,
                    prompt,
                } => {
                    let mut s = Sampler::new(config);
                    for t in prompt {
                        s.accept(t);
                    }
                    self.samplers.insert(seq, s);
                }
                SamplerMsg::Close { seq } => {
                    self.samplers.remove(&seq);
                }
                SamplerMsg::Sample {
                    seqs,
                    logits,
                    n_vocab,
                    reply,
                    span,
                } => {
                    let stage =
                        tracing::info_span!(parent: &span, "sample", sequences = seqs.len());
                    let _enter = stage.enter();
                    let mut picks = Vec::with_capacity(seqs.len());
                    for (i, &seq) in seqs.iter().enumerate() {
                        let Some(s) = self.samplers.get_mut(&seq) else {
                            continue;
                        };
                        let sampled = s.sample(&logits[i * n_vocab..(i + 1) * n_vocab]);
                        s.accept(sampled.token);
                        picks.push((seq, sampled));
                    }
                    let _ = reply.send(SampleDone {
                        picks,
                        seqs,
                        logits,
                    });
                }
            }
        }
    }
}

#[derive(Clone)]
pub(crate) struct SamplerHandle {
    tx: SyncSender<SamplerMsg>,
}

impl SamplerHandle {
    /// Starts the sampler on thread `pi-sample`.
    pub fn spawn() -> Result<Self, EngineError> {
        let (tx, rx) = sync_channel(INBOX);
        std::thread::Builder::new()
            .name("pi-sample".into())
            .spawn(move || {
                SamplerActor {
                    samplers: HashMap::new(),
                    rx,
                }
                .run();
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the sampler: {e}")))?;
        Ok(Self { tx })
    }

    pub fn open(
        &self,
        seq: SeqId,
        config: SamplerConfig,
        prompt: Vec<TokenId>,
    ) -> Result<(), EngineError> {
        self.tx
            .send(SamplerMsg::Open {
                seq,
                config,
                prompt,
            })
            .map_err(|_| EngineError::Stopped)
    }

    pub fn close(&self, seq: SeqId) -> Result<(), EngineError> {
        self.tx
            .send(SamplerMsg::Close { seq })
            .map_err(|_| EngineError::Stopped)
    }

    pub fn sample(
        &self,
        seqs: Vec<SeqId>,
        logits: Vec<f32>,
        n_vocab: usize,
        span: &tracing::Span,
    ) -> Result<SampleDone, EngineError> {
        let (reply, rx) = sync_channel(1);
        self.tx
            .send(SamplerMsg::Sample {
                seqs,
                logits,
                n_vocab,
                reply,
                span: span.clone(),
            })
            .map_err(|_| EngineError::Stopped)?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }
}
