//! The policy-gradient objective of PPO/GRPO and its successors over candle tensors (CPU or
//! CUDA): PPO's clipped surrogate, CISPO and SAPO, three aggregations, a KL penalty, an
//! entropy bonus and a high-entropy token mask.
//!
//! A batch has `B` completions (rows) padded to `T` token positions (columns). Row `i` has
//! advantage `A_i` and `n_i = Σ_t m_it` completion tokens, where `m` is the `(B, T)` mask
//! (1 = completion token, 0 = padding); `N = Σ_i n_i`. Rows that an
//! [`ObjectiveInputs::row_mask`] drops leave the batch entirely (see below), so `B` counts the
//! rows that take part. Per token:
//!
//! ```text
//! ratio_it   = exp(logp_it − old_logp_it)                           RatioLevel::Token
//!            = exp(Σ_u m_iu (logp_iu − old_logp_iu) / max(n_i, 1))    RatioLevel::Sequence (GSPO)
//! ```
//!
//! The per-token surrogate `surr_it` (to maximise) is one of three [`Surrogate`]s:
//!
//! ```text
//! Clip  (PPO, Schulman et al. 2017; GRPO, DAPO, Dr. GRPO, GSPO)
//! clipped_it = clip(ratio_it, 1 − eps_low, 1 + eps_high)
//! surr1_it   = ratio_it · A_i
//! surr2_it   = clipped_it · A_i
//! surr_it    = min(surr1_it, surr2_it)
//!            = max(surr_it, c · A_i)            only if dual_clip = Some(c) and A_i < 0
//!
//! Cispo (MiniMax-M1, arXiv:2506.13585)
//! w_it       = sg(min(ratio_it, 1 + eps_high))  sg = stop-gradient (detach)
//! surr_it    = w_it · A_i · logp_it             gradient w_it · A_i: no token is dropped
//!
//! Sapo  (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv:2511.20347)
//! tau_i      = sapo_temperature_pos if A_i > 0, else sapo_temperature_neg
//! gate_it    = σ(tau_i · (ratio_it − 1)) · 4 / tau_i
//! surr_it    = gate_it · A_i                    gradient 4σ(1 − σ) · ratio · A: 1·A on-policy
//! ```
//!
//! and the per-token loss adds the KL penalty, with the high-entropy mask `keep`:
//!
//! ```text
//! keep_it    = 1                                              top_entropy_quantile = 1
//!            = [H_it ≥ quantile({H_ju : m_ju ≠ 0}, 1 − ρ)]    top_entropy_quantile = ρ < 1
//! d_it       = ref_logp_it − logp_it
//! kl_it      = −d_it  (k1)  |  d_it² / 2  (k2)  |  exp(d_it) − d_it − 1  (k3)
//! loss_it    = −keep_it · surr_it + beta · kl_it
//! ```
//!
//! The `(B, T)` per-token loss is reduced to the scalar loss (to **minimise**) by
//! [`LossAggregation`], and the entropy bonus is subtracted:
//!
//! | aggregation | loss | source |
//! |---|---|---|
//! | `Grpo` | `1/B Σ_i (Σ_t m_it loss_it) / max(n_i, 1)` | DeepSeekMath (Shao et al. 2024) |
//! | `Bnpo` (`"dapo"`) | `Σ_it m_it loss_it / N` | DAPO (Yu et al. 2025) |
//! | `DrGrpo` | `Σ_it m_it loss_it / (B · L)`, `L = max_completion_len` or `T` | Dr. GRPO (Liu et al. 2025) |
//!
//! ```text
//! loss       = aggregate(loss_it) − entropy_coef · H̄
//! H̄          = Σ m·keep·H / max(N, 1)                 Bnpo
//!            = Σ m·keep·H / max(Σ m·keep, 1)          Grpo, DrGrpo
//! ```
//!
//! `H̄` is TRL's entropy bonus: the mean per-token entropy of the tokens trained on, not scaled
//! like the policy term, so that `entropy_coef` means the same under every aggregation (TRL
//! divides by the token count of the loss for `"dapo"` and `"cispo"`, by the kept tokens
//! otherwise; the two differ only when `top_entropy_quantile < 1`). The high-entropy mask is
//! "Beyond the 80/20 Rule" (Wang et al. 2025, arXiv:2506.01939) as TRL implements it: the
//! quantile (linear interpolation, as `torch.quantile`) is over the completion tokens of the
//! batch, masked tokens keep their KL term and their place in every denominator, and only
//! lose their surrogate.
//!
//! # Surrogates × aggregations
//!
//! Every combination is defined; the papers (and TRL's `loss_type`) use these:
//!
//! | surrogate | `grpo` | `bnpo` (`dapo`) | `dr_grpo` | `ratio_level = sequence` | `dual_clip` |
//! |---|---|---|---|---|---|
//! | `clip` | GRPO (`loss_type="grpo"`); GSPO | DAPO (`"dapo"`, `"bnpo"`) | Dr. GRPO (`"dr_grpo"`) | GSPO: one clipped ratio per row | yes |
//! | `cispo` | defined | MiniMax-M1 (`"cispo"`: `1/Σ_i n_i`) | defined | one weight per row | rejected |
//! | `sapo` | SAPO paper (`"sapo"`: `1/B Σ 1/n_i`) | defined | defined | one gate per row | rejected |
//!
//! `dual_clip` with `cispo` or `sapo` is rejected by [`ObjectiveConfig::validate`]
//! ([`Error::InvalidConfig`] naming `dual_clip`): it bounds PPO's `r·A` from below, while
//! CISPO's weight is already capped at `1 + eps_high` and SAPO's gate at `4/τ`. `eps_low`
//! is used by `clip` only, `eps_high` by `clip` and `cispo`, the temperatures by `sapo`.
//!
//! # Rows that leave the batch: `row_mask`
//!
//! A row with `row_mask[i] = false` (e.g. a prompt whose completions all got the same reward,
//! under the trainer's `mask_zero_std_prompts`) leaves the loss, the gradient, the metrics, `N`
//! **and `B`**: the result equals that of the batch without the row, for every aggregation.
//! Zeroing the row of `m` instead only removes its tokens: the row still counts in the `B` of
//! `Grpo` and `DrGrpo`, which scales every other row's gradient by `B_kept / B`.
//!
//! # Choices and deviations
//! - **Padding never leaks.** The log-ratios `logp − old_logp` and `ref_logp − logp`, and
//!   `logp` and `entropy` themselves where they enter the loss, are set to 0 where `m = 0`
//!   *before* use, so padding may hold any value (−∞, NaN, 1e9) without turning the loss or
//!   the gradient into NaN (multiplying by the mask afterwards, as TRL does, gives
//!   `0 · ∞ = NaN`).
//! - **Rows without tokens** are safe: every per-row denominator is `max(n_i, 1)` (as TRL); such a
//!   row still counts in the `B` of `Grpo` and `DrGrpo` (unless `row_mask` drops it) and adds 0
//!   to the loss. A batch whose mask (after `row_mask`) is all zeros is an error
//!   ([`Error::Empty`]`("mask")`).
//! - **The mask is checked**: a negative, NaN or infinite entry is [`Error::InvalidInput`]
//!   naming `mask` (other non-negative values are token weights). The check rides on the one
//!   device-to-host copy of the metrics, so it costs no extra synchronisation.
//! - **Clip bounds are inclusive**: the clipped ratio passes the gradient on the closed interval
//!   `[1 − eps_low, 1 + eps_high]`, as `torch.clamp` does. (candle's `clamp` is
//!   `maximum` then `minimum`, whose backward halves the gradient on a tie, which would change
//!   the on-policy gradient at `ratio = 1` when an epsilon is 0.) Ties between `surr1` and `surr2`
//!   split the gradient evenly, as in PyTorch, so the sum is the full gradient.
//! - **CISPO's lower bound.** MiniMax-M1 writes the weight as
//!   `clip(r, 1 − ε_low^IS, 1 + ε_high^IS)` but reports that it imposed no lower bound (it set
//!   `ε_low^IS` large) and tuned only `ε_high^IS`; TRL implements only the upper cap,
//!   `clamp(r, max=epsilon_high)`. pgrpo follows both: no lower bound, cap `1 + eps_high`
//!   (relative to 1 like every other `eps` here, so TRL's `epsilon_high = 5.0` is
//!   `eps_high = 4.0`; TRL's default `epsilon_high = epsilon = 0.2` would cap every weight at
//!   0.2). Like TRL, the loss value uses `logp` itself (`−w·A·logp`), so `policy_loss` is not
//!   comparable in scale with the clipped surrogate's.
//! - **Clip-ratio metrics**: for `cispo` `clip_ratio/high_mean` is TRL's `cispo_clip_ratio`
//!   (`r > 1 + eps_high` and `A > 0`) and the low one is 0; for `sapo`, which clips nothing,
//!   all three are 0. They stay over all completion tokens when `top_entropy_quantile < 1`.
//! - `old_logp`, `ref_logp`, `mask` and `advantages` are **detached** here: gradients flow only
//!   into `logp` (and into `entropy` for the bonus), even when `old_logp` is `logp` itself (the
//!   first of `num_iterations` steps). All inputs are converted to `logp`'s dtype.
//! - **The entropy bonus needs a differentiable entropy.** With `entropy_coef ≠ 0`, a `logp`
//!   that carries a gradient and an `entropy` that does not, the bonus would be a constant:
//!   that is [`Error::InvalidInput`] naming `entropy`, not a silent no-op. The high-entropy mask
//!   alone takes any entropy (it is detached here).
//! - **The high-entropy threshold costs one more device-to-host copy** (the entropies, sorted on
//!   the host) when `top_entropy_quantile < 1`; with `1` nothing is computed. A completion token
//!   with a NaN or infinite entropy is [`Error::InvalidInput`] naming `entropy`.
//! - `k3` (and `approx_kl`, which is k3 of the token log-ratio) switch to their Taylor series
//!   for `|d| < 0.1`: `exp(d) − d − 1` cancels in f32 and turns negative (`−6e-8`) for tiny `d`.
//! - `approx_kl` always uses the **token** ratio, also with [`RatioLevel::Sequence`]; the clip
//!   fractions use the ratio that was clipped.
//! - **Everything is over the tensors passed in.** `Bnpo` normalises by their tokens: TRL's
//!   `"dapo"` and `"cispo"` normalise by the tokens of the whole accumulated (and all-reduced)
//!   batch; with gradient accumulation scale each micro-batch's loss by its share of tokens to
//!   get the same. Likewise TRL gathers the entropies of every process before taking the
//!   high-entropy quantile; here it is the quantile of the tensors passed in (one rank's
//!   rows in a data-parallel run).

use candle_core::{DType, Tensor};

use crate::error::{bail_config, Error, Result};

mod aggregation;
mod config;
mod entropy;
mod kl;
mod metrics;
mod surrogate;

pub use aggregation::LossAggregation;
pub use config::{ObjectiveConfig, RatioLevel};
pub use kl::KlEstimator;
pub use metrics::ObjectiveMetrics;
pub use surrogate::Surrogate;

use aggregation::Normalizers;
use kl::exp_minus_one_minus;

/// The tensors of one (micro-)batch, borrowed. `(B, T)` tensors share one shape.
///
/// Build it with a struct literal or with [`new`](Self::new) and the `with_*` methods; each
/// optional input is one call:
///
/// ```
/// use candle_core::{Device, Tensor};
/// use pgrpo::ObjectiveInputs;
/// let dev = Device::Cpu;
/// let logp = Tensor::new(&[[-1.0f32, -2.0], [-0.5, 0.0]], &dev)?;
/// let mask = Tensor::new(&[[1.0f32, 1.0], [1.0, 0.0]], &dev)?;
/// let adv = Tensor::new(&[1.0f32, -1.0], &dev)?;
/// let entropy = Tensor::new(&[[0.7f32, 0.2], [1.1, 0.0]], &dev)?;
/// let keep = [true, false]; // row 1 leaves the batch, B = 1
/// let inputs = ObjectiveInputs::new(&logp, &logp, &mask, &adv)
///     .with_entropy(Some(&entropy))
///     .with_row_mask(Some(&keep));
/// assert!(inputs.ref_logp.is_none());
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ObjectiveInputs<'a> {
    /// `(B, T)` log-probs of the sampled tokens under the current policy; the only input
    /// gradients flow into (with `entropy`, for the bonus). Its dtype (normally `f32`) is the
    /// dtype of the computation.
    pub logp: &'a Tensor,
    /// `(B, T)` log-probs under the policy that sampled the batch (detached here).
    pub old_logp: &'a Tensor,
    /// `(B, T)` log-probs under the reference policy (detached here). Required iff `beta > 0`;
    /// when given with `beta = 0` it only feeds the `kl` metric.
    pub ref_logp: Option<&'a Tensor>,
    /// `(B, T)`, 1 for completion tokens and 0 for padding (any dtype; other non-negative
    /// values act as token weights). Negative, NaN or infinite entries are
    /// [`Error::InvalidInput`].
    pub mask: &'a Tensor,
    /// `(B,)` one advantage per completion, broadcast to its tokens.
    pub advantages: &'a Tensor,
    /// `(B, T)` per-token entropy of the current policy's distribution
    /// ([`TokenLogProbs::entropy`](crate::TokenLogProbs::entropy)); padding may hold any value.
    /// Required iff [`ObjectiveConfig::needs_entropy`] (`entropy_coef ≠ 0` or
    /// `top_entropy_quantile < 1`), ignored otherwise. For the bonus it must carry the
    /// gradient of the policy's parameters (when `logp` does).
    pub entropy: Option<&'a Tensor>,
    /// `(B,)` which rows take part: `false` drops row `i` from the loss, the metrics and every
    /// denominator (`N` and `B`), exactly as if it were not in the batch. `None` (every row
    /// takes part) is the same as all `true`.
    pub row_mask: Option<&'a [bool]>,
}

impl<'a> ObjectiveInputs<'a> {
    /// The required inputs; `ref_logp`, `entropy` and `row_mask` are `None`.
    pub fn new(
        logp: &'a Tensor,
        old_logp: &'a Tensor,
        mask: &'a Tensor,
        advantages: &'a Tensor,
    ) -> Self {
        Self {
            logp,
            old_logp,
            ref_logp: None,
            mask,
            advantages,
            entropy: None,
            row_mask: None,
        }
    }

    /// Sets [`ref_logp`](Self::ref_logp).
    pub fn with_ref_logp(self, ref_logp: Option<&'a Tensor>) -> Self {
        Self { ref_logp, ..self }
    }

    /// Sets [`entropy`](Self::entropy).
    pub fn with_entropy(self, entropy: Option<&'a Tensor>) -> Self {
        Self { entropy, ..self }
    }

    /// Sets [`row_mask`](Self::row_mask).
    pub fn with_row_mask(self, row_mask: Option<&'a [bool]>) -> Self {
        Self { row_mask, ..self }
    }
}

/// The loss and its diagnostics.
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    /// Scalar (rank 0) loss to **minimise**, differentiable w.r.t. `logp` (and `entropy`).
    pub loss: Tensor,
    /// Diagnostics (computed from detached tensors).
    pub metrics: ObjectiveMetrics,
}

/// The policy-gradient loss (PPO's clipped surrogate, CISPO or SAPO, with the variants of
/// [`ObjectiveConfig`]) and its metrics. Formulas, tables and edge-case choices are in the
/// [module docs](self).
///
/// Shapes: `logp`, `old_logp`, `ref_logp`, `mask`, `entropy` `(B, T)`; `advantages` and
/// `row_mask` `(B,)`; the loss is a rank-0 tensor in `logp`'s dtype on `logp`'s device. One
/// device-to-host copy (the metrics, with the checks of the mask and the entropy), and one more
/// when `top_entropy_quantile < 1` (the entropies, for the threshold).
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
/// let inputs = ObjectiveInputs::new(&logp, &old_logp, &mask, &advantages);
/// let out = clipped_objective(&ObjectiveConfig::default(), &inputs)?;
/// // surrogates 1·1 and clip(1.5, 0.8, 1.2)·1 = 1.2; loss = −(1 + 1.2)/2
/// assert!((out.loss.to_scalar::<f32>()? + 1.1).abs() < 1e-6);
/// assert_eq!(out.metrics.clip_ratio_high, 0.5);
/// # Ok::<(), pgrpo::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad config, for `max_completion_len < T`, when `beta > 0`
/// but `ref_logp` is `None` (field `beta`), and when the config needs `entropy` but it is
/// `None` (field `entropy_coef` or `top_entropy_quantile`); [`Error::ShapeMismatch`] naming the
/// tensor (or `row_mask`); [`Error::InvalidInput`] for a negative or non-finite mask entry, a
/// non-finite entropy on a completion token, or a detached entropy under an entropy bonus;
/// [`Error::Empty`]`("mask")` when no completion token takes part; [`Error::Candle`] for
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
    let entropy_in = entropy_input(cfg, inputs)?;
    // The rows that take part: `B` of the aggregations.
    let rows = inputs
        .row_mask
        .map_or(b, |keep| keep.iter().filter(|&&k| k).count());
    if rows == 0 {
        return Err(Error::Empty("mask"));
    }

    let logp = inputs.logp;
    let dtype = logp.dtype();
    if !dtype.is_float() {
        // candle panics (todo!) on `exp` of an integer tensor: refuse it here.
        return Err(candle_core::Error::UnsupportedDTypeForOp(dtype, "clipped_objective").into());
    }
    let dev = logp.device();
    let constant = |x: &Tensor| x.detach().to_dtype(dtype);
    let old_logp = constant(inputs.old_logp)?;
    let mask_in = constant(inputs.mask)?;
    let adv = constant(inputs.advantages)?
        .unsqueeze(1)?
        .broadcast_as((b, t))?;
    let mask = match inputs.row_mask {
        None => mask_in.clone(),
        Some(keep) => {
            let keep: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            let keep = Tensor::from_vec(keep, (b, 1), dev)?.to_dtype(dtype)?;
            mask_in.broadcast_mul(&keep)?
        }
    };
    let is_token = mask.ne(0.0)?;
    let zeros = Tensor::zeros((), dtype, dev)?.broadcast_as((b, t))?;
    let norm = Normalizers::new(&mask, cfg.aggregation, rows, t, Some(max_len))?;

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
    let ratio = log_ratio.exp()?;

    // The surrogate, one function per paper (see `surrogate.rs`).
    let surrogate = match cfg.surrogate {
        Surrogate::Clip => surrogate::clipped(&ratio, &adv, lo, hi, cfg.dual_clip)?,
        Surrogate::Cispo => {
            let logp_tok = is_token.where_cond(logp, &zeros)?;
            surrogate::cispo(&ratio, &logp_tok, &adv, hi)?
        }
        Surrogate::Sapo => surrogate::sapo(
            &ratio,
            &adv,
            cfg.sapo_temperature_pos,
            cfg.sapo_temperature_neg,
        )?,
    };

    // Entropy: zeroed on padding; the high-entropy mask, if any, keeps the surrogate of the
    // tokens at or above the quantile.
    let entropy = match entropy_in {
        Some(e) => Some(is_token.where_cond(&e.to_dtype(dtype)?, &zeros)?),
        None => None,
    };
    let keep = match &entropy {
        Some(h) if cfg.top_entropy_quantile < 1.0 => Some(entropy::high_entropy_mask(
            &h.detach(),
            &is_token,
            cfg.top_entropy_quantile,
        )?),
        _ => None,
    };
    let surrogate = match &keep {
        Some(k) => surrogate.mul(k)?,
        None => surrogate,
    };

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
    let mut loss = norm.aggregate(&per_token_loss)?;
    let mut checks = vec![count_invalid_mask(&mask_in)?];
    if let (Some(h), true) = (&entropy, cfg.entropy_coef != 0.0) {
        let bonus = entropy::mean_entropy(&norm, h, keep.as_ref())?;
        loss = (loss - (bonus * cfg.entropy_coef as f64)?)?;
        checks.push(count_non_finite(&h.detach())?);
    }

    // Metrics and checks, from detached tensors, in one device-to-host copy.
    let ratio = ratio.detach();
    let log_ratio_tok = log_ratio_tok.detach();
    let (low, high) = cfg.surrogate.clip_indicators(&ratio, &adv, lo, hi)?;
    // low and high are disjoint (A < 0 against A > 0), so their sum is "either".
    let region = (&low + &high)?;
    // (r − 1) − log r = exp(x) − x − 1 with x = log r: the k3 form, computed stably.
    let approx_kl = exp_minus_one_minus(&log_ratio_tok)?;
    let kl_mean = match &kl {
        Some(kl) => norm.token_mean(&kl.detach())?,
        None => Tensor::zeros((), dtype, dev)?,
    };
    let mut stacked = vec![
        norm.aggregate(&surrogate.detach().neg()?)?,
        kl_mean,
        norm.token_mean(&approx_kl)?,
        norm.token_mean(&low)?,
        norm.token_mean(&high)?,
        norm.token_mean(&region)?,
        norm.tokens.clone(),
    ];
    stacked.extend(checks);
    let values = Tensor::stack(&stacked, 0)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let [policy_loss, kl, approx_kl, low, high, region, num_tokens, bad_mask] = values[..8] else {
        unreachable!("eight values were stacked first")
    };
    if bad_mask != 0.0 {
        return Err(Error::InvalidInput {
            what: "mask",
            reason: format!(
                "{bad_mask} entries are negative or not finite; the mask holds 1 for completion \
                 tokens, 0 for padding, or non-negative token weights"
            ),
        });
    }
    if let Some(&bad_entropy) = values.get(8) {
        if bad_entropy != 0.0 {
            return Err(entropy::non_finite_entropy(bad_entropy as usize));
        }
    }
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

/// The entropy input when the config needs it, checked: present, and differentiable when
/// the bonus needs its gradient.
fn entropy_input<'a>(
    cfg: &ObjectiveConfig,
    inputs: &ObjectiveInputs<'a>,
) -> Result<Option<&'a Tensor>> {
    if !cfg.needs_entropy() {
        return Ok(None);
    }
    let (field, value) = if cfg.entropy_coef != 0.0 {
        ("entropy_coef", cfg.entropy_coef.to_string())
    } else {
        ("top_entropy_quantile", cfg.top_entropy_quantile.to_string())
    };
    let Some(entropy) = inputs.entropy else {
        bail_config!(
            field,
            "is {value}, which needs the per-token `entropy` of the policy \
             (ObjectiveInputs::entropy, from TokenLogProbs::entropy); pass it or disable \
             the entropy controls (entropy_coef = 0, top_entropy_quantile = 1)"
        );
    };
    if cfg.entropy_coef != 0.0 && inputs.logp.track_op() && !entropy.track_op() {
        return Err(Error::InvalidInput {
            what: "entropy",
            reason: format!(
                "entropy_coef = {} needs an entropy that carries the gradient of the policy's \
                 parameters, like `logp` does, but this one is detached: the bonus would \
                 not train anything",
                cfg.entropy_coef
            ),
        });
    }
    Ok(Some(entropy))
}

/// The number of entries of `mask` that are negative, NaN or infinite, as a scalar tensor.
fn count_invalid_mask(mask: &Tensor) -> Result<Tensor> {
    let valid = mask.ge(0.0)?.mul(&mask.lt(f64::INFINITY)?)?;
    Ok((valid.to_dtype(mask.dtype())?.neg()? + 1.0)?.sum_all()?)
}

/// The number of NaN or infinite entries of `x`, as a scalar tensor.
fn count_non_finite(x: &Tensor) -> Result<Tensor> {
    let finite = x.abs()?.lt(f64::INFINITY)?;
    Ok((finite.to_dtype(x.dtype())?.neg()? + 1.0)?.sum_all()?)
}

/// Checks every shape against `logp`'s `(B, T)` and returns it.
fn check_shapes(x: &ObjectiveInputs<'_>) -> Result<(usize, usize)> {
    let mismatch = |what, expected: Vec<usize>, got: Vec<usize>| Error::ShapeMismatch {
        what,
        expected,
        got,
    };
    let (b, t) = match *x.logp.dims() {
        [b, t] => (b, t),
        ref dims => {
            // Best guess at what was meant: the mask's shape, else (B from advantages, last dim).
            let expected = match *x.mask.dims() {
                [b, t] => vec![b, t],
                _ => vec![x.advantages.elem_count(), dims.last().copied().unwrap_or(0)],
            };
            return Err(mismatch("logp", expected, x.logp.dims().to_vec()));
        }
    };
    let mut others = vec![("old_logp", x.old_logp), ("mask", x.mask)];
    if let Some(r) = x.ref_logp {
        others.push(("ref_logp", r));
    }
    if let Some(e) = x.entropy {
        others.push(("entropy", e));
    }
    for (what, tensor) in others {
        if tensor.dims() != [b, t] {
            return Err(mismatch(what, vec![b, t], tensor.dims().to_vec()));
        }
    }
    if x.advantages.dims() != [b] {
        return Err(mismatch(
            "advantages",
            vec![b],
            x.advantages.dims().to_vec(),
        ));
    }
    if let Some(keep) = x.row_mask {
        if keep.len() != b {
            return Err(mismatch("row_mask", vec![b], vec![keep.len()]));
        }
    }
    Ok((b, t))
}
