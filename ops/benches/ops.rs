//! `cargo bench -p powerinfer-ops`: matrix × vector for every weight type at the SmolLM2
//! shapes, reported as GB/s of weight bytes read, beside the machine's copy and read
//! bandwidth measured by the same harness.
//!
//! Shapes are GGUF `[n_cols, n_rows]`: `576x1536` (ffn_gate/up), `1536x576` (ffn_down),
//! `576x49152` (the output head). Rows of the k-quants and IQ4_XS are whole 256-element
//! super-blocks, so they run `512x1536` and `512x49152` in place of the 576-column shapes
//! (llama.cpp cannot store such rows in those types either). The `prepare` group times the activation
//! preparation every product starts with. Filter with e.g.
//! `cargo bench -p powerinfer-ops -- q4_1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use powerinfer_ops::matmul::matvec;
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::*;
use powerinfer_ops::rng::Rng;

const SHAPES: [(usize, usize); 3] = [(576, 1536), (1536, 576), (576, 49152)];
const THREADS: [usize; 2] = [1, 2];

fn quantized<B: Block>(x: &[f32]) -> Vec<B> {
    let mut out = vec![B::default(); x.len() / B::LEN];
    B::quantize(x, &mut out);
    out
}

fn bench_type<W: WeightBlock>(c: &mut Criterion, name: &str, pools: &[ThreadPool]) {
    let mut group = c.benchmark_group(format!("matvec/{name}"));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    let mut rng = Rng::new(1);
    for (n_cols, n_rows) in SHAPES {
        // A row must be whole blocks: k-quant rows are multiples of 256.
        let n_cols = n_cols / W::LEN.max(1) * W::LEN.max(1);
        let w: Vec<W> = quantized(&rng.varied(n_cols * n_rows, 32));
        let x = prepare_f32::<W>(&rng.varied(n_cols, 32), Numerics::Precise);
        let mut out = vec![0f32; n_rows];
        group.throughput(Throughput::BytesDecimal(
            std::mem::size_of_val(w.as_slice()) as u64,
        ));
        for pool in pools {
            let id = BenchmarkId::new(
                format!("{n_cols}x{n_rows}"),
                format!("t{}", pool.n_threads()),
            );
            group.bench_function(id, |b| {
                b.iter(|| matvec(pool, black_box(&w), black_box(&x), &mut out));
            });
        }
    }
    group.finish();
}

fn matvec_all(c: &mut Criterion) {
    let pools: Vec<ThreadPool> = THREADS
        .iter()
        .map(|&t| ThreadPool::new(t, "bench").unwrap())
        .collect();
    bench_type::<f32>(c, "f32", &pools);
    bench_type::<f16>(c, "f16", &pools);
    bench_type::<bf16>(c, "bf16", &pools);
    bench_type::<BlockQ4_0>(c, "q4_0", &pools);
    bench_type::<BlockQ4_1>(c, "q4_1", &pools);
    bench_type::<BlockQ5_0>(c, "q5_0", &pools);
    bench_type::<BlockQ5_1>(c, "q5_1", &pools);
    bench_type::<BlockQ8_0>(c, "q8_0", &pools);
    bench_type::<BlockQ4K>(c, "q4_k", &pools);
    bench_type::<BlockQ5K>(c, "q5_k", &pools);
    bench_type::<BlockQ6K>(c, "q6_k", &pools);
    bench_type::<BlockQ2K>(c, "q2_k", &pools);
    bench_type::<BlockQ3K>(c, "q3_k", &pools);
    bench_type::<BlockIQ4NL>(c, "iq4_nl", &pools);
    bench_type::<BlockIQ4XS>(c, "iq4_xs", &pools);
}

/// Copy (bytes copied per second) and read (bytes summed per second) bandwidth over the
/// sizes the matrices span: in-cache (0.55 MB, a Q4_1 FFN matrix) and out of cache (30 MB,
/// the Q8_0 output head).
fn bandwidth(c: &mut Criterion) {
    let mut group = c.benchmark_group("bandwidth");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    let pools: Vec<ThreadPool> = THREADS
        .iter()
        .map(|&t| ThreadPool::new(t, "bench").unwrap())
        .collect();
    for bytes in [552_960usize, 30_081_024] {
        let src: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
        let mut dst = vec![0u64; src.len()];
        group.throughput(Throughput::BytesDecimal(bytes as u64));
        for pool in &pools {
            let t = pool.n_threads();
            let chunk = src.len().div_ceil(t);
            group.bench_function(
                BenchmarkId::new(format!("copy/{bytes}"), format!("t{t}")),
                |b| {
                    b.iter(|| {
                        let out = powerinfer_ops::pool::SharedMut::new(&mut dst);
                        pool.for_each_chunk(src.len(), chunk, |r| {
                            // SAFETY: chunks are disjoint.
                            unsafe { out.slice(r.clone()) }.copy_from_slice(&src[r]);
                        });
                    })
                },
            );
            group.bench_function(
                BenchmarkId::new(format!("read/{bytes}"), format!("t{t}")),
                |b| {
                    b.iter(|| {
                        let total = std::sync::atomic::AtomicU64::new(0);
                        pool.for_each_chunk(src.len(), chunk, |r| {
                            // Eight lanes so the sum vectorizes.
                            let mut acc = [0u64; 8];
                            for c in src[r].chunks_exact(8) {
                                for k in 0..8 {
                                    acc[k] = acc[k].wrapping_add(c[k]);
                                }
                            }
                            let s = acc.iter().fold(0u64, |a, &v| a.wrapping_add(v));
                            total.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
                        });
                        black_box(total.into_inner())
                    })
                },
            );
        }
    }
    group.finish();
}

/// Preparing one activation row (precise numerics) for nibble and Q8_0 weights, at the
/// SmolLM2 widths and a 7B one: every matrix × vector pays it once per row.
fn prepare(c: &mut Criterion) {
    let mut group = c.benchmark_group("prepare");
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    let mut rng = Rng::new(3);
    for n in [576, 1536, 4096] {
        let x = rng.varied(n, 32);
        group.bench_function(BenchmarkId::new("q4_1", n), |b| {
            b.iter(|| prepare_f32::<BlockQ4_1>(black_box(&x), Numerics::Precise));
        });
        group.bench_function(BenchmarkId::new("q8_0", n), |b| {
            b.iter(|| prepare_f32::<BlockQ8_0>(black_box(&x), Numerics::Precise));
        });
    }
    group.finish();
}

criterion_group!(benches, bandwidth, matvec_all, prepare);
criterion_main!(benches);
