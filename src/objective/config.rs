//! [`ObjectiveConfig`]: the hyper-parameters of [`clipped_objective`](super::clipped_objective).

use serde::{Deserialize, Serialize};

use super::{KlEstimator, LossAggregation, Surrogate};
use crate::error::{bail_config, Result};
use crate::names::named_enum;

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

named_enum!(RatioLevel, "ratio_level", [Token => "token", Sequence => "sequence"]);

/// Hyper-parameters of [`clipped_objective`](super::clipped_objective). Fields are public;
/// build with `ObjectiveConfig { eps_high: 0.28, ..Default::default() }` and check with
/// [`validate`](Self::validate). TRL's `loss_type` is split in two here: the per-token
/// [`surrogate`](Self::surrogate) (`"cispo"`, `"sapo"`, or PPO's clip for every other TRL loss
/// type) and the [`aggregation`](Self::aggregation) (`"grpo"`, `"dapo"`, `"dr_grpo"`); see
/// the [module docs](super) for which pairs the papers use.
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
/// assert!(!cfg.needs_entropy());
/// # Ok::<(), pgrpo::Error>(())
/// ```
///
/// TRL's `loss_type="cispo"` (MiniMax-M1) with ScaleRL's cap of 5 on the importance weight:
///
/// ```
/// use pgrpo::objective::Surrogate;
/// use pgrpo::{LossAggregation, ObjectiveConfig};
/// let cfg = ObjectiveConfig {
///     surrogate: Surrogate::Cispo,
///     eps_high: 4.0, // the weight is capped at 1 + eps_high (TRL: epsilon_high = 5.0)
///     aggregation: LossAggregation::Bnpo,
///     ..Default::default()
/// };
/// cfg.validate()?;
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectiveConfig {
    /// Lower clip range: ratios below `1 − eps_low` stop pushing a negative advantage.
    /// Must be in `[0, 1)`. Default `0.2` (PPO, Schulman et al. 2017; DeepSeekMath). Used by
    /// [`Surrogate::Clip`] only (CISPO's weight has no lower bound, SAPO does not clip).
    pub eps_low: f32,
    /// Upper clip range: ratios above `1 + eps_high` stop pushing a positive advantage. Must be
    /// `≥ 0`. Default `0.2`; DAPO's clip-higher (Yu et al. 2025) uses `0.28 > eps_low` so that
    /// unlikely tokens can gain probability, which keeps entropy from collapsing. With
    /// [`Surrogate::Cispo`] it caps the importance weight at `1 + eps_high` (MiniMax-M1's
    /// `ε_high^IS`; TRL's `epsilon_high` is the cap itself, `1 + eps_high`, and TRL documents
    /// 5.0, from ScaleRL, as the value to use). Unused by [`Surrogate::Sapo`].
    pub eps_high: f32,
    /// Dual-clip constant `c > 1` (Ye et al. 2020, "Mastering Complex Control in MOBA Games
    /// with Deep Reinforcement Learning"): for `A < 0` the surrogate is bounded below by
    /// `c · A`, so a huge ratio on a bad token cannot produce an unbounded loss. The paper uses
    /// `c = 3`. Default `None` (off, as in GRPO). Only with [`Surrogate::Clip`]: CISPO's weight
    /// is already capped and SAPO's gate bounded by `4/τ`, so [`validate`](Self::validate)
    /// rejects it with the others.
    pub dual_clip: Option<f32>,
    /// Token-level (PPO/GRPO) or sequence-level (GSPO, Zheng et al. 2025) importance ratio.
    /// Default [`RatioLevel::Token`]. Every surrogate takes either: with `Sequence` a row's
    /// tokens share one ratio (CISPO: one weight, SAPO: one gate), as in TRL.
    pub ratio_level: RatioLevel,
    /// The per-token surrogate: PPO's clipped ratio (default), CISPO (MiniMax-M1) or SAPO
    /// (Gao et al. 2025). TRL's `loss_type` names the last two; every other TRL loss type is
    /// [`Surrogate::Clip`] with an [`aggregation`](Self::aggregation).
    pub surrogate: Surrogate,
    /// SAPO's temperature `τ_pos` for tokens with `A > 0`: the gate is `σ(τ (r − 1)) · 4/τ`, so
    /// a larger `τ` attenuates off-policy tokens faster. Must be finite and `> 0`. Default
    /// `1.0` (the SAPO paper; TRL's `sapo_temperature_pos`). Used only by [`Surrogate::Sapo`].
    pub sapo_temperature_pos: f32,
    /// SAPO's temperature `τ_neg` for tokens with `A ≤ 0`. Must be finite and `> 0`. Default
    /// `1.05` (the SAPO paper recommends `τ_neg > τ_pos`, since negative updates spread to
    /// many unsampled tokens; TRL's `sapo_temperature_neg`). Used only by [`Surrogate::Sapo`].
    pub sapo_temperature_neg: f32,
    /// How per-token losses are reduced. Default [`LossAggregation::Grpo`] (DeepSeekMath).
    pub aggregation: LossAggregation,
    /// Weight of the per-token KL penalty to the reference policy. Must be finite and `≥ 0`.
    /// Default `0.0` (TRL's default, following Dr. GRPO and DAPO, which drop the KL term);
    /// DeepSeekMath used `0.04`. With `0` no reference log-probs are needed.
    pub beta: f32,
    /// The KL estimator used in the penalty and the `kl` metric. Default [`KlEstimator::K3`]
    /// (DeepSeekMath).
    pub kl_estimator: KlEstimator,
    /// Entropy bonus: the loss becomes `loss − entropy_coef · H̄`, `H̄` the mean per-token
    /// entropy of the tokens trained on (TRL's `entropy_coef`; see the [module docs](super)
    /// for `H̄` under each aggregation). Must be finite; a negative value penalises entropy.
    /// Default `0.0` (off, as in TRL). Needs [`ObjectiveInputs::entropy`](super::ObjectiveInputs::entropy),
    /// and a differentiable one, or the bonus has no gradient.
    pub entropy_coef: f32,
    /// Train only on the tokens whose entropy is in the top `ρ` quantile of the batch's
    /// completion tokens ("Beyond the 80/20 Rule", Wang et al. 2025, arXiv:2506.01939; TRL's
    /// `top_entropy_quantile`): tokens with entropy below the `1 − ρ` quantile keep their KL
    /// term and their place in every denominator but lose their surrogate. Must be in
    /// `[0, 1]`; `1.0` (default) keeps every token, `0.0` only the highest-entropy token(s);
    /// the paper recommends `0.2`. Needs [`ObjectiveInputs::entropy`](super::ObjectiveInputs::entropy).
    pub top_entropy_quantile: f64,
    /// The constant `L` of [`LossAggregation::DrGrpo`]: the generation budget (Dr. GRPO; TRL's
    /// `max_completion_length`). `None` (default) falls back to `T`, the mask's width, which
    /// changes with how much each batch happens to be padded, so Dr. GRPO's constant is then
    /// not constant: a training loop should set it to its policy's generation budget (for an
    /// LM, `SamplingConfig::max_new_tokens`). When set it must be `> 0` and `≥ T`.
    pub max_completion_len: Option<usize>,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            ratio_level: RatioLevel::Token,
            surrogate: Surrogate::Clip,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            aggregation: LossAggregation::Grpo,
            beta: 0.0,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            top_entropy_quantile: 1.0,
            max_completion_len: None,
        }
    }
}

impl ObjectiveConfig {
    /// Checks every field and every combination (the check against `T` happens in
    /// [`clipped_objective`](super::clipped_objective)).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the field.
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
            if self.surrogate != Surrogate::Clip {
                bail_config!(
                    "dual_clip",
                    "applies only to surrogate = \"clip\" (it bounds r·A below for A < 0); \
                     surrogate = \"{}\" already bounds the weight of every token: set dual_clip = None",
                    self.surrogate.name()
                );
            }
        }
        for (field, tau) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            if !(tau.is_finite() && tau > 0.0) {
                bail_config!(field, "must be finite and > 0, got {tau}");
            }
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail_config!("beta", "must be finite and >= 0, got {}", self.beta);
        }
        if !self.entropy_coef.is_finite() {
            bail_config!("entropy_coef", "must be finite, got {}", self.entropy_coef);
        }
        if !(0.0..=1.0).contains(&self.top_entropy_quantile) {
            bail_config!(
                "top_entropy_quantile",
                "must be in [0, 1], got {}",
                self.top_entropy_quantile
            );
        }
        if self.max_completion_len == Some(0) {
            bail_config!("max_completion_len", "must be > 0, got 0");
        }
        Ok(())
    }

    /// Whether [`ObjectiveInputs::ref_logp`](super::ObjectiveInputs::ref_logp) is required
    /// (`beta > 0`), i.e. whether the trainer must run the reference policy.
    pub fn needs_reference(&self) -> bool {
        self.beta > 0.0
    }

    /// Whether [`ObjectiveInputs::entropy`](super::ObjectiveInputs::entropy) is required: an
    /// entropy bonus (`entropy_coef ≠ 0`, which also needs the entropy to be differentiable)
    /// or an entropy mask (`top_entropy_quantile < 1`).
    pub fn needs_entropy(&self) -> bool {
        self.entropy_coef != 0.0 || self.top_entropy_quantile < 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

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
        assert_eq!(c.surrogate, Surrogate::Clip);
        assert_eq!(
            (c.sapo_temperature_pos, c.sapo_temperature_neg),
            (1.0, 1.05)
        );
        assert_eq!((c.entropy_coef, c.top_entropy_quantile), (0.0, 1.0));
        assert!(!c.needs_entropy());
    }

    #[test]
    fn new_fields_are_validated_naming_the_field() {
        let d = ObjectiveConfig::default();
        let bad = [
            (
                ObjectiveConfig {
                    sapo_temperature_pos: 0.0,
                    ..d
                },
                "sapo_temperature_pos",
            ),
            (
                ObjectiveConfig {
                    sapo_temperature_neg: f32::NAN,
                    ..d
                },
                "sapo_temperature_neg",
            ),
            (
                ObjectiveConfig {
                    sapo_temperature_neg: -1.0,
                    ..d
                },
                "sapo_temperature_neg",
            ),
            (
                ObjectiveConfig {
                    entropy_coef: f32::INFINITY,
                    ..d
                },
                "entropy_coef",
            ),
            (
                ObjectiveConfig {
                    top_entropy_quantile: 1.5,
                    ..d
                },
                "top_entropy_quantile",
            ),
            (
                ObjectiveConfig {
                    top_entropy_quantile: -0.1,
                    ..d
                },
                "top_entropy_quantile",
            ),
            (
                ObjectiveConfig {
                    top_entropy_quantile: f64::NAN,
                    ..d
                },
                "top_entropy_quantile",
            ),
        ];
        for (cfg, field) in bad {
            assert_eq!(field_of(cfg.validate()), field, "{cfg:?}");
        }
        // Edges that are valid: quantile 0 and 1, a negative entropy coefficient (a penalty).
        for cfg in [
            ObjectiveConfig {
                top_entropy_quantile: 0.0,
                ..d
            },
            ObjectiveConfig {
                entropy_coef: -0.01,
                ..d
            },
        ] {
            cfg.validate().unwrap();
            assert!(cfg.needs_entropy());
        }
    }

    #[test]
    fn dual_clip_is_rejected_with_the_surrogates_that_bound_their_weight() {
        let d = ObjectiveConfig::default();
        for surrogate in [Surrogate::Cispo, Surrogate::Sapo] {
            let cfg = ObjectiveConfig {
                surrogate,
                dual_clip: Some(3.0),
                ..d
            };
            match cfg.validate() {
                Err(Error::InvalidConfig { field, reason }) => {
                    assert_eq!(field, "dual_clip");
                    assert!(reason.contains(surrogate.name()), "{reason}");
                }
                other => panic!("{surrogate:?}: {other:?}"),
            }
            // Every other combination is valid: each ratio level, each aggregation.
            for ratio_level in RatioLevel::ALL {
                for aggregation in LossAggregation::ALL {
                    ObjectiveConfig {
                        surrogate,
                        ratio_level,
                        aggregation,
                        ..d
                    }
                    .validate()
                    .unwrap();
                }
            }
        }
        ObjectiveConfig {
            dual_clip: Some(3.0),
            ..d
        }
        .validate()
        .unwrap();
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
        for s in Surrogate::ALL {
            assert_eq!(s.name().parse::<Surrogate>().unwrap(), s);
        }
        match "ppo".parse::<Surrogate>() {
            Err(Error::InvalidConfig { field, reason }) => {
                assert_eq!(field, "surrogate");
                assert!(reason.contains("clip, cispo, sapo"), "{reason}");
            }
            other => panic!("{other:?}"),
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
        // TRL's names for the new options, and the config of a run saved before they existed.
        let cfg: ObjectiveConfig = serde_json::from_str(
            r#"{"surrogate":"sapo","sapo_temperature_neg":2.0,"entropy_coef":0.01,"top_entropy_quantile":0.2}"#,
        )
        .unwrap();
        assert_eq!(cfg.surrogate, Surrogate::Sapo);
        assert_eq!(cfg.sapo_temperature_neg, 2.0);
        assert_eq!((cfg.entropy_coef, cfg.top_entropy_quantile), (0.01, 0.2));
        let old = r#"{"eps_low":0.2,"eps_high":0.2,"dual_clip":null,"ratio_level":"token","aggregation":"grpo","beta":0.0,"kl_estimator":"k3","max_completion_len":null}"#;
        assert_eq!(
            serde_json::from_str::<ObjectiveConfig>(old).unwrap(),
            ObjectiveConfig::default()
        );
    }
}
