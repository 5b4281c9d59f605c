//! The default gradient all-reduce and weight broadcast of a [`Collective`]: through host
//! memory, in buckets of flattened `f32` (gradients) or raw bytes (weights), so that they work
//! for vars on any device and any transport that has the four primitives.

use std::ops::Range;

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use super::{check_root, Collective};
use crate::{Error, Result};

/// Consecutive runs of `vars` holding at most `cap` elements each (plus one flag per var),
/// at least one var per run.
pub(crate) fn buckets(vars: &[Var], cap: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < vars.len() {
        let mut end = start;
        let mut elems = 0;
        while end < vars.len()
            && (end == start || elems + vars[end].elem_count() + (end + 1 - start) <= cap)
        {
            elems += vars[end].elem_count();
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// [`Collective::all_reduce_gradients`] through host memory: works for vars on any device.
pub(crate) fn all_reduce_gradients<C: Collective + ?Sized>(
    c: &C,
    vars: &[Var],
    grads: &mut GradStore,
) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    for range in buckets(vars, c.bucket_elems().max(1)) {
        let vars = &vars[range];
        let n: usize = vars.iter().map(|v| v.elem_count()).sum();
        let mut buf: Vec<f32> = Vec::with_capacity(n + vars.len());
        for v in vars {
            match grads.get(v.as_tensor()) {
                Some(g) => {
                    if g.dims() != v.dims() {
                        return Err(Error::ShapeMismatch {
                            what: "gradient",
                            expected: v.dims().to_vec(),
                            got: g.dims().to_vec(),
                        });
                    }
                    buf.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
                }
                None => buf.resize(buf.len() + v.elem_count(), 0.0),
            }
        }
        // One presence flag per var, summed with the gradients.
        for v in vars {
            buf.push(if grads.get(v.as_tensor()).is_some() {
                1.0
            } else {
                0.0
            });
        }
        c.all_reduce_sum_f32(&mut buf)?;
        let mut off = 0;
        for (i, v) in vars.iter().enumerate() {
            let k = v.elem_count();
            if buf[n + i] > 0.0 {
                let g = Tensor::from_slice(&buf[off..off + k], v.dims(), v.device())?
                    .to_dtype(v.dtype())?;
                grads.insert(v.as_tensor(), g);
            } else {
                grads.remove(v.as_tensor());
            }
            off += k;
        }
    }
    Ok(())
}

/// Shapes and dtypes of `vars`, as bytes to compare across ranks.
pub(crate) fn layout_bytes(vars: &[Var]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in vars {
        out.extend(format!("{:?}{:?};", v.dtype(), v.dims()).bytes());
    }
    out
}

/// [`Collective::broadcast_vars`] through host memory, bucketed like the gradients.
pub(crate) fn broadcast_vars<C: Collective + ?Sized>(
    c: &C,
    vars: &[Var],
    root: usize,
) -> Result<()> {
    check_root(root, c.world())?;
    if c.world() == 1 {
        return Ok(());
    }
    c.check_same(
        "the policy's variables (shapes and dtypes)",
        &layout_bytes(vars),
    )?;
    for range in buckets(vars, c.bucket_elems().max(1)) {
        let vars = &vars[range];
        let sizes: Vec<usize> = vars
            .iter()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .collect();
        let total: usize = sizes.iter().sum();
        let mut buf = Vec::with_capacity(total);
        if c.rank() == root {
            for v in vars {
                v.as_tensor().write_bytes(&mut buf)?;
            }
        } else {
            buf.resize(total, 0);
        }
        c.broadcast_bytes(&mut buf, root)?;
        if c.rank() != root {
            let mut off = 0;
            for (v, &len) in vars.iter().zip(&sizes) {
                let t =
                    Tensor::from_raw_buffer(&buf[off..off + len], v.dtype(), v.dims(), v.device())?;
                v.set(&t)?;
                off += len;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn buckets_respect_the_cap() {
        let dev = Device::Cpu;
        let vars: Vec<Var> = [3usize, 4, 10, 1, 1]
            .iter()
            .map(|&n| Var::zeros(n, DType::F32, &dev).unwrap())
            .collect();
        // 3+4 (+2 flags) = 9 <= 9; 10 alone; 1+1 (+2) = 4.
        assert_eq!(buckets(&vars, 9), vec![0..2, 2..3, 3..5]);
        assert_eq!(buckets(&vars, 1 << 20), vec![0..5]);
        assert_eq!(buckets(&vars, 1), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
    }

    /// The host gradient path on one rank: a missing gradient stays missing, a present one
    /// comes back with its dtype and values (the sum over one rank).
    #[test]
    fn host_gradient_path_round_trips() -> Result<()> {
        /// A world of one that still runs the host path.
        struct Loop;
        impl Collective for Loop {
            fn rank(&self) -> usize {
                0
            }
            fn world(&self) -> usize {
                2 // pretend, so that the host path runs; the "sum" is the identity
            }
            fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
                Ok(())
            }
            fn broadcast_bytes(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
                Ok(())
            }
            fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
                Ok(vec![local.to_vec(), local.to_vec()])
            }
            fn barrier(&self) -> Result<()> {
                Ok(())
            }
            fn bucket_elems(&self) -> usize {
                3
            }
        }
        let dev = Device::Cpu;
        let a = Var::new(&[[1.0f64, 2.0], [3.0, 4.0]], &dev)?;
        let b = Var::new(&[5.0f32], &dev)?;
        let unused = Var::new(&[0.0f32; 3], &dev)?;
        let loss = ((a.as_tensor().sqr()?.sum_all()?.to_dtype(DType::F32)?
            + b.as_tensor().sum_all()?)?
            * 2.0)?;
        let mut grads = loss.backward()?;
        let vars = [a.clone(), unused.clone(), b.clone()];
        Loop.all_reduce_gradients(&vars, &mut grads)?;
        let ga = grads.get(a.as_tensor()).unwrap();
        assert_eq!(ga.dtype(), DType::F64);
        assert_eq!(ga.to_vec2::<f64>()?, [[4.0, 8.0], [12.0, 16.0]]);
        assert_eq!(grads.get(b.as_tensor()).unwrap().to_vec1::<f32>()?, [2.0]);
        assert!(grads.get(unused.as_tensor()).is_none());
        // Broadcast from "this" rank (the root) leaves the values; the layout check passes.
        Loop.broadcast_vars(&vars, 0)?;
        assert_eq!(b.as_tensor().to_vec1::<f32>()?, [5.0]);
        Ok(())
    }
}
