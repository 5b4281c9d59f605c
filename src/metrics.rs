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
//! | `group/<g>/reward_mean`, `group/<g>/advantage_mean`, `group/<g>/count` | per preference group in this batch |
//! | `history/<g>/mean`, `history/<g>/std`, `history/<g>/n` | the group's history after this step |
//!
//! Objective metrics are averaged over the step's `num_iterations` updates.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
