//! The clipped policy-gradient objective of PPO/GRPO over candle tensors (CPU or CUDA).
//!
//! A batch has `B` completions (rows) padded to `T` token positions (columns). Row `i` has
//! advantage `A_i` and `n_i = Σ_t m_it` completion tokens, where `m` is the `(B, T)` mask
//! (1 = completion token, 0 = padding); `N = Σ_i n_i`. Per token:
//!
//! ```text
//! ratio_it   = exp(logp_it − old_logp_it)                         RatioLevel::Token
//!            = exp(Σ_u m_iu (logp_iu − old_logp_iu) / max(n_i, 1))  RatioLevel::Sequence (GSPO)
//! clipped_it = clip(ratio_it, 1 − eps_low, 1 + eps_high)
//! surr1_it   = ratio_it · A_i
//! surr2_it   = clipped_it · A_i
//! surr_it    = min(surr1_it, surr2_it)
//!            = max(surr_it, c · A_i)            only if dual_clip = Some(c) and A_i < 0
//! d_it       = ref_logp_it − logp_it
//! kl_it      = −d_it  (k1)  |  d_it² / 2  (k2)  |  exp(d_it) − d_it − 1  (k3)
//! loss_it    = −surr_it + beta · kl_it
//! ```
//!
//! The `(B, T)` per-token loss is reduced to the scalar loss (to **minimise**) by
//! [`LossAggregation`]:
//!
//! | aggregation | loss | source |
//! |---|---|---|
//! | `Grpo` | `1/B Σ_i (Σ_t m_it loss_it) / max(n_i, 1)` | DeepSeekMath (Shao et al. 2024) |
//! | `Bnpo` (`"dapo"`) | `Σ_it m_it loss_it / N` | DAPO (Yu et al. 2025) |
//! | `DrGrpo` | `Σ_it m_it loss_it / (B · L)`, `L = max_completion_len` or `T` | Dr. GRPO (Liu et al. 2025) |
//!
//! With `eps_high > eps_low` the clip is DAPO's "clip-higher"; `dual_clip` is dual-clip PPO
//! (Ye et al. 2020); the KL estimators are Schulman's k1/k2/k3 ("Approximating KL
//! Divergence", 2020), k3 being the one DeepSeekMath uses. [`ObjectiveMetrics`] reports the
//! same diagnostics as TRL's `GRPOTrainer`.
//!
//! # Choices and deviations
//! - **Padding never leaks.** The log-ratios `logp − old_logp` and `ref_logp − logp` are set to
//!   0 where `m = 0` *before* `exp`, so padding may hold any value (−∞, NaN, 1e9) without turning
//!   the loss or the gradient into NaN (multiplying by the mask afterwards, as TRL does, gives
//!   `0 · ∞ = NaN`).
//! - **Rows without tokens** are safe: every per-row denominator is `max(n_i, 1)` (as TRL); such a
//!   row still counts in the `B` of `Grpo` and `DrGrpo` and adds 0 to the loss. A batch whose
//!   mask is all zeros is an error ([`Error::Empty`]`("mask")`).
//! - **Clip bounds are inclusive**: the clipped ratio passes the gradient on the closed interval
//!   `[1 − eps_low, 1 + eps_high]`, as `torch.clamp` does. (candle's `clamp` is
//!   `maximum` then `minimum`, whose backward halves the gradient on a tie, which would change
//!   the on-policy gradient at `ratio = 1` when an epsilon is 0.) Ties between `surr1` and `surr2`
//!   split the gradient evenly, as in PyTorch, so the sum is the full gradient.
//! - `old_logp`, `ref_logp`, `mask` and `advantages` are **detached** here: gradients flow only
//!   into `logp`, even when `old_logp` is `logp` itself (the first of `num_iterations` steps).
//!   All inputs are converted to `logp`'s dtype.
//! - `k3` (and `approx_kl`, which is k3 of the token log-ratio) switch to their Taylor series
//!   for `|d| < 0.1`: `exp(d) − d − 1` cancels in f32 and turns negative (`−6e-8`) for tiny `d`.
//! - `approx_kl` always uses the **token** ratio, also with [`RatioLevel::Sequence`]; the clip
//!   fractions use the ratio that was clipped.
//! - `Bnpo` normalises by the tokens of the tensors passed in. TRL's `"dapo"` normalises by the
//!   tokens of the whole accumulated (and all-reduced) batch; with gradient accumulation scale
//!   each micro-batch's loss by its share of tokens to get the same.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{bail_config, Error, Result};
use crate::names::named_enum;

/// How the `(B, T)` per-token loss is reduced to a scalar. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Masked token mean per sequence, then mean over the `B` sequences (DeepSeekMath's GRPO).
    /// Long completions get a smaller per-token weight. Default.
    #[default]
    Grpo,
    /// Sum over all tokens of the batch divided by their number `N` (DAPO's token-level loss;
    /// TRL's `"bnpo"`/`"dapo"`). Every token weighs the same.
    #[serde(alias = "dapo")]
    Bnpo,
    /// Sum over all tokens divided by `B · max_completion_len` (Dr. GRPO): a constant
    /// normaliser, so neither length nor batch composition changes a token's weight.
    DrGrpo,
}

/// Where the importance ratio is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    /// One ratio per token, `exp(logp_t − old_logp_t)` (PPO, GRPO). Default.
    #[default]
    Token,
    /// One ratio per sequence, `exp` of the masked mean token log-ratio, shared by the row's
    /// tokens (GSPO, Zheng et al. 2025). GSPO clips far tighter than PPO (its paper uses
    /// `eps_low = 3e-4`, `eps_high = 4e-4`).
    Sequence,
}

/// Which per-token estimator of `KL(π_θ ‖ π_ref)` is used, with `d = ref_logp − logp` and tokens
/// sampled from the policy (Schulman, "Approximating KL Divergence", 2020).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `k1 = −d = log(π_θ/π_ref)`: unbiased, high variance, can be negative per token.
    K1,
    /// `k2 = d²/2`: biased, low variance, `≥ 0`.
    K2,
    /// `k3 = exp(d) − d − 1`: unbiased, low variance, `≥ 0` (DeepSeekMath, TRL). Default.
    #[default]
    K3,
}

named_enum!(LossAggregation, "aggregation",
    [Grpo => "grpo", Bnpo => "bnpo", DrGrpo => "dr_grpo"], alias "dapo" => Bnpo);
named_enum!(RatioLevel, "ratio_level", [Token => "token", Sequence => "sequence"]);
named_enum!(KlEstimator, "kl_estimator", [K1 => "k1", K2 => "k2", K3 => "k3"]);

impl KlEstimator {
    /// The per-token estimate, elementwise, from `d = ref_logp − logp` (any shape).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use pgrpo::objective::KlEstimator;
    /// let d = Tensor::new(&[0.0f32, 1.0], &Device::Cpu)?;
    /// let k3 = KlEstimator::K3.per_token(&d)?.to_vec1::<f32>()?;
    /// assert_eq!(k3[0], 0.0);
    /// assert!((k3[1] - 0.7183).abs() < 1e-4); // e − 2
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    pub fn per_token(self, d: &Tensor) -> Result<Tensor> {
        Ok(match self {
            KlEstimator::K1 => d.neg()?,
            KlEstimator::K2 => (d.sqr()? * 0.5)?,
            KlEstimator::K3 => exp_minus_one_minus(d)?,
        })
    }
}

/// `exp(x) − x − 1`, accurate and `≥ 0` in low precision.
///
/// For small `|x|` the direct formula cancels: in f32 it returns values like `−6e-8` at
/// `x ≈ 3e-8` and is off by ~10% at `|x| ≈ 1e-3`, which is where a policy close to its
/// reference lives. Below `|x| < 0.1` the Taylor series
/// `x²/2 · (1 + x/3 · (1 + x/4 · (1 + x/5 · (1 + x/6))))` is used instead (truncation error
/// below 1e-8 relative); both branches are differentiable.
fn exp_minus_one_minus(x: &Tensor) -> Result<Tensor> {
    let direct = ((x.exp()? - x)? - 1.0)?;
    let mut series = ((x / 6.0)? + 1.0)?;
    for k in [5.0, 4.0, 3.0] {
        series = ((x / k)?.mul(&series)? + 1.0)?;
    }
    let series = (x.sqr()? * 0.5)?.mul(&series)?;
    let small = x.detach().abs()?.lt(0.1)?;
    Ok(small.where_cond(&series, &direct)?)
}

/// Hyper-parameters of [`clipped_objective`]. Fields are public; build with
/// `ObjectiveConfig { eps_high: 0.28, ..Default::default() }` and check with
/// [`validate`](Self::validate).
///
/// ```
/// use pgrpo::{LossAggregation, ObjectiveConfig};
/// // DAPO: clip-higher and token-level aggregation, no KL term.
/// let cfg = ObjectiveConfig {
///     eps_high: 0.28,
///     aggregation: LossAggregation::Bnpo,
///     ..Default::default()
/// };
/// cfg.validate()?;
/// assert!(!cfg.needs_reference());
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectiveConfig {
    /// Lower clip range: ratios below `1 − eps_low` stop pushing a negative advantage.
    /// Must be in `[0, 1)`. Default `0.2` (PPO, Schulman et al. 2017; DeepSeekMath).
    pub eps_low: f32,
    /// Upper clip range: ratios above `1 + eps_high` stop pushing a positive advantage. Must be
    /// `≥ 0`. Default `0.2`; DAPO's clip-higher (Yu et al. 2025) uses `0.28 > eps_low` so that
    /// unlikely tokens can gain probability, which keeps entropy from collapsing.
    pub eps_high: f32,
    /// Dual-clip constant `c > 1` (Ye et al. 2020, "Mastering Complex Control in MOBA Games
    /// with Deep Reinforcement Learning"): for `A < 0` the surrogate is bounded below by
    /// `c · A`, so a huge ratio on a bad token cannot produce an unbounded loss. The paper uses
    /// `c = 3`. Default `None` (off, as in GRPO).
    pub dual_clip: Option<f32>,
    /// Token-level (PPO/GRPO) or sequence-level (GSPO, Zheng et al. 2025) importance ratio.
    /// Default [`RatioLevel::Token`].
    pub ratio_level: RatioLevel,
    /// How per-token losses are reduced. Default [`LossAggregation::Grpo`] (DeepSeekMath).
    pub aggregation: LossAggregation,
    /// Weight of the per-token KL penalty to the reference policy. Must be finite and `≥ 0`.
    /// Default `0.0` (TRL's default, following Dr. GRPO and DAPO, which drop the KL term);
    /// DeepSeekMath used `0.04`. With `0` no reference log-probs are needed.
    pub beta: f32,
    /// The KL estimator used in the penalty and the `kl` metric. Default [`KlEstimator::K3`]
    /// (DeepSeekMath).
    pub kl_estimator: KlEstimator,
    /// The constant `L` of [`LossAggregation::DrGrpo`]: the generation budget. `None` (default)
    /// uses `T`, the mask's width. When set it must be `> 0` and `≥ T`; a fixed value keeps
    /// the loss scale independent of how much a batch happens to be padded (Dr. GRPO; TRL's
    /// `max_completion_length`).
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
    /// Checks every field (the check against `T` happens in [`clipped_objective`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.eps_low) {
            bail_config!("eps_low", "must be in [0, 1), got {}", self.eps_low);
        }
        if !(self.eps_high.is_finite() && self.eps_high >= 0.0) {
            bail_config!("eps_high", "must be finite and >= 0, got {}", self.eps_high);
        }
        if let Some(c) = self.dual_clip {
            if !(c.is_finite() && c > 1.0) {
                bail_config!("dual_clip", "must be finite and > 1, got {c}");
            }
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail_config!("beta", "must be finite and >= 0, got {}", self.beta);
        }
        if self.max_completion_len == Some(0) {
            bail_config!("max_completion_len", "must be > 0, got 0");
        }
        Ok(())
    }

    /// Whether [`ObjectiveInputs::ref_logp`] is required (`beta > 0`), i.e. whether the
    /// trainer must run the reference policy.
    pub fn needs_reference(&self) -> bool {
        self.beta > 0.0
    }
}

/// The tensors of one (micro-)batch, borrowed. `(B, T)` tensors share one shape.
#[derive(Debug, Clone, Copy)]
pub struct ObjectiveInputs<'a> {
    /// `(B, T)` log-probs of the sampled tokens under the current policy; the only input
    /// gradients flow into. Its dtype (normally `f32`) is the dtype of the computation.
    pub logp: &'a Tensor,
    /// `(B, T)` log-probs under the policy that sampled the batch (detached here).
    pub old_logp: &'a Tensor,
    /// `(B, T)` log-probs under the reference policy (detached here). Required iff `beta > 0`;
    /// when given with `beta = 0` it only feeds the `kl` metric.
    pub ref_logp: Option<&'a Tensor>,
    /// `(B, T)`, 1 for completion tokens and 0 for padding (any dtype; other non-negative
    /// values act as token weights).
    pub mask: &'a Tensor,
    /// `(B,)` one advantage per completion, broadcast to its tokens.
    pub advantages: &'a Tensor,
}

/// Diagnostics of one call, as plain numbers. All "fractions" and means are over completion
/// tokens (`Σ m · x / N`), like TRL's `masked_batch_mean`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ObjectiveMetrics {
    /// The aggregated clipped-surrogate part of the loss, `aggregate(−surr)`, without the KL
    /// term (equals the loss when `beta = 0`).
    pub policy_loss: f64,
    /// Masked token mean of the chosen KL estimator between policy and reference; 0 when no
    /// `ref_logp` was given.
    pub kl: f64,
    /// Masked token mean of k3 between the sampling and the current policy,
    /// `(r − 1) − log r` with the token ratio `r = exp(logp − old_logp)`.
    pub approx_kl: f64,
    /// Fraction of tokens with `ratio < 1 − eps_low` and `A < 0` (TRL `clip_ratio/low_mean`).
    pub clip_ratio_low: f64,
    /// Fraction of tokens with `ratio > 1 + eps_high` and `A > 0` (TRL `clip_ratio/high_mean`).
    pub clip_ratio_high: f64,
    /// Fraction of tokens clipped either way (TRL `clip_ratio/region_mean`).
    pub clip_ratio_region: f64,
    /// `N`, the number of completion tokens (the mask's sum).
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

impl LossAggregation {
    /// What the aggregation divides the summed loss by, for a batch of `rows` rows (`B`)
    /// padded to `width` columns (`T`) holding `tokens` completion tokens (`N`): `B` for
    /// `Grpo` (which sums the rows' token means), `max(N, 1)` for `Bnpo`, `B · L` for
    /// `DrGrpo` with `L = max_len` or `T`. The one place these denominators are defined:
    /// [`clipped_objective`] divides by them, and a data-parallel step weights each rank's
    /// loss by its denominator over the whole batch's.
    ///
    /// ```
    /// use pgrpo::LossAggregation;
    /// assert_eq!(LossAggregation::Grpo.denominator(4, 10.0, 6, None), 4.0);
    /// assert_eq!(LossAggregation::Bnpo.denominator(4, 10.0, 6, None), 10.0);
    /// assert_eq!(LossAggregation::Bnpo.denominator(4, 0.0, 6, None), 1.0);
    /// assert_eq!(LossAggregation::DrGrpo.denominator(4, 10.0, 6, None), 24.0);
    /// assert_eq!(LossAggregation::DrGrpo.denominator(4, 10.0, 6, Some(8)), 32.0);
    /// ```
    pub fn denominator(
        self,
        rows: usize,
        tokens: f64,
        width: usize,
        max_len: Option<usize>,
    ) -> f64 {
        self.shape_denominator(rows, width, max_len)
            .unwrap_or(tokens.max(1.0))
    }

    /// The denominator when the batch's shape fixes it (`B`, `B · L`); `None` for `Bnpo`,
    /// whose `max(N, 1)` depends on the mask (the objective keeps it on the device).
    fn shape_denominator(self, rows: usize, width: usize, max_len: Option<usize>) -> Option<f64> {
        match self {
            LossAggregation::Grpo => Some(rows as f64),
            LossAggregation::Bnpo => None,
            LossAggregation::DrGrpo => Some(rows as f64 * max_len.unwrap_or(width) as f64),
        }
    }
}

/// The loss and its diagnostics.
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    /// Scalar (rank 0) loss to **minimise**, differentiable w.r.t. `logp`.
    pub loss: Tensor,
    /// Diagnostics (computed from detached tensors).
    pub metrics: ObjectiveMetrics,
}

/// The clipped surrogate loss of PPO/GRPO (with the variants of [`ObjectiveConfig`]) and its
/// metrics. Formulas, aggregation table and edge-case choices are in the [module docs](self).
///
/// Shapes: `logp`, `old_logp`, `ref_logp`, `mask` `(B, T)`; `advantages` `(B,)`; the loss is a
/// rank-0 tensor in `logp`'s dtype on `logp`'s device. One device-to-host copy (the metrics).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use pgrpo::{clipped_objective, ObjectiveConfig, ObjectiveInputs};
/// let dev = Device::Cpu;
/// // One completion of two tokens, advantage 1; the second token's ratio is 1.5.
/// let logp = Tensor::new(&[[-1.0f32, -1.0 + 1.5f32.ln()]], &dev)?;
/// let old_logp = Tensor::new(&[[-1.0f32, -1.0]], &dev)?;
/// let mask = Tensor::new(&[[1.0f32, 1.0]], &dev)?;
/// let advantages = Tensor::new(&[1.0f32], &dev)?;
/// let inputs = ObjectiveInputs {
///     logp: &logp,
///     old_logp: &old_logp,
///     ref_logp: None,
///     mask: &mask,
///     advantages: &advantages,
/// };
/// let out = clipped_objective(&ObjectiveConfig::default(), &inputs)?;
/// // surrogates 1·1 and clip(1.5, 0.8, 1.2)·1 = 1.2; loss = −(1 + 1.2)/2
/// assert!((out.loss.to_scalar::<f32>()? + 1.1).abs() < 1e-6);
/// assert_eq!(out.metrics.clip_ratio_high, 0.5);
/// # Ok::<(), pgrpo::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad config, for `max_completion_len < T`, and when
/// `beta > 0` but `ref_logp` is `None` (field `beta`); [`Error::ShapeMismatch`] naming the
/// tensor; [`Error::Empty`]`("mask")` when there is no completion token; [`Error::Candle`] for
/// device mismatches and for a `logp` that is not a float tensor.
pub fn clipped_objective(
    cfg: &ObjectiveConfig,
    inputs: &ObjectiveInputs<'_>,
) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let (b, t) = check_shapes(inputs)?;
    if b == 0 || t == 0 {
        return Err(Error::Empty("mask"));
    }
    let max_len = match cfg.max_completion_len {
        None => t,
        Some(l) if l >= t => l,
        Some(l) => bail_config!(
            "max_completion_len",
            "must be >= T = {t} (the mask's width), got {l}"
        ),
    };
    if cfg.needs_reference() && inputs.ref_logp.is_none() {
        bail_config!(
            "beta",
            "is {} > 0, which needs `ref_logp`; pass the reference log-probs or set beta = 0",
            cfg.beta
        );
    }

    let logp = inputs.logp;
    let dtype = logp.dtype();
    if !dtype.is_float() {
        // candle panics (todo!) on `exp` of an integer tensor: refuse it here.
        return Err(candle_core::Error::UnsupportedDTypeForOp(dtype, "clipped_objective").into());
    }
    let constant = |x: &Tensor| x.detach().to_dtype(dtype);
    let old_logp = constant(inputs.old_logp)?;
    let mask = constant(inputs.mask)?;
    let adv = constant(inputs.advantages)?
        .unsqueeze(1)?
        .broadcast_as((b, t))?;
    let is_token = mask.ne(0.0)?;
    let zeros = Tensor::zeros((), dtype, logp.device())?.broadcast_as((b, t))?;
    let norm = Normalizers::new(&mask, cfg.aggregation, b, t, Some(max_len))?;

    // Importance ratio (token log-ratio zeroed on padding, so padding values never matter).
    let log_ratio_tok = is_token.where_cond(&logp.sub(&old_logp)?, &zeros)?;
    let log_ratio = match cfg.ratio_level {
        RatioLevel::Token => log_ratio_tok.clone(),
        RatioLevel::Sequence => log_ratio_tok
            .mul(&mask)?
            .sum(1)?
            .div(&norm.row)?
            .unsqueeze(1)?
            .broadcast_as((b, t))?,
    };
    let (lo, hi) = (1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);

    // The clipped surrogate, line for line.
    let ratio = log_ratio.exp()?;
    let clipped_ratio = clip(&ratio, lo, hi)?;
    let surr1 = ratio.mul(&adv)?;
    let surr2 = clipped_ratio.mul(&adv)?;
    let mut surrogate = surr1.minimum(&surr2)?;
    if let Some(c) = cfg.dual_clip {
        let floor = (&adv * c as f64)?;
        surrogate = adv
            .lt(0.0)?
            .where_cond(&surrogate.maximum(&floor)?, &surrogate)?;
    }

    // KL to the reference policy (also computed for the metric when beta = 0).
    let kl = match inputs.ref_logp {
        Some(ref_logp) => {
            let d = is_token.where_cond(&constant(ref_logp)?.sub(logp)?, &zeros)?;
            Some(cfg.kl_estimator.per_token(&d)?)
        }
        None => None,
    };

    let per_token_loss = match &kl {
        Some(kl) if cfg.beta > 0.0 => (surrogate.neg()? + (kl * cfg.beta as f64)?)?,
        _ => surrogate.neg()?,
    };
    let loss = norm.aggregate(&per_token_loss)?;

    // Metrics, from detached tensors, in one device-to-host copy.
    let ratio = ratio.detach();
    let log_ratio_tok = log_ratio_tok.detach();
    let indicator = |x: Tensor| x.to_dtype(dtype);
    let low = indicator(ratio.lt(lo)?.mul(&adv.lt(0.0)?)?)?;
    let high = indicator(ratio.gt(hi)?.mul(&adv.gt(0.0)?)?)?;
    // low and high are disjoint (A < 0 against A > 0), so their sum is "either".
    let region = (&low + &high)?;
    // (r − 1) − log r = exp(x) − x − 1 with x = log r: the k3 form, computed stably.
    let approx_kl = exp_minus_one_minus(&log_ratio_tok)?;
    let kl_mean = match &kl {
        Some(kl) => norm.token_mean(&kl.detach())?,
        None => Tensor::zeros((), dtype, logp.device())?,
    };
    let values = Tensor::stack(
        &[
            norm.aggregate(&surrogate.detach().neg()?)?,
            kl_mean,
            norm.token_mean(&approx_kl)?,
            norm.token_mean(&low)?,
            norm.token_mean(&high)?,
            norm.token_mean(&region)?,
            norm.tokens.clone(),
        ],
        0,
    )?
    .to_dtype(DType::F64)?
    .to_vec1::<f64>()?;
    let [policy_loss, kl, approx_kl, low, high, region, num_tokens] = values[..] else {
        unreachable!("seven metrics were stacked")
    };
    if num_tokens <= 0.0 {
        return Err(Error::Empty("mask"));
    }
    Ok(ObjectiveOutput {
        loss,
        metrics: ObjectiveMetrics::from_values(
            [policy_loss, kl, approx_kl, low, high, region],
            num_tokens,
        ),
    })
}

/// The mask and the denominators of the loss aggregation and of the token means.
struct Normalizers {
    /// `(B, T)` mask in the computation dtype.
    mask: Tensor,
    /// `(B,)` `max(n_i, 1)`.
    row: Tensor,
    /// Scalar `N`.
    tokens: Tensor,
    /// Scalar `max(N, 1)`: the token means' denominator, and `Bnpo`'s (the floor of
    /// [`LossAggregation::denominator`], kept on the device).
    tokens_den: Tensor,
    aggregation: LossAggregation,
    /// The aggregation's denominator when the shape fixes it (`B`, `B · L`).
    shape_den: Option<f64>,
}

impl Normalizers {
    fn new(
        mask: &Tensor,
        aggregation: LossAggregation,
        b: usize,
        t: usize,
        max_len: Option<usize>,
    ) -> Result<Self> {
        let tokens = mask.sum_all()?;
        Ok(Self {
            mask: mask.clone(),
            row: mask.sum(1)?.maximum(1.0)?,
            tokens_den: tokens.maximum(1.0)?,
            tokens,
            aggregation,
            shape_den: aggregation.shape_denominator(b, t, max_len),
        })
    }

    /// `Σ m · x / max(N, 1)`.
    fn token_mean(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.mul(&self.mask)?.sum_all()?.div(&self.tokens_den)?)
    }

    /// The scalar loss from a `(B, T)` per-token loss: the sum of the rows' token means
    /// (`Grpo`) or of all tokens, over the aggregation's denominator.
    fn aggregate(&self, per_token: &Tensor) -> Result<Tensor> {
        let masked = per_token.mul(&self.mask)?;
        let sum = match self.aggregation {
            LossAggregation::Grpo => masked.sum(1)?.div(&self.row)?.sum(0)?,
            LossAggregation::Bnpo | LossAggregation::DrGrpo => masked.sum_all()?,
        };
        // `x * (1/d)` is candle's `mean` (and `x / d`) to the bit: one `affine(1/d, 0)`.
        Ok(match self.shape_den {
            Some(d) => (sum * (1.0 / d))?,
            None => sum.div(&self.tokens_den)?,
        })
    }
}

/// `clamp(x, lo, hi)` whose gradient is 1 on the closed interval `[lo, hi]` and 0 outside, like
/// `torch.clamp` (candle's `clamp` halves the gradient when `x` equals a bound).
fn clip(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let bound = |v: f64| -> Result<Tensor> {
        Ok(Tensor::new(v, x.device())?
            .to_dtype(x.dtype())?
            .broadcast_as(x.shape())?)
    };
    let x = x.lt(lo)?.where_cond(&bound(lo)?, x)?;
    Ok(x.gt(hi)?.where_cond(&bound(hi)?, &x)?)
}

/// Checks every shape against `logp`'s `(B, T)` and returns it.
fn check_shapes(x: &ObjectiveInputs<'_>) -> Result<(usize, usize)> {
    let mismatch = |what, expected: Vec<usize>, got: &Tensor| Error::ShapeMismatch {
        what,
        expected,
        got: got.dims().to_vec(),
    };
    let (b, t) = match *x.logp.dims() {
        [b, t] => (b, t),
        ref dims => {
            // Best guess at what was meant: the mask's shape, else (B from advantages, last dim).
            let expected = match *x.mask.dims() {
                [b, t] => vec![b, t],
                _ => vec![x.advantages.elem_count(), dims.last().copied().unwrap_or(0)],
            };
            return Err(mismatch("logp", expected, x.logp));
        }
    };
    let mut others = vec![("old_logp", x.old_logp), ("mask", x.mask)];
    if let Some(r) = x.ref_logp {
        others.push(("ref_logp", r));
    }
    for (what, tensor) in others {
        if tensor.dims() != [b, t] {
            return Err(mismatch(what, vec![b, t], tensor));
        }
    }
    if x.advantages.dims() != [b] {
        return Err(mismatch("advantages", vec![b], x.advantages));
    }
    Ok((b, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn field_of(r: Result<()>) -> &'static str {
        match r {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn default_config_is_valid_and_documented_values() {
        let c = ObjectiveConfig::default();
        c.validate().unwrap();
        assert_eq!((c.eps_low, c.eps_high, c.beta), (0.2, 0.2, 0.0));
        assert_eq!(c.dual_clip, None);
        assert_eq!(c.ratio_level, RatioLevel::Token);
        assert_eq!(c.aggregation, LossAggregation::Grpo);
        assert_eq!(c.kl_estimator, KlEstimator::K3);
        assert_eq!(c.max_completion_len, None);
        assert!(!c.needs_reference());
    }

    #[test]
    fn validate_names_the_bad_field() {
        let d = ObjectiveConfig::default();
        let bad = [
            (ObjectiveConfig { eps_low: -0.1, ..d }, "eps_low"),
            (ObjectiveConfig { eps_low: 1.0, ..d }, "eps_low"),
            (
                ObjectiveConfig {
                    eps_low: f32::NAN,
                    ..d
                },
                "eps_low",
            ),
            (
                ObjectiveConfig {
                    eps_high: -0.1,
                    ..d
                },
                "eps_high",
            ),
            (
                ObjectiveConfig {
                    eps_high: f32::INFINITY,
                    ..d
                },
                "eps_high",
            ),
            (
                ObjectiveConfig {
                    dual_clip: Some(1.0),
                    ..d
                },
                "dual_clip",
            ),
            (
                ObjectiveConfig {
                    dual_clip: Some(0.5),
                    ..d
                },
                "dual_clip",
            ),
            (
                ObjectiveConfig {
                    dual_clip: Some(f32::NAN),
                    ..d
                },
                "dual_clip",
            ),
            (ObjectiveConfig { beta: -1e-3, ..d }, "beta"),
            (
                ObjectiveConfig {
                    beta: f32::NAN,
                    ..d
                },
                "beta",
            ),
            (
                ObjectiveConfig {
                    beta: f32::INFINITY,
                    ..d
                },
                "beta",
            ),
            (
                ObjectiveConfig {
                    max_completion_len: Some(0),
                    ..d
                },
                "max_completion_len",
            ),
        ];
        for (cfg, field) in bad {
            assert_eq!(field_of(cfg.validate()), field, "{cfg:?}");
        }
        let good = [
            ObjectiveConfig {
                eps_low: 0.0,
                eps_high: 0.0,
                ..d
            },
            ObjectiveConfig {
                eps_high: 10.0,
                ..d
            },
            ObjectiveConfig {
                dual_clip: Some(1.001),
                ..d
            },
            ObjectiveConfig { beta: 0.04, ..d },
            ObjectiveConfig {
                max_completion_len: Some(1),
                ..d
            },
        ];
        for cfg in good {
            cfg.validate().unwrap();
        }
    }

    #[test]
    fn names_parse_back_and_dapo_is_bnpo() {
        for a in LossAggregation::ALL {
            assert_eq!(a.name().parse::<LossAggregation>().unwrap(), a);
        }
        for r in RatioLevel::ALL {
            assert_eq!(r.name().parse::<RatioLevel>().unwrap(), r);
        }
        for k in KlEstimator::ALL {
            assert_eq!(k.name().parse::<KlEstimator>().unwrap(), k);
        }
        assert_eq!(
            "dapo".parse::<LossAggregation>().unwrap(),
            LossAggregation::Bnpo
        );
        assert_eq!(
            "dr-grpo".parse::<LossAggregation>().unwrap(),
            LossAggregation::DrGrpo
        );
        match "ppo".parse::<LossAggregation>() {
            Err(Error::InvalidConfig { field, reason }) => {
                assert_eq!(field, "aggregation");
                assert!(reason.contains("grpo, bnpo, dr_grpo"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clip_passes_the_gradient_on_the_closed_interval() -> Result<()> {
        // Points: below, on the lower bound, inside, on the upper bound, above.
        let x = Var::new(&[0.5f32, 0.8, 1.0, 1.2, 1.5], &Device::Cpu)?;
        let y = clip(&x, 0.8, 1.2)?;
        assert_eq!(y.to_vec1::<f32>()?, [0.8, 0.8, 1.0, 1.2, 1.2]);
        let g = y.sum_all()?.backward()?;
        let g = g.get(&x).expect("x has a gradient").to_vec1::<f32>()?;
        assert_eq!(g, [0.0, 1.0, 1.0, 1.0, 0.0]);
        // A degenerate interval (eps = 0) still passes the gradient at the bound.
        let x = Var::new(&[1.0f32], &Device::Cpu)?;
        let g = clip(&x, 1.0, 1.0)?.sum_all()?.backward()?;
        assert_eq!(g.get(&x).expect("grad").to_vec1::<f32>()?, [1.0]);
        Ok(())
    }

    #[test]
    fn config_serde_uses_snake_case_and_defaults() {
        let cfg: ObjectiveConfig = serde_json::from_str(
            r#"{"aggregation":"dapo","ratio_level":"sequence","kl_estimator":"k2","dual_clip":3.0}"#,
        )
        .unwrap();
        assert_eq!(cfg.aggregation, LossAggregation::Bnpo);
        assert_eq!(cfg.ratio_level, RatioLevel::Sequence);
        assert_eq!(cfg.kl_estimator, KlEstimator::K2);
        assert_eq!(cfg.dual_clip, Some(3.0));
        assert_eq!(cfg.eps_low, 0.2);
        let json = serde_json::to_string(&ObjectiveConfig::default()).unwrap();
        assert!(json.contains(r#""aggregation":"grpo""#), "{json}");
        let back: ObjectiveConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ObjectiveConfig::default());
        assert!(serde_json::from_str::<ObjectiveConfig>(r#"{"epsilon":0.1}"#).is_err());
    }
}
