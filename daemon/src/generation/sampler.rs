//! Choosing the next token from logits: greedy, or a seeded draw after repetition /
//! frequency / presence penalties over a window, top-k, top-p, min-p and temperature, in
//! llama.cpp's order. Reports the chosen token's log-probability and the top-n others.

use std::collections::{HashMap, VecDeque};

use powerinfer_ops::rng::Rng;

use crate::ids::TokenId;

/// Sampling parameters. The defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 (or less) picks the most likely token.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens (1: off).
    pub repeat_penalty: f32,
    /// Subtract `count ×` this from recent tokens' logits.
    pub frequency_penalty: f32,
    /// Subtract this from logits of tokens seen in the window.
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    pub seed: u64,
    /// Alternatives to report with each token's log-probability.
    pub n_logprobs: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
            n_logprobs: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Refuses values that cannot mean anything, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let bad =
            |name: &str, v: f32, range: &str| Err(format!("{name} {v} is out of range ({range})"));
        if !self.temperature.is_finite() {
            return bad("temperature", self.temperature, "a finite number");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad("top_p", self.top_p, "0 to 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "0 to 1");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty", self.repeat_penalty, "greater than 0");
        }
        if !self.frequency_penalty.is_finite() || !self.presence_penalty.is_finite() {
            return Err("penalties must be finite".into());
        }
        Ok(())
    }
}

/// A seed for requests that give none: different on every call.
pub fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    (t ^ (u64::from(std::process::id()) << 32)).wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// One chosen token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    /// log-softmax of the raw logits at the chosen token.
    pub logprob: f32,
    /// The `n_logprobs` most likely tokens with their log-probabilities.
    pub top: Vec<(TokenId, f32)>,
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    recent: VecDeque<TokenId>,
    counts: HashMap<TokenId, u32>,
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        Self {
            rng: Rng::new(cfg.seed),
            cfg,
            recent: VecDeque::new(),
            counts: HashMap::new(),
            cand: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Records a token (of the prompt or generated) for the penalties.
    pub fn accept(&mut self, t: TokenId) {
        if self.cfg.penalty_last_n == 0 {
            return;
        }
        self.recent.push_back(t);
        *self.counts.entry(t).or_insert(0) += 1;
        if self.recent.len() > self.cfg.penalty_last_n
            && let Some(old) = self.recent.pop_front()
            && let Some(c) = self.counts.get_mut(&old)
        {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&old);
            }
        }
    }

    /// Picks the next token from `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let c = self.cfg.clone();
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let penalized =
            c.repeat_penalty != 1.0 || c.frequency_penalty != 0.0 || c.presence_penalty != 0.0;
        if penalized {
            for (&t, &n) in &self.counts {
                if let Some((_, l)) = self.cand.get_mut(t.index()) {
                    if *l > 0.0 {
                        *l /= c.repeat_penalty;
                    } else {
                        *l *= c.repeat_penalty;
                    }
                    *l -= n as f32 * c.frequency_penalty + c.presence_penalty;
                }
            }
        }

        let chosen = if c.temperature <= 0.0 {
            // (`c` is a copy: the draw below borrows `self` mutably.)
            // Greedy: the highest logit, the lowest id among equals.
            self.cand
                .iter()
                .fold((0u32, f32::NEG_INFINITY), |best, &(i, l)| {
                    if l > best.1 { (i, l) } else { best }
                })
                .0
        } else {
            self.draw()
        };

        let lse = log_sum_exp(logits);
        let token = TokenId(chosen);
        let logprob = logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse);
        let top = if c.n_logprobs == 0 {
            Vec::new()
        } else {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            let k = c.n_logprobs.min(idx.len());
            idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            idx.truncate(k);
            idx.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            idx.into_iter()
                .map(|i| (TokenId(i), logits[i as usize] - lse))
                .collect()
        };
        Sampled {
            token,
            logprob,
            top,
        }
    }

    /// The truncation chain and a weighted draw; `cand` holds (id, penalized logit).
    fn draw(&mut self) -> u32 {
        let c = &self.cfg;
        let cand = &mut self.cand;
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.select_nth_unstable_by(c.top_k - 1, by_logit);
            cand.truncate(c.top_k);
        }
        cand.sort_unstable_by(by_logit);
        // Probabilities at temperature 1 for top-p / min-p, as llama.cpp computes them.
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        for p in &mut probs {
            *p /= total;
        }
        let mut keep = cand.len();
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= c.top_p {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if c.min_p > 0.0 {
            let floor = c.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        cand.truncate(keep);
        // Temperature, then a draw proportional to exp(l / T).
        let weights: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| f64::from((l - max) / c.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (w, &(id, _)) in weights.iter().zip(cand.iter()) {
            if r < *w {
                return id;
            }
            r -= w;
        }
        cand[cand.len() - 1].0
    }
}

pub use powerinfer_ops::nn::log_sum_exp;

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 3.0, 0.0]
    }

    #[test]
    fn greedy_takes_the_lowest_id_among_ties_and_reports_logprobs() {
        let mut s = Sampler::new(SamplerConfig {
            n_logprobs: 3,
            ..SamplerConfig::greedy()
        });
        let out = s.sample(&logits());
        assert_eq!(out.token, TokenId(1));
        let lse = log_sum_exp(&logits());
        assert!((out.logprob - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0.0).collect::<Vec<_>>(), [1, 4, 2]);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_bounds_the_choice() {
        let cfg = SamplerConfig {
            temperature: 1.5,
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..SamplerConfig::default()
        };
        let draws = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..200)
                .map(|_| s.sample(&logits()).token.0)
                .collect::<Vec<_>>()
        };
        let a = draws(&cfg);
        assert_eq!(a, draws(&cfg));
        assert!(a.iter().all(|t| [1, 2, 4].contains(t)), "only the top 3");
        assert!(a.contains(&2) && a.contains(&4), "draws vary");
        let other = SamplerConfig { seed: 43, ..cfg };
        assert_ne!(a, draws(&other));
    }

    #[test]
    fn min_p_and_top_p_truncate() {
        // min_p 0.5: only tokens at least half as likely as the best (ids 1 and 4, and 2
        // at e^-0.5 ≈ 0.61).
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: 1,
            ..SamplerConfig::default()
        });
        for _ in 0..100 {
            assert!([1, 2, 4].contains(&s.sample(&logits()).token.0));
        }
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
            min_p: 0.0,
            seed: 1,
            ..SamplerConfig::default()
        });
        for _ in 0..100 {
            assert_eq!(
                s.sample(&logits()).token.0,
                1,
                "top_p 0.3 keeps only the first"
            );
        }
    }

    #[test]
    fn penalties_push_recent_tokens_down() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            presence_penalty: 0.5,
            ..SamplerConfig::greedy()
        });
        s.accept(TokenId(1));
        s.accept(TokenId(4));
        // 3.0 / 2 - 0.5 = 1.0 for ids 1 and 4: id 2 (2.5) wins.
        assert_eq!(s.sample(&logits()).token, TokenId(2));
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let c = SamplerConfig {
            top_p: 1.5,
            ..SamplerConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("top_p"));
    }
}
