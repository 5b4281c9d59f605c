//! The trainer's side of [checkpoints](crate::checkpoint): [`Trainer::save`] and the ways
//! back ([`Trainer::resume`], [`Trainer::from_checkpoint`]). What a checkpoint holds and how
//! it is written atomically is the checkpoint module's; the data-parallel part (every rank's
//! reward-function state, the agreement before saving) is the
//! [protocol's](crate::distributed::protocol).

use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use candle_nn::Optimizer;

use super::{check_reference_sync, default_optimizer, Trainer};
use crate::checkpoint::{self, files, Checkpoint, CheckpointOptions};
use crate::distributed::protocol::{self, RankRewardStates};
use crate::distributed::{Collective, SingleProcess};
use crate::error::CheckpointProblem;
use crate::optim::{AdamW, OptimizerState};
use crate::{Error, Policy, Result, RewardFn};

impl<P, R> Trainer<P, R, AdamW>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
{
    /// Resumes the run saved at `path` (a checkpoint directory, or a run directory whose
    /// `latest` names one) with a freshly built `policy` and `reward` function: loads and
    /// validates every file, checks every tensor against the policy, then sets the weights,
    /// the reference policy, the optimizer's moments and step count, the reward history, the
    /// reward function's state and the step number. The config is the checkpoint's; to change
    /// it, use [`Checkpoint::load`] and [`Trainer::from_checkpoint`].
    ///
    /// `policy` must have the architecture of the saved one (its weights are overwritten, so
    /// any initialisation will do). Its [`Policy::vars`] order must be the same.
    ///
    /// ```
    /// use candle_core::Device;
    /// use pgrpo::tasks::bandit::PreferenceBandit;
    /// use pgrpo::{GroupedPrompt, Trainer, TrainerConfig};
    ///
    /// let bandit = PreferenceBandit::new(vec![0.7, 0.3], vec![1.0, 0.5], 3, 0.5, 0.1)?;
    /// let cfg = TrainerConfig { num_generations: 4, learning_rate: 0.05, ..Default::default() };
    /// let batch = [GroupedPrompt::new(0u32, "a"), GroupedPrompt::new(1u32, "b")];
    /// let dir = std::env::temp_dir().join(format!("pgrpo-doc-resume-{}", std::process::id()));
    ///
    /// let mut a = Trainer::new(bandit.policy(&Device::Cpu)?, bandit.reward_fn(1), cfg)?;
    /// a.step(&batch)?;
    /// a.save(&dir)?;
    /// let next_a = a.step(&batch)?;
    ///
    /// // Later, in another process: rebuild the policy and reward function, resume.
    /// let mut b = Trainer::resume(&dir, bandit.policy(&Device::Cpu)?, bandit.reward_fn(1))?;
    /// assert_eq!(b.steps_done(), 1);
    /// assert_eq!(b.step(&batch)?.values, next_a.values);
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file and the problem (see [`Checkpoint::load`] and
    /// [`Trainer::from_checkpoint`]). On error nothing is returned: there is no half-loaded
    /// trainer.
    pub fn resume(path: impl AsRef<Path>, policy: P, reward: R) -> Result<Self> {
        let ckpt = Checkpoint::load(path, policy.device())?;
        Self::resume_from(ckpt, policy, reward)
    }

    /// [`resume`](Self::resume) from a checkpoint already loaded (and possibly edited, e.g.
    /// a longer `max_steps` in its config): AdamW is built from the checkpoint's config and
    /// given the saved state.
    ///
    /// # Errors
    /// As [`Trainer::from_checkpoint`].
    pub fn resume_from(ckpt: Checkpoint, policy: P, reward: R) -> Result<Self> {
        ckpt.config.validate()?;
        let optimizer = default_optimizer(&policy, &ckpt.config)?;
        Self::from_checkpoint(ckpt, policy, reward, optimizer)
    }
}

impl<P, R, O, C> Trainer<P, R, O, C>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer + OptimizerState,
    C: Collective,
{
    /// Saves a checkpoint of the run into the run directory `dir`, as
    /// `dir/checkpoint-NNNNNNNNN/` (the step number), and points `dir/latest` at it.
    /// Atomic: see [the checkpoint module](crate::checkpoint). Returns the checkpoint's
    /// directory.
    ///
    /// With an optimizer that cannot export its state the checkpoint is written but marked
    /// inexact, and resuming it needs [`Checkpoint::with_fresh_optimizer`].
    ///
    /// In a data-parallel run it is collective: every rank calls it with the same `dir`;
    /// the ranks first [check](Self::check_replicas) that they hold the same state, then
    /// rank 0 writes the checkpoint, with every rank's reward-function state, and every rank
    /// returns its path once it is complete (or the error rank 0 met).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file that could not be written (the previous
    /// checkpoint stays intact), errors of the reward function's or optimizer's state export;
    /// in a data-parallel run [`Error::Distributed`] when the ranks' states differ or another
    /// rank failed.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        self.save_with(dir, &CheckpointOptions::default())
    }

    /// [`save`](Self::save) with options (e.g. keep only the last `n` checkpoints).
    ///
    /// # Errors
    /// As [`save`](Self::save); [`Error::InvalidConfig`] for `keep_last = Some(0)`.
    pub fn save_with(&self, dir: impl AsRef<Path>, opts: &CheckpointOptions) -> Result<PathBuf> {
        self.check_replicas()?;
        let reward_state = protocol::gather_reward_states(&self.comm, self.reward.state())?;
        let written = if self.comm.is_root() {
            self.write_checkpoint(dir.as_ref(), opts, reward_state)
                .map(Some)
        } else {
            Ok(None)
        };
        protocol::gather_checkpoint_path(&self.comm, written)
    }

    fn write_checkpoint(
        &self,
        dir: &Path,
        opts: &CheckpointOptions,
        reward_state: Option<serde_json::Value>,
    ) -> Result<PathBuf> {
        checkpoint::write(
            dir,
            checkpoint::Parts {
                step: self.step,
                config: &self.config,
                history: &self.history,
                vars: &self.vars,
                reference: self.reference.as_ref().map(|r| r.vars()),
                optimizer: self.optimizer.export_state()?,
                reward_state,
                policy: self.policy.checkpoint_identity()?,
            },
            opts,
        )
    }
}

impl<P, R, O> Trainer<P, R, O>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer + OptimizerState,
{
    /// [`resume`](Trainer::resume) with an optimizer of your own, built over
    /// `policy.vars()` (its hyper-parameters are yours; its state comes from the checkpoint).
    ///
    /// # Errors
    /// As [`resume`](Trainer::resume).
    pub fn resume_with_optimizer(
        path: impl AsRef<Path>,
        policy: P,
        reward: R,
        optimizer: O,
    ) -> Result<Self> {
        let ckpt = Checkpoint::load(path, policy.device())?;
        Self::from_checkpoint(ckpt, policy, reward, optimizer)
    }

    /// Builds a trainer from a loaded checkpoint. Checks, in order, before changing anything:
    /// the optimizer state is present (or [`Checkpoint::with_fresh_optimizer`] was called),
    /// every weight (and reference weight) has the dtype and shape of the policy's var at
    /// its position. Then restores the reward function's state and the optimizer's (each
    /// checks its input before changing itself) and finally sets the weights.
    ///
    /// If the config was edited to switch the KL term on (`objective.beta > 0` in a
    /// checkpoint saved without a reference policy), the reference is the resumed policy; if
    /// it was switched off, the saved reference is dropped.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] with [`CheckpointProblem::Inexact`] (no optimizer state),
    /// [`CheckpointProblem::Mismatch`] (tensors that do not fit the policy or the
    /// optimizer), [`CheckpointProblem::Invalid`] (a reward state the reward function
    /// rejects); [`Error::InvalidConfig`] if the (possibly edited) config is invalid, or
    /// asks for `sync_ref_model` with a reference that has no weights of its own (LoRA).
    pub fn from_checkpoint(
        ckpt: Checkpoint,
        policy: P,
        mut reward: R,
        mut optimizer: O,
    ) -> Result<Self> {
        ckpt.config.validate()?;
        if let Some(saved) = &ckpt.policy {
            let found = policy.checkpoint_identity()?;
            if found.as_ref() != Some(saved) {
                return Err(Error::Checkpoint {
                    path: ckpt.file(files::POLICY),
                    problem: CheckpointProblem::Mismatch(format!(
                        "the checkpoint's weights are relative to {saved}, the policy given is {}",
                        found.map_or_else(
                            || "not (it reports no identity)".to_owned(),
                            |v| v.to_string()
                        )
                    )),
                });
            }
        }
        if ckpt.optimizer.is_none() && !ckpt.fresh_optimizer_allowed() {
            return Err(Error::Checkpoint {
                path: ckpt.file(files::MANIFEST),
                problem: CheckpointProblem::Inexact(
                    "saved without optimizer state (the optimizer could not export it); call \
                     Checkpoint::with_fresh_optimizer to resume with fresh moments",
                ),
            });
        }
        let vars = policy.vars();
        if vars.is_empty() {
            return Err(Error::Empty("policy vars"));
        }
        ckpt.check_weights(&vars)?;
        let reference = match &ckpt.reference {
            Some(weights) => {
                let r = policy.snapshot()?;
                let rv = r.vars();
                if rv.len() != weights.len() {
                    return Err(Error::Checkpoint {
                        path: ckpt.file(files::REFERENCE),
                        problem: CheckpointProblem::Mismatch(format!(
                            "holds {} tensors, the policy's snapshot has {} vars",
                            weights.len(),
                            rv.len()
                        )),
                    });
                }
                Some((r, rv))
            }
            None => None,
        };
        // On the vars' device(s) first, so that setting them cannot fail half-way.
        let on_device = |ws: &[Tensor], vs: &[Var]| -> Result<Vec<Tensor>> {
            ws.iter()
                .zip(vs)
                .map(|(w, v)| Ok(w.to_device(v.device())?))
                .collect()
        };
        let weights = on_device(&ckpt.weights, &vars)?;
        let reference = match (reference, &ckpt.reference) {
            (Some((r, rv)), Some(ws)) => {
                let ws = on_device(ws, &rv)?;
                Some((r, ws, rv))
            }
            _ => None,
        };
        let mut rank_reward_states = None;
        if let Some(state) = ckpt.reward_state.clone() {
            let invalid = |e: Error| Error::Checkpoint {
                path: ckpt.file(files::REWARD_STATE),
                problem: CheckpointProblem::Invalid(e.to_string()),
            };
            match RankRewardStates::from_value(&state).map_err(invalid)? {
                // A data-parallel run's: each rank takes its own in `with_collective`.
                Some(states) => rank_reward_states = Some(states),
                None => reward.restore(state).map_err(invalid)?,
            }
        }
        if let Some(snap) = &ckpt.optimizer {
            optimizer
                .import_state(snap)
                .map_err(|e| Error::Checkpoint {
                    path: ckpt.file(files::OPTIMIZER_TENSORS),
                    problem: CheckpointProblem::Mismatch(e.to_string()),
                })?;
        }
        for (v, w) in vars.iter().zip(&weights) {
            v.set(w)?;
        }
        let reference = match reference {
            _ if ckpt.config.objective.beta <= 0.0 => None,
            Some((r, ws, rv)) => {
                for (v, w) in rv.iter().zip(&ws) {
                    v.set(w)?;
                }
                Some(r)
            }
            // KL switched on in an edited config: the reference is the resumed policy.
            None => Some(policy.snapshot()?),
        };
        check_reference_sync(&ckpt.config, &vars, reference.as_ref())?;
        Ok(Self {
            policy,
            reference,
            reward,
            optimizer,
            vars,
            history: ckpt.history,
            config: ckpt.config,
            step: ckpt.step,
            comm: SingleProcess,
            rank_reward_states,
            estimator: None,
        })
    }
}
