//! RMS normalization.

/// `out[i] = x[i] / sqrt(mean(x²) + eps) · weight[i]`.
///
/// The sum of squares is accumulated in f64 (as GGML does) and the scale applied before
/// the weight, so rounding matches llama.cpp's `rms_norm` followed by `mul`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    let scale = rms_scale(x, weight, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// [`rms_norm`] in place, with the same rounding.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let scale = rms_scale(x, weight, eps);
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
}

/// `1 / sqrt(mean(x²) + eps)`.
fn rms_scale(x: &[f32], weight: &[f32], eps: f32) -> f32 {
    assert_eq!(x.len(), weight.len());
    // Four independent accumulators keep the adds from serializing on latency.
    let mut acc = [0f64; 4];
    let mut chunks = x.chunks_exact(4);
    for c in &mut chunks {
        for k in 0..4 {
            acc[k] += f64::from(c[k]) * f64::from(c[k]);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    let sum = acc.iter().sum::<f64>() + tail;
    let mean = (sum / x.len().max(1) as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn matches_f64() {
        let mut rng = Rng::new(4);
        for n in [1, 3, 576, 4097] {
            let x: Vec<f32> = (0..n).map(|_| rng.normal() * 3.0).collect();
            let w: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 1.5)).collect();
            let mut out = vec![0.0; n];
            rms_norm(&x, &w, 1e-5, &mut out);
            let mut in_place = x.clone();
            rms_norm_in_place(&mut in_place, &w, 1e-5);
            assert_eq!(in_place, out, "in place: the same bits");
            let ms: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n as f64;
            let s = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..n {
                let want = f64::from(x[i]) * s * f64::from(w[i]);
                assert!((f64::from(out[i]) - want).abs() <= 1e-6 * want.abs().max(1e-6));
            }
        }
    }
}
