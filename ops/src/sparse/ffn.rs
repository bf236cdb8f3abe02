//! The fused neuron-sparse FFN (gate and up rows, the gated activation, the down
//! projection's rows) of [`super`].

use std::ops::Range;

use super::{ActiveSet, Fold, SparseScratch, grow};
use crate::nn::Glu;
use crate::pool::{SharedMut, ThreadPool};
use crate::simd::{self, SimdLevel};
use crate::tensor::{Activations, Matrix, RowAxpy, RowDots};

/// The fused sparse FFN: for the active neurons `i` of each token, `g = gate_i · x` (or
/// `gate_given[t][i]` when the gate was already computed in full, as gate mode does),
/// `u = up_i · x`, `h = glu(g, u)`, and `out[t] = Σ h · down_t[i]`; one pass over the
/// neurons and the same bits as [`super::rows_sparse`] + [`Glu::apply_slice`] +
/// [`super::axpy_sparse`].
#[derive(Clone, Copy)]
pub struct SparseFfn<'a> {
    /// `[n_embd] → [n_ff]`, row per neuron.
    pub gate: &'a Matrix,
    pub up: &'a Matrix,
    /// `[n_ff]` rows of `[n_embd]`: neuron `i`'s contribution.
    pub down_t: &'a Matrix,
    pub glu: Glu,
    /// Gate values already computed for every token and neuron (`[n_tok × n_ff]`), used
    /// instead of the gate rows.
    pub gate_given: Option<&'a [f32]>,
    /// The kernels' instruction set.
    pub level: SimdLevel,
}

impl<'a> SparseFfn<'a> {
    /// The FFN of these matrices with the detected kernels, computing its own gates.
    pub fn new(gate: &'a Matrix, up: &'a Matrix, down_t: &'a Matrix, glu: Glu) -> Self {
        Self {
            gate,
            up,
            down_t,
            glu,
            gate_given: None,
            level: simd::detected(),
        }
    }

    /// `out` (`n_tok × n_embd`) for the batch `x` and its tokens' active neurons.
    pub fn run(
        &self,
        pool: &ThreadPool,
        x: &mut Activations,
        active: &ActiveSet,
        scratch: &mut SparseScratch,
        out: &mut [f32],
    ) {
        let (gate, up, down_t) = (self.gate, self.up, self.down_t);
        let (n_ff, n_tok, n_embd) = (gate.n_rows(), x.n_tok(), down_t.n_cols());
        assert!(
            up.n_rows() == n_ff && down_t.n_rows() == n_ff && up.n_cols() == gate.n_cols(),
            "gate, up and down_t must have one row per neuron"
        );
        assert_eq!(active.n_rows(), n_ff, "active set is for another FFN");
        assert_eq!(active.n_tok(), n_tok, "one active list per token");
        assert_eq!(out.len(), n_tok * n_embd);
        if let Some(g) = self.gate_given {
            assert_eq!(g.len(), n_tok * n_ff);
        } else {
            x.prepare_for(gate.wtype());
        }
        x.prepare_for(up.wtype());
        scratch.plan(active);
        ffn_by_columns(self, pool, x, active, scratch, out);
    }
}

/// Active (token, neuron) pairs a thread takes at least at a time in the first phase of
/// [`ffn_by_columns`]; more when there are many (a share of the pairs per thread, so
/// each thread reads long runs of rows, which stream from memory best).
const DOT_CHUNK: usize = 16;
/// Work items per thread the first phase aims for.
const DOT_CHUNKS_PER_THREAD: usize = 8;

/// Above this many bytes of active `down_t` rows per token, and with more than
/// [`COLUMN_SPLIT_MAX_DENSITY`] of the rows active, a batch of fewer tokens than threads
/// splits its down projection by neuron ranges instead of by columns: parts of mostly
/// consecutive rows of a large matrix stream from memory slower than whole rows (at the
/// 7B shape and two threads, 2.1x the dense FFN's time at 100% active by columns, 1.3x
/// by ranges), while scattered or cache-resident rows split best by columns (10%
/// active: 0.16x by columns, 0.19x by ranges).
pub(super) const COLUMN_SPLIT_MAX_BYTES: usize = 1 << 20;
const COLUMN_SPLIT_MAX_DENSITY: f64 = 0.25;

/// The fused FFN without a hot split, in two phases of one pool job:
/// 1. `h` of every active pair (gate and up rows, the gated activation), handed out in
///    chunks of [`DOT_CHUNK`] pairs: a row's dot product has the same bits in any chunk.
/// 2. Per token and block of output columns: each item's (neuron range's) partial sum
///    `Σ h · down_t[i]` over those columns, from 0 in neuron order, added into the output
///    in item order. Columns are independent, so every output value has the bits of the
///    item partials and their fold in item order, for any split of the columns, which
///    is therefore chosen per call for balance: whole rows when there are tokens enough,
///    else one block per thread.
///
/// A few tokens over a large `down_t` ([`COLUMN_SPLIT_MAX_BYTES`]) instead take the
/// items' whole-row partial sums in phase 2 and fold them in a second job.
fn ffn_by_columns(
    ffn: &SparseFfn<'_>,
    pool: &ThreadPool,
    x: &Activations,
    active: &ActiveSet,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) {
    let SparseFfn {
        gate,
        up,
        down_t,
        glu,
        gate_given,
        level,
    } = *ffn;
    let (n_ff, n_embd, n_tok) = (gate.n_rows(), down_t.n_cols(), active.n_tok());
    let n_act = active.n_active();
    let SparseScratch {
        items,
        token_items,
        h,
        up: u,
        cols: col_buf,
        partials,
        ..
    } = scratch;
    let (h, u) = (
        SharedMut::new(grow(h, n_act)),
        SharedMut::new(grow(u, n_act)),
    );
    let n_threads = pool.n_threads();
    let per_tok = n_threads.div_ceil(n_tok.max(1)).min(n_embd.max(1));
    let row_bytes = down_t.n_bytes() / n_ff.max(1);
    let by_items = per_tok > 1
        && n_act / n_tok.max(1) * row_bytes > COLUMN_SPLIT_MAX_BYTES
        && active.fraction() > COLUMN_SPLIT_MAX_DENSITY;
    let n_partials = if by_items { items.len() * n_embd } else { 0 };
    let partials = SharedMut::new(grow(partials, n_partials));
    let fold = Fold::new(token_items, &partials, n_embd);
    let dot_chunk = (n_act / (n_threads * DOT_CHUNKS_PER_THREAD))
        .next_multiple_of(4)
        .max(DOT_CHUNK);
    let out = SharedMut::new(out);
    // Room per thread for a block of columns rounded up to whole weight blocks (at most
    // 256 values, the k-quants' super-blocks).
    let stride = n_embd.div_ceil(per_tok) + 256;
    let bufs = SharedMut::new(grow(col_buf, n_threads * stride));
    let body = |gate_src: GateSource<'_>, up_dots: &dyn RowDots, axpy: &dyn RowAxpy| {
        let block = axpy.block_len();
        let unit = n_embd.div_ceil(per_tok).div_ceil(block) * block;
        assert!(unit <= stride);
        let first = |range: Range<usize>| {
            // The token of the range's first pair, then token by token.
            let mut t = active.start.partition_point(|&s| s <= range.start) - 1;
            let mut k = range.start;
            while k < range.end {
                let end = range.end.min(active.start[t + 1]);
                let rows = &active.idx[k..end];
                // SAFETY: pairs k..end belong to this range alone.
                let (hk, uk) = unsafe { (h.slice(k..end), u.slice(k..end)) };
                neuron_values(gate_src, up_dots, glu, n_ff, t, rows, hk, uk);
                k = end;
                t += 1;
            }
        };
        let second = |thread: usize, range: Range<usize>| {
            // SAFETY: the first phase is over; nothing writes `h` any more.
            let h = unsafe { h.read(0..n_act) };
            // SAFETY: one buffer per thread.
            let buf = unsafe { bufs.slice(thread * stride..thread * stride + unit) };
            for w in range {
                let (t, c) = (w / per_tok, w % per_tok);
                let cols = (c * unit).min(n_embd)..((c + 1) * unit).min(n_embd);
                if cols.is_empty() {
                    continue;
                }
                // SAFETY: (token, column block) units are disjoint output ranges.
                let o = unsafe { out.slice(t * n_embd + cols.start..t * n_embd + cols.end) };
                o.fill(0.0);
                let p = &mut buf[..cols.len()];
                for it in &items[token_items[t].clone()] {
                    let (lo, hi) = (it.lo as usize, it.hi as usize);
                    p.fill(0.0);
                    axpy.axpy_rows_cols(&active.idx[lo..hi], &h[lo..hi], cols.clone(), p);
                    for (a, b) in o.iter_mut().zip(p.iter()) {
                        *a += *b;
                    }
                }
            }
        };
        if by_items {
            let item_sums = |_: usize, range: Range<usize>| {
                // SAFETY: the first phase is over; nothing writes `h` any more.
                let h = unsafe { h.read(0..n_act) };
                for k in range {
                    let (lo, hi) = (items[k].lo as usize, items[k].hi as usize);
                    // SAFETY: item k owns partial row k.
                    let acc = unsafe { partials.slice(k * n_embd..(k + 1) * n_embd) };
                    acc.fill(0.0);
                    axpy.axpy_rows_cols(&active.idx[lo..hi], &h[lo..hi], 0..n_embd, acc);
                }
            };
            pool.for_each_chunk_then((n_act, dot_chunk), first, (items.len(), 1), item_sums);
            // SAFETY: every partial is finished; units are disjoint.
            let fold_units = |r: Range<usize>| r.for_each(|w| unsafe { fold.unit(w, &out) });
            pool.for_each_chunk(fold.n_units(), 1, fold_units);
        } else {
            pool.for_each_chunk_then((n_act, dot_chunk), first, (n_tok * per_tok, 1), second);
        }
    };
    up.with_row_dots(x, level, |up_dots| {
        down_t.with_row_axpy(level, |axpy| match gate_given {
            Some(gv) => body(GateSource::Given(gv), up_dots, axpy),
            None => gate.with_row_dots(x, level, |gd| body(GateSource::Dots(gd), up_dots, axpy)),
        })
    });
}

/// `h[j] = glu(gate_j · x_t, up_j · x_t)` for the active neurons `rows` of token `t`
/// (`u` receives the up values on the way; gate values come from `gate`). Consecutive
/// rows take the many-row kernels in one call; a row's bits are the same either way.
#[allow(clippy::too_many_arguments)]
fn neuron_values(
    gate: GateSource<'_>,
    up: &dyn RowDots,
    glu: Glu,
    n_ff: usize,
    t: usize,
    rows: &[u32],
    h: &mut [f32],
    u: &mut [f32],
) {
    let (Some(&r0), Some(&r1)) = (rows.first(), rows.last()) else {
        return;
    };
    let contiguous = (r1 - r0) as usize == rows.len() - 1;
    match gate {
        GateSource::Dots(d) if contiguous => d.rows(t, r0 as usize, h),
        GateSource::Dots(d) => d.rows_at(t, rows, h),
        GateSource::Given(gv) => {
            for (hj, &i) in h.iter_mut().zip(rows) {
                *hj = gv[t * n_ff + i as usize];
            }
        }
    }
    if contiguous {
        up.rows(t, r0 as usize, u);
    } else {
        up.rows_at(t, rows, u);
    }
    glu.apply_slice(h, u);
}

/// Where the fused FFN takes gate values from.
#[derive(Clone, Copy)]
enum GateSource<'a> {
    Dots(&'a dyn RowDots),
    Given(&'a [f32]),
}
