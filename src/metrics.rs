//! [`StepMetrics`]: what one training step measured, under the names TRL users know plus the
//! per-group ones only P-GRPO has.
//!
//! | name | meaning |
//! |---|---|
//! | `reward`, `reward_std` | mean and sample std (`n − 1`) of the whole batch's usable rewards (TRL: `nanmean`, `nanstd` over the gathered batch) |
//! | `rewards/<name>/mean`, `rewards/<name>/std` | the same for the reward function named `<name>` ([`RewardFn::name`](crate::RewardFn::name)) |
//! | `frac_reward_zero_std` | fraction of prompts whose completions all scored the same |
//! | `policy_loss`, `loss` | clipped-surrogate part, and the total minimised (with KL) |
//! | `kl` | mean per-token KL to the reference (estimator of the config) |
//! | `approx_kl` | mean per-token k3 between sampling and current policy |
//! | `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` | clipped token fractions |
//! | `entropy` | mean per-token policy entropy (when the policy reports it) |
//! | `completions/mean_length` | mean completion length in tokens |
//! | `grad_norm` | global gradient norm before clipping (last optimizer update) |
//! | `learning_rate` | the rate used this step |
//! | `advantage/mean`, `advantage/std` | over the batch's rows |
//! | `num_missing_rewards` | rows with a non-finite reward treated as missing |
//! | `skipped_update` | fraction of the step's optimizer updates skipped because their rows had nothing to learn from (no completion token, or every prompt masked): 1 when the step changed no weight, 0 when it made every update |
//! | `history/num_groups`, `history/n_min`, `history/n_max` | groups in the reward history after this step, and the fewest and most rewards one holds |
//! | `group/<g>/reward_mean`, `group/<g>/advantage_mean`, `group/<g>/count` | per preference group in this batch |
//! | `history/<g>/mean`, `history/<g>/std`, `history/<g>/n` | a group's history after this step, for the groups [`GroupMetrics`] selects |
//!
//! Objective metrics (`loss` and the rows from `policy_loss` to `clip_ratio/region_mean`) are
//! averaged over the step's optimizer updates
//! ([`optimizer_steps_per_step`](crate::TrainerConfig::optimizer_steps_per_step)); each
//! update's are those of all its rows (every micro-batch, every rank).
//!
//! # Group names in metric names
//!
//! `<g>` is [`group_segment`] of the group's key, so that every key has its own names and a
//! name always has three `/`-separated parts: an id is written `#<id>` (`GroupKey::Id(3)` →
//! `group/#3/count`), a name as itself with `%`, `/` and `#` percent-escaped (`%25`, `%2F`,
//! `%23`: `Name("3")` → `group/3/count`, `Name("a/b")` → `group/a%2Fb/count`).
//! [`parse_group_segment`] reads a key back.
//!
//! # Timings
//!
//! [`StepMetrics::timings`] holds wall-clock seconds per phase: `sample`, `reward`,
//! `exchange_rewards`, `old_logp` (old and reference log-probs), `rollout` (all of
//! [`Trainer::rollout`](crate::Trainer::rollout)), `update` (all of
//! [`Trainer::update`](crate::Trainer::update)), `all_reduce` and `total` (`rollout +
//! update`).
//!
//! [`GLOBAL_NAMES`] and [`group_names`] list these names, e.g. to declare the columns of a
//! [`CsvSink`](crate::sink::CsvSink) before the first step.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::advantage::GroupDiagnostics;
use crate::history::Variance;
use crate::objective::ObjectiveMetrics;
use crate::{GroupKey, RewardHistory};

/// The batch-level metric names a [`Trainer`](crate::Trainer) step can report, in table order
/// (the `rewards/<name>/…` pair, which depends on the reward function, aside). A step leaves
/// out the ones that do not apply (e.g. `entropy` when the policy reports none, the objective
/// metrics when the update was skipped). The objective's diagnostics come from
/// [`ObjectiveMetrics::NAMES`], `loss` between its first and second.
pub const GLOBAL_NAMES: [&str; 21] = {
    let o = ObjectiveMetrics::NAMES;
    [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        o[0],
        "loss",
        o[1],
        o[2],
        o[3],
        o[4],
        o[5],
        "entropy",
        "completions/mean_length",
        "grad_norm",
        "learning_rate",
        "advantage/mean",
        "advantage/std",
        "num_missing_rewards",
        "skipped_update",
        "history/num_groups",
        "history/n_min",
        "history/n_max",
    ]
};

/// How a group key appears in a metric name (see the [module docs](self)): `#<id>` for an
/// id, the name with `%`, `/` and `#` percent-escaped for a name.
///
/// ```
/// use pgrpo::{metrics::group_segment, GroupKey};
/// assert_eq!(group_segment(&GroupKey::Id(3)), "#3");
/// assert_eq!(group_segment(&"3".into()), "3");
/// assert_eq!(group_segment(&"formal".into()), "formal");
/// assert_eq!(group_segment(&"a/b #1 50%".into()), "a%2Fb %231 50%25");
/// ```
pub fn group_segment(key: &GroupKey) -> Cow<'_, str> {
    match key {
        GroupKey::Id(i) => Cow::Owned(format!("#{i}")),
        GroupKey::Name(n) if !n.contains(['%', '/', '#']) => Cow::Borrowed(n),
        GroupKey::Name(n) => {
            let mut out = String::with_capacity(n.len() + 6);
            for c in n.chars() {
                match c {
                    '%' => out.push_str("%25"),
                    '/' => out.push_str("%2F"),
                    '#' => out.push_str("%23"),
                    c => out.push(c),
                }
            }
            Cow::Owned(out)
        }
    }
}

/// The key whose [`group_segment`] is `segment`; `None` when no key gives it (a `/`, a `#`
/// other than a leading id marker, a `%` not followed by `25`, `2F` or `23`, or `#` followed by
/// anything but a `u64`).
///
/// ```
/// use pgrpo::{metrics::{group_segment, parse_group_segment}, GroupKey};
/// for key in [GroupKey::Id(3), "3".into(), "a/b#%".into(), "".into()] {
///     assert_eq!(parse_group_segment(&group_segment(&key)), Some(key));
/// }
/// assert_eq!(parse_group_segment("a/b"), None);
/// ```
pub fn parse_group_segment(segment: &str) -> Option<GroupKey> {
    if let Some(id) = segment.strip_prefix('#') {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return id.parse().ok().map(GroupKey::Id);
    }
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(i) = rest.find(['%', '/', '#']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let decoded = match tail.get(..3) {
            Some("%25") => '%',
            Some("%2F") => '/',
            Some("%23") => '#',
            _ => return None,
        };
        out.push(decoded);
        rest = &tail[3..];
    }
    out.push_str(rest);
    Some(GroupKey::Name(out))
}

/// The six per-group metric names of preference group `group`: `group/<g>/reward_mean`,
/// `group/<g>/advantage_mean`, `group/<g>/count`, `history/<g>/mean`, `history/<g>/std`,
/// `history/<g>/n`, with `<g>` its [`group_segment`].
///
/// ```
/// use pgrpo::GroupKey;
/// let names = pgrpo::metrics::group_names(&"formal".into());
/// assert_eq!(names[0], "group/formal/reward_mean");
/// assert_eq!(names[5], "history/formal/n");
/// assert_eq!(pgrpo::metrics::group_names(&GroupKey::Id(3))[2], "group/#3/count");
/// ```
pub fn group_names(group: &GroupKey) -> [String; 6] {
    let g = group_segment(group);
    [
        format!("group/{g}/reward_mean"),
        format!("group/{g}/advantage_mean"),
        format!("group/{g}/count"),
        format!("history/{g}/mean"),
        format!("history/{g}/std"),
        format!("history/{g}/n"),
    ]
}

/// The two metric names of the reward function named `name`: `rewards/<name>/mean`,
/// `rewards/<name>/std` (TRL's names; `name` as given).
pub fn reward_names(name: &str) -> [String; 2] {
    [
        format!("rewards/{name}/mean"),
        format!("rewards/{name}/std"),
    ]
}

/// Which preference groups get `history/<g>/*` metrics in a step (`group/<g>/*`, about the
/// batch, are reported for every group in the batch, whose size bounds them). TRL has no
/// preference groups, so no counterpart.
///
/// With thousands of groups, reporting every group the history holds adds three metrics per
/// group ever seen to every step: 10,000 groups make a step's JSON line about a megabyte.
/// [`Bounded`](Self::Bounded) reports the groups of the batch (their history just changed)
/// and the `top_k` largest; `history/num_groups`, `history/n_min` and `history/n_max`
/// summarise the rest in both modes.
///
/// In a config: `group_metrics = { type = "bounded", top_k = 16 }` or `{ type = "all" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GroupMetrics {
    /// Every group the history holds, every step (pgrpo 0.1's behaviour).
    All,
    /// The groups in this batch, plus the `top_k` groups with the most rewards in the history
    /// (ties: the smaller key). Default, with `top_k = 16`: runs with up to 16 groups report
    /// every group every step.
    Bounded {
        /// How many of the largest groups to report besides the batch's.
        top_k: usize,
    },
}

impl Default for GroupMetrics {
    fn default() -> Self {
        GroupMetrics::Bounded { top_k: 16 }
    }
}

impl GroupMetrics {
    /// The groups of `history` whose `history/<g>/*` metrics a step on a batch with groups
    /// `batch` reports, in key order.
    ///
    /// ```
    /// use pgrpo::{metrics::GroupMetrics, GroupKey, HistoryKind, RewardHistory};
    /// let mut h = RewardHistory::new(HistoryKind::Cumulative)?;
    /// for (g, n) in [(0u32, 5), (1, 1), (2, 9), (3, 2)] {
    ///     h.update(g, &vec![1.0; n])?;
    /// }
    /// let pick = GroupMetrics::Bounded { top_k: 1 }.history_groups(&h, &[GroupKey::Id(1)]);
    /// assert_eq!(pick, [GroupKey::Id(1), GroupKey::Id(2)]);
    /// assert_eq!(GroupMetrics::All.history_groups(&h, &[]).len(), 4);
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    pub fn history_groups(&self, history: &RewardHistory, batch: &[GroupKey]) -> Vec<GroupKey> {
        match *self {
            GroupMetrics::All => history.iter().map(|(k, _)| k.clone()).collect(),
            GroupMetrics::Bounded { top_k } => bounded(history, batch, top_k),
        }
    }
}

/// The batch's groups (those the history holds) and the `top_k` largest, in key order.
fn bounded(history: &RewardHistory, batch: &[GroupKey], top_k: usize) -> Vec<GroupKey> {
    let mut by_size: Vec<(&GroupKey, u64)> = history.iter().map(|(k, s)| (k, s.n)).collect();
    // Most rewards first; the history iterates in key order and the sort is stable, so ties
    // keep the smaller key first.
    by_size.sort_by_key(|p| std::cmp::Reverse(p.1));
    let mut picked: Vec<GroupKey> = by_size
        .iter()
        .take(top_k)
        .map(|(k, _)| (*k).clone())
        .collect();
    picked.extend(batch.iter().filter(|k| history.stats(k).is_some()).cloned());
    picked.sort();
    picked.dedup();
    picked
}

/// Writes a step's per-group metrics: `group/<g>/*` for the batch's groups (`keys`, with
/// their diagnostics), the history aggregates, and `history/<g>/*` for the groups `select`
/// picks (std with `variance`).
pub(crate) fn write_groups(
    m: &mut StepMetrics,
    keys: &[GroupKey],
    diagnostics: &[GroupDiagnostics],
    history: &RewardHistory,
    select: &GroupMetrics,
    variance: Variance,
) {
    for (key, gd) in keys.iter().zip(diagnostics) {
        let g = group_segment(key);
        m.set(format!("group/{g}/count"), gd.count as f64);
        if gd.count > 0 {
            m.set(format!("group/{g}/reward_mean"), gd.reward_mean);
            m.set(format!("group/{g}/advantage_mean"), gd.advantage_mean);
        }
    }
    let (mut count, mut n_min, mut n_max) = (0usize, f64::INFINITY, f64::NEG_INFINITY);
    for (_, s) in history.iter() {
        count += 1;
        n_min = n_min.min(s.n as f64);
        n_max = n_max.max(s.n as f64);
    }
    m.set("history/num_groups", count as f64);
    if count > 0 {
        m.set("history/n_min", n_min);
        m.set("history/n_max", n_max);
    }
    for key in select.history_groups(history, keys) {
        let Some(s) = history.stats(&key) else {
            continue;
        };
        let g = group_segment(&key);
        m.set(format!("history/{g}/mean"), s.mean);
        m.set(
            format!("history/{g}/std"),
            s.std_with(variance).unwrap_or(f64::NAN),
        );
        m.set(format!("history/{g}/n"), s.n as f64);
    }
}

/// The metrics of one step: a step number and named values.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step these metrics describe (0-based).
    pub step: u64,
    /// Named values (see the [module docs](self)); ordered by name.
    pub values: BTreeMap<String, f64>,
    /// Wall-clock seconds per phase (`sample`, `reward`, `update`, `total`). Kept apart from
    /// `values` because they differ between otherwise identical runs.
    pub timings: BTreeMap<String, f64>,
}

impl StepMetrics {
    /// A value by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// Sets a value.
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        self.values.insert(name.into(), value);
    }

    /// Mean reward of the batch.
    pub fn reward(&self) -> f64 {
        self.get("reward").unwrap_or(f64::NAN)
    }

    /// Mean reward of one preference group in this batch (`None` if it had no row).
    ///
    /// ```
    /// let mut m = pgrpo::StepMetrics::default();
    /// m.set("group/#7/reward_mean", 0.5);
    /// m.set("group/a%2Fb/reward_mean", 0.25);
    /// assert_eq!(m.group_reward(7u32), Some(0.5));
    /// assert_eq!(m.group_reward("a/b"), Some(0.25));
    /// assert_eq!(m.group_reward("7"), None);
    /// ```
    pub fn group_reward(&self, group: impl Into<GroupKey>) -> Option<f64> {
        let g = group.into();
        self.get(&format!("group/{}/reward_mean", group_segment(&g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_names_are_distinct_and_hold_the_objective_names() {
        for (i, a) in GLOBAL_NAMES.iter().enumerate() {
            assert!(!GLOBAL_NAMES[i + 1..].contains(a), "{a} twice");
        }
        for name in ObjectiveMetrics::NAMES.iter().chain(&["loss"]) {
            assert!(GLOBAL_NAMES.contains(name), "{name}");
        }
    }
}
