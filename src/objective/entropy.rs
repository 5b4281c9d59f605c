//! Entropy controls: the entropy bonus (`entropy_coef`) and the high-entropy token mask
//! (`top_entropy_quantile`). Formulas and sources in the [module docs](super).

use candle_core::{DType, Tensor};

use super::aggregation::Normalizers;
use super::LossAggregation;
use crate::error::{Error, Result};

/// `H̄`, the mean per-token entropy of the bonus `− entropy_coef · H̄`, as TRL computes it for
/// each aggregation (`entropy` is 0 on padding; `keep` is the high-entropy mask, if any):
///
/// ```text
/// Bnpo          Σ m · keep · H / max(N, 1)              (the loss's own denominator)
/// Grpo, DrGrpo  Σ m · keep · H / max(Σ m · keep, 1)
/// ```
///
/// Both are the token mean of `H` over the tokens trained on when every token is kept.
pub(super) fn mean_entropy(
    norm: &Normalizers,
    entropy: &Tensor,
    keep: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(keep) = keep else {
        return norm.token_mean(entropy);
    };
    match norm.aggregation {
        LossAggregation::Bnpo => norm.token_mean(&entropy.mul(keep)?),
        LossAggregation::Grpo | LossAggregation::DrGrpo => {
            let kept = norm.mask.mul(keep)?;
            Ok(entropy
                .mul(&kept)?
                .sum_all()?
                .div(&kept.sum_all()?.maximum(1.0)?)?)
        }
    }
}

/// The `(B, T)` high-entropy mask of `top_entropy_quantile = rho`, in `entropy`'s dtype: 1 where
/// a completion token's entropy is `≥` the `1 − rho` quantile of the entropies of all
/// completion tokens (`is_token`), 0 elsewhere and on padding (TRL's `get_high_entropy_mask`,
/// over the tensors passed in). One device-to-host copy (the entropies, to sort them).
///
/// # Errors
/// [`Error::InvalidInput`] naming `entropy` when a completion token's entropy is not finite.
pub(super) fn high_entropy_mask(entropy: &Tensor, is_token: &Tensor, rho: f64) -> Result<Tensor> {
    let dtype = entropy.dtype();
    let host = Tensor::stack(
        &[
            entropy.to_dtype(DType::F32)?,
            is_token.to_dtype(DType::F32)?,
        ],
        0,
    )?
    .flatten_from(1)?
    .to_vec2::<f32>()?;
    let mut values: Vec<f32> = host[0]
        .iter()
        .zip(&host[1])
        .filter(|(_, &m)| m != 0.0)
        .map(|(&h, _)| h)
        .collect();
    let bad = values.iter().filter(|h| !h.is_finite()).count();
    if bad > 0 {
        return Err(non_finite_entropy(bad));
    }
    let Some(threshold) = quantile(&mut values, 1.0 - rho) else {
        return Ok(entropy.zeros_like()?);
    };
    Ok(entropy
        .ge(threshold)?
        .mul(&is_token.to_dtype(DType::U8)?)?
        .to_dtype(dtype)?)
}

/// The error for `count` completion tokens whose entropy is NaN or infinite.
pub(super) fn non_finite_entropy(count: usize) -> Error {
    Error::InvalidInput {
        what: "entropy",
        reason: format!("{count} completion token(s) have a NaN or infinite entropy"),
    }
}

/// The `q` quantile of `values` with linear interpolation between the closest ranks (the
/// default of `torch.quantile` and `numpy.quantile`): with the values sorted ascending and
/// `k = q · (n − 1)`, `v[⌊k⌋] + (k − ⌊k⌋) · (v[⌈k⌉] − v[⌊k⌋])`. `None` when `values` is empty.
/// Sorts `values` in place.
fn quantile(values: &mut [f32], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f32::total_cmp);
    let k = q.clamp(0.0, 1.0) * (values.len() - 1) as f64;
    let (lo, hi) = (k.floor() as usize, k.ceil() as usize);
    let (a, b) = (values[lo] as f64, values[hi] as f64);
    Some(a + (k - lo as f64) * (b - a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantile_interpolates_linearly_like_torch() {
        // torch.quantile(torch.tensor([3., 1., 4., 1., 5.]), q) for q = 0, .25, .5, .8, 1
        let mut v = [3.0f32, 1.0, 4.0, 1.0, 5.0];
        let got: Vec<f64> = [0.0, 0.25, 0.5, 0.8, 1.0]
            .iter()
            .map(|&q| quantile(&mut v, q).unwrap())
            .collect();
        let want = [1.0, 1.0, 3.0, 4.2, 5.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert_eq!(quantile(&mut [], 0.5), None);
        assert_eq!(quantile(&mut [2.5], 0.3), Some(2.5));
    }

    #[test]
    fn mask_keeps_the_top_tokens_and_never_padding() -> Result<()> {
        let dev = Device::Cpu;
        // Padding (column 3 of row 1) holds the largest entropy: it must neither be kept nor
        // move the threshold.
        let h = Tensor::new(&[[0.1f32, 0.5, 0.9, 0.3], [0.7, 0.2, 0.6, 9.0]], &dev)?;
        let m = Tensor::new(&[[1u8, 1, 1, 1], [1, 1, 1, 0]], &dev)?;
        // 7 tokens; rho = 0.5 → the 0.5 quantile = the median 0.5 → keep 0.5, 0.6, 0.7, 0.9.
        let k = high_entropy_mask(&h, &m, 0.5)?.to_vec2::<f32>()?;
        assert_eq!(k, [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]);
        // rho = 1 keeps every token, rho = 0 only the largest.
        let k = high_entropy_mask(&h, &m, 1.0)?.to_vec2::<f32>()?;
        assert_eq!(k, [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]);
        let k = high_entropy_mask(&h, &m, 0.0)?.to_vec2::<f32>()?;
        assert_eq!(k, [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]);
        // A NaN entropy on a completion token is an error; on padding it is ignored.
        let bad = Tensor::new(&[[0.1f32, f32::NAN, 0.9, 0.3], [0.7, 0.2, 0.6, 1.0]], &dev)?;
        match high_entropy_mask(&bad, &m, 0.5) {
            Err(Error::InvalidInput { what, .. }) => assert_eq!(what, "entropy"),
            other => panic!("{other:?}"),
        }
        let pad_nan = Tensor::new(&[[0.1f32, 0.5, 0.9, 0.3], [0.7, 0.2, 0.6, f32::NAN]], &dev)?;
        let k = high_entropy_mask(&pad_nan, &m, 0.5)?.to_vec2::<f32>()?;
        assert_eq!(k, [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]);
        Ok(())
    }
}
