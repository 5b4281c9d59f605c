//! Per-preference-group reward history: the state P-GRPO adds to GRPO.
//!
//! A [`RewardHistory`] keeps, for every preference group, running statistics of all rewards
//! that group has received across training steps. P-GRPO normalises a reward against these
//! statistics instead of against the other completions of the same prompt
//! (arXiv:2603.10009, §3; Welford's online algorithm).
//!
//! This module is pure state: it never computes advantages (see [`crate::advantage`]).
//!
//! # Kinds
//! - [`HistoryKind::Cumulative`] (default, the paper's choice): Welford statistics over every
//!   reward ever seen.
//! - [`HistoryKind::Exponential`]: every older reward's weight halves after `half_life` newer
//!   rewards of the same group (exponentially weighted mean and variance).
//! - [`HistoryKind::Window`]: statistics of the last `size` rewards of the group.
//!
//! # Merging
//! [`RewardHistory::merge`] appends another store's rewards *after* this store's, exactly
//! (Chan, Golub & LeVeque's parallel update, generalised to exponential weights). For the
//! cumulative kind the order does not matter; for the other two it does, as it would for a
//! single process that saw the rewards in that order.
//!
//! # Layout
//! | file | what |
//! |---|---|
//! | `moments.rs` | [`RunningMoments`] and [`Variance`]: Welford's and Chan et al.'s arithmetic |
//! | `mod.rs` | [`RewardHistory`], the store: one state per group, folds and merges |
//! | `store.rs` | the sorted key → state map behind it (two vectors, walked in key order) |
//! | `delta.rs` | [`BatchDeltas`]: what one batch adds, and [`RewardHistory::apply`] |
//! | `format.rs` | the versioned JSON format and its validation |

use std::collections::VecDeque;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{bail_config, Error, Result};
use crate::GroupKey;

mod delta;
mod format;
mod moments;
mod store;

pub use delta::BatchDeltas;
pub(crate) use delta::GroupDelta;
pub use moments::{RunningMoments, Variance};

/// How a group's statistics weigh its past rewards.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HistoryKind {
    /// Every reward ever seen counts equally (Welford). The paper's choice. Default.
    #[default]
    Cumulative,
    /// Exponentially decaying weights: a reward's weight halves after `half_life` newer rewards
    /// of its group. Tracks a policy that improves; `half_life` is counted in rewards.
    Exponential {
        /// Half-life in rewards, > 0.
        half_life: f64,
    },
    /// Only the last `size` rewards of the group count.
    Window {
        /// Window length in rewards, ≥ 1.
        size: usize,
    },
}

impl HistoryKind {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a non-positive or non-finite half-life, or a zero window.
    pub fn validate(&self) -> Result<()> {
        match *self {
            HistoryKind::Cumulative => Ok(()),
            HistoryKind::Exponential { half_life } => {
                if !(half_life.is_finite() && half_life > 0.0) {
                    bail_config!(
                        "history.half_life",
                        "must be finite and > 0, got {half_life}"
                    );
                }
                Ok(())
            }
            HistoryKind::Window { size } => {
                if size == 0 {
                    bail_config!("history.size", "window size must be at least 1");
                }
                Ok(())
            }
        }
    }

    /// The per-reward decay factor `d`: 1 for cumulative and window, `2^(-1/half_life)` for
    /// exponential.
    pub fn decay(&self) -> f64 {
        match *self {
            HistoryKind::Exponential { half_life } => (-std::f64::consts::LN_2 / half_life).exp(),
            _ => 1.0,
        }
    }
}

/// Summary statistics of one group's reward history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Number of rewards seen (for a window: ever seen, not only those in the window).
    pub n: u64,
    /// Effective sample size: the sum of weights (equals the window fill for a window, `n`
    /// for cumulative statistics).
    pub weight: f64,
    /// Mean reward.
    pub mean: f64,
    /// Population standard deviation (`sqrt(M2 / weight)`).
    pub std: f64,
    /// Sample standard deviation (`sqrt(M2 / (weight - 1))`), `NaN` when `weight ≤ 1`.
    pub sample_std: f64,
}

impl Stats {
    /// The standard deviation under `variance`; `None` when undefined.
    pub fn std_with(&self, variance: Variance) -> Option<f64> {
        let s = match variance {
            Variance::Population => self.std,
            Variance::Sample => self.sample_std,
        };
        s.is_finite().then_some(s)
    }

    fn from_moments(n: u64, m: &RunningMoments) -> Self {
        Self {
            n,
            weight: m.weight,
            mean: m.mean,
            std: m.variance(Variance::Population).map_or(f64::NAN, f64::sqrt),
            sample_std: m.variance(Variance::Sample).map_or(f64::NAN, f64::sqrt),
        }
    }
}

/// One group's state. For a window the moments are those of `window`.
#[derive(Debug, Clone, PartialEq, Default)]
struct GroupState {
    /// Rewards ever seen.
    seen: u64,
    moments: RunningMoments,
    window: VecDeque<f64>,
}

impl GroupState {
    /// Appends a group's later rewards: `seen` of them, given by their `moments`
    /// (cumulative and exponential kinds) or by their `values` (window kind; the moments are
    /// then recomputed from the last `size` values). The one fold behind
    /// [`RewardHistory::fold_deltas`] (a batch's rewards) and [`RewardHistory::merge`]
    /// (another store's).
    fn append(
        &mut self,
        kind: HistoryKind,
        decay: f64,
        seen: u64,
        moments: &RunningMoments,
        values: impl IntoIterator<Item = f64>,
    ) {
        self.seen += seen;
        match kind {
            HistoryKind::Window { size } => {
                self.window.extend(values);
                while self.window.len() > size {
                    self.window.pop_front();
                }
                self.moments = window_moments(&self.window);
            }
            // `append` decays by `decay^count`; the count that decays an exponential history
            // is the number of later rewards, which for these kinds is `moments.count`.
            _ => self.moments.append(moments, decay),
        }
    }

    /// [`append`](Self::append) of one batch's rewards.
    fn append_delta(&mut self, kind: HistoryKind, decay: f64, delta: GroupDelta) {
        self.append(kind, decay, delta.count, &delta.moments(), delta.values);
    }
}

/// The moments of a window's values (two passes in `f64`, oldest first).
fn window_moments(w: &VecDeque<f64>) -> RunningMoments {
    let (a, b) = w.as_slices();
    if b.is_empty() {
        RunningMoments::from_slice(a)
    } else {
        RunningMoments::from_slice(&w.iter().copied().collect::<Vec<_>>())
    }
}

/// Per-preference-group reward statistics kept across training steps.
///
/// ```
/// use pgrpo::{HistoryKind, RewardHistory};
/// let mut h = RewardHistory::new(HistoryKind::Cumulative)?;
/// h.update("formal", &[1.0, 2.0, 3.0])?;
/// h.update(7u32, &[10.0])?;
/// let s = h.stats(&"formal".into()).unwrap();
/// assert_eq!((s.n, s.mean), (3, 2.0));
/// assert!((s.sample_std - 1.0).abs() < 1e-12);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RewardHistory {
    kind: HistoryKind,
    decay: f64,
    groups: store::Groups,
}

impl Default for RewardHistory {
    fn default() -> Self {
        Self {
            kind: HistoryKind::Cumulative,
            decay: 1.0,
            groups: store::Groups::default(),
        }
    }
}

impl RewardHistory {
    /// An empty history of the given kind.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the kind's parameters are invalid.
    pub fn new(kind: HistoryKind) -> Result<Self> {
        kind.validate()?;
        Ok(Self {
            kind,
            decay: kind.decay(),
            groups: store::Groups::default(),
        })
    }

    /// The kind of statistics kept.
    pub fn kind(&self) -> HistoryKind {
        self.kind
    }

    /// Number of groups seen.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether no group has been seen.
    pub fn is_empty(&self) -> bool {
        self.groups.len() == 0
    }

    /// Forgets everything (keeps the kind).
    pub fn clear(&mut self) {
        self.groups.clear();
    }

    /// Statistics of one group, `None` if it has no reward yet.
    pub fn stats(&self, group: &GroupKey) -> Option<Stats> {
        self.groups
            .get(group)
            .map(|g| Stats::from_moments(g.seen, &g.moments))
    }

    /// Raw moments of one group (for the window kind: of the rewards in the window).
    pub fn moments(&self, group: &GroupKey) -> Option<RunningMoments> {
        self.groups.get(group).map(|g| g.moments)
    }

    /// Iterates over `(group, stats)` in key order (ids first, then names).
    pub fn iter(&self) -> impl Iterator<Item = (&GroupKey, Stats)> + '_ {
        self.groups
            .iter()
            .map(|(k, g)| (k, Stats::from_moments(g.seen, &g.moments)))
    }

    /// Iterates over the group keys in order.
    pub fn groups(&self) -> impl Iterator<Item = &GroupKey> + '_ {
        self.groups.keys().iter()
    }

    /// Folds `rewards` (in order) into `group`'s statistics.
    ///
    /// # Errors
    /// [`Error::NonFiniteReward`] if a reward is NaN or infinite (nothing is folded in).
    pub fn update(&mut self, group: impl Into<GroupKey>, rewards: &[f32]) -> Result<()> {
        if let Some((row, &value)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
            return Err(Error::NonFiniteReward { row, value });
        }
        if rewards.is_empty() {
            return Ok(());
        }
        let mut delta = GroupDelta::default();
        for &r in rewards {
            delta.push(r, self.decay, self.kind);
        }
        self.fold_delta(group.into(), delta);
        Ok(())
    }

    /// Folds a batch whose rows carry group indices into `keys`: row `i` has reward
    /// `rewards[i]` and group `keys[group_ids[i]]`. Rows are folded in row order.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`], [`Error::IndexOutOfRange`] or [`Error::NonFiniteReward`];
    /// on error nothing is folded in.
    pub fn update_rows(
        &mut self,
        keys: &[GroupKey],
        group_ids: &[u32],
        rewards: &[f32],
    ) -> Result<()> {
        if group_ids.len() != rewards.len() {
            return Err(Error::LengthMismatch {
                what: "group_ids",
                got: group_ids.len(),
                against: "rewards",
                expected: rewards.len(),
            });
        }
        for (row, (&g, &r)) in group_ids.iter().zip(rewards).enumerate() {
            if g as usize >= keys.len() {
                return Err(Error::IndexOutOfRange {
                    what: "group_ids",
                    row,
                    value: g as usize,
                    bound: keys.len(),
                    of: "groups",
                });
            }
            if !r.is_finite() {
                return Err(Error::NonFiniteReward { row, value: r });
            }
        }
        let mut deltas = vec![GroupDelta::default(); keys.len()];
        for (&g, &r) in group_ids.iter().zip(rewards) {
            deltas[g as usize].push(r, self.decay, self.kind);
        }
        self.fold_deltas(keys, deltas);
        Ok(())
    }

    /// Folds per-group deltas (index-aligned with `keys`) into the store. Crate-internal: the
    /// advantage kernel builds the deltas in the same pass as the advantages.
    pub(crate) fn fold_deltas(&mut self, keys: &[GroupKey], deltas: Vec<GroupDelta>) {
        let (kind, decay) = (self.kind, self.decay);
        if self.groups.stored_in_order(keys) {
            // Every key stored, in the store's order (a trainer's batch after its first
            // step): each group's fold is independent, split over the cores.
            self.groups
                .states_mut()
                .par_iter_mut()
                .zip(deltas)
                .for_each(|(state, delta)| {
                    if delta.count > 0 {
                        state.append_delta(kind, decay, delta);
                    }
                });
            return;
        }
        let mut new = Vec::new();
        for ((key, delta), at) in keys.iter().zip(deltas).zip(self.groups.positions(keys)) {
            if delta.count == 0 {
                continue;
            }
            match at {
                Some(i) => self.groups.state_mut(i).append_delta(kind, decay, delta),
                None => new.push((key.clone(), delta)),
            }
        }
        // Groups seen for the first time, merged in at once (in the order of `keys` where
        // one is named twice).
        self.groups
            .insert_new(new, |state, delta| state.append_delta(kind, decay, delta));
    }

    /// [`moments`](Self::moments) of each of `keys`; for increasing keys one ordered walk
    /// over the stored groups instead of a search per key.
    pub(crate) fn moments_of(&self, keys: &[GroupKey]) -> Vec<Option<RunningMoments>> {
        self.walk(keys, |g| g.moments)
    }

    /// `get(g)` of the state of each of `keys` (`None`: not stored); for increasing keys one
    /// ordered walk over the stored groups instead of a search per key.
    fn walk<V>(&self, keys: &[GroupKey], get: impl Fn(&GroupState) -> V) -> Vec<Option<V>> {
        let states: Vec<Option<usize>> = self.groups.positions(keys);
        states
            .into_iter()
            .map(|at| at.map(|i| get(self.groups.state(i))))
            .collect()
    }

    /// The first group that folding `deltas` (index-aligned with `keys`) would take past
    /// [`MAX_REWARDS`](delta::MAX_REWARDS) rewards, with the rewards it holds.
    pub(crate) fn overfull<'k>(
        &self,
        keys: &'k [GroupKey],
        deltas: &[GroupDelta],
    ) -> Option<(&'k GroupKey, u64)> {
        let seen = self.walk(keys, |g| g.seen);
        keys.iter()
            .zip(deltas)
            .zip(seen)
            .find_map(|((key, d), seen)| {
                let seen = seen.unwrap_or(0);
                (d.count > 0 && seen.saturating_add(d.count) > delta::MAX_REWARDS)
                    .then_some((key, seen))
            })
    }

    /// The moments `key` would have after folding `delta` in, without folding it.
    pub(crate) fn moments_with(&self, key: &GroupKey, delta: &GroupDelta) -> RunningMoments {
        let state = self.groups.get(key);
        match self.kind {
            HistoryKind::Window { size } => {
                let old = state.map(|s| &s.window);
                let keep_old = size.saturating_sub(delta.values.len());
                let mut v: Vec<f64> = old
                    .map(|w| {
                        w.iter()
                            .skip(w.len().saturating_sub(keep_old))
                            .copied()
                            .collect()
                    })
                    .unwrap_or_default();
                v.extend(&delta.values[delta.values.len().saturating_sub(size)..]);
                RunningMoments::from_slice(&v)
            }
            _ => {
                let mut m = state.map(|s| s.moments).unwrap_or_default();
                m.append(&delta.moments(), self.decay);
                m
            }
        }
    }

    fn fold_delta(&mut self, key: GroupKey, delta: GroupDelta) {
        let (kind, decay) = (self.kind, self.decay);
        self.groups.entry(key).append_delta(kind, decay, delta);
    }

    /// Appends every group of `later` after this store's rewards, exactly.
    ///
    /// For cumulative statistics `a.merge(b)` equals `b.merge(a)` (to rounding) and equals one
    /// store that saw all rewards; exponential and window statistics treat `later`'s rewards as
    /// newer.
    ///
    /// # Errors
    /// [`Error::InvalidHistory`] if the kinds differ.
    pub fn merge(&mut self, later: &RewardHistory) -> Result<()> {
        if self.kind != later.kind {
            return Err(Error::invalid_history(format!(
                "cannot merge a {:?} history into a {:?} history",
                later.kind, self.kind
            )));
        }
        let (kind, decay) = (self.kind, self.decay);
        let fold = |state: &mut GroupState, other: &GroupState| {
            state.append(
                kind,
                decay,
                other.seen,
                &other.moments,
                other.window.iter().copied(),
            );
        };
        let mut new = Vec::new();
        let at = self.groups.positions(later.groups.keys());
        for ((key, other), at) in later.groups.iter().zip(at) {
            match at {
                Some(i) => fold(self.groups.state_mut(i), other),
                None => new.push((key.clone(), other)),
            }
        }
        self.groups.insert_new(new, fold);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ordered walk of `fold_deltas` and `moments_of` (increasing keys) against one
    /// search per key, with keys stored and not, before, between and after the stored ones,
    /// and a delta with no rewards, for every history kind.
    #[test]
    fn ordered_walk_equals_one_search_per_key() {
        let keys: Vec<GroupKey> = vec![
            GroupKey::Id(0),
            GroupKey::Id(1),
            GroupKey::Id(2),
            GroupKey::Id(3),
            GroupKey::Id(9),
            "a".into(),
            "b".into(),
            "z".into(),
        ];
        for kind in [
            HistoryKind::Cumulative,
            HistoryKind::Exponential { half_life: 5.0 },
            HistoryKind::Window { size: 4 },
        ] {
            let mut h = RewardHistory::new(kind).unwrap();
            for (i, key) in [
                GroupKey::Id(1),
                GroupKey::Id(3),
                "b".into(),
                GroupKey::Id(7),
            ]
            .into_iter()
            .enumerate()
            {
                h.update(key, &[i as f32, 2.0 * i as f32 + 1.0, -0.5])
                    .unwrap();
            }
            let decay = kind.decay();
            let deltas: Vec<GroupDelta> = (0..keys.len())
                .map(|g| {
                    let mut d = GroupDelta::default();
                    // Group 2 ("Id(2)") gets no rewards.
                    for j in 0..(if g == 2 { 0 } else { g + 1 }) {
                        d.push((g * 10 + j) as f32 * 0.1, decay, kind);
                    }
                    d
                })
                .collect();
            let walk = h.moments_of(&keys);
            let search: Vec<_> = keys.iter().map(|k| h.moments(k)).collect();
            assert_eq!(walk, search, "{kind:?}");
            assert_eq!(walk.iter().filter(|m| m.is_some()).count(), 3);
            let mut walked = h.clone();
            walked.fold_deltas(&keys, deltas.clone());
            let mut searched = h.clone();
            for (key, delta) in keys.iter().zip(deltas) {
                if delta.count > 0 {
                    searched.fold_delta(key.clone(), delta);
                }
            }
            assert_eq!(walked, searched, "{kind:?}");
            assert_eq!(walked.len(), 8, "{kind:?}");
        }
    }
}
