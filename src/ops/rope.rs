//! Rotate-half rotary position embedding with a fused backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{cpu_f32, fusable, tensor_like, with_f32};

/// Rotate-half RoPE (the Hugging Face Llama convention) on `x: (B, T, H, D)` with per-row
/// tables `cos, sin: (B, T, D/2)` (each row has its own positions, so padded rows work):
///
/// ```text
/// y[.., i]       = x[.., i] · cos_i − x[.., i + D/2] · sin_i        (i < D/2)
/// y[.., i + D/2] = x[.., i + D/2] · cos_i + x[.., i] · sin_i
/// ```
///
/// Differentiable in `x` (the tables are constants). Fused on the CPU in `f32`; elsewhere the
/// same formula from `narrow`/`cat`/`broadcast_mul`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[1f32, 0.0], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
/// let half_pi = std::f32::consts::FRAC_PI_2;
/// let (cos, sin) = (Tensor::new(&[[[half_pi.cos()]]], &Device::Cpu)?, Tensor::new(&[[[1f32]]], &Device::Cpu)?);
/// let y = pgrpo::ops::rope(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!(y[0].abs() < 1e-6 && (y[1] - 1.0).abs() < 1e-6); // rotated by 90°
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, _h, d) = x.dims4()?;
    if cos.dims() != [b, t, d / 2] || sin.dims() != [b, t, d / 2] || d % 2 != 0 {
        candle_core::bail!(
            "rope: x {:?} needs cos/sin of shape ({b}, {t}, {}), got {:?} / {:?}",
            x.dims(),
            d / 2,
            cos.dims(),
            sin.dims()
        );
    }
    if !(fusable(x) && fusable(cos) && fusable(sin)) {
        let half = d / 2;
        let c = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(2)?;
        let s = Tensor::cat(&[&sin.neg()?, sin], D::Minus1)?.unsqueeze(2)?;
        let swapped = Tensor::cat(&[&x.narrow(3, half, half)?, &x.narrow(3, 0, half)?], 3)?;
        return x.broadcast_mul(&c)? + swapped.broadcast_mul(&s)?;
    }
    let cos = with_f32(cos, "rope", |v| Ok(Arc::<[f32]>::from(v)))?;
    let sin = with_f32(sin, "rope", |v| Ok(Arc::<[f32]>::from(v)))?;
    x.contiguous()?.apply_op1(Rope { cos, sin })
}

struct Rope {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
}

/// Rotates `src` into `dst`, both `(B·T, H, D)`, with per-`(b, t)` tables `cos, sin:
/// (B·T, D/2)`; `sign = -1` applies the inverse rotation (the backward). In parallel over rows.
pub(crate) fn apply(
    src: &[f32],
    dst: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    h: usize,
    d: usize,
    sign: f32,
) {
    let half = d / 2;
    dst.par_chunks_mut(h * d)
        .zip(src.par_chunks(h * d))
        .enumerate()
        .for_each(|(bt, (yo, xi))| {
            let c = &cos[bt * half..(bt + 1) * half];
            let s = &sin[bt * half..(bt + 1) * half];
            for (yh, xh) in yo.chunks_mut(d).zip(xi.chunks(d)) {
                let (y1, y2) = yh.split_at_mut(half);
                let (x1, x2) = xh.split_at(half);
                for i in 0..half {
                    let si = sign * s[i];
                    y1[i] = x1[i] * c[i] - x2[i] * si;
                    y2[i] = x2[i] * c[i] + x1[i] * si;
                }
            }
        });
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "pgrpo-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        let dims = l.dims();
        apply(x, &mut y, &self.cos, &self.sin, dims[2], dims[3], 1.0);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(dy, "rope bwd", |d| {
            let mut dx = vec![0f32; d.len()];
            let dims = x.dims();
            apply(d, &mut dx, &self.cos, &self.sin, dims[2], dims[3], -1.0);
            Ok(dx)
        })?;
        Ok(Some(tensor_like(dx, x)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, var};
    use candle_core::{Device, Tensor, D};

    #[test]
    fn matches_the_slow_path_value_and_gradients() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = var(&[b, t, h, d], 1.0, 6);
        let angles: Vec<f32> = (0..b * t * d / 2).map(|i| 0.37 * i as f32).collect();
        let a = Tensor::from_vec(angles, (b, t, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (a.cos().unwrap(), a.sin().unwrap());
        let slow = |x: &Tensor| {
            let c = Tensor::cat(&[&cos, &cos], D::Minus1)
                .unwrap()
                .unsqueeze(2)
                .unwrap();
            let s = Tensor::cat(&[&sin.neg().unwrap(), &sin], D::Minus1)
                .unwrap()
                .unsqueeze(2)
                .unwrap();
            let sw = Tensor::cat(
                &[
                    &x.narrow(3, d / 2, d / 2).unwrap(),
                    &x.narrow(3, 0, d / 2).unwrap(),
                ],
                3,
            )
            .unwrap();
            (x.broadcast_mul(&c).unwrap() + sw.broadcast_mul(&s).unwrap()).unwrap()
        };
        check(
            &[x],
            |t| super::rope(&t[0], &cos, &sin).unwrap(),
            |t| slow(&t[0]),
            1e-5,
        );
    }
}
