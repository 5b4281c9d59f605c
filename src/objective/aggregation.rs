//! How the `(B, T)` per-token loss becomes a scalar: [`LossAggregation`] and its denominators.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::names::named_enum;

/// How the `(B, T)` per-token loss is reduced to a scalar. See the [module docs](super) for
/// the formulas and the table of which surrogate each paper pairs with which aggregation.
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

named_enum!(LossAggregation, "aggregation",
    [Grpo => "grpo", Bnpo => "bnpo", DrGrpo => "dr_grpo"], alias "dapo" => Bnpo);

impl LossAggregation {
    /// What the aggregation divides the summed loss by, for a batch of `rows` rows (`B`)
    /// padded to `width` columns (`T`) holding `tokens` completion tokens (`N`): `B` for
    /// `Grpo` (which sums the rows' token means), `max(N, 1)` for `Bnpo`, `B · L` for
    /// `DrGrpo` with `L = max_len` or `T`. The one place these denominators are defined:
    /// [`clipped_objective`](super::clipped_objective) divides by them, and a data-parallel
    /// step weights each rank's loss by its denominator over the whole batch's.
    ///
    /// `rows` counts the rows that **take part**: with an
    /// [`ObjectiveInputs::row_mask`](super::ObjectiveInputs::row_mask), the rows it keeps
    /// (rows without tokens that the row mask keeps still count); `tokens` is then the sum of
    /// the mask over the kept rows.
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

/// The mask and the denominators of the loss aggregation and of the token means.
pub(super) struct Normalizers {
    /// `(B, T)` mask in the computation dtype.
    pub(super) mask: Tensor,
    /// `(B,)` `max(n_i, 1)`.
    pub(super) row: Tensor,
    /// Scalar `N`.
    pub(super) tokens: Tensor,
    /// Scalar `max(N, 1)`: the token means' denominator, and `Bnpo`'s (the floor of
    /// [`LossAggregation::denominator`], kept on the device).
    tokens_den: Tensor,
    pub(super) aggregation: LossAggregation,
    /// The aggregation's denominator when the shape fixes it (`B`, `B · L`).
    shape_den: Option<f64>,
}

impl Normalizers {
    /// The normalisers of `mask` (the mask of the rows taking part), of which `rows` rows
    /// take part, `t` columns wide.
    pub(super) fn new(
        mask: &Tensor,
        aggregation: LossAggregation,
        rows: usize,
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
            shape_den: aggregation.shape_denominator(rows, t, max_len),
        })
    }

    /// `Σ m · x / max(N, 1)`.
    pub(super) fn token_mean(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.mul(&self.mask)?.sum_all()?.div(&self.tokens_den)?)
    }

    /// The scalar loss from a `(B, T)` per-token loss: the sum of the rows' token means
    /// (`Grpo`) or of all tokens, over the aggregation's denominator.
    pub(super) fn aggregate(&self, per_token: &Tensor) -> Result<Tensor> {
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
