//! The estimators: one function per [`Estimator`], from one row (its reward, its prompt's
//! statistics, the batch's, its preference group's normaliser) to its advantage.
//!
//! Notation as in the [module docs](super): `R_i` the row's reward, `μ_q, σ_q, n_q` its
//! prompt's mean, std and number of usable rewards in this batch, `μ_B, σ_B` the batch's,
//! `μ_p, σ_p` the reward history of its preference group `p`. Every `σ` in a denominator is
//! `max(σ, std_floor) + eps` ([`AdvantageConfig::denominator`]).
//!
//! | function | advantage of row `i` |
//! |---|---|
//! | [`grpo`] | `(R_i − μ_q) / σ_q` |
//! | [`grpo_batch_std`] | `(R_i − μ_q) / σ_B` |
//! | [`dr_grpo`] | `R_i − μ_q` |
//! | [`batch_z_score`] | `(R_i − μ_B) / σ_B` |
//! | [`rloo`] | `(R_i − μ_q) · n_q / (n_q − 1)` |
//! | [`p_grpo`] | `(R_i − ((1 − λ) μ_q + λ μ_p)) / σ_p`, normaliser from [`p_grpo_scale`] |
//! | [`annealed_offset`] | `Â_i + n0/(n0 + n_p) · (μ_q − μ_p) / σ_p` |
//! | [`james_stein`] | `Â_i + c · (μ_q − μ_p) / σ_p`, `c` the batch's positive-part James–Stein factor |
//! | [`blend`] | `(R_i − (w μ_q + (1 − w) μ_p)) / √(w σ_q² + (1 − w) σ_p²)`, `w` by inverse variances |
//! | [`levels`] | `(R_i − m) / s`, `m` and `s` each from the prompt, the group's history or the batch |
//!
//! `Â_i` is GRPO's advantage. Every estimator that reads `μ_p, σ_p` (P-GRPO and the four
//! below it) takes them from [`p_grpo_scale`], so they share P-GRPO's update order, `min_count`
//! and degenerate-history rule, and a group without a normaliser falls back like P-GRPO
//! ([`cold`]).
//!
//! # Adding an estimator
//! 1. A case in [`Estimator`] with its name in the `named_enum!` list beside it (and a row in
//!    the table of the [module docs](super)).
//! 2. A `fn(&Row<'_>) -> f64` here, its equation and source in the doc comment, reading what
//!    it needs from [`Row`] (add an accessor there if it needs a statistic not yet offered).
//! 3. Its line in [`Estimator::advantage`] and in [`AdvantageConfig::needs`]; both matches
//!    are exhaustive, so the compiler points at them.
//! 4. A golden test in `tests/advantage.rs` with the arithmetic written out.
//!
//! A rule that should not live in the crate needs none of this: implement
//! [`AdvantageEstimator`](super::AdvantageEstimator) instead.
//!
//! The row loop calls [`Estimator::advantage`], whose `match` is the same for every row (the
//! branch is predicted, and each function is inlined): no function pointer and no allocation
//! per row. A [`Row`] computes a statistic only when its estimator asks for it.

use super::stats::{BatchStats, PromptStats};
use super::{AdvantageConfig, ColdStart, Estimator, Level, RolloutRewards, UpdateOrder};
use crate::error::{Error, Result};
use crate::history::{GroupDelta, RunningMoments, Variance};
use crate::{GroupKey, RewardHistory};

/// A centre and the denominator that scales around it: `(x − mean) / den`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scale {
    /// The centre.
    pub mean: f64,
    /// `max(σ, std_floor) + eps`.
    pub den: f64,
}

/// A preference group's normaliser under P-GRPO, and whether it is the group's history (as
/// opposed to the [`ColdStart::HistoryWithBatch`] fallback).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GroupScale {
    /// `μ_p` and the denominator of `σ_p`.
    pub scale: Scale,
    /// `σ_p` raised to `std_floor` (the denominator less `eps`).
    pub std: f64,
    /// `n_p`, the number of rewards in the statistics.
    pub count: u64,
    /// `true`: the group's history was usable; `false`: the cold-start history with the batch.
    pub from_history: bool,
}

/// A history is *degenerate* when its std is at most this fraction of its mean's magnitude:
/// its rewards are all equal (`σ_p = 0`), or equal up to a few `f32` roundings (an `f32`
/// reward carries 24 bits, a relative step of `6e-8`). Such a history measures no spread, so
/// it is treated as cold instead of dividing by `eps` (issue 12, defect 2: the first reward
/// unlike the others got `|A| ≈ 1/eps = 10⁴`).
pub(crate) const DEGENERATE_RELATIVE_STD: f64 = 1e-6;

/// Whether `m` holds rewards without a usable spread: no defined variance under `v`, or a
/// std of at most [`DEGENERATE_RELATIVE_STD`] `· |mean|`.
pub(crate) fn degenerate(m: &RunningMoments, v: Variance) -> bool {
    m.variance(v)
        .is_none_or(|var| var.sqrt() <= DEGENERATE_RELATIVE_STD * m.mean.abs())
}

impl AdvantageConfig {
    /// The denominator made of a std: `max(σ, std_floor) + eps`, with an undefined `σ` (no
    /// spread measurable) counted as 0.
    #[inline]
    pub(crate) fn denominator(&self, std: Option<f64>) -> f64 {
        std.unwrap_or(0.0).max(self.std_floor as f64) + self.eps as f64
    }

    /// The mean of `m` and the [`denominator`](Self::denominator) of its std.
    pub(crate) fn scale(&self, m: &RunningMoments) -> Scale {
        Scale {
            mean: m.mean,
            den: self.denominator(m.variance(self.variance).map(f64::sqrt)),
        }
    }

    /// A group's normaliser from its statistics `m`.
    fn group_scale(&self, m: &RunningMoments, from_history: bool) -> GroupScale {
        let std = m
            .variance(self.variance)
            .map_or(0.0, f64::sqrt)
            .max(self.std_floor as f64);
        GroupScale {
            scale: self.scale(m),
            std,
            count: m.count,
            from_history,
        }
    }
}

/// GRPO (DeepSeekMath, Shao et al. 2024): the per-prompt z-score,
/// `A_i = (R_i − μ_q) / (σ_q + eps)`.
#[inline]
pub(crate) fn grpo(row: &Row<'_>) -> f64 {
    ratio(row.centred(), || row.prompt_den())
}

/// TRL's `scale_rewards="batch"`: the per-prompt mean and the whole batch's std,
/// `A_i = (R_i − μ_q) / (σ_B + eps)`.
#[inline]
pub(crate) fn grpo_batch_std(row: &Row<'_>) -> f64 {
    ratio(row.centred(), || row.batch().den)
}

/// Dr. GRPO (Liu et al. 2025): the per-prompt mean and no std, `A_i = R_i − μ_q`.
#[inline]
pub(crate) fn dr_grpo(row: &Row<'_>) -> f64 {
    row.centred()
}

/// The whole batch's z-score (REINFORCE++-style global normalisation),
/// `A_i = (R_i − μ_B) / (σ_B + eps)`.
#[inline]
pub(crate) fn batch_z_score(row: &Row<'_>) -> f64 {
    let b = row.batch();
    ratio(row.reward - b.mean, || b.den)
}

/// RLOO (Ahmadian et al. 2024): the mean of the prompt's other completions as the baseline,
/// `A_i = R_i − mean_{j≠i, j∈q} R_j = (R_i − μ_q) · n_q / (n_q − 1)`; 0 below two usable
/// completions.
#[inline]
pub(crate) fn rloo(row: &Row<'_>) -> f64 {
    let c = row.prompt_count() as f64;
    if c < 2.0 {
        0.0
    } else {
        row.centred() * c / (c - 1.0)
    }
}

/// P-GRPO (arXiv:2603.10009): the reward against its preference group's history,
///
/// ```text
/// A_i = (R_i − μ_p) / (σ_p + eps)                                   (λ = 1, the paper)
///     = (σ_q/σ_p) · Â_i + λ (μ_q − μ_p)/σ_p,  Â_i the GRPO advantage   (the paper's identity)
///     = (R_i − ((1 − λ) μ_q + λ μ_p)) / (σ_p + eps)                  (any λ = offset_weight)
/// ```
///
/// `(μ_p, σ_p)` is the normaliser [`p_grpo_scale`] chose for the group; a group without one
/// falls back, row by row, as [`cold`] says.
#[inline]
pub(crate) fn p_grpo(row: &Row<'_>) -> f64 {
    match row.group() {
        Some(p) => {
            let lambda = row.cfg().pgrpo.offset_weight as f64;
            // Times the reciprocal, as the fused path computes it (same bits).
            (row.reward - ((1.0 - lambda) * row.prompt_mean() + lambda * p.mean)) * (1.0 / p.den)
        }
        None => cold(row),
    }
}

/// The advantage of a row whose group has no normaliser (cold, under [`ColdStart::PerPrompt`]
/// or [`ColdStart::Batch`]): [`grpo`] or [`batch_z_score`]. Shared by every estimator that
/// reads a group's history.
#[inline]
pub(crate) fn cold(row: &Row<'_>) -> f64 {
    match row.cfg().pgrpo.cold_start {
        ColdStart::PerPrompt => grpo(row),
        ColdStart::Batch => batch_z_score(row),
        // Always has a normaliser (see `p_grpo_scale`).
        ColdStart::HistoryWithBatch => 0.0,
    }
}

/// The count-annealed offset (issue 13, candidate (c); `docs/estimators.md`): GRPO's
/// advantage plus P-GRPO's offset term, faded as the group's history grows,
///
/// ```text
/// A_i = Â_i + λ_p (μ_q − μ_p) / (σ_p + eps),   λ_p = n0 / (n0 + n_p)
/// ```
///
/// with `n0` = [`AnnealOptions::n0`](super::AnnealOptions::n0) and `n_p` the number of rewards
/// in the group's statistics. Early (`n_p ≪ n0`) it is GRPO's contrast plus the full offset,
/// which carries P-GRPO's gain on prompts without spread; late the offset, whose consistent
/// sign is what slows P-GRPO down under Adam, fades and GRPO remains. The offset weight
/// [`PGrpoOptions::offset_weight`](super::PGrpoOptions::offset_weight) made per group and
/// decaying with its count; the form `Â + λ·offset` is the paper's identity with GRPO's
/// contrast scale.
#[inline]
pub(crate) fn annealed_offset(row: &Row<'_>) -> f64 {
    match row.group_stats() {
        Some(p) => {
            let n0 = row.cfg().anneal.n0;
            let lambda = n0 / (n0 + p.count as f64);
            grpo(row) + lambda * (row.prompt_mean() - p.scale.mean) / p.scale.den
        }
        None => cold(row),
    }
}

/// James–Stein shrinkage of the prompt mean toward the group's history mean (issue 13,
/// candidate (b); positive-part James–Stein toward a known target, Efron & Morris 1973):
///
/// ```text
/// b_q = μ_p + (1 − c)(μ_q − μ_p)             the prompt mean shrunk toward the group's
/// A_i = Â_i + c (μ_q − μ_p) / (σ_p + eps)    GRPO's contrast, plus the offset of μ_q
///                                            over the shrunk baseline b_q, in units of σ_p
/// c   = min(1, (K − 2) / Σ_q z_q²),  z_q = (μ_q − μ_p) / (σ_p / √n_q)
/// ```
///
/// over the `K` prompts of the batch whose group has a normaliser (`c = 1` when `K ≤ 2`).
/// `z_q` is the prompt's departure from its group's history in units of the standard error
/// its mean would have if every prompt of the group shared the group's mean and each reward
/// had the group's std `σ_p`. When prompts scatter no more than that, `c ≈ 1` and the
/// baseline is the group's (P-GRPO's offset with GRPO's contrast); when they scatter more,
/// the prompts' own means are trusted and `c → 0` gives GRPO. No parameter. The lab's
/// prototype used an exponential average of within-prompt variances as the noise; the crate
/// keeps no such state and uses `σ_p` (see `docs/estimators.md`).
#[inline]
pub(crate) fn james_stein(row: &Row<'_>) -> f64 {
    match row.group_stats() {
        Some(p) => {
            let c = row.ctx.shrink.factor;
            grpo(row) + c * (row.prompt_mean() - p.scale.mean) / p.scale.den
        }
        None => cold(row),
    }
}

/// A confidence-weighted blend of the prompt's and the group's statistics (issue 13,
/// candidate (a); inverse-variance weighting of two estimates of the prompt's mean, in the
/// spirit of BV-Blend, arXiv 2606.28707):
///
/// ```text
/// A_i = (R_i − b_q) / (d_q + eps),  b_q = w μ_q + (1 − w) μ_p,  d_q² = w σ_q² + (1 − w) σ_p²
/// w   = V_p / (V_p + V_q) = r / (r + 1),  r = τ² + n_q / n_p
/// τ²  = max(0, mean_q z_q² − 1)     (z_q as in [`james_stein`], over the same K prompts)
/// ```
///
/// `V_q = σ_p²/n_q` is the variance of the prompt's mean as an estimate of its true mean,
/// `V_p = τ²·σ_p²/n_q + σ_p²/n_p` that of the group's history mean (the spread of true
/// prompt means around it, `τ²` in units of `V_q`, estimated by moments from the batch, plus
/// the history mean's own error); `r = V_p/V_q`. With prompts that agree with their groups
/// (`τ² ≈ 0`) and a long history the group's statistics dominate (P-GRPO); with prompts that
/// differ, the prompt's (GRPO). The numerator is GRPO's exact 0 plus `(1 − w)(μ_q − μ_p)` on
/// a prompt without spread. The lab's prototype kept exponential averages of the two
/// variances across steps; this one reads only the batch and the history.
#[inline]
pub(crate) fn blend(row: &Row<'_>) -> f64 {
    match row.group_stats() {
        Some(p) => {
            let r = row.ctx.shrink.between + row.prompt_count() as f64 / p.count.max(1) as f64;
            let w = r / (r + 1.0);
            let num = row.centred() + (1.0 - w) * (row.prompt_mean() - p.scale.mean);
            let var = w * row.prompt_var() + (1.0 - w) * p.std * p.std;
            ratio(num, || row.cfg().denominator(Some(var.sqrt())))
        }
        None => cold(row),
    }
}

/// Separately chosen levels for the mean and the std (issue 13, candidate (d); AReaL's
/// `mean_level` / `std_level`):
///
/// ```text
/// A_i = (R_i − m) / (s + eps),  m ∈ {μ_q, μ_p, μ_B},  s ∈ {σ_q, σ_p, σ_B}
/// ```
///
/// chosen by [`LevelOptions`](super::LevelOptions). `prompt`/`prompt` is [`grpo`],
/// `prompt`/`batch` [`grpo_batch_std`], `batch`/`batch` [`batch_z_score`] (bit for bit),
/// `group`/`group` P-GRPO (to rounding), `prompt`/`group` P-GRPO with `λ = 0`. A level
/// `group` on a cold group falls back as [`cold`] says; the prompt mean keeps GRPO's exact 0
/// on a prompt without spread.
#[inline]
pub(crate) fn levels(row: &Row<'_>) -> f64 {
    let o = row.cfg().levels;
    let group = row.group();
    if (o.mean == Level::Group || o.std == Level::Group) && group.is_none() {
        return cold(row);
    }
    let num = match o.mean {
        Level::Prompt => row.centred(),
        Level::Group => row.reward - group.map_or(0.0, |g| g.mean),
        Level::Batch => row.reward - row.batch().mean,
    };
    ratio(num, || match o.std {
        Level::Prompt => row.prompt_den(),
        Level::Group => group.map_or(1.0, |g| g.den),
        Level::Batch => row.batch().den,
    })
}

/// P-GRPO's choice of normaliser for one preference group, every option in one place.
///
/// - **Update order**: the statistics `m` are the group's `history` as it stood before this
///   batch ([`UpdateOrder::BeforeBatch`]), or that history with the batch's rewards of the
///   group folded in (`with_batch`, [`UpdateOrder::AfterBatch`]).
/// - **Usable history**: `m` normalises when it holds at least `min_count` (and at least 1)
///   rewards, a defined std, and is not **degenerate** (its rewards all equal: `σ ≤ 1e-6·|μ|`,
///   [`DEGENERATE_RELATIVE_STD`]); `(μ_p, σ_p)` are then its mean and std, `σ_p` raised to
///   `std_floor` before `eps` is added ([`AdvantageConfig::scale`]).
/// - **Cold start** otherwise: [`ColdStart::HistoryWithBatch`] normalises with `with_batch`
///   (reported as not from the history); [`ColdStart::PerPrompt`] and [`ColdStart::Batch`]
///   return `None`, and the estimator falls back row by row ([`cold`]).
///
/// The offset weight `λ` is applied per row, in [`p_grpo`]. Every estimator that reads a
/// group's statistics reads this normaliser.
pub(crate) fn p_grpo_scale(
    cfg: &AdvantageConfig,
    history: RunningMoments,
    with_batch: impl Fn() -> RunningMoments,
) -> Option<GroupScale> {
    let o = &cfg.pgrpo;
    let m = match o.update_order {
        UpdateOrder::BeforeBatch => history,
        UpdateOrder::AfterBatch => with_batch(),
    };
    if m.count >= o.min_count.max(1) && !degenerate(&m, cfg.variance) {
        Some(cfg.group_scale(&m, true))
    } else if o.cold_start == ColdStart::HistoryWithBatch {
        Some(cfg.group_scale(&with_batch(), false))
    } else {
        None
    }
}

impl Estimator {
    /// Row `row`'s advantage under this estimator, in `f64` (before [`finite_f32`]).
    #[inline]
    pub(crate) fn advantage(self, row: &Row<'_>) -> f64 {
        match self {
            Estimator::Grpo => grpo(row),
            Estimator::GrpoBatchStd => grpo_batch_std(row),
            Estimator::DrGrpo => dr_grpo(row),
            Estimator::BatchZScore => batch_z_score(row),
            Estimator::Rloo => rloo(row),
            Estimator::PGrpo => p_grpo(row),
            Estimator::AnnealedOffset => annealed_offset(row),
            Estimator::JamesStein => james_stein(row),
            Estimator::Blend => blend(row),
            Estimator::Levels => levels(row),
        }
    }
}

/// Which rows of a batch read their prompt's spread `σ_q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PromptSpread {
    /// None.
    Never,
    /// Every row.
    Always,
    /// The rows of a group without a normaliser (P-GRPO's per-prompt cold start).
    WhenCold,
}

/// What an estimator reads besides the rows' rewards, so that a batch that cannot supply it is
/// refused before any advantage is computed, and nothing is computed that it does not read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Needs {
    /// Rows reading `σ_q` (or, for Dr. GRPO and `grpo_batch_std`, whose only signal is the
    /// contrast within the prompt) need 2 usable completions in their prompt.
    pub prompt_spread: PromptSpread,
    /// Reading `σ_B` needs 2 usable rewards in the batch (under the sample variance).
    pub batch_spread: bool,
    /// Reads the groups' normalisers ([`p_grpo_scale`]).
    pub group_scales: bool,
    /// Reads the batch's shrinkage statistics ([`Shrinkage`]).
    pub shrinkage: bool,
}

impl AdvantageConfig {
    /// What this configuration's estimator reads.
    pub(crate) fn needs(&self) -> Needs {
        use PromptSpread::{Always, Never, WhenCold};
        let reads = |prompt_spread, batch_spread, group_scales| Needs {
            prompt_spread,
            batch_spread,
            group_scales,
            shrinkage: false,
        };
        // A group-aware estimator's cold rows read what the cold start reads.
        let cold = match self.pgrpo.cold_start {
            ColdStart::PerPrompt => WhenCold,
            _ => Never,
        };
        match self.estimator {
            Estimator::Grpo => reads(Always, false, false),
            // Their only signal is the contrast within a prompt: one completion has none
            // (every advantage would be 0).
            Estimator::GrpoBatchStd => reads(Always, true, false),
            Estimator::DrGrpo => reads(Always, false, false),
            Estimator::BatchZScore => reads(Never, true, false),
            Estimator::Rloo => reads(Always, false, false),
            Estimator::PGrpo => reads(cold, false, true),
            Estimator::AnnealedOffset => reads(Always, false, true),
            Estimator::JamesStein | Estimator::Blend => Needs {
                shrinkage: true,
                ..reads(Always, false, true)
            },
            Estimator::Levels => {
                let (m, s) = (self.levels.mean, self.levels.std);
                let group = m == Level::Group || s == Level::Group;
                let prompt = if s == Level::Prompt {
                    Always
                } else if group {
                    cold
                } else {
                    Never
                };
                reads(prompt, s == Level::Batch, group)
            }
        }
    }
}

/// The batch-level statistics of [`james_stein`] and [`blend`]: over the `K` prompts whose
/// group has a normaliser, `z_q = (μ_q − μ_p) √n_q / (σ_p + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shrinkage {
    /// The positive-part James–Stein factor `min(1, (K − 2)/Σ z_q²)`; 1 when `K ≤ 2` or
    /// `Σ z_q² = 0`.
    pub factor: f64,
    /// `τ² = max(0, Σ z_q²/K − 1)`, the spread of the prompts' true means around their
    /// groups' in units of a prompt mean's standard error; 0 without prompts.
    pub between: f64,
}

impl Shrinkage {
    const NONE: Shrinkage = Shrinkage {
        factor: 1.0,
        between: 0.0,
    };

    /// The statistics of a batch: each prompt's group is that of its first usable row.
    fn compute(
        batch: &RolloutRewards<'_>,
        stats: &BatchStats,
        groups: &[Option<GroupScale>],
    ) -> Self {
        let p = stats.prompt_labels.len();
        let mut group_of = vec![u32::MAX; p];
        for ((&r, &g), &q) in batch
            .rewards
            .iter()
            .zip(batch.group_ids)
            .zip(&stats.prompt_of_row)
        {
            let slot = &mut group_of[q as usize];
            if *slot == u32::MAX && r.is_finite() {
                *slot = g;
            }
        }
        let (mut k, mut sum) = (0usize, 0f64);
        for (q, &g) in group_of.iter().enumerate() {
            let Some(s) = groups.get(g as usize).copied().flatten() else {
                continue;
            };
            let n = stats.prompts.count[q] as f64;
            let z = (stats.prompts.mean[q] - s.scale.mean) / s.scale.den;
            k += 1;
            sum += z * z * n;
        }
        if k == 0 {
            return Self::NONE;
        }
        let factor = if k <= 2 || sum <= 0.0 {
            1.0
        } else {
            ((k - 2) as f64 / sum).min(1.0)
        };
        Self {
            factor,
            between: (sum / k as f64 - 1.0).max(0.0),
        }
    }
}

/// What the estimators read of a batch as a whole, built once per batch by
/// [`Context::new`] (which also refuses a batch that cannot give the estimator what it needs).
pub(crate) struct Context<'a> {
    cfg: &'a AdvantageConfig,
    prompts: &'a PromptStats,
    /// Per prompt: left without contrast by missing rewards (its rows are centred at 0).
    degenerate: Vec<bool>,
    /// `μ_B` and the denominator of `σ_B`.
    batch: Scale,
    /// Per group: its P-GRPO normaliser (`None`: no usable row, an estimator that does not
    /// read it, or cold).
    groups: Vec<Option<GroupScale>>,
    /// The shrinkage statistics ([`Shrinkage::NONE`] unless the estimator reads them).
    shrink: Shrinkage,
    /// Prompts in `degenerate`.
    num_degenerate: usize,
}

impl<'a> Context<'a> {
    /// The batch scale, the groups' normalisers and the prompts without contrast.
    ///
    /// # Errors
    /// [`Error::TooFewCompletions`] when the estimator reads a spread the batch does not have:
    /// the batch's (fewer than 2 usable rewards under the sample variance; the first prompt
    /// id is named), or a prompt's that has one completion and no missing reward.
    pub(crate) fn new(
        cfg: &'a AdvantageConfig,
        batch: &RolloutRewards<'_>,
        history: &RewardHistory,
        stats: &'a BatchStats,
    ) -> Result<Self> {
        let needs = cfg.needs();
        let batch_m = &stats.batch;
        if needs.batch_spread && batch_m.count < 2 && cfg.variance == Variance::Sample {
            return Err(Error::TooFewCompletions {
                prompt: batch.prompt_ids[0] as usize,
                count: batch_m.count as usize,
                estimator: cfg.estimator.name(),
            });
        }
        let groups = if needs.group_scales {
            group_scales(cfg, batch.group_keys, history, &stats.deltas)
        } else {
            vec![None; batch.group_keys.len()]
        };
        let shrink = if needs.shrinkage {
            Shrinkage::compute(batch, stats, &groups)
        } else {
            Shrinkage::NONE
        };
        let mut ctx = Self {
            cfg,
            prompts: &stats.prompts,
            degenerate: vec![false; stats.prompt_labels.len()],
            batch: cfg.scale(batch_m),
            groups,
            shrink,
            num_degenerate: 0,
        };
        ctx.find_degenerate(needs.prompt_spread, batch, stats)?;
        Ok(ctx)
    }
    /// Marks the prompts whose rows read `σ_q` but have fewer than 2 usable rewards because
    /// some were missing; a prompt that simply has one completion is an error.
    fn find_degenerate(
        &mut self,
        spread: PromptSpread,
        batch: &RolloutRewards<'_>,
        stats: &BatchStats,
    ) -> Result<()> {
        let reads = match spread {
            PromptSpread::Never => return Ok(()),
            PromptSpread::Always => vec![true; stats.prompt_labels.len()],
            PromptSpread::WhenCold => {
                let mut reads = vec![false; stats.prompt_labels.len()];
                let some_group_cold = self
                    .groups
                    .iter()
                    .zip(&stats.deltas)
                    .any(|(s, d)| d.count > 0 && s.is_none());
                if some_group_cold {
                    for ((&r, &g), &q) in batch
                        .rewards
                        .iter()
                        .zip(batch.group_ids)
                        .zip(&stats.prompt_of_row)
                    {
                        if r.is_finite() && self.groups[g as usize].is_none() {
                            reads[q as usize] = true;
                        }
                    }
                }
                reads
            }
        };
        let prompts = &stats.prompts;
        for (q, &c) in prompts.count.iter().enumerate() {
            if c >= 2 || !reads[q] {
                continue;
            }
            if c == prompts.total[q] {
                // Nothing missing: the prompt simply has one completion.
                return Err(Error::TooFewCompletions {
                    prompt: stats.prompt_labels[q] as usize,
                    count: c,
                    estimator: self.cfg.estimator.name(),
                });
            }
            self.degenerate[q] = true;
            self.num_degenerate += 1;
        }
        Ok(())
    }

    /// Prompts left without contrast by missing rewards.
    pub(crate) fn num_degenerate(&self) -> usize {
        self.num_degenerate
    }

    /// The group's P-GRPO normaliser when it is the group's history (for the diagnostics).
    pub(crate) fn history_scale(&self, group: usize) -> Option<Scale> {
        self.groups[group]
            .filter(|s| s.from_history)
            .map(|s| s.scale)
    }

    /// `(N,)` every row's advantage (0 for a missing reward), and each group's sum of them
    /// over its usable rows. Rows are independent: they are split over the cores in chunks of
    /// `task_rows`, each chunk also summing its advantages per group (partial sums added in
    /// chunk order: deterministic).
    pub(crate) fn advantages(
        &self,
        batch: &RolloutRewards<'_>,
        prompt_of_row: &[u32],
        task_rows: usize,
    ) -> (Vec<f32>, Vec<f64>) {
        use rayon::prelude::*;
        let k = batch.group_keys.len();
        let estimator = self.cfg.estimator;
        let mut values = vec![0f32; batch.rewards.len()];
        let parts: Vec<Vec<f64>> = values
            .par_chunks_mut(task_rows)
            .enumerate()
            .map(|(c, out)| {
                let mut sums = vec![0f64; k];
                let start = c * task_rows;
                for (j, v) in out.iter_mut().enumerate() {
                    let i = start + j;
                    let r = batch.rewards[i];
                    if !r.is_finite() {
                        continue;
                    }
                    let row = Row {
                        reward: r as f64,
                        prompt: prompt_of_row[i] as usize,
                        group: batch.group_ids[i] as usize,
                        ctx: self,
                    };
                    *v = finite_f32(estimator.advantage(&row));
                    sums[row.group] += *v as f64;
                }
                sums
            })
            .collect();
        let mut sums = vec![0f64; k];
        for p in parts {
            sums.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        (values, sums)
    }
}

/// Each group's P-GRPO normaliser ([`p_grpo_scale`]); `None` for a group without usable rows
/// in the batch.
fn group_scales(
    cfg: &AdvantageConfig,
    keys: &[GroupKey],
    history: &RewardHistory,
    deltas: &[GroupDelta],
) -> Vec<Option<GroupScale>> {
    keys.iter()
        .zip(deltas)
        .map(|(key, delta)| {
            if delta.count == 0 {
                return None;
            }
            let hist = history.moments(key).unwrap_or_default();
            p_grpo_scale(cfg, hist, || history.moments_with(key, delta))
        })
        .collect()
}

/// One row with a usable reward, as an estimator sees it. Statistics are read on demand, so
/// an estimator pays only for what it reads.
pub(crate) struct Row<'a> {
    /// `R_i`.
    pub reward: f64,
    prompt: usize,
    group: usize,
    ctx: &'a Context<'a>,
}

impl Row<'_> {
    /// The configuration (estimator options).
    #[inline]
    pub fn cfg(&self) -> &AdvantageConfig {
        self.ctx.cfg
    }

    /// `μ_q`, the mean of the prompt's usable rewards.
    #[inline]
    pub fn prompt_mean(&self) -> f64 {
        self.ctx.prompts.mean[self.prompt]
    }

    /// `n_q`, the prompt's usable rewards.
    #[inline]
    pub fn prompt_count(&self) -> usize {
        self.ctx.prompts.count[self.prompt]
    }

    /// `R_i − μ_q`, but exactly 0 when the prompt's rewards are all equal (not the rounding
    /// error of their `f64` mean) or it was left without contrast by missing rewards.
    #[inline]
    pub fn centred(&self) -> f64 {
        let q = self.prompt;
        if self.ctx.prompts.zero_spread[q] || self.ctx.degenerate[q] {
            0.0
        } else {
            self.reward - self.ctx.prompts.mean[q]
        }
    }

    /// The denominator of `σ_q`.
    #[inline]
    pub fn prompt_den(&self) -> f64 {
        let v = self
            .ctx
            .prompts
            .variance(self.prompt, self.ctx.cfg.variance);
        self.ctx.cfg.denominator(v.map(f64::sqrt))
    }

    /// `μ_B` and the denominator of `σ_B`.
    #[inline]
    pub fn batch(&self) -> Scale {
        self.ctx.batch
    }

    /// `μ_p` and the denominator of `σ_p`, the group's P-GRPO normaliser (`None`: cold, or an
    /// estimator that does not read it).
    #[inline]
    pub fn group(&self) -> Option<Scale> {
        self.ctx.groups[self.group].map(|s| s.scale)
    }

    /// The group's whole normaliser: [`group`](Self::group) with `σ_p` and `n_p`.
    #[inline]
    pub fn group_stats(&self) -> Option<GroupScale> {
        self.ctx.groups[self.group]
    }

    /// `σ_q²` under the configured variance, 0 when undefined.
    #[inline]
    pub fn prompt_var(&self) -> f64 {
        self.ctx
            .prompts
            .variance(self.prompt, self.ctx.cfg.variance)
            .unwrap_or(0.0)
    }
}

/// `num / den()`, but exactly 0 when `num` is 0: a reward equal to its baseline has no
/// advantage, even where the spread and `eps` are both 0 and the division would give NaN.
#[inline]
pub(crate) fn ratio(num: f64, den: impl FnOnce() -> f64) -> f64 {
    if num == 0.0 {
        0.0
    } else {
        num / den()
    }
}

/// An advantage as `f32`, always finite: with finite rewards `NaN` can only be `0/0` (a
/// zero numerator over a zero spread, possible with `eps = 0`), which is 0; values beyond
/// `f32`'s range (a huge reward over a tiny spread) saturate at `±f32::MAX`.
#[inline]
pub(crate) fn finite_f32(a: f64) -> f32 {
    if a.is_nan() {
        0.0
    } else {
        a.clamp(-(f32::MAX as f64), f32::MAX as f64) as f32
    }
}
