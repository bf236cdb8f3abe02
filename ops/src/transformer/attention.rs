//! The attention block of a llama-family layer for a batch of tokens, and the FFN input
//! norm after it: the CPU reference of the device trait's attention op, run by the host
//! for the layers it computes and by the simulated device for the layers placed on it.

use crate::kv::{KvHead, LayerKv};
use crate::nn::{self, Rope};
use crate::pool::{SharedMut, ThreadPool};
use crate::profile::{Profile, Stage};
use crate::quant::Numerics;
use crate::tensor::{Activations, Matrix};

use super::StepToken;

/// The attention dimensions of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
}

impl AttentionShape {
    /// Query width: `n_head · head_dim`.
    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Key (and value) width: `n_head_kv · head_dim`.
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Query heads per KV head.
    pub fn gqa_ratio(&self) -> usize {
        self.n_head / self.n_head_kv.max(1)
    }
}

/// One layer's attention weights, borrowed from whoever holds them.
#[derive(Clone, Copy)]
pub struct AttentionBlock<'a> {
    pub shape: AttentionShape,
    pub rope: &'a Rope,
    /// `[n_embd]`
    pub attn_norm: &'a [f32],
    /// `[n_embd] → [n_head · head_dim]`
    pub wq: &'a Matrix,
    /// `[n_embd] → [n_head_kv · head_dim]`
    pub wk: &'a Matrix,
    pub wv: &'a Matrix,
    /// `[n_head · head_dim] → [n_embd]`
    pub wo: &'a Matrix,
    /// `[n_embd]`: the norm of the FFN input that follows.
    pub ffn_norm: &'a [f32],
}

/// Buffers of the attention block, grown to the largest batch seen.
pub struct AttentionScratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    acts: Activations,
    /// Per pool thread, attention scores over the context.
    scores: Vec<Vec<f32>>,
}

impl AttentionScratch {
    pub fn new(numerics: Numerics) -> Self {
        Self {
            xn: Vec::new(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            att: Vec::new(),
            proj: Vec::new(),
            acts: Activations::with_numerics(numerics),
            scores: Vec::new(),
        }
    }
}

/// `v` at length `n`, its old values kept (the callers' outputs overwrite every element:
/// zeroing megabytes per layer of a prompt's batch would cost more than some products).
pub(crate) fn sized(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// `out[t] = rms_norm(x[t]) · weight` for every row of `x`.
pub fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let e = weight.len();
    for (xr, or) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        nn::rms_norm(xr, weight, eps, or);
    }
}

impl AttentionBlock<'_> {
    /// For every token `t` of the batch: `x[t] += wo · attend(rope(wq · n), K, V)` with
    /// `n = attn_norm(x[t])`, after writing the token's rotated key and value at its
    /// position in its slot of `kv` (it attends to positions `0..=pos` of its slot); then
    /// `xn[t] = ffn_norm(x[t])`. `cos_sin` holds `n_rot / 2` angle pairs per token.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        pool: &ThreadPool,
        tokens: &[StepToken],
        cos_sin: &[[f32; 2]],
        kv: &mut LayerKv,
        x: &mut [f32],
        xn: &mut [f32],
        s: &mut AttentionScratch,
        profile: &mut Profile,
    ) {
        let sh = self.shape;
        let n = tokens.len();
        assert_eq!(x.len(), n * sh.n_embd);
        assert_eq!(xn.len(), n * sh.n_embd);
        assert!(kv.shape().n_head_kv == sh.n_head_kv && kv.shape().head_dim == sh.head_dim);
        let n_ctx = kv.shape().n_ctx;
        sized(&mut s.xn, n * sh.n_embd);
        sized(&mut s.q, n * sh.n_embd_q());
        sized(&mut s.k, n * sh.n_embd_kv());
        sized(&mut s.v, n * sh.n_embd_kv());
        sized(&mut s.att, n * sh.n_embd_q());
        sized(&mut s.proj, n * sh.n_embd);
        s.scores.resize_with(pool.n_threads(), Vec::new);
        for sc in &mut s.scores {
            sc.resize(n_ctx, 0.0);
        }

        rms_norm_rows(x, self.attn_norm, sh.rms_eps, &mut s.xn); // [n][n_embd]
        profile.mark(Stage::Norm);
        s.acts.set(&s.xn, n);
        self.wq.matmul(pool, &mut s.acts, &mut s.q); // [n][n_head · head_dim]
        self.wk.matmul(pool, &mut s.acts, &mut s.k); // [n][n_head_kv · head_dim]
        self.wv.matmul(pool, &mut s.acts, &mut s.v); // [n][n_head_kv · head_dim]
        profile.mark(Stage::QkvProj);
        let half = self.rope.n_rot() / 2;
        let (wq, wkv) = (sh.n_embd_q(), sh.n_embd_kv());
        for (t, tok) in tokens.iter().enumerate() {
            let cs = &cos_sin[t * half..(t + 1) * half];
            self.rope
                .apply(&mut s.q[t * wq..(t + 1) * wq], sh.head_dim, cs);
            self.rope
                .apply(&mut s.k[t * wkv..(t + 1) * wkv], sh.head_dim, cs);
            kv.write(
                tok.slot,
                tok.pos,
                &s.k[t * wkv..(t + 1) * wkv],
                &s.v[t * wkv..(t + 1) * wkv],
            );
        }
        profile.mark(Stage::RopeKv);
        attend_batch(pool, sh, tokens, kv, &s.q, &mut s.scores, &mut s.att); // [n][n_head · head_dim]
        profile.mark(Stage::Attention);
        s.acts.set(&s.att, n);
        self.wo.matmul(pool, &mut s.acts, &mut s.proj); // [n][n_embd]
        profile.mark(Stage::OutProj);
        nn::add(x, &s.proj);
        profile.mark(Stage::Residual);
        rms_norm_rows(x, self.ffn_norm, sh.rms_eps, xn); // [n][n_embd]
        profile.mark(Stage::Norm);
    }
}

/// Every (token, query head) pair attends over its sequence's positions `0..=pos`.
fn attend_batch(
    pool: &ThreadPool,
    sh: AttentionShape,
    tokens: &[StepToken],
    kv: &LayerKv,
    q: &[f32],
    scores: &mut [Vec<f32>],
    att: &mut [f32],
) {
    let hd = sh.head_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_ctx = kv.shape().n_ctx;
    let out = SharedMut::new(att);
    let scores: Vec<SharedMut<'_, f32>> = scores.iter_mut().map(|v| SharedMut::new(v)).collect();
    pool.for_each_chunk_on(tokens.len() * sh.n_head, 1, |thread, items| {
        // SAFETY: each thread index is used by one thread at a time.
        let sc = unsafe { scores[thread].slice(0..n_ctx) };
        for item in items {
            let (t, h) = (item / sh.n_head, item % sh.n_head);
            let tok = &tokens[t];
            let qh = &q[item * hd..(item + 1) * hd];
            // SAFETY: (token, head) items are disjoint head_dim ranges of `att`.
            let o = unsafe { out.slice(item * hd..(item + 1) * hd) };
            match kv.head(tok.slot, h / sh.gqa_ratio(), tok.pos + 1) {
                KvHead::F16 { k, v } => nn::attend(qh, k, v, scale, sc, o),
                KvHead::F32 { k, v } => nn::attend(qh, k, v, scale, sc, o),
            }
        }
    });
}
