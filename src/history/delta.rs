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
#[serde(deny_unknown_fields)]
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
    /// could have produced for its kind (finite sums; a window delta holds `count` values).
    ///
    /// # Errors
    /// [`Error::Json`] for malformed JSON, [`Error::InvalidHistory`] for inconsistent
    /// statistics or an invalid kind.
    pub fn from_json(json: &str) -> Result<Self> {
        let d: BatchDeltas = serde_json::from_str(json)?;
        d.check()?;
        Ok(d)
    }

    /// The checks of [`from_json`](Self::from_json), for deltas deserialized another way.
    pub(crate) fn check(&self) -> Result<()> {
        self.kind
            .validate()
            .map_err(|e| Error::invalid_history(format!("batch deltas kind: {e}")))?;
        if let Some(i) = self.deltas.iter().position(|g| !g.is_consistent(self.kind)) {
            return Err(Error::invalid_history(format!(
                "batch deltas: group {i} holds inconsistent statistics"
            )));
        }
        Ok(())
    }
}

impl RewardHistory {
    /// Folds a batch's per-group statistics (from
    /// [`AdvantageConfig::compute`](crate::AdvantageConfig::compute)) into the store.
    /// `keys` must be the `group_keys` of that batch.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `keys` does not match, [`Error::InvalidHistory`] if the
    /// deltas were computed for another history kind.
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
        self.fold_deltas(keys, deltas.deltas);
        Ok(())
    }
}
