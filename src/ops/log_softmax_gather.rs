//! Log-probabilities of chosen tokens, `log_softmax(logits)[target]`, fused with its backward;
//! and the entropy of the same distributions (no gradient).

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
    let lead = &logits.dims()[..logits.rank().saturating_sub(1)];
    if logits.rank() == 0 || targets.dims() != lead {
        candle_core::bail!(
            "log_softmax_gather: targets {:?} must have the leading dims of logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    if !fusable(logits) || !targets.device().is_cpu() {
        let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
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
    logits.contiguous()?.apply_op2(&targets, LogSoftmaxGather)
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
    let logits = logits.detach();
    if !fusable(&logits) || logits.rank() == 0 {
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        return (lp.exp()? * &lp)?.sum(D::Minus1)?.neg();
    }
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
                    for (o, row) in hc.iter_mut().zip(xc.chunks(v)) {
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

struct LogSoftmaxGather;

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
                for ((o, row), &ti) in oc.iter_mut().zip(xc.chunks(v)).zip(tc) {
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
                            for ((drow, row), (&ti, (&l, &gi))) in dc
                                .chunks_mut(v)
                                .zip(xc.chunks(v))
                                .zip(tc.iter().zip(lc.iter().zip(gc)))
                            {
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

    #[test]
    fn rejects_targets_outside_the_vocabulary() {
        let logits = var(&[2, 5], 1.0, 11).as_tensor().clone();
        let t = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        assert!(super::log_softmax_gather(&logits, &t).is_err());
    }
}
