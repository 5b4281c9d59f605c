//! TEMPORARY stand-in (replaced by the objective branch).
#![allow(missing_docs)]
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    #[default]
    Grpo,
    Bnpo,
    DrGrpo,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    #[default]
    Token,
    Sequence,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    K1,
    K2,
    #[default]
    K3,
}
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectiveConfig {
    pub eps_low: f32,
    pub eps_high: f32,
    pub dual_clip: Option<f32>,
    pub ratio_level: RatioLevel,
    pub aggregation: LossAggregation,
    pub beta: f32,
    pub kl_estimator: KlEstimator,
    pub max_completion_len: Option<usize>,
}
impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            ratio_level: RatioLevel::Token,
            aggregation: LossAggregation::Grpo,
            beta: 0.0,
            kl_estimator: KlEstimator::K3,
            max_completion_len: None,
        }
    }
}
impl ObjectiveConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
pub struct ObjectiveInputs<'a> {
    pub logp: &'a Tensor,
    pub old_logp: &'a Tensor,
    pub ref_logp: Option<&'a Tensor>,
    pub mask: &'a Tensor,
    pub advantages: &'a Tensor,
}
#[derive(Debug, Clone, Default)]
pub struct ObjectiveMetrics {
    pub policy_loss: f64,
    pub kl: f64,
    pub approx_kl: f64,
    pub clip_ratio_low: f64,
    pub clip_ratio_high: f64,
    pub clip_ratio_region: f64,
    pub num_tokens: f64,
}
pub struct ObjectiveOutput {
    pub loss: Tensor,
    pub metrics: ObjectiveMetrics,
}
pub fn clipped_objective(
    cfg: &ObjectiveConfig,
    i: &ObjectiveInputs<'_>,
) -> Result<ObjectiveOutput> {
    let ratio = (i.logp - i.old_logp)?.exp()?;
    let adv = i.advantages.unsqueeze(1)?;
    let s1 = ratio.broadcast_mul(&adv)?;
    let s2 = ratio
        .clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)?
        .broadcast_mul(&adv)?;
    let per_tok = s1.minimum(&s2)?.neg()?;
    let row = ((per_tok * i.mask)?.sum(1)? / i.mask.sum(1)?.clamp(1.0, f64::MAX)?)?;
    let loss = row.mean_all()?;
    let pl = loss.to_scalar::<f32>()? as f64;
    Ok(ObjectiveOutput {
        loss,
        metrics: ObjectiveMetrics {
            policy_loss: pl,
            ..Default::default()
        },
    })
}
