//! What ranks send each other, as bytes: every message of the data-parallel protocol
//! ([`protocol`](super::protocol) says when each is sent and what is done with it). Numbers
//! are little-endian; JSON where serde already has the format.
//!
//! | message | bytes |
//! |---|---|
//! | outcome (of any exchange that can fail on a rank) | `0` then the body, or `1` then the error's text (UTF-8) |
//! | rollout ([`encode_rollout`]) | the batch's fingerprint (`u64`), then an outcome whose body is the rank's rewards (`f32` each) |
//! | loss part ([`RankPart`]) | an outcome whose body is 14 `f64`: has-loss flag, `B_r`, `N_r`, `T_r`, loss, the objective metrics in [`ObjectiveMetrics::NAMES`] order, `Σ mask`, has-entropy flag, `Σ entropy · mask` |
//! | reward-function state (saving) | an outcome whose body is the JSON of the state (`null` for none) |
//! | checkpoint path (saving) | an outcome whose body is the path rank 0 wrote (UTF-8; empty from the other ranks) |
//! | agreement ([`Collective::check_same`](super::Collective::check_same)) | a 64-bit FNV-1a fingerprint ([`Fnv64`]) |
//! | batch statistics ([`encode_deltas`]) | JSON `{"keys": [...], "deltas": BatchDeltas}` |
//! | `f64` values ([`all_gather_f64`](super::all_gather_f64)) | the values (`f64` each) |

use serde::{Deserialize, Serialize};

use crate::history::BatchDeltas;
use crate::objective::ObjectiveMetrics;
use crate::{Error, GroupKey, Result};

/// FNV-1a, 64 bits: a fingerprint that is the same in every process and on every host
/// (unlike `std`'s hasher, whose algorithm may change between Rust releases).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

impl std::io::Write for Fnv64 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Fnv64::write(self, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The FNV-1a fingerprint of `bytes`.
pub(crate) fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = Fnv64::default();
    h.write(bytes);
    h.finish()
}

/// Fingerprint of a group-key sequence (tagged, so `Id(1)` differs from `Name("1")`).
pub(crate) fn hash_key(h: &mut Fnv64, key: &GroupKey) {
    match key {
        GroupKey::Id(i) => {
            h.write(&[0]);
            h.write(&i.to_le_bytes());
        }
        GroupKey::Name(s) => {
            h.write(&[1]);
            h.write(&(s.len() as u64).to_le_bytes());
            h.write(s.as_bytes());
        }
    }
}

pub(crate) fn bad_message(rank: usize, what: &dyn std::fmt::Display) -> Error {
    Error::distributed_rank(rank, format!("malformed message from rank {rank}: {what}"))
}

/// `bytes` as little-endian `f64`s, `None` if the length is not a multiple of 8.
pub(crate) fn f64s(bytes: &[u8]) -> Option<Vec<f64>> {
    bytes.len().is_multiple_of(8).then(|| {
        bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    })
}

/// `values` as little-endian bytes.
pub(crate) fn f64_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Appends an outcome to `out`: `0` and the body, or `1` and the error's text.
pub(crate) fn push_outcome(out: &mut Vec<u8>, local: std::result::Result<&[u8], &str>) {
    match local {
        Ok(body) => {
            out.push(0);
            out.extend_from_slice(body);
        }
        Err(msg) => {
            out.push(1);
            out.extend_from_slice(msg.as_bytes());
        }
    }
}

/// Reads [`push_outcome`]'s bytes: the body or the error's text; `None` if malformed.
pub(crate) fn read_outcome(bytes: &[u8]) -> Option<std::result::Result<&[u8], String>> {
    match bytes.split_first()? {
        (0, body) => Some(Ok(body)),
        (1, msg) => Some(Err(String::from_utf8_lossy(msg).into_owned())),
        _ => None,
    }
}

#[derive(Serialize)]
struct DeltasOut<'a> {
    keys: &'a [GroupKey],
    deltas: &'a BatchDeltas,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeltasIn {
    keys: Vec<GroupKey>,
    deltas: BatchDeltas,
}

/// A rank's batch statistics with their keys (JSON: every `f64` reads back to its bits).
pub(crate) fn encode_deltas(keys: &[GroupKey], deltas: &BatchDeltas) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&DeltasOut { keys, deltas })?)
}

/// Reads [`encode_deltas`]'s output, with [`BatchDeltas::from_json`]'s checks.
pub(crate) fn decode_deltas(bytes: &[u8]) -> Result<(Vec<GroupKey>, BatchDeltas)> {
    let m: DeltasIn = serde_json::from_slice(bytes)?;
    m.deltas.check()?;
    if m.keys.len() != m.deltas.len() {
        return Err(Error::LengthMismatch {
            what: "group_keys",
            got: m.keys.len(),
            against: "batch deltas",
            expected: m.deltas.len(),
        });
    }
    Ok((m.keys, m.deltas))
}

/// One rank's part of a rollout, as sent to the others: the fingerprint of the batch it
/// was given, then an outcome: its rows' rewards, or the error that stopped it.
pub(crate) fn encode_rollout(batch_fp: u64, local: std::result::Result<&[f32], &str>) -> Vec<u8> {
    let mut out = batch_fp.to_le_bytes().to_vec();
    let rewards = local.map(|r| r.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    push_outcome(&mut out, rewards.as_deref().map_err(|e| *e));
    out
}

/// A decoded [`encode_rollout`] message.
pub(crate) struct RankRollout {
    pub(crate) batch_fp: u64,
    pub(crate) rewards: std::result::Result<Vec<f32>, String>,
}

pub(crate) fn decode_rollout(bytes: &[u8]) -> Option<RankRollout> {
    let (fp, rest) = bytes.split_first_chunk::<8>()?;
    let rewards = match read_outcome(rest)? {
        Ok(body) if body.len().is_multiple_of(4) => Ok(body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()),
        Ok(_) => return None,
        Err(msg) => Err(msg),
    };
    Some(RankRollout {
        batch_fp: u64::from_le_bytes(*fp),
        rewards,
    })
}

/// What one rank tells the others about its loss in each iteration: the normalisers of its
/// rows and its objective metrics (the body of an outcome; see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RankPart {
    /// Whether the rank has a loss (some completion token not masked out).
    pub(crate) has_loss: bool,
    /// `B_r`, its rows.
    pub(crate) rows: usize,
    /// `T_r`, the width of its `(B_r, T_r)` log-probs.
    pub(crate) width: usize,
    /// Its loss, normalised over its own rows.
    pub(crate) loss: f64,
    /// Its objective metrics; `num_tokens` is `N_r`, its completion tokens after masking.
    pub(crate) metrics: ObjectiveMetrics,
    /// `Σ mask` of its log-probs (before masking zero-spread prompts).
    pub(crate) mask_sum: f64,
    /// `Σ entropy · mask`, when the policy reports entropy.
    pub(crate) entropy_sum: Option<f64>,
}

impl RankPart {
    /// The body: 14 little-endian `f64`.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let flag = |b: bool| f64::from(u8::from(b));
        let mut v = vec![
            flag(self.has_loss),
            self.rows as f64,
            self.metrics.num_tokens,
            self.width as f64,
            self.loss,
        ];
        v.extend(self.metrics.values());
        v.extend([
            self.mask_sum,
            flag(self.entropy_sum.is_some()),
            self.entropy_sum.unwrap_or(0.0),
        ]);
        f64_bytes(&v)
    }

    /// Reads [`to_bytes`](Self::to_bytes)' body; `None` if malformed.
    pub(crate) fn from_bytes(body: &[u8]) -> Option<Self> {
        let v = f64s(body)?;
        let [has, rows, tokens, width, loss, ref m @ .., mask_sum, has_entropy, entropy] = v[..]
        else {
            return None;
        };
        let count =
            |x: f64| (x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53)).then_some(x as usize);
        Some(Self {
            has_loss: has != 0.0,
            rows: count(rows)?,
            width: count(width)?,
            loss,
            metrics: ObjectiveMetrics::from_values(m.try_into().ok()?, tokens),
            mask_sum,
            entropy_sum: (has_entropy != 0.0).then_some(entropy),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdvantageConfig, HistoryKind, RewardHistory, RolloutRewards};

    #[test]
    fn fnv_matches_the_reference_values() {
        // FNV-1a 64 test vectors (Fowler, Noll, Vo).
        assert_eq!(fingerprint(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fingerprint(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fingerprint(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn rollout_messages_round_trip() {
        let r = [0.5f32, -1.0, f32::NAN, 3.25];
        let m = decode_rollout(&encode_rollout(7, Ok(&r))).unwrap();
        assert_eq!(m.batch_fp, 7);
        let got = m.rewards.unwrap();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            r.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let m = decode_rollout(&encode_rollout(9, Err("judge timed out"))).unwrap();
        assert_eq!(m.rewards.unwrap_err(), "judge timed out");
        assert!(decode_rollout(&[1, 2, 3]).is_none());
        let mut bad = encode_rollout(1, Ok(&r));
        bad.pop();
        assert!(decode_rollout(&bad).is_none());
    }

    #[test]
    fn outcomes_and_loss_parts_round_trip() {
        let part = RankPart {
            has_loss: true,
            rows: 6,
            width: 9,
            loss: -0.0,
            metrics: ObjectiveMetrics::from_values([0.1, 0.2, 0.3, 0.4, 0.5, f64::NAN], 17.0),
            mask_sum: 21.0,
            entropy_sum: Some(3.5),
        };
        let mut msg = Vec::new();
        push_outcome(&mut msg, Ok(&part.to_bytes()));
        assert_eq!(msg.len(), 113);
        let body = read_outcome(&msg).unwrap().unwrap();
        let back = RankPart::from_bytes(body).unwrap();
        assert_eq!(back.to_bytes(), part.to_bytes());
        assert!(back.loss.is_sign_negative());
        assert_eq!(back.metrics.num_tokens, 17.0);
        let none = RankPart::default();
        assert_eq!(RankPart::from_bytes(&none.to_bytes()), Some(none));
        assert!(RankPart::from_bytes(&part.to_bytes()[8..]).is_none());
        let mut bad = part.to_bytes();
        bad[8..16].copy_from_slice(&2.5f64.to_le_bytes()); // a fractional row count
        assert!(RankPart::from_bytes(&bad).is_none());
        let mut failed = Vec::new();
        push_outcome(&mut failed, Err("out of memory"));
        assert_eq!(read_outcome(&failed), Some(Err("out of memory".into())));
        assert_eq!(read_outcome(&[]), None);
        assert_eq!(read_outcome(&[2, 0]), None);
    }

    /// Batch statistics of every history kind travel exactly: the history they build on the
    /// other side is bit-identical.
    #[test]
    fn deltas_round_trip_bit_for_bit() -> Result<()> {
        let keys: Vec<GroupKey> = vec!["a".into(), 7u32.into(), "empty".into()];
        let rewards = [0.1f32, 0.7, -3.3, 1e-7, 0.2, 0.9];
        let batch = RolloutRewards {
            rewards: &rewards,
            prompt_ids: &[0, 0, 1, 1, 2, 2],
            group_ids: &[0, 0, 1, 1, 0, 0],
            group_keys: &keys,
        };
        for kind in [
            HistoryKind::Cumulative,
            HistoryKind::Exponential { half_life: 3.0 },
            HistoryKind::Window { size: 3 },
        ] {
            let mut h = RewardHistory::new(kind)?;
            h.update("a", &[0.3, 0.4])?;
            let adv = AdvantageConfig::default().compute(&batch, &h)?;
            let (k, d) = decode_deltas(&encode_deltas(&keys, &adv.deltas)?)?;
            assert_eq!(k, keys);
            assert_eq!(d, adv.deltas);
            let mut via_wire = h.clone();
            via_wire.apply(&k, d)?;
            h.apply(&keys, adv.deltas)?;
            assert_eq!(via_wire.to_json()?, h.to_json()?);
        }
        Ok(())
    }

    #[test]
    fn inconsistent_deltas_are_refused() {
        let good = r#"{"keys":["a"],"deltas":{"kind":{"type":"cumulative"},"deltas":[{"count":2,"w":2.0,"shift":1.0,"s1":0.5,"s2":0.25,"values":[]}]}}"#;
        assert!(decode_deltas(good.as_bytes()).is_ok());
        for bad in [
            // weight above the count
            good.replace(r#""w":2.0"#, r#""w":3.0"#),
            // negative sum of squares
            good.replace(r#""s2":0.25"#, r#""s2":-1.0"#),
            // values in a cumulative delta
            good.replace(r#""values":[]"#, r#""values":[1.0]"#),
            // one key, no delta
            good.replace(
                r#""deltas":[{"count":2,"w":2.0,"shift":1.0,"s1":0.5,"s2":0.25,"values":[]}]"#,
                r#""deltas":[]"#,
            ),
            // a window delta whose values are not its count
            good.replace(r#"{"type":"cumulative"}"#, r#"{"type":"window","size":4}"#),
            // an unknown field
            good.replace(r#""count":2,"#, r#""count":2,"extra":1,"#),
        ] {
            assert!(decode_deltas(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
