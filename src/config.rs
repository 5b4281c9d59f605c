//! [`TrainerConfig`]: every knob of a training run, serializable, with documented defaults.

use serde::{Deserialize, Serialize};

use crate::error::bail_config;
use crate::metrics::GroupMetrics;
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
    /// Passes over each rollout batch, `μ` (TRL `num_iterations`, DeepSeekMath's μ): each
    /// pass makes [`optimizer_steps_per_generation`](Self::optimizer_steps_per_generation)
    /// optimizer updates. With `μ > 1` the old log-probs come from the sampling policy and the
    /// ratio departs from 1, so clipping matters. Default 1 (TRL, DeepSeekMath).
    pub num_iterations: usize,
    /// Micro-batches whose gradients are summed into one optimizer update (TRL
    /// `gradient_accumulation_steps`). A rank's rows of an update are cut into this many
    /// contiguous micro-batches of (nearly) equal size, each one forward and backward pass, so
    /// a step holds the activations of one micro-batch at a time instead of the whole batch's.
    /// The accumulated gradient is the one-pass gradient (to `f32` rounding) for every
    /// [`LossAggregation`](crate::LossAggregation): each micro-batch's loss counts with its
    /// share of the whole update's denominator, as each rank's does in a data-parallel run.
    /// TRL's micro-batch size `per_device_train_batch_size` has no field here: it is the
    /// rows a rank holds divided by the micro-batches, `B · G / (world · steps_per_generation)`.
    /// Default 1 (TRL): one pass.
    pub gradient_accumulation_steps: usize,
    /// Micro-batches per rollout batch, each rank's share of the batch cut into this many
    /// (TRL `steps_per_generation`, which counts micro-batches, not optimizer steps): every
    /// `gradient_accumulation_steps` of them make one optimizer update, so a rollout gives
    /// `steps_per_generation / gradient_accumulation_steps` updates per pass (it must be a
    /// multiple). `None` (default, TRL): equal to `gradient_accumulation_steps`, one update
    /// per pass. Several updates per rollout need the sampling policy's log-probs, computed in
    /// the rollout, as with `num_iterations > 1`. The slices are contiguous rows in batch
    /// order (TRL shuffles the generation batch first: shuffle the prompts you pass if their
    /// order means something).
    pub steps_per_generation: Option<usize>,
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
    /// Linear warm-up steps (trainer steps). Must be below `max_steps` when that is set.
    /// Default 0 (TRL).
    pub warmup_steps: u64,
    /// Schedule after warm-up. Default constant; TRL's default is `linear`, which needs the
    /// run's length (see [`LrScheduler::Constant`] for why ours is not).
    pub lr_scheduler: LrScheduler,
    /// The run's step budget (TRL `max_steps`): the decaying schedules reach 0 there, and the
    /// trainer refuses to step once `max_steps` steps are done
    /// ([`Error::InvalidConfig`](crate::Error::InvalidConfig) naming `max_steps`; to go on,
    /// raise it in the checkpoint's config and resume). Counted in trainer steps (one rollout
    /// and its updates); TRL counts optimizer steps, the same when each rollout makes one
    /// update. Required by `linear` and `cosine`. Default `None`: no budget.
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
    /// Completions cut by the generation budget ([`Policy::is_truncated`](crate::Policy::is_truncated):
    /// no end-of-sequence token) leave the loss and its denominators (`N` and `B`), as TRL's
    /// `mask_truncated_completions` (DAPO's overlong filtering). Their rewards still count in
    /// the advantages and the history. Default false (TRL's).
    pub mask_truncated_completions: bool,
    /// How rewards become advantages (estimator, eps, P-GRPO options). Default P-GRPO.
    pub advantage: AdvantageConfig,
    /// The per-group reward history kept across steps. Default cumulative (the paper).
    pub history: HistoryKind,
    /// The clipped surrogate objective.
    pub objective: ObjectiveConfig,
    /// Every `ref_model_sync_steps` steps, move the KL reference toward the policy:
    /// `π_ref ← α · π_θ + (1 − α) · π_ref`, weight by weight (TR-DPO, Gorbatovski et al.
    /// 2024; TRL `sync_ref_model`). Needs `objective.beta > 0` (without the KL term there is no
    /// reference, TRL refuses it too) and a reference with weights of its own: a LoRA policy's
    /// reference is the base model with the adapters off, sharing the frozen weights, and the
    /// trainer refuses to build with it ([`Error::InvalidConfig`](crate::Error::InvalidConfig)
    /// naming `sync_ref_model`; TRL refuses PEFT models likewise). Default false (TRL).
    pub sync_ref_model: bool,
    /// TR-DPO's `α`, the policy's weight in the mix, in `[0, 1]` (TRL
    /// `ref_model_mixup_alpha`). Default 0.6 (TRL).
    pub ref_model_mixup_alpha: f64,
    /// TR-DPO's `τ`: the reference is mixed after every step whose number (1-based) is a
    /// multiple of it (TRL `ref_model_sync_steps`; TRL counts optimizer steps, see
    /// `max_steps`). Must be at least 1. Default 512 (TRL).
    pub ref_model_sync_steps: u64,
    /// Which per-group metrics a step reports (no TRL counterpart: TRL has no preference
    /// groups). Default [`GroupMetrics::Bounded`] with `top_k = 16`: a handful of groups are
    /// all reported, ten thousand are not all reported every step.
    pub group_metrics: GroupMetrics,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            num_generations: 8,
            num_iterations: 1,
            gradient_accumulation_steps: 1,
            steps_per_generation: None,
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
            mask_truncated_completions: false,
            advantage: AdvantageConfig::default(),
            history: HistoryKind::Cumulative,
            objective: ObjectiveConfig::default(),
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            group_metrics: GroupMetrics::default(),
        }
    }
}

impl TrainerConfig {
    /// Micro-batches per rollout batch: `steps_per_generation`, or
    /// `gradient_accumulation_steps` when it is unset.
    pub fn micro_batches_per_generation(&self) -> usize {
        self.steps_per_generation
            .unwrap_or(self.gradient_accumulation_steps)
    }

    /// Optimizer updates per pass over a rollout batch:
    /// `steps_per_generation / gradient_accumulation_steps`.
    pub fn optimizer_steps_per_generation(&self) -> usize {
        self.micro_batches_per_generation() / self.gradient_accumulation_steps.max(1)
    }

    /// Optimizer updates per trainer step: `num_iterations` passes of
    /// [`optimizer_steps_per_generation`](Self::optimizer_steps_per_generation).
    pub fn optimizer_steps_per_step(&self) -> usize {
        self.num_iterations * self.optimizer_steps_per_generation()
    }

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
        if self.gradient_accumulation_steps == 0 {
            bail_config!("gradient_accumulation_steps", "must be at least 1");
        }
        if let Some(s) = self.steps_per_generation {
            if s == 0 || s % self.gradient_accumulation_steps != 0 {
                bail_config!(
                    "steps_per_generation",
                    "must be a positive multiple of gradient_accumulation_steps = {} (every \
                     optimizer update takes that many micro-batches), got {s}",
                    self.gradient_accumulation_steps
                );
            }
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
        if let Some(max) = self.max_steps {
            if self.warmup_steps >= max {
                bail_config!(
                    "warmup_steps",
                    "must be below max_steps = {max} (the warm-up would never end), got {}",
                    self.warmup_steps
                );
            }
        }
        if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
            bail_config!(
                "ref_model_mixup_alpha",
                "must be in [0, 1], got {}",
                self.ref_model_mixup_alpha
            );
        }
        if self.ref_model_sync_steps == 0 {
            bail_config!("ref_model_sync_steps", "must be at least 1");
        }
        if self.sync_ref_model && !self.objective.needs_reference() {
            bail_config!(
                "sync_ref_model",
                "needs a reference policy, which only the KL term uses: set objective.beta > 0 \
                 (with beta = 0 there is nothing to synchronise)"
            );
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
