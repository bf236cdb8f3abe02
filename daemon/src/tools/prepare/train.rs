//! Training one layer's activation predictor: `logits = W2 · relu(W1 · x + b1) + b2`, a
//! low-rank two-layer network from the FFN input `x` to "neuron `j` fires", fitted with
//! binary cross-entropy and Adam on minibatches, then shifted so that it keeps a target
//! recall (a missed neuron costs quality, an extra one only time).
//!
//! The inputs are standardized per feature while training (the residual stream has a few
//! very large dimensions) and the scaling is folded into `W1` and `b1` at the end, so the
//! exported predictor reads the raw residual stream like PowerInfer's.

use crate::model::sidecar::{self, PredictorData};

/// Hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct TrainConfig {
    pub rank: usize,
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    /// Share of the active neurons of held-back training tokens the shifted predictor
    /// must still catch.
    pub target_recall: f32,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rank: 128,
            epochs: 10,
            batch: 64,
            learning_rate: 2e-3,
            target_recall: 0.95,
            seed: 0x5eed,
        }
    }
}

/// One layer's calibration data: FFN inputs, activated-gate magnitudes, and the threshold
/// above which a neuron counts as active.
pub struct LayerData<'a> {
    /// `[tokens × n_embd]`
    pub x: &'a [f32],
    /// `[tokens × n_ff]`: per neuron, the value (`|act(gate)|` or `|h|`) that makes it a
    /// positive where it is above `threshold`.
    pub score: &'a [f32],
    pub threshold: f32,
    pub n_embd: usize,
    pub n_ff: usize,
}

impl LayerData<'_> {
    fn x(&self, t: usize) -> &[f32] {
        &self.x[t * self.n_embd..(t + 1) * self.n_embd]
    }

    fn label(&self, t: usize, j: usize) -> bool {
        self.score[t * self.n_ff + j] > self.threshold
    }
}

/// How well a predictor does on some tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Eval {
    /// Active neurons predicted active.
    pub recall: f32,
    /// Predicted-active neurons that are active.
    pub precision: f32,
    /// Share of neurons predicted active (what predictor mode computes).
    pub predicted: f32,
    /// Share of neurons active.
    pub actual: f32,
}

/// Trains on the `train` tokens, picks the shift on the `val` ones and evaluates on
/// `test`; the predictor is evaluated in the form the sidecar stores.
pub fn train_layer(
    data: &LayerData<'_>,
    train: &[usize],
    val: &[usize],
    test: &[usize],
    cfg: &TrainConfig,
) -> (PredictorData, Eval) {
    let (d, n, r) = (data.n_embd, data.n_ff, cfg.rank.max(1));
    let (mean, scale) = standardization(data, train);
    let mut rng = SplitMix(cfg.seed);
    let mut net = Net::new(d, r, n, &mut rng);
    // Start every neuron at its base rate.
    let mut rate = vec![0f64; n];
    for &t in train {
        for (j, c) in rate.iter_mut().enumerate() {
            *c += f64::from(u8::from(data.label(t, j)));
        }
    }
    for (b, c) in net.b2.iter_mut().zip(&rate) {
        let p = (c / train.len().max(1) as f64).clamp(1e-3, 1.0 - 1e-3);
        *b = (p / (1.0 - p)).ln() as f32;
    }

    let mut adam = Adam::new(&net);
    let mut order = train.to_vec();
    let mut ws = Workspace::default();
    for _ in 0..cfg.epochs {
        rng.shuffle(&mut order);
        for batch in order.chunks(cfg.batch.max(1)) {
            ws.load(data, batch, &mean, &scale);
            net.step(&mut ws, &mut adam, cfg.learning_rate);
        }
    }

    let mut p = net.export(&mean, &scale);
    let (_, fc1) = sidecar::stored_form(&p.fc1, r, d);
    let (_, fc2) = sidecar::stored_form(&p.fc2, n, r);
    p.fc1 = fc1;
    p.fc2 = fc2;
    let shift = recall_shift(data, &p, val, cfg.target_recall);
    p.b2.iter_mut().for_each(|b| *b += shift);
    let eval = evaluate(data, &p, test);
    (p, eval)
}

/// Per-feature mean and 1/std over the training tokens (std floored at a tenth of the
/// median, so near-constant features do not blow up the folded weights).
fn standardization(data: &LayerData<'_>, train: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let d = data.n_embd;
    let (mut s1, mut s2) = (vec![0f64; d], vec![0f64; d]);
    for &t in train {
        for (i, &v) in data.x(t).iter().enumerate() {
            s1[i] += f64::from(v);
            s2[i] += f64::from(v) * f64::from(v);
        }
    }
    let m = train.len().max(1) as f64;
    let mean: Vec<f32> = s1.iter().map(|s| (s / m) as f32).collect();
    let mut sd: Vec<f64> = s1
        .iter()
        .zip(&s2)
        .map(|(a, b)| (b / m - (a / m) * (a / m)).max(0.0).sqrt())
        .collect();
    let mut sorted = sd.clone();
    sorted.sort_by(f64::total_cmp);
    let floor = (sorted[d / 2] * 0.1).max(1e-6);
    sd.iter_mut().for_each(|s| *s = s.max(floor));
    (mean, sd.iter().map(|s| (1.0 / s) as f32).collect())
}

/// Logits of one token under an exported predictor.
fn logits(p: &PredictorData, x: &[f32], hidden: &mut Vec<f32>, out: &mut Vec<f32>) {
    let r = p.rank;
    hidden.clear();
    hidden.extend((0..r).map(|i| {
        let row = &p.fc1[i * x.len()..(i + 1) * x.len()];
        (dot(row, x) + p.b1[i]).max(0.0)
    }));
    out.clear();
    out.extend(
        p.b2.iter()
            .enumerate()
            .map(|(j, b)| dot(&p.fc2[j * r..(j + 1) * r], hidden) + b),
    );
}

/// The shift (≥ 0) to add to every logit so that at least `target` of the active neurons
/// of `tokens` reach the threshold 0.
fn recall_shift(data: &LayerData<'_>, p: &PredictorData, tokens: &[usize], target: f32) -> f32 {
    let (mut hidden, mut z) = (Vec::new(), Vec::new());
    let mut positives = Vec::new();
    for &t in tokens {
        logits(p, data.x(t), &mut hidden, &mut z);
        positives.extend((0..data.n_ff).filter(|&j| data.label(t, j)).map(|j| z[j]));
    }
    if positives.is_empty() {
        return 0.0;
    }
    positives.sort_by(f32::total_cmp);
    let miss = ((1.0 - target.clamp(0.0, 1.0)) * positives.len() as f32) as usize;
    // Logits at or above positives[miss] pass after the shift; a predictor that already
    // catches more is left alone (the shift only ever adds neurons).
    (-positives[miss.min(positives.len() - 1)]).max(0.0)
}

/// Recall and precision of `p` (threshold 0) on `tokens`.
pub fn evaluate(data: &LayerData<'_>, p: &PredictorData, tokens: &[usize]) -> Eval {
    let (mut hidden, mut z) = (Vec::new(), Vec::new());
    let (mut tp, mut fp, mut fne) = (0u64, 0u64, 0u64);
    for &t in tokens {
        logits(p, data.x(t), &mut hidden, &mut z);
        for (j, &zj) in z.iter().enumerate() {
            match (zj >= 0.0, data.label(t, j)) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fne += 1,
                (false, false) => {}
            }
        }
    }
    let all = (tokens.len() * data.n_ff).max(1) as f32;
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f32 / b as f32 };
    Eval {
        recall: ratio(tp, tp + fne),
        precision: ratio(tp, tp + fp),
        predicted: (tp + fp) as f32 / all,
        actual: (tp + fne) as f32 / all,
    }
}

/// The network being trained, on standardized inputs.
struct Net {
    d: usize,
    r: usize,
    n: usize,
    /// `[r × d]`
    w1: Vec<f32>,
    b1: Vec<f32>,
    /// `[n × r]`
    w2: Vec<f32>,
    b2: Vec<f32>,
}

/// A minibatch and the forward/backward buffers for it.
#[derive(Default)]
struct Workspace {
    m: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    z1: Vec<f32>,
    h: Vec<f32>,
    g2: Vec<f32>,
    dh: Vec<f32>,
}

impl Workspace {
    fn load(&mut self, data: &LayerData<'_>, batch: &[usize], mean: &[f32], scale: &[f32]) {
        self.m = batch.len();
        self.x.clear();
        self.y.clear();
        for &t in batch {
            let row = data.x(t);
            self.x.extend(
                row.iter()
                    .zip(mean)
                    .zip(scale)
                    .map(|((v, m), s)| (v - m) * s),
            );
            self.y
                .extend((0..data.n_ff).map(|j| f32::from(u8::from(data.label(t, j)))));
        }
    }
}

impl Net {
    fn new(d: usize, r: usize, n: usize, rng: &mut SplitMix) -> Self {
        let (s1, s2) = ((2.0 / d as f32).sqrt(), (1.0 / r as f32).sqrt());
        Self {
            d,
            r,
            n,
            w1: (0..r * d).map(|_| rng.normal() * s1).collect(),
            b1: vec![0.0; r],
            w2: (0..n * r).map(|_| rng.normal() * s2).collect(),
            b2: vec![0.0; n],
        }
    }

    /// One Adam step on the minibatch in `ws` (mean binary cross-entropy).
    fn step(&mut self, ws: &mut Workspace, adam: &mut Adam, lr: f32) {
        let (d, r, n, m) = (self.d, self.r, self.n, ws.m);
        ws.z1.resize(m * r, 0.0);
        ws.h.resize(m * r, 0.0);
        ws.g2.resize(m * n, 0.0);
        ws.dh.clear();
        ws.dh.resize(m * r, 0.0);
        for t in 0..m {
            let x = &ws.x[t * d..(t + 1) * d];
            for i in 0..r {
                let z = dot(&self.w1[i * d..(i + 1) * d], x) + self.b1[i];
                ws.z1[t * r + i] = z;
                ws.h[t * r + i] = z.max(0.0);
            }
            let h = &ws.h[t * r..(t + 1) * r];
            for j in 0..n {
                let z = dot(&self.w2[j * r..(j + 1) * r], h) + self.b2[j];
                let p = 1.0 / (1.0 + (-z).exp());
                ws.g2[t * n + j] = (p - ws.y[t * n + j]) / m as f32;
            }
        }
        let g = &mut adam.grads;
        g.iter_mut().for_each(|v| v.fill(0.0));
        let [gw1, gb1, gw2, gb2] = g;
        for t in 0..m {
            let h = &ws.h[t * r..(t + 1) * r];
            let dh = &mut ws.dh[t * r..(t + 1) * r];
            for j in 0..n {
                let e = ws.g2[t * n + j];
                gb2[j] += e;
                axpy(e, h, &mut gw2[j * r..(j + 1) * r]);
                axpy(e, &self.w2[j * r..(j + 1) * r], dh);
            }
            let x = &ws.x[t * d..(t + 1) * d];
            for i in 0..r {
                if ws.z1[t * r + i] > 0.0 {
                    let e = dh[i];
                    gb1[i] += e;
                    axpy(e, x, &mut gw1[i * d..(i + 1) * d]);
                }
            }
        }
        adam.apply([&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2], lr);
    }

    /// The predictor on raw inputs: `W1·((x − mean)·scale) + b1 = (W1·scale)·x + (b1 −
    /// (W1·scale)·mean)`.
    fn export(&self, mean: &[f32], scale: &[f32]) -> PredictorData {
        let (d, r) = (self.d, self.r);
        let mut fc1 = self.w1.clone();
        let mut b1 = self.b1.clone();
        for i in 0..r {
            let row = &mut fc1[i * d..(i + 1) * d];
            row.iter_mut().zip(scale).for_each(|(w, s)| *w *= s);
            b1[i] -= dot(row, mean);
        }
        PredictorData {
            rank: r,
            fc1,
            fc2: self.w2.clone(),
            b1,
            b2: self.b2.clone(),
        }
    }
}

/// Adam's moments for the four parameter tensors, and their gradients.
struct Adam {
    grads: [Vec<f32>; 4],
    m: [Vec<f32>; 4],
    v: [Vec<f32>; 4],
    t: i32,
}

impl Adam {
    fn new(net: &Net) -> Self {
        let sizes = [net.w1.len(), net.b1.len(), net.w2.len(), net.b2.len()];
        let zeros = || sizes.map(|s| vec![0.0; s]);
        Self {
            grads: zeros(),
            m: zeros(),
            v: zeros(),
            t: 0,
        }
    }

    fn apply(&mut self, params: [&mut Vec<f32>; 4], lr: f32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        self.t += 1;
        let (c1, c2) = (1.0 - B1.powi(self.t), 1.0 - B2.powi(self.t));
        for (k, p) in params.into_iter().enumerate() {
            let (g, m, v) = (&self.grads[k], &mut self.m[k], &mut self.v[k]);
            for i in 0..p.len() {
                m[i] = B1 * m[i] + (1.0 - B1) * g[i];
                v[i] = B2 * v[i] + (1.0 - B2) * g[i] * g[i];
                p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
            }
        }
    }
}

/// `a · b` with eight running sums (vectorizes without reassociation licence).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a · x`
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// SplitMix64: small, seeded, good enough for initialization and shuffling.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer whose neuron `j` fires where `w_j · x > 0` for random `w_j`: the predictor
    /// must learn it from a few thousand samples.
    #[test]
    fn learns_a_linear_firing_rule() {
        let (d, n, tokens) = (32, 48, 3000);
        let mut rng = SplitMix(7);
        let w: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
        let x: Vec<f32> = (0..tokens * d).map(|_| rng.normal() * 3.0 + 1.0).collect();
        let gate: Vec<f32> = (0..tokens)
            .flat_map(|t| {
                let x = &x[t * d..(t + 1) * d];
                (0..n)
                    .map(|j| dot(&w[j * d..(j + 1) * d], x).max(0.0))
                    .collect::<Vec<_>>()
            })
            .collect();
        let data = LayerData {
            x: &x,
            score: &gate,
            threshold: 0.0,
            n_embd: d,
            n_ff: n,
        };
        let all: Vec<usize> = (0..tokens).collect();
        let (train, rest) = all.split_at(2400);
        let (val, test) = rest.split_at(300);
        let cfg = TrainConfig {
            rank: 32,
            epochs: 20,
            ..TrainConfig::default()
        };
        let (p, eval) = train_layer(&data, train, val, test, &cfg);
        assert_eq!((p.rank, p.fc1.len(), p.fc2.len()), (32, 32 * d, n * 32));
        assert!((eval.actual - 0.5).abs() < 0.05, "{eval:?}");
        assert!(eval.recall >= 0.9, "{eval:?}");
        assert!(eval.precision >= 0.8, "{eval:?}");
    }

    #[test]
    fn the_shift_reaches_the_target_recall_on_its_tokens() {
        let (d, n, tokens) = (32, 16, 400);
        let mut rng = SplitMix(3);
        let x: Vec<f32> = (0..tokens * d).map(|_| rng.normal()).collect();
        // Labels the predictor cannot know (independent noise).
        let gate: Vec<f32> = (0..tokens * n).map(|_| rng.normal().max(0.0)).collect();
        let data = LayerData {
            x: &x,
            score: &gate,
            threshold: 0.0,
            n_embd: d,
            n_ff: n,
        };
        let all: Vec<usize> = (0..tokens).collect();
        let cfg = TrainConfig {
            rank: 32,
            epochs: 2,
            target_recall: 0.9,
            ..TrainConfig::default()
        };
        let (p, _) = train_layer(&data, &all, &all, &all, &cfg);
        let eval = evaluate(&data, &p, &all);
        assert!(eval.recall >= 0.9, "{eval:?}");
    }
}
