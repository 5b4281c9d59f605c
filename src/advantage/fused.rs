//! The fused P-GRPO pass: an optimisation of [`p_grpo`](super::estimators::p_grpo) for its
//! usual case, with the same advantages and batch deltas as the general path bit for bit.
//!
//! The general path reads the rows three times (statistics, prompt statistics, advantages).
//! In P-GRPO's usual case every normaliser is known before the batch is read: the options are
//! the defaults (cumulative history, normalise before folding the batch in, `λ = 1`), and
//! [`p_grpo_scale`] picks every group's history (each past `min_count` and not degenerate),
//! so no row falls back and `A_i = (R_i − μ_p) · (1 / (σ_p + eps))` needs nothing of the
//! batch. One pass then validates each row, writes its advantage, and sums its group
//! statistics and its prompt's reward range. It also needs finite rewards, valid group ids,
//! each prompt's rows one run with prompt ids increasing from run to run (the layout the
//! trainer produces), and at least as many rows as groups; otherwise it declines and the
//! general path decides (and reports any error). The test at the bottom checks it against
//! the general path bit for bit.
//!
//! The pass goes by blocks of 8 rows. A block of one prompt and one group (a prompt's `G`
//! completions when `G` is a multiple of 8) is checked with three vector compares and its
//! advantages and reward range computed without a branch per row, in the widest vector
//! registers the CPU has ([`multiversion!`](crate::dispatch::multiversion)); its group sums
//! stay sequential, row after row, so they keep the general path's bits. Per-chunk group sums
//! are merged with the same arithmetic as [`GroupDelta::append`], on plain numbers.

use super::diagnostics::{AdvantageDiagnostics, GroupDiagnostics};
use super::estimators::{finite_f32, p_grpo_scale};
use super::{AdvantageConfig, Advantages, Estimator, RolloutRewards, UpdateOrder};
use crate::history::{BatchDeltas, GroupDelta, HistoryKind, RunningMoments};
use crate::RewardHistory;

impl AdvantageConfig {
    /// [`compute`](Self::compute) in one pass over the rows, for the batches described in the
    /// [module docs](self): each fixed chunk of rows validates, writes its advantages, and
    /// sums its group statistics and its prompts' reward ranges in the same pass, the current
    /// group's sums kept in registers; chunks are merged in row order as in the general path.
    /// The diagnostic means come from the group sums, so they match the general path's up to
    /// rounding. `None` when the batch is not of that kind.
    pub(super) fn fused_pgrpo(
        &self,
        batch: &RolloutRewards<'_>,
        history: &RewardHistory,
        task_rows: usize,
    ) -> Option<Advantages> {
        use rayon::prelude::*;
        let o = &self.pgrpo;
        if self.estimator != Estimator::PGrpo
            || history.kind() != HistoryKind::Cumulative
            || o.update_order != UpdateOrder::BeforeBatch
            || o.offset_weight != 1.0
        {
            return None;
        }
        let k = batch.group_keys.len();
        // With fewer rows than groups, the per-group arrays of each chunk cost more than the
        // rows (1K rows, 10,000 groups: 4 M rows/s here against 10 M on the general path).
        if batch.rewards.len() < k {
            return None;
        }
        // Every group's normaliser must be its history's, chosen before the batch is read
        // (under `BeforeBatch`, a usable history never looks at the batch).
        // Per-group work is independent and index-aligned: split over the cores (the output
        // keeps its order, so the result does not depend on the threads).
        let scales: Vec<_> = history
            .moments_of(batch.group_keys)
            .into_par_iter()
            .map(|m| {
                let s = p_grpo_scale(self, m?, RunningMoments::default)?;
                s.from_history.then_some(s.scale)
            })
            .collect::<Option<Vec<_>>>()?;
        // (history mean, 1 / denominator) per group.
        let norm: Vec<(f64, f64)> = scales.iter().map(|s| (s.mean, 1.0 / s.den)).collect();
        let n = batch.rewards.len();
        let mut values = vec![0f32; n];
        let chunks: Vec<Option<FusedChunk>> = values
            .par_chunks_mut(task_rows)
            .enumerate()
            .map(|(c, out)| {
                let rows = c * task_rows..c * task_rows + out.len();
                fused_chunk(
                    &batch.rewards[rows.clone()],
                    &batch.group_ids[rows.clone()],
                    &batch.prompt_ids[rows],
                    &norm,
                    out,
                )
            })
            .collect();
        let mut sums = vec![FusedGroup::default(); k];
        let (mut num_prompts, mut zero) = (0usize, 0usize);
        let mut open: Option<PromptRun> = None;
        for ch in chunks {
            let ch = ch?;
            for (s, a) in sums.iter_mut().zip(&ch.groups) {
                s.append(a);
            }
            // The chunk's first run may continue the previous chunk's last one.
            let mut close = |run: PromptRun| {
                num_prompts += 1;
                zero += run.zero_spread() as usize;
            };
            open = Some(match open {
                Some(prev) if prev.id == ch.first.id => prev.join(ch.first),
                Some(prev) if prev.id < ch.first.id => {
                    close(prev);
                    ch.first
                }
                Some(_) => return None,
                None => ch.first,
            });
            if let Some(last) = ch.last {
                close(open.take()?);
                num_prompts += ch.inner_runs;
                zero += ch.inner_zero;
                open = Some(last);
            }
        }
        if let Some(run) = open {
            num_prompts += 1;
            zero += run.zero_spread() as usize;
        }
        let deltas: Vec<GroupDelta> = sums
            .par_iter()
            .map(|a| GroupDelta::cumulative(a.count, a.shift, a.s1, a.s2))
            .collect();
        let moments: Vec<RunningMoments> = deltas.par_iter().map(GroupDelta::moments).collect();
        // The batch's moments, each group's mean reward and mean advantage from the group
        // sums (the general path sums rows: the same up to rounding).
        let mut batch_m = RunningMoments::default();
        for m in &moments {
            batch_m.append(m, 1.0);
        }
        let groups = (0..k)
            .into_par_iter()
            .map(|g| {
                let c = deltas[g].count as usize;
                let (mean, inv) = norm[g];
                let m = &moments[g];
                let history = (c > 0).then_some(scales[g]);
                GroupDiagnostics::new(c, m.mean, (m.mean - mean) * inv, history, self.eps)
            })
            .collect();
        let diagnostics = AdvantageDiagnostics::new(groups, num_prompts, zero, 0, 0, &batch_m);
        Some(Advantages {
            values,
            diagnostics,
            deltas: BatchDeltas {
                kind: HistoryKind::Cumulative,
                deltas,
            },
        })
    }
}

/// One group's sums over one chunk of the fused P-GRPO pass: the cumulative delta's
/// `count`, `shift`, `s1`, `s2`, as [`GroupDelta::push`] builds them.
#[derive(Clone, Copy, Default)]
struct FusedGroup {
    count: u64,
    shift: f64,
    s1: f64,
    s2: f64,
}

impl FusedGroup {
    /// Appends a later chunk's sums: [`GroupDelta::append`] with weight 1 per reward, the
    /// same operations in the same order (so the merged delta has the same bits), without
    /// building a `GroupDelta` per group and chunk.
    #[inline]
    fn append(&mut self, later: &FusedGroup) {
        if later.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *later;
            return;
        }
        let w = later.count as f64;
        self.count += later.count;
        let delta = later.shift - self.shift;
        self.s1 += later.s1 + w * delta;
        self.s2 += later.s2 + 2.0 * delta * later.s1 + w * delta * delta;
    }
}

/// One prompt's run of rows: its id and reward range.
#[derive(Clone, Copy)]
struct PromptRun {
    id: u32,
    lo: f32,
    hi: f32,
}

impl PromptRun {
    fn new(id: u32) -> Self {
        Self {
            id,
            lo: f32::INFINITY,
            hi: f32::NEG_INFINITY,
        }
    }

    fn join(self, other: PromptRun) -> Self {
        Self {
            id: self.id,
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }

    fn zero_spread(&self) -> bool {
        self.lo >= self.hi
    }
}

/// What one chunk of the fused pass hands the merge: its group and batch sums, its first
/// prompt run (which may have begun in the chunk before), its last (`None` when the chunk
/// is one run), and how many runs lie wholly between them and how many of those have no
/// reward spread.
struct FusedChunk {
    groups: Vec<FusedGroup>,
    first: PromptRun,
    last: Option<PromptRun>,
    inner_runs: usize,
    inner_zero: usize,
}

/// Rows per block of the fused pass: a block whose rows are all finite and share one prompt
/// and one group (a prompt's `G` completions, `G` a multiple of 8) is handled without a
/// branch per row, its advantages computed in vector registers.
const BLOCK: usize = 8;

/// The smallest and largest of a block of finite rewards, as a balanced tree of plain
/// comparisons (exact, so the same as `f32::min`/`f32::max` row by row).
#[inline(always)]
fn tree_range(r: &[f32; BLOCK]) -> (f32, f32) {
    let lo = |a: f32, b: f32| if b < a { b } else { a };
    let hi = |a: f32, b: f32| if b > a { b } else { a };
    (
        lo(
            lo(lo(r[0], r[1]), lo(r[2], r[3])),
            lo(lo(r[4], r[5]), lo(r[6], r[7])),
        ),
        hi(
            hi(hi(r[0], r[1]), hi(r[2], r[3])),
            hi(hi(r[4], r[5]), hi(r[6], r[7])),
        ),
    )
}

/// [`finite_f32`] written with selects instead of a branch, so that a block of them
/// vectorises: the same value for every input.
#[inline(always)]
fn finite_f32_select(a: f64) -> f32 {
    const MAX: f64 = f32::MAX as f64;
    #[allow(clippy::eq_op)]
    let a = if a == a { a } else { 0.0 };
    let a = if a < -MAX { -MAX } else { a };
    let a = if a > MAX { MAX } else { a };
    a as f32
}

crate::dispatch::multiversion! {
/// The fused pass over one chunk (see `AdvantageConfig::fused_pgrpo`): `None` at the first
/// row it does not handle (a bad group id, a non-finite reward, a prompt id lower than the
/// run before).
///
/// Rows go by blocks of [`BLOCK`]; a block of one prompt and one group takes the fast form,
/// any other row the row-by-row form. Both make the same additions in the same order (the
/// group sums row after row, the reward range by `min`/`max`, which are exact), so the
/// result does not depend on which form ran.
fn fused_chunk(
    rewards: &[f32],
    group_ids: &[u32],
    prompt_ids: &[u32],
    norm: &[(f64, f64)],
    out: &mut [f32]
) -> Option<FusedChunk> {
    let k = norm.len();
    let mut groups = vec![FusedGroup::default(); k];
    let mut first: Option<PromptRun> = None;
    let mut cur = PromptRun::new(*prompt_ids.first()?);
    let (mut inner_runs, mut inner_zero) = (0usize, 0usize);
    // The current group's sums live in registers while its rows follow one another (a
    // prompt's rows share a group): the same additions in the same order as summing in
    // `groups`, without a store and a reload per row.
    let mut cur_group = usize::MAX;
    let mut a = FusedGroup::default();
    let (mut mean, mut inv) = (0.0, 1.0);
    // Moves to group `g` (its sums into registers) and to prompt `q` (closing the run
    // before); `None` for an unknown group or a decreasing prompt id.
    macro_rules! enter {
        ($g:expr, $q:expr, $x:expr) => {{
            let g = $g as usize;
            if g != cur_group {
                if cur_group != usize::MAX {
                    groups[cur_group] = a;
                }
                cur_group = g;
                a = *groups.get(cur_group)?;
                (mean, inv) = norm[cur_group];
                if a.count == 0 {
                    a.shift = $x;
                }
            }
            let q = $q;
            if q != cur.id {
                if q < cur.id {
                    return None;
                }
                if first.is_none() {
                    first = Some(cur);
                } else {
                    inner_runs += 1;
                    inner_zero += cur.zero_spread() as usize;
                }
                cur = PromptRun::new(q);
            }
        }};
    }
    let n = rewards.len();
    let mut i = 0;
    while i < n {
        if i + BLOCK <= n {
            let r: &[f32; BLOCK] = rewards[i..i + BLOCK].try_into().ok()?;
            let g: &[u32; BLOCK] = group_ids[i..i + BLOCK].try_into().ok()?;
            let q: &[u32; BLOCK] = prompt_ids[i..i + BLOCK].try_into().ok()?;
            // Folds without early exit, so that they vectorise.
            let same = g.iter().fold(true, |s, &x| s & (x == g[0]))
                & q.iter().fold(true, |s, &x| s & (x == q[0]));
            let finite = r.iter().fold(true, |s, &x| s & x.is_finite());
            if same && finite {
                enter!(g[0], q[0], r[0] as f64);
                // Plain comparisons (the rewards are finite): `min`/`max` without the NaN
                // handling of `f32::min`.
                let (lo, hi) = tree_range(r);
                cur.lo = if lo < cur.lo { lo } else { cur.lo };
                cur.hi = if hi > cur.hi { hi } else { cur.hi };
                a.count += BLOCK as u64;
                for &x in r {
                    let d = x as f64 - a.shift;
                    a.s1 += d;
                    a.s2 += d * d;
                }
                let o: &mut [f32; BLOCK] = (&mut out[i..i + BLOCK]).try_into().ok()?;
                *o = std::array::from_fn(|j| finite_f32_select((r[j] as f64 - mean) * inv));
                i += BLOCK;
                continue;
            }
        }
        let (r, g, q) = (rewards[i], group_ids[i], prompt_ids[i]);
        if !r.is_finite() {
            return None;
        }
        let x = r as f64;
        enter!(g, q, x);
        cur.lo = cur.lo.min(r);
        cur.hi = cur.hi.max(r);
        a.count += 1;
        let d = x - a.shift;
        a.s1 += d;
        a.s2 += d * d;
        out[i] = finite_f32((x - mean) * inv);
        i += 1;
    }
    if cur_group != usize::MAX {
        groups[cur_group] = a;
    }
    let (first, last) = match first {
        None => (cur, None),
        Some(f) => (f, Some(cur)),
    };
    Some(FusedChunk {
        groups,
        first,
        last,
        inner_runs,
        inner_zero,
    })
}
}

#[cfg(test)]
mod tests {
    use super::super::stats::rows_per_task;
    use super::super::PGrpoOptions;
    use super::*;
    use crate::GroupKey;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `n / g` prompts of `g` rows (the last one shorter), prompt `q` in group `q % k`, some
    /// prompts with equal rewards; a history with 20 rewards per group.
    fn batch(
        n: usize,
        g: usize,
        k: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<u32>, Vec<u32>, RewardHistory) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rewards = Vec::with_capacity(n);
        let (mut prompts, mut groups) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let q = i / g;
            let flat = q.is_multiple_of(5);
            rewards.push(if flat {
                (q % 3) as f32
            } else {
                rng.random_range(-2.0..3.0)
            });
            prompts.push(q as u32 * 2 + 7);
            groups.push((q % k) as u32);
        }
        let mut history = RewardHistory::default();
        for key in 0..k as u64 {
            let warm: Vec<f32> = (0..20).map(|_| rng.random_range(-1.0..1.0)).collect();
            history.update(GroupKey::Id(key), &warm).unwrap();
        }
        (rewards, prompts, groups, history)
    }

    fn same_f64(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn fused_pgrpo_matches_the_general_path_bit_for_bit() {
        let cfg = AdvantageConfig::default();
        // Prompt runs that straddle chunk boundaries (g = 3, 7), one prompt longer than a
        // chunk, many groups (larger chunks), one row.
        for (n, g, k) in [
            (1, 1, 1),
            (96, 8, 3),
            (70_001, 3, 4),
            (100_000, 7, 2),
            (80_000, 40_000, 2),
            (150_000, 4, 5_000),
            // Whole blocks of one prompt (g a multiple of 8), groups with no rows.
            (4_096, 16, 3),
            (64_000, 8, 10_000),
            // A block whose rows change group (a prompt split over two groups).
            (4_104, 8, 0),
        ] {
            let (r, p, mut gid, history) = batch(n, g, if k == 0 { 3 } else { k }, n as u64);
            let k = if k == 0 {
                gid[37] = (gid[37] + 1) % 3;
                3
            } else {
                k
            };
            let keys: Vec<GroupKey> = (0..k as u64).map(GroupKey::Id).collect();
            let b = RolloutRewards {
                rewards: &r,
                prompt_ids: &p,
                group_ids: &gid,
                group_keys: &keys,
            };
            let rows = rows_per_task(k);
            let fused = cfg.fused_pgrpo(&b, &history, rows).unwrap_or_else(|| {
                panic!("this batch takes the fused path (n = {n}, g = {g}, k = {k})")
            });
            let general = cfg.compute_general(&b, &history, rows).unwrap();
            assert!(
                fused
                    .values
                    .iter()
                    .zip(&general.values)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "advantages differ (n = {n}, g = {g}, k = {k})"
            );
            assert_eq!(fused.deltas, general.deltas, "deltas (n = {n})");
            let (f, s) = (&fused.diagnostics, &general.diagnostics);
            assert_eq!(f.num_prompts, s.num_prompts, "prompts (n = {n})");
            assert_eq!(f.num_prompts, n.div_ceil(g));
            assert!(
                same_f64(f.frac_reward_zero_std, s.frac_reward_zero_std),
                "zero std (n = {n})"
            );
            assert!(f.frac_reward_zero_std > 0.0 || n < 5 * g);
            // Means from group sums instead of row sums: equal up to rounding (relative to
            // the spread; advantages are also rounded to f32 before the general path sums).
            let close = |x: f64, y: f64, tol: f64| {
                (x - y).abs() <= tol * (1.0 + y.abs()) || (x.is_nan() && y.is_nan())
            };
            assert!(
                close(f.reward_mean, s.reward_mean, 1e-12),
                "batch mean (n = {n})"
            );
            assert!(
                close(f.reward_std, s.reward_std, 1e-12),
                "batch std (n = {n})"
            );
            assert_eq!((f.num_missing, f.num_degenerate_prompts), (0, 0));
            for (a, b) in f.groups.iter().zip(&s.groups) {
                assert_eq!((a.count, a.used_history), (b.count, b.used_history));
                assert!(same_f64(a.history_mean, b.history_mean));
                assert!(same_f64(a.history_std, b.history_std));
                let nan = a.count == 0;
                assert_eq!(
                    (a.reward_mean.is_nan(), a.advantage_mean.is_nan()),
                    (nan, nan)
                );
                if !nan {
                    assert!(
                        close(a.reward_mean, b.reward_mean, 1e-12),
                        "group mean (n = {n})"
                    );
                    assert!(
                        close(a.advantage_mean, b.advantage_mean, 1e-6),
                        "mean advantage (n = {n}): {} vs {}",
                        a.advantage_mean,
                        b.advantage_mean
                    );
                }
            }
        }
    }

    #[test]
    fn fused_pgrpo_declines_what_it_does_not_handle() {
        let (r, p, gid, history) = batch(64, 4, 2, 1);
        let keys: Vec<GroupKey> = vec![GroupKey::Id(0), GroupKey::Id(1)];
        let cfg = AdvantageConfig::default();
        let rows = rows_per_task(2);
        let run = |r: &[f32], p: &[u32], gid: &[u32], h: &RewardHistory, cfg: &AdvantageConfig| {
            let b = RolloutRewards {
                rewards: r,
                prompt_ids: p,
                group_ids: gid,
                group_keys: &keys,
            };
            cfg.fused_pgrpo(&b, h, rows).is_some()
        };
        assert!(run(&r, &p, &gid, &history, &cfg));
        let mut bad = r.clone();
        bad[17] = f32::NAN;
        assert!(!run(&bad, &p, &gid, &history, &cfg), "non-finite reward");
        let mut bad = gid.clone();
        bad[63] = 2;
        assert!(!run(&r, &p, &bad, &history, &cfg), "group id out of range");
        let mut bad = p.clone();
        bad[60..].fill(7);
        assert!(
            !run(&r, &bad, &gid, &history, &cfg),
            "prompt ids not increasing"
        );
        let mut cold = RewardHistory::default();
        cold.update(GroupKey::Id(0), &[1.0; 3]).unwrap();
        assert!(!run(&r, &p, &gid, &cold, &cfg), "a cold group");
        let mut degenerate = history.clone();
        degenerate.clear();
        degenerate.update(GroupKey::Id(0), &[1.0; 30]).unwrap();
        degenerate
            .update(GroupKey::Id(1), &[0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0])
            .unwrap();
        assert!(!run(&r, &p, &gid, &degenerate, &cfg), "a degenerate group");
        let lambda = AdvantageConfig {
            pgrpo: PGrpoOptions {
                offset_weight: 0.5,
                ..Default::default()
            },
            ..cfg
        };
        assert!(!run(&r, &p, &gid, &history, &lambda), "offset weight");
        // Through `compute`, the declined batches still get their general-path answers.
        let b = RolloutRewards {
            rewards: &r,
            prompt_ids: &bad,
            group_ids: &gid,
            group_keys: &keys,
        };
        let adv = cfg.compute(&b, &history).unwrap();
        assert_eq!(adv.diagnostics.num_prompts, 15);
    }
}
