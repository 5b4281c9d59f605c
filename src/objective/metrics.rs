//! The diagnostics of one objective call, as plain numbers.

use serde::{Deserialize, Serialize};

/// Diagnostics of one call, as plain numbers. All "fractions" and means are over completion
/// tokens (`Σ m · x / N`, over the rows that take part), like TRL's `masked_batch_mean`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ObjectiveMetrics {
    /// The aggregated surrogate part of the loss, `aggregate(−keep · surr)`, without the KL
    /// term and the entropy bonus (equals the loss when `beta = 0` and `entropy_coef = 0`).
    pub policy_loss: f64,
    /// Masked token mean of the chosen KL estimator between policy and reference; 0 when no
    /// `ref_logp` was given.
    pub kl: f64,
    /// Masked token mean of k3 between the sampling and the current policy,
    /// `(r − 1) − log r` with the token ratio `r = exp(logp − old_logp)`.
    pub approx_kl: f64,
    /// Fraction of tokens with `ratio < 1 − eps_low` and `A < 0` (TRL `clip_ratio/low_mean`);
    /// 0 for CISPO and SAPO, which have no lower clip.
    pub clip_ratio_low: f64,
    /// Fraction of tokens with `ratio > 1 + eps_high` and `A > 0` (TRL `clip_ratio/high_mean`;
    /// for CISPO TRL's `cispo_clip_ratio`); 0 for SAPO, which clips nothing.
    pub clip_ratio_high: f64,
    /// Fraction of tokens clipped either way (TRL `clip_ratio/region_mean`).
    pub clip_ratio_region: f64,
    /// `N`, the number of completion tokens (the mask's sum over the rows that take part).
    pub num_tokens: f64,
}

impl ObjectiveMetrics {
    /// The [step-metric](crate::metrics) names of the diagnostics, in the order of
    /// [`values`](Self::values): the one list of these names (the trainer's metrics, the
    /// data-parallel messages and [`metrics::GLOBAL_NAMES`](crate::metrics::GLOBAL_NAMES) use
    /// it). `num_tokens` is not among them: it is a normaliser, not a reported metric.
    ///
    /// ```
    /// use pgrpo::objective::ObjectiveMetrics;
    /// let m = ObjectiveMetrics { kl: 0.5, num_tokens: 3.0, ..Default::default() };
    /// let i = ObjectiveMetrics::NAMES.iter().position(|n| *n == "kl").unwrap();
    /// assert_eq!(m.values()[i], 0.5);
    /// assert_eq!(ObjectiveMetrics::from_values(m.values(), m.num_tokens), m);
    /// ```
    pub const NAMES: [&'static str; 6] = [
        "policy_loss",
        "kl",
        "approx_kl",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
    ];

    /// The diagnostics named by [`NAMES`](Self::NAMES), in that order.
    pub fn values(&self) -> [f64; 6] {
        [
            self.policy_loss,
            self.kl,
            self.approx_kl,
            self.clip_ratio_low,
            self.clip_ratio_high,
            self.clip_ratio_region,
        ]
    }

    /// The metrics with [`values`](Self::values) `values` over `num_tokens` tokens.
    pub fn from_values(values: [f64; 6], num_tokens: f64) -> Self {
        let [policy_loss, kl, approx_kl, clip_ratio_low, clip_ratio_high, clip_ratio_region] =
            values;
        Self {
            policy_loss,
            kl,
            approx_kl,
            clip_ratio_low,
            clip_ratio_high,
            clip_ratio_region,
            num_tokens,
        }
    }

    /// Adds the metrics of `part`, one of the disjoint sub-batches of a batch, to `self` (the
    /// batch's, being summed): `policy_loss`, aggregated like the loss, weighted by
    /// `loss_weight` (the part's loss denominator over the batch's), the token means by
    /// `token_weight` (the part's `max(N, 1)` over the batch's). `num_tokens` is left alone.
    pub(crate) fn add_part(&mut self, part: &Self, loss_weight: f64, token_weight: f64) {
        self.policy_loss += loss_weight * part.policy_loss;
        self.kl += token_weight * part.kl;
        self.approx_kl += token_weight * part.approx_kl;
        self.clip_ratio_low += token_weight * part.clip_ratio_low;
        self.clip_ratio_high += token_weight * part.clip_ratio_high;
        self.clip_ratio_region += token_weight * part.clip_ratio_region;
    }
}
