//! `cargo bench -p powerinfer-ops --bench sparse_min`: the dense and the sparse FFN of
//! `benches/sparse.rs`, timed alternately, 60 trials each, reporting the fastest trial.
//! On a shared machine whose neighbours come and go, the minimum of many short trials
//! taken in turns is a steadier estimate of a ratio than medians taken minutes apart.
//! Optional arguments: a shape (`smollm2`, `7b`), active percentages, `xN` (N layers of
//! weights taken in turn, so that they come from memory rather than cache, as in a
//! model) and `clustered` (the active neurons are the first ones rather than random).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use powerinfer_ops::nn::{self, Glu};
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::rng::Rng;
use powerinfer_ops::sparse::{ActiveSet, SparseFfn, SparseScratch};
use powerinfer_ops::tensor::{Activations, Matrix};

const TRIALS: usize = 60;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let shapes: Vec<(&str, usize, usize, WeightType, usize)> = [
        ("smollm2", 576, 1536, WeightType::Q4_1, 400),
        ("7b", 4096, 11008, WeightType::Q4_0, 20),
    ]
    .into_iter()
    .filter(|s| {
        let named = |a: &String| a == "smollm2" || a == "7b";
        !args.iter().any(named) || args.contains(&s.0.to_string())
    })
    .collect();
    let pcts: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let n_layers: usize = args
        .iter()
        .find_map(|a| a.strip_prefix('x')?.parse().ok())
        .unwrap_or(1);
    let clustered = args.iter().any(|a| a == "clustered");
    let pcts = if pcts.is_empty() {
        vec![100, 50, 10]
    } else {
        pcts
    };
    println!(
        "{:<10}{:>8}{:>9}{:>12}{:>12}{:>9}",
        "shape", "threads", "active", "dense µs", "sparse µs", "ratio"
    );
    for (name, n_embd, n_ff, wtype, iters) in shapes {
        let mut rng = Rng::new(7);
        let mut random = |r, c| Matrix::quantize(wtype, &rng.varied(r * c, 32), r, c);
        let layers: Vec<[Matrix; 4]> = (0..n_layers)
            .map(|_| {
                let (gate, up, down) = (
                    random(n_ff, n_embd),
                    random(n_ff, n_embd),
                    random(n_embd, n_ff),
                );
                let down_t = down.transposed_as(WeightType::Q8_0);
                [gate, up, down, down_t]
            })
            .collect();
        // One buffer for all layers, as a loaded model has (huge pages where allowed).
        let all: Vec<&Matrix> = layers.iter().flatten().collect();
        let mut packed = Matrix::pack(&all).into_iter();
        let layers: Vec<[Matrix; 4]> = (0..n_layers)
            .map(|_| std::array::from_fn(|_| packed.next().unwrap()))
            .collect();
        let x = rng.varied(n_embd, 32);
        let (mut g, mut u, mut out) = (vec![0.0; n_ff], vec![0.0; n_ff], vec![0.0; n_embd]);
        let (mut acts, mut h_acts) = (Activations::new(), Activations::new());
        let mut scratch = SparseScratch::default();
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads, "bench").unwrap();
            for &pct in &pcts {
                let actives: Vec<ActiveSet> = (0..n_layers)
                    .map(|_| {
                        let mut active = ActiveSet::new(n_ff);
                        let keep: Vec<bool> = (0..n_ff)
                            .map(|i| {
                                if clustered {
                                    (i as u64) * 100 < pct * n_ff as u64
                                } else {
                                    rng.below(100) < pct
                                }
                            })
                            .collect();
                        active.push_where(|i| keep[i]);
                        active
                    })
                    .collect();
                let mut best = [f64::MAX; 2];
                for _ in 0..TRIALS {
                    for (sparse, b) in best.iter_mut().enumerate() {
                        let start = Instant::now();
                        for it in 0..iters {
                            let [gate, up, down, down_t] = &layers[it % n_layers];
                            let active = &actives[it % n_layers];
                            acts.set(&x, 1);
                            if sparse == 0 {
                                gate.matmul(&pool, &mut acts, &mut g);
                                up.matmul(&pool, &mut acts, &mut u);
                                nn::silu_mul(&mut g, &u);
                                h_acts.set(&g, 1);
                                down.matmul(&pool, &mut h_acts, &mut out);
                            } else {
                                SparseFfn::new(gate, up, down_t, Glu::Silu).run(
                                    &pool,
                                    &mut acts,
                                    active,
                                    &mut scratch,
                                    &mut out,
                                );
                            }
                        }
                        *b = b.min(start.elapsed().as_secs_f64() * 1e6 / iters as f64);
                    }
                }
                println!(
                    "{name:<10}{:>8}{:>8}%{:>12.1}{:>12.1}{:>9.3}",
                    format!("t{threads}"),
                    pct,
                    best[0],
                    best[1],
                    best[1] / best[0]
                );
            }
        }
    }
}
