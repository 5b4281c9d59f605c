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

/// Largest row count [`matmul_t`] sends to its skinny kernel (above it, `gemm`).
///
/// Measured on SmolLM2-135M's shapes (`ops::tests::matmul_t_crossover`, an ignored test,
/// 2 cores): the skinny kernel reads each weight row once for all rows but is bound by its
/// loads and by `f32` multiply-then-add (no FMA, to sum exactly as [`simd::dot`]); `gemm`
/// packs the whole weight matrix on every call but computes at full FMA rate. At 8 rows
/// the skinny kernel wins on every shape but k/v (576→192, even); at 16 rows the two are
/// even on 576→1536, `gemm` leads by 10–45 % on 576→576 and the LM head (noisy: a shared,
/// loaded machine), and the skinny kernel is 3–9× faster on the 1536→576 down projection,
/// where `gemm` is slow (a whole layer at 16 rows: skinny 2.7 ms against 4.1 ms); at 32
/// rows and above `gemm` wins everywhere but on the down projection.
pub(crate) const SKINNY_ROWS: usize = 16;

/// Largest row count sent to the skinny kernel when the weight matrix is at least twice as
/// wide as tall (`inp ≥ 2·out`, the MLP's down projection): there `gemm` stays slow, and
/// the skinny kernel was 2–4× faster at 32 rows, 1.2× at 64 and 0.8–1.3× at 128.
pub(crate) const SKINNY_ROWS_WIDE: usize = 64;

static SKINNY_WIDE_MAX: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(SKINNY_ROWS_WIDE);

/// Sets the largest row count that `x Wᵀ` ([`linear`], and so decoding) computes with the
/// skinny kernel instead of `gemm` for a wide weight matrix (`inp ≥ 2·out`); returns the
/// previous value. Default [`SKINNY_ROWS_WIDE`] (64); [`SKINNY_ROWS`] (16, the limit for
/// other shapes) restores the single threshold of before. For benchmarks comparing the two
/// in one process: it changes the summation order (the values only by `f32` rounding) of
/// such products with 17 to 64 rows.
#[doc(hidden)]
pub fn set_skinny_rows_wide(rows: usize) -> usize {
    SKINNY_WIDE_MAX.swap(rows, std::sync::atomic::Ordering::Relaxed)
}

/// The skinny kernel's row limit for an `(out, inp)` weight matrix.
pub(crate) fn skinny_rows(out: usize, inp: usize) -> usize {
    if inp >= 2 * out {
        SKINNY_WIDE_MAX
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(SKINNY_ROWS)
    } else {
        SKINNY_ROWS
    }
}

/// `dst (n, out) (+)= x (n, inp) · wᵀ` for a row-major `w: (out, inp)`.
///
/// For a few rows (decoding: one token per sequence, up to [`skinny_rows`]) `gemm` would
/// pack the whole weight matrix on every call; there each output is a dot product over one
/// weight row, read once for all `n` inputs ([`skinny`]). Otherwise `gemm`.
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
    matmul_t_at(
        x,
        w,
        n,
        out,
        inp,
        dst,
        accumulate,
        threads,
        skinny_rows(out, inp),
    );
}

/// [`matmul_t`] with the skinny kernel up to `skinny_rows` rows.
#[allow(clippy::too_many_arguments)]
fn matmul_t_at(
    x: &[f32],
    w: &[f32],
    n: usize,
    out: usize,
    inp: usize,
    dst: &mut [f32],
    accumulate: bool,
    threads: usize,
    skinny_rows: usize,
) {
    if n > skinny_rows || inp == 0 {
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
    skinny(x, &w[..out * inp], n, out, inp, dst, accumulate);
}

/// Weight rows a skinny product reads: `f32`, or `bf16` bit patterns widened per tile.
pub(crate) trait WeightRows: Sync {
    /// `[x0·w_j, x1·w_j, x2·w_j, x3·w_j]`.
    fn dot4(&self, j: usize, inp: usize, x: [&[f32]; 4]) -> [f32; 4];
    /// `x·w_j`.
    fn dot(&self, j: usize, inp: usize, x: &[f32]) -> f32;
}

impl WeightRows for [f32] {
    fn dot4(&self, j: usize, inp: usize, x: [&[f32]; 4]) -> [f32; 4] {
        simd::dot4(x[0], x[1], x[2], x[3], &self[j * inp..(j + 1) * inp])
    }
    fn dot(&self, j: usize, inp: usize, x: &[f32]) -> f32 {
        simd::dot(x, &self[j * inp..(j + 1) * inp])
    }
}

impl WeightRows for [u16] {
    fn dot4(&self, j: usize, inp: usize, x: [&[f32]; 4]) -> [f32; 4] {
        simd::dot4_bf16(x[0], x[1], x[2], x[3], &self[j * inp..(j + 1) * inp])
    }
    fn dot(&self, j: usize, inp: usize, x: &[f32]) -> f32 {
        simd::dot_bf16(x, &self[j * inp..(j + 1) * inp])
    }
}

/// The skinny product `dst (n, out) (+)= x (n, inp) · wᵀ`: each output is one dot product
/// (four input rows at a time sharing a weight row, [`simd::dot4`]), work split over the
/// cores by blocks of 64 weight rows. Within a block the inputs go by tiles of 16 rows, each
/// tile dotted with the whole block before the next, so the block stays in L2 and the tile
/// in L1 whatever `n` is. Every output is the same sum in the same order for any tiling
/// (the 4-row groups start at multiples of 4), so the result does not depend on `n` beyond
/// the row's own values.
pub(crate) fn skinny<W: WeightRows + ?Sized>(
    x: &[f32],
    w: &W,
    n: usize,
    out: usize,
    inp: usize,
    dst: &mut [f32],
    accumulate: bool,
) {
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    const TILE: usize = 16; // a multiple of 4
    if n == 0 || out == 0 {
        return;
    }
    let xr = |b: usize| &x[b * inp..(b + 1) * inp];
    let mut yt = vec![0f32; out * n]; // (out, n)
    yt.par_chunks_mut(BLOCK * n)
        .enumerate()
        .for_each(|(c, blk)| {
            for t0 in (0..n).step_by(TILE) {
                let t1 = (t0 + TILE).min(n);
                for (jj, yj) in blk.chunks_mut(n).enumerate() {
                    let j = c * BLOCK + jj;
                    let mut b = t0;
                    while b + 4 <= t1 {
                        let d = w.dot4(j, inp, [xr(b), xr(b + 1), xr(b + 2), xr(b + 3)]);
                        yj[b..b + 4].copy_from_slice(&d);
                        b += 4;
                    }
                    for (bb, y) in yj.iter_mut().enumerate().take(t1).skip(b) {
                        *y = w.dot(j, inp, xr(bb));
                    }
                }
            }
        });
    let scatter = |(b, row): (usize, &mut [f32])| {
        for (j, o) in row.iter_mut().enumerate() {
            let v = yt[j * n + b];
            *o = if accumulate { *o + v } else { v };
        }
    };
    if n * out >= 1 << 16 {
        dst[..n * out]
            .par_chunks_mut(out)
            .enumerate()
            .for_each(scatter);
    } else {
        dst[..n * out].chunks_mut(out).enumerate().for_each(scatter);
    }
}

/// `f32` → `bf16` bit patterns (round to nearest, ties to even; NaN stays NaN), split over the
/// cores: the one-off conversion of a weight matrix for [`skinny`] products in `bf16`.
pub(crate) fn to_bf16(src: &[f32], dst: &mut [u16]) {
    use rayon::prelude::*;
    assert_eq!(src.len(), dst.len(), "to_bf16: lengths differ");
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| simd::to_bf16(s, d));
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1f32..1.0)).collect()
    }

    /// The skinny kernel against `gemm` (f32 rounding apart), and each of its outputs the
    /// same bits whatever the number of rows and the tiling (row `b` of an `n`-row product
    /// equals the 1-row product of row `b`).
    #[test]
    fn skinny_matches_gemm_and_does_not_depend_on_the_row_count() {
        let (out, inp) = (150, 83);
        let w = rand_vec(out * inp, 1);
        for n in [1, 3, 4, 17, 33, 70] {
            let x = rand_vec(n * inp, n as u64);
            let mut a = vec![0f32; n * out];
            let mut b = vec![0f32; n * out];
            matmul_t_at(&x, &w, n, out, inp, &mut a, false, 2, usize::MAX);
            matmul_t_at(&x, &w, n, out, inp, &mut b, false, 2, 0);
            let worst = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst < 1e-5, "n = {n}: {worst}");
            for r in [0, n / 2, n - 1] {
                let mut one = vec![0f32; out];
                skinny(
                    &x[r * inp..(r + 1) * inp],
                    &w[..],
                    1,
                    out,
                    inp,
                    &mut one,
                    false,
                );
                assert_eq!(one, a[r * out..(r + 1) * out], "n = {n}, row {r}");
            }
            // Accumulating adds the product to what is there.
            let mut c = vec![1f32; n * out];
            matmul_t_at(&x, &w, n, out, inp, &mut c, true, 2, usize::MAX);
            assert!(c.iter().zip(&a).all(|(c, a)| *c == 1.0 + a));
        }
    }

    /// With `bf16` weights the skinny kernel computes exactly the `f32` product with the
    /// widened weights; those are within bf16 rounding (2⁻⁸ relative per weight) of the
    /// originals.
    #[test]
    fn bf16_skinny_is_the_f32_product_of_the_rounded_weights() {
        let (out, inp, n) = (130, 100, 21);
        let w = rand_vec(out * inp, 4);
        let x = rand_vec(n * inp, 5);
        let mut wb = vec![0u16; w.len()];
        to_bf16(&w, &mut wb);
        let widened: Vec<f32> = wb.iter().map(|&b| simd::bf16_to_f32(b)).collect();
        let (mut yb, mut yw, mut yf) = (
            vec![0f32; n * out],
            vec![0f32; n * out],
            vec![0f32; n * out],
        );
        skinny(&x, &wb[..], n, out, inp, &mut yb, false);
        skinny(&x, &widened[..], n, out, inp, &mut yw, false);
        skinny(&x, &w[..], n, out, inp, &mut yf, false);
        assert_eq!(yb, yw);
        // |Σ x (w − ŵ)| ≤ 2⁻⁸ Σ |x w|.
        for r in 0..n {
            for j in 0..out {
                let bound: f32 = (0..inp)
                    .map(|k| (x[r * inp + k] * w[j * inp + k]).abs())
                    .sum::<f32>()
                    / 256.0
                    + 1e-5;
                let d = (yb[r * out + j] - yf[r * out + j]).abs();
                assert!(d <= bound, "({r}, {j}): {d} > {bound}");
            }
        }
        assert_ne!(yb, yf, "bf16 rounding should show");
    }

    /// Timings of `x Wᵀ` on SmolLM2-135M's shapes: the skinny kernel (f32 and bf16 weights)
    /// against `gemm`, for 8 to 128 rows, alternating. Not a check: run with
    /// `cargo test --release --lib matmul_t_crossover -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn matmul_t_crossover() {
        use std::time::Instant;
        let shapes = [
            ("q/o 576→576", 576, 576),
            ("k/v 576→192", 192, 576),
            ("gate/up 576→1536", 1536, 576),
            ("down 1536→576", 576, 1536),
            ("lm head 576→49152", 49152, 576),
        ];
        let threads = rayon::current_num_threads();
        println!("threads {threads}; median µs over alternating repetitions");
        println!("| shape | rows | gemm | skinny f32 | skinny bf16 | gemm / skinny f32 |");
        println!("|---|---|---|---|---|---|");
        for (name, out, inp) in shapes {
            let w = rand_vec(out * inp, 1);
            let mut wb = vec![0u16; w.len()];
            to_bf16(&w, &mut wb);
            for n in [8, 16, 32, 64, 128] {
                let x = rand_vec(n * inp, 2);
                let mut y = vec![0f32; n * out];
                let reps = (2e8 / (out * inp * n) as f64).clamp(3.0, 200.0) as usize;
                let mut t = [Vec::new(), Vec::new(), Vec::new()];
                for _ in 0..reps {
                    let s = Instant::now();
                    matmul_t_at(&x, &w, n, out, inp, &mut y, false, threads, 0);
                    t[0].push(s.elapsed().as_secs_f64());
                    let s = Instant::now();
                    matmul_t_at(&x, &w, n, out, inp, &mut y, false, threads, usize::MAX);
                    t[1].push(s.elapsed().as_secs_f64());
                    let s = Instant::now();
                    skinny(&x, &wb[..], n, out, inp, &mut y, false);
                    t[2].push(s.elapsed().as_secs_f64());
                }
                let med = |v: &mut Vec<f64>| {
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2] * 1e6
                };
                let (g, s, b) = (med(&mut t[0]), med(&mut t[1]), med(&mut t[2]));
                println!("| {name} | {n} | {g:.0} | {s:.0} | {b:.0} | {:.2} |", g / s);
            }
        }
        // The per-`generate` cost of bf16 decoding: rounding SmolLM2-135M's matrices
        // (30 × 3.54 M projection weights + the 28.3 M LM head) to bf16.
        let total = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576) + 49152 * 576;
        let src = rand_vec(total, 3);
        let mut dst = vec![0u16; total];
        let mut t = Vec::new();
        for _ in 0..5 {
            let s = Instant::now();
            to_bf16(&src, &mut dst);
            t.push(s.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        println!(
            "to_bf16 of {total} weights: {:.0} ms (median of 5)",
            t[2] * 1e3
        );
    }
}
