//! Advantage rules of your own: the [`AdvantageEstimator`] trait, and
//! [`AdvantageConfig::compute_with`], which runs one on a checked batch and adds what the
//! crate needs around it (the history's batch statistics, the diagnostics).

use super::stats::{rows_per_task, BatchStats};
use super::{AdvantageConfig, Advantages, RolloutRewards};
use crate::error::{Error, Result};
use crate::RewardHistory;

/// A rule that turns one batch's rewards into advantages: bring your own without forking the
/// crate (TRL users ask for the same hook: huggingface/trl issue #7291, PR #7298).
///
/// [`advantages`](Self::advantages) gets the batch (rewards, each row's prompt and
/// preference group) and the [`RewardHistory`] as it stood before the batch, and returns one
/// advantage per row. It is called through [`AdvantageConfig::compute_with`] (or, in
/// training, [`Trainer::with_estimator`](crate::Trainer::with_estimator)), which first checks
/// the batch exactly as [`AdvantageConfig::compute`] does (lengths, group ids in range,
/// non-finite rewards under the config's [`NonFinitePolicy`](super::NonFinitePolicy)),
/// and afterwards gives a missing reward's row advantage 0, refuses a wrong number of
/// advantages or a non-finite one ([`Error::Estimator`]), and computes the diagnostics and
/// the batch statistics that fold into the history. The trainer keeps the history
/// (the config's `history` kind) and saves it in checkpoints, whatever the estimator.
///
/// **State.** An estimator is a function of the batch and the history (`&self`): the history
/// is the state, kept, merged across data-parallel ranks and checkpointed by the crate. An
/// estimator that keeps state of its own (behind interior mutability) is **not** saved in
/// checkpoints, so a resumed run would not continue it exactly; keep such state in the
/// history's statistics instead, or restore it yourself.
///
/// Every built-in estimator is usable through the trait: [`AdvantageConfig`] implements it.
///
/// A median baseline (not in the crate): each completion against the median reward of its
/// prompt's completions, `A_i = R_i − median_q`.
///
/// ```
/// use std::collections::HashMap;
/// use pgrpo::advantage::AdvantageEstimator;
/// use pgrpo::{AdvantageConfig, GroupKey, RewardHistory, RolloutRewards};
///
/// struct MedianBaseline;
///
/// impl AdvantageEstimator for MedianBaseline {
///     fn name(&self) -> &str {
///         "median_baseline"
///     }
///
///     fn advantages(&self, batch: &RolloutRewards<'_>, _: &RewardHistory) -> pgrpo::Result<Vec<f32>> {
///         let mut by_prompt: HashMap<u32, Vec<f32>> = HashMap::new();
///         for (&r, &q) in batch.rewards.iter().zip(batch.prompt_ids) {
///             by_prompt.entry(q).or_default().push(r);
///         }
///         let median: HashMap<u32, f32> = by_prompt
///             .into_iter()
///             .map(|(q, mut v)| {
///                 v.sort_by(f32::total_cmp);
///                 let m = v.len() / 2;
///                 (q, if v.len() % 2 == 1 { v[m] } else { 0.5 * (v[m - 1] + v[m]) })
///             })
///             .collect();
///         Ok(batch.rewards.iter().zip(batch.prompt_ids).map(|(r, q)| r - median[q]).collect())
///     }
/// }
///
/// let keys: Vec<GroupKey> = vec!["a".into()];
/// let batch = RolloutRewards {
///     rewards: &[1.0, 0.0, 0.0, 0.5, 3.0, 2.0],
///     prompt_ids: &[0, 0, 0, 1, 1, 1],
///     group_ids: &[0; 6],
///     group_keys: &keys,
/// };
/// let mut history = RewardHistory::default();
/// let adv = AdvantageConfig::default().compute_with(&MedianBaseline, &batch, &history)?;
/// // Prompt 0: median 0; prompt 1: median 2.
/// assert_eq!(adv.values, [1.0, 0.0, 0.0, -1.5, 1.0, 0.0]);
/// // The crate still counts the batch for the history.
/// history.apply(&keys, adv.deltas)?;
/// assert_eq!(history.stats(&"a".into()).unwrap().n, 6);
/// # Ok::<(), pgrpo::Error>(())
/// ```
pub trait AdvantageEstimator: Send {
    /// A short name for errors and logs.
    fn name(&self) -> &str;

    /// One advantage per row of `batch` (`(N,)`), given `history` as it stood before the
    /// batch. Rows whose reward is missing (non-finite, under
    /// [`NonFinitePolicy::Missing`](super::NonFinitePolicy::Missing)) may get any finite value:
    /// their advantage is set to 0 afterwards.
    ///
    /// # Errors
    /// Whatever the rule cannot handle (return a [`pgrpo::Error`](crate::Error); training
    /// stops before anything changes).
    fn advantages(&self, batch: &RolloutRewards<'_>, history: &RewardHistory) -> Result<Vec<f32>>;
}

/// The built-in estimators through the trait: [`AdvantageConfig::compute`]'s advantages.
impl AdvantageEstimator for AdvantageConfig {
    fn name(&self) -> &str {
        self.estimator.name()
    }

    fn advantages(&self, batch: &RolloutRewards<'_>, history: &RewardHistory) -> Result<Vec<f32>> {
        Ok(self.compute(batch, history)?.values)
    }
}

impl AdvantageConfig {
    /// [`compute`](Self::compute) with the advantages of `estimator` instead of this config's
    /// [`estimator`](Self::estimator). The config's checks and non-finite policy still apply,
    /// and the returned [`Advantages::deltas`] and diagnostics are those of the batch (the
    /// diagnostics report no history as used: only the estimator knows what it read).
    ///
    /// # Errors
    /// As [`compute`](Self::compute) for the batch; the estimator's own errors;
    /// [`Error::Estimator`] when it returns a number of advantages other than the batch's
    /// rows, or a non-finite advantage for a row with a usable reward.
    pub fn compute_with(
        &self,
        estimator: &dyn AdvantageEstimator,
        batch: &RolloutRewards<'_>,
        history: &RewardHistory,
    ) -> Result<Advantages> {
        self.check_batch(batch)?;
        let task_rows = rows_per_task(batch.group_keys.len());
        let kind = history.kind();
        let stats = BatchStats::compute(batch, kind, self.non_finite, task_rows)?;
        let mut values = estimator.advantages(batch, history)?;
        let bad = |reason: String| Error::Estimator {
            name: estimator.name().to_owned(),
            reason,
        };
        if values.len() != batch.rewards.len() {
            return Err(bad(format!(
                "returned {} advantages for {} rows",
                values.len(),
                batch.rewards.len()
            )));
        }
        let mut sums = vec![0f64; batch.group_keys.len()];
        for (i, (v, (&r, &g))) in values
            .iter_mut()
            .zip(batch.rewards.iter().zip(batch.group_ids))
            .enumerate()
        {
            if !r.is_finite() {
                *v = 0.0;
                continue;
            }
            if !v.is_finite() {
                return Err(bad(format!("returned {v} at row {i}")));
            }
            sums[g as usize] += *v as f64;
        }
        let none = vec![None; batch.group_keys.len()];
        Ok(self.finish(stats, values, &sums, &none, 0, kind))
    }
}
