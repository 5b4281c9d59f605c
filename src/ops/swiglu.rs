//! SwiGLU gating `silu(gate) ⊙ up` with a fused backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use super::{cpu_f32, fusable, tensor_like, with_f32};

const CHUNK: usize = 16 * 1024;

/// `silu(gate) ⊙ up` with `silu(a) = a · σ(a)`, elementwise on two tensors of one shape.
///
/// Differentiable in both. Fused on the CPU in `f32` (one pass each way, no intermediate
/// tensors); elsewhere `gate.silu()? * up`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let g = Tensor::new(&[0f32, 1.0], &Device::Cpu)?;
/// let u = Tensor::new(&[5f32, 2.0], &Device::Cpu)?;
/// let y = pgrpo::ops::swiglu(&g, &u)?.to_vec1::<f32>()?;
/// assert!(y[0] == 0.0 && (y[1] - 1.4621).abs() < 1e-4); // 2 · 1 · σ(1)
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !(fusable(gate) && fusable(up)) || gate.dims() != up.dims() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

#[inline(always)]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + simd::exp(-a))
}

multiversion! {
    fn fwd_chunk(g: &[f32], u: &[f32], y: &mut [f32]) -> () {
        for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
            *o = a * sigmoid(a) * b;
        }
    }
}

multiversion! {
    fn bwd_chunk(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) -> () {
        for ((o1, o2), ((&a, &b), &e)) in dg.iter_mut().zip(du.iter_mut()).zip(g.iter().zip(u).zip(d)) {
            let s = sigmoid(a);
            *o2 = e * a * s;
            *o1 = e * b * s * (1.0 + a * (1.0 - s));
        }
    }
}

/// `y = silu(g) ⊙ u`, in parallel.
pub(crate) fn forward(g: &[f32], u: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(yc, (gc, uc))| fwd_chunk(gc, uc, yc));
}

/// The backward of [`forward`] for output gradient `d`.
pub(crate) fn backward(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(d.par_chunks(CHUNK))
        .for_each(|(((dgc, duc), (gc, uc)), dc)| bwd_chunk(gc, uc, dc, dgc, duc));
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "pgrpo-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = cpu_f32(s1, l1, self.name())?;
        let u = cpu_f32(s2, l2, self.name())?;
        let mut y = vec![0f32; g.len()];
        forward(g, u, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(gate, "swiglu bwd", |g| {
            with_f32(up, "swiglu bwd", |u| {
                with_f32(dy, "swiglu bwd", |d| {
                    let mut dg = vec![0f32; g.len()];
                    let mut du = vec![0f32; g.len()];
                    backward(g, u, d, &mut dg, &mut du);
                    Ok((dg, du))
                })
            })
        })?;
        Ok((Some(tensor_like(dg, gate)?), Some(tensor_like(du, up)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, var};

    #[test]
    fn matches_the_slow_path_value_and_gradients() {
        let g = var(&[7, 33], 4.0, 3);
        let u = var(&[7, 33], 2.0, 4);
        check(
            &[g, u],
            |t| super::swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            1e-5,
        );
    }
}
