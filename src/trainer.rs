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
//! [`Trainer::save`] writes a [checkpoint](crate::checkpoint) and [`Trainer::resume`]
//! continues from one exactly: the same metrics and bit-identical weights as a run that never
//! stopped (on the same device).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use candle_nn::Optimizer;
use rand::{rngs::StdRng, SeedableRng};

use crate::checkpoint::{self, files, Checkpoint, CheckpointOptions};
use crate::error::CheckpointProblem;
use crate::metrics::StepMetrics;
use crate::objective::{clipped_objective, ObjectiveInputs, ObjectiveOutput};
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
    /// What the advantage computation saw.
    pub diagnostics: AdvantageDiagnostics,
    deltas: BatchDeltas,
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
pub struct Trainer<P: Policy, R, O = AdamW> {
    policy: P,
    reference: Option<P>,
    reward: R,
    optimizer: O,
    vars: Vec<Var>,
    history: RewardHistory,
    config: TrainerConfig,
    step: u64,
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
        })
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
    /// ([`step_rng`]), so a run's randomness is fixed by the seed and the step number alone:
    /// nothing to save for an exact resume. The history is not changed.
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty batch, then as [`step`](Self::step).
    pub fn rollout<'a>(&mut self, batch: &'a [GroupedPrompt<P::Prompt>]) -> Result<Rollout<'a, P>> {
        if batch.is_empty() {
            return Err(Error::Empty("batch"));
        }
        let g = self.config.num_generations;
        let t0 = Instant::now();
        let prompts: Vec<P::Prompt> = batch.iter().map(|b| b.prompt.clone()).collect();
        let mut rng = step_rng(self.config.seed, self.step);
        let completions = self.policy.sample(&prompts, g, &mut rng)?;
        if completions.len() != batch.len() * g {
            return Err(Error::LengthMismatch {
                what: "sampled completions",
                got: completions.len(),
                against: "prompts × num_generations",
                expected: batch.len() * g,
            });
        }
        let t_sample = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let n = completions.len();
        let mut row_prompts = Vec::with_capacity(n);
        let mut rewards = Vec::with_capacity(n);
        let mut prompt_ids = Vec::with_capacity(n);
        let mut group_ids = Vec::with_capacity(n);
        let mut group_keys: Vec<GroupKey> = Vec::new();
        let mut key_index: HashMap<&GroupKey, u32> = HashMap::new();
        for (row, c) in completions.iter().enumerate() {
            let item = &batch[row / g];
            rewards.push(self.reward.score(&item.prompt, c, &item.group)?);
            row_prompts.push(&item.prompt);
            prompt_ids.push((row / g) as u32);
            let gid = *key_index.entry(&item.group).or_insert_with(|| {
                group_keys.push(item.group.clone());
                group_keys.len() as u32 - 1
            });
            group_ids.push(gid);
        }
        let t_reward = t1.elapsed().as_secs_f64();

        let adv = self.config.advantage.compute(
            &RolloutRewards {
                rewards: &rewards,
                prompt_ids: &prompt_ids,
                group_ids: &group_ids,
                group_keys: &group_keys,
            },
            &self.history,
        )?;

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
        let zero_std_rows = if self.config.mask_zero_std_prompts {
            zero_spread_rows(&rewards, g)
        } else {
            vec![false; n]
        };
        Ok(Rollout {
            prompts: row_prompts,
            completions,
            rewards,
            advantages: adv.values,
            prompt_ids,
            group_ids,
            group_keys,
            diagnostics: adv.diagnostics,
            deltas: adv.deltas,
            old,
            reference,
            zero_std_rows,
            timings: vec![
                ("sample", t_sample),
                ("reward", t_reward),
                ("old_logp", t_old),
            ],
        })
    }

    /// The loss of the current policy on `rollout` (differentiable w.r.t. the policy's vars),
    /// with the policy's per-token log-probs.
    pub fn loss(&self, rollout: &Rollout<'_, P>) -> Result<(ObjectiveOutput, TokenLogProbs)> {
        let lp = self
            .policy
            .log_probs(&rollout.prompts, &rollout.completions)?;
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
        let out = clipped_objective(
            &self.config.objective,
            &ObjectiveInputs {
                logp: &lp.logp,
                old_logp: &old_logp,
                ref_logp: rollout.reference.as_ref(),
                mask: &mask,
                advantages: &advantages,
            },
        )?;
        Ok((out, lp))
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
        let mut skip = rollout.zero_std_rows.iter().all(|&z| z);
        let mut acc = ObjectiveAccumulator::default();
        let mut last_grad_norm = f64::NAN;
        let mut first_lp: Option<TokenLogProbs> = None;
        if !skip {
            for it in 0..self.config.num_iterations {
                let (out, lp) = match self.loss(&rollout) {
                    Err(Error::Empty("mask")) if it == 0 => {
                        skip = true;
                        break;
                    }
                    r => r?,
                };
                let mut grads = out.loss.backward()?;
                last_grad_norm = match self.config.max_grad_norm {
                    Some(max) => clip_grad_norm(&self.vars, &mut grads, max)?,
                    None => {
                        let n = grad_norm(&self.vars, &grads)?;
                        if !n.is_finite() {
                            return Err(Error::NonFiniteGradient { norm: n });
                        }
                        n
                    }
                };
                self.optimizer.step(&grads)?;
                acc.add(&out, out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
                if first_lp.is_none() {
                    first_lp = Some(lp.detach());
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
        let (am, asd) = mean_std(&rollout.advantages);
        m.set("advantage/mean", am);
        m.set("advantage/std", asd);
        if let Some(lp) = &first_lp {
            let mask_sum = lp
                .mask
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            m.set(
                "completions/mean_length",
                mask_sum / rollout.completions.len() as f64,
            );
            if let Some(e) = &lp.entropy {
                let s = (e * &lp.mask)?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
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

impl<P, R, O> Trainer<P, R, O>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer + OptimizerState,
{
    /// Saves a checkpoint of the run into the run directory `dir`, as
    /// `dir/checkpoint-NNNNNNNNN/` (the step number), and points `dir/latest` at it.
    /// Atomic: see [the checkpoint module](crate::checkpoint). Returns the checkpoint's
    /// directory.
    ///
    /// With an optimizer that cannot export its state the checkpoint is written but marked
    /// inexact, and resuming it needs [`Checkpoint::with_fresh_optimizer`].
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file that could not be written (the previous
    /// checkpoint stays intact), errors of the reward function's or optimizer's state export.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        self.save_with(dir, &CheckpointOptions::default())
    }

    /// [`save`](Self::save) with options (e.g. keep only the last `n` checkpoints).
    ///
    /// # Errors
    /// As [`save`](Self::save); [`Error::InvalidConfig`] for `keep_last = Some(0)`.
    pub fn save_with(&self, dir: impl AsRef<Path>, opts: &CheckpointOptions) -> Result<PathBuf> {
        checkpoint::write(
            dir.as_ref(),
            checkpoint::Parts {
                step: self.step,
                config: &self.config,
                history: &self.history,
                vars: &self.vars,
                reference: self.reference.as_ref().map(|r| r.vars()),
                optimizer: self.optimizer.export_state()?,
                reward_state: self.reward.state()?,
            },
            opts,
        )
    }

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
        if let Some(state) = ckpt.reward_state.clone() {
            reward.restore(state).map_err(|e| Error::Checkpoint {
                path: ckpt.file(files::REWARD_STATE),
                problem: CheckpointProblem::Invalid(e.to_string()),
            })?;
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

    fn add(&mut self, out: &ObjectiveOutput, loss: f64) {
        let m = &out.metrics;
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
