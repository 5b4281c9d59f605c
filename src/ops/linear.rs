//! A linear layer `x Wᵀ` as one node, with a backward that writes `∂W` in `W`'s layout.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{cpu_f32, fusable, gemm, matmul_t, simd, skinny, skinny_rows, tensor_like, with_f32};

/// `y = x Wᵀ` for `x: (.., in)` and `w: (out, in)`, giving `(.., out)`.
///
/// Differentiable in both. On the CPU in `f32` it is one graph node whose backward computes
/// `∂x = ∂y W` and `∂W = ∂yᵀ x` straight into `(out, in)` layout (candle's `x.matmul(&w.t())`
/// adds a transpose node whose gradient is a strided copy of `∂W`). Elsewhere
/// `x.broadcast_matmul(&w.t())`.
///
/// **`bf16` weights** (for decoding, see `pgrpo::lm::DecodePrecision`): with `x` in `f32`
/// on the CPU, neither input tracking a gradient, and `w` a CPU `bf16` tensor, the product
/// reads `w` in `bf16` and widens it to `f32` per 16-lane tile inside the skinny kernel,
/// summing in `f32` (for few rows; with many rows `w` is widened once and multiplied by
/// `gemm`). The result is the `f32` product with the widened weights (exactly for the
/// skinny kernel's row counts, to `f32` rounding through `gemm`). No backward.
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
    if w.dtype() == DType::BF16
        && fusable(x)
        && w.device().is_cpu()
        && !x.track_op()
        && !w.track_op()
    {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &LinearBf16);
    }
    if !(fusable(x) && fusable(w)) {
        return x.broadcast_matmul(&w.t()?);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// `x Wᵀ` with `x` in `f32` and `W` in `bf16`, forward only.
struct LinearBf16;

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "pgrpo-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let CpuStorage::BF16(wv) = s2 else {
            candle_core::bail!(
                "{}: expected bf16 weights, got {:?}",
                self.name(),
                s2.dtype()
            );
        };
        let Some((a, b)) = l2.contiguous_offsets() else {
            candle_core::bail!("{}: expected contiguous weights", self.name());
        };
        let wv = &wv[a..b];
        // SAFETY: `half::bf16` is `#[repr(transparent)]` over its `u16` bit pattern (same
        // size and alignment, checked here), so the slice reads as `u16`s.
        assert_eq!(std::mem::size_of_val(wv), 2 * wv.len());
        let w: &[u16] = unsafe { std::slice::from_raw_parts(wv.as_ptr().cast::<u16>(), wv.len()) };
        let (out, inp) = l2.shape().dims2()?;
        let n = x.len() / inp.max(1);
        let mut y = vec![0f32; n * out];
        if n <= skinny_rows(out, inp) && inp > 0 {
            skinny(x, w, n, out, inp, &mut y, false);
        } else {
            let wf: Vec<f32> = w.iter().map(|&b| simd::bf16_to_f32(b)).collect();
            matmul_t(x, &wf, n, out, inp, &mut y, false, threads());
        }
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
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
    use super::super::testing::{check, rel, var};
    use candle_core::DType;

    /// `bf16` weights: the product equals the `f32` product with the weights rounded to
    /// `bf16` (exactly for the skinny kernel's row counts, to `f32` rounding through `gemm`)
    /// and the `f32` product with the original weights within bf16 rounding.
    #[test]
    fn bf16_weights_give_the_product_of_the_rounded_weights() {
        let w = var(&[90, 40], 1.0, 18).as_tensor().detach();
        let wb = w.to_dtype(DType::BF16).unwrap();
        let widened = wb.to_dtype(DType::F32).unwrap();
        for rows in [1, 7, 16, 40] {
            let x = var(&[rows, 40], 1.0, rows as u64).as_tensor().detach();
            let yb = super::linear(&x, &wb).unwrap();
            assert_eq!(yb.dtype(), DType::F32);
            let yw = super::linear(&x, &widened).unwrap();
            if rows <= 16 {
                let (a, b) = (yb.to_vec2::<f32>().unwrap(), yw.to_vec2::<f32>().unwrap());
                assert_eq!(a, b, "rows = {rows}");
            } else {
                assert!(rel(&yb, &yw) < 1e-6, "rows = {rows}: {}", rel(&yb, &yw));
            }
            let yf = super::linear(&x, &w).unwrap();
            let r = rel(&yb, &yf);
            assert!(r < 2e-2 && r > 1e-5, "rows = {rows}: {r}");
        }
    }

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
