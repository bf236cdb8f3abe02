//! The fused neuron-sparse FFN (gate and up rows, the gated activation, the down
//! projection's rows) of [`super`], on one pool or split with a device's hot part.

use std::ops::Range;

use super::{ActiveSet, Fold, NEURON_RANGE, SparseScratch, grow};
use crate::nn::Glu;
use crate::pool::{SharedMut, ThreadPool};
use crate::simd::{self, SimdLevel};
use crate::tensor::{Activations, Matrix, RowAxpy, RowDots};

/// The fused sparse FFN: for the active neurons `i` of each token, `g = gate_i · x` (or
/// `gate_given[t][i]` when the gate was already computed in full, as gate mode does),
/// `u = up_i · x`, `h = glu(g, u)`, and `out[t] = Σ h · down_t[i]`; one pass over the
/// neurons and the same bits as [`super::rows_sparse`] + [`Glu::apply_slice`] +
/// [`super::axpy_sparse`].
#[allow(clippy::too_many_arguments)]
pub fn ffn_sparse(
    pool: &ThreadPool,
    gate: &Matrix,
    up: &Matrix,
    down_t: &Matrix,
    glu: Glu,
    x: &mut Activations,
    gate_given: Option<&[f32]>,
    active: &ActiveSet,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) {
    ffn_sparse_at(
        simd::detected(),
        pool,
        [gate, up, down_t],
        glu,
        x,
        gate_given,
        active,
        scratch,
        out,
    );
}

/// [`ffn_sparse`] with the kernels of `level`; `w` is `[gate, up, down_t]`.
#[allow(clippy::too_many_arguments)]
pub fn ffn_sparse_at(
    level: SimdLevel,
    pool: &ThreadPool,
    w: [&Matrix; 3],
    glu: Glu,
    x: &mut Activations,
    gate_given: Option<&[f32]>,
    active: &ActiveSet,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) {
    ffn_sparse_split(
        level, pool, w, None, glu, x, gate_given, active, scratch, out,
    );
}

/// The hot part of a hybrid FFN: neuron ranges `0..n_ranges` (the first
/// `n_ranges · NEURON_RANGE` neurons) run on worker 1 of another pool (the device's), with
/// another copy of their rows (`w`: the first rows of `gate`, `up` and `down_t`),
/// concurrently with the rest.
#[derive(Clone, Copy)]
pub struct HotSplit<'a> {
    pub n_ranges: usize,
    pub pool: &'a ThreadPool,
    pub w: [&'a Matrix; 3],
}

/// [`ffn_sparse_at`] with the neurons of `hot` (if any) computed on its pool from its
/// copies while `pool` computes the others. Each neuron range's partial sum is made by
/// the same kernel from the same row bytes wherever it runs, and the ranges are added in
/// the same order, so the result has the same bits as without the split.
#[allow(clippy::too_many_arguments)]
pub fn ffn_sparse_split(
    level: SimdLevel,
    pool: &ThreadPool,
    w: [&Matrix; 3],
    hot: Option<HotSplit<'_>>,
    glu: Glu,
    x: &mut Activations,
    gate_given: Option<&[f32]>,
    active: &ActiveSet,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) {
    let [gate, up, down_t] = w;
    let (n_ff, n_tok, n_embd) = (gate.n_rows(), x.n_tok(), down_t.n_cols());
    assert!(
        up.n_rows() == n_ff && down_t.n_rows() == n_ff && up.n_cols() == gate.n_cols(),
        "gate, up and down_t must have one row per neuron"
    );
    assert_eq!(active.n_rows(), n_ff, "active set is for another FFN");
    assert_eq!(active.n_tok(), n_tok, "one active list per token");
    assert_eq!(out.len(), n_tok * n_embd);
    if let Some(h) = &hot {
        let rows = (h.n_ranges * NEURON_RANGE).min(n_ff);
        for (m, full) in h.w.iter().zip(w) {
            assert!(
                m.n_rows() >= rows && m.n_cols() == full.n_cols() && m.wtype() == full.wtype(),
                "the hot copies must hold the first {rows} rows"
            );
        }
    }
    if let Some(g) = gate_given {
        assert_eq!(g.len(), n_tok * n_ff);
    } else {
        x.prepare_for(gate.wtype());
    }
    x.prepare_for(up.wtype());
    let x = &*x;
    scratch.plan(active);
    let Some(hot) = hot else {
        return ffn_by_columns(level, pool, w, glu, x, gate_given, active, scratch, out);
    };
    let SparseScratch {
        items,
        token_items,
        partials,
        hot_items,
        cold_items,
        ..
    } = scratch;
    hot_items.clear();
    cold_items.clear();
    for (k, it) in items.iter().enumerate() {
        let first = active.idx[it.lo as usize] as usize;
        if first / NEURON_RANGE < hot.n_ranges {
            hot_items.push(k as u32);
        } else {
            cold_items.push(k as u32);
        }
    }
    // Largest items first: threads taking the next item as they finish then end close
    // together (which thread ran an item does not change its bits).
    let size = |&k: &u32| std::cmp::Reverse(items[k as usize].hi - items[k as usize].lo);
    hot_items.sort_by_key(size);
    cold_items.sort_by_key(size);
    let partials = SharedMut::new(grow(partials, items.len() * n_embd));
    let fold = Fold::new(token_items, &partials, n_embd);
    let out = SharedMut::new(out);
    // SAFETY (for the callers): run once every item is finished; units are disjoint.
    let fold_units = |r: Range<usize>| r.for_each(|w| unsafe { fold.unit(w, &out) });
    // Computes the items `which` with the rows of `w`, as `how` says.
    let run_items = |how: Run<'_>, w: [&Matrix; 3], which: &[u32]| {
        let [gate, up, down_t] = w;
        let n = which.len();
        let body = |gate_src: GateSource<'_>, up_dots: &dyn RowDots, axpy: &dyn RowAxpy| {
            let work = |range: Range<usize>| {
                let mut g = [0.0f32; NEURON_RANGE];
                let mut u = [0.0f32; NEURON_RANGE];
                for q in range {
                    let k = which[q] as usize;
                    let it = items[k];
                    let t = it.t as usize;
                    let rows = &active.idx[it.lo as usize..it.hi as usize];
                    let n = rows.len();
                    neuron_values(
                        gate_src,
                        up_dots,
                        glu,
                        n_ff,
                        t,
                        rows,
                        &mut g[..n],
                        &mut u[..n],
                    );
                    // SAFETY: item k owns partial row k, and runs once.
                    let acc = unsafe { partials.slice(k * n_embd..(k + 1) * n_embd) };
                    acc.fill(0.0);
                    axpy.axpy_rows_cols(rows, &g[..n], 0..n_embd, acc);
                }
            };
            match how {
                Run::Pool(p) => p.for_each_chunk(n, 1, work),
                Run::Here => work(0..n),
            }
        };
        up.with_row_dots(x, level, |up_dots| {
            down_t.with_row_axpy(level, |axpy| match gate_given {
                Some(gv) => body(GateSource::Given(gv), up_dots, axpy),
                None => {
                    gate.with_row_dots(x, level, |gd| body(GateSource::Dots(gd), up_dots, axpy))
                }
            })
        });
    };
    if hot.pool.n_threads() >= 2 {
        // One job on the device's pool: its worker runs the hot part while the calling
        // thread runs the cold part on `pool` (the workers spin, then park, between
        // jobs: no thread is created or woken through the OS per layer).
        hot.pool.run(|thread| match thread {
            0 => run_items(Run::Pool(pool), w, cold_items),
            1 => run_items(Run::Here, hot.w, hot_items),
            _ => {}
        });
    } else {
        // A device without a worker of its own: one part after the other.
        run_items(Run::Pool(pool), w, cold_items);
        run_items(Run::Here, hot.w, hot_items);
    }
    pool.for_each_chunk(fold.n_units(), 1, fold_units);
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
///    item partials and fold of the hybrid path, for any split of the columns, which
///    is therefore chosen per call for balance: whole rows when there are tokens enough,
///    else one block per thread.
///
/// A few tokens over a large `down_t` ([`COLUMN_SPLIT_MAX_BYTES`]) instead take the
/// items' whole-row partial sums in phase 2 and fold them in a second job, as the hybrid
/// path does.
#[allow(clippy::too_many_arguments)]
fn ffn_by_columns(
    level: SimdLevel,
    pool: &ThreadPool,
    [gate, up, down_t]: [&Matrix; 3],
    glu: Glu,
    x: &Activations,
    gate_given: Option<&[f32]>,
    active: &ActiveSet,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) {
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

/// How [`ffn_sparse_split`] runs a list of items.
#[derive(Clone, Copy)]
enum Run<'a> {
    /// Spread over a pool.
    Pool(&'a ThreadPool),
    /// On the calling thread.
    Here,
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
