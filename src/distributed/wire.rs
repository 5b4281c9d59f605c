//! What ranks send each other, as bytes: little-endian numbers, JSON for the batch statistics.

use serde::{Deserialize, Serialize};

use crate::{BatchDeltas, Error, GroupKey, Result};

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
    Error::Distributed(format!("malformed message from rank {rank}: {what}"))
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
/// was given, then its rows' rewards, or the error that stopped it.
pub(crate) fn encode_rollout(batch_fp: u64, local: std::result::Result<&[f32], String>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(batch_fp.to_le_bytes());
    match local {
        Ok(rewards) => {
            out.push(0);
            out.extend(rewards.iter().flat_map(|r| r.to_le_bytes()));
        }
        Err(msg) => {
            out.push(1);
            out.extend(msg.as_bytes());
        }
    }
    out
}

/// A decoded [`encode_rollout`] message.
pub(crate) struct RankRollout {
    pub(crate) batch_fp: u64,
    pub(crate) rewards: std::result::Result<Vec<f32>, String>,
}

pub(crate) fn decode_rollout(bytes: &[u8]) -> Option<RankRollout> {
    if bytes.len() < 9 {
        return None;
    }
    let batch_fp = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    let body = &bytes[9..];
    let rewards = match bytes[8] {
        0 if body.len().is_multiple_of(4) => Ok(body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()),
        1 => Err(String::from_utf8_lossy(body).into_owned()),
        _ => return None,
    };
    Some(RankRollout { batch_fp, rewards })
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
        let m = decode_rollout(&encode_rollout(9, Err("judge timed out".into()))).unwrap();
        assert_eq!(m.rewards.unwrap_err(), "judge timed out");
        assert!(decode_rollout(&[1, 2, 3]).is_none());
        let mut bad = encode_rollout(1, Ok(&r));
        bad.pop();
        assert!(decode_rollout(&bad).is_none());
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
