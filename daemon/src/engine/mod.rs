//! The engine of one loaded model: the per-token dataflow of DESIGN.md §3 as actors.
//!
//! ```text
//! request ─▶ tokenizer ─▶ scheduler ──batch──▶ cold executor ──run of device layers──▶ hot executor ─▶ device
//!            (pi-text)    (pi-sched) ◀─logits─ (pi-cold: host     ◀─FFN input / partial─ (pi-hot)
//!                         samples and          layers, cold           per split layer      │
//!                         detokenizes          halves)  ◀── cold prediction ── predictor ◀─┘ residual
//!                                                                              (pi-pred)      stream
//! ```
//!
//! The tokenizer, the scheduler, the executors and the predictor run on named threads
//! with bounded mailboxes, replies travelling on channels carried in the messages. Each
//! sequence's sampler and text stream live in the scheduler, which samples and
//! detokenizes inline after every step and streams straight to the request's channel (no
//! hand-off to a sampler thread and back, nor to a stream task). Without a device the
//! cold executor runs every layer inside one message per step; with one, the per-layer
//! messages of `step` pass between the executors only for layers split between the two
//! sides. Buffers (batch, logits, FFN inputs, partial sums, masks) move between stages
//! instead of being copied. The scheduler publishes its statistics after every step, so
//! status reads never wait for a step. An actor that panics, or a device that fails,
//! marks the engine's [`Health`]: the model serves nothing more until it is loaded again.
//! Dropping the `Engine` drops the handles, and each actor stops after its current step.

mod activity;
mod cold;
mod hot;
mod predictor;
mod scheduler;
mod step;
mod text;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_stream::wrappers::ReceiverStream;

pub use activity::ActivityReport;
pub use hot::HotInfo;
pub use scheduler::SchedStatus;
pub use step::Health;
pub use types::*;

use self::cold::ColdHandle;
use self::hot::HotHandle;
use self::scheduler::{SchedConfig, SchedHandle, SeqRequest, StatsBoard};
use self::text::TextHandle;
use crate::generation::LoadedModel;
use crate::ids::TokenId;
use crate::model::placement::DeviceSizing;
use crate::model::{LoadOptions, Model};
use crate::tokenizer::Tokenizer;
use powerinfer_ops::pool::ThreadPool;

/// Largest `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string, in bytes (a stop string is matched against the text's tail
/// after every token).
pub const MAX_STOP_BYTES: usize = 256;

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
    /// Host memory the model takes: its file and its KV cache
    /// ([`crate::model::resident_bytes`]).
    pub memory_bytes: u64,
    pub options: EngineOptions,
    /// Share of the FFN neurons placed on the device.
    pub hot_share: f32,
    /// The same, per layer.
    pub layer_hot_share: Vec<f32>,
    pub hot: HotInfo,
    pub sched: SchedStatus,
    pub loaded_at: SystemTime,
    /// Why the model stopped serving, if it did (see [`Health`]).
    pub failure: Option<String>,
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
    health: Arc<Health>,
    /// What the scheduler publishes: its status and the neuron activity.
    stats: StatsBoard,
}

impl Engine {
    /// Loads `path` and starts its actors (blocking: call from a blocking context).
    pub fn load(name: &str, path: &Path, opts: EngineOptions) -> Result<Self, EngineError> {
        let device = crate::device::open(&opts.device, opts.vram_budget)?;
        Self::load_on(name, path, opts, device)
    }

    /// [`Self::load`] on a device already opened (`None`: all on the host), named
    /// `opts.device` in reports.
    pub fn load_on(
        name: &str,
        path: &Path,
        opts: EngineOptions,
        device: Option<Box<dyn powerinfer_ops::device::Device>>,
    ) -> Result<Self, EngineError> {
        let mut opts = opts;
        opts.max_sequences = opts.max_sequences.max(1);
        opts.threads = opts.threads.max(1);
        let load = LoadOptions {
            sparsity: opts.sparsity,
            device: opts.device.clone(),
            vram_budget: opts.vram_budget,
            tuning: opts.tuning,
            sizing: DeviceSizing {
                n_ctx: opts.n_ctx.max(1),
                n_seq: opts.max_sequences,
                kv_type: opts.kv_type,
                numerics: opts.numerics,
            },
            ..LoadOptions::default()
        };
        let loaded = crate::model::open_on(path, &load, None)?;
        let n_ctx_train = loaded.model.config.n_ctx_train;
        if opts.n_ctx == 0 || opts.n_ctx > n_ctx_train.max(1) {
            return Err(EngineError::InvalidArgument(format!(
                "context size {} is outside 1..={n_ctx_train} (the model's)",
                opts.n_ctx
            )));
        }
        opts.max_prompt_tokens = opts.max_prompt_tokens.min(opts.n_ctx - 1);
        let mut loaded = loaded;
        if let Some(dev) = device {
            loaded.place_on(path, &load, dev)?;
        }
        Self::start(name, path, opts, loaded)
    }

    /// Starts the actors of a model loaded (and placed, when it has a device) by the
    /// caller, with `opts`' limits; its device's KV caches must hold `opts.n_ctx`
    /// positions for `opts.max_sequences` sequences.
    pub fn start(
        name: &str,
        path: &Path,
        opts: EngineOptions,
        loaded: LoadedModel,
    ) -> Result<Self, EngineError> {
        let mut opts = opts;
        opts.max_sequences = opts.max_sequences.max(1);
        opts.threads = opts.threads.max(1);
        opts.max_prompt_tokens = opts.max_prompt_tokens.min(opts.n_ctx.saturating_sub(1));
        if let Some(d) = &loaded.device {
            let z = d.sizing;
            if z.n_ctx < opts.n_ctx
                || z.n_seq < opts.max_sequences
                || z.kv_type != opts.kv_type
                || z.numerics != opts.numerics
            {
                return Err(EngineError::InvalidArgument(format!(
                    "the device holds caches of {} positions for {} sequences ({:?}, {:?} \
                     numerics); the engine needs {} for {} ({:?}, {:?})",
                    z.n_ctx,
                    z.n_seq,
                    z.kv_type,
                    z.numerics,
                    opts.n_ctx,
                    opts.max_sequences,
                    opts.kv_type,
                    opts.numerics
                )));
            }
        }
        let LoadedModel {
            model,
            tokenizer,
            device,
        } = loaded;
        let (model, tokenizer) = (Arc::new(model), Arc::new(tokenizer));
        let health = Arc::new(Health::default());
        let pool = Arc::new(
            ThreadPool::new(opts.threads, "pi-cpu")
                .map_err(|e| EngineError::Internal(format!("thread pool: {e}")))?,
        );
        let (hot, links) = match device {
            Some(d) => {
                let with_predictor = model.sparsity.predictors.is_some();
                let (hot_links, cold_links, pred_links) = hot::links(with_predictor);
                if let Some(p) = pred_links {
                    predictor::spawn(
                        model.clone(),
                        pool.clone(),
                        p,
                        opts.numerics,
                        health.clone(),
                    )?;
                }
                let hot =
                    HotHandle::spawn(model.clone(), d.into_device(), hot_links, health.clone())?;
                (hot, Some(cold_links))
            }
            None => (HotHandle::none(), None),
        };
        let cold = ColdHandle::spawn(model.clone(), pool, &opts, links, health.clone())?;
        let c = &model.config;
        let config = SchedConfig {
            n_ctx: opts.n_ctx,
            max_sequences: opts.max_sequences,
            max_queue: opts.max_queue,
            prefill_chunk: opts.prefill_chunk,
            n_vocab: c.n_vocab,
            n_layer: c.n_layer,
            n_ff: c.n_ff,
        };
        let stats = StatsBoard::new(c.n_layer, c.n_ff);
        let sched = SchedHandle::spawn(config, tokenizer.clone(), cold, stats.clone())?;
        let text = TextHandle::spawn(tokenizer.clone())?;
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
            health,
            stats,
        })
    }

    /// Host memory the model takes ([`crate::model::resident_bytes`]).
    pub fn memory_bytes(&self) -> u64 {
        crate::model::resident_bytes(
            self.file_size,
            &self.model.config,
            self.opts.n_ctx,
            self.opts.max_sequences,
            self.opts.kv_type,
        )
    }

    /// Whether the engine's actors are well (see [`Health`]).
    pub fn health(&self) -> &Health {
        &self.health
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
        if let Some(f) = self.health.failure() {
            return Err(EngineError::Failed(f));
        }
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
        if spec.stop.len() > MAX_STOP_STRINGS {
            return Err(EngineError::InvalidArgument(format!(
                "at most {MAX_STOP_STRINGS} stop strings, not {}",
                spec.stop.len()
            )));
        }
        if let Some(s) = spec.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(EngineError::InvalidArgument(format!(
                "a stop string is {} bytes; the limit is {MAX_STOP_BYTES}",
                s.len()
            )));
        }
        if let Some(n) = spec.max_tokens.filter(|&n| n > self.opts.n_ctx) {
            return Err(EngineError::InvalidArgument(format!(
                "max_tokens {n} is more than the context size {} (the limit)",
                self.opts.n_ctx
            )));
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
        let mut sampling = spec.sampling;
        sampling.n_logprobs = spec.top_logprobs;
        let events = self
            .sched
            .submit(SeqRequest {
                prompt,
                max_tokens,
                sampling,
                stop: spec.stop,
                sparsity,
                submitted: Instant::now(),
                span: tracing::Span::current(),
            })
            .await?;
        Ok(ReceiverStream::new(events))
    }

    fn check_prompt(&self, prompt: &[TokenId]) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidArgument("the prompt is empty".into()));
        }
        if prompt.len() > self.opts.max_prompt_tokens {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.opts.max_prompt_tokens,
                n_ctx: self.opts.n_ctx,
            });
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
    /// were hot, as of the last step; `Stopped` once the scheduler has ended.
    pub fn activity(&self) -> Result<ActivityReport, EngineError> {
        self.stats.activity()
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
            memory_bytes: self.memory_bytes(),
            options: self.opts.clone(),
            hot_share: self.model.hot_share(),
            layer_hot_share: self
                .model
                .partition
                .hot()
                .map(|h| h as f32 / c.n_ff.max(1) as f32)
                .collect(),
            hot: self.hot.info(),
            sched: self.stats.status()?,
            loaded_at: self.loaded_at,
            failure: self.health.failure(),
        })
    }
}
