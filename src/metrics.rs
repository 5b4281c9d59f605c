//! [`StepMetrics`]: what one training step measured, under the names TRL users know plus the
//! per-group ones only P-GRPO has.
//!
//! | name | meaning |
//! |---|---|
//! | `reward`, `reward_std` | mean and std of the batch's rewards |
//! | `frac_reward_zero_std` | fraction of prompts whose completions all scored the same |
//! | `policy_loss`, `loss` | clipped-surrogate part, and the total minimised (with KL) |
//! | `kl` | mean per-token KL to the reference (estimator of the config) |
//! | `approx_kl` | mean per-token k3 between sampling and current policy |
//! | `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` | clipped token fractions |
//! | `entropy` | mean per-token policy entropy (when the policy reports it) |
//! | `completions/mean_length` | mean completion length in tokens |
//! | `grad_norm` | global gradient norm before clipping (last iteration) |
//! | `learning_rate` | the rate used this step |
//! | `advantage/mean`, `advantage/std` | over the batch's rows |
//! | `num_missing_rewards` | rows with a non-finite reward treated as missing |
//! | `skipped_update` | 1 when the step had nothing to learn from and skipped the optimizer, else 0 |
//! | `group/<g>/reward_mean`, `group/<g>/advantage_mean`, `group/<g>/count` | per preference group in this batch |
//! | `history/<g>/mean`, `history/<g>/std`, `history/<g>/n` | the group's history after this step |
//!
//! Objective metrics are averaged over the step's `num_iterations` updates.
//!
//! [`GLOBAL_NAMES`] and [`group_names`] list these names, e.g. to declare the columns of a
//! [`CsvSink`](crate::sink::CsvSink) before the first step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::objective::ObjectiveMetrics;
use crate::GroupKey;

/// The batch-level metric names a [`Trainer`](crate::Trainer) step can report, in table order.
/// A step leaves out the ones that do not apply (e.g. `entropy` when the policy reports none,
/// the objective metrics when the update was skipped). The objective's diagnostics come from
/// [`ObjectiveMetrics::NAMES`], `loss` between its first and second.
pub const GLOBAL_NAMES: [&str; 18] = {
    let o = ObjectiveMetrics::NAMES;
    [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        o[0],
        "loss",
        o[1],
        o[2],
        o[3],
        o[4],
        o[5],
        "entropy",
        "completions/mean_length",
        "grad_norm",
        "learning_rate",
        "advantage/mean",
        "advantage/std",
        "num_missing_rewards",
        "skipped_update",
    ]
};

/// The six per-group metric names of preference group `group`: `group/<g>/reward_mean`,
/// `group/<g>/advantage_mean`, `group/<g>/count`, `history/<g>/mean`, `history/<g>/std`,
/// `history/<g>/n`.
///
/// ```
/// let names = pgrpo::metrics::group_names(&"formal".into());
/// assert_eq!(names[0], "group/formal/reward_mean");
/// assert_eq!(names[5], "history/formal/n");
/// ```
pub fn group_names(group: &GroupKey) -> [String; 6] {
    [
        format!("group/{group}/reward_mean"),
        format!("group/{group}/advantage_mean"),
        format!("group/{group}/count"),
        format!("history/{group}/mean"),
        format!("history/{group}/std"),
        format!("history/{group}/n"),
    ]
}

/// The metrics of one step: a step number and named values.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step these metrics describe (0-based).
    pub step: u64,
    /// Named values (see the [module docs](self)); ordered by name.
    pub values: BTreeMap<String, f64>,
    /// Wall-clock seconds per phase (`sample`, `reward`, `update`, `total`). Kept apart from
    /// `values` because they differ between otherwise identical runs.
    pub timings: BTreeMap<String, f64>,
}

impl StepMetrics {
    /// A value by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// Sets a value.
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        self.values.insert(name.into(), value);
    }

    /// Mean reward of the batch.
    pub fn reward(&self) -> f64 {
        self.get("reward").unwrap_or(f64::NAN)
    }

    /// Mean reward of one preference group in this batch (`None` if it had no row).
    pub fn group_reward(&self, group: &str) -> Option<f64> {
        self.get(&format!("group/{group}/reward_mean"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_names_are_distinct_and_hold_the_objective_names() {
        for (i, a) in GLOBAL_NAMES.iter().enumerate() {
            assert!(!GLOBAL_NAMES[i + 1..].contains(a), "{a} twice");
        }
        for name in ObjectiveMetrics::NAMES.iter().chain(&["loss"]) {
            assert!(GLOBAL_NAMES.contains(name), "{name}");
        }
    }
}
