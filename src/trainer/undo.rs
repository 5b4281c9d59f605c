//! [`Undo`]: what a step copies before its first weight change so that an error later in the
//! step leaves the trainer as it was.

use candle_core::{Tensor, Var};

use crate::optim::{OptimizerSnapshot, OptimizerState};
use crate::{Error, Result};

/// The trainable weights and the optimizer's state before a step's first update.
///
/// Memory: one copy of every trainable weight plus the optimizer's exported state (for AdamW
/// both moments: three copies of the trainable weights in all), on the weights' device. Taken
/// only by steps that can fail after their first update (several optimizer updates, or a
/// reference mix).
pub(super) struct Undo {
    weights: Vec<Tensor>,
    optimizer: OptimizerSnapshot,
}

impl Undo {
    /// Copies the weights of `vars` and exports `optimizer`'s state, before the first of a
    /// step's `updates` optimizer updates.
    ///
    /// # Errors
    /// [`Error::OptimizerState`] when the optimizer cannot export its state; errors of the
    /// copies.
    pub(super) fn take<O: OptimizerState>(
        vars: &[Var],
        optimizer: &O,
        updates: usize,
    ) -> Result<Self> {
        let optimizer = optimizer.export_state()?.ok_or_else(|| {
            Error::OptimizerState(format!(
                "a step of {updates} optimizer update(s) is undone if it fails after its first \
                 update, which needs the optimizer's state, and this optimizer cannot export it: \
                 use pgrpo::optim::AdamW (candle_nn::AdamW's update, with exportable state), or \
                 a config with one update per step (num_iterations = 1, steps_per_generation = \
                 gradient_accumulation_steps) and sync_ref_model off"
            ))
        })?;
        let weights = vars
            .iter()
            .map(|v| Ok(v.as_tensor().copy()?))
            .collect::<Result<_>>()?;
        Ok(Self { weights, optimizer })
    }

    /// Puts the weights and the optimizer's state back after the step failed with `error`,
    /// and returns `error`. The optimizer checks the state before changing itself; should it
    /// or a weight refuse (it cannot, for the state it exported), the returned error says the
    /// trainer could not be restored.
    pub(super) fn restore<O: OptimizerState>(
        self,
        vars: &[Var],
        optimizer: &mut O,
        error: Error,
    ) -> Error {
        let restored = optimizer.import_state(&self.optimizer).and_then(|()| {
            vars.iter()
                .zip(&self.weights)
                .try_for_each(|(v, w)| Ok(v.set(w)?))
        });
        match restored {
            Ok(()) => error,
            Err(e) => Error::OptimizerState(format!(
                "the step failed ({error}) and undoing its updates failed too ({e}): the \
                 trainer's weights and optimizer state may be those of a half-made step"
            )),
        }
    }
}
