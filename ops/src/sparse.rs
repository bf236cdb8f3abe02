//! Neuron-sparse feed-forward operators (DESIGN.md §4).
//!
//! Neuron `i` of an FFN is row `i` of `gate`, of `up` and of `down_t` (the down projection
//! stored neuron-major). Given the active neurons of each token:
//!
//! - [`rows_sparse`]: row-sparse dot, `out[t][i] = w_i · x_t` for active `i`, 0 elsewhere;
//! - [`axpy_sparse`]: row-sparse axpy, `out[t] = Σ h[t][i] · down_t[i]` over active `i`
//!   with `h[t][i] ≠ 0`;
//! - [`ffn_sparse`]: both fused with the gated activation, one pass over the neurons.
//!
//! Determinism: the neurons are cut into fixed ranges of [`NEURON_RANGE`] indices. Each
//! range's contribution is summed in index order into its own accumulator, and the ranges
//! are then added in range order. Neither depends on the thread count or on which thread
//! ran what, so results are the same bits on every run; and since a skipped neuron only
//! removes an exact `+ 0`, a gated-off neuron changes nothing (gate mode on a ReLU model
//! equals dense mode bit for bit).

use std::ops::Range;

use crate::nn::Glu;
use crate::pool::{SharedMut, ThreadPool};
use crate::simd::{self, SimdLevel};
use crate::tensor::{Activations, Matrix, RowAxpy, RowDots};

/// Neurons per range: the unit of work and of the deterministic reduction.
pub const NEURON_RANGE: usize = 128;

/// Output columns of one unit of the fold (the reduction of the ranges' partial sums).
const FOLD_COLS: usize = 128;

/// The active neurons of each token of a batch: strictly increasing indices below
/// `n_rows`.
#[derive(Clone, Debug)]
pub struct ActiveSet {
    n_rows: usize,
    idx: Vec<u32>,
    start: Vec<usize>,
}

impl ActiveSet {
    pub fn new(n_rows: usize) -> Self {
        Self {
            n_rows,
            idx: Vec::new(),
            start: vec![0],
        }
    }

    /// Empties the set (keeping its buffers) for neurons `0..n_rows`.
    pub fn reset(&mut self, n_rows: usize) {
        self.n_rows = n_rows;
        self.idx.clear();
        self.start.clear();
        self.start.push(0);
    }

    /// Adds a token whose active neurons are `rows` (strictly increasing, below `n_rows`).
    pub fn push_token(&mut self, rows: impl IntoIterator<Item = u32>) {
        let first = self.idx.len();
        self.idx.extend(rows);
        let added = &self.idx[first..];
        assert!(
            added.windows(2).all(|p| p[0] < p[1])
                && added.last().is_none_or(|&r| (r as usize) < self.n_rows),
            "active neurons must be increasing and below {}",
            self.n_rows
        );
        self.start.push(self.idx.len());
    }

    /// Adds a token with every neuron active.
    pub fn push_all(&mut self) {
        self.push_token(0..self.n_rows as u32);
    }

    /// Adds a token whose active neurons are those `i` with `active(i)`.
    pub fn push_where(&mut self, active: impl Fn(usize) -> bool) {
        let n = self.n_rows as u32;
        self.push_token((0..n).filter(|&i| active(i as usize)));
    }

    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    pub fn n_tok(&self) -> usize {
        self.start.len() - 1
    }

    pub fn token(&self, t: usize) -> &[u32] {
        &self.idx[self.start[t]..self.start[t + 1]]
    }

    /// Active (token, neuron) pairs in all.
    pub fn n_active(&self) -> usize {
        self.idx.len()
    }

    /// Active pairs over all pairs (1 for an empty batch).
    pub fn fraction(&self) -> f64 {
        let all = self.n_tok() * self.n_rows;
        if all == 0 {
            1.0
        } else {
            self.n_active() as f64 / all as f64
        }
    }
}

/// One unit of work: the active neurons of token `t` inside one neuron range, as a span of
/// the set's index list.
#[derive(Clone, Copy, Debug)]
struct Item {
    t: u32,
    lo: u32,
    hi: u32,
}

/// Buffers the sparse operators reuse from call to call (grown, never shrunk).
#[derive(Default)]
pub struct SparseScratch {
    items: Vec<Item>,
    /// Per token, the span of `items` that belongs to it.
    token_items: Vec<Range<usize>>,
    partials: Vec<f32>,
    /// The items of a hybrid FFN's hot part, and the rest (all items without a hot part),
    /// largest first.
    hot_items: Vec<u32>,
    cold_items: Vec<u32>,
    /// Per active (token, neuron) pair of the column-split FFN: `h`, and `up` on the way.
    h: Vec<f32>,
    up: Vec<f32>,
    /// Per thread, one item's partial sum over a block of columns.
    cols: Vec<f32>,
}

impl SparseScratch {
    /// Cuts every token's active list at the neuron-range boundaries.
    fn plan(&mut self, active: &ActiveSet) {
        self.items.clear();
        self.token_items.clear();
        for t in 0..active.n_tok() {
            let first = self.items.len();
            let rows = active.token(t);
            let base = active.start[t];
            let mut lo = 0;
            while lo < rows.len() {
                let range_end = (rows[lo] as usize / NEURON_RANGE + 1) * NEURON_RANGE;
                let hi = lo + rows[lo..].partition_point(|&r| (r as usize) < range_end);
                self.items.push(Item {
                    t: t as u32,
                    lo: (base + lo) as u32,
                    hi: (base + hi) as u32,
                });
                lo = hi;
            }
            self.token_items.push(first..self.items.len());
        }
    }
}

/// The first `n` elements of `buf`, grown as needed (never shrunk).
fn grow(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// The reduction of the items' partial sums into the output: unit `w` covers one block of
/// [`FOLD_COLS`] columns of one token and adds that token's partials in item order (the
/// order of the neuron ranges), whichever thread runs it.
struct Fold<'a> {
    token_items: &'a [Range<usize>],
    partials: &'a SharedMut<'a, f32>,
    n_cols: usize,
    per_tok: usize,
}

impl<'a> Fold<'a> {
    fn new(
        token_items: &'a [Range<usize>],
        partials: &'a SharedMut<'a, f32>,
        n_cols: usize,
    ) -> Self {
        Self {
            token_items,
            partials,
            n_cols,
            per_tok: n_cols.div_ceil(FOLD_COLS),
        }
    }

    fn n_units(&self) -> usize {
        self.token_items.len() * self.per_tok
    }

    /// Writes unit `w` of `out` (`n_tok × n_cols`).
    ///
    /// # Safety
    /// Every partial is finished and no longer written, and no other thread works on
    /// unit `w` meanwhile.
    unsafe fn unit(&self, w: usize, out: &SharedMut<'_, f32>) {
        let (t, c) = (w / self.per_tok, w % self.per_tok);
        let n = self.n_cols;
        let cols = c * FOLD_COLS..((c + 1) * FOLD_COLS).min(n);
        // SAFETY: units are disjoint output ranges (the caller runs each once).
        let o = unsafe { out.slice(t * n + cols.start..t * n + cols.end) };
        o.fill(0.0);
        for k in self.token_items[t].clone() {
            // SAFETY: the partials are finished (the caller's contract).
            let p = unsafe { self.partials.read(k * n + cols.start..k * n + cols.end) };
            for (a, b) in o.iter_mut().zip(p) {
                *a += *b;
            }
        }
    }
}

/// Runs of consecutive neurons in `rows`, as index ranges into `rows`.
fn runs(rows: &[u32]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut k = 0;
    std::iter::from_fn(move || {
        if k >= rows.len() {
            return None;
        }
        let start = k;
        k += 1;
        while k < rows.len() && rows[k] == rows[k - 1] + 1 {
            k += 1;
        }
        Some(start..k)
    })
}

/// Row-sparse dot: `out[t * n_rows + i] = w_i · x_t` for the active neurons `i` of each
/// token, 0 elsewhere. Active rows have exactly the bits of the dense product.
pub fn rows_sparse(
    pool: &ThreadPool,
    w: &Matrix,
    x: &mut Activations,
    active: &ActiveSet,
    out: &mut [f32],
) {
    rows_sparse_at(simd::detected(), pool, w, x, active, out);
}

/// [`rows_sparse`] with the kernels of `level`.
pub fn rows_sparse_at(
    level: SimdLevel,
    pool: &ThreadPool,
    w: &Matrix,
    x: &mut Activations,
    active: &ActiveSet,
    out: &mut [f32],
) {
    let n_rows = w.n_rows();
    assert_eq!(active.n_rows(), n_rows, "active set is for another matrix");
    assert_eq!(active.n_tok(), x.n_tok(), "one active list per token");
    assert_eq!(out.len(), x.n_tok() * n_rows);
    out.fill(0.0);
    x.prepare_for(w.wtype());
    let x = &*x;
    let row_bytes = w.n_bytes() / n_rows.max(1);
    let chunk = crate::matmul::rows_per_chunk(active.n_active(), row_bytes, pool.n_threads());
    let out = SharedMut::new(out);
    w.with_row_dots(x, level, |dots| {
        pool.for_each_chunk(active.n_active(), chunk, |range| {
            // The token of the chunk's first entry, then advance token by token.
            let mut t = active.start.partition_point(|&s| s <= range.start) - 1;
            let mut k = range.start;
            while k < range.end {
                let end = range.end.min(active.start[t + 1]);
                let rows = &active.idx[k..end];
                for run in runs(rows) {
                    let r0 = rows[run.start] as usize;
                    let base = t * n_rows + r0;
                    // SAFETY: every (token, neuron) pair is one output element, and each
                    // pair belongs to exactly one chunk.
                    let o = unsafe { out.slice(base..base + run.len()) };
                    dots.rows(t, r0, o);
                }
                k = end;
                t += 1;
            }
        });
    });
}

/// Row-sparse axpy: `out[t] = Σ h[t][i] · w_t[i]` over the active neurons `i` of token
/// `t` with `h[t][i] ≠ 0` (`w_t` neuron-major: `n_rows` neurons of `n_cols` outputs; `h`
/// `n_tok × n_rows`, `out` `n_tok × n_cols`).
pub fn axpy_sparse(
    pool: &ThreadPool,
    w_t: &Matrix,
    h: &[f32],
    active: &ActiveSet,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) {
    axpy_sparse_at(simd::detected(), pool, w_t, h, active, scratch, out);
}

/// [`axpy_sparse`] with the kernels of `level`.
pub fn axpy_sparse_at(
    level: SimdLevel,
    pool: &ThreadPool,
    w_t: &Matrix,
    h: &[f32],
    active: &ActiveSet,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) {
    let (n_rows, n_cols, n_tok) = (w_t.n_rows(), w_t.n_cols(), active.n_tok());
    assert_eq!(active.n_rows(), n_rows, "active set is for another matrix");
    assert_eq!(h.len(), n_tok * n_rows);
    assert_eq!(out.len(), n_tok * n_cols);
    scratch.plan(active);
    let SparseScratch {
        items,
        token_items,
        partials,
        ..
    } = scratch;
    let partials = SharedMut::new(grow(partials, items.len() * n_cols));
    w_t.with_row_axpy(level, |axpy| {
        let fold = Fold::new(token_items, &partials, n_cols);
        let out = SharedMut::new(out);
        let work = |range: Range<usize>| {
            for k in range {
                let it = items[k];
                let t = it.t as usize;
                // SAFETY: item k owns partial row k.
                let acc = unsafe { partials.slice(k * n_cols..(k + 1) * n_cols) };
                acc.fill(0.0);
                for &i in &active.idx[it.lo as usize..it.hi as usize] {
                    let hv = h[t * n_rows + i as usize];
                    if hv != 0.0 {
                        axpy.axpy(i as usize, hv, acc);
                    }
                }
            }
        };
        pool.for_each_chunk_then((items.len(), 1), work, (fold.n_units(), 1), |_, r| {
            // SAFETY: every item's partial is finished; units write disjoint outputs.
            r.for_each(|w| unsafe { fold.unit(w, &out) });
        });
    });
}

/// The fused sparse FFN: for the active neurons `i` of each token, `g = gate_i · x` (or
/// `gate_given[t][i]` when the gate was already computed in full, as gate mode does),
/// `u = up_i · x`, `h = glu(g, u)`, and `out[t] = Σ h · down_t[i]`; one pass over the
/// neurons and the same bits as [`rows_sparse`] + [`Glu::apply`] + [`axpy_sparse`].
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
                    if n == NEURON_RANGE {
                        // The whole range: contiguous rows.
                        let r0 = rows[0] as usize;
                        match gate_src {
                            GateSource::Dots(d) => d.rows(t, r0, &mut g),
                            GateSource::Given(gv) => {
                                g.copy_from_slice(&gv[t * n_ff + r0..t * n_ff + r0 + n]);
                            }
                        }
                        up_dots.rows(t, r0, &mut u);
                    } else {
                        match gate_src {
                            GateSource::Dots(d) => d.rows_at(t, rows, &mut g[..n]),
                            GateSource::Given(gv) => {
                                for (gj, &i) in g.iter_mut().zip(rows) {
                                    *gj = gv[t * n_ff + i as usize];
                                }
                            }
                        }
                        up_dots.rows_at(t, rows, &mut u[..n]);
                    }
                    // SAFETY: item k owns partial row k, and runs once.
                    let acc = unsafe { partials.slice(k * n_embd..(k + 1) * n_embd) };
                    acc.fill(0.0);
                    glu.apply_slice(&mut g[..n], &u[..n]);
                    for (&hv, &i) in g.iter().zip(rows) {
                        if hv != 0.0 {
                            axpy.axpy(i as usize, hv, acc);
                        }
                    }
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
const COLUMN_SPLIT_MAX_BYTES: usize = 1 << 20;
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
                if let (Some(&r0), Some(&r1)) = (rows.first(), rows.last()) {
                    // SAFETY: pairs k..end belong to this range alone.
                    let (hk, uk) = unsafe { (h.slice(k..end), u.slice(k..end)) };
                    let contiguous = (r1 - r0) as usize == rows.len() - 1;
                    match gate_src {
                        GateSource::Dots(d) if contiguous => d.rows(t, r0 as usize, hk),
                        GateSource::Dots(d) => d.rows_at(t, rows, hk),
                        GateSource::Given(gv) => {
                            for (gj, &i) in hk.iter_mut().zip(rows) {
                                *gj = gv[t * n_ff + i as usize];
                            }
                        }
                    }
                    if contiguous {
                        up_dots.rows(t, r0 as usize, uk);
                    } else {
                        up_dots.rows_at(t, rows, uk);
                    }
                    glu.apply_slice(hk, uk);
                }
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

/// Where the fused FFN takes gate values from.
#[derive(Clone, Copy)]
enum GateSource<'a> {
    Dots(&'a dyn RowDots),
    Given(&'a [f32]),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::WeightType;
    use crate::rng::Rng;

    const FRACTIONS: [f64; 6] = [0.0, 0.01, 0.1, 0.5, 0.9, 1.0];

    fn random_set(rng: &mut Rng, n_rows: usize, n_tok: usize, p: f64) -> ActiveSet {
        let mut a = ActiveSet::new(n_rows);
        for _ in 0..n_tok {
            let keep: Vec<bool> = (0..n_rows).map(|_| rng.next_f64() < p).collect();
            a.push_where(|i| keep[i]);
        }
        a
    }

    /// Random gate, up (`types[0]`) and down_t (`types[1]`) of `n_ff` neurons, and a
    /// random batch of `n_tok` inputs.
    fn random_ffn(
        rng: &mut Rng,
        [wtype, down_type]: [WeightType; 2],
        n_ff: usize,
        n_embd: usize,
        n_tok: usize,
    ) -> ([Matrix; 3], Activations) {
        let w = [
            random_matrix(rng, wtype, n_ff, n_embd),
            random_matrix(rng, wtype, n_ff, n_embd),
            random_matrix(rng, down_type, n_ff, n_embd),
        ];
        let x: Vec<f32> = (0..n_tok * n_embd).map(|_| rng.normal()).collect();
        let mut acts = Activations::new();
        acts.set(&x, n_tok);
        (w, acts)
    }

    fn random_matrix(rng: &mut Rng, wtype: WeightType, n_rows: usize, n_cols: usize) -> Matrix {
        let v: Vec<f32> = (0..n_rows * n_cols).map(|_| rng.normal()).collect();
        Matrix::quantize(wtype, &v, n_rows, n_cols)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn row_sparse_dot_is_the_dense_product_with_inactive_rows_zeroed() {
        let mut rng = Rng::new(11);
        let (n_rows, n_cols, n_tok) = (300, 256, 3);
        let pools: Vec<ThreadPool> = [1, 2, 3]
            .iter()
            .map(|&n| ThreadPool::new(n, "t").unwrap())
            .collect();
        for wtype in WeightType::ALL {
            let w = random_matrix(&mut rng, wtype, n_rows, n_cols);
            let x: Vec<f32> = (0..n_tok * n_cols).map(|_| rng.normal()).collect();
            let mut acts = Activations::new();
            acts.set(&x, n_tok);
            let mut dense = vec![0.0; n_tok * n_rows];
            w.matmul(&pools[0], &mut acts, &mut dense);
            for p in FRACTIONS {
                let active = random_set(&mut rng, n_rows, n_tok, p);
                let mut want = vec![0.0f32; n_tok * n_rows];
                for t in 0..n_tok {
                    for &i in active.token(t) {
                        let k = t * n_rows + i as usize;
                        want[k] = dense[k];
                    }
                }
                for pool in &pools {
                    let mut got = vec![f32::NAN; n_tok * n_rows];
                    rows_sparse(pool, &w, &mut acts, &active, &mut got);
                    assert_eq!(bits(&got), bits(&want), "{wtype:?} at {p}");
                }
            }
        }
    }

    #[test]
    fn row_sparse_axpy_matches_f64_and_is_deterministic_and_exact_under_skips() {
        let mut rng = Rng::new(12);
        let (n_rows, n_cols, n_tok) = (300, 256, 3);
        let pools: Vec<ThreadPool> = [1, 2, 3]
            .iter()
            .map(|&n| ThreadPool::new(n, "t").unwrap())
            .collect();
        let mut scratch = SparseScratch::default();
        for wtype in WeightType::ALL {
            let w = random_matrix(&mut rng, wtype, n_rows, n_cols);
            let mut deq = vec![0.0; n_rows * n_cols];
            for r in 0..n_rows {
                w.dequantize_row(r, &mut deq[r * n_cols..(r + 1) * n_cols]);
            }
            let h: Vec<f32> = (0..n_tok * n_rows).map(|_| rng.normal()).collect();
            for p in FRACTIONS {
                let active = random_set(&mut rng, n_rows, n_tok, p);
                // The same values through "every neuron active, the inactive ones 0".
                let mut zeroed = vec![0.0f32; n_tok * n_rows];
                let mut all = ActiveSet::new(n_rows);
                for t in 0..n_tok {
                    for &i in active.token(t) {
                        zeroed[t * n_rows + i as usize] = h[t * n_rows + i as usize];
                    }
                    all.push_all();
                }
                let mut reference = vec![0.0f32; n_tok * n_cols];
                axpy_sparse(&pools[0], &w, &zeroed, &all, &mut scratch, &mut reference);
                for t in 0..n_tok {
                    for j in 0..n_cols {
                        let (mut exact, mut mag) = (0.0f64, 0.0f64);
                        for &i in active.token(t) {
                            let v = f64::from(h[t * n_rows + i as usize])
                                * f64::from(deq[i as usize * n_cols + j]);
                            exact += v;
                            mag += v.abs();
                        }
                        let got = f64::from(reference[t * n_cols + j]);
                        assert!(
                            (got - exact).abs() <= 1e-6 * mag + 1e-30,
                            "{wtype:?} at {p}: {got} vs {exact}"
                        );
                    }
                }
                for pool in &pools {
                    for level in crate::simd::supported_levels() {
                        let mut got = vec![f32::NAN; n_tok * n_cols];
                        axpy_sparse_at(level, pool, &w, &h, &active, &mut scratch, &mut got);
                        // +0 and -0 may differ where nothing was added; compare values.
                        let same = got.iter().zip(&reference).all(|(a, b)| a == b);
                        assert!(
                            same,
                            "{wtype:?} at {p}, {level}, {} threads",
                            pool.n_threads()
                        );
                    }
                }
            }
        }
    }

    #[test]
    /// The fused FFN has the bits of its parts (row-sparse dots, the gated activation,
    /// the row-sparse axpy and its fold) for every thread count: its column split, chosen
    /// per thread count and batch size, must not show.
    fn fused_ffn_equals_its_parts_for_every_glu_and_gate_source() {
        let mut rng = Rng::new(13);
        let (n_ff, n_embd) = (300, 256);
        let pools: Vec<ThreadPool> = [1, 2, 3]
            .iter()
            .map(|&n| ThreadPool::new(n, "t").unwrap())
            .collect();
        let mut scratch = SparseScratch::default();
        for (wtype, down_type) in [
            (WeightType::Q4_1, WeightType::Q4_1),
            (WeightType::Q4_0, WeightType::Q8_0),
            (WeightType::Q4_K, WeightType::Q6_K),
            (WeightType::F16, WeightType::F32),
        ] {
            for n_tok in [1, 2] {
                let ([gate, up, down_t], mut acts) =
                    random_ffn(&mut rng, [wtype, down_type], n_ff, n_embd, n_tok);
                for glu in [Glu::Silu, Glu::Relu, Glu::DualRelu, Glu::Gelu] {
                    for p in [0.0, 0.1, 0.5, 1.0] {
                        let active = random_set(&mut rng, n_ff, n_tok, p);
                        let mut g = vec![0.0; n_tok * n_ff];
                        let mut u = vec![0.0; n_tok * n_ff];
                        rows_sparse(&pools[0], &gate, &mut acts, &active, &mut g);
                        rows_sparse(&pools[0], &up, &mut acts, &active, &mut u);
                        let mut h = g.clone();
                        glu.apply_slice(&mut h, &u);
                        let mut want = vec![0.0; n_tok * n_embd];
                        axpy_sparse(&pools[0], &down_t, &h, &active, &mut scratch, &mut want);
                        let mut g_all = vec![0.0; n_tok * n_ff];
                        gate.matmul(&pools[0], &mut acts, &mut g_all);
                        let w = [&gate, &up, &down_t];
                        let level = simd::detected();
                        // The gate computed here, or in full beforehand (gate mode).
                        for given in [None, Some(g_all.as_slice())] {
                            for pool in &pools {
                                let mut got = vec![f32::NAN; n_tok * n_embd];
                                ffn_sparse_at(
                                    level,
                                    pool,
                                    w,
                                    glu,
                                    &mut acts,
                                    given,
                                    &active,
                                    &mut scratch,
                                    &mut got,
                                );
                                assert_eq!(
                                    got,
                                    want,
                                    "{wtype:?}/{down_type:?} {glu:?} at {p}, {n_tok} tokens, \
                                     {} threads, gate given: {}",
                                    pool.n_threads(),
                                    given.is_some()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A large, mostly active down projection with fewer tokens than threads takes the
    /// neuron-range split of phase 2 (over [`COLUMN_SPLIT_MAX_BYTES`]): the same bits.
    #[test]
    fn large_dense_down_projections_split_by_ranges_with_the_same_bits() {
        let mut rng = Rng::new(14);
        let (n_ff, n_embd, n_tok) = (640, 1024, 1);
        let ([gate, up, down_t], mut acts) = random_ffn(
            &mut rng,
            [WeightType::Q4_0, WeightType::F32],
            n_ff,
            n_embd,
            n_tok,
        );
        assert!(n_ff / 2 * down_t.n_bytes() / n_ff > COLUMN_SPLIT_MAX_BYTES);
        let pools: Vec<ThreadPool> = [1, 2, 3]
            .iter()
            .map(|&n| ThreadPool::new(n, "t").unwrap())
            .collect();
        let mut scratch = SparseScratch::default();
        for p in [0.5, 1.0] {
            let active = random_set(&mut rng, n_ff, n_tok, p);
            let (mut g, mut u) = (vec![0.0; n_ff], vec![0.0; n_ff]);
            rows_sparse(&pools[0], &gate, &mut acts, &active, &mut g);
            rows_sparse(&pools[0], &up, &mut acts, &active, &mut u);
            Glu::Silu.apply_slice(&mut g, &u);
            let mut want = vec![0.0; n_embd];
            axpy_sparse(&pools[0], &down_t, &g, &active, &mut scratch, &mut want);
            for pool in &pools {
                let mut got = vec![f32::NAN; n_embd];
                let w = [&gate, &up, &down_t];
                ffn_sparse(
                    pool,
                    w[0],
                    w[1],
                    w[2],
                    Glu::Silu,
                    &mut acts,
                    None,
                    &active,
                    &mut scratch,
                    &mut got,
                );
                assert_eq!(got, want, "at {p}, {} threads", pool.n_threads());
            }
        }
    }

    #[test]
    fn a_hot_split_on_another_pool_gives_the_same_bits() {
        let mut rng = Rng::new(17);
        let (n_ff, n_embd, n_tok) = (520, 256, 3);
        let pool = ThreadPool::new(2, "cold").unwrap();
        // A device pool with a worker of its own, and one without (parts in turn).
        let devices = [
            ThreadPool::new(2, "hot").unwrap(),
            ThreadPool::new(1, "hot1").unwrap(),
        ];
        let mut scratch = SparseScratch::default();
        for (wtype, down_type) in [
            (WeightType::Q4_1, WeightType::Q8_0),
            (WeightType::Q4_K, WeightType::Q6_K),
            (WeightType::F16, WeightType::F32),
        ] {
            let ([gate, up, down_t], mut acts) =
                random_ffn(&mut rng, [wtype, down_type], n_ff, n_embd, n_tok);
            let level = simd::detected();
            for p in [0.1, 0.5, 1.0] {
                let active = random_set(&mut rng, n_ff, n_tok, p);
                let mut want = vec![0.0; n_tok * n_embd];
                let w = [&gate, &up, &down_t];
                let glu = Glu::Silu;
                ffn_sparse_at(
                    level,
                    &pool,
                    w,
                    glu,
                    &mut acts,
                    None,
                    &active,
                    &mut scratch,
                    &mut want,
                );
                for (n_ranges, device) in [0, 1, 3, 5].into_iter().zip(devices.iter().cycle()) {
                    let rows: Vec<u32> = (0..(n_ranges * NEURON_RANGE).min(n_ff) as u32).collect();
                    let copies = w.map(|m| m.select_rows(&rows).unwrap());
                    let hot = HotSplit {
                        n_ranges,
                        pool: device,
                        w: [&copies[0], &copies[1], &copies[2]],
                    };
                    let mut got = vec![f32::NAN; n_tok * n_embd];
                    ffn_sparse_split(
                        level,
                        &pool,
                        w,
                        Some(hot),
                        glu,
                        &mut acts,
                        None,
                        &active,
                        &mut scratch,
                        &mut got,
                    );
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{wtype:?}/{down_type:?} at {p}, {n_ranges} hot ranges"
                    );
                }
            }
        }
    }

    #[test]
    fn active_sets_refuse_unsorted_or_out_of_range_neurons() {
        let bad = |rows: Vec<u32>| {
            std::panic::catch_unwind(move || {
                let mut a = ActiveSet::new(10);
                a.push_token(rows);
            })
            .is_err()
        };
        assert!(bad(vec![3, 2]));
        assert!(bad(vec![1, 1]));
        assert!(bad(vec![10]));
        assert!(!bad(vec![0, 5, 9]));
        let mut a = ActiveSet::new(4);
        a.push_all();
        a.push_token([]);
        a.push_where(|i| i % 2 == 1);
        assert_eq!((a.n_tok(), a.n_active()), (3, 6));
        assert_eq!(a.token(2), &[1, 3]);
        assert!((a.fraction() - 0.5).abs() < 1e-12);
    }
}
