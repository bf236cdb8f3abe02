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

/// What a layer may add to the llama attention block (Gemma 3's, Qwen 2's and Qwen 3's);
/// the default adds nothing. The device ops implement the llama block only: models whose layers set any
/// of this run on the host.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionExtras<'a> {
    /// `[n_head · head_dim]`: added to every query projection (Qwen 2).
    pub q_bias: Option<&'a [f32]>,
    /// `[n_head_kv · head_dim]`: added to every key projection.
    pub k_bias: Option<&'a [f32]>,
    /// `[n_head_kv · head_dim]`: added to every value projection.
    pub v_bias: Option<&'a [f32]>,
    /// `[head_dim]`: RMS norm of every query head, before RoPE.
    pub q_norm: Option<&'a [f32]>,
    /// `[head_dim]`: RMS norm of every key head, before RoPE.
    pub k_norm: Option<&'a [f32]>,
    /// `[n_embd]`: RMS norm of the attention output, before the residual add.
    pub post_norm: Option<&'a [f32]>,
    /// Attend to the last `window` positions (the token's own included) only.
    pub window: Option<usize>,
    /// What q·k is multiplied by; `None`: `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Scores become `cap · tanh(score / cap)` (after the scale).
    pub softcap: Option<f32>,
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
    pub extras: AttentionExtras<'a>,
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

/// [`rms_norm_rows`] in place: every `weight.len()` values of `x` normed.
pub fn rms_norm_rows_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let e = weight.len();
    for row in x.chunks_exact_mut(e) {
        nn::rms_norm_in_place(row, weight, eps);
    }
}

/// `x[t] += bias` for every row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        nn::add(row, bias);
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
        for (proj, bias) in [
            (&mut s.q, self.extras.q_bias),
            (&mut s.k, self.extras.k_bias),
            (&mut s.v, self.extras.v_bias),
        ] {
            if let Some(b) = bias {
                add_rows(proj, b); // [n][width]
            }
        }
        profile.mark(Stage::QkvProj);
        if let Some(w) = self.extras.q_norm {
            rms_norm_rows_in_place(&mut s.q, w, sh.rms_eps); // per head
        }
        if let Some(w) = self.extras.k_norm {
            rms_norm_rows_in_place(&mut s.k, w, sh.rms_eps); // per head
        }
        profile.mark(Stage::Norm);
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
        let how = Attend::new(sh, &self.extras);
        attend_batch(pool, sh, how, tokens, kv, &s.q, &mut s.scores, &mut s.att); // [n][n_head · head_dim]
        profile.mark(Stage::Attention);
        s.acts.set(&s.att, n);
        self.wo.matmul(pool, &mut s.acts, &mut s.proj); // [n][n_embd]
        profile.mark(Stage::OutProj);
        if let Some(w) = self.extras.post_norm {
            rms_norm_rows_in_place(&mut s.proj, w, sh.rms_eps); // [n][n_embd]
            profile.mark(Stage::Norm);
        }
        nn::add(x, &s.proj);
        profile.mark(Stage::Residual);
        rms_norm_rows(x, self.ffn_norm, sh.rms_eps, xn); // [n][n_embd]
        profile.mark(Stage::Norm);
    }
}

/// How a layer's queries attend.
#[derive(Clone, Copy)]
struct Attend {
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
}

impl Attend {
    fn new(sh: AttentionShape, extras: &AttentionExtras<'_>) -> Self {
        Self {
            scale: extras
                .scale
                .unwrap_or_else(|| 1.0 / (sh.head_dim as f32).sqrt()),
            softcap: extras.softcap,
            window: extras.window,
        }
    }

    /// The positions a token at `pos` attends to.
    fn positions(&self, pos: usize) -> std::ops::Range<usize> {
        let first = match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        first..pos + 1
    }
}

/// Every (token, query head) pair attends over its sequence's positions `0..=pos` (the
/// last `window` of them on a local layer).
#[allow(clippy::too_many_arguments)]
fn attend_batch(
    pool: &ThreadPool,
    sh: AttentionShape,
    how: Attend,
    tokens: &[StepToken],
    kv: &LayerKv,
    q: &[f32],
    scores: &mut [Vec<f32>],
    att: &mut [f32],
) {
    let hd = sh.head_dim;
    let (scale, cap) = (how.scale, how.softcap);
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
            match kv.head_range(tok.slot, h / sh.gqa_ratio(), how.positions(tok.pos)) {
                KvHead::F16 { k, v } => nn::attend_capped(qh, k, v, scale, cap, sc, o),
                KvHead::F32 { k, v } => nn::attend_capped(qh, k, v, scale, cap, sc, o),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SeqSlot;
    use crate::kv::{KvShape, KvType};
    use crate::nn::RopeStyle;
    use crate::quant::WeightType;
    use crate::rng::Rng;
    use crate::transformer::SparsityMode;

    const N_EMBD: usize = 32;
    const HEAD_DIM: usize = 16;

    struct Layer {
        norms: [Vec<f32>; 5],
        w: [Matrix; 4],
    }

    fn layer(rng: &mut Rng) -> Layer {
        let mut norm = |n| (0..n).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<f32>>();
        let norms = [
            norm(N_EMBD),
            norm(N_EMBD),
            norm(HEAD_DIM),
            norm(HEAD_DIM),
            norm(N_EMBD),
        ];
        let mut m = |r, c| {
            let v: Vec<f32> = (0..r * c).map(|_| rng.normal() * 0.3).collect();
            Matrix::quantize(WeightType::F32, &v, r, c)
        };
        let w = [m(32, N_EMBD), m(16, N_EMBD), m(16, N_EMBD), m(N_EMBD, 32)];
        Layer { norms, w }
    }

    fn shape() -> AttentionShape {
        AttentionShape {
            n_embd: N_EMBD,
            n_head: 2,
            n_head_kv: 1,
            head_dim: HEAD_DIM,
            rms_eps: 1e-6,
        }
    }

    /// Runs `x` (one row per token, at positions `0..n`) through the block in one batch;
    /// returns the updated residual stream.
    fn run(l: &Layer, extras: AttentionExtras<'_>, x: &[f32]) -> Vec<f32> {
        let n = x.len() / N_EMBD;
        let rope = Rope::new(HEAD_DIM, 10000.0, 1.0, RopeStyle::Neox, None);
        let block = AttentionBlock {
            shape: shape(),
            rope: &rope,
            attn_norm: &l.norms[0],
            wq: &l.w[0],
            wk: &l.w[1],
            wv: &l.w[2],
            wo: &l.w[3],
            ffn_norm: &l.norms[1],
            extras,
        };
        let tokens: Vec<StepToken> = (0..n)
            .map(|p| StepToken::new(p, SeqSlot(0), SparsityMode::Dense))
            .collect();
        let mut cos_sin = vec![[0.0; 2]; n * HEAD_DIM / 2];
        for (p, cs) in cos_sin.chunks_exact_mut(HEAD_DIM / 2).enumerate() {
            rope.cos_sin(p, cs);
        }
        let mut kv = LayerKv::try_new(KvShape {
            n_slots: 1,
            n_ctx: n,
            n_head_kv: 1,
            head_dim: HEAD_DIM,
            ty: KvType::F32,
        })
        .unwrap();
        let pool = ThreadPool::new(2, "t").unwrap();
        let (mut x, mut xn) = (x.to_vec(), vec![0.0; x.len()]);
        let mut s = AttentionScratch::new(Numerics::Precise);
        block.run(
            &pool,
            &tokens,
            &cos_sin,
            &mut kv,
            &mut x,
            &mut xn,
            &mut s,
            &mut Profile::default(),
        );
        x
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
    }

    #[test]
    fn a_window_drops_the_positions_before_it_and_a_wide_one_changes_nothing() {
        let mut rng = Rng::new(21);
        let l = layer(&mut rng);
        let n = 6;
        let x: Vec<f32> = (0..n * N_EMBD).map(|_| rng.normal()).collect();
        let full = run(&l, AttentionExtras::default(), &x);
        let wide = AttentionExtras {
            window: Some(n),
            ..AttentionExtras::default()
        };
        assert_eq!(run(&l, wide, &x), full, "a window over every position");
        // Window 3: the token at position 5 attends to positions 3, 4, 5 only, which is what
        // it computes with those three tokens alone, shifted to positions 0..3 (RoPE is
        // relative: q·k depends on the distance only).
        let narrow = AttentionExtras {
            window: Some(3),
            ..AttentionExtras::default()
        };
        let windowed = run(&l, narrow, &x);
        let alone = run(&l, AttentionExtras::default(), &x[3 * N_EMBD..]);
        let last = (n - 1) * N_EMBD..n * N_EMBD;
        assert!(close(&windowed[last.clone()], &alone[2 * N_EMBD..]));
        assert!(
            !close(&windowed[last.clone()], &full[last]),
            "the window matters"
        );
        // The first three tokens see no more than three positions either way.
        assert_eq!(windowed[..3 * N_EMBD], full[..3 * N_EMBD]);
    }

    #[test]
    fn q_k_and_post_norms_are_per_head_and_on_the_output() {
        let mut rng = Rng::new(22);
        let l = layer(&mut rng);
        let n = 4;
        let x: Vec<f32> = (0..n * N_EMBD).map(|_| rng.normal()).collect();
        let normed = AttentionExtras {
            q_norm: Some(&l.norms[2]),
            k_norm: Some(&l.norms[3]),
            post_norm: Some(&l.norms[4]),
            ..AttentionExtras::default()
        };
        let got = run(&l, normed, &x);
        // The post-norm: what is added to the residual stream is normed, so its RMS
        // weighted by the norm's weights is exactly 1.
        for (t, (g, x0)) in got
            .chunks_exact(N_EMBD)
            .zip(x.chunks_exact(N_EMBD))
            .enumerate()
        {
            let added: Vec<f64> = g
                .iter()
                .zip(x0)
                .zip(&l.norms[4])
                .map(|((a, b), w)| f64::from(a - b) / f64::from(*w))
                .collect();
            let rms = (added.iter().map(|v| v * v).sum::<f64>() / N_EMBD as f64).sqrt();
            assert!((rms - 1.0).abs() < 1e-3, "token {t}: rms {rms}");
        }
        // The q/k norms make the scores independent of the scale of q and k: doubling wq
        // and wk changes nothing (beyond rounding).
        let scaled = |m: &Matrix| {
            let mut v = vec![0.0; m.n_rows() * m.n_cols()];
            for r in 0..m.n_rows() {
                m.dequantize_row(r, &mut v[r * m.n_cols()..(r + 1) * m.n_cols()]);
            }
            v.iter_mut().for_each(|x| *x *= 2.0);
            Matrix::quantize(WeightType::F32, &v, m.n_rows(), m.n_cols())
        };
        let doubled = Layer {
            norms: l.norms.clone(),
            w: [
                scaled(&l.w[0]),
                scaled(&l.w[1]),
                l.w[2].clone(),
                l.w[3].clone(),
            ],
        };
        let normed2 = AttentionExtras {
            q_norm: Some(&doubled.norms[2]),
            k_norm: Some(&doubled.norms[3]),
            post_norm: Some(&doubled.norms[4]),
            ..AttentionExtras::default()
        };
        assert!(close(&run(&doubled, normed2, &x), &got));
        let plain = run(&doubled, AttentionExtras::default(), &x);
        assert!(!close(&plain, &run(&l, AttentionExtras::default(), &x)));
    }

    #[test]
    fn biases_shift_the_projections() {
        let mut rng = Rng::new(23);
        let l = layer(&mut rng);
        let n = 5;
        let x: Vec<f32> = (0..n * N_EMBD).map(|_| rng.normal()).collect();
        let plain = run(&l, AttentionExtras::default(), &x);
        // The softmax weights of every query sum to 1, so a value bias `b` adds `wo · b`
        // to every token's output, whatever it attends to.
        let bv: Vec<f32> = (0..HEAD_DIM).map(|_| rng.normal()).collect();
        let with_v = run(
            &l,
            AttentionExtras {
                v_bias: Some(&bv),
                ..AttentionExtras::default()
            },
            &x,
        );
        // One KV head shared by both query heads: the attention output is `b` twice.
        let att: Vec<f32> = bv.iter().chain(&bv).copied().collect();
        let mut shift = vec![0.0; N_EMBD];
        let mut acts = Activations::with_numerics(Numerics::Precise);
        acts.set(&att, 1);
        l.w[3].matmul(&ThreadPool::new(1, "t").unwrap(), &mut acts, &mut shift);
        for (t, (g, p)) in with_v
            .chunks_exact(N_EMBD)
            .zip(plain.chunks_exact(N_EMBD))
            .enumerate()
        {
            let want: Vec<f32> = p.iter().zip(&shift).map(|(a, b)| a + b).collect();
            assert!(close(g, &want), "token {t}");
        }
        // Query and key biases change the scores (and so the output of every token but the
        // first, which attends to itself alone).
        let bq: Vec<f32> = (0..2 * HEAD_DIM).map(|_| rng.normal()).collect();
        let bk: Vec<f32> = (0..HEAD_DIM).map(|_| rng.normal()).collect();
        let with_qk = run(
            &l,
            AttentionExtras {
                q_bias: Some(&bq),
                k_bias: Some(&bk),
                ..AttentionExtras::default()
            },
            &x,
        );
        assert!(close(&with_qk[..N_EMBD], &plain[..N_EMBD]));
        assert!(!close(&with_qk[N_EMBD..], &plain[N_EMBD..]));
    }
}
