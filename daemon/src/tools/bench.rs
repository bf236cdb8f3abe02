//! `powerinferd bench`: prompt processing (`ppN`) and text generation (`tgN`) speed, as
//! llama-bench measures them, so the two tools' numbers line up.
//!
//! - `ppN`: N random tokens in one batch from an empty cache (logits of the last only).
//! - `tgN`: N tokens one at a time from an empty cache, logits every step, no sampling.
//!
//! Each test runs once unmeasured (warm-up), then `repetitions` measured times.

use std::time::Instant;

use powerinfer_ops::rng::Rng;

use crate::generation::{GenerateError, LoadedModel, PREFILL_BATCH, Session, SessionOptions};
use crate::ids::TokenId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    Prompt(usize),
    Generate(usize),
}

impl Test {
    pub fn name(self) -> String {
        match self {
            Self::Prompt(n) => format!("pp{n}"),
            Self::Generate(n) => format!("tg{n}"),
        }
    }

    fn n_tokens(self) -> usize {
        match self {
            Self::Prompt(n) | Self::Generate(n) => n,
        }
    }
}

/// The measured samples of one test.
#[derive(Clone, Debug)]
pub struct Record {
    pub test: Test,
    pub n_threads: usize,
    /// Seconds per repetition.
    pub samples: Vec<f64>,
}

impl Record {
    /// Tokens per second of each repetition.
    pub fn samples_ts(&self) -> Vec<f64> {
        let n = self.test.n_tokens() as f64;
        self.samples.iter().map(|s| n / s).collect()
    }

    pub fn avg_ts(&self) -> f64 {
        mean(&self.samples_ts())
    }

    pub fn stddev_ts(&self) -> f64 {
        stddev(&self.samples_ts())
    }

    pub fn avg_ns(&self) -> f64 {
        mean(&self.samples) * 1e9
    }

    pub fn stddev_ns(&self) -> f64 {
        stddev(&self.samples) * 1e9
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Sample standard deviation (as llama-bench reports it).
fn stddev(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Runs one test `repetitions` times (after a warm-up) with the given session settings.
pub fn run_test(
    loaded: &LoadedModel,
    test: Test,
    repetitions: usize,
    opts: SessionOptions,
    seed: u64,
) -> Result<Record, GenerateError> {
    let n = test.n_tokens();
    let mut session = Session::new(
        loaded,
        SessionOptions {
            n_ctx: n + 1,
            ..opts
        },
    )?;
    let n_vocab = loaded.model.config.n_vocab as u64;
    let mut rng = Rng::new(seed);
    let mut samples = Vec::with_capacity(repetitions);
    for rep in 0..=repetitions {
        let tokens: Vec<TokenId> = (0..n).map(|_| TokenId(rng.below(n_vocab) as u32)).collect();
        let started = Instant::now();
        match test {
            Test::Prompt(_) => {
                for (i, chunk) in tokens.chunks(PREFILL_BATCH).enumerate() {
                    let last = (i + 1) * PREFILL_BATCH >= n;
                    session.eval(chunk, i * PREFILL_BATCH, |j| last && j == chunk.len() - 1)?;
                }
            }
            Test::Generate(_) => {
                for (pos, &t) in tokens.iter().enumerate() {
                    session.eval(&[t], pos, |_| true)?;
                }
            }
        }
        // Repetition 0 warms caches and page-ins and is not counted.
        if rep > 0 {
            samples.push(started.elapsed().as_secs_f64());
        }
    }
    let prof = session.profile();
    if prof.enabled() {
        let total: f64 = prof.report().iter().map(|(_, d)| d.as_secs_f64()).sum();
        eprintln!(
            "profile of {} ({} passes, per pass):",
            test.name(),
            prof.passes
        );
        for (stage, d) in prof.report() {
            let per = d.as_secs_f64() / prof.passes as f64;
            eprintln!(
                "  {:<20} {:>9.1} us  {:>5.1}%",
                stage.name(),
                per * 1e6,
                100.0 * d.as_secs_f64() / total
            );
        }
    }
    Ok(Record {
        test,
        n_threads: opts.n_threads,
        samples,
    })
}
