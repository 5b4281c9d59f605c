//! Steps 4–6 of a training step: the loss, the optimizer updates, the history, the metrics.

use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Tensor};
use candle_nn::Optimizer;

use super::{Rollout, Trainer};
use crate::distributed::{
    protocol::{self, BatchLoss, GlobalNorm},
    Collective,
};
use crate::metrics::StepMetrics;
use crate::objective::{clipped_objective, ObjectiveInputs, ObjectiveMetrics, ObjectiveOutput};
use crate::optim::{clip_grad_norm, grad_norm, lr_at};
use crate::{Error, Policy, Result, RewardFn, TokenLogProbs};

/// One iteration's result over the whole batch.
struct Iteration {
    /// The whole batch's gradients (all-reduced).
    grads: GradStore,
    /// The whole batch's loss, objective metrics and token sums.
    batch: BatchLoss,
    /// Seconds spent in the gradient all-reduce.
    t_all_reduce: f64,
}

impl<P, R, O, C> Trainer<P, R, O, C>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer,
    C: Collective,
{
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
    ///
    /// Each rank computes the loss of its rows, the ranks exchange their normalisers and
    /// metrics, and each scales its loss by its share of the whole batch's denominator before
    /// the backward pass, so that the all-reduced gradient is the whole batch's (see
    /// [`protocol`] for why one process gets exactly its own loss and gradient back).
    fn iteration(&self, rollout: &Rollout<'_, P>) -> Result<Option<Iteration>> {
        let local = self
            .policy
            .log_probs(&rollout.prompts, &rollout.completions)
            .and_then(|lp| {
                let out = match self.objective(rollout, &lp) {
                    Ok(out) => Some(out),
                    Err(Error::Empty("mask")) => None,
                    Err(e) => return Err(e),
                };
                let part = protocol::loss_part(rollout.completions.len(), out.as_ref(), &lp)?;
                Ok((out, part))
            });
        let (out, parts) = protocol::exchange_loss_parts(&self.comm, local)?;
        let Some(norm) = GlobalNorm::new(&self.config.objective, &parts) else {
            return Ok(None);
        };
        let mut grads = match &out {
            Some(out) => (&out.loss * norm.weight(&parts[self.comm.rank()]))?.backward()?,
            None => GradStore::default(),
        };
        let t = Instant::now();
        self.comm.all_reduce_gradients(&self.vars, &mut grads)?;
        Ok(Some(Iteration {
            grads,
            batch: norm.batch_loss(&parts),
            t_all_reduce: t.elapsed().as_secs_f64(),
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
                acc.add(&step.batch.metrics, step.batch.loss);
                t_all_reduce += step.t_all_reduce;
                if token_sums.is_none() {
                    token_sums = Some((step.batch.mask_sum, step.batch.entropy_sum));
                }
            }
        }
        let t_update = t0.elapsed().as_secs_f64();
        self.history
            .apply(&rollout.history_keys, rollout.deltas.clone())?;

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
        for (name, v) in &rollout.reward_metrics {
            m.set(name.as_str(), *v);
        }
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
        m.timings.insert("all_reduce".to_owned(), t_all_reduce);
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

/// Averages the loss and the objective metrics over the iterations of one step.
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
