//! Attention of one query head over cached keys and values (f16 or f32), the inner step
//! of both decode and prefill: `out = softmax(scale · q·K^T) · V`.

use half::f16;

use super::softmax;
use crate::simd::{self, SimdLevel};

/// An element type a KV cache stores: dot with an f32 query, and accumulate `a · v`.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn dot(q: &[f32], k: &[Self]) -> f32;
    fn axpy(a: f32, v: &[Self], out: &mut [f32]);
}

impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }

    fn dot(q: &[f32], k: &[f32]) -> f32 {
        // Eight independent partial sums let the compiler vectorize.
        let mut acc = [0f32; 8];
        let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
        let tail: f32 = qc
            .remainder()
            .iter()
            .zip(kc.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a, b) in qc.zip(kc) {
            for i in 0..8 {
                acc[i] += a[i] * b[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    fn axpy(a: f32, v: &[f32], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += a * x;
        }
    }
}

impl KvElem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    fn dot(q: &[f32], k: &[f16]) -> f32 {
        assert_eq!(q.len(), k.len());
        #[cfg(target_arch = "x86_64")]
        if simd::detected() >= SimdLevel::Avx2 {
            // SAFETY: the level says AVX2, FMA and F16C are available.
            return unsafe { x86::dot_f16(q, k) };
        }
        q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
    }

    fn axpy(a: f32, v: &[f16], out: &mut [f32]) {
        assert_eq!(v.len(), out.len());
        #[cfg(target_arch = "x86_64")]
        if simd::detected() >= SimdLevel::Avx2 {
            // SAFETY: as above.
            return unsafe { x86::axpy_f16(a, v, out) };
        }
        for (o, x) in out.iter_mut().zip(v) {
            *o += a * x.to_f32();
        }
    }
}

/// `out = Σ_p softmax(scale · q·k_p)_p · v_p` over the `n = keys.len() / head_dim` cached
/// positions. `scores` needs room for `n` values.
pub fn attend<K: KvElem>(
    q: &[f32],
    keys: &[K],
    values: &[K],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_capped(q, keys, values, scale, None, scores, out);
}

/// [`attend`] with the scores soft-capped when `softcap` is set: each scaled score `s`
/// becomes `cap · tanh(s / cap)` before the softmax (Gemma 2's attention).
pub fn attend_capped<K: KvElem>(
    q: &[f32],
    keys: &[K],
    values: &[K],
    scale: f32,
    softcap: Option<f32>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let head_dim = q.len();
    assert!(head_dim > 0 && keys.len().is_multiple_of(head_dim) && keys.len() == values.len());
    assert_eq!(out.len(), head_dim);
    let n = keys.len() / head_dim;
    let scores = &mut scores[..n];
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(head_dim)) {
        *s = K::dot(q, k) * scale;
    }
    if let Some(cap) = softcap {
        for s in scores.iter_mut() {
            *s = cap * (*s / cap).tanh();
        }
    }
    softmax(scores);
    out.fill(0.0);
    for (&p, v) in scores.iter().zip(values.chunks_exact(head_dim)) {
        K::axpy(p, v, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(q: &[f32], k: &[f16]) -> f32 {
        let n = q.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices.
            unsafe {
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i).cast()));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), kv, acc);
            }
            i += 8;
        }
        let mut s = crate::simd::avx2::hsum_ps(acc);
        for j in i..n {
            s += q[j] * k[j].to_f32();
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(a: f32, v: &[f16], out: &mut [f32]) {
        let n = out.len();
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast()));
                let o = _mm256_loadu_ps(out.as_ptr().add(i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(av, x, o));
            }
            i += 8;
        }
        for j in i..n {
            out[j] += a * v[j].to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn check<K: KvElem>(to_f64: impl Fn(K) -> f64) {
        let mut rng = Rng::new(8);
        for (hd, n) in [(64, 1), (64, 37), (80, 300), (7, 5)] {
            let q: Vec<f32> = (0..hd).map(|_| rng.normal()).collect();
            let k: Vec<K> = (0..hd * n).map(|_| K::from_f32(rng.normal())).collect();
            let v: Vec<K> = (0..hd * n).map(|_| K::from_f32(rng.normal())).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let mut scores = vec![0.0; n];
            let mut out = vec![0.0; hd];
            attend(&q, &k, &v, scale, &mut scores, &mut out);
            let logits: Vec<f64> = (0..n)
                .map(|p| {
                    (0..hd)
                        .map(|d| f64::from(q[d]) * to_f64(k[p * hd + d]))
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = w.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..n).map(|p| w[p] / total * to_f64(v[p * hd + d])).sum();
                assert!(
                    (f64::from(out[d]) - want).abs() < 2e-5,
                    "hd={hd} n={n} d={d}"
                );
            }
        }
    }

    /// A cap far above every score changes nothing measurable; a small one flattens the
    /// weights to those of the capped scores.
    #[test]
    fn soft_capping_caps_the_scores_before_the_softmax() {
        let mut rng = Rng::new(9);
        let (hd, n) = (16, 9);
        let q: Vec<f32> = (0..hd).map(|_| rng.normal() * 3.0).collect();
        let k: Vec<f32> = (0..hd * n).map(|_| rng.normal() * 3.0).collect();
        let v: Vec<f32> = (0..hd * n).map(|_| rng.normal()).collect();
        let (mut sc, mut plain, mut capped) = (vec![0.0; n], vec![0.0; hd], vec![0.0; hd]);
        attend(&q, &k, &v, 0.25, &mut sc, &mut plain);
        attend_capped(&q, &k, &v, 0.25, Some(1e6), &mut sc, &mut capped);
        for d in 0..hd {
            assert!((plain[d] - capped[d]).abs() < 1e-5);
        }
        let cap = 2.0f64;
        attend_capped(&q, &k, &v, 0.25, Some(cap as f32), &mut sc, &mut capped);
        let logits: Vec<f64> = (0..n)
            .map(|p| {
                let s: f64 = (0..hd)
                    .map(|d| f64::from(q[d]) * f64::from(k[p * hd + d]))
                    .sum::<f64>()
                    * 0.25;
                cap * (s / cap).tanh()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut moved = 0.0f64;
        for d in 0..hd {
            let want: f64 = (0..n)
                .map(|p| w[p] / total * f64::from(v[p * hd + d]))
                .sum();
            assert!((f64::from(capped[d]) - want).abs() < 2e-5, "d={d}");
            moved = moved.max((f64::from(plain[d]) - want).abs());
        }
        assert!(moved > 1e-3, "a cap of 2 changes these scores");
    }

    #[test]
    fn f32_and_f16_caches_match_f64() {
        check::<f32>(f64::from);
        check::<f16>(|x| f64::from(x.to_f32()));
    }
}
