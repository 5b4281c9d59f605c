//! Advantage estimators: pure functions from one rollout batch's rewards (plus, for P-GRPO,
//! the reward history as it stands) to one advantage per row.
//!
//! A batch has `N` rows. Row `i` is one completion with reward `rewards[i]`, generated for
//! prompt `prompt_ids[i]`, whose preference group is `group_keys[group_ids[i]]`. Rows of one
//! prompt need not be contiguous. Writing `μ_q, σ_q` for the mean and standard deviation of
//! the rewards of prompt `q` in this batch, `μ_B, σ_B` for the whole batch and `μ_p, σ_p` for
//! the reward history of preference group `p`:
//!
//! | [`Estimator`] | advantage of row `i` | source |
//! |---|---|---|
//! | `Grpo` | `(R_i − μ_q) / (σ_q + eps)` | DeepSeekMath (Shao et al. 2024) |
//! | `GrpoBatchStd` | `(R_i − μ_q) / (σ_B + eps)` | TRL `scale_rewards="batch"` |
//! | `DrGrpo` | `R_i − μ_q` | Dr. GRPO (Liu et al. 2025) |
//! | `BatchZScore` | `(R_i − μ_B) / (σ_B + eps)` | REINFORCE++-style global normalisation |
//! | `Rloo` | `R_i − mean_{j≠i, j∈q} R_j` | RLOO (Ahmadian et al. 2024) |
//! | `PGrpo` | `(R_i − μ_p) / (σ_p + eps)` | P-GRPO (arXiv:2603.10009) |
//! | `AnnealedOffset` | `Â_i + n0/(n0 + n_p) · (μ_q − μ_p) / (σ_p + eps)` | count-annealed offset (`docs/estimators.md`) |
//! | `JamesStein` | `Â_i + c (μ_q − μ_p) / (σ_p + eps)`, `c` the batch's James–Stein factor | Efron & Morris 1973 |
//! | `Blend` | `(R_i − (w μ_q + (1−w) μ_p)) / (√(w σ_q² + (1−w) σ_p²) + eps)` | inverse-variance blend (cf. BV-Blend) |
//! | `Levels` | `(R_i − m) / (s + eps)`, `m`, `s` from the prompt, the group or the batch | AReaL `mean_level`/`std_level` |
//!
//! `Â_i` is GRPO's advantage and `n_p` the number of rewards in group `p`'s history; each
//! estimator's function in `estimators.rs` gives its full equation and source. Every `σ` is
//! first raised to `std_floor`. P-GRPO's options (update order, cold start, offset weight)
//! are in [`PGrpoOptions`]; they also decide, for every estimator that reads `μ_p, σ_p`,
//! which statistics those are and what a cold group falls back to. A history whose rewards
//! are all equal is cold (it measures no spread; dividing by its zero std gave `|A| ≈ 10⁴`).
//!
//! A rule of your own plugs in through the [`AdvantageEstimator`] trait (see its docs for a
//! median-baseline example); several reward functions' separate scores go through
//! [`AdvantageConfig::compute_parts`] ([`RewardAggregation`]). The computation never mutates the history: it
//! returns, with the advantages, the batch's per-group statistics ([`BatchDeltas`]) that
//! [`RewardHistory::apply`] folds in afterwards. [`AdvantageConfig::compute_and_update`] does both.
//!
//! # How an advantage is computed
//!
//! [`AdvantageConfig::compute`] checks the configuration and the lengths, then takes one of
//! two paths with the same result:
//!
//! | step | general path | file |
//! |---|---|---|
//! | statistics | one parallel pass: row checks, batch moments, group deltas, prompt statistics | `stats.rs` |
//! | estimator | the spreads it reads checked; per group, P-GRPO's normaliser; per row, the estimator's function | `estimators.rs` |
//! | diagnostics | per group and per batch | `diagnostics.rs` |
//!
//! P-GRPO's rule is two functions side by side in `estimators.rs`: the choice of a group's
//! normaliser (usable history or cold start, update order, std floor) and the per-row
//! formula with the offset weight `λ`. Each other estimator is one function there too, with
//! its equation; that file's docs say how to add one. The fused path (`fused.rs`) does the
//! three steps in one pass over the rows for P-GRPO's usual case (warm history, default
//! options), an optimisation tested bit for bit against the general path.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{bail_config, Error, Result};
use crate::history::{HistoryKind, Variance};
use crate::names::named_enum;
use crate::{GroupKey, RewardHistory};

mod custom;
mod diagnostics;
mod estimators;
mod fused;
mod multi;
mod stats;

pub use crate::history::BatchDeltas;
pub use custom::AdvantageEstimator;
pub use diagnostics::{AdvantageDiagnostics, GroupDiagnostics};
pub use multi::{part_key, RewardAggregation, RewardParts};

use estimators::{Context, Scale};
use stats::{rows_per_task, BatchStats};

/// Which statistics normalise a reward. See the [module docs](self) for the formulas.
///
/// Every estimator on one batch: two prompts with `G = 3` completions each, prompt 0 in
/// preference group `a` (rewards 1, 0, 0.5), prompt 1 in group `b` (0.2, 0.2, 0.8), and a
/// history of 8 earlier rewards per group (`a`: mean 0.5, std 0.53; `b`: mean 0.2, std 0.11).
/// Advantages rounded to 3 decimals (the default `eps = 1e-4` is in every denominator):
///
/// ```
/// use pgrpo::{AdvantageConfig, Estimator, GroupKey, RewardHistory, RolloutRewards};
///
/// let keys: Vec<GroupKey> = vec!["a".into(), "b".into()];
/// let batch = RolloutRewards {
///     rewards: &[1.0, 0.0, 0.5, 0.2, 0.2, 0.8],
///     prompt_ids: &[0, 0, 0, 1, 1, 1],
///     group_ids: &[0, 0, 0, 1, 1, 1],
///     group_keys: &keys,
/// };
/// let mut history = RewardHistory::default();
/// history.update("a", &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])?; // mean 0.5, std 0.535
/// history.update("b", &[0.1, 0.3, 0.1, 0.3, 0.1, 0.3, 0.1, 0.3])?; // mean 0.2, std 0.107
///
/// let expected: [(Estimator, [f32; 6]); 10] = [
///     // (R − μ_q) / σ_q: prompt 0 has μ 0.5, σ 0.5; prompt 1 has μ 0.4, σ 0.346.
///     (Estimator::Grpo, [1.0, -1.0, 0.0, -0.577, -0.577, 1.154]),
///     // (R − μ_q) / σ_batch, σ_batch = 0.389.
///     (Estimator::GrpoBatchStd, [1.286, -1.286, 0.0, -0.515, -0.515, 1.029]),
///     // R − μ_q.
///     (Estimator::DrGrpo, [0.5, -0.5, 0.0, -0.2, -0.2, 0.4]),
///     // (R − μ_batch) / σ_batch, μ_batch = 0.45.
///     (Estimator::BatchZScore, [1.415, -1.158, 0.129, -0.643, -0.643, 0.9]),
///     // R − mean of the prompt's other completions.
///     (Estimator::Rloo, [0.75, -0.75, 0.0, -0.3, -0.3, 0.6]),
///     // (R − μ_p) / σ_p from each group's history: 0.8 is exceptional for group b.
///     (Estimator::PGrpo, [0.935, -0.935, 0.0, 0.0, 0.0, 5.607]),
///     // GRPO plus the offset (μ_q − μ_p)/σ_p = 0 for prompt 0 and 1.87 for prompt 1, times
///     // λ = 2048/(2048 + 8) = 0.996.
///     (Estimator::AnnealedOffset, [1.0, -1.0, 0.0, 1.285, 1.285, 3.016]),
///     // The same offset times c = 1 (two prompts: no shrinkage estimate).
///     (Estimator::JamesStein, [1.0, -1.0, 0.0, 1.292, 1.292, 3.023]),
///     // τ² = 4.24, w = 0.82 on the prompt: mostly GRPO, the group's std mixed in.
///     (Estimator::Blend, [0.987, -0.987, 0.0, -0.518, -0.518, 1.373]),
///     // (R − μ_q) / σ_p (the default levels: prompt mean, group std).
///     (Estimator::Levels, [0.935, -0.935, 0.0, -1.869, -1.869, 3.738]),
/// ];
/// for (estimator, want) in expected {
///     let cfg = AdvantageConfig { estimator, ..Default::default() };
///     let adv = cfg.compute(&batch, &history)?;
///     let rounded: Vec<f32> = adv.values.iter().map(|a| (a * 1000.0).round() / 1000.0).collect();
///     assert_eq!(rounded, want, "{}", estimator.name());
/// }
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// Per-prompt z-score (GRPO).
    Grpo,
    /// Per-prompt mean, whole-batch std (TRL `scale_rewards="batch"`).
    GrpoBatchStd,
    /// Per-prompt mean, no std scaling (Dr. GRPO).
    DrGrpo,
    /// Whole-batch z-score.
    BatchZScore,
    /// Leave-one-out baseline (RLOO), no std scaling.
    Rloo,
    /// Per-preference-group history z-score (P-GRPO). Default.
    #[default]
    PGrpo,
    /// GRPO plus P-GRPO's offset, faded by the group's history count ([`AnnealOptions`]).
    AnnealedOffset,
    /// GRPO plus the offset of the prompt mean over its James–Stein shrinkage toward the
    /// group's history mean (no parameter).
    JamesStein,
    /// Prompt and group statistics blended by their confidence (no parameter).
    Blend,
    /// The mean and the std each from the prompt, the group's history or the batch
    /// ([`LevelOptions`]).
    Levels,
}

named_enum!(Estimator, "estimator", noun "estimator", [
    Grpo => "grpo",
    GrpoBatchStd => "grpo_batch_std",
    DrGrpo => "dr_grpo",
    BatchZScore => "batch_z_score",
    Rloo => "rloo",
    PGrpo => "p_grpo",
    AnnealedOffset => "annealed_offset",
    JamesStein => "james_stein",
    Blend => "blend",
    Levels => "levels",
]);

impl Estimator {
    /// Whether the estimator can read the preference groups' histories (so that shuffling
    /// the labels changes it): P-GRPO and the estimators built on it (`levels` only when one
    /// of its levels is `group`).
    pub fn is_group_aware(&self) -> bool {
        matches!(
            self,
            Estimator::PGrpo
                | Estimator::AnnealedOffset
                | Estimator::JamesStein
                | Estimator::Blend
                | Estimator::Levels
        )
    }
}

/// The count-annealed offset's parameter ([`Estimator::AnnealedOffset`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnealOptions {
    /// `n0` in `λ_p = n0 / (n0 + n_p)`: the offset has half its weight once the group's
    /// history holds `n0` rewards. Finite, `>= 0` (0 is GRPO). Default 2048, chosen on
    /// tuning seeds disjoint from the evaluation seeds (`docs/estimators.md`; 512 also met the
    /// bar). Beyond the paper.
    pub n0: f64,
}

impl Default for AnnealOptions {
    fn default() -> Self {
        Self { n0: 2048.0 }
    }
}

/// Where [`Estimator::Levels`] takes a mean or a std from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// The prompt's own completions (`μ_q`, `σ_q`): AReaL's `group` level.
    Prompt,
    /// The preference group's history (`μ_p`, `σ_p`), as P-GRPO chooses it.
    Group,
    /// The whole batch (`μ_B`, `σ_B`): AReaL's `batch` level.
    Batch,
}

named_enum!(Level, "levels", noun "level", [
    Prompt => "prompt",
    Group => "group",
    Batch => "batch",
]);

/// The levels of [`Estimator::Levels`]: `A = (R − m) / (s + eps)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LevelOptions {
    /// Where the mean `m` comes from. Default [`Level::Prompt`].
    pub mean: Level,
    /// Where the std `s` comes from. Default [`Level::Group`] (with the default mean: the
    /// prompt mean scaled by the group's history std, P-GRPO's `λ = 0`). AReaL's
    /// `NormConfig` has the same two choices (`mean_level`, `std_level`).
    pub std: Level,
}

impl Default for LevelOptions {
    fn default() -> Self {
        Self {
            mean: Level::Prompt,
            std: Level::Group,
        }
    }
}

/// When P-GRPO folds the batch into the history relative to normalising with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOrder {
    /// Normalise with the history as it stood before this batch, then fold the batch in.
    /// Default: a reward is never compared with statistics that already contain it, so the
    /// advantage of a lone outlier is not shrunk by itself, and the data-parallel merge of
    /// per-rank batches happens after every rank has its advantages.
    #[default]
    BeforeBatch,
    /// Fold the batch in first, then normalise (the batch is part of its own baseline).
    AfterBatch,
}

/// What P-GRPO uses for a group whose history is too short (`n < min_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ColdStart {
    /// The row's prompt statistics, as GRPO would. Default.
    #[default]
    PerPrompt,
    /// The whole batch's statistics.
    Batch,
    /// The group's history including this batch's rewards of the group.
    HistoryWithBatch,
}

/// What to do with a NaN or infinite reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Fail with [`Error::NonFiniteReward`] naming the row. Default.
    #[default]
    Error,
    /// Treat the reward as missing: advantage 0, left out of every statistic (TRL's behaviour).
    Missing,
}

/// P-GRPO's choices the paper leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PGrpoOptions {
    /// Normalise before or after folding the batch into the history. Default
    /// [`UpdateOrder::BeforeBatch`].
    pub update_order: UpdateOrder,
    /// A group's history is used once it holds at least this many rewards (and a defined
    /// std); before that [`cold_start`](Self::cold_start) applies. Default 8 (our choice; the
    /// paper does not say).
    pub min_count: u64,
    /// The fallback while a group's history is too short. Default [`ColdStart::PerPrompt`].
    pub cold_start: ColdStart,
    /// Weight `λ ∈ [0, 1]` of the offset term `(μ_q − μ_p)/σ_p` in the identity
    /// `A = (σ_q/σ_p)·Â + λ(μ_q − μ_p)/σ_p`, i.e. the advantage is
    /// `(R_i − ((1−λ)μ_q + λμ_p)) / σ_p`. `1` (default) is the paper's P-GRPO; `0` centres on
    /// the prompt mean and scales by the group's history std. Beyond the paper.
    pub offset_weight: f32,
}

impl Default for PGrpoOptions {
    fn default() -> Self {
        Self {
            update_order: UpdateOrder::BeforeBatch,
            min_count: 8,
            cold_start: ColdStart::PerPrompt,
            offset_weight: 1.0,
        }
    }
}

/// Configuration of the advantage computation.
///
/// ```
/// use pgrpo::{AdvantageConfig, Estimator};
/// let cfg = AdvantageConfig { estimator: Estimator::Grpo, ..Default::default() };
/// cfg.validate()?;
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvantageConfig {
    /// Which statistics normalise the reward. Default [`Estimator::PGrpo`].
    pub estimator: Estimator,
    /// Added to every std in a denominator. Default `1e-4` (TRL's constant).
    pub eps: f32,
    /// Every std is raised to at least this before `eps` is added. Default `0`.
    pub std_floor: f32,
    /// Population or sample std. Default [`Variance::Sample`] (`torch.std`, as TRL).
    pub variance: Variance,
    /// NaN/inf rewards: error (default) or missing.
    pub non_finite: NonFinitePolicy,
    /// P-GRPO's options. They also choose the group statistics of every estimator that reads
    /// them ([`Estimator::is_group_aware`]); the others ignore them.
    pub pgrpo: PGrpoOptions,
    /// The count-annealed offset's `n0` (read by [`Estimator::AnnealedOffset`] only).
    pub anneal: AnnealOptions,
    /// The mean and std levels (read by [`Estimator::Levels`] only).
    pub levels: LevelOptions,
    /// How several reward functions' scores become advantages
    /// ([`compute_parts`](Self::compute_parts); TRL's `multi_objective_aggregation`).
    /// Default [`RewardAggregation::SumThenNormalize`] (TRL's default).
    pub reward_aggregation: RewardAggregation,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            estimator: Estimator::PGrpo,
            eps: 1e-4,
            std_floor: 0.0,
            variance: Variance::Sample,
            non_finite: NonFinitePolicy::Error,
            pgrpo: PGrpoOptions::default(),
            anneal: AnnealOptions::default(),
            levels: LevelOptions::default(),
            reward_aggregation: RewardAggregation::SumThenNormalize,
        }
    }
}

/// One rollout batch's rewards and row labels (borrowed).
#[derive(Debug, Clone, Copy)]
pub struct RolloutRewards<'a> {
    /// `(N,)` rewards.
    pub rewards: &'a [f32],
    /// `(N,)` prompt of each row: any `u32` id; rows with the same id share a prompt.
    pub prompt_ids: &'a [u32],
    /// `(N,)` preference group of each row, an index into `group_keys`.
    pub group_ids: &'a [u32],
    /// The group labels; `group_ids` index into this. Keys should be distinct: a repeated
    /// key is treated as separate groups within the batch and folded into the history once
    /// per copy, in key order (exact for cumulative statistics; for exponential and window
    /// statistics the rows of the later copy count as newer).
    pub group_keys: &'a [GroupKey],
}

/// Output of [`AdvantageConfig::compute`].
#[derive(Debug, Clone)]
pub struct Advantages {
    /// `(N,)` one advantage per row.
    pub values: Vec<f32>,
    /// What the batch looked like.
    pub diagnostics: AdvantageDiagnostics,
    /// The batch's per-group statistics, to fold into the history.
    pub deltas: BatchDeltas,
}

impl AdvantageConfig {
    /// Whether some rows may need their prompt's own spread, i.e. at least 2 completions per
    /// prompt: GRPO, RLOO, Dr. GRPO, `grpo_batch_std` (whose only signal is the contrast
    /// within a prompt: with one completion every advantage would be 0) and the estimators that
    /// add to GRPO's advantage always, P-GRPO during a [`ColdStart::PerPrompt`] cold start.
    pub fn needs_prompt_spread(&self) -> bool {
        self.needs().prompt_spread != estimators::PromptSpread::Never
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail_config!("eps", "must be finite and >= 0, got {}", self.eps);
        }
        if !(self.std_floor.is_finite() && self.std_floor >= 0.0) {
            bail_config!(
                "std_floor",
                "must be finite and >= 0, got {}",
                self.std_floor
            );
        }
        if self.needs().group_scales && self.eps == 0.0 && self.std_floor == 0.0 {
            bail_config!(
                "eps",
                "{} divides by a history std that can be 0: set eps > 0 or std_floor > 0",
                self.estimator.name()
            );
        }
        let l = self.pgrpo.offset_weight;
        if !(0.0..=1.0).contains(&l) {
            bail_config!("pgrpo.offset_weight", "must be in [0, 1], got {l}");
        }
        let n0 = self.anneal.n0;
        if !(n0.is_finite() && n0 >= 0.0) {
            bail_config!("anneal.n0", "must be finite and >= 0, got {n0}");
        }
        Ok(())
    }

    /// Advantages of one batch. Pure: `history` is read, not changed; fold the returned
    /// [`Advantages::deltas`] in with [`RewardHistory::apply`].
    ///
    /// Every advantage is finite: `0/0` (a constant batch with `eps = 0`) gives 0, and values
    /// beyond `f32`'s range saturate at `±f32::MAX`.
    ///
    /// ```
    /// use pgrpo::{AdvantageConfig, Estimator, GroupKey, RewardHistory, RolloutRewards};
    /// let keys: Vec<GroupKey> = vec!["a".into()];
    /// let batch = RolloutRewards {
    ///     rewards: &[1.0, 0.0, 0.0, 0.0],
    ///     prompt_ids: &[0, 0, 1, 1],
    ///     group_ids: &[0, 0, 0, 0],
    ///     group_keys: &keys,
    /// };
    /// let cfg = AdvantageConfig { estimator: Estimator::Grpo, eps: 0.0, ..Default::default() };
    /// let adv = cfg.compute(&batch, &RewardHistory::default())?;
    /// // prompt 0: mean 0.5, sample std 0.7071 → ±0.7071; prompt 1 has no spread → 0.
    /// assert!((adv.values[0] - 0.7071).abs() < 1e-4 && adv.values[2] == 0.0);
    /// assert_eq!(adv.diagnostics.frac_reward_zero_std, 0.5);
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`], [`Error::LengthMismatch`], [`Error::Empty`],
    /// [`Error::IndexOutOfRange`] (a group id past `group_keys`),
    /// [`Error::NonFiniteReward`] (under [`NonFinitePolicy::Error`]) and
    /// [`Error::TooFewCompletions`] (a prompt with one completion under an estimator that
    /// needs its spread).
    pub fn compute(
        &self,
        batch: &RolloutRewards<'_>,
        history: &RewardHistory,
    ) -> Result<Advantages> {
        self.check_batch(batch)?;
        let k = batch.group_keys.len();
        let task_rows = rows_per_task(k);
        match self.fused_pgrpo(batch, history, task_rows) {
            Some(adv) => Ok(adv),
            None => self.compute_general(batch, history, task_rows),
        }
    }

    /// [`compute`](Self::compute) for any batch and options (after the input checks):
    /// statistics, the estimator's context, the estimator on every row, diagnostics.
    fn compute_general(
        &self,
        batch: &RolloutRewards<'_>,
        history: &RewardHistory,
        task_rows: usize,
    ) -> Result<Advantages> {
        let kind = history.kind();
        let stats = BatchStats::compute(batch, kind, self.non_finite, task_rows)?;
        let ctx = Context::new(self, batch, history, &stats)?;
        let (values, adv_sums) = ctx.advantages(batch, &stats.prompt_of_row, task_rows);
        let degenerate = ctx.num_degenerate();
        let scales: Vec<Option<Scale>> = (0..batch.group_keys.len())
            .map(|g| ctx.history_scale(g))
            .collect();
        Ok(self.finish(stats, values, &adv_sums, &scales, degenerate, kind))
    }

    /// The [`Advantages`] of a batch from its statistics, its advantages and their sum per
    /// group, each group's history normaliser when one was used, and the prompts left without
    /// contrast: the diagnostics, and the deltas to fold in.
    pub(crate) fn finish(
        &self,
        stats: BatchStats,
        values: Vec<f32>,
        adv_sums: &[f64],
        history_scales: &[Option<Scale>],
        num_degenerate: usize,
        kind: HistoryKind,
    ) -> Advantages {
        let groups = (0..stats.deltas.len())
            .map(|g| {
                let c = stats.deltas[g].count as usize;
                let (rs, adv) = (stats.reward_sums[g], adv_sums[g]);
                GroupDiagnostics::new(
                    c,
                    rs / c as f64,
                    adv / c as f64,
                    history_scales[g],
                    self.eps,
                )
            })
            .collect();
        let zero = stats.prompts.zero_spread.iter().filter(|&&z| z).count();
        let diagnostics = AdvantageDiagnostics::new(
            groups,
            stats.prompt_labels.len(),
            zero,
            stats.num_missing,
            num_degenerate,
            &stats.batch,
        );
        Advantages {
            values,
            diagnostics,
            deltas: BatchDeltas {
                kind,
                deltas: stats.deltas,
            },
        }
    }

    /// [`compute`](Self::compute), then fold the batch into `history`. On error the history
    /// is unchanged.
    pub fn compute_and_update(
        &self,
        batch: &RolloutRewards<'_>,
        history: &mut RewardHistory,
    ) -> Result<Advantages> {
        let mut adv = self.compute(batch, history)?;
        let deltas = std::mem::replace(&mut adv.deltas, BatchDeltas::empty(history.kind()));
        history.apply(batch.group_keys, deltas)?;
        Ok(adv)
    }

    /// [`compute`](Self::compute) on tensors: `rewards` `(N,)` (any float dtype),
    /// `prompt_ids` and `group_ids` `(N,)` `u32`, on any device. Returns the `(N,)` `f32`
    /// advantages on `rewards`' device.
    pub fn compute_tensor(
        &self,
        rewards: &Tensor,
        prompt_ids: &Tensor,
        group_ids: &Tensor,
        group_keys: &[GroupKey],
        history: &RewardHistory,
    ) -> Result<(Tensor, Advantages)> {
        let r = rewards
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let p = prompt_ids.flatten_all()?.to_vec1::<u32>()?;
        let g = group_ids.flatten_all()?.to_vec1::<u32>()?;
        let adv = self.compute(
            &RolloutRewards {
                rewards: &r,
                prompt_ids: &p,
                group_ids: &g,
                group_keys,
            },
            history,
        )?;
        let t = Tensor::from_slice(&adv.values, adv.values.len(), rewards.device())?;
        Ok((t, adv))
    }
}

impl AdvantageConfig {
    /// The checks before any statistic: the config, the lengths, a non-empty batch.
    pub(crate) fn check_batch(&self, batch: &RolloutRewards<'_>) -> Result<()> {
        self.validate()?;
        let n = batch.rewards.len();
        check_len("prompt_ids", batch.prompt_ids.len(), n)?;
        check_len("group_ids", batch.group_ids.len(), n)?;
        if n == 0 {
            return Err(Error::Empty("rewards"));
        }
        Ok(())
    }
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::LengthMismatch {
            what,
            got,
            against: "rewards",
            expected,
        });
    }
    Ok(())
}
