//! Fused kernels with their own backward, one per file, for the training path of
//! [`Llama`](crate::lm::Llama).
//!
//! candle's own fused kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim`, `rope`) record
//! no backward, and its differentiable compositions allocate a tensor (and a graph node) per
//! elementary op. Each kernel here is a candle [`CustomOp1`](candle_core::CustomOp1) /
//! [`CustomOp2`](candle_core::CustomOp2) / [`CustomOp3`](candle_core::CustomOp3) with a
//! hand-written backward: one node and one output buffer per call, work split over the cores
//! with rayon.
//!
//! | kernel | replaces | test against |
//! |---|---|---|
//! | [`rms_norm`] | `candle_nn::ops::rms_norm_slow` (8 nodes) | the slow path's value and gradients |
//! | [`rope`] | rotate-half with `narrow`/`cat`/`mul`/`add` (6 nodes) | the same |
//! | [`softmax_last_dim`] | `candle_nn::ops::softmax` (5 nodes) | the same |
//! | [`attention`] | scores, mask, softmax, weighted sum, transposes (≈10 nodes) | the same |
//! | [`swiglu`] | `silu(gate) * up` (2 nodes) | the same |
//! | [`linear`] | `x.matmul(w.t())` (2 nodes, a strided gradient copy) | the same |
//! | [`log_softmax_gather`] ([`log_softmax_gather_at`] at a sampling temperature) | `log_softmax` + `gather` (the `(N, V)` log-probs kept twice) | the same |
//! | [`decoder_block`] | a whole Llama block (≈15 nodes of the kernels above), with optional LoRA adapters | the per-op path (`tests/kernels.rs`, `tests/lora.rs`) |
//!
//! **Devices and dtypes.** The fused kernels run on the CPU in `f32`. Every public function
//! here checks its inputs and falls back to the differentiable composition of candle ops for
//! any other device or dtype (so the crate builds and trains with `--features cuda` or
//! `metal`, at candle's own speed there; the CUDA path is compiled but unverified here).

mod attention;
mod block;
pub(crate) mod dropout;
mod linear;
mod log_softmax_gather;
mod rms_norm;
mod rope;
mod simd;
mod softmax;
mod swiglu;

pub use attention::attention;
pub use block::{decoder_block, BlockLora, BlockShape, BlockWeights, PROJECTIONS};
pub use dropout::Dropout;
pub use linear::linear;
pub use log_softmax_gather::{
    entropy_last_dim, entropy_last_dim_at, log_softmax_gather, log_softmax_gather_at,
};
pub(crate) use log_softmax_gather::{row_log_prob, row_log_sum_exp};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};

/// Whether the fused CPU kernels can take `t` (CPU, `f32`).
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous `f32` data of a CPU storage under `layout`.
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: expected f32 data, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

/// The contiguous `u32` data of a CPU storage under `layout`.
pub(crate) fn cpu_u32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("{op}: expected u32 indices, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: expected contiguous indices"),
    }
}

/// Runs `f` on the contiguous `f32` CPU data of `t` (copied to contiguous first if needed).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(cpu_f32(c, l, op)?),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// A new tensor from `data` with the shape of `like` on the CPU.
pub(crate) fn tensor_like(data: Vec<f32>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, like.shape(), like.device())
}

/// Rows per rayon task so that each task handles at least `min_elems` elements.
pub(crate) fn rows_per_task(row_len: usize, rows: usize, min_elems: usize) -> usize {
    let by_size = min_elems.div_ceil(row_len.max(1)).max(1);
    let by_threads = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    by_size.max(by_threads)
}

/// A strided `f32` matrix view: data, row stride, column stride.
pub(crate) type Mat<'a> = (&'a [f32], usize, usize);

/// `dst = beta·dst + lhs · rhs` with `lhs: (m, k)`, `rhs: (k, n)` and `dst: (m, n)` given as
/// strided views (`dst` row-major with row stride `dst_rs`), through the `gemm` crate (the
/// kernel candle's CPU matmul uses; AVX-512 where the CPU has it). `threads > 1` splits the
/// work over rayon.
///
/// # Panics
/// If a view is too short for its strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let need = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= need(m, n, dst_rs, 1), "gemm: dst too short");
    assert!(
        lhs.0.len() >= need(m, k, lhs.1, lhs.2),
        "gemm: lhs too short"
    );
    assert!(
        rhs.0.len() >= need(k, n, rhs.1, rhs.2),
        "gemm: rhs too short"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let par = if threads > 1 && m * n * k >= 64 * 64 * 64 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    // SAFETY: every index the kernel touches, `(i·rs + j·cs)` for `i < rows`, `j < cols`, lies
    // within the slices (checked above); `dst` is borrowed mutably, the inputs immutably, so
    // they cannot alias.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `dst (n, out) (+)= x (n, inp) · wᵀ` for a row-major `w: (out, inp)`.
///
/// For a few rows (decoding: one token per sequence) `gemm` would pack the whole weight
/// matrix on every call; there each output row is a dot product over one weight row, read
/// once for all `n` inputs, split over the cores by blocks of weight rows (memory-bound, as
/// a matrix-vector product should be). Otherwise `gemm`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_t(
    x: &[f32],
    w: &[f32],
    n: usize,
    out: usize,
    inp: usize,
    dst: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    const SKINNY: usize = 16;
    if n > SKINNY || inp == 0 {
        gemm(
            n,
            out,
            inp,
            dst,
            out,
            (x, inp, 1),
            (w, 1, inp),
            accumulate,
            threads,
        );
        return;
    }
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    let mut yt = vec![0f32; out * n]; // (out, n)
    yt.par_chunks_mut(BLOCK * n)
        .enumerate()
        .for_each(|(c, blk)| {
            for (jj, yj) in blk.chunks_mut(n).enumerate() {
                let j = c * BLOCK + jj;
                let wrow = &w[j * inp..(j + 1) * inp];
                let xr = |b: usize| &x[b * inp..(b + 1) * inp];
                let mut b = 0;
                while b + 4 <= n {
                    let d = simd::dot4(xr(b), xr(b + 1), xr(b + 2), xr(b + 3), wrow);
                    yj[b..b + 4].copy_from_slice(&d);
                    b += 4;
                }
                for (bb, y) in yj.iter_mut().enumerate().skip(b) {
                    *y = simd::dot(xr(bb), wrow);
                }
            }
        });
    for b in 0..n {
        let row = &mut dst[b * out..(b + 1) * out];
        for (j, o) in row.iter_mut().enumerate() {
            let v = yt[j * n + b];
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// Adds per-chunk partial sums in chunk order (deterministic whatever thread ran a chunk).
pub(crate) fn sum_partials(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    for p in parts {
        out.iter_mut().zip(&p).for_each(|(o, x)| *o += x);
    }
    out
}

/// Tests shared by the kernels: a value and every gradient against the slow path.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A `f32` var of uniform values in `[-scale, scale]`.
    pub fn var(shape: &[usize], scale: f32, seed: u64) -> Var {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Max relative difference `|a − b| / (|b|_∞ + tiny)`.
    pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) + 1e-12;
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// Checks `fast(vars)` against `slow(vars)`: values and the gradients of `Σ out ⊙ probe`
    /// (a fixed random probe, so every output element matters) for every var.
    pub fn check(
        vars: &[Var],
        fast: impl Fn(&[Tensor]) -> Tensor,
        slow: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, ys) = (fast(&ts), slow(&ts));
        assert!(rel(&yf, &ys) < tol, "value: {}", rel(&yf, &ys));
        let probe = var(yf.dims(), 1.0, 99).as_tensor().detach();
        let gf = (&yf * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = (&ys * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (gf.get(v).expect("fast grad"), gs.get(v).expect("slow grad"));
            let r = rel(a, b);
            assert!(r < tol, "gradient of input {i}: relative difference {r}");
        }
    }
}
