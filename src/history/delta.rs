//! What one batch adds to the history, before it is folded in: [`GroupDelta`] for one group
//! (shifted sums, or the values for a window), [`BatchDeltas`] for every group of a batch (what
//! the advantage computation returns and data-parallel workers exchange), and
//! [`RewardHistory::apply`], which folds them into the store.

use serde::{Deserialize, Serialize};

use super::{HistoryKind, RewardHistory, RunningMoments};
use crate::error::{Error, Result};
use crate::GroupKey;

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
    pub(super) values: Vec<f64>,
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

    /// Why a delta read from outside (another process, a file) is not one that `push` and
    /// `append` could have built for `kind` from `f32` rewards, or `None` when it is. The
    /// checks are those of the history's format validation, so that a history that folds in
    /// an accepted delta can be saved and loaded again:
    ///
    /// - at most [`MAX_REWARDS`] rewards; an empty delta is all zeros;
    /// - window kind: `count` values, each a finite `f32` value, and no sums;
    /// - cumulative and exponential: no values; `shift` (the first reward) an `f32` value;
    ///   finite sums with `s2 >= 0`; the weight a batch of `count` rewards has (`count` for
    ///   cumulative statistics, `Σ_{j<count} d^j` to rounding for exponential ones, at least
    ///   1); a mean within `f32`'s range and `M2 <= weight · (2 · f32::MAX)²` (what rewards of
    ///   `f32`'s range can give, which keeps every later merge finite).
    pub(crate) fn problem(&self, kind: HistoryKind) -> Option<String> {
        let f32_value = |x: f64| x.is_finite() && (x as f32) as f64 == x;
        if self.count > MAX_REWARDS {
            return Some(format!(
                "{} rewards, more than the {MAX_REWARDS} a history can count exactly",
                self.count
            ));
        }
        let sums = [self.w, self.shift, self.s1, self.s2];
        if self.count == 0 {
            return (sums.iter().any(|&x| x != 0.0) || !self.values.is_empty())
                .then(|| "an empty delta with non-zero sums or values".to_owned());
        }
        if let HistoryKind::Window { .. } = kind {
            if self.values.len() as u64 != self.count {
                return Some(format!(
                    "a window delta of {} rewards holds {} values",
                    self.count,
                    self.values.len()
                ));
            }
            if let Some(x) = self.values.iter().find(|&&x| !f32_value(x)) {
                return Some(format!("value {x} is not a finite f32 reward"));
            }
            return sums
                .iter()
                .any(|&x| x != 0.0)
                .then(|| "a window delta with sums".to_owned());
        }
        if !self.values.is_empty() {
            return Some(format!("a {kind:?} delta with values"));
        }
        if !f32_value(self.shift) {
            return Some(format!("shift {} is not a finite f32 reward", self.shift));
        }
        if !(self.s1.is_finite() && self.s2.is_finite() && self.s2 >= 0.0) {
            return Some(format!(
                "sums must be finite with s2 >= 0, got s1 {}, s2 {}",
                self.s1, self.s2
            ));
        }
        let c = self.count as f64;
        let weight_ok = match kind {
            HistoryKind::Cumulative => self.w == c,
            _ => {
                // Σ_{j<count} d^j = (1 − d^count)/(1 − d), the weight of `count` pushes,
                // computed with `expm1` so that it stays accurate for long half-lives; the
                // tolerance covers the rounding of `count` pushes or chunk merges.
                let ln_d = kind.decay().ln();
                let full = (c * ln_d).exp_m1() / ln_d.exp_m1();
                self.w >= 1.0 && self.w <= c && (self.w - full).abs() <= 1e-6 * full
            }
        };
        if !weight_ok {
            return Some(format!(
                "weight {} is not that of {} rewards in a {kind:?} history",
                self.w, self.count
            ));
        }
        let m = self.moments();
        let big = f32::MAX as f64 * (1.0 + 1e-6);
        if !(m.mean.abs() <= big && m.m2 <= m.weight * 4.0 * big * big) {
            return Some(format!(
                "mean {} or M2 {} out of what f32 rewards can give",
                m.mean, m.m2
            ));
        }
        None
    }
}

/// The most rewards a group's history may hold: `2⁵³`, below which a count converts to
/// `f64` exactly (a cumulative history's weight is its count).
pub(crate) const MAX_REWARDS: u64 = 1 << 53;

/// The batch's per-group reward statistics, ready to be folded into a [`RewardHistory`] with
/// [`RewardHistory::apply`]. Index-aligned with the batch's `group_keys`.
///
/// They serialize (serde, and [`to_json`](Self::to_json)/[`from_json`](Self::from_json)
/// with every `f64` read back to the same bits), so that data-parallel workers can exchange
/// them and fold each other's batches into their histories
/// ([`merge_batch_deltas`](crate::distributed::merge_batch_deltas)).
///
/// ```
/// use pgrpo::history::BatchDeltas;
/// use pgrpo::{AdvantageConfig, GroupKey, RewardHistory, RolloutRewards};
/// let keys: Vec<GroupKey> = vec!["a".into(), "b".into()];
/// let batch = RolloutRewards {
///     rewards: &[1.0, 0.0, 0.5, 0.25],
///     prompt_ids: &[0, 0, 1, 1],
///     group_ids: &[0, 0, 1, 1],
///     group_keys: &keys,
/// };
/// let adv = AdvantageConfig::default().compute(&batch, &RewardHistory::default())?;
/// assert_eq!(adv.deltas.len(), 2);
/// let a = adv.deltas.moments(0).unwrap();
/// assert_eq!((a.count, a.mean), (2, 0.5));
/// // Another process reads it back exactly and folds it into its own history.
/// let back = BatchDeltas::from_json(&adv.deltas.to_json()?)?;
/// assert_eq!(back, adv.deltas);
/// let mut history = RewardHistory::default();
/// history.apply(&keys, back)?;
/// assert_eq!(history.stats(&"b".into()).unwrap().n, 2);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "BatchDeltasSerde")]
pub struct BatchDeltas {
    pub(crate) kind: HistoryKind,
    pub(crate) deltas: Vec<GroupDelta>,
}

impl BatchDeltas {
    /// No groups: folding it changes nothing.
    pub fn empty(kind: HistoryKind) -> Self {
        Self {
            kind,
            deltas: Vec::new(),
        }
    }

    /// The history kind the statistics were computed for.
    pub fn kind(&self) -> HistoryKind {
        self.kind
    }

    /// Number of groups (the batch's `group_keys.len()`).
    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    /// Whether there is no group.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// The moments of group `i`'s rewards in this batch (weighted for an exponential
    /// history), or `None` past the end.
    pub fn moments(&self, i: usize) -> Option<RunningMoments> {
        self.deltas.get(i).map(|d| d.moments_for(self.kind))
    }

    /// JSON, each `f64` written so that [`from_json`](Self::from_json) reads the same bits.
    ///
    /// # Errors
    /// [`Error::Json`] (not expected: the statistics are finite).
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Parses [`to_json`](Self::to_json)'s output and checks that every delta is one a batch
    /// of `f32` rewards could have produced for its kind, with the checks of the history's
    /// own format: whatever is accepted can be folded into a history that saves and loads
    /// again. Every way of deserializing `BatchDeltas` (serde, the data-parallel exchange)
    /// makes the same checks.
    ///
    /// # Errors
    /// [`Error::Json`] for malformed JSON, [`Error::InvalidHistory`] for inconsistent
    /// statistics (naming the group and what is wrong) or an invalid kind.
    pub fn from_json(json: &str) -> Result<Self> {
        let d: BatchDeltasSerde = serde_json::from_str(json)?;
        d.try_into()
    }

    /// The checks of [`from_json`](Self::from_json).
    pub(crate) fn check(&self) -> Result<()> {
        self.kind
            .validate()
            .map_err(|e| Error::invalid_history(format!("batch deltas kind: {e}")))?;
        for (i, g) in self.deltas.iter().enumerate() {
            if let Some(why) = g.problem(self.kind) {
                return Err(Error::invalid_history(format!(
                    "batch deltas: group {i}: {why}"
                )));
            }
        }
        Ok(())
    }
}

/// The serde form of [`BatchDeltas`], checked on the way in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchDeltasSerde {
    kind: HistoryKind,
    deltas: Vec<GroupDelta>,
}

impl TryFrom<BatchDeltasSerde> for BatchDeltas {
    type Error = Error;

    fn try_from(s: BatchDeltasSerde) -> Result<Self> {
        let d = BatchDeltas {
            kind: s.kind,
            deltas: s.deltas,
        };
        d.check()?;
        Ok(d)
    }
}

impl RewardHistory {
    /// Folds a batch's per-group statistics (from
    /// [`AdvantageConfig::compute`](crate::AdvantageConfig::compute)) into the store.
    /// `keys` must be the `group_keys` of that batch. On error nothing is folded in.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `keys` does not match, [`Error::InvalidHistory`] if the
    /// deltas were computed for another history kind, or would take a group past
    /// `2⁵³` rewards (where its count stops converting to `f64` exactly).
    pub fn apply(&mut self, keys: &[GroupKey], deltas: BatchDeltas) -> Result<()> {
        if keys.len() != deltas.deltas.len() {
            return Err(Error::LengthMismatch {
                what: "group_keys",
                got: keys.len(),
                against: "batch deltas",
                expected: deltas.deltas.len(),
            });
        }
        if deltas.kind != self.kind() {
            return Err(Error::invalid_history(format!(
                "batch statistics were computed for a {:?} history, this one is {:?}",
                deltas.kind,
                self.kind()
            )));
        }
        if let Some((key, seen)) = self.overfull(keys, &deltas.deltas) {
            return Err(Error::InvalidHistory {
                group: Some(key.to_string()),
                reason: format!(
                    "holds {seen} rewards: folding the batch in would pass the {MAX_REWARDS} a \
                     history can count exactly"
                ),
            });
        }
        self.fold_deltas(keys, deltas.deltas);
        Ok(())
    }
}
