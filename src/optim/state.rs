//! [`OptimizerState`]: how an optimizer's state goes into a checkpoint and comes back.

use candle_core::Tensor;

use crate::{Error, Result};

/// An optimizer's state as named tensors plus JSON metadata: what a checkpoint stores
/// (`optimizer.safetensors` and `optimizer.json`).
#[derive(Debug, Clone)]
pub struct OptimizerSnapshot {
    /// Which optimizer wrote it (e.g. `"pgrpo.adamw"`); an import checks it.
    pub kind: String,
    /// Optimizer steps taken.
    pub step: u64,
    /// Named state tensors, in a fixed order (e.g. `m.00000`, `v.00000`, …).
    pub tensors: Vec<(String, Tensor)>,
    /// Anything else worth keeping (hyper-parameters, for the record). JSON object.
    pub meta: serde_json::Value,
}

/// An optimizer whose state can be saved and restored, so that a resumed run continues
/// exactly.
///
/// Both methods have defaults meaning "no exportable state", so any optimizer can opt in to
/// checkpointing with an empty `impl`; such a checkpoint is marked inexact and
/// [`Trainer::resume`](crate::Trainer::resume) refuses it unless asked to start the optimizer
/// afresh ([`Checkpoint::with_fresh_optimizer`](crate::checkpoint::Checkpoint::with_fresh_optimizer)).
///
/// Implemented for [`AdamW`](super::AdamW) (exact), [`candle_nn::SGD`] (stateless, exact)
/// and [`candle_nn::AdamW`] (its moments are private: inexact).
///
/// ```
/// use candle_core::Var;
/// use pgrpo::optim::{OptimizerSnapshot, OptimizerState};
///
/// /// A plain gradient-descent optimizer of your own: it has no state, say so.
/// struct MySgd { vars: Vec<Var>, lr: f64 }
/// impl OptimizerState for MySgd {
///     fn export_state(&self) -> pgrpo::Result<Option<OptimizerSnapshot>> {
///         Ok(Some(OptimizerSnapshot::stateless("my_sgd")))
///     }
///     fn import_state(&mut self, s: &OptimizerSnapshot) -> pgrpo::Result<()> {
///         s.expect_stateless("my_sgd")
///     }
/// }
/// ```
pub trait OptimizerState {
    /// The state, or `None` when this optimizer cannot export it.
    ///
    /// # Errors
    /// Whatever copying the state can raise (device transfers).
    fn export_state(&self) -> Result<Option<OptimizerSnapshot>> {
        Ok(None)
    }

    /// Restores a state written by [`export_state`](Self::export_state). Implementations
    /// check everything before changing anything: on error the optimizer is unchanged.
    ///
    /// # Errors
    /// [`Error::OptimizerState`] when the snapshot does not fit (kind, count, shapes).
    fn import_state(&mut self, snapshot: &OptimizerSnapshot) -> Result<()> {
        Err(Error::OptimizerState(format!(
            "this optimizer cannot import state (found a {:?} state)",
            snapshot.kind
        )))
    }
}

impl OptimizerSnapshot {
    /// The snapshot of an optimizer without state.
    pub fn stateless(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            step: 0,
            tensors: Vec::new(),
            meta: serde_json::Value::Object(Default::default()),
        }
    }

    /// Checks that this is a stateless snapshot of `kind`.
    ///
    /// # Errors
    /// [`Error::OptimizerState`] otherwise.
    pub fn expect_stateless(&self, kind: &str) -> Result<()> {
        if self.kind != kind || !self.tensors.is_empty() {
            return Err(Error::OptimizerState(format!(
                "expected a stateless {kind:?} state, found a {:?} state with {} tensors",
                self.kind,
                self.tensors.len()
            )));
        }
        Ok(())
    }
}

impl OptimizerState for candle_nn::SGD {
    fn export_state(&self) -> Result<Option<OptimizerSnapshot>> {
        Ok(Some(OptimizerSnapshot::stateless("candle_nn.sgd")))
    }

    fn import_state(&mut self, snapshot: &OptimizerSnapshot) -> Result<()> {
        snapshot.expect_stateless("candle_nn.sgd")
    }
}

/// `candle_nn::AdamW` keeps its moments private: a checkpoint of a trainer using it is
/// inexact. Use [`pgrpo::optim::AdamW`](super::AdamW), the same update with exportable state.
impl OptimizerState for candle_nn::AdamW {}
