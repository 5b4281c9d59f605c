//! One rollout batch as the prototype estimators see it: rows grouped into prompts, each prompt
//! with its preference-group label, its reward mean and spread, and (for diagnosis only) the
//! true group and the oracle reward statistics of the policy that sampled it.

use std::ops::Range;

use pgrpo::GroupKey;

/// One prompt's rows and reward statistics, computed as the crate computes them (two passes
/// in `f64`, sample variance), so that the lab's GRPO and P-GRPO match the crate bit for bit.
#[derive(Debug, Clone)]
pub struct PromptView {
    /// Its rows (`G` contiguous rows).
    pub rows: Range<usize>,
    /// Index of its preference-group label in [`BatchView::keys`].
    pub label: usize,
    /// The true group (the bandit's context); differs from the label under shuffling.
    pub true_group: usize,
    /// `μ_q`.
    pub mean: f64,
    /// `σ_q²` (sample variance), `None` with one row.
    pub var: Option<f64>,
    /// All rewards equal (GRPO gives exactly 0 to every row).
    pub zero_spread: bool,
}

impl PromptView {
    /// `σ_q`, or 0 without a defined variance.
    pub fn std(&self) -> f64 {
        self.var.map_or(0.0, f64::sqrt)
    }
}

/// The batch: rows, prompts and labels.
pub struct BatchView<'a> {
    /// `(N,)` rewards.
    pub rewards: &'a [f32],
    /// `(N,)` sampled actions (diagnosis only).
    pub actions: &'a [u32],
    /// The preference-group labels of the batch (the rollout's `group_keys`).
    pub keys: &'a [GroupKey],
    /// The batch's prompts, in row order.
    pub prompts: Vec<PromptView>,
    /// Per true group: `(μ*, σ*)`, the expected reward and its std under the policy that
    /// sampled the batch. Used by the diagnosis's oracle arms only.
    pub oracle: &'a [(f64, f64)],
}

impl<'a> BatchView<'a> {
    /// Builds the view of a prompt-major batch of `g` rows per prompt.
    pub fn new(
        rewards: &'a [f32],
        actions: &'a [u32],
        group_ids: &[u32],
        keys: &'a [GroupKey],
        true_groups: &[usize],
        g: usize,
        oracle: &'a [(f64, f64)],
    ) -> Self {
        let prompts = (0..rewards.len() / g)
            .map(|p| {
                let rows = p * g..(p + 1) * g;
                let r = &rewards[rows.clone()];
                let sum: f64 = r.iter().fold(0.0, |a, &x| a + x as f64);
                let mean = sum / g as f64;
                let m2: f64 = r
                    .iter()
                    .map(|&x| {
                        let d = x as f64 - mean;
                        d * d
                    })
                    .fold(0.0, |a, b| a + b);
                let (lo, hi) = r
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                        (lo.min(x), hi.max(x))
                    });
                PromptView {
                    label: group_ids[rows.start] as usize,
                    true_group: true_groups[p],
                    rows,
                    mean,
                    var: (g > 1).then(|| m2 / (g as f64 - 1.0)),
                    zero_spread: lo >= hi,
                }
            })
            .collect();
        Self {
            rewards,
            actions,
            keys,
            prompts,
            oracle,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rewards.len()
    }
}

/// An advantage as `f32`, always finite (the crate's rule: NaN → 0, saturate at `±f32::MAX`).
pub fn finite_f32(a: f64) -> f32 {
    if a.is_nan() {
        0.0
    } else {
        a.clamp(-(f32::MAX as f64), f32::MAX as f64) as f32
    }
}
