//! Vectorisable row primitives (max, `exp` sums, scaled `exp`) compiled three times — for
//! AVX-512, AVX2+FMA and the baseline target — and picked at run time, so one binary uses
//! the widest vectors the CPU has and still runs everywhere.
//!
//! Sums use 16 explicit lanes, so the result is the same bits whatever vector width runs
//! them. `exp` is a Cephes-style range reduction plus a degree-6 polynomial (about 2 ulp),
//! written branch-free so that it vectorises.

pub(crate) use crate::dispatch::multiversion;

const LANES: usize = 16;

/// `e^x` for `f32`, about 2 ulp on `[-87, 88]`, 0 below, saturating above.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let bits = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    let v = y * f32::from_bits(bits as u32);
    if x < -87.0 {
        0.0
    } else {
        v
    }
}

fn lanes_sum(acc: [f32; LANES]) -> f32 {
    // A fixed pairwise order.
    let mut w = acc;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            w[i] += w[i + n];
        }
    }
    w[0]
}

multiversion! {
    /// The maximum of `x` (`-inf` when empty; NaN-ignoring).
    pub(crate) fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] = acc[l].max(c[l]);
            }
        }
        let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for &v in chunks.remainder() {
            m = m.max(v);
        }
        m
    }
}

multiversion! {
    /// `Σ e^(x − m)`.
    pub(crate) fn sum_exp(x: &[f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] += exp(c[l] - m);
            }
        }
        let mut s = lanes_sum(acc);
        for &v in chunks.remainder() {
            s += exp(v - m);
        }
        s
    }
}

multiversion! {
    /// `(Σ e^(x − m), Σ e^(x − m) · x)`.
    pub(crate) fn sum_exp_dot(x: &[f32], m: f32) -> (f32, f32) {
        let mut acc = [0f32; LANES];
        let mut accx = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let e = exp(c[l] - m);
                acc[l] += e;
                accx[l] += e * c[l];
            }
        }
        let (mut s, mut sx) = (lanes_sum(acc), lanes_sum(accx));
        for &v in chunks.remainder() {
            let e = exp(v - m);
            s += e;
            sx += e * v;
        }
        (s, sx)
    }
}

multiversion! {
    /// `out = scale · e^(x − sub)`.
    pub(crate) fn exp_scaled(x: &[f32], sub: f32, scale: f32, out: &mut [f32]) -> () {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = scale * exp(v - sub);
        }
    }
}

multiversion! {
    /// In place `x ← e^(x − m)`; returns the sum.
    pub(crate) fn exp_inplace(x: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                c[l] = exp(c[l] - m);
                acc[l] += c[l];
            }
        }
        let mut s = lanes_sum(acc);
        for v in chunks.into_remainder() {
            *v = exp(*v - m);
            s += *v;
        }
        s
    }
}

multiversion! {
    /// `Σ a ⊙ b`.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let mut ca = a.chunks_exact(LANES);
        let mut cb = b.chunks_exact(LANES);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s = lanes_sum(acc);
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s += x * y;
        }
        s
    }
}

multiversion! {
    /// `[Σ x0 ⊙ w, Σ x1 ⊙ w, Σ x2 ⊙ w, Σ x3 ⊙ w]`: four dot products sharing `w`, which is
    /// read once (the inner loop of a skinny matrix product).
    pub(crate) fn dot4(x0: &[f32], x1: &[f32], x2: &[f32], x3: &[f32], w: &[f32]) -> [f32; 4] {
        let n = w.len();
        let (x0, x1, x2, x3) = (&x0[..n], &x1[..n], &x2[..n], &x3[..n]);
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let chunks = w
            .chunks_exact(LANES)
            .zip(x0.chunks_exact(LANES).zip(x1.chunks_exact(LANES)))
            .zip(x2.chunks_exact(LANES).zip(x3.chunks_exact(LANES)));
        for ((wc, (c0, c1)), (c2, c3)) in chunks {
            for l in 0..LANES {
                a0[l] += c0[l] * wc[l];
                a1[l] += c1[l] * wc[l];
                a2[l] += c2[l] * wc[l];
                a3[l] += c3[l] * wc[l];
            }
        }
        let full = n / LANES * LANES;
        let mut out = [lanes_sum(a0), lanes_sum(a1), lanes_sum(a2), lanes_sum(a3)];
        for (r, x) in [x0, x1, x2, x3].into_iter().enumerate() {
            for j in full..n {
                out[r] += x[j] * w[j];
            }
        }
        out
    }
}

/// A `bf16` bit pattern widened to the `f32` it stands for (exact: a 16-bit shift).
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to the nearest `bf16` (ties to even), as a bit pattern; NaN stays a (quiet)
/// NaN, infinities stay infinite, values past the largest `bf16` round to infinity.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

multiversion! {
    /// `dst[i] = bf16(src[i])` ([`f32_to_bf16`]).
    pub(crate) fn to_bf16(src: &[f32], dst: &mut [u16]) -> () {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32_to_bf16(s);
        }
    }
}

multiversion! {
    /// `Σ a ⊙ w` for `bf16` weights `w`, widened to `f32` per 16-lane tile and summed in `f32`
    /// in the order of [`dot`] (so it equals `dot(a, widen(w))` bit for bit).
    pub(crate) fn dot_bf16(a: &[f32], w: &[u16]) -> f32 {
        let mut acc = [0f32; LANES];
        let mut ca = a.chunks_exact(LANES);
        let mut cw = w.chunks_exact(LANES);
        for (x, y) in (&mut ca).zip(&mut cw) {
            for l in 0..LANES {
                acc[l] += x[l] * bf16_to_f32(y[l]);
            }
        }
        let mut s = lanes_sum(acc);
        for (x, &y) in ca.remainder().iter().zip(cw.remainder()) {
            s += x * bf16_to_f32(y);
        }
        s
    }
}

multiversion! {
    /// [`dot4`] with `bf16` weights `w`, widened to `f32` per 16-lane tile (read once for the
    /// four rows) and summed in `f32` in the order of [`dot4`].
    pub(crate) fn dot4_bf16(x0: &[f32], x1: &[f32], x2: &[f32], x3: &[f32], w: &[u16]) -> [f32; 4] {
        let n = w.len();
        let (x0, x1, x2, x3) = (&x0[..n], &x1[..n], &x2[..n], &x3[..n]);
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let chunks = w
            .chunks_exact(LANES)
            .zip(x0.chunks_exact(LANES).zip(x1.chunks_exact(LANES)))
            .zip(x2.chunks_exact(LANES).zip(x3.chunks_exact(LANES)));
        for ((wb, (c0, c1)), (c2, c3)) in chunks {
            let mut wc = [0f32; LANES];
            for l in 0..LANES {
                wc[l] = bf16_to_f32(wb[l]);
            }
            for l in 0..LANES {
                a0[l] += c0[l] * wc[l];
                a1[l] += c1[l] * wc[l];
                a2[l] += c2[l] * wc[l];
                a3[l] += c3[l] * wc[l];
            }
        }
        let full = n / LANES * LANES;
        let mut out = [lanes_sum(a0), lanes_sum(a1), lanes_sum(a2), lanes_sum(a3)];
        for (r, x) in [x0, x1, x2, x3].into_iter().enumerate() {
            for j in full..n {
                out[r] += x[j] * bf16_to_f32(w[j]);
            }
        }
        out
    }
}

multiversion! {
    /// In place `x ← x · s`.
    pub(crate) fn scale(x: &mut [f32], s: f32) -> () {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

/// In-place softmax of one row (a row of `-inf` only gives NaN, as candle's does).
#[inline]
pub(crate) fn softmax_row(row: &mut [f32]) {
    let m = max(row);
    let s = exp_inplace(row, m);
    scale(row, 1.0 / s);
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_widens_exactly() {
        use super::{bf16_to_f32, f32_to_bf16};
        // Exactly representable values round-trip.
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            0.15625,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(bf16_to_f32(f32_to_bf16(x)).to_bits(), x.to_bits(), "{x}");
        }
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to the even one, 1.
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: ties to the even one, 1 + 2⁻⁶.
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)),
            1.0 + 1.0 / 64.0
        );
        // Just above a tie rounds up; relative error at most 2⁻⁸ (bf16 keeps 8 significant bits).
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0 + 1e-6)),
            1.0 + 1.0 / 128.0
        );
        let mut worst = 0f32;
        for i in 0..10_000 {
            let x = ((i as f32) * 0.377).sin() * 10f32.powi(i % 9 - 4);
            let y = bf16_to_f32(f32_to_bf16(x));
            if x != 0.0 {
                worst = worst.max(((y - x) / x).abs());
            }
        }
        assert!(worst <= 1.0 / 256.0, "worst relative error {worst}");
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::MAX)), f32::INFINITY);
    }

    #[test]
    fn bf16_dots_equal_f32_dots_of_the_widened_weights() {
        let a: Vec<f32> = (0..70).map(|i| (i as f32 * 0.31).cos()).collect();
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..70)
                    .map(|i| ((i * (r + 2)) as f32 * 0.17).sin())
                    .collect()
            })
            .collect();
        let w: Vec<u16> = (0..70)
            .map(|i| super::f32_to_bf16((i as f32 * 0.53).sin()))
            .collect();
        let wf: Vec<f32> = w.iter().map(|&b| super::bf16_to_f32(b)).collect();
        assert_eq!(
            super::dot_bf16(&a, &w).to_bits(),
            super::dot(&a, &wf).to_bits()
        );
        let (r0, r1, r2, r3) = (&rows[0], &rows[1], &rows[2], &rows[3]);
        assert_eq!(
            super::dot4_bf16(r0, r1, r2, r3, &w),
            super::dot4(r0, r1, r2, r3, &wf)
        );
        let mut bits = vec![0u16; 70];
        super::to_bf16(&wf, &mut bits);
        assert_eq!(bits, w);
    }

    #[test]
    fn sums_match_scalar_code() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.71).sin() * 3.0).collect();
        let m = super::max(&x);
        assert_eq!(m, x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
        let s: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
        assert!((super::sum_exp(&x, m) as f64 - s).abs() < 1e-5 * s);
        let d: f32 = x.iter().map(|v| v * v).sum();
        assert!((super::dot(&x, &x) - d).abs() < 1e-4 * d);
    }
}
