//! Helpers shared by the integration tests: seeded randomness and reference statistics computed
//! the slow, obvious way (explicit weights, two passes, `f64`).
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded generator: every test is reproducible.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` rewards with a random location and scale, a few exact repeats among them.
pub fn rewards(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let loc = rng.random_range(-5.0..5.0f64);
    let scale = 10f64.powf(rng.random_range(-2.0..2.0));
    (0..n)
        .map(|_| {
            if rng.random_bool(0.1) {
                loc as f32
            } else {
                (loc + scale * normal(rng)) as f32
            }
        })
        .collect()
}

/// One standard normal draw (Box–Muller).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Weighted statistics of `values` computed directly: `(weight, mean, m2)` with
/// `m2 = Σ wᵢ (xᵢ − mean)²`, two passes in `f64`.
pub fn weighted(values: &[f64], weights: &[f64]) -> (f64, f64, f64) {
    assert_eq!(values.len(), weights.len());
    let w: f64 = weights.iter().sum();
    let mean = values.iter().zip(weights).map(|(x, w)| w * x).sum::<f64>() / w;
    let m2 = values
        .iter()
        .zip(weights)
        .map(|(x, w)| w * (x - mean) * (x - mean))
        .sum();
    (w, mean, m2)
}

/// Asserts `|got − want| ≤ tol · max(|want|, scale)`.
#[track_caller]
pub fn assert_close(got: f64, want: f64, tol: f64, scale: f64, what: &str) {
    let bound = tol * want.abs().max(scale);
    assert!(
        (got - want).abs() <= bound,
        "{what}: got {got:e}, want {want:e} (|diff| {:e} > {bound:e})",
        (got - want).abs()
    );
}
