//! The per-token surrogates (to **maximise**): one small function per [`Surrogate`], written
//! as in its paper. The equations and sources are in the [module docs](super).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::names::named_enum;

/// The per-token surrogate objective. TRL's `loss_type` names CISPO and SAPO; its other loss
/// types are all [`Clip`](Self::Clip) with a different [`LossAggregation`](super::LossAggregation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Surrogate {
    /// PPO's clipped surrogate `min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A)` (Schulman et
    /// al. 2017), optionally dual-clipped: GRPO, DAPO, Dr. GRPO, GSPO. Default.
    #[default]
    Clip,
    /// CISPO (MiniMax-M1, arXiv:2506.13585): REINFORCE weighted by the stop-gradient
    /// importance weight capped at `1 + eps_high`, `sg(min(r, 1 + eps_high))·A·log π`. No
    /// token loses its gradient; a large ratio only bounds the token's weight.
    Cispo,
    /// SAPO (Gao et al. 2025, arXiv:2511.20347): a smooth gate instead of the clip,
    /// `σ(τ (r − 1))·4/τ·A`, with `τ = sapo_temperature_pos` for `A > 0` and
    /// `sapo_temperature_neg` otherwise. Its gradient weight `4σ(1 − σ)` is 1 on-policy and
    /// decays smoothly off-policy.
    Sapo,
}

named_enum!(Surrogate, "surrogate", [Clip => "clip", Cispo => "cispo", Sapo => "sapo"]);

/// PPO's clipped surrogate, line for line:
///
/// ```text
/// clipped = clip(ratio, lo, hi)
/// surr1   = ratio · A
/// surr2   = clipped · A
/// surr    = min(surr1, surr2)
///         = max(surr, c · A)      where A < 0, if dual_clip = Some(c)
/// ```
pub(super) fn clipped(
    ratio: &Tensor,
    adv: &Tensor,
    lo: f64,
    hi: f64,
    dual_clip: Option<f32>,
) -> Result<Tensor> {
    let clipped_ratio = clip(ratio, lo, hi)?;
    let surr1 = ratio.mul(adv)?;
    let surr2 = clipped_ratio.mul(adv)?;
    let mut surrogate = surr1.minimum(&surr2)?;
    if let Some(c) = dual_clip {
        let floor = (adv * c as f64)?;
        surrogate = adv
            .lt(0.0)?
            .where_cond(&surrogate.maximum(&floor)?, &surrogate)?;
    }
    Ok(surrogate)
}

/// CISPO (MiniMax-M1): the REINFORCE term weighted by the capped, stop-gradient importance
/// weight. `logp` must be 0 on padding (its values there are arbitrary).
///
/// ```text
/// w    = sg(min(ratio, hi))
/// surr = w · A · logp
/// ```
///
/// The gradient w.r.t. `logp` is `w · A` for every token: capping bounds a token's weight but
/// never zeroes it (the clip of PPO zeroes the gradient of a clipped token).
pub(super) fn cispo(ratio: &Tensor, logp: &Tensor, adv: &Tensor, hi: f64) -> Result<Tensor> {
    let weight = ratio.detach().minimum(hi)?;
    Ok(weight.mul(adv)?.mul(logp)?)
}

/// SAPO's soft gate (Gao et al. 2025), with the temperature chosen by the advantage's sign:
///
/// ```text
/// tau  = tau_pos if A > 0 else tau_neg
/// gate = σ(tau · (ratio − 1)) · 4 / tau
/// surr = gate · A
/// ```
///
/// `σ(x) = 1 / (1 + exp(−x))` is evaluated as written: `ratio ≥ 0` gives `x ≥ −tau`, so
/// `exp(−x) ≤ exp(tau)` cannot overflow.
pub(super) fn sapo(ratio: &Tensor, adv: &Tensor, tau_pos: f32, tau_neg: f32) -> Result<Tensor> {
    let full = |v: f32| -> Result<Tensor> {
        Ok(Tensor::new(v as f64, ratio.device())?
            .to_dtype(ratio.dtype())?
            .broadcast_as(ratio.shape())?)
    };
    let tau = adv.gt(0.0)?.where_cond(&full(tau_pos)?, &full(tau_neg)?)?;
    let x = (ratio - 1.0)?.mul(&tau)?;
    let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
    let gate = (sigmoid * 4.0)?.div(&tau)?;
    Ok(gate.mul(adv)?)
}

impl Surrogate {
    /// The `(low, high)` clip indicators of the clip-ratio metrics, in `ratio`'s dtype:
    ///
    /// - `Clip`: `ratio < lo` with `A < 0`, and `ratio > hi` with `A > 0` (TRL's
    ///   `clip_ratio/low_mean`, `clip_ratio/high_mean`);
    /// - `Cispo`: no lower bound; high as for `Clip`, which is TRL's `cispo_clip_ratio`
    ///   (tokens with `A < 0` whose weight is capped are not counted, as in TRL);
    /// - `Sapo`: nothing is clipped, both 0.
    pub(super) fn clip_indicators(
        self,
        ratio: &Tensor,
        adv: &Tensor,
        lo: f64,
        hi: f64,
    ) -> Result<(Tensor, Tensor)> {
        let dtype = ratio.dtype();
        let indicator = |x: Tensor| x.to_dtype(dtype);
        let high = || indicator(ratio.gt(hi)?.mul(&adv.gt(0.0)?)?);
        Ok(match self {
            Surrogate::Clip => (indicator(ratio.lt(lo)?.mul(&adv.lt(0.0)?)?)?, high()?),
            Surrogate::Cispo => (ratio.zeros_like()?, high()?),
            Surrogate::Sapo => (ratio.zeros_like()?, ratio.zeros_like()?),
        })
    }
}

/// `clamp(x, lo, hi)` whose gradient is 1 on the closed interval `[lo, hi]` and 0 outside, like
/// `torch.clamp` (candle's `clamp` halves the gradient when `x` equals a bound).
fn clip(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let bound = |v: f64| -> Result<Tensor> {
        Ok(Tensor::new(v, x.device())?
            .to_dtype(x.dtype())?
            .broadcast_as(x.shape())?)
    };
    let x = x.lt(lo)?.where_cond(&bound(lo)?, x)?;
    Ok(x.gt(hi)?.where_cond(&bound(hi)?, &x)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn clip_passes_the_gradient_on_the_closed_interval() -> Result<()> {
        // Points: below, on the lower bound, inside, on the upper bound, above.
        let x = Var::new(&[0.5f32, 0.8, 1.0, 1.2, 1.5], &Device::Cpu)?;
        let y = clip(&x, 0.8, 1.2)?;
        assert_eq!(y.to_vec1::<f32>()?, [0.8, 0.8, 1.0, 1.2, 1.2]);
        let g = y.sum_all()?.backward()?;
        let g = g.get(&x).expect("x has a gradient").to_vec1::<f32>()?;
        assert_eq!(g, [0.0, 1.0, 1.0, 1.0, 0.0]);
        // A degenerate interval (eps = 0) still passes the gradient at the bound.
        let x = Var::new(&[1.0f32], &Device::Cpu)?;
        let g = clip(&x, 1.0, 1.0)?.sum_all()?.backward()?;
        assert_eq!(g.get(&x).expect("grad").to_vec1::<f32>()?, [1.0]);
        Ok(())
    }

    #[test]
    fn sapo_gate_is_one_with_unit_slope_on_policy_and_bounded_by_four_over_tau() -> Result<()> {
        // ratio 1: σ(0)·4/τ = 2/τ, and d gate / d ratio = 4σ(1 − σ) = 1 for every τ.
        let dev = Device::Cpu;
        let adv = Tensor::new(&[1.0f32, -1.0, 1.0], &dev)?;
        for (tau_pos, tau_neg) in [(1.0f32, 1.05f32), (0.5, 3.0)] {
            let r = Var::new(&[1.0f32, 1.0, 1e6], &dev)?;
            let s = sapo(&r, &adv, tau_pos, tau_neg)?;
            let v = s.to_vec1::<f32>()?;
            assert!((v[0] - 2.0 / tau_pos).abs() < 1e-6, "{v:?}");
            assert!((v[1] + 2.0 / tau_neg).abs() < 1e-6, "{v:?}");
            // A huge ratio saturates at 4/τ · A instead of growing without bound.
            assert!((v[2] - 4.0 / tau_pos).abs() < 1e-5, "{v:?}");
            let g = s.sum_all()?.backward()?;
            let g = g.get(&r).expect("grad").to_vec1::<f32>()?;
            assert!(
                (g[0] - 1.0).abs() < 1e-6 && (g[1] + 1.0).abs() < 1e-6,
                "{g:?}"
            );
            assert!(g[2].abs() < 1e-6, "saturated gate has no gradient: {g:?}");
        }
        Ok(())
    }

    #[test]
    fn cispo_weight_is_capped_and_stops_the_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let logp = Var::new(&[-1.0f32, -2.0, -0.5], &dev)?;
        let ratio = Tensor::new(&[0.5f32, 1.0, 3.0], &dev)?;
        let adv = Tensor::new(&[2.0f32, -1.0, 1.0], &dev)?;
        let s = cispo(&ratio, logp.as_tensor(), &adv, 1.5)?;
        // w = (0.5, 1, 1.5): no lower bound, the upper one caps.
        assert_eq!(s.to_vec1::<f32>()?, [-1.0, 2.0, -0.75]);
        let g = s.sum_all()?.backward()?;
        assert_eq!(
            g.get(&logp).expect("grad").to_vec1::<f32>()?,
            [1.0, -1.0, 1.5]
        );
        Ok(())
    }
}
