//! Weighted running moments `(count, weight, mean, M2)`: the arithmetic every history kind
//! and every batch statistic rests on.
//!
//! - [`RunningMoments::push`] folds one value in (Welford's online update, with the past
//!   decayed by a factor `d` first: exponentially weighted moments when `d < 1`).
//! - [`RunningMoments::append`] appends the moments of later values (Chan, Golub & LeVeque's
//!   parallel update, its older half decayed by `d^count`): what merges per-chunk, per-batch
//!   and per-process statistics exactly.
//! - [`Variance`] says whether `M2` is divided by the weight or by the weight less one.
//!
//! Nothing here knows about groups, batches or the store.

use serde::{Deserialize, Serialize};

/// Population or sample variance (divide the sum of squared deviations by `n` or `n - 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// `M2 / n`.
    Population,
    /// `M2 / (n - 1)` (Bessel's correction; `torch.std`'s default, so TRL's). Default.
    #[default]
    Sample,
}

/// Weighted running moments `(count, weight, mean, M2)` of a stream of rewards.
///
/// `weight` is the sum of the rewards' weights (equal to `count` unless weights decay) and
/// `m2` the weighted sum of squared deviations from `mean`. All in `f64`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RunningMoments {
    /// Number of rewards folded in.
    pub count: u64,
    /// Sum of weights (the effective sample size).
    pub weight: f64,
    /// Weighted mean.
    pub mean: f64,
    /// Weighted sum of squared deviations from the mean.
    pub m2: f64,
}

impl RunningMoments {
    /// Moments of `values` with every weight 1 (two passes in `f64`).
    pub fn from_slice(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let m2 = values.iter().map(|x| (x - mean) * (x - mean)).sum();
        Self {
            count: values.len() as u64,
            weight: n,
            mean,
            m2,
        }
    }

    /// Builds moments from sums shifted by `shift`: `w = Σ wᵢ`, `s1 = Σ wᵢ (xᵢ - shift)`,
    /// `s2 = Σ wᵢ (xᵢ - shift)²`. Exact when `shift` is close to the values (e.g. the first).
    pub fn from_shifted_sums(count: u64, w: f64, shift: f64, s1: f64, s2: f64) -> Self {
        if count == 0 || w <= 0.0 {
            return Self::default();
        }
        let d = s1 / w;
        Self {
            count,
            weight: w,
            mean: shift + d,
            m2: (s2 - s1 * d).max(0.0),
        }
    }

    /// Folds one reward in with weight 1 after decaying the past by `decay` (Welford).
    pub fn push(&mut self, x: f64, decay: f64) {
        self.count += 1;
        self.weight = self.weight * decay + 1.0;
        let delta = x - self.mean;
        self.mean += delta / self.weight;
        self.m2 = self.m2 * decay + delta * (x - self.mean);
    }

    /// Appends `later` (moments of rewards that came after these), decaying these by
    /// `decay^later.count` first (Chan et al.'s parallel formula, weighted).
    pub fn append(&mut self, later: &RunningMoments, decay: f64) {
        if later.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *later;
            return;
        }
        let scale = if decay == 1.0 {
            1.0
        } else {
            decay.powf(later.count as f64)
        };
        let wa = self.weight * scale;
        let m2a = self.m2 * scale;
        let w = wa + later.weight;
        let delta = later.mean - self.mean;
        self.mean += delta * (later.weight / w);
        self.m2 = m2a + later.m2 + delta * delta * (wa * later.weight / w);
        self.weight = w;
        self.count += later.count;
    }

    /// Variance under the chosen convention; `None` when it is undefined (no reward, or a
    /// sample variance with weight ≤ 1).
    pub fn variance(&self, variance: Variance) -> Option<f64> {
        let denom = match variance {
            Variance::Population => self.weight,
            Variance::Sample => self.weight - 1.0,
        };
        if self.count == 0 || denom <= 0.0 {
            None
        } else {
            Some((self.m2 / denom).max(0.0))
        }
    }
}
