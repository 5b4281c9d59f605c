//! The [`Trainer`]: the only place that knows the order of a step.
//!
//! One step (DeepSeekMath's Algorithm 1 with P-GRPO's advantage):
//! 1. sample `G` completions per prompt from the current policy (`π_old`);
//! 2. score each with the [`RewardFn`] (prompt, completion, preference group);
//! 3. turn rewards into advantages ([`AdvantageConfig::compute`](crate::AdvantageConfig::compute)) — with P-GRPO, against each
//!    preference group's [`RewardHistory`];
//! 4. `num_iterations` passes over the batch, each `steps_per_generation /
//!    gradient_accumulation_steps` optimizer updates (one by default): per micro-batch
//!    per-token log-probs → [`clipped_objective`](crate::clipped_objective) → backward, the
//!    gradients summed over `gradient_accumulation_steps` micro-batches → global-norm
//!    clipping → optimizer step;
//! 5. fold the batch's rewards into the history, and every `ref_model_sync_steps` steps mix
//!    the reference toward the policy (`sync_ref_model`, TR-DPO);
//! 6. return [`StepMetrics`].
//!
//! A step happens entirely or not at all: on error the weights, optimizer state, history,
//! reference and step number are those from before it (see [`Trainer::update`]).
//!
//! [`Trainer::rollout`] (1–3) and [`Trainer::update`] (4–6) are public for callers that want
//! to look at the rollout in between; [`Trainer::step`] runs both.
//!
//! [`Trainer::save`] writes a [checkpoint](crate::checkpoint) and [`Trainer::resume`]
//! continues from one exactly: the same metrics and bit-identical weights as a run that never
//! stopped (on the same device).
//!
//! [`Trainer::with_collective`] makes the trainer one rank of a data-parallel run: every
//! rank steps on the same global batch, samples its shard of the prompts, and the step's
//! advantages, history and update are those of the whole batch (see
//! [`distributed`](crate::distributed)). A single process is rank 0 of a world of one
//! ([`SingleProcess`]) and goes through the same exchanges, which hand it back its own
//! numbers: there is one path through a step.
//!
//! | file | what |
//! |---|---|
//! | `trainer/mod.rs` | the [`Trainer`], its constructors and accessors, [`Trainer::step`] |
//! | `trainer/rollout.rs` | steps 1–3: [`Rollout`], [`GroupedPrompt`], [`Trainer::rollout`] |
//! | `trainer/update.rs` | steps 4–6: [`Trainer::update`], [`Trainer::loss`], [`Trainer::gradients`]; micro-batches and gradient accumulation |
//! | `trainer/undo.rs` | the copy a step takes to put things back when it fails half-way |
//! | `trainer/checkpointing.rs` | [`Trainer::save`], [`Trainer::resume`], [`Trainer::from_checkpoint`] |
//!
//! The exchanges between ranks are in `distributed/protocol.rs`, the seeding in [`rng`](crate::rng).

use candle_core::Var;
use candle_nn::Optimizer;

use crate::advantage::AdvantageEstimator;
use crate::distributed::{protocol, protocol::RankRewardStates, wire, Collective, SingleProcess};
use crate::metrics::StepMetrics;
use crate::optim::{lr_at, AdamW, OptimizerState, ParamsAdamW};
use crate::{Error, Policy, Result, RewardFn, RewardHistory, TrainerConfig};

mod checkpointing;
mod rollout;
mod undo;
mod update;

pub use self::rollout::{GroupedPrompt, Rollout};
pub use crate::rng::{rank_step_rng, step_rng};

/// Trains a [`Policy`] with GRPO-family objectives and P-GRPO advantages.
///
/// `O` is any [`candle_nn::Optimizer`] that implements
/// [`OptimizerState`] (an empty `impl` will do for steps of one
/// optimizer update; steps of several need the state exported, to be undone on error);
/// [`Trainer::new`] builds [`pgrpo::optim::AdamW`](AdamW) from the config.
///
/// ```
/// use candle_core::Device;
/// use pgrpo::{models::TabularPolicy, GroupKey, GroupedPrompt, Trainer, TrainerConfig};
///
/// // Two preference groups (contexts 0 and 1) that like different actions.
/// let policy = TabularPolicy::new(2, 3, true, &Device::Cpu)?;
/// let reward = |ctx: &u32, action: &u32, _g: &GroupKey| (*action == *ctx) as u8 as f32;
/// let cfg = TrainerConfig { num_generations: 4, learning_rate: 0.1, ..Default::default() };
/// let mut trainer = Trainer::new(policy, reward, cfg)?;
/// let batch = [GroupedPrompt::new(0u32, "a"), GroupedPrompt::new(1u32, "b")];
/// let mut last = 0.0;
/// for _ in 0..30 {
///     last = trainer.step(&batch)?.reward();
/// }
/// assert!(trainer.policy().probs()?[1][1] > 0.5, "group b learned its action");
/// assert!(trainer.history().stats(&"a".into()).unwrap().n == 120);
/// # let _ = last;
/// # Ok::<(), pgrpo::Error>(())
/// ```
pub struct Trainer<P: Policy, R, O = AdamW, C = SingleProcess> {
    policy: P,
    reference: Option<P>,
    reward: R,
    optimizer: O,
    vars: Vec<Var>,
    history: RewardHistory,
    config: TrainerConfig,
    step: u64,
    comm: C,
    /// Per-rank reward-function states of a checkpoint written by a data-parallel run, until
    /// [`Trainer::with_collective`] picks this rank's.
    rank_reward_states: Option<RankRewardStates>,
    /// An advantage rule of the user's in place of `config.advantage.estimator`
    /// ([`Trainer::with_estimator`]).
    estimator: Option<Box<dyn AdvantageEstimator>>,
}

impl<P, R> Trainer<P, R, AdamW>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
{
    /// A trainer with AdamW built from the config's learning rate, betas, eps and weight decay.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] from [`TrainerConfig::validate`].
    pub fn new(policy: P, reward: R, config: TrainerConfig) -> Result<Self> {
        config.validate()?;
        let optimizer = default_optimizer(&policy, &config)?;
        Self::with_optimizer(policy, reward, config, optimizer)
    }
}

/// Errors unless the config's `sync_ref_model` can be honoured: the reference must have a
/// weight of its own, of the same shape and dtype, for each of the policy's `vars`. A LoRA
/// [`LmPolicy`](crate::lm::LmPolicy)'s reference is the base model with the adapters off,
/// which shares the frozen weights and has no var: TR-DPO's mix has nothing to act on (the
/// adapters are not a copy of the reference that could be blended), so the trainer refuses
/// it, as TRL refuses `sync_ref_model` for PEFT models.
///
/// # Errors
/// [`Error::InvalidConfig`] naming `sync_ref_model`.
pub(crate) fn check_reference_sync<P: Policy>(
    config: &TrainerConfig,
    vars: &[Var],
    reference: Option<&P>,
) -> Result<()> {
    if !config.sync_ref_model {
        return Ok(());
    }
    let rv = reference.map(Policy::vars).unwrap_or_default();
    let fits = rv.len() == vars.len()
        && rv
            .iter()
            .zip(vars)
            .all(|(r, v)| r.dims() == v.dims() && r.dtype() == v.dtype());
    if fits {
        return Ok(());
    }
    Err(Error::InvalidConfig {
        field: "sync_ref_model",
        reason: format!(
            "the reference policy has {} weights of its own for the policy's {} trainable ones \
             (a LoRA policy's reference is its base model with the adapters off, sharing the \
             frozen weights): there is nothing to mix. Train every weight, or leave \
             sync_ref_model off (TRL refuses it for PEFT models too)",
            rv.len(),
            vars.len()
        ),
    })
}

/// The default optimizer of a config: [`AdamW`] with its learning rate (at step 0), betas,
/// eps and weight decay.
fn default_optimizer<P: Policy>(policy: &P, config: &TrainerConfig) -> Result<AdamW> {
    {
        let params = ParamsAdamW {
            lr: lr_at(
                config.lr_scheduler,
                config.learning_rate,
                0,
                config.warmup_steps,
                config.max_steps,
            ),
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_eps,
            weight_decay: config.weight_decay,
        };
        Ok(AdamW::new(policy.vars(), params)?)
    }
}

impl<P, R, O> Trainer<P, R, O>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer + OptimizerState,
{
    /// A trainer with a ready optimizer (built over `policy.vars()`). The config's AdamW
    /// fields are ignored; its learning-rate schedule drives `set_learning_rate`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] from [`TrainerConfig::validate`], or naming `sync_ref_model`
    /// when the reference has no weights of its own to mix (`sync_ref_model` with a LoRA policy).
    pub fn with_optimizer(
        policy: P,
        reward: R,
        mut config: TrainerConfig,
        optimizer: O,
    ) -> Result<Self> {
        config.validate()?;
        // Dr. GRPO's constant is the generation budget (TRL's `max_completion_length`): the
        // policy's, unless the config sets one.
        if config.objective.max_completion_len.is_none() {
            config.objective.max_completion_len = policy.max_completion_len();
        }
        let reference = if config.objective.beta > 0.0 {
            Some(policy.snapshot()?)
        } else {
            None
        };
        let vars = policy.vars();
        if vars.is_empty() {
            return Err(Error::Empty("policy vars"));
        }
        check_reference_sync(&config, &vars, reference.as_ref())?;
        Ok(Self {
            reference,
            vars,
            history: RewardHistory::new(config.history)?,
            policy,
            reward,
            optimizer,
            config,
            step: 0,
            comm: SingleProcess,
            rank_reward_states: None,
            estimator: None,
        })
    }

    /// Makes this trainer rank `comm.rank()` of a data-parallel run of `comm.world()` ranks
    /// (see [`distributed`](crate::distributed)). Collective: every rank calls it, with a
    /// trainer built the same way (same config, same policy architecture; a resumed trainer
    /// from the same checkpoint).
    ///
    /// It checks that every rank has the same config, step number, reward history and
    /// variable shapes, then broadcasts rank 0's weights (and reference weights) to every
    /// rank, so the policies start identical whatever their initialisation. A trainer
    /// resumed from a data-parallel checkpoint takes its rank's reward-function state here.
    ///
    /// # Errors
    /// [`Error::Distributed`] when the ranks disagree, or when a checkpoint written by
    /// `N` ranks with a stateful reward function is resumed with another number of ranks;
    /// errors of the reward function's [`restore`](RewardFn::restore) and of the transport.
    pub fn with_collective<C: Collective>(self, comm: C) -> Result<Trainer<P, R, O, C>> {
        let mut state = Vec::new();
        state.extend(serde_json::to_vec(&self.config)?);
        state.extend(self.step.to_le_bytes());
        state.extend(self.history.to_json()?.into_bytes());
        comm.check_same("the config, step and reward history", &state)?;
        comm.broadcast_vars(&self.vars, 0)?;
        let reference_vars = self.reference.as_ref().map(|r| r.vars());
        let has_reference = u8::from(reference_vars.is_some());
        comm.check_same("whether there is a reference policy", &[has_reference])?;
        if let Some(rv) = &reference_vars {
            comm.broadcast_vars(rv, 0)?;
        }
        let mut reward = self.reward;
        let restored = match self.rank_reward_states {
            Some(states) => states.restore_rank(&mut reward, comm.rank(), comm.world()),
            None => Ok(()),
        };
        protocol::gather(
            &comm,
            "restoring its reward-function state",
            restored,
            |_| Vec::new(),
        )?;
        Ok(Trainer {
            policy: self.policy,
            reference: self.reference,
            reward,
            optimizer: self.optimizer,
            vars: self.vars,
            history: self.history,
            config: self.config,
            step: self.step,
            comm,
            rank_reward_states: None,
            estimator: self.estimator,
        })
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
    /// Computes advantages with `estimator`, a rule of your own, instead of the config's
    /// [`estimator`](crate::AdvantageConfig::estimator); the rest of
    /// [`config.advantage`](TrainerConfig::advantage) still applies (non-finite policy,
    /// reward aggregation). See [`AdvantageEstimator`] for the contract and an example.
    ///
    /// The trainer keeps folding every batch into its reward history (passed to the
    /// estimator) and saves it in checkpoints. The estimator itself is not saved: a
    /// checkpoint's config names the config's estimator, so call `with_estimator` again after
    /// [`resume`](Trainer::resume). Its own state, if it keeps any, is not saved either.
    /// `TrainerConfig::validate` still checks `num_generations` against the config's
    /// estimator: for `G = 1` set one that accepts it (e.g. `batch_z_score`).
    ///
    /// ```
    /// use candle_core::Device;
    /// use pgrpo::advantage::AdvantageEstimator;
    /// use pgrpo::models::TabularPolicy;
    /// use pgrpo::{GroupKey, GroupedPrompt, RewardHistory, RolloutRewards, Trainer, TrainerConfig};
    ///
    /// /// `A_i = R_i − 0.5`: a fixed baseline.
    /// struct Fixed;
    /// impl AdvantageEstimator for Fixed {
    ///     fn name(&self) -> &str { "fixed" }
    ///     fn advantages(&self, b: &RolloutRewards<'_>, _: &RewardHistory) -> pgrpo::Result<Vec<f32>> {
    ///         Ok(b.rewards.iter().map(|r| r - 0.5).collect())
    ///     }
    /// }
    ///
    /// let policy = TabularPolicy::new(1, 2, false, &Device::Cpu)?;
    /// let reward = |_: &u32, a: &u32, _: &GroupKey| *a as f32;
    /// let cfg = TrainerConfig { num_generations: 4, learning_rate: 0.1, ..Default::default() };
    /// let mut trainer = Trainer::new(policy, reward, cfg)?.with_estimator(Box::new(Fixed));
    /// for _ in 0..20 {
    ///     trainer.step(&[GroupedPrompt::new(0u32, "a")])?;
    /// }
    /// assert!(trainer.policy().probs()?[0][1] > 0.8);
    /// assert_eq!(trainer.history().stats(&"a".into()).unwrap().n, 80);
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    pub fn with_estimator(mut self, estimator: Box<dyn AdvantageEstimator>) -> Self {
        self.estimator = Some(estimator);
        self
    }

    /// The advantage rule set by [`with_estimator`](Self::with_estimator), if any.
    pub fn estimator(&self) -> Option<&dyn AdvantageEstimator> {
        self.estimator.as_deref()
    }

    /// The collective this trainer steps with ([`SingleProcess`] unless
    /// [`with_collective`](Trainer::with_collective) set another).
    pub fn collective(&self) -> &C {
        &self.comm
    }

    /// Checks that every rank holds the same weights and reference weights (bit for bit),
    /// reward history and step number, by comparing 64-bit fingerprints. Collective; cheap
    /// next to a step (one pass over the weights). [`save`](Self::save) runs it first.
    ///
    /// # Errors
    /// [`Error::Distributed`] naming the ranks that differ from rank 0.
    pub fn check_replicas(&self) -> Result<()> {
        protocol::agree(
            &self.comm,
            "the weights, reference weights, reward history and step",
            || {
                let mut h = wire::Fnv64::default();
                h.write(&self.step.to_le_bytes());
                for v in &self.vars {
                    v.as_tensor().write_bytes(&mut h)?;
                }
                if let Some(r) = &self.reference {
                    for v in r.vars() {
                        v.as_tensor().write_bytes(&mut h)?;
                    }
                }
                h.write(self.history.to_json()?.as_bytes());
                Ok(h.finish())
            },
        )
    }

    /// The policy being trained.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The frozen reference policy (present when `objective.beta > 0`).
    pub fn reference(&self) -> Option<&P> {
        self.reference.as_ref()
    }

    /// The per-preference-group reward history.
    pub fn history(&self) -> &RewardHistory {
        &self.history
    }

    /// Mutable access to the history (e.g. to seed it, or to merge other workers' batches).
    pub fn history_mut(&mut self) -> &mut RewardHistory {
        &mut self.history
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The reward function.
    pub fn reward_fn(&mut self) -> &mut R {
        &mut self.reward
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// Steps completed so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Runs one training step on `batch`: [`rollout`](Self::rollout) (sample, score,
    /// advantages) then [`update`](Self::update) (optimizer steps, history, metrics).
    ///
    /// # Errors
    /// Any error of sampling, the reward function, the advantage computation (e.g.
    /// [`Error::NonFiniteReward`]), the objective, or [`Error::NonFiniteGradient`];
    /// [`Error::InvalidConfig`] naming `max_steps` once the run has done its `max_steps`
    /// steps (before sampling). On error the weights, optimizer state, history, reference and
    /// step number are unchanged (a stateful reward function has scored the batch).
    pub fn step(&mut self, batch: &[GroupedPrompt<P::Prompt>]) -> Result<StepMetrics> {
        self.check_budget()?;
        let rollout = self.rollout(batch)?;
        self.update(rollout)
    }
}
