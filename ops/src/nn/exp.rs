//! A vectorized `exp` for activations and softmax.
//!
//! Range reduction `x = n·ln2 + r` (Cody-Waite, |r| <= ln2/2), a degree-6 polynomial for
//! `e^r` (truncation error below 1.3e-7 relative), and `2^n` built in the exponent bits.
//! Inputs are clamped to [-87, 88] so `2^n` stays a normal float: results are within a few
//! ulps of `exp` there, `exp(-87)` (~1.6e-38, not 0) below and `exp(88)` above. NaN inputs
//! give `exp(-87)`; they only arise from a model that has already failed.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LO: f32 = -87.0;
const HI: f32 = 88.0;
/// 1/k! for k = 6 down to 2 (Horner order).
const C6: f32 = 1.0 / 720.0;
const C5: f32 = 1.0 / 120.0;
const C4: f32 = 1.0 / 24.0;
const C3: f32 = 1.0 / 6.0;
const C2: f32 = 0.5;

/// The scalar form of the vectorized algorithm (used for tails and on CPUs without AVX2).
#[inline]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(LO, HI);
    let n = crate::quant::round_even(x * LOG2E);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((((C6 * r + C5) * r + C4) * r + C3) * r + C2) * r + 1.0) * r) + 1.0;
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * pow2
}

/// `x[i] = exp(x[i])` for every element (scalar form; the SIMD forms live with the
/// operators that fuse them).
pub fn exp_approx_slice(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp_approx(*v);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// exp of 8 lanes (AVX2 + FMA).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(C6);
        for c in [C5, C4, C3, C2, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    /// exp of 16 lanes (AVX-512F).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(C6);
        for c in [C5, C4, C3, C2, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(p, _mm512_castsi512_ps(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// A few ulps: the polynomial's truncation (1.3e-7) plus rounding in ~10 operations.
    const EXP_REL_TOL: f64 = 6e-7;

    #[test]
    fn scalar_exp_matches_f64_exp() {
        let mut rng = Rng::new(1);
        for _ in 0..100_000 {
            let x = rng.uniform(-87.0, 88.0);
            let (got, want) = (f64::from(exp_approx(x)), f64::from(x).exp());
            assert!(
                (got - want).abs() <= EXP_REL_TOL * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-1000.0) < 2e-38 && exp_approx(-1000.0) > 0.0);
        assert!(exp_approx(1000.0).is_finite());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_exp_matches_f64_exp() {
        use std::arch::x86_64::*;

        use crate::simd::SimdLevel;
        let mut rng = Rng::new(2);
        let xs: Vec<f32> = (0..16 * 4096).map(|_| rng.uniform(-87.0, 88.0)).collect();
        for chunk in xs.chunks_exact(16) {
            let mut out8 = [0f32; 16];
            let mut out16 = [0f32; 16];
            if SimdLevel::Avx2.is_supported() {
                // SAFETY: AVX2/FMA checked above; 8 + 8 lanes read from and written to
                // 16-element arrays.
                unsafe {
                    for h in 0..2 {
                        let v = x86::exp8(_mm256_loadu_ps(chunk.as_ptr().add(8 * h)));
                        _mm256_storeu_ps(out8.as_mut_ptr().add(8 * h), v);
                    }
                }
            }
            if SimdLevel::Avx512.is_supported() {
                // SAFETY: AVX-512F checked above; 16 lanes of 16-element arrays.
                unsafe {
                    let v = x86::exp16(_mm512_loadu_ps(chunk.as_ptr()));
                    _mm512_storeu_ps(out16.as_mut_ptr(), v);
                }
            }
            for i in 0..16 {
                let want = f64::from(chunk[i]).exp();
                if SimdLevel::Avx2.is_supported() {
                    assert!((f64::from(out8[i]) - want).abs() <= EXP_REL_TOL * want);
                }
                if SimdLevel::Avx512.is_supported() {
                    assert!((f64::from(out16[i]) - want).abs() <= EXP_REL_TOL * want);
                }
            }
        }
    }
}
