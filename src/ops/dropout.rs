//! Inverted dropout with a counter-based mask, for LoRA adapters.
//!
//! The mask of element `i` is a pure function of `(seed, i)`, so the same mask can be rebuilt
//! in a backward pass instead of being stored, the fused block and the per-op path draw the
//! same mask, and a seed fixes the result (candle's own `dropout` uses the unseeded thread RNG
//! on the CPU).

use candle_core::Tensor;

/// Inverted dropout: each element is kept with probability `1 − p` and then scaled by
/// `1 / (1 − p)`, so the expectation is unchanged; element `i` of a buffer is dropped when
///
/// ```text
/// u(seed, i) < p,   u(seed, i) = splitmix64(seed + (i + 1)·φ) / 2⁶⁴ ∈ [0, 1)
/// ```
///
/// with `φ = 0x9E3779B97F4A7C15`. `p` must be in `[0, 1)`.
///
/// ```
/// let d = pgrpo::ops::Dropout { p: 0.5, seed: 7 };
/// let m = d.mask(1000);
/// assert!(m.iter().all(|&x| x == 0.0 || x == 2.0));
/// let kept = m.iter().filter(|&&x| x > 0.0).count();
/// assert!((400..600).contains(&kept));
/// assert_eq!(m, d.mask(1000)); // a pure function of the seed
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element, in `[0, 1)`.
    pub p: f32,
    /// Seed of the mask.
    pub seed: u64,
}

const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mixer.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    /// Whether element `i` is kept.
    #[inline]
    pub fn keeps(&self, i: usize) -> bool {
        let z = splitmix64(
            self.seed
                .wrapping_add((i as u64).wrapping_add(1).wrapping_mul(PHI)),
        );
        // The top 24 bits as a uniform in [0, 1), exactly representable in f32.
        let u = (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        u >= self.p
    }

    /// The multiplier of every kept element, `1 / (1 − p)`.
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// The multipliers of elements `0..len`: `0` or `1 / (1 − p)`.
    pub fn mask(&self, len: usize) -> Vec<f32> {
        let s = self.scale();
        (0..len)
            .map(|i| if self.keeps(i) { s } else { 0.0 })
            .collect()
    }

    /// `x ⊙ mask` as a new buffer.
    pub(crate) fn apply(&self, x: &[f32]) -> Vec<f32> {
        let s = self.scale();
        x.iter()
            .enumerate()
            .map(|(i, &v)| if self.keeps(i) { v * s } else { 0.0 })
            .collect()
    }

    /// `dst += src ⊙ mask`.
    pub(crate) fn accumulate(&self, src: &[f32], dst: &mut [f32]) {
        let s = self.scale();
        for (i, (d, &v)) in dst.iter_mut().zip(src).enumerate() {
            if self.keeps(i) {
                *d += v * s;
            }
        }
    }

    /// `x ⊙ mask` for a tensor `x` (any device and float dtype; the mask runs over `x`'s
    /// elements in row-major order). Differentiable in `x`.
    pub fn apply_tensor(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mask = Tensor::from_vec(
            self.mask(x.elem_count()),
            x.shape(),
            &candle_core::Device::Cpu,
        )?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
        x.mul(&mask)
    }
}

#[cfg(test)]
mod tests {
    use super::Dropout;

    #[test]
    fn keeps_about_one_minus_p_and_scales_the_kept_ones() {
        for p in [0.0f32, 0.1, 0.5, 0.9] {
            let d = Dropout { p, seed: 3 };
            let n = 200_000;
            let kept = (0..n).filter(|&i| d.keeps(i)).count() as f64 / n as f64;
            assert!((kept - (1.0 - p as f64)).abs() < 0.01, "p {p}: kept {kept}");
            let x: Vec<f32> = (0..100).map(|i| i as f32).collect();
            let y = d.apply(&x);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!(*b == 0.0 || (b - a / (1.0 - p)).abs() < 1e-4, "{i}");
            }
            let mut acc = vec![1f32; 100];
            d.accumulate(&x, &mut acc);
            for i in 0..100 {
                assert_eq!(acc[i], 1.0 + y[i]);
            }
        }
        // Different seeds, different masks.
        let a = Dropout { p: 0.5, seed: 1 }.mask(256);
        let b = Dropout { p: 0.5, seed: 2 }.mask(256);
        assert_ne!(a, b);
    }
}
