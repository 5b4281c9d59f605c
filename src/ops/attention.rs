//! Masked multi-head (grouped-query) attention with a fused backward.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::simd;
use super::{cpu_f32, fusable, gemm, with_f32};

/// `softmax(scale · q kᵀ + mask) v` per head, for `q: (B, T, H, D)`, `k, v: (B, Tk, Hkv, D)`
/// (query head `h` reads key/value head `h / (H / Hkv)`, grouped-query attention as in
/// Hugging Face's `repeat_kv`) and an additive `mask: (B, T, Tk)` (0 or `-inf`); returns
/// `(B, T, H, D)`, the layout the output projection reads.
///
/// Differentiable in `q`, `k`, `v`. On the CPU in `f32` it is one graph node: per batch row
/// (in parallel) and head, `gemm` for the two products, an in-place softmax, and the
/// probabilities kept for the backward (`B·H·T·Tk` floats); no transposed copies of `q`, `k`,
/// `v`. Elsewhere the same from candle ops. Every query row must allow at least one key.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let q = Tensor::new(&[1f32, 0.0], &dev)?.reshape((1, 1, 1, 2))?;
/// let k = Tensor::new(&[1f32, 0.0, 0.0, 1.0], &dev)?.reshape((1, 2, 1, 2))?;
/// let v = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)?.reshape((1, 2, 1, 2))?;
/// let mask = Tensor::new(&[[[0f32, 0.0]]], &dev)?;
/// let o = pgrpo::ops::attention(&q, &k, &v, &mask, 0.0)?.flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(o, vec![2.0, 3.0]); // scale 0: the plain mean of the values
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, t, nh, hd) = q.dims4()?;
    let (kb, tk, nkv, khd) = k.dims4()?;
    if kb != b || khd != hd || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if mask.dims() != [b, t, tk] {
        candle_core::bail!(
            "attention: mask {:?} should be ({b}, {t}, {tk})",
            mask.dims()
        );
    }
    if !(fusable(q) && fusable(k) && fusable(v) && fusable(mask)) {
        return slow(q, k, v, mask, scale);
    }
    let mask = with_f32(mask, "attention", |m| Ok(Arc::<[f32]>::from(m)))?;
    let op = Attention {
        dims: Dims {
            b,
            t,
            tk,
            nh,
            nkv,
            hd,
        },
        scale: scale as f32,
        mask,
        probs: Mutex::new(Vec::new()),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The differentiable composition of candle ops (other devices and dtypes).
fn slow(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, t, nh, hd) = q.dims4()?;
    let (_, tk, nkv, _) = k.dims4()?;
    let rep = nh / nkv;
    let q = q.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let qg = (q.reshape((b, nkv, rep * t, hd))? * scale)?;
    let s = qg.matmul(&k.t()?)?.reshape((b, nh, t, tk))?;
    let s = s.broadcast_add(&mask.unsqueeze(1)?)?;
    let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1)?;
    let o = p.reshape((b, nkv, rep * t, tk))?.matmul(&v)?;
    o.reshape((b, nh, t, hd))?.transpose(1, 2)?.contiguous()
}

/// Shapes of one attention call: batch, query and key lengths, query and key/value heads,
/// head size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) tk: usize,
    pub(crate) nh: usize,
    pub(crate) nkv: usize,
    pub(crate) hd: usize,
}

/// Attention over `(B, T, H, D)` queries and `(B, Tk, Hkv, D)` keys/values with an additive
/// `(B, T, Tk)` mask: writes the `(B, T, H, D)` output and the `(B, H, T, Tk)` probabilities.
/// In parallel over batch rows; per head `gemm` (single-threaded, small) and a softmax.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dims: Dims,
    scale: f32,
    out: &mut [f32],
    probs: &mut [f32],
) {
    let Dims {
        t, tk, nh, nkv, hd, ..
    } = dims;
    let rep = nh / nkv;
    out.par_chunks_mut(t * nh * hd)
        .zip(probs.par_chunks_mut(nh * t * tk))
        .enumerate()
        .for_each(|(bi, (ob, pb))| {
            let qb = &q[bi * t * nh * hd..(bi + 1) * t * nh * hd];
            let kb = &k[bi * tk * nkv * hd..(bi + 1) * tk * nkv * hd];
            let vb = &v[bi * tk * nkv * hd..(bi + 1) * tk * nkv * hd];
            let mb = &mask[bi * t * tk..(bi + 1) * t * tk];
            for h in 0..nh {
                let g = h / rep;
                let p = &mut pb[h * t * tk..(h + 1) * t * tk];
                // S (T, Tk) = q_h (T, D) · k_gᵀ (D, Tk).
                let (qh, kg) = ((&qb[h * hd..], nh * hd, 1), (&kb[g * hd..], 1, nkv * hd));
                gemm(t, tk, hd, p, tk, qh, kg, false, 1);
                for (row, mrow) in p.chunks_mut(tk).zip(mb.chunks(tk)) {
                    for (s, &m) in row.iter_mut().zip(mrow) {
                        *s = *s * scale + m;
                    }
                    simd::softmax_row(row);
                }
                // O_h (T, D) = P (T, Tk) · v_g (Tk, D).
                let vg = (&vb[g * hd..], nkv * hd, 1);
                gemm(
                    t,
                    hd,
                    tk,
                    &mut ob[h * hd..],
                    nh * hd,
                    (p, tk, 1),
                    vg,
                    false,
                    1,
                );
            }
        });
}

/// The backward of [`forward`]: writes `∂q`, `∂k`, `∂v` (overwriting) from the output
/// gradient `d` and the saved probabilities.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: &[f32],
    probs: &[f32],
    dims: Dims,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Dims {
        t, tk, nh, nkv, hd, ..
    } = dims;
    let rep = nh / nkv;
    dq.par_chunks_mut(t * nh * hd)
        .zip(
            dk.par_chunks_mut(tk * nkv * hd)
                .zip(dv.par_chunks_mut(tk * nkv * hd)),
        )
        .enumerate()
        .for_each(|(bi, (dqb, (dkb, dvb)))| {
            dkb.fill(0.0);
            dvb.fill(0.0);
            let qs = bi * t * nh * hd..(bi + 1) * t * nh * hd;
            let ks = bi * tk * nkv * hd..(bi + 1) * tk * nkv * hd;
            let (qb, db) = (&q[qs.clone()], &d[qs]);
            let (kb, vb) = (&k[ks.clone()], &v[ks]);
            let mut ds = vec![0f32; t * tk];
            for h in 0..nh {
                let g = h / rep;
                let p = &probs[(bi * nh + h) * t * tk..(bi * nh + h + 1) * t * tk];
                let (qh, dh) = ((&qb[h * hd..], nh * hd, 1), (&db[h * hd..], nh * hd, 1));
                // dP (T, Tk) = dO_h (T, D) · v_gᵀ (D, Tk).
                gemm(
                    t,
                    tk,
                    hd,
                    &mut ds,
                    tk,
                    dh,
                    (&vb[g * hd..], 1, nkv * hd),
                    false,
                    1,
                );
                // dS = scale · P ⊙ (dP − Σ_j P dP).
                for (dsr, pr) in ds.chunks_mut(tk).zip(p.chunks(tk)) {
                    let dot = simd::dot(dsr, pr);
                    for (x, &pj) in dsr.iter_mut().zip(pr) {
                        *x = scale * pj * (*x - dot);
                    }
                }
                // dq_h (T, D) = dS (T, Tk) · k_g (Tk, D).
                let kg = (&kb[g * hd..], nkv * hd, 1);
                gemm(
                    t,
                    hd,
                    tk,
                    &mut dqb[h * hd..],
                    nh * hd,
                    (&ds, tk, 1),
                    kg,
                    false,
                    1,
                );
                // dk_g (Tk, D) += dSᵀ (Tk, T) · q_h (T, D).
                gemm(
                    tk,
                    hd,
                    t,
                    &mut dkb[g * hd..],
                    nkv * hd,
                    (&ds, 1, tk),
                    qh,
                    true,
                    1,
                );
                // dv_g (Tk, D) += Pᵀ (Tk, T) · dO_h (T, D).
                gemm(
                    tk,
                    hd,
                    t,
                    &mut dvb[g * hd..],
                    nkv * hd,
                    (p, 1, tk),
                    dh,
                    true,
                    1,
                );
            }
        });
}

struct Attention {
    dims: Dims,
    scale: f32,
    mask: Arc<[f32]>,
    /// `(B, H, T, Tk)` probabilities of the forward, for the backward.
    probs: Mutex<Vec<f32>>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("attention: a thread panicked holding the saved probabilities".into())
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "pgrpo-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = cpu_f32(s1, l1, self.name())?;
        let k = cpu_f32(s2, l2, self.name())?;
        let v = cpu_f32(s3, l3, self.name())?;
        let Dims {
            b, t, tk, nh, hd, ..
        } = self.dims;
        let mut out = vec![0f32; b * t * nh * hd];
        let mut probs = vec![0f32; b * nh * t * tk];
        forward(
            q, k, v, &self.mask, self.dims, self.scale, &mut out, &mut probs,
        );
        *self.probs.lock().map_err(|_| poisoned())? = probs;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        d_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims {
            b,
            t,
            tk,
            nh,
            nkv,
            hd,
        } = self.dims;
        let probs = self.probs.lock().map_err(|_| poisoned())?;
        if probs.len() != b * nh * t * tk {
            candle_core::bail!("attention bwd: the forward's probabilities are missing");
        }
        let mut dq = vec![0f32; b * t * nh * hd];
        let mut dk = vec![0f32; b * tk * nkv * hd];
        let mut dv = vec![0f32; b * tk * nkv * hd];
        let s = self.scale;
        with_f32(q, "attention bwd", |q| {
            with_f32(k, "attention bwd", |k| {
                with_f32(v, "attention bwd", |v| {
                    with_f32(d_out, "attention bwd", |d| {
                        backward(q, k, v, d, &probs, self.dims, s, &mut dq, &mut dk, &mut dv);
                        Ok(())
                    })
                })
            })
        })?;
        drop(probs);
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, var};
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_slow_path_value_and_gradients() {
        // Grouped-query (6 query heads over 2 key/value heads), a cache-like Tk > T, and a
        // causal mask with a padded key.
        let (b, t, tk, nh, nkv, hd) = (2, 5, 7, 6, 2, 8);
        let q = var(&[b, t, nh, hd], 1.0, 12);
        let k = var(&[b, tk, nkv, hd], 1.0, 13);
        let v = var(&[b, tk, nkv, hd], 1.0, 14);
        let mut m = vec![0f32; b * t * tk];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..tk {
                    if j > i + (tk - t) || (bi == 1 && j == 0) {
                        m[(bi * t + i) * tk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, t, tk), &Device::Cpu).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        check(
            &[q, k, v],
            |x| super::attention(&x[0], &x[1], &x[2], &mask, scale).unwrap(),
            |x| super::slow(&x[0], &x[1], &x[2], &mask, scale).unwrap(),
            1e-5,
        );
    }
}
