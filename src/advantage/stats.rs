//! The statistics pass of the general path: one parallel pass over the rows that validates
//! them and sums the batch's moments, each group's [`GroupDelta`] and reward sum, then each
//! prompt's mean, `M2`, counts and whether its rewards have no spread ([`PromptStats`]).
//!
//! Everything here is summed in a fixed order that depends only on the batch's shape (chunks
//! of [`rows_per_task`] rows, merged in row order), never on the number of threads: the same
//! batch gives the same bits on any machine.

use std::collections::HashMap;

use super::{NonFinitePolicy, RolloutRewards};
use crate::error::{Error, Result};
use crate::history::{GroupDelta, HistoryKind, RunningMoments, Variance};

/// Rows per parallel task of the advantage pass: 32K (two cores split 1M rows into a few
/// dozen tasks, small enough to balance), more when there are many groups, so that each
/// task's per-group sums (one slot per group) stay small next to its rows. Depends only on
/// the batch's shape, never on the number of threads: the sums are the same on any machine.
pub(crate) fn rows_per_task(groups: usize) -> usize {
    (32 * 1024).max(groups.saturating_mul(16).next_power_of_two())
}

/// What one pass over a batch knows: the input of every estimator and of the diagnostics.
pub(crate) struct BatchStats {
    /// Rows whose reward was non-finite (under [`NonFinitePolicy::Missing`]).
    pub num_missing: usize,
    /// Moments of the batch's usable rewards (every weight 1).
    pub batch: RunningMoments,
    /// Each group's delta, index-aligned with `group_keys` (what is folded into the history).
    pub deltas: Vec<GroupDelta>,
    /// Each group's sum of usable rewards (for the diagnostics).
    pub reward_sums: Vec<f64>,
    /// `(N,)` each row's prompt as a dense index `0..P` (order of first appearance).
    pub prompt_of_row: Vec<u32>,
    /// `(P,)` the caller's id of each dense prompt.
    pub prompt_labels: Vec<u32>,
    /// Per-prompt statistics, indexed by the dense prompt.
    pub prompts: PromptStats,
}

/// One chunk's share of [`BatchStats::compute`]'s row pass.
struct ChunkStats {
    missing: usize,
    batch: GroupDelta,
    groups: Vec<GroupDelta>,
    reward_sums: Vec<f64>,
}

impl BatchStats {
    /// One pass, in fixed chunks of `task_rows` rows on all cores: validate group ids and
    /// rewards (the first bad row, in row order, is the error; no partial output), and
    /// accumulate the batch's moments, each group's delta for a history of `kind` and each
    /// group's reward sum. Chunks are merged in row order, so a batch of one chunk gives
    /// exactly the sequential sums and a larger one the same up to rounding. Then the dense
    /// prompt ids and the per-prompt statistics.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a group id past `group_keys`, and
    /// [`Error::NonFiniteReward`] under [`NonFinitePolicy::Error`].
    pub(crate) fn compute(
        batch: &RolloutRewards<'_>,
        kind: HistoryKind,
        non_finite: NonFinitePolicy,
        task_rows: usize,
    ) -> Result<Self> {
        let n = batch.rewards.len();
        let k = batch.group_keys.len();
        let decay = kind.decay();
        let chunk_stats = |c: usize| -> Result<ChunkStats> {
            let rows = c * task_rows..((c + 1) * task_rows).min(n);
            let mut st = ChunkStats {
                missing: 0,
                batch: GroupDelta::default(),
                groups: vec![GroupDelta::default(); k],
                reward_sums: vec![0f64; k],
            };
            let (gids, rs) = (&batch.group_ids[rows.clone()], &batch.rewards[rows.clone()]);
            for (j, (&g, &r)) in gids.iter().zip(rs).enumerate() {
                let row = rows.start + j;
                if g as usize >= k {
                    return Err(Error::IndexOutOfRange {
                        what: "group_ids",
                        row,
                        value: g as usize,
                        bound: k,
                        of: "groups",
                    });
                }
                if r.is_finite() {
                    st.batch.push(r, 1.0, HistoryKind::Cumulative);
                    st.groups[g as usize].push(r, decay, kind);
                    st.reward_sums[g as usize] += r as f64;
                } else {
                    match non_finite {
                        NonFinitePolicy::Error => {
                            return Err(Error::NonFiniteReward { row, value: r })
                        }
                        NonFinitePolicy::Missing => st.missing += 1,
                    }
                }
            }
            Ok(st)
        };
        let chunks: Vec<Result<ChunkStats>> = {
            use rayon::prelude::*;
            (0..n.div_ceil(task_rows))
                .into_par_iter()
                .map(chunk_stats)
                .collect()
        };
        let mut num_missing = 0usize;
        let mut batch_delta = GroupDelta::default();
        let mut deltas = vec![GroupDelta::default(); k];
        let mut reward_sums = vec![0f64; k];
        for st in chunks {
            let st = st?;
            num_missing += st.missing;
            batch_delta.append(st.batch, 1.0);
            for (d, x) in deltas.iter_mut().zip(st.groups) {
                d.append(x, decay);
            }
            reward_sums
                .iter_mut()
                .zip(&st.reward_sums)
                .for_each(|(a, b)| *a += b);
        }
        let (prompt_of_row, prompt_labels) = dense_prompt_ids(batch.prompt_ids);
        let prompts = PromptStats::compute(batch.rewards, &prompt_of_row, prompt_labels.len());
        Ok(Self {
            num_missing,
            batch: batch_delta.moments(),
            deltas,
            reward_sums,
            prompt_of_row,
            prompt_labels,
            prompts,
        })
    }
}

/// Maps arbitrary prompt ids to `0..P` in order of first appearance.
fn dense_prompt_ids(ids: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let max = ids.iter().copied().max().unwrap_or(0) as usize;
    let mut labels = Vec::new();
    let mut out = Vec::with_capacity(ids.len());
    if max < 4 * ids.len() + 1024 {
        let mut map = vec![u32::MAX; max + 1];
        for &id in ids {
            let slot = &mut map[id as usize];
            if *slot == u32::MAX {
                *slot = labels.len() as u32;
                labels.push(id);
            }
            out.push(*slot);
        }
    } else {
        let mut map = HashMap::new();
        for &id in ids {
            let d = *map.entry(id).or_insert_with(|| {
                labels.push(id);
                labels.len() as u32 - 1
            });
            out.push(d);
        }
    }
    (out, labels)
}

/// Per-prompt mean, M2, counts and zero-spread flags (two passes, `f64`), indexed by the dense
/// prompt. Only usable (finite) rewards count, except in `total`.
pub(crate) struct PromptStats {
    /// Usable rewards.
    pub count: Vec<usize>,
    /// All rows, usable or not.
    pub total: Vec<usize>,
    /// Mean of the usable rewards (0 without any).
    pub mean: Vec<f64>,
    /// Sum of their squared deviations from `mean`.
    pub m2: Vec<f64>,
    /// Whether the usable rewards are all equal (or there is none).
    pub zero_spread: Vec<bool>,
}

impl PromptStats {
    fn compute(rewards: &[f32], prompt_of_row: &[u32], p: usize) -> Self {
        // The usual layout (each prompt's completions next to each other, so the dense ids
        // never decrease) runs prompt by prompt, in parallel; the same sums in the same order.
        if prompt_of_row.windows(2).all(|w| w[0] <= w[1]) {
            return Self::compute_runs(rewards, prompt_of_row, p);
        }
        Self::compute_scattered(rewards, prompt_of_row, p)
    }

    /// [`compute`](Self::compute) when every prompt's rows are one contiguous run.
    fn compute_runs(rewards: &[f32], prompt_of_row: &[u32], p: usize) -> Self {
        use rayon::prelude::*;
        let mut starts = Vec::with_capacity(p + 1);
        for (i, &q) in prompt_of_row.iter().enumerate() {
            if i == 0 || q != prompt_of_row[i - 1] {
                starts.push(i);
            }
        }
        starts.push(rewards.len());
        let per_prompt: Vec<(usize, usize, f64, f64, bool)> = starts
            .par_windows(2)
            .with_min_len(1024)
            .map(|w| {
                let run = &rewards[w[0]..w[1]];
                let (mut count, mut sum) = (0usize, 0f64);
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for &r in run.iter().filter(|r| r.is_finite()) {
                    count += 1;
                    sum += r as f64;
                    lo = lo.min(r);
                    hi = hi.max(r);
                }
                let mean = if count > 0 { sum / count as f64 } else { 0.0 };
                let m2 = run
                    .iter()
                    .filter(|r| r.is_finite())
                    .map(|&r| {
                        let d = r as f64 - mean;
                        d * d
                    })
                    .fold(0f64, |a, b| a + b);
                (count, run.len(), mean, m2, lo >= hi)
            })
            .collect();
        Self {
            count: per_prompt.iter().map(|x| x.0).collect(),
            total: per_prompt.iter().map(|x| x.1).collect(),
            mean: per_prompt.iter().map(|x| x.2).collect(),
            m2: per_prompt.iter().map(|x| x.3).collect(),
            zero_spread: per_prompt.iter().map(|x| x.4).collect(),
        }
    }

    /// [`compute`](Self::compute) for prompts whose rows are interleaved.
    fn compute_scattered(rewards: &[f32], prompt_of_row: &[u32], p: usize) -> Self {
        let mut count = vec![0usize; p];
        let mut total = vec![0usize; p];
        let mut sum = vec![0f64; p];
        let mut lo = vec![f32::INFINITY; p];
        let mut hi = vec![f32::NEG_INFINITY; p];
        for (&r, &q) in rewards.iter().zip(prompt_of_row) {
            let q = q as usize;
            total[q] += 1;
            if r.is_finite() {
                count[q] += 1;
                sum[q] += r as f64;
                lo[q] = lo[q].min(r);
                hi[q] = hi[q].max(r);
            }
        }
        let mean: Vec<f64> = sum
            .iter()
            .zip(&count)
            .map(|(s, &c)| if c > 0 { s / c as f64 } else { 0.0 })
            .collect();
        let mut m2 = vec![0f64; p];
        for (&r, &q) in rewards.iter().zip(prompt_of_row) {
            if r.is_finite() {
                let d = r as f64 - mean[q as usize];
                m2[q as usize] += d * d;
            }
        }
        let zero_spread = lo.iter().zip(&hi).map(|(l, h)| l >= h).collect();
        Self {
            count,
            total,
            mean,
            m2,
            zero_spread,
        }
    }

    /// Prompt `q`'s variance under `v`; `None` without usable rewards, or with one under the
    /// sample variance.
    #[inline]
    pub(crate) fn variance(&self, q: usize, v: Variance) -> Option<f64> {
        let c = self.count[q] as f64;
        let den = match v {
            Variance::Population => c,
            Variance::Sample => c - 1.0,
        };
        (self.count[q] > 0 && den > 0.0).then(|| self.m2[q] / den)
    }
}
