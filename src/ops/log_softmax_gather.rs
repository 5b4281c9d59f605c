//! Log-probabilities of chosen tokens, `log_softmax(logits / T)[target]`, fused with its
//! backward; and the entropy of the same distributions (no gradient).
//!
//! The temperature `T` is the sampling temperature: a sampler that draws from
//! `softmax(logits / T)` must be scored under that distribution (TRL divides the logits by
//! its `temperature` before `selective_log_softmax`). `T = 1` runs exactly the unscaled
//! code; any other `T` multiplies each row by `1 / T` in `f32` first, the very numbers
//! candle's `logits / T` (an `affine(1 / T, 0)`) gives.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::simd;
use super::{cpu_f32, cpu_u32, fusable, rows_per_task, with_f32};

/// `logp[..] = log_softmax(logits[.., :])[targets[..]]` for `logits: (.., V)` and `u32`
/// `targets: (..)`; the result has `targets`' shape.
///
/// Differentiable in `logits`. On the CPU in `f32` the forward keeps only one number per row
/// and the backward rebuilds the probabilities from the logits and the saved output
/// (`lse = logits[target] − logp`) while writing the gradient
/// `∂logits = ∂logp · (onehot(target) − softmax(logits))`: the `(.., V)` log-probs are never
/// materialised. Elsewhere `log_softmax` + `gather`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f32, 0.0, 0.0, 0.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[2u32], &Device::Cpu)?;
/// let lp = pgrpo::ops::log_softmax_gather(&logits, &t)?.to_vec1::<f32>()?;
/// assert!((lp[0] + 4f32.ln()).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn log_softmax_gather(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    log_softmax_gather_at(logits, targets, 1.0)
}

/// [`log_softmax_gather`] at temperature `temperature`:
/// `logp[..] = log_softmax(logits[.., :] / temperature)[targets[..]]`, differentiable in
/// `logits` (`∂logits = ∂logp · (onehot(target) − softmax(logits / T)) / T`).
///
/// `temperature` must be finite and `> 0`; `1.0` is exactly [`log_softmax_gather`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[2f32, 0.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[0u32], &Device::Cpu)?;
/// let lp = pgrpo::ops::log_softmax_gather_at(&logits, &t, 2.0)?.to_vec1::<f32>()?;
/// // softmax([1, 0])[0] = e / (e + 1)
/// assert!((lp[0] - (1f32.exp() / (1f32.exp() + 1.0)).ln()).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn log_softmax_gather_at(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    check_temperature(temperature)?;
    let lead = &logits.dims()[..logits.rank().saturating_sub(1)];
    if logits.rank() == 0 || targets.dims() != lead {
        candle_core::bail!(
            "log_softmax_gather: targets {:?} must have the leading dims of logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    if !fusable(logits) || !targets.device().is_cpu() {
        let lp = candle_nn::ops::log_softmax(&tempered(logits, temperature)?, D::Minus1)?;
        return lp
            .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
            .squeeze(D::Minus1);
    }
    let targets = targets.to_dtype(candle_core::DType::U32)?.contiguous()?;
    let v = *logits.dims().last().unwrap_or(&0);
    if targets.elem_count() > 0 {
        let top = targets.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if top as usize >= v {
            candle_core::bail!("log_softmax_gather: target {top} is outside the vocabulary of {v}");
        }
    }
    let op = LogSoftmaxGather {
        scale: inverse(temperature),
    };
    logits.contiguous()?.apply_op2(&targets, op)
}

/// `1 / T` in `f32`, the factor candle's `tensor / T` multiplies by; `None` for `T = 1`.
fn inverse(temperature: f64) -> Option<f32> {
    (temperature != 1.0).then_some((1.0 / temperature) as f32)
}

/// `logits / T` (the tensor itself for `T = 1`).
fn tempered(logits: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    if temperature == 1.0 {
        Ok(logits.clone())
    } else {
        logits / temperature
    }
}

fn check_temperature(temperature: f64) -> candle_core::Result<()> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        candle_core::bail!("temperature must be finite and > 0, got {temperature}");
    }
    Ok(())
}

/// `row · s` into `buf` when there is a factor, else `row` itself.
fn scaled<'a>(row: &'a [f32], scale: Option<f32>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match scale {
        None => row,
        Some(s) => {
            buf.clear();
            buf.extend_from_slice(row);
            simd::scale(buf, s);
            buf
        }
    }
}

/// Per-row entropy `−Σ_v p_v log p_v` of `softmax(logits)` over the last dimension, without
/// a gradient; `(..)` from `(.., V)`. One pass per row on the CPU in `f32`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[1f32, 1.0, 1.0, 1.0]], &Device::Cpu)?;
/// let h = pgrpo::ops::entropy_last_dim(&logits)?.to_vec1::<f32>()?;
/// assert!((h[0] - 4f32.ln()).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn entropy_last_dim(logits: &Tensor) -> candle_core::Result<Tensor> {
    entropy_last_dim_at(logits, 1.0)
}

/// [`entropy_last_dim`] of `softmax(logits / temperature)`; `1.0` is exactly
/// [`entropy_last_dim`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[50f32, 0.0]], &Device::Cpu)?;
/// // Hot enough, the distribution is flat: entropy ln 2.
/// let h = pgrpo::ops::entropy_last_dim_at(&logits, 1e6)?.to_vec1::<f32>()?;
/// assert!((h[0] - 2f32.ln()).abs() < 1e-4);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn entropy_last_dim_at(logits: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    check_temperature(temperature)?;
    let logits = logits.detach();
    if !fusable(&logits) || logits.rank() == 0 {
        let lp = candle_nn::ops::log_softmax(&tempered(&logits, temperature)?, D::Minus1)?;
        return (lp.exp()? * &lp)?.sum(D::Minus1)?.neg();
    }
    let scale = inverse(temperature);
    let v = *logits.dims().last().unwrap_or(&1);
    let lead = logits.dims()[..logits.rank() - 1].to_vec();
    let h = with_f32(&logits, "entropy", |x| {
        let rows = x.len() / v.max(1);
        let mut h = vec![0f32; rows];
        if v > 0 {
            let per = rows_per_task(v, rows, 32 * 1024);
            h.par_chunks_mut(per)
                .zip(x.par_chunks(per * v))
                .for_each(|(hc, xc)| {
                    let mut buf = Vec::new();
                    for (o, row) in hc.iter_mut().zip(xc.chunks(v)) {
                        let row = scaled(row, scale, &mut buf);
                        let m = simd::max(row);
                        let (s, sx) = simd::sum_exp_dot(row, m);
                        // H = lse − Σ p x = m + ln s − sx / s.
                        *o = m + s.ln() - sx / s;
                    }
                });
        }
        Ok(h)
    })?;
    Tensor::from_vec(h, lead, logits.device())
}

/// `log Σ_v exp(s · row_v)` of one row, computed exactly as the fused kernel computes it
/// (for the sampler's own log-probs); `scale` is `1 / T`, `None` for `T = 1`.
pub(crate) fn row_log_sum_exp(row: &[f32], scale: Option<f32>) -> f32 {
    let mut buf = Vec::new();
    let row = scaled(row, scale, &mut buf);
    let m = simd::max(row);
    m + simd::sum_exp(row, m).ln()
}

/// `s · x − lse`: the log-prob of a token with logit `x` given [`row_log_sum_exp`]'s `lse`,
/// the kernel's arithmetic.
pub(crate) fn row_log_prob(x: f32, scale: Option<f32>, lse: f32) -> f32 {
    scale.map_or(x, |s| x * s) - lse
}

/// The fused op; `scale` is `1 / T` (`None` for `T = 1`).
struct LogSoftmaxGather {
    scale: Option<f32>,
}

impl CustomOp2 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "pgrpo-log-softmax-gather"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let t = cpu_u32(s2, l2, self.name())?;
        let v = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; t.len()];
        let per = rows_per_task(v, t.len(), 32 * 1024);
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per * v).zip(t.par_chunks(per)))
            .for_each(|(oc, (xc, tc))| {
                let mut buf = Vec::new();
                for ((o, row), &ti) in oc.iter_mut().zip(xc.chunks(v)).zip(tc) {
                    let row = scaled(row, self.scale, &mut buf);
                    let m = simd::max(row);
                    let lse = m + simd::sum_exp(row, m).ln();
                    *o = row[ti as usize] - lse;
                }
            });
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        logp: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let v = *logits.dims().last().unwrap_or(&1);
        let t = targets.flatten_all()?.to_vec1::<u32>()?;
        let dx = with_f32(logits, "log_softmax_gather bwd", |x| {
            with_f32(logp, "log_softmax_gather bwd", |lp| {
                with_f32(g, "log_softmax_gather bwd", |g| {
                    let mut dx = vec![0f32; x.len()];
                    let per = rows_per_task(v, t.len(), 32 * 1024);
                    dx.par_chunks_mut(per * v)
                        .zip(x.par_chunks(per * v))
                        .zip(
                            t.par_chunks(per)
                                .zip(lp.par_chunks(per).zip(g.par_chunks(per))),
                        )
                        .for_each(|((dc, xc), (tc, (lc, gc)))| {
                            let mut buf = Vec::new();
                            for ((drow, row), (&ti, (&l, &gi))) in dc
                                .chunks_mut(v)
                                .zip(xc.chunks(v))
                                .zip(tc.iter().zip(lc.iter().zip(gc)))
                            {
                                // ∂x = s · ∂y for y = s · x.
                                let gi = self.scale.map_or(gi, |s| gi * s);
                                let row = scaled(row, self.scale, &mut buf);
                                let ti = ti as usize;
                                let lse = row[ti] - l;
                                simd::exp_scaled(row, lse, -gi, drow);
                                drow[ti] += gi;
                            }
                        });
                    Ok(dx)
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, logits.shape(), logits.device())?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, rel, var};
    use candle_core::{Device, Tensor, D};

    #[test]
    fn matches_the_slow_path_value_and_gradients() {
        let logits = var(&[3, 4, 37], 5.0, 9);
        let t: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 37).collect();
        let t = Tensor::from_vec(t, (3, 4), &Device::Cpu).unwrap();
        check(
            &[logits],
            |x| super::log_softmax_gather(&x[0], &t).unwrap(),
            |x| {
                candle_nn::ops::log_softmax(&x[0], D::Minus1)
                    .unwrap()
                    .gather(&t.unsqueeze(2).unwrap().contiguous().unwrap(), 2)
                    .unwrap()
                    .squeeze(2)
                    .unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn entropy_matches_the_formula() {
        let logits = var(&[5, 41], 4.0, 10).as_tensor().clone();
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let want = (lp.exp().unwrap() * &lp)
            .unwrap()
            .sum(1)
            .unwrap()
            .neg()
            .unwrap();
        assert!(rel(&super::entropy_last_dim(&logits).unwrap(), &want) < 1e-5);
    }

    /// At a temperature ≠ 1 the fused kernel is `log_softmax(logits / T)` + `gather`: value
    /// and gradient, for a hot and a cold temperature.
    #[test]
    fn tempered_matches_the_slow_path_value_and_gradients() {
        let t: Vec<u32> = (0..12).map(|i| (i * 5 + 1) % 37).collect();
        let t = Tensor::from_vec(t, (3, 4), &Device::Cpu).unwrap();
        for temp in [0.7, 1.6] {
            let logits = var(&[3, 4, 37], 5.0, 12);
            check(
                &[logits],
                |x| super::log_softmax_gather_at(&x[0], &t, temp).unwrap(),
                |x| {
                    candle_nn::ops::log_softmax(&(&x[0] / temp).unwrap(), D::Minus1)
                        .unwrap()
                        .gather(&t.unsqueeze(2).unwrap().contiguous().unwrap(), 2)
                        .unwrap()
                        .squeeze(2)
                        .unwrap()
                },
                1e-5,
            );
        }
    }

    /// The temperature changes the numbers (a kernel that ignored it would pass the slow-path
    /// check only if the slow path ignored it too), and `T = 1` is the unscaled kernel bit
    /// for bit.
    #[test]
    fn temperature_one_is_the_unscaled_kernel_and_others_differ() {
        let logits = var(&[4, 29], 3.0, 13).as_tensor().clone();
        let t = Tensor::new(&[0u32, 5, 17, 28], &Device::Cpu).unwrap();
        let plain = super::log_softmax_gather(&logits, &t).unwrap();
        let one = super::log_softmax_gather_at(&logits, &t, 1.0).unwrap();
        let hot = super::log_softmax_gather_at(&logits, &t, 0.5).unwrap();
        let bits = |x: &Tensor| -> Vec<u32> {
            x.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&plain), bits(&one));
        assert!(rel(&hot, &plain) > 1e-2);
        let h1 = super::entropy_last_dim(&logits).unwrap();
        assert_eq!(
            bits(&h1),
            bits(&super::entropy_last_dim_at(&logits, 1.0).unwrap())
        );
    }

    #[test]
    fn tempered_entropy_matches_the_formula() {
        let logits = var(&[5, 41], 4.0, 14).as_tensor().clone();
        for temp in [0.6, 2.5] {
            let lp = candle_nn::ops::log_softmax(&(&logits / temp).unwrap(), D::Minus1).unwrap();
            let want = (lp.exp().unwrap() * &lp)
                .unwrap()
                .sum(1)
                .unwrap()
                .neg()
                .unwrap();
            let got = super::entropy_last_dim_at(&logits, temp).unwrap();
            assert!(rel(&got, &want) < 1e-5, "T = {temp}");
        }
    }

    #[test]
    fn rejects_a_temperature_that_is_not_positive_and_finite() {
        let logits = var(&[2, 5], 1.0, 15).as_tensor().clone();
        let t = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        for temp in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(super::log_softmax_gather_at(&logits, &t, temp).is_err());
            assert!(super::entropy_last_dim_at(&logits, temp).is_err());
        }
    }

    #[test]
    fn rejects_targets_outside_the_vocabulary() {
        let logits = var(&[2, 5], 1.0, 11).as_tensor().clone();
        let t = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        assert!(super::log_softmax_gather(&logits, &t).is_err());
    }
}
