//! Rotary position embedding, in the two layouts GGUF models use.

/// Which elements of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)` (GGML's mode 0: LLaMA as converted to GGUF).
    Normal,
    /// Halves `(i, i + n_rot / 2)` (GGML's NeoX mode: Falcon, Qwen2, Gemma...).
    Neox,
}

/// RoPE parameters of a model: angle of pair `i` at position `p` is
/// `p · freq_scale · base^(-2i / n_rot) / factor[i]`.
#[derive(Clone, Debug)]
pub struct Rope {
    n_rot: usize,
    style: RopeStyle,
    /// Per pair: `freq_scale · base^(-2i / n_rot) / factor[i]`.
    theta: Vec<f64>,
}

impl Rope {
    /// `n_rot` (even) leading dimensions of each head rotate; the rest pass through.
    /// `freq_factors` (one per pair, from a `rope_freqs` tensor) divide the frequencies.
    pub fn new(
        n_rot: usize,
        freq_base: f32,
        freq_scale: f32,
        style: RopeStyle,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        assert!(
            n_rot.is_multiple_of(2),
            "rope dimension count {n_rot} must be even"
        );
        let half = n_rot / 2;
        if let Some(f) = freq_factors {
            assert_eq!(f.len(), half, "one rope frequency factor per rotated pair");
        }
        let theta = (0..half)
            .map(|i| {
                let factor = freq_factors.map_or(1.0, |f| f64::from(f[i]));
                f64::from(freq_scale) * f64::from(freq_base).powf(-2.0 * i as f64 / n_rot as f64)
                    / factor
            })
            .collect();
        Self {
            n_rot,
            style,
            theta,
        }
    }

    pub fn n_rot(&self) -> usize {
        self.n_rot
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// `(cos, sin)` of every pair's angle at `pos` (`n_rot / 2` entries).
    pub fn cos_sin(&self, pos: usize, out: &mut [[f32; 2]]) {
        assert_eq!(out.len(), self.theta.len());
        for (o, &t) in out.iter_mut().zip(&self.theta) {
            let a = pos as f64 * t;
            *o = [a.cos() as f32, a.sin() as f32];
        }
    }

    /// Rotates every head of `x` (`x.len() / head_dim` heads) with the angles of one
    /// position, from [`Self::cos_sin`].
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cs: &[[f32; 2]]) {
        assert!(self.n_rot <= head_dim && x.len().is_multiple_of(head_dim));
        assert_eq!(cs.len(), self.n_rot / 2);
        let half = self.n_rot / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &[c, s]) in cs.iter().enumerate() {
                let (a, b) = match self.style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn reference(
        x: &[f32],
        head_dim: usize,
        n_rot: usize,
        base: f64,
        pos: usize,
        neox: bool,
    ) -> Vec<f64> {
        let mut y: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        for h in 0..x.len() / head_dim {
            let o = h * head_dim;
            for i in 0..n_rot / 2 {
                let theta = pos as f64 * base.powf(-2.0 * i as f64 / n_rot as f64);
                let (a, b) = if neox {
                    (o + i, o + i + n_rot / 2)
                } else {
                    (o + 2 * i, o + 2 * i + 1)
                };
                let (x0, x1) = (f64::from(x[a]), f64::from(x[b]));
                y[a] = x0 * theta.cos() - x1 * theta.sin();
                y[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
        y
    }

    #[test]
    fn both_layouts_match_f64_and_partial_rotation_leaves_the_rest() {
        let mut rng = Rng::new(5);
        for (style, neox) in [(RopeStyle::Normal, false), (RopeStyle::Neox, true)] {
            for (head_dim, n_rot) in [(64, 64), (128, 64), (8, 8)] {
                let rope = Rope::new(n_rot, 10000.0, 1.0, style, None);
                let mut cs = vec![[0.0; 2]; n_rot / 2];
                for pos in [0, 1, 17, 511, 4000] {
                    let x: Vec<f32> = (0..3 * head_dim).map(|_| rng.normal()).collect();
                    let mut y = x.clone();
                    rope.cos_sin(pos, &mut cs);
                    rope.apply(&mut y, head_dim, &cs);
                    let want = reference(&x, head_dim, n_rot, 10000.0, pos, neox);
                    for i in 0..y.len() {
                        assert!(
                            (f64::from(y[i]) - want[i]).abs() < 1e-5,
                            "{style:?} pos {pos} i {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn frequency_factors_and_scale_divide_angles() {
        let factors = [1.0, 2.0, 4.0, 8.0];
        let a = Rope::new(8, 500000.0, 0.5, RopeStyle::Normal, Some(&factors));
        let b = Rope::new(8, 500000.0, 1.0, RopeStyle::Normal, None);
        let (mut ca, mut cb) = ([[0.0; 2]; 4], [[0.0; 2]; 4]);
        a.cos_sin(1600, &mut ca);
        for i in 0..4 {
            // angle_a(p) = 0.5 / factor[i] · angle_b(p): compare at matching positions.
            let p = (1600.0 * 0.5 / factors[i]) as usize;
            b.cos_sin(p, &mut cb);
            assert!((ca[i][0] - cb[i][0]).abs() < 1e-5 && (ca[i][1] - cb[i][1]).abs() < 1e-5);
        }
    }
}
