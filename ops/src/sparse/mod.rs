//! Neuron-sparse feed-forward operators (DESIGN.md §4).
//!
//! Neuron `i` of an FFN is row `i` of `gate`, of `up` and of `down_t` (the down projection
//! stored neuron-major). Given the active neurons of each token:
//!
//! - [`rows_sparse`]: row-sparse dot, `out[t][i] = w_i · x_t` for active `i`, 0 elsewhere;
//! - [`axpy_sparse`]: row-sparse axpy, `out[t] = Σ h[t][i] · down_t[i]` over active `i`
//!   with `h[t][i] ≠ 0`;
//! - [`SparseFfn`]: both fused with the gated activation, one pass over the neurons.
//!
//! Determinism: the neurons are cut into fixed ranges of [`NEURON_RANGE`] indices. Each
//! range's contribution is summed in index order into its own accumulator, and the ranges
//! are then added in range order. Neither depends on the thread count or on which thread
//! ran what, so results are the same bits on every run; and since a skipped neuron only
//! removes an exact `+ 0`, a gated-off neuron changes nothing (gate mode on a ReLU model
//! equals dense mode bit for bit).

use std::ops::Range;

use crate::pool::{SharedMut, ThreadPool};
use crate::simd::{self, SimdLevel};
use crate::tensor::{Activations, Matrix};

mod ffn;
#[cfg(test)]
mod tests;

pub use ffn::SparseFfn;

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

    /// Makes this set a copy of `other`, reusing its buffers.
    pub fn copy_from(&mut self, other: &ActiveSet) {
        self.n_rows = other.n_rows;
        self.idx.clear();
        self.idx.extend_from_slice(&other.idx);
        self.start.clear();
        self.start.extend_from_slice(&other.start);
    }

    /// Removes the last token added.
    pub fn pop_token(&mut self) {
        if self.start.len() > 1 {
            self.start.pop();
            self.idx.truncate(*self.start.last().unwrap_or(&0));
        }
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
