//! Several reward functions: their separate scores ([`RewardParts`], `(N, F)`) and how they
//! become one advantage per row ([`RewardAggregation`], TRL's `multi_objective_aggregation`).
//!
//! | [`RewardAggregation`] | advantage of row `i` | source |
//! |---|---|---|
//! | `SumThenNormalize` | the estimator on `R_i = Σ_f w_f r_if` | TRL's default |
//! | `NormalizeThenSum` | `S_i = Σ_f w_f A_f(r_·f)_i`, then `(S_i − μ_S) / (σ_S + eps)` | GDPO (arXiv 2601.05242), TRL `normalize_then_sum` |
//!
//! `A_f` is the configured estimator applied to function `f`'s scores alone. Under
//! `NormalizeThenSum` every function keeps its own history per preference group (keys
//! [`part_key`]`(group, function)`), so P-GRPO (or any group-aware estimator) normalises each
//! function's reward against that function's history of that group: P-GRPO with a history
//! per (preference group, reward function). With `grpo` it is TRL's `normalize_then_sum`.

use serde::{Deserialize, Serialize};

use super::estimators::{finite_f32, ratio};
use super::stats::{rows_per_task, BatchStats};
use super::{AdvantageConfig, AdvantageEstimator, Advantages, RolloutRewards};
use crate::error::{Error, Result};
use crate::history::RunningMoments;
use crate::names::named_enum;
use crate::{GroupKey, RewardHistory};

/// How several reward functions' scores become one advantage per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RewardAggregation {
    /// The weighted sum `R_i = Σ_f w_f r_if` of the functions' scores, then the estimator on
    /// `R` (TRL's `multi_objective_aggregation = "sum_then_normalize"`, its default). Default.
    #[default]
    SumThenNormalize,
    /// GDPO (Group reward-Decoupled normalization, arXiv 2601.05242; TRL's
    /// `normalize_then_sum`): each function's scores through the estimator on their own,
    /// `A_f`; their weighted sum `S_i = Σ_f w_f A_f,i`; then the batch z-score
    /// `(S_i − μ_S) / (σ_S + eps)` over the rows with a usable reward. TRL normalises each
    /// function per prompt (its `scale_rewards` is ignored): that is the estimator `grpo`
    /// here. With a group-aware estimator each function has its own history per preference
    /// group (keys [`part_key`]), kept besides the groups' history of `R` (which the metrics
    /// report); the diagnostics then say whether every function's history was used, and give
    /// no single history mean or std (`NaN`).
    NormalizeThenSum,
}

named_enum!(RewardAggregation, "reward_aggregation", [
    SumThenNormalize => "sum_then_normalize",
    NormalizeThenSum => "normalize_then_sum",
]);

/// The separate scores of `F` reward functions on one batch of `N` rows, with each
/// function's name and weight (see [`RewardFn::parts`](crate::RewardFn::parts)).
#[derive(Debug, Clone, Copy)]
pub struct RewardParts<'a> {
    /// `(N, F)` row-major: row `i`'s score from function `f` is `scores[i * F + f]`.
    pub scores: &'a [f32],
    /// `(F,)` the functions' names: distinct and not empty (they key the metrics
    /// `rewards/<name>/mean` and, under `NormalizeThenSum`, the histories).
    pub names: &'a [String],
    /// `(F,)` the functions' weights `w_f` (TRL's `reward_weights`), finite.
    pub weights: &'a [f32],
}

impl RewardParts<'_> {
    /// `F`, the number of functions.
    pub fn num_parts(&self) -> usize {
        self.names.len()
    }

    /// `N`, the number of rows (0 without functions).
    pub fn num_rows(&self) -> usize {
        self.scores.len().checked_div(self.num_parts()).unwrap_or(0)
    }

    /// `(N,)` the weighted sum of each row's scores, `R_i = Σ_f w_f r_if`, accumulated in
    /// `f32` from 0 in function order (the bits of
    /// [`WeightedRewards::score`](crate::reward::WeightedRewards)).
    pub fn combined(&self) -> Vec<f32> {
        let f = self.num_parts().max(1);
        self.scores
            .chunks(f)
            .map(|row| {
                row.iter()
                    .zip(self.weights)
                    .fold(0f32, |t, (&v, &w)| t + w * v)
            })
            .collect()
    }

    /// `(N,)` function `f`'s scores.
    pub fn column(&self, f: usize) -> Vec<f32> {
        let k = self.num_parts();
        self.scores
            .iter()
            .skip(f)
            .step_by(k.max(1))
            .copied()
            .collect()
    }

    /// Checks the shapes, names and weights against `n` rows.
    ///
    /// # Errors
    /// [`Error::Empty`] without functions, [`Error::LengthMismatch`] for weights or scores of
    /// the wrong length, [`Error::InvalidConfig`] for an empty or repeated name or a
    /// non-finite weight.
    pub fn check(&self, n: usize) -> Result<()> {
        let f = self.num_parts();
        if f == 0 {
            return Err(Error::Empty("reward parts"));
        }
        if self.weights.len() != f {
            return Err(Error::LengthMismatch {
                what: "reward weights",
                got: self.weights.len(),
                against: "reward names",
                expected: f,
            });
        }
        if self.scores.len() != n * f {
            return Err(Error::LengthMismatch {
                what: "reward scores",
                got: self.scores.len(),
                against: "rows × reward functions",
                expected: n * f,
            });
        }
        for (i, name) in self.names.iter().enumerate() {
            if name.is_empty() || self.names[..i].contains(name) {
                return Err(Error::InvalidConfig {
                    field: "reward names",
                    reason: format!("names must be distinct and not empty, got {:?}", self.names),
                });
            }
        }
        if let Some(w) = self.weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::InvalidConfig {
                field: "reward weights",
                reason: format!("must be finite, got {w}"),
            });
        }
        Ok(())
    }
}

/// The history key of reward function `function` within preference group `group` (under
/// [`RewardAggregation::NormalizeThenSum`]): the name `"<group>/<function>"`. Keep `/` out
/// of your own group names to keep the two apart.
///
/// ```
/// use pgrpo::advantage::part_key;
/// assert_eq!(part_key(&"formal".into(), "length").to_string(), "formal/length");
/// assert_eq!(part_key(&7u32.into(), "judge").to_string(), "7/judge");
/// ```
pub fn part_key(group: &GroupKey, function: &str) -> GroupKey {
    GroupKey::Name(format!("{group}/{function}"))
}

impl AdvantageConfig {
    /// The keys that [`compute_parts`](Self::compute_parts)'s
    /// [`deltas`](Advantages::deltas) are index-aligned with, to fold them in with
    /// [`RewardHistory::apply`]: the batch's `group_keys`, then under
    /// [`RewardAggregation::NormalizeThenSum`] one [`part_key`] per (function, group),
    /// function-major.
    pub fn history_keys(&self, group_keys: &[GroupKey], names: &[String]) -> Vec<GroupKey> {
        let mut keys = group_keys.to_vec();
        if self.reward_aggregation == RewardAggregation::NormalizeThenSum {
            for name in names {
                keys.extend(group_keys.iter().map(|g| part_key(g, name)));
            }
        }
        keys
    }

    /// Advantages of a batch scored by several reward functions, aggregated as
    /// [`reward_aggregation`](Self::reward_aggregation) says. `batch.rewards` must be the
    /// combined rewards, [`parts.combined()`](RewardParts::combined) (what the diagnostics
    /// report and the groups' histories keep); fold the returned deltas in with the keys of
    /// [`history_keys`](Self::history_keys).
    ///
    /// One function with weight 1 under either aggregation's first step is
    /// [`compute`](Self::compute); `SumThenNormalize` is `compute` on the combined rewards.
    ///
    /// ```
    /// use pgrpo::advantage::{RewardAggregation, RewardParts};
    /// use pgrpo::{AdvantageConfig, Estimator, GroupKey, RewardHistory, RolloutRewards};
    ///
    /// // Two prompts of two completions; functions "a" (weight 1) and "b" (weight 2).
    /// let scores = [1.0, 0.0, 0.0, 5.0, 1.0, 1.0, 0.0, 1.0];
    /// let parts = RewardParts { scores: &scores, names: &["a".into(), "b".into()], weights: &[1.0, 2.0] };
    /// let combined = parts.combined(); // [1, 10, 3, 2]
    /// let keys: Vec<GroupKey> = vec!["g".into()];
    /// let batch = RolloutRewards { rewards: &combined, prompt_ids: &[0, 0, 1, 1], group_ids: &[0; 4], group_keys: &keys };
    /// let cfg = AdvantageConfig {
    ///     estimator: Estimator::Grpo,
    ///     reward_aggregation: RewardAggregation::NormalizeThenSum,
    ///     ..Default::default()
    /// };
    /// let adv = cfg.compute_parts(&batch, &parts, &RewardHistory::default())?;
    /// // Per prompt and function z-scores (±0.707 with two completions), weighted sum
    /// // S = [0.707 − 1.414, −0.707 + 1.414, 0.707, −0.707] = [−0.707, 0.707, 0.707, −0.707],
    /// // then the batch z-score (mean 0, sample std 0.816): ±0.866.
    /// let r: Vec<f32> = adv.values.iter().map(|a| (a * 1000.0).round() / 1000.0).collect();
    /// assert_eq!(r, [-0.866, 0.866, 0.866, -0.866]);
    /// assert_eq!(cfg.history_keys(&keys, parts.names).len(), 3); // g, g/a, g/b
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`compute`](Self::compute); as [`RewardParts::check`]; [`Error::InvalidConfig`]
    /// (`rewards`) when `batch.rewards` is not `parts.combined()`.
    pub fn compute_parts(
        &self,
        batch: &RolloutRewards<'_>,
        parts: &RewardParts<'_>,
        history: &RewardHistory,
    ) -> Result<Advantages> {
        self.parts_with(None, batch, parts, history)
    }

    /// [`compute_parts`](Self::compute_parts) with a rule of your own in place of the
    /// config's estimator (see [`compute_with`](Self::compute_with)).
    ///
    /// # Errors
    /// As [`compute_parts`](Self::compute_parts) and [`compute_with`](Self::compute_with).
    pub fn compute_parts_with(
        &self,
        estimator: &dyn AdvantageEstimator,
        batch: &RolloutRewards<'_>,
        parts: &RewardParts<'_>,
        history: &RewardHistory,
    ) -> Result<Advantages> {
        self.parts_with(Some(estimator), batch, parts, history)
    }

    /// [`compute_parts`](Self::compute_parts), then fold the batch into `history` (with the
    /// keys of [`history_keys`](Self::history_keys)). On error the history is unchanged.
    ///
    /// # Errors
    /// As [`compute_parts`](Self::compute_parts).
    pub fn compute_parts_and_update(
        &self,
        batch: &RolloutRewards<'_>,
        parts: &RewardParts<'_>,
        history: &mut RewardHistory,
    ) -> Result<Advantages> {
        let mut adv = self.compute_parts(batch, parts, history)?;
        let keys = self.history_keys(batch.group_keys, parts.names);
        let deltas = std::mem::replace(&mut adv.deltas, super::BatchDeltas::empty(history.kind()));
        history.apply(&keys, deltas)?;
        Ok(adv)
    }

    /// The advantages of one reward stream: the config's estimator or `custom`.
    fn one(
        &self,
        custom: Option<&dyn AdvantageEstimator>,
        batch: &RolloutRewards<'_>,
        history: &RewardHistory,
    ) -> Result<Advantages> {
        match custom {
            None => self.compute(batch, history),
            Some(e) => self.compute_with(e, batch, history),
        }
    }

    fn parts_with(
        &self,
        custom: Option<&dyn AdvantageEstimator>,
        batch: &RolloutRewards<'_>,
        parts: &RewardParts<'_>,
        history: &RewardHistory,
    ) -> Result<Advantages> {
        self.check_batch(batch)?;
        parts.check(batch.rewards.len())?;
        let combined = parts.combined();
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        if let Some(i) = (0..combined.len()).find(|&i| !same(batch.rewards[i], combined[i])) {
            return Err(Error::InvalidConfig {
                field: "rewards",
                reason: format!(
                    "row {i}: {} is not the weighted sum of the reward parts ({}); pass \
                     RewardParts::combined()",
                    batch.rewards[i], combined[i]
                ),
            });
        }
        match self.reward_aggregation {
            RewardAggregation::SumThenNormalize => self.one(custom, batch, history),
            RewardAggregation::NormalizeThenSum => {
                self.normalize_then_sum(custom, batch, parts, history)
            }
        }
    }

    /// GDPO: see [`RewardAggregation::NormalizeThenSum`].
    fn normalize_then_sum(
        &self,
        custom: Option<&dyn AdvantageEstimator>,
        batch: &RolloutRewards<'_>,
        parts: &RewardParts<'_>,
        history: &RewardHistory,
    ) -> Result<Advantages> {
        let n = batch.rewards.len();
        let k = batch.group_keys.len();
        let mut sum = vec![0f64; n];
        let mut part_deltas = Vec::with_capacity(k * parts.num_parts());
        let mut used = vec![true; k];
        let mut degenerate = 0usize;
        for (f, (name, &w)) in parts.names.iter().zip(parts.weights).enumerate() {
            let scores = parts.column(f);
            let keys: Vec<GroupKey> = batch.group_keys.iter().map(|g| part_key(g, name)).collect();
            let part = RolloutRewards {
                rewards: &scores,
                group_keys: &keys,
                ..*batch
            };
            let adv = self.one(custom, &part, history)?;
            for (s, &a) in sum.iter_mut().zip(&adv.values) {
                *s += w as f64 * a as f64;
            }
            for (u, g) in used.iter_mut().zip(&adv.diagnostics.groups) {
                *u &= g.used_history;
            }
            degenerate = degenerate.max(adv.diagnostics.num_degenerate_prompts);
            part_deltas.extend(adv.deltas.deltas);
        }
        // The batch z-score of the sums, over the rows with a usable combined reward.
        let usable: Vec<f64> = sum
            .iter()
            .zip(batch.rewards)
            .filter(|(_, r)| r.is_finite())
            .map(|(s, _)| *s)
            .collect();
        let m = RunningMoments::from_slice(&usable);
        let den = self.denominator(m.variance(self.variance).map(f64::sqrt));
        let mut values = vec![0f32; n];
        let mut sums = vec![0f64; k];
        for (i, v) in values.iter_mut().enumerate() {
            if batch.rewards[i].is_finite() {
                *v = finite_f32(ratio(sum[i] - m.mean, || den));
                sums[batch.group_ids[i] as usize] += *v as f64;
            }
        }
        let kind = history.kind();
        let stats = BatchStats::compute(batch, kind, self.non_finite, rows_per_task(k))?;
        let mut adv = self.finish(stats, values, &sums, &vec![None; k], degenerate, kind);
        for (g, u) in adv.diagnostics.groups.iter_mut().zip(used) {
            g.used_history = u && g.count > 0;
        }
        adv.deltas.deltas.extend(part_deltas);
        Ok(adv)
    }
}
