//! The KL estimators of the penalty to the reference policy.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::names::named_enum;

/// Which per-token estimator of `KL(π_θ ‖ π_ref)` is used, with `d = ref_logp − logp` and tokens
/// sampled from the policy (Schulman, "Approximating KL Divergence", 2020).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `k1 = −d = log(π_θ/π_ref)`: unbiased, high variance, can be negative per token.
    K1,
    /// `k2 = d²/2`: biased, low variance, `≥ 0`.
    K2,
    /// `k3 = exp(d) − d − 1`: unbiased, low variance, `≥ 0` (DeepSeekMath, TRL). Default.
    #[default]
    K3,
}

named_enum!(KlEstimator, "kl_estimator", [K1 => "k1", K2 => "k2", K3 => "k3"]);

impl KlEstimator {
    /// The per-token estimate, elementwise, from `d = ref_logp − logp` (any shape).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use pgrpo::objective::KlEstimator;
    /// let d = Tensor::new(&[0.0f32, 1.0], &Device::Cpu)?;
    /// let k3 = KlEstimator::K3.per_token(&d)?.to_vec1::<f32>()?;
    /// assert_eq!(k3[0], 0.0);
    /// assert!((k3[1] - 0.7183).abs() < 1e-4); // e − 2
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    pub fn per_token(self, d: &Tensor) -> Result<Tensor> {
        Ok(match self {
            KlEstimator::K1 => d.neg()?,
            KlEstimator::K2 => (d.sqr()? * 0.5)?,
            KlEstimator::K3 => exp_minus_one_minus(d)?,
        })
    }
}

/// `exp(x) − x − 1`, accurate and `≥ 0` in low precision.
///
/// For small `|x|` the direct formula cancels: in f32 it returns values like `−6e-8` at
/// `x ≈ 3e-8` and is off by ~10% at `|x| ≈ 1e-3`, which is where a policy close to its
/// reference lives. Below `|x| < 0.1` the Taylor series
/// `x²/2 · (1 + x/3 · (1 + x/4 · (1 + x/5 · (1 + x/6))))` is used instead (truncation error
/// below 1e-8 relative); both branches are differentiable.
pub(super) fn exp_minus_one_minus(x: &Tensor) -> Result<Tensor> {
    let direct = ((x.exp()? - x)? - 1.0)?;
    let mut series = ((x / 6.0)? + 1.0)?;
    for k in [5.0, 4.0, 3.0] {
        series = ((x / k)?.mul(&series)? + 1.0)?;
    }
    let series = (x.sqr()? * 0.5)?.mul(&series)?;
    let small = x.detach().abs()?.lt(0.1)?;
    Ok(small.where_cond(&series, &direct)?)
}
