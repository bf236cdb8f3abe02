//! `cargo bench -p powerinfer-ops --bench sparse`: one token through a whole FFN, dense
//! (gate and up matrix × vector, SwiGLU, down matrix × vector) against the fused
//! neuron-sparse FFN (gate, up and down_t rows of the active neurons only) at falling
//! active fractions, at the SmolLM2 shape (576 → 1536, Q4_1) and a 7B shape
//! (4096 → 11008, Q4_0). The ratio sparse/dense at each fraction is the curve to report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use powerinfer_ops::nn::{self, Glu};
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::rng::Rng;
use powerinfer_ops::sparse::{ActiveSet, SparseFfn, SparseScratch};
use powerinfer_ops::tensor::{Activations, Matrix};

const SHAPES: [(&str, usize, usize, WeightType); 2] = [
    ("smollm2", 576, 1536, WeightType::Q4_1),
    ("7b", 4096, 11008, WeightType::Q4_0),
];
const PERCENT_ACTIVE: [u32; 6] = [100, 70, 50, 30, 10, 5];
const THREADS: [usize; 2] = [1, 2];

fn random(rng: &mut Rng, wtype: WeightType, n_rows: usize, n_cols: usize) -> Matrix {
    let v = rng.varied(n_rows * n_cols, 32);
    Matrix::quantize(wtype, &v, n_rows, n_cols)
}

fn ffn(c: &mut Criterion) {
    let pools: Vec<ThreadPool> = THREADS
        .iter()
        .map(|&n| ThreadPool::new(n, "bench").unwrap())
        .collect();
    let mut rng = Rng::new(7);
    for (name, n_embd, n_ff, wtype) in SHAPES {
        let mut group = c.benchmark_group(format!("ffn/{name}-{wtype:?}"));
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(2));
        group.sample_size(20);
        let gate = random(&mut rng, wtype, n_ff, n_embd);
        let up = random(&mut rng, wtype, n_ff, n_embd);
        let down = random(&mut rng, wtype, n_embd, n_ff);
        // The neuron-major form the daemon makes from a quantized file: Q8_0 (a 4-bit
        // type quantized again after transposing loses too much).
        let down_t = down.transposed_as(WeightType::Q8_0);
        let x = rng.varied(n_embd, 32);
        let (mut g, mut u, mut out) = (vec![0.0; n_ff], vec![0.0; n_ff], vec![0.0; n_embd]);
        let mut acts = Activations::new();
        let mut h_acts = Activations::new();
        let mut scratch = SparseScratch::default();
        for pool in &pools {
            let t = format!("t{}", pool.n_threads());
            group.bench_function(BenchmarkId::new("dense", &t), |b| {
                b.iter(|| {
                    acts.set(&x, 1);
                    gate.matmul(pool, &mut acts, &mut g);
                    up.matmul(pool, &mut acts, &mut u);
                    nn::silu_mul(&mut g, &u);
                    h_acts.set(&g, 1);
                    down.matmul(pool, &mut h_acts, &mut out);
                });
            });
            for pct in PERCENT_ACTIVE {
                let mut active = ActiveSet::new(n_ff);
                let keep: Vec<bool> = (0..n_ff).map(|_| rng.below(100) < u64::from(pct)).collect();
                active.push_where(|i| keep[i]);
                group.bench_function(BenchmarkId::new(format!("sparse{pct}"), &t), |b| {
                    b.iter(|| {
                        acts.set(&x, 1);
                        SparseFfn::new(&gate, &up, &down_t, Glu::Silu).run(
                            pool,
                            &mut acts,
                            &active,
                            &mut scratch,
                            &mut out,
                        );
                    });
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, ffn);
criterion_main!(benches);
