//! The engine of one loaded model: the per-token dataflow of DESIGN.md §3 as actors.
//!
//! ```text
//! request ─▶ tokenizer ─▶ scheduler ─▶ cold executor (CPU; layers wholly on the CPU run
//!                 ▲            ▲          inside one message per step, predictor inline)
//!                 │            └──────── logits ◀─┘     hot executor (device, placement)
//!                 └── detokenize ◀── sampler ◀── logits
//! ```
//!
//! The tokenizer is a tokio task; the scheduler, executors and sampler run on named
//! threads with bounded channels, replies travelling on channels carried in the messages.
//! Buffers (batch, logits) move between stages instead of being copied. Dropping the
//! `Engine` drops the handles, and each actor stops after its current step.

mod cold;
mod hot;
mod predictor;
mod sampling;
mod scheduler;
mod text;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use hot::HotInfo;
pub use predictor::ActivityReport;
pub use scheduler::SchedStatus;
pub use types::*;

use self::cold::ColdHandle;
use self::hot::HotHandle;
use self::sampling::SamplerHandle;
use self::scheduler::{SchedHandle, SeqEvent, SeqRequest};
use self::text::TextHandle;
use crate::generate::LoadedModel;
use crate::ids::TokenId;
use crate::model::Model;
use crate::tokenizer::{TextStream, Tokenizer};

/// Largest `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Items a generation stream buffers ahead of a slow client.
const STREAM_BUFFER: usize = 64;

/// A snapshot of a loaded model.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub name: String,
    pub path: PathBuf,
    pub file_size: u64,
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    pub weight_bytes: u64,
    pub options: EngineOptions,
    /// Share of the FFN neurons placed on the device.
    pub hot_share: f32,
    pub hot: HotInfo,
    pub sched: SchedStatus,
    pub loaded_at: SystemTime,
}

/// One loaded model and its actors.
pub struct Engine {
    name: String,
    path: PathBuf,
    file_size: u64,
    loaded_at: SystemTime,
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    opts: EngineOptions,
    text: TextHandle,
    sched: SchedHandle,
    hot: HotHandle,
    cold: ColdHandle,
}

impl Engine {
    /// Loads `path` and starts its actors (blocking: call from a blocking context). Must
    /// run inside a tokio runtime (the tokenizer actor is a task).
    pub fn load(name: &str, path: &Path, opts: EngineOptions) -> Result<Self, EngineError> {
        let mut opts = opts;
        opts.max_sequences = opts.max_sequences.max(1);
        opts.threads = opts.threads.max(1);
        let mut loaded = LoadedModel::load_for(path, opts.sparsity)?;
        let n_ctx_train = loaded.model.config.n_ctx_train;
        if opts.n_ctx == 0 || opts.n_ctx > n_ctx_train.max(1) {
            return Err(EngineError::InvalidArgument(format!(
                "context size {} is outside 1..={n_ctx_train} (the model's)",
                opts.n_ctx
            )));
        }
        opts.max_prompt_tokens = opts.max_prompt_tokens.min(opts.n_ctx - 1);
        let mut device =
            crate::device::open(&opts.device, opts.vram_budget).map_err(EngineError::Device)?;
        if let Some(dev) = device.as_mut() {
            let sizing = (opts.n_ctx, opts.max_sequences, opts.kv_type);
            crate::model::placement::place_on(
                &mut loaded.model,
                path,
                &opts.device,
                dev.as_mut(),
                sizing,
            )
            .map_err(EngineError::InvalidArgument)?;
        }
        let LoadedModel { model, tokenizer } = loaded;
        let (model, tokenizer) = (Arc::new(model), Arc::new(tokenizer));
        let hot = HotHandle::spawn(device)?;
        let cold = ColdHandle::spawn(model.clone(), &opts)?;
        let sampler = SamplerHandle::spawn()?;
        let shape = scheduler::ModelShape {
            n_vocab: model.config.n_vocab,
            n_layer: model.config.n_layer,
            n_ff: model.config.n_ff,
        };
        let sched =
            SchedHandle::spawn(&opts, shape, tokenizer.eog_tokens(), cold.clone(), sampler)?;
        let text = TextHandle::spawn(tokenizer.clone());
        Ok(Self {
            name: name.to_owned(),
            path: path.to_owned(),
            file_size: std::fs::metadata(path).map_or(0, |m| m.len()),
            loaded_at: SystemTime::now(),
            model,
            tokenizer,
            opts,
            text,
            sched,
            hot,
            cold,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Starts a generation; its tokens arrive on the returned stream, then one final
    /// event. Dropping the stream cancels the generation within one step. The current
    /// `tracing` span is the request's: the phases and sampled steps are traced below it.
    pub async fn generate(
        &self,
        spec: GenerateSpec,
    ) -> Result<ReceiverStream<Result<StreamItem, EngineError>>, EngineError> {
        spec.sampling
            .validate()
            .map_err(EngineError::InvalidArgument)?;
        if spec.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(EngineError::InvalidArgument(format!(
                "top_logprobs {} is more than {MAX_TOP_LOGPROBS}",
                spec.top_logprobs
            )));
        }
        if spec.stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidArgument(
                "stop strings must not be empty".into(),
            ));
        }
        let sparsity = spec.sparsity.unwrap_or(self.opts.sparsity);
        if let Some(why) = self.model.sparsity_unavailable(sparsity) {
            return Err(EngineError::InvalidArgument(why));
        }
        let prompt = self.text.encode(spec.input).await?;
        self.check_prompt(&prompt)?;
        let room = self.opts.n_ctx - prompt.len();
        let max_tokens = match spec.max_tokens {
            Some(0) | None => self.opts.default_max_tokens.min(room),
            Some(n) => n.min(room),
        };
        let (events_tx, events_rx) = mpsc::channel(max_tokens + 2);
        let (out_tx, out_rx) = mpsc::channel(STREAM_BUFFER);
        let mut sampling = spec.sampling;
        sampling.n_logprobs = spec.top_logprobs;
        let prompt_tokens = prompt.len();
        self.sched
            .submit(SeqRequest {
                prompt,
                max_tokens,
                sampling,
                events: events_tx,
                submitted: Instant::now(),
                sparsity,
                span: tracing::Span::current(),
            })
            .await?;
        let stats = SparsityStats {
            mode: sparsity,
            active_fraction_per_layer: vec![1.0; self.model.config.n_layer],
            hot_share: 0.0,
            cold_share: 1.0,
        };
        let stream = StreamTask {
            span: tracing::Span::current(),
            tokenizer: self.tokenizer.clone(),
            stop: spec.stop,
            sparsity: stats,
            prompt_tokens,
        };
        tokio::spawn(stream.run(events_rx, out_tx));
        Ok(ReceiverStream::new(out_rx))
    }

    fn check_prompt(&self, prompt: &[TokenId]) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidArgument("the prompt is empty".into()));
        }
        if prompt.len() > self.opts.max_prompt_tokens {
            return Err(EngineError::InvalidArgument(format!(
                "the prompt has {} tokens, more than the limit of {} (context {})",
                prompt.len(),
                self.opts.max_prompt_tokens,
                self.opts.n_ctx
            )));
        }
        let n = self.model.config.n_vocab;
        if let Some(t) = prompt.iter().find(|t| t.index() >= n) {
            return Err(EngineError::InvalidArgument(format!(
                "token id {t} is out of range (vocabulary of {n})"
            )));
        }
        Ok(())
    }

    pub async fn tokenize(
        &self,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<TokenId>, EngineError> {
        self.text.tokenize(text, add_special, parse_special).await
    }

    pub async fn detokenize(
        &self,
        ids: Vec<TokenId>,
        render_special: bool,
    ) -> Result<String, EngineError> {
        self.text.detokenize(ids, render_special).await
    }

    /// Neurons computed per layer since the model was loaded, and the share of them that
    /// were hot.
    pub fn activity(&self) -> Result<ActivityReport, EngineError> {
        self.cold.activity()
    }

    pub async fn info(&self) -> Result<EngineInfo, EngineError> {
        let c = &self.model.config;
        let w = &self.model.weights;
        let parameters = w.n_params();
        Ok(EngineInfo {
            name: self.name.clone(),
            path: self.path.clone(),
            file_size: self.file_size,
            architecture: format!("{:?}", c.arch).to_lowercase(),
            parameters,
            quantization: w
                .layers
                .first()
                .map_or("?", |l| l.wq.wtype().ggml().name())
                .to_owned(),
            weight_bytes: w.bytes_per_token() as u64,
            options: self.opts.clone(),
            hot_share: self.model.hot_share(),
            hot: self.hot.info().await?,
            sched: self.sched.status().await?,
            loaded_at: self.loaded_at,
        })
    }
}

/// Turns one sequence's scheduler events into stream items: text in whole characters,
/// stop strings applied, the final summary.
struct StreamTask {
    /// The request's span: usage and the finish reason are recorded on it at the end.
    span: tracing::Span,
    tokenizer: Arc<Tokenizer>,
    stop: Vec<String>,
    sparsity: SparsityStats,
    prompt_tokens: usize,
}

impl StreamTask {
    async fn run(
        self,
        mut events: mpsc::Receiver<SeqEvent>,
        out: mpsc::Sender<Result<StreamItem, EngineError>>,
    ) {
        let tok = &self.tokenizer;
        let mut stream = TextStream::new(self.stop.clone());
        let started = Instant::now();
        let mut queue = std::time::Duration::ZERO;
        let mut first_token: Option<Instant> = None;
        let mut completion = 0usize;
        while let Some(ev) = events.recv().await {
            let item = match ev {
                SeqEvent::Admitted(q) => {
                    queue = q;
                    continue;
                }
                SeqEvent::Token(s) => {
                    first_token.get_or_insert_with(Instant::now);
                    completion += 1;
                    let (text, hit) = stream.push(tok, s.token);
                    let top = s
                        .top
                        .iter()
                        .map(|&(t, lp)| {
                            (
                                t,
                                String::from_utf8_lossy(tok.token_bytes(t, true)).into_owned(),
                                lp,
                            )
                        })
                        .collect();
                    let event = StreamItem::Token(TokenEvent {
                        id: s.token,
                        text,
                        logprob: s.logprob,
                        top_logprobs: top,
                    });
                    if out.send(Ok(event)).await.is_err() {
                        return; // the client has gone; dropping `events` cancels the sequence
                    }
                    if !hit {
                        continue;
                    }
                    let now = Instant::now();
                    let first = first_token.unwrap_or(now);
                    StreamItem::Final(FinalEvent {
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens: completion,
                        timings: Timings {
                            queue,
                            prefill: first
                                .saturating_duration_since(started)
                                .saturating_sub(queue),
                            decode: now - first,
                        },
                        sparsity: self.sparsity.clone(),
                        finish: FinishReason::StopSequence,
                        text: String::new(),
                    })
                }
                SeqEvent::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                    timings,
                    active_fraction_per_layer,
                    hot_share,
                } => StreamItem::Final(FinalEvent {
                    prompt_tokens,
                    completion_tokens,
                    timings,
                    sparsity: SparsityStats {
                        active_fraction_per_layer,
                        hot_share,
                        cold_share: 1.0 - hot_share,
                        ..self.sparsity.clone()
                    },
                    finish,
                    text: stream.finish(),
                }),
                SeqEvent::Failed(reason) => {
                    let _ = out.send(Err(EngineError::Internal(reason))).await;
                    return;
                }
            };
            if let StreamItem::Final(f) = &item {
                self.span
                    .record("gen_ai.usage.input_tokens", f.prompt_tokens);
                self.span
                    .record("gen_ai.usage.output_tokens", f.completion_tokens);
                self.span
                    .record("gen_ai.response.finish_reasons", f.finish.name());
            }
            let _ = out.send(Ok(item)).await;
            return;
        }
        let _ = out.send(Err(EngineError::Stopped)).await;
    }
}
