//! Matrix × vector (decode) and matrix × matrix (prefill) over quantized weights, on the
//! thread pool.
//!
//! Weights are row-major: row `r` is `n_cols / W::LEN` consecutive blocks and computes
//! output `r`. Activations arrive prepared for the weight type (`WeightBlock::prepare`).
//! Every output element is computed by one thread with one kernel call, so results are the
//! same bits for any thread count.

use crate::pool::{SharedMut, ThreadPool};
use crate::quant::{RowKernel, WeightBlock, prep_len};
use crate::simd::{self, SimdLevel};

/// Weight bytes a work item should cover at least: enough to amortize handing it out.
const MIN_CHUNK_BYTES: usize = 16 * 1024;
/// Work items per thread to aim for, so a slow thread can be balanced by the others.
const CHUNKS_PER_THREAD: usize = 8;

/// Rows kernels take at a time; work items are whole multiples of it.
const ROW_TILE: usize = 4;

/// Rows per work item for a matrix of `n_rows` rows of `row_bytes` bytes.
pub fn rows_per_chunk(n_rows: usize, row_bytes: usize, n_threads: usize) -> usize {
    let by_bytes = MIN_CHUNK_BYTES.div_ceil(row_bytes.max(1));
    let by_balance = n_rows / (n_threads * CHUNKS_PER_THREAD).max(1);
    by_bytes.max(by_balance).max(1).next_multiple_of(ROW_TILE)
}

/// `out[r] = w[r] · x` for every row `r` (`out.len()` rows of `w.len() / out.len()`
/// blocks; `x` is one prepared activation row).
pub fn matvec<W: WeightBlock>(pool: &ThreadPool, w: &[W], x: &[W::Prep], out: &mut [f32]) {
    matvec_at(simd::detected(), pool, w, x, out);
}

/// [`matvec`] with the kernels of `level`.
pub fn matvec_at<W: WeightBlock>(
    level: SimdLevel,
    pool: &ThreadPool,
    w: &[W],
    x: &[W::Prep],
    out: &mut [f32],
) {
    let n_rows = out.len();
    assert!(
        n_rows > 0 && w.len().is_multiple_of(n_rows),
        "weights must be out.len() whole rows"
    );
    let bpr = w.len() / n_rows;
    assert_eq!(
        x.len(),
        prep_len::<W>(bpr),
        "activation must be one prepared row"
    );
    let kernel: RowKernel<W> = W::row_kernel(level);
    let chunk = rows_per_chunk(n_rows, bpr * size_of::<W>(), pool.n_threads());
    let out = SharedMut::new(out);
    pool.for_each_chunk(n_rows, chunk, |rows| {
        // SAFETY: for_each_chunk hands out disjoint row ranges.
        let o = unsafe { out.slice(rows.clone()) };
        kernel.run(&w[rows.start * bpr..rows.end * bpr], x, o);
    });
}

/// `out[t * n_rows + r] = w[r] · x_t` for `n_tok` prepared activation rows, with
/// `n_rows = out.len() / n_tok`: one output row of `n_rows` values per token.
pub fn matmat<W: WeightBlock>(
    pool: &ThreadPool,
    w: &[W],
    xs: &[W::Prep],
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(
        n_tok > 0 && out.len().is_multiple_of(n_tok),
        "output must be n_tok whole rows"
    );
    let n_rows = out.len() / n_tok;
    assert!(
        n_rows > 0 && w.len().is_multiple_of(n_rows),
        "weights must be whole rows"
    );
    let bpr = w.len() / n_rows;
    let stride = prep_len::<W>(bpr);
    assert_eq!(
        xs.len(),
        stride * n_tok,
        "activations must be n_tok prepared rows"
    );
    let kernel: RowKernel<W> = W::row_kernel(simd::detected());
    let chunk = rows_per_chunk(n_rows, bpr * size_of::<W>(), pool.n_threads());
    let out = SharedMut::new(out);
    pool.for_each_chunk(n_rows, chunk, |rows| {
        // The chunk's weight rows stay in L1/L2 while every token streams past them.
        for t in 0..n_tok {
            let x = &xs[t * stride..(t + 1) * stride];
            let base = t * n_rows;
            // SAFETY: row ranges are disjoint across chunks, so the ranges
            // base + rows of different chunks are disjoint for the same token and the
            // token rows themselves do not overlap.
            let o = unsafe { out.slice(base + rows.start..base + rows.end) };
            kernel.run(&w[rows.start * bpr..rows.end * bpr], x, o);
        }
    });
}

/// Single-threaded reference: the scalar twin of every row.
pub fn matvec_ref<W: WeightBlock>(w: &[W], x: &[W::Act], out: &mut [f32]) {
    let bpr = x.len();
    assert_eq!(w.len(), out.len() * bpr);
    for (r, o) in out.iter_mut().enumerate() {
        *o = W::dot_scalar(&w[r * bpr..(r + 1) * bpr], x);
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::quant::{
        Block, BlockIQ4NL, BlockIQ4XS, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K,
        BlockQ5_1, BlockQ6K, BlockQ8_0,
    };
    use crate::rng::Rng;

    fn quantized<B: Block>(rng: &mut Rng, n: usize) -> Vec<B> {
        let x = rng.varied(n, 32);
        let mut out = vec![B::default(); n / B::LEN];
        B::quantize(&x, &mut out);
        out
    }

    fn check<W: WeightBlock>(n_rows: usize, n_cols: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let w: Vec<W> = quantized(&mut rng, n_rows * n_cols);
        let n_tok = 5;
        let xs: Vec<W::Act> = quantized(&mut rng, n_tok * n_cols);
        let bpr = n_cols / W::LEN;
        let stride = prep_len::<W>(bpr);
        let mut prepared = vec![W::Prep::default(); stride * n_tok];
        for t in 0..n_tok {
            W::prepare_ggml(
                &xs[t * bpr..(t + 1) * bpr],
                &mut prepared[t * stride..(t + 1) * stride],
            );
        }
        // Σ|w·x| per (token, row): the scale of float reassociation error.
        let deq = |b: &[_]| {
            let mut v = vec![0.0; b.len() * W::LEN];
            W::dequantize(b, &mut v);
            v
        };
        let wd = deq(&w);
        let mut xd = vec![0.0; n_tok * n_cols];
        W::Act::dequantize(&xs, &mut xd);
        let mag = |t: usize, r: usize| -> f32 {
            let (wr, xt) = (&wd[r * n_cols..][..n_cols], &xd[t * n_cols..][..n_cols]);
            wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum()
        };
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads, "test").unwrap();
            let mut mm = vec![0.0; n_rows * n_tok];
            matmat(&pool, &w, &prepared, n_tok, &mut mm);
            for t in 0..n_tok {
                let x = &xs[t * bpr..(t + 1) * bpr];
                let mut fast = vec![0.0; n_rows];
                let mut slow = vec![0.0; n_rows];
                matvec(
                    &pool,
                    &w,
                    &prepared[t * stride..(t + 1) * stride],
                    &mut fast,
                );
                matvec_ref(&w, x, &mut slow);
                for r in 0..n_rows {
                    let tol = 2e-5 * mag(t, r) + 1e-9;
                    assert!((fast[r] - slow[r]).abs() <= tol, "{} row {r}", W::DTYPE);
                    // matmat and matvec use the same kernel: identical bits.
                    assert_eq!(mm[t * n_rows + r].to_bits(), fast[r].to_bits());
                }
            }
        }
    }

    #[test]
    fn matvec_and_matmat_match_the_reference_for_any_thread_count() {
        check::<BlockQ4_1>(97, 576, 1);
        check::<BlockQ4_0>(40, 96, 8);
        check::<BlockQ5_1>(40, 160, 9);
        check::<BlockQ8_0>(300, 64, 2);
        check::<BlockQ8_0>(30, 96, 10);
        check::<BlockQ4K>(33, 512, 3);
        check::<BlockQ6K>(70, 256, 4);
        check::<BlockQ2K>(37, 512, 11);
        check::<BlockQ3K>(45, 256, 12);
        check::<BlockIQ4NL>(41, 160, 13);
        check::<BlockIQ4XS>(29, 768, 14);
        check::<f32>(31, 45, 5);
        check::<f16>(1000, 16, 6);
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let mut rng = Rng::new(7);
        let w: Vec<BlockQ4_1> = quantized(&mut rng, 1536 * 576);
        let x = crate::quant::prepare_f32::<BlockQ4_1>(
            &rng.varied(576, 32),
            crate::quant::Numerics::Precise,
        );
        let run = |threads| {
            let pool = ThreadPool::new(threads, "test").unwrap();
            let mut out = vec![0.0; 1536];
            matvec(&pool, &w, &x, &mut out);
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(4));
    }
}
