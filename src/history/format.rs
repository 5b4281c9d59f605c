//! The versioned JSON format of a [`RewardHistory`] (`"format": "pgrpo.reward_history"`,
//! `"version": 1`), and the validation that lets only a history some sequence of updates could
//! have produced back in: finite means within `f32`'s range (rewards are `f32`), non-negative
//! `M2` no larger than such rewards give, weights within what the kind allows, a window no
//! longer than its size, no group listed twice. Checkpoints and `serde` go through
//! here.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{window_moments, GroupState, HistoryKind, RewardHistory, RunningMoments};
use crate::error::{Error, Result};
use crate::GroupKey;

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

impl RewardHistory {
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
            return Err(Error::invalid_history(format!(
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
            .map_err(|e| Error::invalid_history(format!("kind: {e}")))?;
        let mut h = RewardHistory::new(s.kind)?;
        for g in s.groups {
            let bad = |what: String| Error::InvalidHistory {
                group: Some(g.key.to_string()),
                reason: what,
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
            // Rewards are `f32`: a mean or a spread beyond their range could not come from
            // them, and would overflow when later rewards are merged in.
            let big = f32::MAX as f64 * (1.0 + 1e-6);
            if g.mean.abs() > big || g.m2 > g.weight * 4.0 * big * big {
                return Err(bad(format!(
                    "mean {} or m2 {} out of what f32 rewards can give",
                    g.mean, g.m2
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
                    if w.iter().any(|x| !(x.is_finite() && x.abs() <= big)) {
                        return Err(bad("window holds a reward out of f32's range".into()));
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
            if !h.groups.insert(
                g.key.clone(),
                GroupState {
                    seen: g.seen,
                    moments,
                    window,
                },
            ) {
                return Err(bad("listed twice".into()));
            }
        }
        Ok(h)
    }
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
