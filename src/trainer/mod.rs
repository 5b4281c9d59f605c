//! The [`Trainer`]: the only place that knows the order of a step.
//!
//! One step (DeepSeekMath's Algorithm 1 with P-GRPO's advantage):
//! 1. sample `G` completions per prompt from the current policy (`π_old`);
//! 2. score each with the [`RewardFn`] (prompt, completion, preference group);
//! 3. turn rewards into advantages ([`AdvantageConfig::compute`](crate::AdvantageConfig::compute)) — with P-GRPO, against each
//!    preference group's [`RewardHistory`];
//! 4. `num_iterations` times: per-token log-probs → [`clipped_objective`] → backward →
//!    global-norm clipping → optimizer step;
//! 5. fold the batch's rewards into the history;
//! 6. return [`StepMetrics`].
//!
//! [`Trainer::rollout`] (1–3) and [`Trainer::update`] (4–6) are public for callers that want
//! to look at the rollout in between; [`Trainer::step`] runs both.
//!
//! [`Trainer::save`] writes a [checkpoint] and [`Trainer::resume`]
//! continues from one exactly: the same metrics and bit-identical weights as a run that never
//! stopped (on the same device).
//!
//! [`Trainer::with_collective`] makes the trainer one rank of a data-parallel run: every
//! rank steps on the same global batch, samples its shard of the prompts, and the step's
//! advantages, history and update are those of the whole batch (see
//! [`distributed`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use candle_nn::Optimizer;
use rand::{rngs::StdRng, SeedableRng};

use crate::checkpoint::{self, files, Checkpoint, CheckpointOptions};
use crate::distributed::{self, wire, Collective, SingleProcess};
use crate::error::CheckpointProblem;
use crate::metrics::StepMetrics;
use crate::objective::{
    clipped_objective, LossAggregation, ObjectiveInputs, ObjectiveMetrics, ObjectiveOutput,
};
use crate::optim::{clip_grad_norm, grad_norm, lr_at, AdamW, OptimizerState, ParamsAdamW};
use crate::{
    AdvantageDiagnostics, BatchDeltas, Error, GroupKey, Policy, Result, RewardFn, RewardHistory,
    RolloutRewards, TokenLogProbs, TrainerConfig,
};

/// A prompt with its preference-group label.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedPrompt<T> {
    /// The prompt, as the policy takes it.
    pub prompt: T,
    /// Its preference group.
    pub group: GroupKey,
}

impl<T> GroupedPrompt<T> {
    /// A prompt in `group`.
    pub fn new(prompt: T, group: impl Into<GroupKey>) -> Self {
        Self {
            prompt,
            group: group.into(),
        }
    }
}

/// Sampled, scored and normalised completions of one batch, before the update.
///
/// Rows are prompt-major: row `i * G + j` is the `j`-th completion of prompt `i`.
///
/// In a data-parallel run the rows are this rank's: the completions of its
/// [shard](crate::distributed::shard) of the prompts (`N` is the shard's prompts × `G`,
/// `prompt_ids` are indices into the whole batch); `group_keys`, `diagnostics` and the
/// history update describe the whole batch.
pub struct Rollout<'a, P: Policy> {
    /// The prompt of each row.
    pub prompts: Vec<&'a P::Prompt>,
    /// The completion of each row.
    pub completions: Vec<P::Completion>,
    /// `(N,)` rewards.
    pub rewards: Vec<f32>,
    /// `(N,)` advantages.
    pub advantages: Vec<f32>,
    /// `(N,)` prompt index of each row (`0..batch.len()`).
    pub prompt_ids: Vec<u32>,
    /// `(N,)` index into `group_keys` of each row.
    pub group_ids: Vec<u32>,
    /// The preference groups of the batch, in order of first appearance.
    pub group_keys: Vec<GroupKey>,
    /// What the advantage computation saw (the whole batch).
    pub diagnostics: AdvantageDiagnostics,
    deltas: BatchDeltas,
    /// Mean and std of the whole batch's advantages.
    advantage_stats: (f64, f64),
    /// Rows in the whole batch.
    global_rows: usize,
    /// Whether every prompt of the whole batch is masked out (nothing to learn from).
    all_masked: bool,
    old: Option<TokenLogProbs>,
    reference: Option<Tensor>,
    zero_std_rows: Vec<bool>,
    timings: Vec<(&'static str, f64)>,
}

/// Trains a [`Policy`] with GRPO-family objectives and P-GRPO advantages.
///
/// `O` is any [`candle_nn::Optimizer`]; [`Trainer::new`] builds [`pgrpo::optim::AdamW`](AdamW)
/// from the config. Saving a checkpoint needs `O:` [`OptimizerState`].
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
    /// use pgrpo::{bandit::PreferenceBandit, GroupedPrompt, Trainer, TrainerConfig};
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
    O: Optimizer,
{
    /// A trainer with a ready optimizer (built over `policy.vars()`). The config's AdamW
    /// fields are ignored; its learning-rate schedule drives `set_learning_rate`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] from [`TrainerConfig::validate`].
    pub fn with_optimizer(
        policy: P,
        reward: R,
        config: TrainerConfig,
        optimizer: O,
    ) -> Result<Self> {
        config.validate()?;
        let reference = if config.objective.beta > 0.0 {
            Some(policy.snapshot()?)
        } else {
            None
        };
        let vars = policy.vars();
        if vars.is_empty() {
            return Err(Error::Empty("policy vars"));
        }
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
        })
    }

    /// Makes this trainer rank `comm.rank()` of a data-parallel run of `comm.world()` ranks
    /// (see [`distributed`]). Collective: every rank calls it, with a
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
        let msg = match &restored {
            Ok(()) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        };
        let all = all_ok(&comm, "restoring its reward-function state", msg);
        restored?;
        all?;
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
        })
    }
}

impl<P, R, O, C> Trainer<P, R, O, C>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer,
    C: Collective,
{
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
        if self.comm.world() == 1 {
            return Ok(());
        }
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
        self.comm.check_same(
            "the weights, reference weights, reward history and step",
            &h.finish().to_le_bytes(),
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
    /// [`Error::NonFiniteReward`]), the objective, or [`Error::NonFiniteGradient`]. On error
    /// the history is not updated.
    pub fn step(&mut self, batch: &[GroupedPrompt<P::Prompt>]) -> Result<StepMetrics> {
        let rollout = self.rollout(batch)?;
        self.update(rollout)
    }

    /// Steps 1–3: sample, score, compute advantages (and the old/reference log-probs the
    /// update needs). Sampling draws from a generator derived from `(config.seed, step)`
    /// ([`step_rng`]; rank `r` of a data-parallel run uses [`rank_step_rng`]), so a run's
    /// randomness is fixed by the seed and the step number alone: nothing to save for an
    /// exact resume. The history is not changed.
    ///
    /// In a data-parallel run this rank samples and scores its shard of `batch` only; the
    /// rewards of all ranks are then all-gathered and the advantages computed on the whole
    /// batch (see [`distributed`]).
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty batch, then as [`step`](Self::step); in a data-parallel
    /// run [`Error::InvalidConfig`] for a batch with fewer prompts than ranks, and
    /// [`Error::Distributed`] when another rank failed or was given another batch.
    pub fn rollout<'a>(&mut self, batch: &'a [GroupedPrompt<P::Prompt>]) -> Result<Rollout<'a, P>> {
        if batch.is_empty() {
            return Err(Error::Empty("batch"));
        }
        if let Some(states) = self.rank_reward_states.take() {
            states.restore_rank(&mut self.reward, self.comm.rank(), self.comm.world())?;
        }
        let (rank, world) = (self.comm.rank(), self.comm.world());
        if batch.len() < world {
            return Err(Error::InvalidConfig {
                field: "batch",
                reason: format!(
                    "{} prompts cannot be shared by {world} ranks: give every rank at least one",
                    batch.len()
                ),
            });
        }
        let g = self.config.num_generations;
        let shard = distributed::shard(batch.len(), rank, world);
        let local_batch = &batch[shard.clone()];
        let t0 = Instant::now();
        let mut rng = rank_step_rng(self.config.seed, self.step, rank);
        let local = self.sample_and_score(local_batch, g, &mut rng);
        let t_local = t0.elapsed().as_secs_f64();
        // Every rank needs every reward (world 1: its own).
        let t1 = Instant::now();
        let (completions, rewards, t_reward) = if world == 1 {
            local?
        } else {
            self.exchange_rewards(batch, g, local)?
        };
        let t_exchange = t1.elapsed().as_secs_f64();
        let t_sample = t_local - t_reward;

        // Labels of every row of the whole batch, in row order.
        let n = batch.len() * g;
        let mut prompt_ids = Vec::with_capacity(n);
        let mut group_ids = Vec::with_capacity(n);
        let mut group_keys: Vec<GroupKey> = Vec::new();
        let mut key_index: HashMap<&GroupKey, u32> = HashMap::new();
        for row in 0..n {
            let item = &batch[row / g];
            prompt_ids.push((row / g) as u32);
            let gid = *key_index.entry(&item.group).or_insert_with(|| {
                group_keys.push(item.group.clone());
                group_keys.len() as u32 - 1
            });
            group_ids.push(gid);
        }

        let adv = self.config.advantage.compute(
            &RolloutRewards {
                rewards: &rewards,
                prompt_ids: &prompt_ids,
                group_ids: &group_ids,
                group_keys: &group_keys,
            },
            &self.history,
        )?;
        let advantage_stats = mean_std(&adv.values);
        let zero_std_all = if self.config.mask_zero_std_prompts {
            zero_spread_rows(&rewards, g)
        } else {
            vec![false; n]
        };
        let all_masked = zero_std_all.iter().all(|&z| z);

        // This rank's rows.
        let rows = shard.start * g..shard.end * g;
        let row_prompts: Vec<&P::Prompt> = rows.clone().map(|r| &batch[r / g].prompt).collect();
        let t2 = Instant::now();
        let old = if self.config.num_iterations > 1 {
            Some(self.policy.log_probs_detached(&row_prompts, &completions)?)
        } else {
            None
        };
        let reference = match &self.reference {
            Some(r) => Some(r.log_probs_detached(&row_prompts, &completions)?.logp),
            None => None,
        };
        let t_old = t2.elapsed().as_secs_f64();
        let mut timings = vec![
            ("sample", t_sample),
            ("reward", t_reward),
            ("old_logp", t_old),
        ];
        if world > 1 {
            timings.push(("exchange_rewards", t_exchange));
        }
        let (advantages, prompt_ids, group_ids, rewards, zero_std_rows) = if world == 1 {
            (adv.values, prompt_ids, group_ids, rewards, zero_std_all)
        } else {
            (
                adv.values[rows.clone()].to_vec(),
                prompt_ids[rows.clone()].to_vec(),
                group_ids[rows.clone()].to_vec(),
                rewards[rows.clone()].to_vec(),
                zero_std_all[rows].to_vec(),
            )
        };
        Ok(Rollout {
            prompts: row_prompts,
            completions,
            rewards,
            advantages,
            prompt_ids,
            group_ids,
            group_keys,
            diagnostics: adv.diagnostics,
            deltas: adv.deltas,
            advantage_stats,
            global_rows: n,
            all_masked,
            old,
            reference,
            zero_std_rows,
            timings,
        })
    }

    /// Samples `g` completions for each prompt of `batch` and scores them: the completions,
    /// their rewards and the seconds spent scoring.
    fn sample_and_score(
        &mut self,
        batch: &[GroupedPrompt<P::Prompt>],
        g: usize,
        rng: &mut StdRng,
    ) -> Result<(Vec<P::Completion>, Vec<f32>, f64)> {
        let prompts: Vec<P::Prompt> = batch.iter().map(|b| b.prompt.clone()).collect();
        let completions = self.policy.sample(&prompts, g, rng)?;
        if completions.len() != batch.len() * g {
            return Err(Error::LengthMismatch {
                what: "sampled completions",
                got: completions.len(),
                against: "prompts × num_generations",
                expected: batch.len() * g,
            });
        }
        let t = Instant::now();
        let mut rewards = Vec::with_capacity(completions.len());
        for (row, c) in completions.iter().enumerate() {
            let item = &batch[row / g];
            rewards.push(self.reward.score(&item.prompt, c, &item.group)?);
        }
        Ok((completions, rewards, t.elapsed().as_secs_f64()))
    }

    /// All-gathers every rank's rewards (or its failure) with a fingerprint of the batch it
    /// was given: the whole batch's rewards in row order, identical on every rank.
    #[allow(clippy::type_complexity)]
    fn exchange_rewards(
        &self,
        batch: &[GroupedPrompt<P::Prompt>],
        g: usize,
        local: Result<(Vec<P::Completion>, Vec<f32>, f64)>,
    ) -> Result<(Vec<P::Completion>, Vec<f32>, f64)> {
        let mut h = wire::Fnv64::default();
        h.write(&self.step.to_le_bytes());
        h.write(&(batch.len() as u64).to_le_bytes());
        for item in batch {
            wire::hash_key(&mut h, &item.group);
        }
        let fp = h.finish();
        let msg = match &local {
            Ok((_, rewards, _)) => wire::encode_rollout(fp, Ok(rewards)),
            Err(e) => wire::encode_rollout(fp, Err(e.to_string())),
        };
        let all = self.comm.all_gather_bytes(&msg)?;
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let mut global = Vec::with_capacity(batch.len() * g);
        let mut failure = None;
        for (r, m) in all.iter().enumerate() {
            let m = wire::decode_rollout(m).ok_or_else(|| wire::bad_message(r, &"rollout"))?;
            if m.batch_fp != fp && failure.is_none() {
                failure = Some(Error::Distributed(format!(
                    "rank {r} was given another batch or is at another step than rank {rank} \
                     (every rank must step on the same global batch)"
                )));
            }
            match m.rewards {
                Ok(rw) => {
                    let want = distributed::shard(batch.len(), r, world).len() * g;
                    if rw.len() != want {
                        return Err(wire::bad_message(
                            r,
                            &format!("{} rewards for {want} rows", rw.len()),
                        ));
                    }
                    global.extend(rw);
                }
                Err(msg) if r != rank && failure.is_none() => {
                    failure = Some(Error::Distributed(format!(
                        "rank {r} failed during the rollout: {msg}"
                    )));
                }
                Err(_) => {}
            }
        }
        let (completions, _, t_reward) = local?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok((completions, global, t_reward))
    }

    /// The loss of the current policy on `rollout` (differentiable w.r.t. the policy's vars),
    /// with the policy's per-token log-probs. In a data-parallel run: the loss of this rank's
    /// rows, normalised over them (see [`gradients`](Self::gradients) for the whole batch's).
    pub fn loss(&self, rollout: &Rollout<'_, P>) -> Result<(ObjectiveOutput, TokenLogProbs)> {
        let lp = self
            .policy
            .log_probs(&rollout.prompts, &rollout.completions)?;
        let out = self.objective(rollout, &lp)?;
        Ok((out, lp))
    }

    /// The clipped objective of `rollout`'s rows given their log-probs `lp`.
    fn objective(&self, rollout: &Rollout<'_, P>, lp: &TokenLogProbs) -> Result<ObjectiveOutput> {
        let dev = lp.logp.device().clone();
        let old_logp = match &rollout.old {
            Some(o) => o.logp.clone(),
            None => lp.logp.detach(),
        };
        let mut mask = lp.mask.to_dtype(DType::F32)?;
        if rollout.zero_std_rows.iter().any(|&z| z) {
            let keep: Vec<f32> = rollout
                .zero_std_rows
                .iter()
                .map(|&z| if z { 0.0 } else { 1.0 })
                .collect();
            let keep = Tensor::from_vec(keep, (rollout.zero_std_rows.len(), 1), &dev)?;
            mask = mask.broadcast_mul(&keep)?;
        }
        let advantages = Tensor::from_slice(&rollout.advantages, rollout.advantages.len(), &dev)?;
        clipped_objective(
            &self.config.objective,
            &ObjectiveInputs {
                logp: &lp.logp,
                old_logp: &old_logp,
                ref_logp: rollout.reference.as_ref(),
                mask: &mask,
                advantages: &advantages,
            },
        )
    }

    /// The gradient of the whole batch's loss w.r.t. each of [`Policy::vars`] (in that
    /// order; zeros for a var the loss does not reach), as the first optimizer step of
    /// [`update`](Self::update) would apply it before clipping. In a data-parallel run it is
    /// the all-reduced gradient, equal (to `f32` rounding) to the gradient one process would
    /// compute on all the rows; collective (every rank must call it).
    ///
    /// # Errors
    /// [`Error::Empty`]`("mask")` when the batch has no completion token to learn from;
    /// errors of the policy and the objective.
    pub fn gradients(&self, rollout: &Rollout<'_, P>) -> Result<Vec<Tensor>> {
        let it = self.iteration(rollout)?.ok_or(Error::Empty("mask"))?;
        self.vars
            .iter()
            .map(|v| match it.grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }

    /// One iteration's forward and backward over the whole batch: the (all-reduced)
    /// gradients and the whole batch's objective metrics; `None` when no rank has a
    /// completion token to learn from.
    fn iteration(&self, rollout: &Rollout<'_, P>) -> Result<Option<Iteration>> {
        let lp = self
            .policy
            .log_probs(&rollout.prompts, &rollout.completions);
        let local = lp.and_then(|lp| match self.objective(rollout, &lp) {
            Ok(out) => Ok((Some(out), lp)),
            Err(Error::Empty("mask")) => Ok((None, lp)),
            Err(e) => Err(e),
        });
        if self.comm.world() == 1 {
            let (out, lp) = local?;
            let Some(out) = out else { return Ok(None) };
            let grads = out.loss.backward()?;
            let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let (mask_sum, entropy_sum) = token_sums(&lp)?;
            return Ok(Some(Iteration {
                grads,
                metrics: out.metrics,
                loss,
                mask_sum,
                entropy_sum,
                t_all_reduce: 0.0,
            }));
        }

        // Every rank's normalisers and metrics, then the weight of this rank's loss.
        let local = local.and_then(|(out, lp)| {
            let part = RankPart::new(rollout.completions.len(), out.as_ref(), &lp)?;
            Ok((out, part))
        });
        let msg = match &local {
            Ok((_, part)) => part.encode(),
            Err(e) => RankPart::encode_failure(&e.to_string()),
        };
        let all = self.comm.all_gather_bytes(&msg)?;
        let rank = self.comm.rank();
        let mut parts = Vec::with_capacity(all.len());
        let mut failure = None;
        for (r, m) in all.iter().enumerate() {
            match RankPart::decode(m).ok_or_else(|| wire::bad_message(r, &"loss statistics"))? {
                Ok(p) => parts.push(p),
                Err(msg) => {
                    if r != rank && failure.is_none() {
                        failure = Some(Error::Distributed(format!(
                            "rank {r} failed computing its loss: {msg}"
                        )));
                    }
                    parts.push(RankPart::default());
                }
            }
        }
        let (out, _) = local?;
        if let Some(e) = failure {
            return Err(e);
        }
        if parts.iter().all(|p| !p.has_loss) {
            return Ok(None);
        }
        let cfg = &self.config.objective;
        let global = GlobalNorm::new(cfg.aggregation, cfg.max_completion_len, &parts);
        let mut grads = match &out {
            Some(out) => {
                let w = global.weight(&parts[rank]);
                (&out.loss * w)?.backward()?
            }
            None => GradStore::default(),
        };
        let t = Instant::now();
        self.comm.all_reduce_gradients(&self.vars, &mut grads)?;
        let t_all_reduce = t.elapsed().as_secs_f64();
        let (metrics, loss) = global.metrics(&parts);
        Ok(Some(Iteration {
            grads,
            metrics,
            loss,
            t_all_reduce,
            mask_sum: parts.iter().map(|p| p.mask_sum).sum(),
            entropy_sum: parts
                .iter()
                .any(|p| p.entropy_sum.is_some())
                .then(|| parts.iter().filter_map(|p| p.entropy_sum).sum()),
        }))
    }

    /// Steps 4–6: `num_iterations` optimizer updates on `rollout`, then fold its rewards into
    /// the history and return the step's metrics.
    ///
    /// # Errors
    /// As [`step`](Self::step). A non-finite gradient norm stops the step before that
    /// iteration's optimizer step and before the history changes. A batch with nothing to
    /// learn from (every prompt masked, or no completion token) skips the optimizer
    /// (`skipped_update = 1`) but still folds its rewards into the history.
    pub fn update(&mut self, rollout: Rollout<'_, P>) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let lr = lr_at(
            self.config.lr_scheduler,
            self.config.learning_rate,
            self.step,
            self.config.warmup_steps,
            self.config.max_steps,
        );
        self.optimizer.set_learning_rate(lr);
        // Nothing to learn from when every prompt is masked out, or no completion has a token.
        let mut skip = rollout.all_masked;
        let mut acc = ObjectiveAccumulator::default();
        let mut last_grad_norm = f64::NAN;
        let mut token_sums: Option<(f64, Option<f64>)> = None;
        let mut t_all_reduce = 0.0;
        if !skip {
            for it in 0..self.config.num_iterations {
                let mut step = match self.iteration(&rollout)? {
                    Some(step) => step,
                    None if it == 0 => {
                        skip = true;
                        break;
                    }
                    None => return Err(Error::Empty("mask")),
                };
                // The gradient is the whole batch's, the same on every rank: so is every
                // decision below.
                last_grad_norm = match self.config.max_grad_norm {
                    Some(max) => clip_grad_norm(&self.vars, &mut step.grads, max)?,
                    None => {
                        let n = grad_norm(&self.vars, &step.grads)?;
                        if !n.is_finite() {
                            return Err(Error::NonFiniteGradient { norm: n });
                        }
                        n
                    }
                };
                self.optimizer.step(&step.grads)?;
                acc.add(&step.metrics, step.loss);
                t_all_reduce += step.t_all_reduce;
                if token_sums.is_none() {
                    token_sums = Some((step.mask_sum, step.entropy_sum));
                }
            }
        }
        let t_update = t0.elapsed().as_secs_f64();
        self.history
            .apply(&rollout.group_keys, rollout.deltas.clone())?;

        let mut m = StepMetrics {
            step: self.step,
            ..Default::default()
        };
        let d = &rollout.diagnostics;
        m.set("reward", d.reward_mean);
        m.set("reward_std", d.reward_std);
        m.set("frac_reward_zero_std", d.frac_reward_zero_std);
        m.set("num_missing_rewards", d.num_missing as f64);
        m.set("learning_rate", lr);
        m.set("grad_norm", last_grad_norm);
        m.set("skipped_update", if skip { 1.0 } else { 0.0 });
        acc.write(&mut m);
        let (am, asd) = rollout.advantage_stats;
        m.set("advantage/mean", am);
        m.set("advantage/std", asd);
        if let Some((mask_sum, entropy_sum)) = token_sums {
            m.set(
                "completions/mean_length",
                mask_sum / rollout.global_rows as f64,
            );
            if let Some(s) = entropy_sum {
                m.set("entropy", s / mask_sum.max(1.0));
            }
        }
        for (key, gd) in rollout.group_keys.iter().zip(&d.groups) {
            m.set(format!("group/{key}/count"), gd.count as f64);
            if gd.count > 0 {
                m.set(format!("group/{key}/reward_mean"), gd.reward_mean);
                m.set(format!("group/{key}/advantage_mean"), gd.advantage_mean);
            }
        }
        for (key, s) in self.history.iter() {
            m.set(format!("history/{key}/mean"), s.mean);
            m.set(
                format!("history/{key}/std"),
                s.std_with(self.config.advantage.variance)
                    .unwrap_or(f64::NAN),
            );
            m.set(format!("history/{key}/n"), s.n as f64);
        }
        for (name, t) in &rollout.timings {
            m.timings.insert((*name).to_owned(), *t);
        }
        m.timings.insert("update".to_owned(), t_update);
        if self.comm.world() > 1 {
            m.timings.insert("all_reduce".to_owned(), t_all_reduce);
        }
        tracing::debug!(
            step = m.step,
            reward = m.reward(),
            loss = m.get("loss"),
            grad_norm = last_grad_norm,
            skipped = skip,
            "pgrpo step"
        );
        self.step += 1;
        Ok(m)
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
        let world = self.comm.world();
        if world == 1 {
            return self.write_checkpoint(dir.as_ref(), opts, self.reward.state()?);
        }
        self.check_replicas()?;
        // Every rank's reward state, to rank 0.
        let local = self
            .reward
            .state()
            .and_then(|s| Ok(serde_json::to_vec(&s)?));
        let all = all_ok(
            &self.comm,
            "saving its reward-function state",
            message(&local),
        );
        local?;
        let states = all?
            .iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice::<Option<serde_json::Value>>(b)
                    .map_err(|e| wire::bad_message(r, &e))
            })
            .collect::<Result<Vec<_>>>()?;
        let wrapped = RankRewardStates { world, states }.to_value();
        let written = if self.comm.is_root() {
            self.write_checkpoint(dir.as_ref(), opts, Some(wrapped))
                .map(Some)
        } else {
            Ok(None)
        };
        let local = written.as_ref().map(|p| {
            p.as_ref()
                .map(|p| p.to_string_lossy().into_owned().into_bytes())
                .unwrap_or_default()
        });
        let all = all_ok(
            &self.comm,
            "writing the checkpoint",
            local.map_err(|e| e.to_string()),
        );
        match written? {
            Some(path) => {
                all?;
                Ok(path)
            }
            None => Ok(PathBuf::from(
                String::from_utf8_lossy(&all?[0]).into_owned(),
            )),
        }
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
    /// rejects); [`Error::InvalidConfig`] if the (possibly edited) config is invalid.
    pub fn from_checkpoint(
        ckpt: Checkpoint,
        policy: P,
        mut reward: R,
        mut optimizer: O,
    ) -> Result<Self> {
        ckpt.config.validate()?;
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
        })
    }
}

/// The sampling generator of step `step` of a run seeded with `seed`: a `StdRng` seeded with
/// a SplitMix64 mix of the two, so neighbouring steps and seeds get unrelated streams.
pub fn step_rng(seed: u64, step: u64) -> StdRng {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// The sampling generator of rank `rank` at step `step` of a run seeded with `seed`: rank 0
/// uses [`step_rng(seed, step)`](step_rng), as a single process does, and rank `r > 0` the
/// same construction from a seed mixed with `r`. So a data-parallel run is reproducible for
/// a fixed number of ranks, and each rank draws its own stream.
///
/// ```
/// use pgrpo::trainer::{rank_step_rng, step_rng};
/// use rand::Rng;
/// let draw = |mut r: rand::rngs::StdRng| r.random::<u64>();
/// assert_eq!(draw(rank_step_rng(7, 3, 0)), draw(step_rng(7, 3)));
/// assert_ne!(draw(rank_step_rng(7, 3, 1)), draw(rank_step_rng(7, 3, 0)));
/// assert_eq!(draw(rank_step_rng(7, 3, 2)), draw(rank_step_rng(7, 3, 2)));
/// ```
pub fn rank_step_rng(seed: u64, step: u64, rank: usize) -> StdRng {
    if rank == 0 {
        return step_rng(seed, step);
    }
    let mut z = seed ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    step_rng(z ^ (z >> 31), step)
}

/// `Ok(bytes)` or the error's text, to send to the other ranks.
fn message(local: &Result<Vec<u8>>) -> std::result::Result<Vec<u8>, String> {
    match local {
        Ok(b) => Ok(b.clone()),
        Err(e) => Err(e.to_string()),
    }
}

/// All-gathers every rank's outcome of `what`: every rank's bytes when all succeeded, else
/// (on every rank) an error naming the first rank that failed.
fn all_ok<C: Collective + ?Sized>(
    comm: &C,
    what: &str,
    local: std::result::Result<Vec<u8>, String>,
) -> Result<Vec<Vec<u8>>> {
    let msg = match &local {
        Ok(b) => [&[0u8][..], b].concat(),
        Err(e) => [&[1u8][..], e.as_bytes()].concat(),
    };
    let all = comm.all_gather_bytes(&msg)?;
    let mut out = Vec::with_capacity(all.len());
    for (r, m) in all.into_iter().enumerate() {
        match m.split_first() {
            Some((0, body)) => out.push(body.to_vec()),
            Some((1, e)) => {
                return Err(Error::Distributed(format!(
                    "rank {r} failed {what}: {}",
                    String::from_utf8_lossy(e)
                )))
            }
            _ => return Err(wire::bad_message(r, &what)),
        }
    }
    Ok(out)
}

/// The reward-function states of every rank of a data-parallel run, as saved in a
/// checkpoint's `reward_state.json`:
/// `{"kind": "pgrpo.rank_reward_states", "world": N, "states": [s_0, …, s_{N-1}]}`.
#[derive(Debug, Clone, PartialEq)]
struct RankRewardStates {
    world: usize,
    states: Vec<Option<serde_json::Value>>,
}

const RANK_REWARD_STATES_KIND: &str = "pgrpo.rank_reward_states";

impl RankRewardStates {
    fn to_value(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": RANK_REWARD_STATES_KIND,
            "world": self.world,
            "states": self.states,
        })
    }

    /// `Some` for a data-parallel run's states, `None` for any other value (one reward
    /// function's own state).
    fn from_value(v: &serde_json::Value) -> Result<Option<Self>> {
        if v.get("kind").and_then(|k| k.as_str()) != Some(RANK_REWARD_STATES_KIND) {
            return Ok(None);
        }
        let bad = |what: &str| Error::Distributed(format!("per-rank reward states: {what}"));
        let world = v
            .get("world")
            .and_then(|w| w.as_u64())
            .filter(|&w| w >= 1)
            .ok_or_else(|| bad("no `world` >= 1"))? as usize;
        let states = v
            .get("states")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no `states` array"))?;
        if states.len() != world {
            return Err(bad(&format!(
                "{} states for a world of {world}",
                states.len()
            )));
        }
        let states = states
            .iter()
            .map(|s| (!s.is_null()).then(|| s.clone()))
            .collect();
        Ok(Some(Self { world, states }))
    }

    /// Restores rank `rank`'s state into `reward`. Stateless reward functions resume with
    /// any number of ranks; stateful ones need the number that saved them.
    fn restore_rank<Q, A, R: RewardFn<Q, A>>(
        self,
        reward: &mut R,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        if self.world != world {
            if self.states.iter().any(Option::is_some) {
                return Err(Error::Distributed(format!(
                    "the checkpoint was written by {} ranks whose reward functions have state; \
                     resume it with {} ranks (this run has {world})",
                    self.world, self.world
                )));
            }
            tracing::warn!(
                saved = self.world,
                now = world,
                "resuming a data-parallel checkpoint with another number of ranks: the run \
                 continues, but samples differently from a run with the saved number"
            );
            return Ok(());
        }
        match self.states.into_iter().nth(rank).flatten() {
            Some(state) => reward.restore(state),
            None => Ok(()),
        }
    }
}

/// One iteration's result over the whole batch.
struct Iteration {
    /// The whole batch's gradients (all-reduced).
    grads: GradStore,
    /// The whole batch's objective metrics.
    metrics: ObjectiveMetrics,
    /// The whole batch's loss.
    loss: f64,
    /// Σ of the policy's token mask over the whole batch (before masking zero-spread prompts).
    mask_sum: f64,
    /// Σ of entropy × mask over the whole batch, when the policy reports entropy.
    entropy_sum: Option<f64>,
    /// Seconds spent in the gradient all-reduce.
    t_all_reduce: f64,
}

/// `Σ mask` and `Σ entropy · mask` of log-probs.
fn token_sums(lp: &TokenLogProbs) -> Result<(f64, Option<f64>)> {
    let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let mask_sum = scalar(lp.mask.sum_all()?)?;
    let entropy = match &lp.entropy {
        Some(e) => Some(scalar((e * &lp.mask)?.sum_all()?)?),
        None => None,
    };
    Ok((mask_sum, entropy))
}

/// What one rank tells the others about its loss: the normalisers of its rows and its
/// objective metrics.
#[derive(Debug, Clone, Default)]
struct RankPart {
    /// Whether the rank has a loss (some completion token not masked out).
    has_loss: bool,
    /// `B_r`, its rows.
    rows: f64,
    /// `N_r`, its completion tokens after masking.
    tokens: f64,
    /// `T_r`, the width of its `(B, T)` log-probs.
    width: f64,
    loss: f64,
    metrics: ObjectiveMetrics,
    mask_sum: f64,
    entropy_sum: Option<f64>,
}

impl RankPart {
    fn new(rows: usize, out: Option<&ObjectiveOutput>, lp: &TokenLogProbs) -> Result<Self> {
        let (mask_sum, entropy_sum) = token_sums(lp)?;
        let width = lp.logp.dims().get(1).copied().unwrap_or(0) as f64;
        let mut part = Self {
            rows: rows as f64,
            width,
            mask_sum,
            entropy_sum,
            ..Default::default()
        };
        if let Some(out) = out {
            part.has_loss = true;
            part.tokens = out.metrics.num_tokens;
            part.loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            part.metrics = out.metrics;
        }
        Ok(part)
    }

    fn values(&self) -> [f64; 14] {
        let m = &self.metrics;
        [
            f64::from(u8::from(self.has_loss)),
            self.rows,
            self.tokens,
            self.width,
            self.loss,
            m.policy_loss,
            m.kl,
            m.approx_kl,
            m.clip_ratio_low,
            m.clip_ratio_high,
            m.clip_ratio_region,
            self.mask_sum,
            f64::from(u8::from(self.entropy_sum.is_some())),
            self.entropy_sum.unwrap_or(0.0),
        ]
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend(self.values().iter().flat_map(|x| x.to_le_bytes()));
        out
    }

    fn encode_failure(msg: &str) -> Vec<u8> {
        let mut out = vec![1u8];
        out.extend(msg.as_bytes());
        out
    }

    /// A part, or the failure message of the rank; `None` for a malformed message.
    fn decode(bytes: &[u8]) -> Option<std::result::Result<Self, String>> {
        match bytes.split_first()? {
            (0, body) => {
                let v = wire::f64s(body)?;
                let [has, rows, tokens, width, loss, pl, kl, akl, lo, hi, reg, ms, he, es] = v[..]
                else {
                    return None;
                };
                Some(Ok(Self {
                    has_loss: has != 0.0,
                    rows,
                    tokens,
                    width,
                    loss,
                    metrics: ObjectiveMetrics {
                        policy_loss: pl,
                        kl,
                        approx_kl: akl,
                        clip_ratio_low: lo,
                        clip_ratio_high: hi,
                        clip_ratio_region: reg,
                        num_tokens: tokens,
                    },
                    mask_sum: ms,
                    entropy_sum: (he != 0.0).then_some(es),
                }))
            }
            (1, msg) => Some(Err(String::from_utf8_lossy(msg).into_owned())),
            _ => None,
        }
    }
}

/// The whole batch's loss normaliser, from every rank's part: the aggregation's
/// denominator over all rows (`B`, `max(N, 1)` or `B · L`).
struct GlobalNorm {
    aggregation: LossAggregation,
    max_len: Option<usize>,
    den: f64,
    tokens: f64,
}

impl GlobalNorm {
    fn new(aggregation: LossAggregation, max_len: Option<usize>, parts: &[RankPart]) -> Self {
        let rows: f64 = parts.iter().map(|p| p.rows).sum();
        let tokens: f64 = parts.iter().map(|p| p.tokens).sum();
        let width = parts.iter().map(|p| p.width).fold(0.0, f64::max);
        let mut g = Self {
            aggregation,
            max_len,
            den: 0.0,
            tokens,
        };
        g.den = g.denominator(rows, tokens, width);
        g
    }

    /// The aggregation's denominator for `rows` rows, `tokens` tokens and width `width`
    /// (the objective module's `Normalizers`).
    fn denominator(&self, rows: f64, tokens: f64, width: f64) -> f64 {
        match self.aggregation {
            LossAggregation::Grpo => rows,
            LossAggregation::Bnpo => tokens.max(1.0),
            LossAggregation::DrGrpo => rows * self.max_len.map_or(width, |l| l as f64),
        }
    }

    /// The factor that turns a rank's loss (normalised over its rows) into its share of the
    /// whole batch's loss: `local denominator / global denominator`.
    fn weight(&self, p: &RankPart) -> f64 {
        self.denominator(p.rows, p.tokens, p.width) / self.den
    }

    /// The whole batch's objective metrics and loss: the aggregated ones (loss, policy loss)
    /// weighted as the loss, the token means weighted by each rank's tokens.
    fn metrics(&self, parts: &[RankPart]) -> (ObjectiveMetrics, f64) {
        let mut m = ObjectiveMetrics {
            num_tokens: self.tokens,
            ..Default::default()
        };
        let mut loss = 0.0;
        for p in parts.iter().filter(|p| p.has_loss) {
            let w = self.weight(p);
            let t = p.tokens.max(1.0) / self.tokens.max(1.0);
            loss += w * p.loss;
            m.policy_loss += w * p.metrics.policy_loss;
            m.kl += t * p.metrics.kl;
            m.approx_kl += t * p.metrics.approx_kl;
            m.clip_ratio_low += t * p.metrics.clip_ratio_low;
            m.clip_ratio_high += t * p.metrics.clip_ratio_high;
            m.clip_ratio_region += t * p.metrics.clip_ratio_region;
        }
        (m, loss)
    }
}

/// Rows of prompts (blocks of `g` rows) whose rewards are all equal.
fn zero_spread_rows(rewards: &[f32], g: usize) -> Vec<bool> {
    rewards
        .chunks(g)
        .flat_map(|c| {
            let z = c.iter().all(|r| r == &c[0]);
            std::iter::repeat_n(z, c.len())
        })
        .collect()
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Averages objective metrics over the iterations of one step.
#[derive(Default)]
struct ObjectiveAccumulator {
    n: f64,
    sums: [f64; 7],
}

impl ObjectiveAccumulator {
    const NAMES: [&'static str; 7] = [
        "loss",
        "policy_loss",
        "kl",
        "approx_kl",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
    ];

    fn add(&mut self, m: &ObjectiveMetrics, loss: f64) {
        let vals = [
            loss,
            m.policy_loss,
            m.kl,
            m.approx_kl,
            m.clip_ratio_low,
            m.clip_ratio_high,
            m.clip_ratio_region,
        ];
        for (s, v) in self.sums.iter_mut().zip(vals) {
            *s += v;
        }
        self.n += 1.0;
    }

    fn write(&self, m: &mut StepMetrics) {
        if self.n == 0.0 {
            return;
        }
        for (name, s) in Self::NAMES.iter().zip(self.sums) {
            m.set(*name, s / self.n);
        }
    }
}
