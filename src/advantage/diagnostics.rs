//! What an advantage computation reports about its batch: per preference group
//! ([`GroupDiagnostics`]) and for the whole batch ([`AdvantageDiagnostics`]). The general and
//! the fused path both build them with the constructors here.

use super::estimators::Scale;
use crate::history::{RunningMoments, Variance};

/// Statistics of one preference group in one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupDiagnostics {
    /// Rows of this group with a usable (finite) reward.
    pub count: usize,
    /// Their mean reward (`NaN` when `count == 0`).
    pub reward_mean: f64,
    /// Their mean advantage (`NaN` when `count == 0`).
    pub advantage_mean: f64,
    /// Estimators that read the groups' histories (P-GRPO and those built on it) only:
    /// whether the group's history was used (`false`: the cold-start fallback, which a short,
    /// undefined-std or degenerate history takes).
    pub used_history: bool,
    /// The history mean and std used (`NaN` when the fallback was used or the estimator
    /// reads no history).
    pub history_mean: f64,
    /// See `history_mean`.
    pub history_std: f64,
}

impl GroupDiagnostics {
    /// A group's diagnostics from `count` usable rows, their mean reward and mean advantage
    /// (both replaced by `NaN` when `count == 0`), and the history normaliser that scaled it
    /// (`None`: not used), whose std is reported as its denominator less `eps`
    /// (`max(σ_p, std_floor)`).
    pub(crate) fn new(
        count: usize,
        reward_mean: f64,
        advantage_mean: f64,
        history: Option<Scale>,
        eps: f32,
    ) -> Self {
        let (reward_mean, advantage_mean) = if count > 0 {
            (reward_mean, advantage_mean)
        } else {
            (f64::NAN, f64::NAN)
        };
        let (history_mean, history_std) =
            history.map_or((f64::NAN, f64::NAN), |s| (s.mean, s.den - eps as f64));
        Self {
            count,
            reward_mean,
            advantage_mean,
            used_history: history.is_some(),
            history_mean,
            history_std,
        }
    }
}

/// Batch-level diagnostics of an advantage computation.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvantageDiagnostics {
    /// Per preference group, index-aligned with `group_keys`.
    pub groups: Vec<GroupDiagnostics>,
    /// Number of distinct prompts.
    pub num_prompts: usize,
    /// Fraction of prompts whose usable rewards are all equal (TRL's `frac_reward_zero_std`).
    pub frac_reward_zero_std: f64,
    /// Rows whose reward was non-finite and treated as missing.
    pub num_missing: usize,
    /// Prompts left without contrast by missing rewards (fewer than 2 usable rows under an
    /// estimator that needs a per-prompt spread); their rows got advantage 0.
    pub num_degenerate_prompts: usize,
    /// Mean of the usable rewards.
    pub reward_mean: f64,
    /// Sample std of the usable rewards.
    pub reward_std: f64,
}

impl AdvantageDiagnostics {
    /// The batch's diagnostics from its groups', its number of prompts and of those without
    /// spread, the missing rows and degenerate prompts, and the moments of its usable rewards
    /// (mean `NaN` without one, sample std `NaN` below two).
    pub(crate) fn new(
        groups: Vec<GroupDiagnostics>,
        num_prompts: usize,
        zero_spread_prompts: usize,
        num_missing: usize,
        num_degenerate_prompts: usize,
        batch: &RunningMoments,
    ) -> Self {
        Self {
            groups,
            num_prompts,
            frac_reward_zero_std: zero_spread_prompts as f64 / num_prompts as f64,
            num_missing,
            num_degenerate_prompts,
            reward_mean: if batch.count > 0 {
                batch.mean
            } else {
                f64::NAN
            },
            reward_std: batch.variance(Variance::Sample).map_or(f64::NAN, f64::sqrt),
        }
    }
}
