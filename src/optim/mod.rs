//! Optimizers and their helpers: [`AdamW`] with exportable state (the
//! [`Trainer`](crate::Trainer)'s default), the [`OptimizerState`] trait checkpoints use,
//! global-norm gradient clipping and learning-rate schedules.
//!
//! The trainer takes any [`candle_nn::Optimizer`]; to be saved in a checkpoint an optimizer
//! also implements [`OptimizerState`].

mod adamw;
mod state;

pub use adamw::{AdamW, AdamWState};
pub use candle_nn::ParamsAdamW;
pub use state::{OptimizerSnapshot, OptimizerState};

use candle_core::backprop::GradStore;
use candle_core::Var;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The global L2 norm of the gradients of `vars`, `sqrt(Σ_v ‖∇v‖²)`; vars without a gradient
/// count as zero.
pub fn grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}

/// Scales the gradients of `vars` in `grads` so that their global norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when `norm > max_norm`).
/// Returns the norm before clipping.
///
/// # Errors
/// [`Error::NonFiniteGradient`] if the norm is NaN or infinite (the gradients are left as they
/// are; the caller should skip the update).
pub fn clip_grad_norm(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(vars, grads)?;
    if !norm.is_finite() {
        return Err(Error::NonFiniteGradient { norm });
    }
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v) {
                grads.insert(v, (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// How the learning rate evolves after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Constant after the warm-up. Default (TRL's `lr_scheduler_type` default is `linear`;
    /// constant needs no step budget).
    #[default]
    Constant,
    /// Linear decay to 0 at `max_steps`.
    Linear,
    /// Half-cosine decay to 0 at `max_steps`.
    Cosine,
}

/// Learning rate at `step` (0-based): linear warm-up from `base/warmup` to `base` over
/// `warmup_steps`, then the schedule, reaching 0 at `max_steps` for the decaying ones.
///
/// ```
/// use pgrpo::optim::{lr_at, LrScheduler};
/// assert_eq!(lr_at(LrScheduler::Constant, 1.0, 0, 10, None), 0.1);
/// assert_eq!(lr_at(LrScheduler::Linear, 1.0, 10, 10, Some(20)), 1.0);
/// assert_eq!(lr_at(LrScheduler::Linear, 1.0, 15, 10, Some(20)), 0.5);
/// ```
pub fn lr_at(
    schedule: LrScheduler,
    base: f64,
    step: u64,
    warmup_steps: u64,
    max_steps: Option<u64>,
) -> f64 {
    if step < warmup_steps {
        return base * (step + 1) as f64 / warmup_steps as f64;
    }
    let Some(total) = max_steps else { return base };
    let span = total.saturating_sub(warmup_steps).max(1) as f64;
    let progress = ((step - warmup_steps) as f64 / span).min(1.0);
    match schedule {
        LrScheduler::Constant => base,
        LrScheduler::Linear => base * (1.0 - progress),
        LrScheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}
