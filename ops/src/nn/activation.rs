//! Activations, gated FFN combinations, softmax and element-wise arithmetic.
//!
//! SiLU-gating and softmax run an exp per element on the per-token path (n_ff per layer),
//! so they have AVX2 / AVX-512 forms; each has its scalar form beside it, and the tests
//! compare both against f64.

use super::exp::exp_approx;
use crate::simd::{self, SimdLevel};

/// `x[i] = x[i] · sigmoid(x[i])`.
pub fn silu(x: &mut [f32]) {
    silu_gate(x, None);
}

/// SwiGLU: `gate[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    silu_gate(gate, Some(up));
}

#[inline]
fn silu_scalar(g: f32) -> f32 {
    g / (1.0 + exp_approx(-g))
}

fn silu_gate(gate: &mut [f32], up: Option<&[f32]>) {
    let done = match simd::detected() {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni => {
            // SAFETY: the level says AVX-512F is available.
            unsafe { x86::silu_gate16(gate, up) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            // SAFETY: the level says AVX2 and FMA are available.
            unsafe { x86::silu_gate8(gate, up) }
        }
        _ => 0,
    };
    for i in done..gate.len() {
        let s = silu_scalar(gate[i]);
        gate[i] = match up {
            Some(u) => s * u[i],
            None => s,
        };
    }
}

/// GELU, tanh approximation: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline]
fn gelu_scalar(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    let y = K * x * (1.0 + 0.044_715 * x * x);
    // tanh(y) = 1 - 2 / (1 + e^{2y})
    let t = 1.0 - 2.0 / (1.0 + exp_approx(2.0 * y));
    0.5 * x * (1.0 + t)
}

pub fn gelu(x: &mut [f32]) {
    for v in x {
        *v = gelu_scalar(*v);
    }
}

/// GEGLU: `gate[i] = gelu(gate[i]) · up[i]`.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_scalar(*g) * u;
    }
}

pub fn relu(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// ReGLU: `gate[i] = relu(gate[i]) · up[i]`.
pub fn relu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = g.max(0.0) * u;
    }
}

/// dReLU (Bamboo, TurboSparse): `gate[i] = relu(gate[i]) · relu(up[i])`.
pub fn dual_relu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = g.max(0.0) * u.max(0.0);
    }
}

/// A gated FFN's combination of gate `g` and up `u` into the neuron's value `h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glu {
    /// SwiGLU: `silu(g) · u`.
    Silu,
    /// ReGLU: `relu(g) · u`.
    Relu,
    /// dReLU: `relu(g) · relu(u)`.
    DualRelu,
    /// GEGLU: `gelu(g) · u`.
    Gelu,
}

impl Glu {
    /// `x[i] = act(x[i])`, the gate's activation alone (what gate mode thresholds), with
    /// the arithmetic of [`Self::apply_slice`]: an element's bits depend on it alone.
    pub fn act_slice(self, x: &mut [f32]) {
        match self {
            Self::Silu => silu(x),
            Self::Relu | Self::DualRelu => relu(x),
            Self::Gelu => gelu(x),
        }
    }

    /// `g[i] = h(g[i], u[i])` for every element: [`silu_mul`], [`relu_mul`],
    /// [`dual_relu_mul`] or [`gelu_mul`]. Each element's bits depend on its own inputs
    /// alone, not on its position or the slice length.
    pub fn apply_slice(self, g: &mut [f32], u: &[f32]) {
        match self {
            Self::Silu => silu_mul(g, u),
            Self::Relu => relu_mul(g, u),
            Self::DualRelu => dual_relu_mul(g, u),
            Self::Gelu => gelu_mul(g, u),
        }
    }

    /// Whether an inactive gate (`act(g) = 0`) makes the neuron exactly 0: gate mode is
    /// then exact.
    pub fn gate_is_exact(self) -> bool {
        matches!(self, Self::Relu | Self::DualRelu)
    }
}

/// In-place softmax. An empty slice is left alone; `-inf` entries (masked positions)
/// become 0.
pub fn softmax(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let (done, mut sum) = match simd::detected() {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni => {
            // SAFETY: the level says AVX-512F is available.
            unsafe { x86::exp_sub_sum16(x, max) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            // SAFETY: the level says AVX2 and FMA are available.
            unsafe { x86::exp_sub_sum8(x, max) }
        }
        _ => (0, 0.0),
    };
    for v in &mut x[done..] {
        *v = if *v == f32::NEG_INFINITY {
            0.0
        } else {
            exp_approx(*v - max)
        };
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x {
        *v *= inv;
    }
}

/// `log Σ exp(x)`, stable (0 terms: `-inf`). The exponentials are summed in f32 lanes
/// with the vectorized `exp`; the vocabulary-sized calls of sampling take microseconds.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if !max.is_finite() {
        return max;
    }
    let (done, vec_sum) = match simd::detected() {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni => {
            // SAFETY: the level says AVX-512F is available.
            unsafe { x86::exp_sub_sum16_ro(x, max) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            // SAFETY: the level says AVX2 and FMA are available.
            unsafe { x86::exp_sub_sum8_ro(x, max) }
        }
        _ => (0, 0.0),
    };
    let tail: f32 = x[done..]
        .iter()
        .map(|&v| {
            if v == f32::NEG_INFINITY {
                0.0
            } else {
                exp_approx(v - max)
            }
        })
        .sum();
    max + (vec_sum + tail).ln()
}

/// `a[i] += b[i]`.
pub fn add(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter_mut().zip(b) {
        *a += b;
    }
}

/// `a[i] *= b[i]`.
pub fn mul(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter_mut().zip(b) {
        *a *= b;
    }
}

/// `x[i] *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::exp::x86::{exp8, exp16};

    /// SiLU (times `up` when given) over every element, 8 lanes at a time (a short tail
    /// through a padded copy, so every element gets the same arithmetic); returns the
    /// count done (all).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_gate8(gate: &mut [f32], up: Option<&[f32]>) -> usize {
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let lanes = |g: &mut [f32; 8], u: Option<&[f32; 8]>| {
            // SAFETY: 8-float arrays.
            unsafe {
                let v = _mm256_loadu_ps(g.as_ptr());
                let e = exp8(_mm256_sub_ps(zero, v));
                let mut s = _mm256_div_ps(v, _mm256_add_ps(one, e));
                if let Some(u) = u {
                    s = _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr()));
                }
                _mm256_storeu_ps(g.as_mut_ptr(), s);
            }
        };
        by_groups(gate, up, lanes);
        gate.len()
    }

    /// [`silu_gate8`] with 16 lanes.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn silu_gate16(gate: &mut [f32], up: Option<&[f32]>) -> usize {
        let one = _mm512_set1_ps(1.0);
        let zero = _mm512_setzero_ps();
        let lanes = |g: &mut [f32; 16], u: Option<&[f32; 16]>| {
            // SAFETY: 16-float arrays.
            unsafe {
                let v = _mm512_loadu_ps(g.as_ptr());
                let e = exp16(_mm512_sub_ps(zero, v));
                let mut s = _mm512_div_ps(v, _mm512_add_ps(one, e));
                if let Some(u) = u {
                    s = _mm512_mul_ps(s, _mm512_loadu_ps(u.as_ptr()));
                }
                _mm512_storeu_ps(g.as_mut_ptr(), s);
            }
        };
        by_groups(gate, up, lanes);
        gate.len()
    }

    /// Calls `f` on `gate` (and `up`) N elements at a time, the last partial group through
    /// zero-padded copies.
    #[inline(always)]
    fn by_groups<const N: usize>(
        gate: &mut [f32],
        up: Option<&[f32]>,
        mut f: impl FnMut(&mut [f32; N], Option<&[f32; N]>),
    ) {
        let full = gate.len() / N * N;
        let (body, tail) = gate.split_at_mut(full);
        for (i, g) in body.chunks_exact_mut(N).enumerate() {
            let u = up.map(|u| <&[f32; N]>::try_from(&u[i * N..(i + 1) * N]).expect("N floats"));
            f(g.try_into().expect("N floats"), u);
        }
        if !tail.is_empty() {
            let (mut g, mut u) = ([0f32; N], [0f32; N]);
            g[..tail.len()].copy_from_slice(tail);
            if let Some(up) = up {
                u[..tail.len()].copy_from_slice(&up[full..]);
            }
            f(&mut g, up.map(|_| &u));
            tail.copy_from_slice(&g[..tail.len()]);
        }
    }

    /// `Σ exp(x[i] - max)` over whole groups of 8 without writing; returns (done, sum).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum8_ro(x: &[f32], max: f32) -> (usize, f32) {
        let n = x.len() / 8 * 8;
        let m = _mm256_set1_ps(max);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let keep = _mm256_cmp_ps::<_CMP_NEQ_OQ>(v, ninf);
            acc = _mm256_add_ps(acc, _mm256_and_ps(exp8(_mm256_sub_ps(v, m)), keep));
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 lanes into an 8-element array.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        (n, lanes.iter().sum())
    }

    /// `Σ exp(x[i] - max)` over whole groups of 16 without writing; returns (done, sum).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn exp_sub_sum16_ro(x: &[f32], max: f32) -> (usize, f32) {
        let n = x.len() / 16 * 16;
        let m = _mm512_set1_ps(max);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= x.len().
            let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) };
            let keep = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(v, ninf);
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(v, m))));
        }
        (n, _mm512_reduce_add_ps(acc))
    }

    /// `x[i] = exp(x[i] - max)` over whole groups (masked `-inf` lanes give 0); returns
    /// (elements done, their sum).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum8(x: &mut [f32], max: f32) -> (usize, f32) {
        let n = x.len() / 8 * 8;
        let m = _mm256_set1_ps(max);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= x.len().
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let keep = _mm256_cmp_ps::<_CMP_NEQ_OQ>(v, ninf);
                let e = _mm256_and_ps(exp8(_mm256_sub_ps(v, m)), keep);
                acc = _mm256_add_ps(acc, e);
                _mm256_storeu_ps(x.as_mut_ptr().add(i), e);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 lanes into an 8-element array.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        (n, lanes.iter().sum())
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn exp_sub_sum16(x: &mut [f32], max: f32) -> (usize, f32) {
        let n = x.len() / 16 * 16;
        let m = _mm512_set1_ps(max);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= x.len().
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(i));
                let keep = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(v, ninf);
                let e = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(v, m)));
                acc = _mm512_add_ps(acc, e);
                _mm512_storeu_ps(x.as_mut_ptr().add(i), e);
            }
        }
        (n, _mm512_reduce_add_ps(acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// exp's few-ulp error carried through one division and one product.
    const ACT_REL_TOL: f64 = 2e-6;

    fn close(got: f32, want: f64, scale: f64) -> bool {
        (f64::from(got) - want).abs() <= ACT_REL_TOL * scale.max(1e-30)
    }

    fn inputs(seed: u64, n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let g = (0..n).map(|_| rng.normal() * 4.0).collect();
        let u = (0..n).map(|_| rng.normal()).collect();
        (g, u)
    }

    #[test]
    fn silu_and_swiglu_match_f64() {
        for n in [1, 7, 8, 15, 16, 17, 100, 1536] {
            let (g, u) = inputs(n as u64, n);
            let mut a = g.clone();
            silu(&mut a);
            let mut b = g.clone();
            silu_mul(&mut b, &u);
            for i in 0..n {
                let x = f64::from(g[i]);
                let s = x / (1.0 + (-x).exp());
                assert!(close(a[i], s, s.abs()), "silu({x}) = {}, want {s}", a[i]);
                let su = s * f64::from(u[i]);
                assert!(close(b[i], su, su.abs()), "swiglu at {i}");
            }
        }
    }

    /// The sparse FFN applies the gate to short runs of neurons: an element's bits must
    /// not depend on where in the slice it sits or on the slice's length.
    #[test]
    fn gated_activations_do_not_depend_on_position() {
        let (g, u) = inputs(99, 100);
        for glu in [Glu::Silu, Glu::Relu, Glu::DualRelu, Glu::Gelu] {
            let mut whole = g.clone();
            glu.apply_slice(&mut whole, &u);
            for (start, len) in [(0, 1), (3, 5), (1, 16), (7, 17), (40, 33), (0, 100)] {
                let mut part = g[start..start + len].to_vec();
                glu.apply_slice(&mut part, &u[start..start + len]);
                let same = part
                    .iter()
                    .zip(&whole[start..])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{glu:?} at {start}..+{len}");
            }
        }
    }

    #[test]
    fn gelu_relu_and_gates_match_f64() {
        let (g, u) = inputs(9, 333);
        let gelu64 = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        };
        let mut a = g.clone();
        gelu(&mut a);
        let mut b = g.clone();
        gelu_mul(&mut b, &u);
        let mut c = g.clone();
        relu_mul(&mut c, &u);
        let mut d = g.clone();
        dual_relu_mul(&mut d, &u);
        let mut e = g.clone();
        relu(&mut e);
        for i in 0..g.len() {
            let (x, y) = (f64::from(g[i]), f64::from(u[i]));
            // tanh through exp loses relative precision near 0; compare against |x|.
            assert!(close(a[i], gelu64(x), x.abs() * 4.0), "gelu({x})");
            assert!(
                close(b[i], gelu64(x) * y, (x * y).abs() * 4.0),
                "geglu at {i}"
            );
            assert_eq!(f64::from(c[i]), (x.max(0.0) as f32 * u[i]) as f64);
            assert_eq!(d[i], g[i].max(0.0) * u[i].max(0.0));
            assert_eq!(e[i], g[i].max(0.0));
        }
    }

    #[test]
    fn softmax_matches_f64_and_handles_masks() {
        let mut rng = Rng::new(3);
        for n in [1, 5, 16, 33, 512, 1000] {
            let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 5.0).collect();
            if n > 3 {
                x[1] = f32::NEG_INFINITY;
                x[n - 1] = f32::NEG_INFINITY;
            }
            let max = x
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let exps: Vec<f64> = x.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let mut y = x.clone();
            softmax(&mut y);
            for i in 0..n {
                let want = exps[i] / total;
                assert!(
                    (f64::from(y[i]) - want).abs() <= 4e-6 * want + 1e-12,
                    "n={n} i={i}"
                );
            }
            let s: f32 = y.iter().sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn log_sum_exp_matches_f64() {
        let mut rng = Rng::new(11);
        for n in [1, 7, 16, 33, 49152] {
            let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 6.0).collect();
            if n > 2 {
                x[1] = f32::NEG_INFINITY;
            }
            let max = x
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let want = max
                + x.iter()
                    .map(|&v| (f64::from(v) - max).exp())
                    .sum::<f64>()
                    .ln();
            assert!((f64::from(log_sum_exp(&x)) - want).abs() < 1e-4, "n={n}");
        }
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }

    #[test]
    fn arithmetic() {
        let mut a = vec![1.0, 2.0, 3.0];
        add(&mut a, &[0.5, 0.5, -1.0]);
        assert_eq!(a, [1.5, 2.5, 2.0]);
        mul(&mut a, &[2.0, 0.0, -1.0]);
        assert_eq!(a, [3.0, 0.0, -2.0]);
        scale(&mut a, 0.5);
        assert_eq!(a, [1.5, 0.0, -1.0]);
    }
}
