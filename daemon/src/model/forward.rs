//! The forward pass on the host (the llama family, Gemma 3, Qwen 2 and 3).
//!
//! One call runs a batch of tokens through every layer: the tokens of a prompt (prefill),
//! one token of each running sequence (decode), or a mix. Each token names its sequence's
//! KV-cache slot and its position, and attends to positions `0..=pos` of that slot.
//!
//! The layer pieces are `powerinfer_ops::transformer`'s, the same functions a device's
//! reference implementation runs; the steps here ([`Model::begin`], [`Model::attention`],
//! [`Model::ffn`], [`Model::head`]) are also what the hybrid executors call for the parts
//! the host computes.

use powerinfer_ops::kv::KvCache;
use powerinfer_ops::nn;
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::profile::{Profile, Stage};
use powerinfer_ops::quant::Numerics;
use powerinfer_ops::transformer::{AttentionScratch, HeadScratch, StepToken};

use super::sparsity::SparsityMode;
use super::{ForwardError, Model};
use crate::ids::{SeqSlot, TokenId};

mod capture;
mod ffn;

pub use capture::Capture;
pub(crate) use ffn::{FfnBuffers, NeuronSide};
pub use ffn::{MASKED_MIN_ENV, MASKED_MIN_FRACTION};

/// One token of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchToken {
    pub token: TokenId,
    pub slot: SeqSlot,
    pub pos: usize,
    /// Whether this token's next-token logits are wanted.
    pub logits: bool,
    /// How this token's FFN neurons are chosen.
    pub sparsity: SparsityMode,
}

/// Buffers reused from step to step, grown to the largest batch seen.
pub struct Scratch {
    /// The residual stream, `[n_tok][n_embd]`.
    pub(crate) x: Vec<f32>,
    /// The FFN input (`ffn_norm(x)`) of the current layer, `[n_tok][n_embd]`.
    pub(crate) xn: Vec<f32>,
    /// The FFN output of the current layer, `[n_tok][n_embd]`.
    pub(crate) proj: Vec<f32>,
    pub(crate) tokens: Vec<StepToken>,
    /// RoPE angles, `n_rot / 2` per token.
    pub(crate) cos_sin: Vec<[f32; 2]>,
    /// The same for the local layers' RoPE, when the model has one.
    pub(crate) cos_sin_local: Vec<[f32; 2]>,
    /// The tokens whose logits are wanted, in batch order.
    pub(crate) rows: Vec<u32>,
    attn: AttentionScratch,
    head: HeadScratch,
    pub(crate) ffn: FfnBuffers,
    logits: Vec<f32>,
    /// Active neurons of each token of the last batch, per layer (`[n_tok][n_layer]`).
    pub active_counts: Vec<u32>,
    /// Of those, the hot ones.
    pub hot_counts: Vec<u32>,
    pub profile: Profile,
    /// What calibration records, when set.
    pub capture: Option<Capture>,
}

impl Scratch {
    /// Buffers whose activations are prepared in the given numerics.
    pub fn new(numerics: Numerics) -> Self {
        Self {
            x: Vec::new(),
            xn: Vec::new(),
            proj: Vec::new(),
            tokens: Vec::new(),
            cos_sin: Vec::new(),
            cos_sin_local: Vec::new(),
            rows: Vec::new(),
            attn: AttentionScratch::new(numerics),
            head: HeadScratch::new(numerics),
            ffn: FfnBuffers::new(numerics),
            logits: Vec::new(),
            active_counts: Vec::new(),
            hot_counts: Vec::new(),
            profile: Profile::default(),
            capture: None,
        }
    }

    /// The logits of the last [`Model::forward`].
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new(Numerics::Precise)
    }
}

/// `x = cap · tanh(x / cap)` for every element.
pub(crate) fn soft_cap(x: &mut [f32], cap: f32) {
    for v in x {
        *v = cap * (*v / cap).tanh();
    }
}

pub(crate) fn sized(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

impl Model {
    /// Runs `batch` through the model on the host, writing keys and values into `kv`, and
    /// returns the logits (`n_vocab` each) of the tokens that asked for them, in batch
    /// order.
    pub fn forward<'s>(
        &self,
        pool: &ThreadPool,
        batch: &[BatchToken],
        kv: &mut KvCache,
        s: &'s mut Scratch,
    ) -> Result<&'s [f32], ForwardError> {
        let mut logits = std::mem::take(&mut s.logits);
        let result = self.forward_into(pool, batch, kv, s, &mut logits);
        s.logits = logits;
        result.map(|()| s.logits.as_slice())
    }

    /// [`Self::forward`] writing the logits into a caller's buffer (resized as needed), so
    /// a pipeline can move one buffer between stages instead of copying.
    pub fn forward_into(
        &self,
        pool: &ThreadPool,
        batch: &[BatchToken],
        kv: &mut KvCache,
        s: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        self.begin(batch, kv.n_ctx(), kv.n_slots(), s)?;
        for layer in 0..self.config.n_layer {
            self.attention(pool, layer, kv, s)?;
            self.ffn(pool, layer, batch, s)?;
        }
        self.head(pool, s, logits);
        Ok(())
    }

    /// Starts a step: checks the batch against the model and a cache of `n_slots` slots
    /// of `n_ctx` positions, sizes the buffers, and embeds the tokens into `s.x`.
    pub(crate) fn begin(
        &self,
        batch: &[BatchToken],
        n_ctx: usize,
        n_slots: usize,
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        self.check(batch, n_ctx, n_slots)?;
        let c = &self.config;
        let (n, e) = (batch.len(), c.n_embd);
        let half = c.n_rot / 2;
        sized(&mut s.x, n * e);
        sized(&mut s.xn, n * e);
        sized(&mut s.proj, n * e);
        s.cos_sin.resize(n * half, [0.0; 2]);
        let local = self.rope_local();
        s.cos_sin_local
            .resize(if local.is_some() { n * half } else { 0 }, [0.0; 2]);
        s.active_counts.clear();
        s.active_counts.resize(n * c.n_layer, 0);
        s.hot_counts.clear();
        s.hot_counts.resize(n * c.n_layer, 0);
        s.tokens.clear();
        s.rows.clear();
        s.profile.start();
        for (t, b) in batch.iter().enumerate() {
            s.tokens.push(StepToken::new(b.pos, b.slot, b.sparsity));
            if b.logits {
                s.rows.push(t as u32);
            }
            let x = &mut s.x[t * e..(t + 1) * e];
            self.weights.token_embd.dequantize_row(b.token.index(), x);
            if c.embd_scale != 1.0 {
                nn::scale(x, c.embd_scale);
            }
            let angles = t * half..(t + 1) * half;
            self.rope().cos_sin(b.pos, &mut s.cos_sin[angles.clone()]);
            if let Some(rope) = local {
                rope.cos_sin(b.pos, &mut s.cos_sin_local[angles]);
            }
        }
        s.profile.mark(Stage::Embed);
        Ok(())
    }

    /// Layer `layer`'s attention block on the host: `s.x` updated, `s.xn` the FFN input.
    pub(crate) fn attention(
        &self,
        pool: &ThreadPool,
        layer: usize,
        kv: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        let kv = kv
            .layer_mut(layer)
            .ok_or(ForwardError::NotOnHost { layer })?;
        let cos_sin = if self.is_local(layer) {
            &s.cos_sin_local
        } else {
            &s.cos_sin
        };
        self.attention_block(layer).run(
            pool,
            &s.tokens,
            cos_sin,
            kv,
            &mut s.x,
            &mut s.xn,
            &mut s.attn,
            &mut s.profile,
        );
        Ok(())
    }

    /// The logits of the tokens that asked for them, from the residual stream `s.x`.
    pub(crate) fn head(&self, pool: &ThreadPool, s: &mut Scratch, logits: &mut Vec<f32>) {
        self.head_block()
            .run(pool, &s.x, &s.rows, &mut s.head, logits);
        if let Some(cap) = self.config.final_softcap {
            soft_cap(logits, cap);
        }
        s.profile.mark(Stage::Head);
    }

    fn check(
        &self,
        batch: &[BatchToken],
        n_ctx: usize,
        n_slots: usize,
    ) -> Result<(), ForwardError> {
        if batch.is_empty() {
            return Err(ForwardError::EmptyBatch);
        }
        for b in batch {
            if let Some(why) = self.sparsity_unavailable(b.sparsity) {
                return Err(ForwardError::Sparsity(why));
            }
            if b.token.index() >= self.config.n_vocab {
                return Err(ForwardError::TokenOutOfRange {
                    token: b.token,
                    n_vocab: self.config.n_vocab,
                });
            }
            if b.pos >= n_ctx {
                return Err(ForwardError::ContextFull { pos: b.pos, n_ctx });
            }
            if b.slot.0 >= n_slots {
                return Err(ForwardError::BadSlot {
                    slot: b.slot.0,
                    n_slots,
                });
            }
        }
        Ok(())
    }
}
