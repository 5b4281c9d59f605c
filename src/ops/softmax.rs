//! Softmax over the last dimension with a fused backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::simd::{dot, softmax_row};
use super::{cpu_f32, fusable, rows_per_task, tensor_like, with_f32};

/// `softmax(x)` over the last dimension, differentiable.
///
/// Fused on the CPU in `f32`: the backward `dx = y ⊙ (dy − Σ dy ⊙ y)` reads the saved output,
/// one pass. Elsewhere `candle_nn::ops::softmax`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0f32, 0.0, 2f32.ln()]], &Device::Cpu)?;
/// let y = pgrpo::ops::softmax_last_dim(&x)?.to_vec2::<f32>()?;
/// assert!((y[0][0] - 0.25).abs() < 1e-6 && (y[0][2] - 0.5).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fusable(x) || x.rank() == 0 {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "pgrpo-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, self.name())?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut y = x.to_vec();
        if n > 0 {
            let per = rows_per_task(n, x.len() / n, 16 * 1024);
            y.par_chunks_mut(per * n)
                .for_each(|c| c.chunks_mut(n).for_each(softmax_row));
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = *y.dims().last().unwrap_or(&1);
        let dx = with_f32(y, "softmax bwd", |y| {
            with_f32(dy, "softmax bwd", |d| {
                let mut dx = vec![0f32; y.len()];
                if n > 0 {
                    let per = rows_per_task(n, y.len() / n, 16 * 1024);
                    dx.par_chunks_mut(per * n)
                        .zip(y.par_chunks(per * n).zip(d.par_chunks(per * n)))
                        .for_each(|(oc, (yc, dc))| {
                            for ((o, yr), dr) in
                                oc.chunks_mut(n).zip(yc.chunks(n)).zip(dc.chunks(n))
                            {
                                let dot = dot(yr, dr);
                                for ((v, &a), &b) in o.iter_mut().zip(yr).zip(dr) {
                                    *v = a * (b - dot);
                                }
                            }
                        });
                }
                Ok(dx)
            })
        })?;
        Ok(Some(tensor_like(dx, y)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, var};
    use candle_core::D;

    #[test]
    fn matches_the_slow_path_value_and_gradients() {
        let x = var(&[4, 6, 19], 3.0, 5);
        check(
            &[x],
            |t| super::softmax_last_dim(&t[0]).unwrap(),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
            1e-5,
        );
    }
}
