//! Steps 1–3 of a training step: sample, score, turn rewards into advantages.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use candle_nn::Optimizer;
use rand::rngs::StdRng;

use super::update::MicroBatch;
use super::Trainer;
use crate::advantage::{AdvantageDiagnostics, RewardParts};
use crate::distributed::{protocol, shard, Collective};
use crate::history::BatchDeltas;
use crate::reward::RewardInput;
use crate::rng::rank_step_rng;
use crate::{Error, GroupKey, Policy, Result, RewardFn, RolloutRewards, TokenLogProbs};

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

    /// A prompt without a preference-group label, for plain GRPO: it goes in the one
    /// default group `"all"` ([`GroupKey::Name`]), shared by every ungrouped prompt.
    ///
    /// With a per-prompt estimator (GRPO) the group plays no part; with P-GRPO every
    /// ungrouped prompt is normalised against one shared reward history; metrics name the
    /// group `all` (`group/all/reward_mean`).
    ///
    /// ```
    /// use pgrpo::{GroupKey, GroupedPrompt};
    /// let p = GroupedPrompt::ungrouped("What is 2 + 2?");
    /// assert_eq!(p.group, GroupKey::from("all"));
    /// ```
    pub fn ungrouped(prompt: T) -> Self {
        Self::new(prompt, "all")
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
    /// `(N,)` rewards: the weighted sum of the reward functions' scores.
    pub rewards: Vec<f32>,
    /// `(N, F)` each reward function's unweighted score, row-major (`F = 1` for a single
    /// function: then equal to `rewards` up to its weight), in the order of `reward_names`.
    pub reward_parts: Vec<f32>,
    /// `(F,)` the reward functions' names ([`RewardFn::parts`]).
    pub reward_names: Vec<String>,
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
    pub(super) deltas: BatchDeltas,
    /// The history keys `deltas` is aligned with (the batch's groups, then per-function keys
    /// under `normalize_then_sum`).
    pub(super) history_keys: Vec<GroupKey>,
    /// Per reward function: `rewards/<name>/mean` and `rewards/<name>/std` over the whole
    /// batch (TRL's names).
    pub(super) reward_metrics: Vec<(String, f64)>,
    /// Mean and std of the whole batch's advantages.
    pub(super) advantage_stats: (f64, f64),
    /// Rows in the whole batch.
    pub(super) global_rows: usize,
    /// Whether every prompt of the whole batch is masked out (nothing to learn from).
    pub(super) all_masked: bool,
    /// This rank's rows cut into micro-batches, with their old and reference log-probs.
    pub(super) micro: Vec<MicroBatch>,
    /// This rank's rows that leave the loss: masked prompts and truncated completions.
    pub(super) dropped_rows: Vec<bool>,
    pub(super) timings: Vec<(&'static str, f64)>,
}

impl<P, R, O, C> Trainer<P, R, O, C>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
    O: Optimizer,
    C: Collective,
{
    /// Steps 1–3: sample, score, compute advantages (and the old/reference log-probs the
    /// update needs). Sampling draws from a generator derived from `(config.seed, step)`
    /// ([`step_rng`](crate::rng::step_rng); rank `r` of a data-parallel run uses
    /// [`rank_step_rng`]), so a run's randomness is fixed by the seed and the step number
    /// alone: nothing to save for an exact resume. The history is not changed.
    ///
    /// In a data-parallel run this rank samples and scores its shard of `batch` only; the
    /// rewards of all ranks are then all-gathered and the advantages computed on the whole
    /// batch (see [`distributed`](crate::distributed)). One process is the world of one: its
    /// shard is the whole batch, and the exchange hands back its own rewards.
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
        let shard = shard(batch.len(), rank, world);
        let t0 = Instant::now();
        let mut rng = rank_step_rng(self.config.seed, self.step, rank);
        let parts = self.reward.parts();
        let f = parts.len();
        let local = self.sample_and_score(&batch[shard.clone()], g, f, &mut rng);
        let t_local = t0.elapsed().as_secs_f64();
        // Every rank needs every reward function's score of every row (`g · F` per prompt).
        let t1 = Instant::now();
        let fp = protocol::batch_fingerprint(self.step, batch.iter().map(|item| &item.group));
        let local = local.map(|(completions, sampled, scores, t_reward)| {
            ((completions, sampled, t_reward), scores)
        });
        let ((completions, sampled, t_reward), scores) =
            protocol::exchange_rewards(&self.comm, fp, batch.len(), g * f, local)?;
        let t_exchange = t1.elapsed().as_secs_f64();
        let t_sample = t_local - t_reward;
        let names: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
        let weights: Vec<f32> = parts.iter().map(|p| p.weight).collect();
        let reward_parts = RewardParts {
            scores: &scores,
            names: &names,
            weights: &weights,
        };
        let rewards = reward_parts.combined();
        let reward_metrics = part_metrics(&reward_parts);

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

        let labelled = RolloutRewards {
            rewards: &rewards,
            prompt_ids: &prompt_ids,
            group_ids: &group_ids,
            group_keys: &group_keys,
        };
        let cfg = &self.config.advantage;
        let adv = match &self.estimator {
            Some(e) => {
                cfg.compute_parts_with(e.as_ref(), &labelled, &reward_parts, &self.history)?
            }
            None => cfg.compute_parts(&labelled, &reward_parts, &self.history)?,
        };
        let history_keys = cfg.history_keys(&group_keys, &names);
        let advantage_stats = mean_std(&adv.values);
        let zero_std = if self.config.mask_zero_std_prompts {
            zero_spread_rows(&rewards, g)
        } else {
            vec![false; n]
        };
        let all_masked = zero_std.iter().all(|&z| z);

        // This rank's rows.
        let rows = shard.start * g..shard.end * g;
        let row_prompts: Vec<&P::Prompt> = rows.clone().map(|r| &batch[r / g].prompt).collect();
        let t2 = Instant::now();
        // The sampler's own log-probs serve as the old log-probs when it has them (no
        // second forward pass).
        let micro = self.micro_batches(&row_prompts, &completions, sampled.as_ref())?;
        let t_old = t2.elapsed().as_secs_f64();
        // Rows that leave the loss: masked prompts (known to every rank) and this rank's
        // truncated completions.
        let mut dropped = keep_rows(zero_std, &rows);
        if self.config.mask_truncated_completions {
            for (d, c) in dropped.iter_mut().zip(&completions) {
                *d |= self.policy.is_truncated(c);
            }
        }
        Ok(Rollout {
            prompts: row_prompts,
            completions,
            rewards: keep_rows(rewards, &rows),
            reward_parts: keep_rows(scores, &(rows.start * f..rows.end * f)),
            reward_names: names,
            advantages: keep_rows(adv.values, &rows),
            prompt_ids: keep_rows(prompt_ids, &rows),
            group_ids: keep_rows(group_ids, &rows),
            group_keys,
            diagnostics: adv.diagnostics,
            deltas: adv.deltas,
            history_keys,
            reward_metrics,
            advantage_stats,
            global_rows: n,
            all_masked,
            micro,
            dropped_rows: dropped,
            timings: vec![
                ("sample", t_sample),
                ("reward", t_reward),
                ("exchange_rewards", t_exchange),
                ("old_logp", t_old),
                ("rollout", t0.elapsed().as_secs_f64()),
            ],
        })
    }

    /// Samples `g` completions for each prompt of `batch` and scores them in one
    /// [`RewardFn::score_parts`] call: the completions, the sampler's log-probs of them (asked
    /// for only when a step makes several optimizer updates and needs old log-probs; `None`
    /// when the policy has none), each reward function's score of each row (`(rows, f)`,
    /// row-major) and the seconds spent scoring.
    #[allow(clippy::type_complexity)]
    fn sample_and_score(
        &mut self,
        batch: &[GroupedPrompt<P::Prompt>],
        g: usize,
        f: usize,
        rng: &mut StdRng,
    ) -> Result<(Vec<P::Completion>, Option<TokenLogProbs>, Vec<f32>, f64)> {
        let prompts: Vec<P::Prompt> = batch.iter().map(|b| b.prompt.clone()).collect();
        let (completions, sampled) = if self.config.optimizer_steps_per_step() > 1 {
            self.policy.sample_with_log_probs(&prompts, g, rng)?
        } else {
            (self.policy.sample(&prompts, g, rng)?, None)
        };
        if completions.len() != batch.len() * g {
            return Err(Error::LengthMismatch {
                what: "sampled completions",
                got: completions.len(),
                against: "prompts × num_generations",
                expected: batch.len() * g,
            });
        }
        if let Some(lp) = &sampled {
            let want = [
                completions.len(),
                lp.logp.dims().get(1).copied().unwrap_or(0),
            ];
            let parts = [
                ("sampled log-probs", &lp.logp),
                ("sampled log-probs' mask", &lp.mask),
            ];
            for (what, t) in parts {
                if t.dims() != want {
                    return Err(Error::ShapeMismatch {
                        what,
                        expected: want.to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
            }
        }
        let t = Instant::now();
        let rows: Vec<RewardInput<'_, P::Prompt, P::Completion>> = completions
            .iter()
            .enumerate()
            .map(|(row, c)| {
                let item = &batch[row / g];
                RewardInput {
                    prompt: &item.prompt,
                    completion: c,
                    group: &item.group,
                }
            })
            .collect();
        let scores = self.reward.score_parts(&rows)?;
        if scores.len() != rows.len() * f {
            return Err(Error::LengthMismatch {
                what: "reward scores",
                got: scores.len(),
                against: "rows × reward functions",
                expected: rows.len() * f,
            });
        }
        drop(rows);
        Ok((completions, sampled, scores, t.elapsed().as_secs_f64()))
    }
}

/// TRL's per-function metrics: `rewards/<name>/mean` and `rewards/<name>/std` (sample std)
/// of each function's finite scores over the batch (`NaN` without any, or below two for the
/// std).
fn part_metrics(parts: &RewardParts<'_>) -> Vec<(String, f64)> {
    let mut out = Vec::with_capacity(2 * parts.num_parts());
    for (f, name) in parts.names.iter().enumerate() {
        let v: Vec<f64> = parts
            .column(f)
            .into_iter()
            .filter(|x| x.is_finite())
            .map(f64::from)
            .collect();
        let m = crate::history::RunningMoments::from_slice(&v);
        let mean = if v.is_empty() { f64::NAN } else { m.mean };
        let std = m
            .variance(crate::history::Variance::Sample)
            .map_or(f64::NAN, f64::sqrt);
        out.push((format!("rewards/{name}/mean"), mean));
        out.push((format!("rewards/{name}/std"), std));
    }
    out
}

/// The rows `rows` of `v`, in place (all of them, untouched, for one process).
fn keep_rows<T>(mut v: Vec<T>, rows: &Range<usize>) -> Vec<T> {
    v.truncate(rows.end);
    v.drain(..rows.start);
    v
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rows_cuts_a_shard_and_keeps_all_for_one_process() {
        assert_eq!(keep_rows(vec![0, 1, 2, 3, 4, 5], &(2..4)), [2, 3]);
        let all = vec![7, 8, 9];
        let ptr = all.as_ptr();
        let kept = keep_rows(all, &(0..3));
        assert_eq!((kept.as_slice(), kept.as_ptr()), (&[7, 8, 9][..], ptr));
    }
}
