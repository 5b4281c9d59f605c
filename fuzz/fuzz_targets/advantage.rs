//! Fuzzes the advantage entry point (`AdvantageConfig::compute_and_update`) with arbitrary
//! configs, rewards (NaN, ±inf, subnormals, ±f32::MAX), prompt and group ids, and histories.
//!
//! Checked: no panic; errors are the documented typed ones; on success one finite advantage
//! per row (a non-finite reward under `Missing` gets 0), and the history stays valid (it
//! survives a JSON round trip) and unchanged on error.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrpo::advantage::{ColdStart, NonFinitePolicy, UpdateOrder};
use pgrpo::history::Variance;
use pgrpo::{AdvantageConfig, Error, Estimator, GroupKey, HistoryKind, RewardHistory, RolloutRewards};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn f32(&mut self) -> f32 {
        // Half the time a "nice" value (small integers, extremes), else raw bits.
        let tag = self.u8();
        match tag % 8 {
            0 => (self.u8() as i8) as f32 / 4.0,
            1 => [
                1e30,
                -1e30,
                1e-30,
                -1e-30,
                f32::MAX,
                f32::MIN,
                f32::MIN_POSITIVE,
                0.0,
            ][self.u8() as usize % 8],
            2 => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0][self.u8() as usize % 4],
            3 => (self.u8() % 3) as f32,
            _ => f32::from_bits(u32::from_le_bytes([
                self.u8(),
                self.u8(),
                self.u8(),
                self.u8(),
            ])),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let mut cfg = AdvantageConfig {
        estimator: Estimator::ALL[b.u8() as usize % Estimator::ALL.len()],
        eps: [0.0, 1e-4, 1e-8, 1.0][b.u8() as usize % 4],
        std_floor: [0.0, 1e-6, 0.1][b.u8() as usize % 3],
        variance: if b.u8() % 2 == 0 {
            Variance::Sample
        } else {
            Variance::Population
        },
        non_finite: if b.u8() % 2 == 0 {
            NonFinitePolicy::Error
        } else {
            NonFinitePolicy::Missing
        },
        ..Default::default()
    };
    cfg.pgrpo.update_order = if b.u8() % 2 == 0 {
        UpdateOrder::BeforeBatch
    } else {
        UpdateOrder::AfterBatch
    };
    cfg.pgrpo.cold_start = [
        ColdStart::PerPrompt,
        ColdStart::Batch,
        ColdStart::HistoryWithBatch,
    ][b.u8() as usize % 3];
    cfg.pgrpo.min_count = (b.u8() % 6) as u64;
    cfg.pgrpo.offset_weight = (b.u8() % 5) as f32 / 4.0;
    let kind = match b.u8() % 3 {
        0 => HistoryKind::Cumulative,
        1 => HistoryKind::Exponential {
            half_life: 0.5 + (b.u8() % 16) as f64,
        },
        _ => HistoryKind::Window {
            size: 1 + (b.u8() % 8) as usize,
        },
    };
    let Ok(mut history) = RewardHistory::new(kind) else {
        return;
    };
    let num_groups = 1 + (b.u8() % 4) as usize;
    let keys: Vec<GroupKey> = (0..num_groups as u32).map(GroupKey::from).collect();
    // Pre-fill the history.
    for _ in 0..(b.u8() % 4) {
        let g = b.u8() as usize % num_groups;
        let rs: Vec<f32> = (0..(b.u8() % 6)).map(|_| b.f32()).collect();
        let _ = history.update(keys[g].clone(), &rs);
    }
    // The batch (group ids may be out of range on purpose).
    let n = (b.u8() % 24) as usize;
    let mut rewards = Vec::with_capacity(n);
    let mut prompt_ids = Vec::with_capacity(n);
    let mut group_ids = Vec::with_capacity(n);
    for _ in 0..n {
        rewards.push(b.f32());
        prompt_ids.push((b.u8() % 6) as u32 * if b.u8() == 255 { 1_000_003 } else { 1 });
        let g = b.u8();
        group_ids.push(if g == 255 {
            99
        } else {
            (g as usize % num_groups) as u32
        });
    }
    let before = history.clone();
    let batch = RolloutRewards {
        rewards: &rewards,
        prompt_ids: &prompt_ids,
        group_ids: &group_ids,
        group_keys: &keys,
    };
    match cfg.compute_and_update(&batch, &mut history) {
        Ok(adv) => {
            assert_eq!(adv.values.len(), n);
            for (i, (&a, &r)) in adv.values.iter().zip(&rewards).enumerate() {
                assert!(
                    a.is_finite(),
                    "row {i}: advantage {a} for reward {r} ({cfg:?})"
                );
                if !r.is_finite() {
                    assert_eq!(a, 0.0, "row {i}: missing reward got advantage {a}");
                }
            }
            let json = history.to_json().unwrap();
            let back = RewardHistory::from_json(&json)
                .unwrap_or_else(|e| panic!("history invalid after an update: {e}\n{json}"));
            assert_eq!(back, history);
        }
        Err(e) => {
            assert_eq!(history, before, "history changed on error");
            match e {
                Error::InvalidConfig { .. }
                | Error::LengthMismatch { .. }
                | Error::Empty(_)
                | Error::IndexOutOfRange { .. }
                | Error::NonFiniteReward { .. }
                | Error::TooFewCompletions { .. } => {}
                other => panic!("undocumented error: {other}"),
            }
        }
    }
});
