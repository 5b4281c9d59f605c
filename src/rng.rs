//! Seeding: the sampling generator of every step, derived from the run's seed and the step
//! number alone (and, in a data-parallel run, the rank), so that there is no generator state
//! to save for an exact resume.

use rand::{rngs::StdRng, SeedableRng};

/// The sampling generator of step `step` of a run seeded with `seed`: a `StdRng` seeded with
/// a SplitMix64 mix of the two, so neighbouring steps and seeds get unrelated streams.
pub fn step_rng(seed: u64, step: u64) -> StdRng {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// The sampling generator of rank `rank` at step `step` of a run seeded with `seed`: rank 0
/// uses [`step_rng(seed, step)`](step_rng), as a single process does, and rank `r > 0` the
/// same construction from a seed mixed with `r`. So a data-parallel run is reproducible for
/// a fixed number of ranks, and each rank draws its own stream.
///
/// ```
/// use pgrpo::rng::{rank_step_rng, step_rng};
/// use rand::Rng;
/// let draw = |mut r: rand::rngs::StdRng| r.random::<u64>();
/// assert_eq!(draw(rank_step_rng(7, 3, 0)), draw(step_rng(7, 3)));
/// assert_ne!(draw(rank_step_rng(7, 3, 1)), draw(rank_step_rng(7, 3, 0)));
/// assert_eq!(draw(rank_step_rng(7, 3, 2)), draw(rank_step_rng(7, 3, 2)));
/// ```
pub fn rank_step_rng(seed: u64, step: u64, rank: usize) -> StdRng {
    if rank == 0 {
        return step_rng(seed, step);
    }
    let mut z = seed ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    step_rng(z ^ (z >> 31), step)
}
