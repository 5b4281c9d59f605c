//! A linear layer `x Wᵀ` as one node, with a backward that writes `∂W` in `W`'s layout.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{cpu_f32, fusable, gemm, matmul_t, tensor_like, with_f32};

/// `y = x Wᵀ` for `x: (.., in)` and `w: (out, in)`, giving `(.., out)`.
///
/// Differentiable in both. On the CPU in `f32` it is one graph node whose backward computes
/// `∂x = ∂y W` and `∂W = ∂yᵀ x` straight into `(out, in)` layout (candle's `x.matmul(&w.t())`
/// adds a transpose node whose gradient is a strided copy of `∂W`). Elsewhere
/// `x.broadcast_matmul(&w.t())`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu)?;
/// assert_eq!(pgrpo::ops::linear(&x, &w)?.to_vec2::<f32>()?, vec![vec![1.0, 2.0, 3.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (_, inp) = w.dims2()?;
    if x.dims().last() != Some(&inp) {
        candle_core::bail!("linear: x {:?} does not match w {:?}", x.dims(), w.dims());
    }
    if !(fusable(x) && fusable(w)) {
        return x.broadcast_matmul(&w.t()?);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

struct Linear;

fn threads() -> usize {
    rayon::current_num_threads()
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "pgrpo-linear"
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
        let (out, inp) = l2.shape().dims2()?;
        let n = x.len() / inp.max(1);
        let mut y = vec![0f32; n * out];
        // y (n, out) = x (n, in) · wᵀ (in, out); wᵀ[k][j] = w[j·in + k].
        matmul_t(x, w, n, out, inp, &mut y, false, threads());
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // A frozen input (no var behind it, e.g. a LoRA model's base weight or the tied
        // embedding used as the LM head) gets no gradient: its GEMM is skipped.
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let (out, inp) = w.dims2()?;
        let n = x.elem_count() / inp.max(1);
        let (dx, dw) = with_f32(x, "linear bwd", |xs| {
            with_f32(w, "linear bwd", |ws| {
                with_f32(dy, "linear bwd", |d| {
                    let dx = need_x.then(|| {
                        let mut dx = vec![0f32; n * inp];
                        // dx (n, in) = dy (n, out) · w (out, in).
                        gemm(
                            n,
                            inp,
                            out,
                            &mut dx,
                            inp,
                            (d, out, 1),
                            (ws, inp, 1),
                            false,
                            threads(),
                        );
                        dx
                    });
                    let dw = need_w.then(|| {
                        let mut dw = vec![0f32; out * inp];
                        // dw (out, in) = dyᵀ (out, n) · x (n, in); dyᵀ[j][r] = dy[r·out + j].
                        gemm(
                            out,
                            inp,
                            n,
                            &mut dw,
                            inp,
                            (d, 1, out),
                            (xs, inp, 1),
                            false,
                            threads(),
                        );
                        dw
                    });
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            dx.map(|g| tensor_like(g, x)).transpose()?,
            dw.map(|g| tensor_like(g, w)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, var};

    #[test]
    fn matches_the_slow_path_value_and_gradients() {
        // A few rows (the decoding path) and many rows (gemm).
        for rows in [1, 5] {
            let x = var(&[rows, 3, 40], 1.0, 17);
            let w = var(&[90, 40], 1.0, 18);
            check(
                &[x, w],
                |t| super::linear(&t[0], &t[1]).unwrap(),
                |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
                1e-5,
            );
        }
        let x = var(&[3, 70, 40], 1.0, 7);
        let w = var(&[90, 40], 1.0, 8);
        check(
            &[x, w],
            |t| super::linear(&t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
            1e-5,
        );
    }
}
