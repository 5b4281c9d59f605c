//! [`TrainerConfig`]: every knob of a training run, serializable, with documented defaults.

use serde::{Deserialize, Serialize};

use crate::error::bail_config;
use crate::optim::LrScheduler;
use crate::{AdvantageConfig, Estimator, HistoryKind, ObjectiveConfig, Result};

/// Configuration of a [`Trainer`](crate::Trainer).
///
/// Defaults follow TRL's `GRPOConfig` where it has the field (noted per field), and the P-GRPO
/// paper (arXiv:2603.10009) for the history. Serializes to JSON/TOML so a run is reproducible
/// from its log:
///
/// ```
/// use pgrpo::{Estimator, TrainerConfig};
/// let cfg = TrainerConfig { num_generations: 4, learning_rate: 1e-2, ..Default::default() };
/// cfg.validate()?;
/// let json = serde_json::to_string(&cfg)?;
/// let back: TrainerConfig = serde_json::from_str(&json)?;
/// assert_eq!(back, cfg);
/// // Fields left out take their defaults.
/// let partial: TrainerConfig = serde_json::from_str(r#"{"advantage": {"estimator": "grpo"}}"#)?;
/// assert_eq!(partial.advantage.estimator, Estimator::Grpo);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Completions sampled per prompt, `G`. Default 8 (TRL `num_generations`; DeepSeekMath
    /// uses 64).
    pub num_generations: usize,
    /// Optimizer updates per rollout batch, `μ` (TRL `num_iterations`, DeepSeekMath's μ).
    /// With `μ > 1` the old log-probs come from the sampling policy and the ratio departs from
    /// 1, so clipping matters. Default 1.
    pub num_iterations: usize,
    /// Peak learning rate. Default `1e-6` (TRL).
    pub learning_rate: f64,
    /// AdamW `β₁`. Default 0.9.
    pub adam_beta1: f64,
    /// AdamW `β₂`. Default 0.999.
    pub adam_beta2: f64,
    /// AdamW `ε`. Default `1e-8`.
    pub adam_eps: f64,
    /// AdamW decoupled weight decay (Loshchilov & Hutter). Default 0 (TRL).
    pub weight_decay: f64,
    /// Global-norm gradient clipping; `None` disables it. Default `Some(1.0)` (TRL).
    pub max_grad_norm: Option<f64>,
    /// Linear warm-up steps. Default 0.
    pub warmup_steps: u64,
    /// Schedule after warm-up. Default constant.
    pub lr_scheduler: LrScheduler,
    /// Step budget for decaying schedules; required by `linear` and `cosine`. Default `None`.
    pub max_steps: Option<u64>,
    /// Seed of the run: step `s` samples with [`step_rng(seed, s)`](crate::rng::step_rng) (rank
    /// `r` of a data-parallel run with [`rank_step_rng(seed, s, r)`](crate::rng::rank_step_rng)).
    /// Default 42 (TRL).
    pub seed: u64,
    /// Zero-spread prompts (all completions scored the same) are masked out of the loss and
    /// its denominator. Per-prompt estimators give them advantage 0 anyway, so this only
    /// changes the normalisation; with P-GRPO it also discards the signal such prompts carry.
    /// Default false.
    pub mask_zero_std_prompts: bool,
    /// How rewards become advantages (estimator, eps, P-GRPO options). Default P-GRPO.
    pub advantage: AdvantageConfig,
    /// The per-group reward history kept across steps. Default cumulative (the paper).
    pub history: HistoryKind,
    /// The clipped surrogate objective.
    pub objective: ObjectiveConfig,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            num_generations: 8,
            num_iterations: 1,
            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
            lr_scheduler: LrScheduler::Constant,
            max_steps: None,
            seed: 42,
            mask_zero_std_prompts: false,
            advantage: AdvantageConfig::default(),
            history: HistoryKind::Cumulative,
            objective: ObjectiveConfig::default(),
        }
    }
}

impl TrainerConfig {
    /// Checks every field, naming the first invalid one.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    pub fn validate(&self) -> Result<()> {
        if self.num_generations == 0 {
            bail_config!("num_generations", "must be at least 1");
        }
        if self.advantage.needs_prompt_spread() && self.num_generations < 2 {
            bail_config!(
                "num_generations",
                "the {} estimator needs at least 2 completions per prompt, got 1 (P-GRPO with \
                 cold_start = batch or history_with_batch works with 1)",
                self.advantage.estimator.name()
            );
        }
        if self.num_iterations == 0 {
            bail_config!("num_iterations", "must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            bail_config!(
                "learning_rate",
                "must be finite and > 0, got {}",
                self.learning_rate
            );
        }
        for (field, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                bail_config!(field, "must be in [0, 1), got {b}");
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            bail_config!("adam_eps", "must be finite and > 0, got {}", self.adam_eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail_config!(
                "weight_decay",
                "must be finite and >= 0, got {}",
                self.weight_decay
            );
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                bail_config!("max_grad_norm", "must be finite and > 0, got {m}");
            }
        }
        if self.lr_scheduler != LrScheduler::Constant && self.max_steps.is_none() {
            bail_config!(
                "max_steps",
                "the {:?} schedule needs max_steps",
                self.lr_scheduler
            );
        }
        if self.max_steps == Some(0) {
            bail_config!("max_steps", "must be at least 1");
        }
        if let HistoryKind::Window { size } = self.history {
            if self.advantage.estimator == Estimator::PGrpo
                && (size as u64) < self.advantage.pgrpo.min_count
            {
                bail_config!(
                    "pgrpo.min_count",
                    "a window of {size} rewards never reaches min_count = {}: P-GRPO would never use \
                     the history",
                    self.advantage.pgrpo.min_count
                );
            }
        }
        self.advantage.validate()?;
        self.history.validate()?;
        self.objective.validate()?;
        Ok(())
    }
}
