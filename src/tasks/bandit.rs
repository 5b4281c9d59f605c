//! A contextual bandit with heterogeneous preference groups: the smallest setting where
//! GRPO-style normalisation meets users who want different things.
//!
//! Each prompt comes from one of `K` preference groups (drawn with imbalanced frequencies);
//! the context the policy sees is the group. Group `k` prefers action `k` (quality 1). The
//! majority's action (0) is a half-good compromise for everyone else (quality
//! `majority_quality`), all other actions are worth 0. Group `k`'s rewards are scaled by
//! `scales[k]` and carry Gaussian noise:
//!
//! ```text
//! R = scale_k · (q_k(a) + noise_std · ε),   ε ~ N(0, 1)
//! ```
//!
//! Because a minority's rewards are small and rare, any normalisation that pools groups
//! (batch statistics) shrinks its learning signal — the failure P-GRPO targets.

use candle_core::Device;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::bail_config;
use crate::models::TabularPolicy;
use crate::{Error, GroupKey, Result, RewardFn};

/// The bandit's parameters. See the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceBandit {
    /// Probability of each group, summing to 1 (e.g. `[0.80, 0.15, 0.05]`).
    pub frequencies: Vec<f64>,
    /// Reward scale of each group (e.g. `[1.0, 0.3, 0.1]`).
    pub scales: Vec<f32>,
    /// `quality[k][a]`: the noiseless reward of action `a` for group `k`, before scaling.
    pub quality: Vec<Vec<f32>>,
    /// Std of the reward noise, relative to the group's scale.
    pub noise_std: f32,
}

impl PreferenceBandit {
    /// `K = frequencies.len()` groups over `num_actions ≥ K` actions: group `k` prefers
    /// action `k` (quality 1); action 0 has quality `majority_quality` for the other groups;
    /// everything else 0.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the bad parameter.
    pub fn new(
        frequencies: Vec<f64>,
        scales: Vec<f32>,
        num_actions: usize,
        majority_quality: f32,
        noise_std: f32,
    ) -> Result<Self> {
        let k = frequencies.len();
        if k == 0 {
            bail_config!("frequencies", "need at least one group");
        }
        if scales.len() != k {
            bail_config!(
                "scales",
                "need one scale per group ({k}), got {}",
                scales.len()
            );
        }
        if frequencies.iter().any(|f| !(f.is_finite() && *f >= 0.0)) {
            bail_config!(
                "frequencies",
                "must be finite and >= 0, got {frequencies:?}"
            );
        }
        let total: f64 = frequencies.iter().sum();
        if (total - 1.0).abs() > 1e-6 {
            bail_config!("frequencies", "must sum to 1, got {total}");
        }
        if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail_config!("scales", "must be finite and > 0, got {scales:?}");
        }
        if num_actions < k {
            bail_config!(
                "num_actions",
                "need at least one action per group ({k}), got {num_actions}"
            );
        }
        if !(majority_quality.is_finite() && (0.0..1.0).contains(&majority_quality)) {
            bail_config!(
                "majority_quality",
                "must be in [0, 1), got {majority_quality}"
            );
        }
        if !(noise_std.is_finite() && noise_std >= 0.0) {
            bail_config!("noise_std", "must be finite and >= 0, got {noise_std}");
        }
        let quality = (0..k)
            .map(|g| {
                (0..num_actions)
                    .map(|a| {
                        if a == g {
                            1.0
                        } else if a == 0 {
                            majority_quality
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            frequencies,
            scales,
            quality,
            noise_std,
        })
    }

    /// Number of preference groups.
    pub fn num_groups(&self) -> usize {
        self.frequencies.len()
    }

    /// Number of actions.
    pub fn num_actions(&self) -> usize {
        self.quality[0].len()
    }

    /// Draws `n` group ids with the configured frequencies.
    pub fn sample_groups(&self, n: usize, rng: &mut StdRng) -> Vec<u32> {
        (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                let mut acc = 0.0;
                for (k, f) in self.frequencies.iter().enumerate() {
                    acc += f;
                    if u < acc {
                        return k as u32;
                    }
                }
                self.num_groups() as u32 - 1
            })
            .collect()
    }

    /// One noisy reward of `action` for `group`. Out-of-range ids score NaN (the trainer
    /// rejects it with a typed error).
    pub fn reward<G: Rng + ?Sized>(&self, group: u32, action: u32, rng: &mut G) -> f32 {
        let Some(q) = self
            .quality
            .get(group as usize)
            .and_then(|row| row.get(action as usize))
        else {
            return f32::NAN;
        };
        let eps: f32 = StandardNormal.sample(rng);
        self.scales[group as usize] * (q + self.noise_std * eps)
    }

    /// A reward function for the [`Trainer`](crate::Trainer): the prompt is the true group
    /// (the context), the group label is ignored (it may be shuffled for an ablation). Noise
    /// comes from its own generator seeded with `seed`, whose position is saved in
    /// checkpoints, so a resumed run draws the same noise.
    pub fn reward_fn(&self, seed: u64) -> BanditReward {
        BanditReward {
            bandit: self.clone(),
            seed,
            rng: ChaCha12Rng::seed_from_u64(seed),
        }
    }

    /// Expected noiseless quality of a policy for `group`, as a fraction of the group's
    /// optimum (1.0 = always the preferred action): `Σ_a π(a|k) q_k(a) / max_a q_k(a)`.
    pub fn fraction_of_optimum(&self, group: usize, probs: &[f32]) -> f64 {
        let q = &self.quality[group];
        let best = q.iter().cloned().fold(f32::MIN, f32::max) as f64;
        q.iter()
            .zip(probs)
            .map(|(&q, &p)| q as f64 * p as f64)
            .sum::<f64>()
            / best
    }

    /// The fraction of optimum of every group under `policy`.
    pub fn evaluate(&self, policy: &TabularPolicy) -> Result<Vec<f64>> {
        let probs = policy.probs()?;
        Ok((0..self.num_groups())
            .map(|k| self.fraction_of_optimum(k, &probs[k]))
            .collect())
    }

    /// A policy for this bandit: shared logits plus one row per group, all zero (uniform).
    pub fn policy(&self, device: &Device) -> Result<TabularPolicy> {
        TabularPolicy::new(self.num_groups(), self.num_actions(), true, device)
    }
}

/// The [`PreferenceBandit`]'s reward function (see [`PreferenceBandit::reward_fn`]).
///
/// Its noise generator is ChaCha12 (the same stream as `StdRng::seed_from_u64(seed)`), whose
/// position is its [`state`](RewardFn::state): `{"kind": "pgrpo.bandit_reward", "seed": …,
/// "word_pos": "…"}`. [`restore`](RewardFn::restore) re-seeds and seeks, in O(1).
///
/// ```
/// use pgrpo::tasks::bandit::PreferenceBandit;
/// use pgrpo::RewardFn;
/// let bandit = PreferenceBandit::new(vec![0.5, 0.5], vec![1.0, 1.0], 2, 0.5, 0.1)?;
/// let mut a = bandit.reward_fn(7);
/// a.score(&0, &1, &"g".into())?;
/// let saved = a.state()?.unwrap();
/// let mut b = bandit.reward_fn(0);
/// b.restore(saved)?;
/// assert_eq!(a.score(&1, &1, &"g".into())?, b.score(&1, &1, &"g".into())?);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BanditReward {
    bandit: PreferenceBandit,
    seed: u64,
    rng: ChaCha12Rng,
}

const BANDIT_REWARD_KIND: &str = "pgrpo.bandit_reward";

impl BanditReward {
    /// The bandit it scores for.
    pub fn bandit(&self) -> &PreferenceBandit {
        &self.bandit
    }
}

impl RewardFn<u32, u32> for BanditReward {
    fn score(&mut self, prompt: &u32, completion: &u32, _group: &GroupKey) -> Result<f32> {
        Ok(self.bandit.reward(*prompt, *completion, &mut self.rng))
    }

    fn name(&self) -> &str {
        "bandit"
    }

    fn state(&self) -> Result<Option<serde_json::Value>> {
        Ok(Some(serde_json::json!({
            "kind": BANDIT_REWARD_KIND,
            "seed": self.seed,
            // u128: as a decimal string, JSON numbers stop at 2^64.
            "word_pos": self.rng.get_word_pos().to_string(),
        })))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        let bad = |what: &str| Error::Reward(format!("bandit reward state: {what}"));
        if state.get("kind").and_then(|k| k.as_str()) != Some(BANDIT_REWARD_KIND) {
            return Err(bad("`kind` is not \"pgrpo.bandit_reward\""));
        }
        let seed = state
            .get("seed")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| bad("no integer `seed`"))?;
        let pos: u128 = state
            .get("word_pos")
            .and_then(|p| p.as_str())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| bad("no decimal `word_pos`"))?;
        // ChaCha's 64-bit block counter: word positions past 2^68 do not exist.
        if pos >= 1u128 << 68 {
            return Err(bad("`word_pos` is out of range"));
        }
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        rng.set_word_pos(pos);
        self.seed = seed;
        self.rng = rng;
        Ok(())
    }
}
