//! RMSNorm over the last dimension with a fused backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, fusable, rows_per_task, sum_partials, tensor_like, with_f32};

/// `y = x / sqrt(mean(x²) + eps) · w` over the last dimension of `x: (.., H)` with `w: (H,)`.
///
/// Differentiable in `x` and `w`. Fused on the CPU in `f32` (one pass forward, one pass
/// backward that recomputes the row scale instead of storing it); elsewhere
/// `candle_nn::ops::rms_norm_slow`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// let y = pgrpo::ops::rms_norm(&x, &w, 0.0)?; // rms = sqrt(12.5)
/// let y = y.to_vec2::<f32>()?;
/// assert!((y[0][0] - 0.8485).abs() < 1e-4 && (y[0][1] - 2.2627).abs() < 1e-4);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if !(fusable(x) && fusable(w)) {
        return candle_nn::ops::rms_norm_slow(x, w, eps);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

#[inline]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// `y = rms_norm(x) · w` row by row (rows of `w.len()`), in parallel.
pub(crate) fn forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let h = w.len();
    let per = rows_per_task(h, x.len() / h, 16 * 1024);
    y.par_chunks_mut(per * h)
        .zip(x.par_chunks(per * h))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                let r = inv_rms(xr, eps);
                for ((o, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                    *o = xi * r * wi;
                }
            }
        });
}

/// The backward of [`forward`] for output gradient `g`: writes `∂x` into `dx` (added to what
/// is there when `accumulate`), returns `∂w`.
pub(crate) fn backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
) -> Vec<f32> {
    let h = w.len();
    let per = rows_per_task(h, x.len() / h, 16 * 1024);
    let parts = dx
        .par_chunks_mut(per * h)
        .zip(x.par_chunks(per * h).zip(g.par_chunks(per * h)))
        .map(|(dxc, (xc, gc))| {
            let mut dw = vec![0f32; h];
            for ((dxr, xr), gr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
                let r = inv_rms(xr, eps);
                let mut dot = 0f32;
                for ((&gi, &wi), (&xi, dwi)) in gr.iter().zip(w).zip(xr.iter().zip(dw.iter_mut())) {
                    dot += gi * wi * xi;
                    *dwi += gi * xi * r;
                }
                let c = dot * r * r * r / h as f32;
                for ((o, &gi), (&wi, &xi)) in dxr.iter_mut().zip(gr).zip(w.iter().zip(xr)) {
                    let v = r * wi * gi - xi * c;
                    *o = if accumulate { *o + v } else { v };
                }
            }
            dw
        })
        .collect::<Vec<_>>();
    // Partial sums added in chunk order: the result does not depend on which thread ran
    // which chunk.
    sum_partials(parts, h)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "pgrpo-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let w = cpu_f32(s2, l2, self.name())?;
        let h = w.len();
        if h == 0 || l1.dims().last() != Some(&h) {
            candle_core::bail!("rms_norm: x {:?} and w {:?} do not match", l1.dims(), h);
        }
        let mut y = vec![0f32; x.len()];
        forward(x, w, self.eps, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_f32(x, "rms_norm bwd", |x| {
            with_f32(w, "rms_norm bwd", |w| {
                with_f32(g, "rms_norm bwd", |g| {
                    let mut dx = vec![0f32; x.len()];
                    let dw = backward(x, w, g, self.eps, &mut dx, false);
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(tensor_like(dx, x)?), Some(tensor_like(dw, w)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, var};

    #[test]
    fn matches_the_slow_path_value_and_gradients() {
        let x = var(&[3, 5, 24], 2.0, 1);
        let w = var(&[24], 1.5, 2);
        check(
            &[x, w],
            |t| super::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap(),
            1e-5,
        );
    }
}
