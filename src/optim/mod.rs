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
use candle_core::{CpuStorage, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The global L2 norm of the gradients of `vars`, `sqrt(Σ_v ‖∇v‖²)`; vars without a gradient
/// count as zero. Squares are summed in `f64`; for contiguous `f32` CPU gradients in one
/// parallel pass without temporaries (chunk sums added in a fixed order, so the result does
/// not depend on the thread count's scheduling).
pub fn grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += sum_squares(g)?;
        }
    }
    Ok(sq.sqrt())
}

/// `Σ g²` in `f64`.
fn sum_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && g.dtype() == DType::F32 && g.is_contiguous() {
        use rayon::prelude::*;
        const CHUNK: usize = 64 * 1024;
        let (s, l) = g.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*s, l.contiguous_offsets())
        {
            let parts: Vec<f64> = v[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            return Ok(parts.iter().sum());
        }
    }
    Ok(g.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Multiplies a contiguous CPU tensor in place.
struct ScaleInPlace(f64);

impl candle_core::InplaceOp1 for ScaleInPlace {
    fn name(&self) -> &'static str {
        "pgrpo-scale-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("scale in place: expected a contiguous tensor");
        };
        match s {
            CpuStorage::F32(v) => {
                let k = self.0 as f32;
                v[a..b]
                    .par_chunks_mut(64 * 1024)
                    .for_each(|c| c.iter_mut().for_each(|x| *x *= k));
            }
            CpuStorage::F64(v) => {
                let k = self.0;
                v[a..b]
                    .par_chunks_mut(64 * 1024)
                    .for_each(|c| c.iter_mut().for_each(|x| *x *= k));
            }
            _ => candle_core::bail!("scale in place: expected f32 or f64"),
        }
        Ok(())
    }
}

/// Scales the gradients of `vars` in `grads` so that their global norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when `norm > max_norm`).
/// Returns the norm before clipping.
///
/// Contiguous `f32`/`f64` CPU gradients are scaled **in place**, as PyTorch's `mul_` does (the
/// gradients `Tensor::backward` returns own their storage); others are replaced by scaled
/// copies.
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
        scale_grads(vars, grads, max_norm / (norm + 1e-6))?;
    }
    Ok(norm)
}

/// Multiplies the gradients of `vars` in `grads` by `factor`: contiguous `f32`/`f64` CPU
/// gradients in place, others replaced by scaled copies.
pub(crate) fn scale_grads(vars: &[Var], grads: &mut GradStore, factor: f64) -> Result<()> {
    for v in vars {
        let Some(g) = grads.get(v) else { continue };
        if g.device().is_cpu() && matches!(g.dtype(), DType::F32 | DType::F64) && g.is_contiguous()
        {
            g.inplace_op1(&ScaleInPlace(factor))?;
        } else if let Some(g) = grads.remove(v) {
            grads.insert(v, (g * factor)?);
        }
    }
    Ok(())
}

/// How the learning rate evolves after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Constant after the warm-up. Default. TRL's `lr_scheduler_type` default is `linear`,
    /// which decays to 0 at the end of the run; TRL knows that end (it derives `max_steps`
    /// from the dataset and the epochs), a pgrpo [`Trainer`](crate::Trainer) does not (the
    /// training loop is the caller's), so a decaying default would need a `max_steps` default
    /// no run could trust. Set `lr_scheduler = "linear"` with `max_steps` for TRL's schedule.
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
/// `step < max_steps` is the range a run uses (the [`Trainer`](crate::Trainer) refuses to
/// step at `max_steps`, as TRL stops there); at or past `max_steps` the decaying schedules
/// stay at 0.
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
