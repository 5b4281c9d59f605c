//! Steps 4–6 of a training step: the loss, the optimizer updates, the history, the metrics.
//!
//! A rank's rows are cut into micro-batches (`steps_per_generation` of them, contiguous); an
//! optimizer update takes `gradient_accumulation_steps` consecutive ones, and a step makes
//! `num_iterations` passes over them:
//!
//! ```text
//! for pass in 0..num_iterations:
//!     for update in 0..steps_per_generation / gradient_accumulation_steps:
//!         micro-batches k = update·GA .. (update+1)·GA:  forward, backward, sum the gradients
//!         exchange the loss parts → the update's denominator; all-reduce; clip; optimizer step
//! ```
//!
//! **Why the summed gradient is the one-pass gradient.** Every aggregation divides a sum over
//! rows by a denominator `D` ([`LossAggregation::denominator`](crate::LossAggregation::denominator):
//! `B`, `max(N, 1)` or `B · L`). A micro-batch's loss is its own sum over its own
//! denominator `D_m`, so `Σ_m D_m · ∇loss_m / D` is the gradient of the whole update's loss.
//! `D` (its tokens, its widest row) is known only after every micro-batch's forward pass, so
//! each micro-batch backpropagates `D_m · loss_m`, and the sum is scaled by `1 / D` once the
//! ranks have exchanged their parts: the micro-batches of a rank combine exactly as the ranks
//! of a data-parallel run do ([`GlobalNorm`], [`protocol::merge_parts`]). An update made of one
//! micro-batch per rank backpropagates its loss times its weight `D_r / D` directly, as
//! before (bit for bit what a run without accumulation computes).

use std::ops::Range;
use std::time::Instant;

use candle_core::{backprop::GradStore, Tensor};
use candle_nn::Optimizer;

use super::undo::Undo;
use super::{Rollout, Trainer};
use crate::distributed::{
    protocol::{self, BatchLoss, GlobalNorm},
    wire::RankPart,
    Collective,
};
use crate::metrics::{self, StepMetrics};
use crate::objective::{clipped_objective, ObjectiveInputs, ObjectiveMetrics, ObjectiveOutput};
use crate::optim::{clip_grad_norm, grad_norm, lr_at, scale_grads, OptimizerState};
use crate::{Error, Policy, Result, RewardFn, RewardHistory, TokenLogProbs};

/// A contiguous block of this rank's rows that goes through the policy in one pass, with the
/// log-probs the rollout computed for it.
pub(crate) struct MicroBatch {
    /// Its rows (indices into the rollout's rows).
    pub(super) rows: Range<usize>,
    /// `(B_m, T_m)` log-probs of the sampling policy, when a step makes several optimizer
    /// updates (otherwise the current policy's, detached, are the same thing).
    pub(super) old: Option<Tensor>,
    /// `(B_m, T_m)` log-probs of the reference policy, when there is one.
    pub(super) reference: Option<Tensor>,
}

/// `n` rows cut into `k` contiguous ranges whose sizes differ by at most one (the first
/// `n mod k` are the longer ones; with `n < k` the last ones are empty).
pub(crate) fn micro_ranges(n: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.max(1);
    let (size, extra) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = size + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// One optimizer update's passes over its rows (every rank's).
struct Pass {
    /// The update's gradients (all-reduced) and loss; `None` when no rank has a completion
    /// token to learn from.
    learned: Option<(GradStore, BatchLoss)>,
    /// `Σ mask` and `Σ entropy · mask` over the update's rows.
    tokens: (f64, Option<f64>),
    /// Seconds spent in the gradient all-reduce.
    t_all_reduce: f64,
}

/// What a rank keeps from its forward passes until the exchange tells it its weight.
enum Local {
    /// One micro-batch: its loss (`None`: nothing to learn from), backpropagated once its
    /// weight is known.
    Loss(Option<ObjectiveOutput>),
    /// Several: the sum of the micro-batches' gradients of `D_m · loss_m`.
    Summed(GradStore),
}

/// What the optimizer updates of a step did.
#[derive(Default)]
struct Outcome {
    acc: ObjectiveAccumulator,
    /// Updates made (the others had nothing to learn from).
    applied: usize,
    grad_norm: Option<f64>,
    /// `Σ mask`, `Σ entropy · mask` over the batch (first pass).
    tokens: Option<(f64, Option<f64>)>,
    t_all_reduce: f64,
}

impl<P, R, O, C> Trainer<P, R, O, C>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer + OptimizerState,
    C: Collective,
{
    /// The loss of the current policy on `rollout` (differentiable w.r.t. the policy's vars),
    /// with the policy's per-token log-probs, in one pass over all of the rollout's rows (not
    /// micro-batched). In a data-parallel run: the loss of this rank's rows, normalised over
    /// them (see [`gradients`](Self::gradients) for the whole batch's).
    pub fn loss(&self, rollout: &Rollout<'_, P>) -> Result<(ObjectiveOutput, TokenLogProbs)> {
        let lp = self
            .policy
            .log_probs(&rollout.prompts, &rollout.completions)?;
        let width = lp.logp.dims().get(1).copied().unwrap_or(0);
        let old = stitch(rollout.micro.iter().map(|m| m.old.as_ref()), width)?;
        let reference = stitch(rollout.micro.iter().map(|m| m.reference.as_ref()), width)?;
        let rows = 0..rollout.prompts.len();
        let out = self.objective(rollout, rows, old.as_ref(), reference.as_ref(), &lp)?;
        Ok((out, lp))
    }

    /// The clipped objective of `rollout`'s rows `rows` given their log-probs `lp` and, when
    /// the rollout computed them, their sampling-policy and reference log-probs.
    fn objective(
        &self,
        rollout: &Rollout<'_, P>,
        rows: Range<usize>,
        old: Option<&Tensor>,
        reference: Option<&Tensor>,
        lp: &TokenLogProbs,
    ) -> Result<ObjectiveOutput> {
        let dev = lp.logp.device().clone();
        let old_logp = match old {
            Some(o) => fit_width(o, lp.logp.dims().get(1).copied().unwrap_or(0))?,
            None => lp.logp.detach(),
        };
        // Dropped rows (masked prompts, truncated completions) leave the batch through the
        // objective's row mask: their tokens leave `N` and their rows `B`, under every
        // aggregation.
        let dropped = &rollout.dropped_rows[rows.clone()];
        let keep: Vec<bool> = dropped.iter().map(|&d| !d).collect();
        let row_mask = dropped.iter().any(|&d| d).then_some(keep.as_slice());
        let advantages = &rollout.advantages[rows];
        let advantages = Tensor::from_slice(advantages, advantages.len(), &dev)?;
        let entropy = match (self.config.objective.needs_entropy(), &lp.entropy) {
            (false, _) => None,
            (true, Some(e)) => {
                // The bonus needs the entropy's gradient; a detached entropy (LmPolicy's)
                // would leave it out of the update without a word.
                if self.config.objective.entropy_coef != 0.0 && lp.logp.track_op() && !e.track_op()
                {
                    return Err(Error::InvalidConfig {
                        field: "objective.entropy_coef",
                        reason: "the entropy bonus needs a per-token entropy that carries the \
                                 policy's gradient, and this policy's log_probs returns a \
                                 detached one (top_entropy_quantile works with it)"
                            .into(),
                    });
                }
                Some(e)
            }
            (true, None) => {
                return Err(Error::InvalidConfig {
                    field: "objective",
                    reason: "entropy_coef or top_entropy_quantile needs the policy's per-token \
                             entropy, and this policy's log_probs returns none"
                        .into(),
                })
            }
        };
        clipped_objective(
            &self.config.objective,
            &ObjectiveInputs {
                logp: &lp.logp,
                old_logp: &old_logp,
                ref_logp: reference,
                mask: &lp.mask,
                advantages: &advantages,
                entropy,
                row_mask,
            },
        )
    }

    /// The gradient of the whole rollout's loss (all its rows: every micro-batch, every rank)
    /// w.r.t. each of [`Policy::vars`] (in that order; zeros for a var the loss does not
    /// reach), before clipping. With `gradient_accumulation_steps` micro-batches it is summed
    /// over them as [`update`](Self::update) does; when a rollout makes one optimizer update
    /// (`steps_per_generation` unset) it is the gradient that update applies. In a
    /// data-parallel run it is the all-reduced gradient, equal (to `f32` rounding) to the
    /// gradient one process would compute on all the rows; collective (every rank must call
    /// it).
    ///
    /// # Errors
    /// [`Error::Empty`]`("mask")` when the batch has no completion token to learn from;
    /// errors of the policy and the objective.
    pub fn gradients(&self, rollout: &Rollout<'_, P>) -> Result<Vec<Tensor>> {
        let pass = self.pass(rollout, 0..rollout.micro.len())?;
        let (grads, _) = pass.learned.ok_or(Error::Empty("mask"))?;
        self.vars
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }

    /// Micro-batch `k`'s loss (`None`: no completion token to learn from) and loss part.
    fn micro_loss(
        &self,
        rollout: &Rollout<'_, P>,
        k: usize,
    ) -> Result<(Option<ObjectiveOutput>, RankPart)> {
        let mb = &rollout.micro[k];
        if mb.rows.is_empty() {
            return Ok((None, RankPart::default()));
        }
        let rows = mb.rows.clone();
        let lp = self.policy.log_probs(
            &rollout.prompts[rows.clone()],
            &rollout.completions[rows.clone()],
        )?;
        let out = match self.objective(
            rollout,
            rows.clone(),
            mb.old.as_ref(),
            mb.reference.as_ref(),
            &lp,
        ) {
            Ok(out) => Some(out),
            Err(Error::Empty("mask")) => None,
            Err(e) => return Err(e),
        };
        // Rows masked out of the loss leave `B` on every rank's part too.
        let kept = rows.len() - rollout.dropped_rows[rows].iter().filter(|&&d| d).count();
        let part = protocol::loss_part(kept, out.as_ref(), &lp)?;
        Ok((out, part))
    }

    /// Forward (and, for several micro-batches, backward) passes over micro-batches `ks`:
    /// what the rank keeps and the loss part it sends.
    fn local_passes(
        &self,
        rollout: &Rollout<'_, P>,
        ks: Range<usize>,
    ) -> Result<(Local, RankPart)> {
        if ks.len() == 1 {
            let (out, part) = self.micro_loss(rollout, ks.start)?;
            return Ok((Local::Loss(out), part));
        }
        let mut sum = GradStore::default();
        let mut parts = Vec::with_capacity(ks.len());
        for k in ks {
            let (out, part) = self.micro_loss(rollout, k)?;
            if let Some(out) = out {
                let own = protocol::own_denominator(&self.config.objective, &part);
                sum.extend((&out.loss * own)?.backward()?)?;
            }
            parts.push(part);
        }
        let merged = protocol::merge_parts(&self.config.objective, &parts);
        Ok((Local::Summed(sum), merged))
    }

    /// One optimizer update's gradient over micro-batches `ks` of every rank.
    ///
    /// Each rank runs its micro-batches, the ranks exchange their loss parts, and each scales
    /// its gradient by its share of the whole update's denominator (see the
    /// [module docs](self), and [`protocol`] for why one process gets exactly its own loss and
    /// gradient back).
    fn pass(&self, rollout: &Rollout<'_, P>, ks: Range<usize>) -> Result<Pass> {
        let local = self.local_passes(rollout, ks);
        let (local, parts) = protocol::exchange_loss_parts(&self.comm, local)?;
        let tokens = protocol::token_sums(&parts);
        let Some(norm) = GlobalNorm::new(&self.config.objective, &parts) else {
            return Ok(Pass {
                learned: None,
                tokens,
                t_all_reduce: 0.0,
            });
        };
        let mut grads = match local {
            Local::Loss(Some(out)) => {
                (&out.loss * norm.weight(&parts[self.comm.rank()]))?.backward()?
            }
            Local::Loss(None) => GradStore::default(),
            Local::Summed(mut sum) => {
                scale_grads(&self.vars, &mut sum, 1.0 / norm.denominator())?;
                sum
            }
        };
        let t = Instant::now();
        self.comm.all_reduce_gradients(&self.vars, &mut grads)?;
        Ok(Pass {
            learned: Some((grads, norm.batch_loss(&parts))),
            tokens,
            t_all_reduce: t.elapsed().as_secs_f64(),
        })
    }

    /// Every optimizer update of a step, in order: `num_iterations` passes over the
    /// micro-batches, `gradient_accumulation_steps` of them per update.
    fn optimize(&mut self, rollout: &Rollout<'_, P>) -> Result<Outcome> {
        let ga = self.config.gradient_accumulation_steps;
        let per_pass = self.config.optimizer_steps_per_generation();
        let mut o = Outcome::default();
        for it in 0..self.config.num_iterations {
            for u in 0..per_pass {
                let pass = self.pass(rollout, u * ga..(u + 1) * ga)?;
                if it == 0 {
                    let (m, e) = o.tokens.unwrap_or((-0.0, None));
                    let e = match (e, pass.tokens.1) {
                        (Some(a), Some(b)) => Some(a + b),
                        (a, b) => a.or(b),
                    };
                    o.tokens = Some((m + pass.tokens.0, e));
                }
                o.t_all_reduce += pass.t_all_reduce;
                let Some((mut grads, batch)) = pass.learned else {
                    continue;
                };
                // The gradient is the whole batch's, the same on every rank: so is every
                // decision below.
                let norm = match self.config.max_grad_norm {
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
                o.grad_norm = Some(norm);
                o.applied += 1;
                o.acc.add(&batch.metrics, batch.loss);
            }
        }
        Ok(o)
    }

    /// Errors once the run has done its `max_steps` steps.
    pub(super) fn check_budget(&self) -> Result<()> {
        match self.config.max_steps {
            Some(max) if self.step >= max => Err(Error::InvalidConfig {
                field: "max_steps",
                reason: format!(
                    "the run has done its {max} steps (TRL stops training at max_steps, and the \
                     learning-rate schedule ends there); to train on, raise max_steps in the \
                     checkpoint's config (Checkpoint::load, then Trainer::from_checkpoint)"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The reference weights after this step's TR-DPO mix, `α · π_θ + (1 − α) · π_ref`, when
    /// the step ends a `ref_model_sync_steps` period; computed, not yet set.
    fn reference_mix(&self) -> Result<Option<Vec<Tensor>>> {
        let c = &self.config;
        if !c.sync_ref_model || !(self.step + 1).is_multiple_of(c.ref_model_sync_steps) {
            return Ok(None);
        }
        let Some(reference) = &self.reference else {
            return Ok(None);
        };
        let a = c.ref_model_mixup_alpha;
        reference
            .vars()
            .iter()
            .zip(&self.vars)
            .map(|(r, p)| {
                let p = p.as_tensor().to_dtype(r.dtype())?;
                Ok(((r.as_tensor() * (1.0 - a))? + (p * a)?)?)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Steps 4–6: the step's optimizer updates on `rollout` (`num_iterations` passes of
    /// `steps_per_generation / gradient_accumulation_steps` updates, each summed over
    /// `gradient_accumulation_steps` micro-batches), then fold its rewards into the history,
    /// mix the reference when due (`sync_ref_model`), and return the step's metrics.
    ///
    /// **All or nothing.** A step either completes — weights, optimizer state, history,
    /// reference and step number all move on — or returns an error with all of them as they
    /// were, so that retrying it samples from the same weights. When a step makes several
    /// optimizer updates (or mixes the reference), the trainer copies the trainable weights
    /// and exports the optimizer's state before the first update and puts them back on error:
    /// for AdamW that is three copies of the trainable weights (weights, both moments), held
    /// during the step (for LoRA, of the adapters only). A step with one update and no mix
    /// takes no copy: the history fold is checked before the update and nothing after it can
    /// fail.
    ///
    /// # Errors
    /// As [`step`](Self::step); [`Error::InvalidConfig`] naming `max_steps` once the run has
    /// done its `max_steps` steps; [`Error::OptimizerState`] when the step would need an
    /// undo copy and the optimizer cannot export its state (e.g. `candle_nn::AdamW`: use
    /// [`pgrpo::optim::AdamW`](crate::optim::AdamW), the same update). A non-finite gradient
    /// norm stops the step before that update's optimizer step. An update whose rows have
    /// nothing to learn from (every prompt masked, or no completion token) is skipped
    /// (`skipped_update` counts it); the rewards are still folded into the history.
    pub fn update(&mut self, rollout: Rollout<'_, P>) -> Result<StepMetrics> {
        let t0 = Instant::now();
        self.check_budget()?;
        // Folding the history must not fail once the weights changed: try the fold on an
        // empty history of the same kind first (it checks everything before folding).
        RewardHistory::new(self.history.kind())?
            .apply(&rollout.history_keys, rollout.deltas.clone())?;
        let lr = lr_at(
            self.config.lr_scheduler,
            self.config.learning_rate,
            self.step,
            self.config.warmup_steps,
            self.config.max_steps,
        );
        self.optimizer.set_learning_rate(lr);
        let planned = self.config.optimizer_steps_per_step();
        let mixes = self.config.sync_ref_model
            && (self.step + 1).is_multiple_of(self.config.ref_model_sync_steps);
        let undo = if !rollout.all_masked && (planned > 1 || mixes) {
            Some(Undo::take(&self.vars, &self.optimizer, planned)?)
        } else {
            None
        };
        let outcome = if rollout.all_masked {
            Ok(Outcome::default())
        } else {
            self.optimize(&rollout)
        };
        let (outcome, mixed) = match outcome.and_then(|o| Ok((o, self.reference_mix()?))) {
            Ok(done) => done,
            Err(e) => {
                return Err(match undo {
                    Some(u) => u.restore(&self.vars, &mut self.optimizer, e),
                    None => e,
                })
            }
        };
        drop(undo);
        // Nothing below can fail: the fold was checked, the mix's shapes were checked when
        // the trainer was built.
        self.history
            .apply(&rollout.history_keys, rollout.deltas.clone())?;
        if let (Some(mixed), Some(reference)) = (mixed, &self.reference) {
            for (v, w) in reference.vars().iter().zip(&mixed) {
                v.set(w)?;
            }
        }
        let t_update = t0.elapsed().as_secs_f64();
        let m = self.step_metrics(&rollout, lr, &outcome, planned, t_update);
        self.step += 1;
        Ok(m)
    }

    /// The metrics of the step just made.
    fn step_metrics(
        &self,
        rollout: &Rollout<'_, P>,
        lr: f64,
        o: &Outcome,
        planned: usize,
        t_update: f64,
    ) -> StepMetrics {
        let mut m = StepMetrics {
            step: self.step,
            ..Default::default()
        };
        let d = &rollout.diagnostics;
        m.set("reward", d.reward_mean);
        m.set("reward_std", d.reward_std);
        for (name, v) in &rollout.reward_metrics {
            m.set(name.as_str(), *v);
        }
        m.set("frac_reward_zero_std", d.frac_reward_zero_std);
        m.set("num_missing_rewards", d.num_missing as f64);
        m.set("learning_rate", lr);
        m.set("grad_norm", o.grad_norm.unwrap_or(f64::NAN));
        m.set(
            "skipped_update",
            (planned - o.applied.min(planned)) as f64 / planned.max(1) as f64,
        );
        o.acc.write(&mut m);
        let (am, asd) = rollout.advantage_stats;
        m.set("advantage/mean", am);
        m.set("advantage/std", asd);
        if let Some((mask_sum, entropy_sum)) = o.tokens {
            m.set(
                "completions/mean_length",
                mask_sum / rollout.global_rows as f64,
            );
            if let Some(s) = entropy_sum {
                m.set("entropy", s / mask_sum.max(1.0));
            }
        }
        metrics::write_groups(
            &mut m,
            &rollout.group_keys,
            &d.groups,
            &self.history,
            &self.config.group_metrics,
            self.config.advantage.variance,
        );
        for (name, t) in &rollout.timings {
            m.timings.insert((*name).to_owned(), *t);
        }
        m.timings.insert("update".to_owned(), t_update);
        m.timings.insert("all_reduce".to_owned(), o.t_all_reduce);
        let rollout_time = m.timings.get("rollout").copied().unwrap_or(0.0);
        m.timings
            .insert("total".to_owned(), rollout_time + t_update);
        tracing::debug!(
            step = m.step,
            reward = m.reward(),
            loss = m.get("loss"),
            grad_norm = m.get("grad_norm"),
            updates = o.applied,
            "pgrpo step"
        );
        m
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
    /// The micro-batches of this rank's rows (`prompts`, `completions`), with the
    /// sampling-policy log-probs when a step makes several optimizer updates and the reference
    /// log-probs when there is a reference, computed micro-batch by micro-batch (so that they
    /// take one micro-batch's memory at a time).
    pub(super) fn micro_batches(
        &self,
        prompts: &[&P::Prompt],
        completions: &[P::Completion],
        sampled: Option<&TokenLogProbs>,
    ) -> Result<Vec<MicroBatch>> {
        let needs_old = self.config.optimizer_steps_per_step() > 1;
        micro_ranges(prompts.len(), self.config.micro_batches_per_generation())
            .into_iter()
            .map(|rows| {
                let (p, c) = (&prompts[rows.clone()], &completions[rows.clone()]);
                let some = !rows.is_empty();
                let old = match (needs_old && some, sampled) {
                    (false, _) => None,
                    (true, Some(lp)) => Some(lp.logp.narrow(0, rows.start, rows.len())?),
                    (true, None) => Some(self.policy.log_probs_detached(p, c)?.logp),
                };
                let reference = match &self.reference {
                    Some(r) if some => Some(r.log_probs_detached(p, c)?.logp),
                    _ => None,
                };
                Ok(MicroBatch {
                    rows,
                    old,
                    reference,
                })
            })
            .collect()
    }
}

/// `t` `(B, T')` as `(B, width)`: columns beyond `width` dropped (the sampler's log-probs are
/// as wide as the whole batch's longest completion; past this micro-batch's own longest they
/// are padding for every one of its rows) or zero columns appended (padding, masked out).
fn fit_width(t: &Tensor, width: usize) -> Result<Tensor> {
    let w = t.dims().get(1).copied().unwrap_or(0);
    Ok(match w.cmp(&width) {
        std::cmp::Ordering::Equal => t.clone(),
        std::cmp::Ordering::Greater => t.narrow(1, 0, width)?,
        std::cmp::Ordering::Less => t.pad_with_zeros(1, 0, width - w)?,
    })
}

/// The micro-batches' `(B_m, T_m)` tensors (`None` for an empty micro-batch) as one
/// `(B, width)` tensor, each zero-padded to `width` (padding positions are masked out);
/// `None` when no micro-batch has one.
fn stitch<'t>(
    parts: impl Iterator<Item = Option<&'t Tensor>>,
    width: usize,
) -> Result<Option<Tensor>> {
    let parts: Vec<&Tensor> = parts.flatten().collect();
    match parts.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one).clone())),
        many => {
            let padded = many
                .iter()
                .map(|t| {
                    let w = t.dims().get(1).copied().unwrap_or(0);
                    if w > width {
                        return Err(Error::ShapeMismatch {
                            what: "micro-batch log-probs",
                            expected: vec![t.dims()[0], width],
                            got: t.dims().to_vec(),
                        });
                    }
                    fit_width(t, width)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Tensor::cat(&padded, 0)?))
        }
    }
}

/// Averages the loss and the objective metrics over the optimizer updates of one step.
#[derive(Default)]
struct ObjectiveAccumulator {
    n: f64,
    loss: f64,
    /// Sums of [`ObjectiveMetrics::values`].
    sums: [f64; ObjectiveMetrics::NAMES.len()],
}

impl ObjectiveAccumulator {
    fn add(&mut self, m: &ObjectiveMetrics, loss: f64) {
        self.loss += loss;
        for (s, v) in self.sums.iter_mut().zip(m.values()) {
            *s += v;
        }
        self.n += 1.0;
    }

    fn write(&self, m: &mut StepMetrics) {
        if self.n == 0.0 {
            return;
        }
        m.set("loss", self.loss / self.n);
        for (name, s) in ObjectiveMetrics::NAMES.iter().zip(self.sums) {
            m.set(*name, s / self.n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_ranges_cover_the_rows_in_order() {
        assert_eq!(micro_ranges(10, 1), vec![(0..10)]);
        assert_eq!(micro_ranges(10, 4), [0..3, 3..6, 6..8, 8..10]);
        assert_eq!(micro_ranges(2, 4), [0..1, 1..2, 2..2, 2..2]);
        assert_eq!(micro_ranges(0, 2), [0..0, 0..0]);
    }
}
