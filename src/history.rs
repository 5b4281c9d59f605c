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

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{bail_config, Error, Result};
use crate::GroupKey;

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

/// Population or sample variance (divide the sum of squared deviations by `n` or `n - 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// `M2 / n`.
    Population,
    /// `M2 / (n - 1)` (Bessel's correction; `torch.std`'s default, so TRL's). Default.
    #[default]
    Sample,
}

/// Weighted running moments `(count, weight, mean, M2)` of a stream of rewards.
///
/// `weight` is the sum of the rewards' weights (equal to `count` unless weights decay) and
/// `m2` the weighted sum of squared deviations from `mean`. All in `f64`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RunningMoments {
    /// Number of rewards folded in.
    pub count: u64,
    /// Sum of weights (the effective sample size).
    pub weight: f64,
    /// Weighted mean.
    pub mean: f64,
    /// Weighted sum of squared deviations from the mean.
    pub m2: f64,
}

impl RunningMoments {
    /// Moments of `values` with every weight 1 (two passes in `f64`).
    pub fn from_slice(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let m2 = values.iter().map(|x| (x - mean) * (x - mean)).sum();
        Self {
            count: values.len() as u64,
            weight: n,
            mean,
            m2,
        }
    }

    /// Builds moments from sums shifted by `shift`: `w = Σ wᵢ`, `s1 = Σ wᵢ (xᵢ - shift)`,
    /// `s2 = Σ wᵢ (xᵢ - shift)²`. Exact when `shift` is close to the values (e.g. the first).
    pub fn from_shifted_sums(count: u64, w: f64, shift: f64, s1: f64, s2: f64) -> Self {
        if count == 0 || w <= 0.0 {
            return Self::default();
        }
        let d = s1 / w;
        Self {
            count,
            weight: w,
            mean: shift + d,
            m2: (s2 - s1 * d).max(0.0),
        }
    }

    /// Folds one reward in with weight 1 after decaying the past by `decay` (Welford).
    pub fn push(&mut self, x: f64, decay: f64) {
        self.count += 1;
        self.weight = self.weight * decay + 1.0;
        let delta = x - self.mean;
        self.mean += delta / self.weight;
        self.m2 = self.m2 * decay + delta * (x - self.mean);
    }

    /// Appends `later` (moments of rewards that came after these), decaying these by
    /// `decay^later.count` first (Chan et al.'s parallel formula, weighted).
    pub fn append(&mut self, later: &RunningMoments, decay: f64) {
        if later.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *later;
            return;
        }
        let scale = if decay == 1.0 {
            1.0
        } else {
            decay.powf(later.count as f64)
        };
        let wa = self.weight * scale;
        let m2a = self.m2 * scale;
        let w = wa + later.weight;
        let delta = later.mean - self.mean;
        self.mean += delta * (later.weight / w);
        self.m2 = m2a + later.m2 + delta * delta * (wa * later.weight / w);
        self.weight = w;
        self.count += later.count;
    }

    /// Variance under the chosen convention; `None` when it is undefined (no reward, or a
    /// sample variance with weight ≤ 1).
    pub fn variance(&self, variance: Variance) -> Option<f64> {
        let denom = match variance {
            Variance::Population => self.weight,
            Variance::Sample => self.weight - 1.0,
        };
        if self.count == 0 || denom <= 0.0 {
            None
        } else {
            Some((self.m2 / denom).max(0.0))
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

/// Whether `keys` is non-empty and strictly increasing: then they can be looked up in one
/// ordered walk over the stored groups.
fn increasing(keys: &[GroupKey]) -> bool {
    !keys.is_empty() && keys.windows(2).all(|w| w[0] < w[1])
}

/// Advances an ordered walk over stored groups to `key` (never past a larger key) and takes
/// its value if it is stored.
fn seek<'a, V>(
    stored: &mut std::iter::Peekable<impl Iterator<Item = (&'a GroupKey, V)>>,
    key: &GroupKey,
) -> Option<V> {
    while stored.next_if(|(k, _)| *k < key).is_some() {}
    stored.next_if(|(k, _)| *k == key).map(|(_, v)| v)
}

/// Folds one batch delta into a group's state.
fn fold_into(state: &mut GroupState, kind: HistoryKind, decay: f64, delta: GroupDelta) {
    state.seen += delta.count;
    match kind {
        HistoryKind::Window { size } => {
            state.window.extend(delta.values);
            while state.window.len() > size {
                state.window.pop_front();
            }
            state.moments = window_moments(&state.window);
        }
        _ => state.moments.append(&delta.moments(), decay),
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
    groups: BTreeMap<GroupKey, GroupState>,
}

impl Default for RewardHistory {
    fn default() -> Self {
        Self {
            kind: HistoryKind::Cumulative,
            decay: 1.0,
            groups: BTreeMap::new(),
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
            groups: BTreeMap::new(),
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
        self.groups.is_empty()
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
        self.groups.keys()
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
        let mut rest: Vec<(&GroupKey, GroupDelta)> = Vec::new();
        if increasing(keys) {
            // Increasing keys (the usual `0..k` ids): one ordered walk over the stored groups
            // instead of a search per key; groups not stored yet are inserted afterwards.
            let mut stored = self.groups.range_mut(keys[0].clone()..).peekable();
            for (key, delta) in keys.iter().zip(deltas) {
                if delta.count == 0 {
                    continue;
                }
                match seek(&mut stored, key) {
                    Some(state) => fold_into(state, kind, decay, delta),
                    None => rest.push((key, delta)),
                }
            }
        } else {
            rest = keys.iter().zip(deltas).collect();
        }
        for (key, delta) in rest {
            if delta.count > 0 {
                self.fold_delta(key.clone(), delta);
            }
        }
    }

    /// [`moments`](Self::moments) of each of `keys`; for increasing keys one ordered walk
    /// over the stored groups instead of a search per key.
    pub(crate) fn moments_of(&self, keys: &[GroupKey]) -> Vec<Option<RunningMoments>> {
        if !increasing(keys) {
            return keys.iter().map(|k| self.moments(k)).collect();
        }
        let mut stored = self.groups.range(keys[0].clone()..).peekable();
        keys.iter()
            .map(|key| seek(&mut stored, key).map(|g| g.moments))
            .collect()
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
        fold_into(self.groups.entry(key).or_default(), kind, decay, delta);
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
            return Err(Error::InvalidHistory(format!(
                "cannot merge a {:?} history into a {:?} history",
                later.kind, self.kind
            )));
        }
        let (kind, decay) = (self.kind, self.decay);
        for (key, other) in &later.groups {
            let state = self.groups.entry(key.clone()).or_default();
            state.seen += other.seen;
            match kind {
                HistoryKind::Window { size } => {
                    state.window.extend(other.window.iter().copied());
                    while state.window.len() > size {
                        state.window.pop_front();
                    }
                    state.moments = window_moments(&state.window);
                }
                _ => {
                    // `append` decays by `decay^count`; the count that decays a window is the
                    // number of rewards, which for these kinds equals `moments.count`.
                    state.moments.append(&other.moments, decay);
                }
            }
        }
        Ok(())
    }

    /// Serializes to versioned, human-readable JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(&self.to_serde())?)
    }

    /// Parses JSON written by [`to_json`](Self::to_json), validating every number.
    ///
    /// # Errors
    /// [`Error::Json`] for malformed JSON, [`Error::UnsupportedVersion`] for a newer format,
    /// [`Error::InvalidHistory`] for inconsistent statistics (non-finite mean, negative M2,
    /// window longer than its size, …).
    pub fn from_json(json: &str) -> Result<Self> {
        let s: HistorySerde = serde_json::from_str(json)?;
        Self::from_serde(s)
    }

    fn to_serde(&self) -> HistorySerde {
        HistorySerde {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            kind: self.kind,
            groups: self
                .groups
                .iter()
                .map(|(k, g)| GroupSerde {
                    key: k.clone(),
                    seen: g.seen,
                    count: g.moments.count,
                    weight: g.moments.weight,
                    mean: g.moments.mean,
                    m2: g.moments.m2,
                    window: match self.kind {
                        HistoryKind::Window { .. } => Some(g.window.iter().copied().collect()),
                        _ => None,
                    },
                })
                .collect(),
        }
    }

    fn from_serde(s: HistorySerde) -> Result<Self> {
        if s.format != FORMAT_NAME {
            return Err(Error::InvalidHistory(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                s.format
            )));
        }
        if s.version > FORMAT_VERSION || s.version == 0 {
            return Err(Error::UnsupportedVersion {
                what: "reward history",
                found: s.version,
                supported: FORMAT_VERSION,
            });
        }
        s.kind
            .validate()
            .map_err(|e| Error::InvalidHistory(format!("kind: {e}")))?;
        let mut h = RewardHistory::new(s.kind)?;
        for g in s.groups {
            let bad = |what: String| {
                Error::InvalidHistory(format!("group {:?}: {what}", g.key.to_string()))
            };
            if !g.mean.is_finite() {
                return Err(bad("mean is not finite".into()));
            }
            if !(g.m2.is_finite() && g.m2 >= 0.0) {
                return Err(bad(format!("m2 must be finite and >= 0, got {}", g.m2)));
            }
            if !(g.weight.is_finite() && g.weight >= 0.0) {
                return Err(bad(format!(
                    "weight must be finite and >= 0, got {}",
                    g.weight
                )));
            }
            if g.count > g.seen {
                return Err(bad(format!("count {} exceeds seen {}", g.count, g.seen)));
            }
            if g.count == 0 && (g.weight != 0.0 || g.m2 != 0.0) {
                return Err(bad("empty moments with non-zero weight or m2".into()));
            }
            if g.weight > g.count as f64 * (1.0 + 1e-9) {
                return Err(bad(format!(
                    "weight {} exceeds count {}",
                    g.weight, g.count
                )));
            }
            match s.kind {
                HistoryKind::Cumulative if g.weight != g.count as f64 || g.count != g.seen => {
                    return Err(bad(format!(
                        "cumulative statistics need weight = count = seen, got weight {}, count {}, seen {}",
                        g.weight, g.count, g.seen
                    )));
                }
                HistoryKind::Exponential { half_life } => {
                    // The weights 1, d, d², … of `count` rewards sum to at most 1 / (1 − d).
                    let bound = 1.0 / (1.0 - s.kind.decay());
                    if g.count != g.seen || g.weight > bound * (1.0 + 1e-9) + 1e-9 {
                        return Err(bad(format!(
                            "exponential statistics (half-life {half_life}) need count = seen and \
                             weight <= {bound}, got weight {}, count {}, seen {}",
                            g.weight, g.count, g.seen
                        )));
                    }
                }
                _ => {}
            }
            let window: VecDeque<f64> = match (s.kind, g.window) {
                (HistoryKind::Window { size }, Some(w)) => {
                    if w.len() > size || w.len() as u64 > g.seen || w.len() as u64 != g.count {
                        return Err(bad(format!(
                            "window holds {} rewards (size {size}, count {}, seen {})",
                            w.len(),
                            g.count,
                            g.seen
                        )));
                    }
                    if w.iter().any(|x| !x.is_finite()) {
                        return Err(bad("window holds a non-finite reward".into()));
                    }
                    w.into()
                }
                (HistoryKind::Window { .. }, None) => {
                    return Err(bad("window kind without `window`".into()))
                }
                (_, Some(_)) => return Err(bad("`window` given for a non-window kind".into())),
                (_, None) => VecDeque::new(),
            };
            let moments = match s.kind {
                // Recomputed from the values: the stored moments are informative only.
                HistoryKind::Window { .. } => window_moments(&window),
                _ => RunningMoments {
                    count: g.count,
                    weight: g.weight,
                    mean: g.mean,
                    m2: g.m2,
                },
            };
            if h.groups
                .insert(
                    g.key.clone(),
                    GroupState {
                        seen: g.seen,
                        moments,
                        window,
                    },
                )
                .is_some()
            {
                return Err(bad("listed twice".into()));
            }
        }
        Ok(h)
    }
}

fn window_moments(w: &VecDeque<f64>) -> RunningMoments {
    let (a, b) = w.as_slices();
    if b.is_empty() {
        RunningMoments::from_slice(a)
    } else {
        RunningMoments::from_slice(&w.iter().copied().collect::<Vec<_>>())
    }
}

/// The rewards one batch adds to one group, before they are folded in.
///
/// Cumulative and exponential kinds keep sums shifted by the group's first reward in the batch
/// (`s1 = Σ w (x - shift)`, `s2 = Σ w (x - shift)²`, the weights decaying as rewards arrive):
/// no division per row, and exact because the shift lies within the batch's spread.
/// The window kind keeps the values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupDelta {
    pub(crate) count: u64,
    w: f64,
    shift: f64,
    s1: f64,
    s2: f64,
    values: Vec<f64>,
}

impl GroupDelta {
    /// The delta a cumulative history's `push` builds from `count` rewards whose first was
    /// `shift`, with shifted sums `s1`, `s2` (the weight of each reward is 1).
    pub(crate) fn cumulative(count: u64, shift: f64, s1: f64, s2: f64) -> Self {
        Self {
            count,
            w: count as f64,
            shift,
            s1,
            s2,
            values: Vec::new(),
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, r: f32, decay: f64, kind: HistoryKind) {
        let x = r as f64;
        if let HistoryKind::Window { .. } = kind {
            self.values.push(x);
            self.count += 1;
            return;
        }
        if self.count == 0 {
            self.shift = x;
        }
        self.count += 1;
        let d = x - self.shift;
        if decay == 1.0 {
            self.w += 1.0;
            self.s1 += d;
            self.s2 += d * d;
        } else {
            self.w = self.w * decay + 1.0;
            self.s1 = self.s1 * decay + d;
            self.s2 = self.s2 * decay + d * d;
        }
    }

    pub(crate) fn moments(&self) -> RunningMoments {
        RunningMoments::from_shifted_sums(self.count, self.w, self.shift, self.s1, self.s2)
    }

    /// Appends the rewards of `later` (which came after these), as if they had been pushed
    /// one by one: the weights here decay by `decay^later.count`, and `later`'s sums are
    /// moved to this delta's shift (`d' = d + δ`, `δ = shift_later − shift`:
    /// `s1' = s1 + w δ`, `s2' = s2 + 2 δ s1 + w δ²`). Exact in real arithmetic; in floating
    /// point it differs from pushing one by one only by rounding. Used to merge per-chunk
    /// deltas of a large batch computed in parallel.
    pub(crate) fn append(&mut self, later: GroupDelta, decay: f64) {
        if later.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = later;
            return;
        }
        self.count += later.count;
        self.values.extend(later.values);
        if decay != 1.0 {
            let d = decay.powf(later.count as f64);
            self.w *= d;
            self.s1 *= d;
            self.s2 *= d;
        }
        let delta = later.shift - self.shift;
        self.w += later.w;
        self.s1 += later.s1 + later.w * delta;
        self.s2 += later.s2 + 2.0 * delta * later.s1 + later.w * delta * delta;
    }

    /// [`moments`](Self::moments), or for a window delta the plain moments of its values.
    pub(crate) fn moments_for(&self, kind: HistoryKind) -> RunningMoments {
        match kind {
            HistoryKind::Window { .. } => RunningMoments::from_slice(&self.values),
            _ => self.moments(),
        }
    }

    /// Whether a delta read from outside (another process) is one `push` could have built
    /// for `kind`: finite sums, and the values of a window delta are its count.
    pub(crate) fn is_consistent(&self, kind: HistoryKind) -> bool {
        let finite = [self.w, self.shift, self.s1, self.s2]
            .iter()
            .all(|x| x.is_finite());
        match kind {
            HistoryKind::Window { .. } => {
                self.values.len() as u64 == self.count && self.values.iter().all(|x| x.is_finite())
            }
            _ => {
                finite
                    && self.values.is_empty()
                    && self.s2 >= 0.0
                    && (self.count == 0) == (self.w == 0.0)
                    && self.w <= self.count as f64
            }
        }
    }
}

const FORMAT_NAME: &str = "pgrpo.reward_history";
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistorySerde {
    format: String,
    version: u32,
    kind: HistoryKind,
    groups: Vec<GroupSerde>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupSerde {
    key: GroupKey,
    seen: u64,
    count: u64,
    weight: f64,
    mean: f64,
    m2: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<Vec<f64>>,
}

impl Serialize for RewardHistory {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_serde().serialize(s)
    }
}

impl<'de> Deserialize<'de> for RewardHistory {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = HistorySerde::deserialize(d)?;
        Self::from_serde(s).map_err(serde::de::Error::custom)
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
