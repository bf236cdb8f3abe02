//! Single-sequence generation on one model: the direct path that `powerinferd run`, the
//! benchmarks and the parity tests drive. The daemon's actors reach the same forward pass
//! through the pipeline, and both run each sequence through the same [`Generation`].

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::Numerics;

use crate::generation::sampler::SamplerConfig;
use crate::ids::{SeqSlot, TokenId};
use crate::model::{
    BatchToken, ForwardError, KvCache, KvType, LoadError, Model, PlacedDevice, Scratch, Side,
    SparsityMode,
};
use crate::tokenizer::{Tokenizer, TokenizerError};

pub use super::{FinishReason, TokenEvent};
use super::{Generation, GenerationLimits};

/// Tokens per forward call while reading a prompt.
pub const PREFILL_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("{0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Forward(#[from] ForwardError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens, more than the context of {n_ctx}")]
    PromptTooLong { prompt: usize, n_ctx: usize },
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    /// The session does not fit the device the model is placed on.
    #[error("{0}")]
    Device(String),
    #[error("cannot start {n} compute threads: {source}")]
    Threads {
        n: usize,
        #[source]
        source: std::io::Error,
    },
}

pub use crate::model::LoadedModel;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends before any of these strings would be emitted.
    pub stop: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub prompt_tokens: usize,
    pub generated: Vec<TokenId>,
    pub prompt_time: Duration,
    pub decode_time: Duration,
    pub stop: FinishReason,
}

impl Summary {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed: tokens after the first (which prefill produced) per decode second.
    pub fn decode_tps(&self) -> f64 {
        self.generated.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// How a session computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// Context size in tokens.
    pub n_ctx: usize,
    pub n_threads: usize,
    pub kv_type: KvType,
    pub numerics: Numerics,
    /// How the FFN neurons of every token are chosen.
    pub sparsity: SparsityMode,
    /// Time each stage of the forward pass (see [`Session::profile`]).
    pub profile: bool,
}

impl SessionOptions {
    /// `n_ctx` tokens on `n_threads` threads, f16 KV cache, precise numerics.
    pub fn new(n_ctx: usize, n_threads: usize) -> Self {
        Self {
            n_ctx,
            n_threads,
            kv_type: KvType::F16,
            numerics: Numerics::Precise,
            sparsity: SparsityMode::Dense,
            profile: false,
        }
    }

    /// What a device's caches and arithmetic must be for sessions like this one.
    pub fn device_sizing(&self) -> crate::model::placement::DeviceSizing {
        crate::model::placement::DeviceSizing {
            n_ctx: self.n_ctx.max(1),
            n_seq: 1,
            kv_type: self.kv_type,
            numerics: self.numerics,
        }
    }
}

/// One sequence's state on one model: thread pool, KV cache, buffers.
pub struct Session<'m> {
    pub model: &'m Model,
    pub tokenizer: &'m Tokenizer,
    pool: ThreadPool,
    /// The host's layers' caches (the device holds its own).
    kv: KvCache,
    scratch: Scratch,
    device: Option<&'m PlacedDevice>,
    device_buffers: crate::model::hybrid::DeviceBuffers,
    logits: Vec<f32>,
    sparsity: SparsityMode,
    /// Active neurons summed per layer over every token run, and the tokens run.
    active_totals: Vec<u64>,
    tokens_run: u64,
}

impl<'m> Session<'m> {
    pub fn new(loaded: &'m LoadedModel, opts: SessionOptions) -> Result<Self, GenerateError> {
        let c = &loaded.model.config;
        if let Some(why) = loaded.model.sparsity_unavailable(opts.sparsity) {
            return Err(ForwardError::Sparsity(why).into());
        }
        let n_ctx = opts.n_ctx.max(1);
        if let Some(d) = &loaded.device {
            let z = d.sizing;
            if n_ctx > z.n_ctx || opts.kv_type != z.kv_type || opts.numerics != z.numerics {
                return Err(GenerateError::Device(format!(
                    "a session of {n_ctx} tokens ({:?} cache, {:?} numerics) does not fit the \
                     device's placement ({} tokens, {:?}, {:?})",
                    opts.kv_type, opts.numerics, z.n_ctx, z.kv_type, z.numerics
                )));
            }
        }
        let n = opts.n_threads.max(1);
        let pool =
            ThreadPool::new(n, "pi-cpu").map_err(|source| GenerateError::Threads { n, source })?;
        let shape = crate::model::KvShape {
            n_slots: 1,
            n_ctx,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            ty: opts.kv_type,
        };
        let partition = &loaded.model.partition;
        let kv = KvCache::try_for_layers(c.n_layer, shape, |l| {
            partition.layers[l].attention == Side::Host
        })
        .map_err(|e| GenerateError::Device(e.to_string()))?;
        Ok(Self {
            model: &loaded.model,
            tokenizer: &loaded.tokenizer,
            pool,
            kv,
            scratch: {
                let mut s = Scratch::new(opts.numerics);
                s.profile = crate::model::Profile::new(opts.profile);
                s
            },
            device: loaded.device.as_ref(),
            device_buffers: Default::default(),
            logits: Vec::new(),
            sparsity: opts.sparsity,
            active_totals: vec![0; c.n_layer],
            tokens_run: 0,
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Per-stage times of the forward passes so far (enabled by `POWERINFER_PROFILE`).
    pub fn profile(&self) -> &crate::model::Profile {
        &self.scratch.profile
    }

    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Starts (`Some`) or stops recording what calibration needs in every forward pass.
    pub fn set_capture(&mut self, capture: Option<crate::model::Capture>) {
        self.scratch.capture = capture;
    }

    /// What was recorded since [`Self::set_capture`], ending the recording.
    pub fn take_capture(&mut self) -> Option<crate::model::Capture> {
        self.scratch.capture.take()
    }

    /// Runs `tokens` at positions `start..` and returns the logits of the positions in
    /// `logits_for` (indices into `tokens`), `n_vocab` each, in order.
    pub fn eval(
        &mut self,
        tokens: &[TokenId],
        start: usize,
        logits_for: impl Fn(usize) -> bool,
    ) -> Result<&[f32], GenerateError> {
        let batch: Vec<BatchToken> = tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| BatchToken {
                token,
                slot: SeqSlot(0),
                pos: start + i,
                logits: logits_for(i),
                sparsity: self.sparsity,
            })
            .collect();
        match self.device {
            None => {
                self.model.forward_into(
                    &self.pool,
                    &batch,
                    &mut self.kv,
                    &mut self.scratch,
                    &mut self.logits,
                )?;
            }
            Some(d) => {
                let mut dev = d
                    .device
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                self.model.forward_with_device(
                    &self.pool,
                    dev.as_mut(),
                    &batch,
                    &mut self.kv,
                    &mut self.scratch,
                    &mut self.device_buffers,
                    &mut self.logits,
                )?;
            }
        }
        let n_layer = self.model.config.n_layer;
        for counts in self.scratch.active_counts.chunks_exact(n_layer) {
            for (total, &c) in self.active_totals.iter_mut().zip(counts) {
                *total += u64::from(c);
            }
        }
        self.tokens_run += tokens.len() as u64;
        Ok(&self.logits)
    }

    /// Mean fraction of FFN neurons computed per layer over every token run so far.
    pub fn active_fraction_per_layer(&self) -> Vec<f32> {
        let all = self.tokens_run as f64 * self.model.config.n_ff as f64;
        self.active_totals
            .iter()
            .map(|&a| {
                if all > 0.0 {
                    (a as f64 / all) as f32
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// Reads `prompt` and generates from it, calling `on_token` for every token; a
    /// `Break` from it stops generation. Text held back for a stop string that never came
    /// arrives at the end on one more event, for the last token with log-probability 0.
    pub fn generate(
        &mut self,
        prompt: &[TokenId],
        params: &GenParams,
        mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<Summary, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() >= self.n_ctx() {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt.len(),
                n_ctx: self.n_ctx(),
            });
        }
        params.sampler.validate().map_err(GenerateError::Sampling)?;
        let limits = GenerationLimits {
            max_tokens: params.max_tokens,
            n_ctx: self.n_ctx(),
        };
        let mut generation =
            Generation::new(params.sampler.clone(), params.stop.clone(), prompt, limits);

        let t0 = Instant::now();
        let n_vocab = self.model.config.n_vocab;
        let mut logits = Vec::with_capacity(n_vocab);
        for (i, chunk) in prompt.chunks(PREFILL_BATCH).enumerate() {
            let last = (i + 1) * PREFILL_BATCH >= prompt.len();
            let out = self.eval(chunk, i * PREFILL_BATCH, |j| last && j == chunk.len() - 1)?;
            if last {
                logits.clear();
                logits.extend_from_slice(out);
            }
        }
        let prompt_time = t0.elapsed();

        let t1 = Instant::now();
        let mut generated = Vec::new();
        let stop = loop {
            if let Some(finish) = generation.finish() {
                break finish;
            }
            let step = generation.advance(self.tokenizer, &logits);
            if let Some(ev) = &step.token {
                generated.push(ev.id);
                if on_token(ev).is_break() {
                    generation.cancel();
                    break FinishReason::Cancelled;
                }
            }
            if let Some(finish) = step.finish {
                break finish;
            }
            let (token, pos) = generation
                .next_input()
                .expect("a generation that goes on has streamed a token");
            let out = self.eval(&[token], pos, |_| true)?;
            logits.clear();
            logits.extend_from_slice(out);
        };
        let rest = generation.take_tail();
        if !rest.is_empty()
            && let Some(&last) = generated.last()
        {
            let _ = on_token(&TokenEvent {
                id: last,
                text: rest,
                logprob: 0.0,
                top_logprobs: Vec::new(),
            });
        }
        Ok(Summary {
            prompt_tokens: prompt.len(),
            generated,
            prompt_time,
            decode_time: t1.elapsed(),
            stop,
        })
    }
}
