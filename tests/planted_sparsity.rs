//! `powerinferd synth`: the model it writes loads, runs, and has the sparsity it was asked
//! for — measured by running it (the activations `prepare` records), not read back from
//! what the generator meant: the active share per token, the share of the activations the
//! planted-hot neurons carry, the planted frequencies against the measured ones, and the
//! recall of the predictors it wrote. And the same arguments give the same bytes on any
//! number of threads.

use std::path::Path;

use powerinfer_daemon::generation::{LoadedModel, Session, SessionOptions};
use powerinfer_daemon::ids::TokenId;
use powerinfer_daemon::model::{Capture, SparsityMode};
use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::quant::Numerics;
use powerinfer_ops::rng::Rng;
use powerinfer_ops::transformer::PredictorScratch;
use powerinfer_tests::{TempDir, powerinferd};

const CHUNK: usize = 96;
const CHUNKS: usize = 4;

/// What running the model over random text showed, per layer.
struct Measured {
    /// Mean share of neurons active per token.
    active: Vec<f64>,
    /// Share of the activations on the planted top 20%.
    hot_mass: Vec<f64>,
    /// Pearson correlation of planted and measured frequencies.
    correlation: Vec<f64>,
    /// Active neurons the predictor predicted.
    recall: Vec<f64>,
    /// Share of neurons the predictor predicted.
    predicted: Vec<f64>,
}

fn measure(path: &Path) -> Measured {
    let loaded = LoadedModel::load_for(path, SparsityMode::Predictor).unwrap();
    let c = loaded.model.config.clone();
    let mut s = Session::new(&loaded, SessionOptions::new(CHUNK * CHUNKS, 2)).unwrap();
    s.set_capture(Some(Capture::new(c.n_layer)));
    let mut rng = Rng::new(99);
    for k in 0..CHUNKS {
        let toks: Vec<TokenId> = (0..CHUNK)
            .map(|_| TokenId(rng.below(c.n_vocab as u64) as u32))
            .collect();
        s.eval(&toks, k * CHUNK, |_| false).unwrap();
    }
    let cap = s.take_capture().unwrap();
    drop(s);
    let n_tok = CHUNK * CHUNKS;
    let sp = &loaded.model.sparsity;
    let planted = sp.frequencies.as_ref().expect("planted frequencies");
    let predictors = sp.predictors.as_ref().expect("predictors");
    let pool = ThreadPool::new(2, "planted").unwrap();
    let mut scratch = PredictorScratch::new(Numerics::Precise);
    let n_ff = c.n_ff;
    let mut m = Measured {
        active: vec![],
        hot_mass: vec![],
        correlation: vec![],
        recall: vec![],
        predicted: vec![],
    };
    for l in 0..c.n_layer {
        let fired: Vec<bool> = cap.gate[l].iter().map(|&g| g > 0.0).collect();
        assert_eq!(fired.len(), n_tok * n_ff);
        let mut freq = vec![0f64; n_ff];
        for row in fired.chunks_exact(n_ff) {
            for (f, &a) in freq.iter_mut().zip(row) {
                *f += f64::from(u8::from(a));
            }
        }
        let total: f64 = freq.iter().sum();
        m.active.push(total / (n_tok * n_ff) as f64);
        let mut by_plant: Vec<usize> = (0..n_ff).collect();
        by_plant.sort_by(|&a, &b| planted[l][b].total_cmp(&planted[l][a]));
        let k = n_ff / 5;
        m.hot_mass
            .push(by_plant[..k].iter().map(|&i| freq[i]).sum::<f64>() / total);
        let p: Vec<f64> = planted[l].iter().map(|&v| f64::from(v)).collect();
        let f: Vec<f64> = freq.iter().map(|v| v / n_tok as f64).collect();
        m.correlation.push(pearson(&p, &f));

        predictors[l].logits(&pool, &cap.x[l], n_tok, &mut scratch);
        let thr = sp.predictor_threshold;
        let (mut hit, mut pos, mut said) = (0u64, 0u64, 0u64);
        for (&z, &a) in scratch.logits().iter().zip(&fired) {
            let yes = z >= thr;
            said += u64::from(yes);
            pos += u64::from(a);
            hit += u64::from(yes && a);
        }
        m.recall.push(hit as f64 / pos.max(1) as f64);
        m.predicted.push(said as f64 / (n_tok * n_ff) as f64);
    }
    m
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

fn synth(dir: &TempDir, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let path = dir.join(&format!("{name}.gguf"));
    let mut args = vec!["synth", path.to_str().unwrap(), "--shape", "tiny"];
    args.extend_from_slice(extra);
    let r = powerinferd(&args);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(r.stdout.contains("planted: 10.0%"), "{}", r.stdout);
    path
}

#[test]
fn a_synthesized_model_has_the_sparsity_it_was_planted_with() {
    let dir = TempDir::new("planted");
    for (name, extra) in [
        ("reglu-q4_0", &[][..]),
        (
            "drelu-q4_k",
            &["--activation", "drelu", "--dtype", "q4_k"][..],
        ),
    ] {
        let m = measure(&synth(&dir, name, extra));
        for l in 0..m.active.len() {
            eprintln!(
                "{name} layer {l}: active {:.3}, planted-hot share {:.3}, correlation {:.3}, \
                 predictor recall {:.3} predicting {:.3}",
                m.active[l], m.hot_mass[l], m.correlation[l], m.recall[l], m.predicted[l]
            );
            // Asked for: 10% active, the top 20% carrying 80%.
            assert!(
                (0.07..0.14).contains(&m.active[l]),
                "{name} layer {l}: {:.3} active",
                m.active[l]
            );
            assert!(m.hot_mass[l] > 0.7, "{name} layer {l}: {}", m.hot_mass[l]);
            assert!(
                m.correlation[l] > 0.9,
                "{name} layer {l}: {}",
                m.correlation[l]
            );
            assert!(m.recall[l] > 0.85, "{name} layer {l}: {}", m.recall[l]);
            assert!(
                m.predicted[l] < 2.0 * m.active[l],
                "{name} layer {l}: predicts {}",
                m.predicted[l]
            );
        }
    }
}

#[test]
fn synthesis_is_deterministic_across_thread_counts_and_refuses_bad_shapes() {
    let dir = TempDir::new("planted-same");
    let one = synth(&dir, "one", &["--threads", "1", "--seed", "7"]);
    let two = synth(&dir, "two", &["--threads", "2", "--seed", "7"]);
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap());
    let side = |p: &Path| std::fs::read(p.with_extension("sparsity.gguf")).unwrap();
    assert!(side(&one) == side(&two));
    let other = synth(&dir, "other", &["--seed", "8"]);
    assert!(std::fs::read(&one).unwrap() != std::fs::read(&other).unwrap());

    let out = dir.join("bad.gguf");
    let out = out.to_str().unwrap();
    for (args, says) in [
        (vec!["--shape", "70b"], "unknown shape"),
        (vec!["--dtype", "mxfp4"], "unknown weight type"),
        (vec!["--activation", "silu"], "unknown activation"),
        (
            vec!["--shape", "tiny", "--dtype", "q4_k", "--n-ff", "1000"],
            "block of 256",
        ),
        (
            vec!["--shape", "tiny", "--active", "1.5"],
            "active fraction",
        ),
        (
            vec![
                "--shape",
                "tiny",
                "--hot-fraction",
                "0.01",
                "--hot-mass",
                "0.99",
            ],
            "can carry at most",
        ),
    ] {
        let mut a = vec!["synth", out];
        a.extend(args);
        let r = powerinferd(&a);
        assert_eq!(r.status, 2, "{a:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{a:?}: {}", r.stderr);
        assert!(!Path::new(out).exists(), "{a:?}: nothing written");
    }
}
