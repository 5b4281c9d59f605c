//! The reward side of a training step (issue 12, parity 3, 4 and 10): the trainer scores a
//! whole batch in one call, reports each reward function's metrics, normalises the functions
//! separately (GDPO, P-GRPO with a history per group and function), and takes an advantage
//! rule of the user's.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use candle_core::Device;
use common::assert_close;
use pgrpo::advantage::{AdvantageEstimator, RewardAggregation};
use pgrpo::models::TabularPolicy;
use pgrpo::reward::{RewardInput, WeightedRewards};
use pgrpo::{
    Error, Estimator, GroupKey, GroupedPrompt, RewardFn, RewardHistory, RolloutRewards, Trainer,
    TrainerConfig,
};

fn batch() -> Vec<GroupedPrompt<u32>> {
    vec![
        GroupedPrompt::new(0u32, "a"),
        GroupedPrompt::new(1u32, "b"),
        GroupedPrompt::new(0u32, "a"),
    ]
}

fn config() -> TrainerConfig {
    TrainerConfig {
        num_generations: 4,
        learning_rate: 0.1,
        ..Default::default()
    }
}

/// Scores `action == context`; counts its calls (shared with the test through `Rc`s).
struct Counting {
    batches: Rc<Cell<usize>>,
    rows: Rc<Cell<usize>>,
    singles: Rc<Cell<usize>>,
    short: bool,
}

impl RewardFn<u32, u32> for Counting {
    fn score(&mut self, p: &u32, c: &u32, _: &GroupKey) -> pgrpo::Result<f32> {
        self.singles.set(self.singles.get() + 1);
        Ok((p == c) as u8 as f32)
    }

    fn score_batch(&mut self, rows: &[RewardInput<'_, u32, u32>]) -> pgrpo::Result<Vec<f32>> {
        self.batches.set(self.batches.get() + 1);
        self.rows.set(self.rows.get() + rows.len());
        let n = rows.len() - self.short as usize;
        Ok(rows[..n]
            .iter()
            .map(|r| (r.prompt == r.completion) as u8 as f32)
            .collect())
    }
}

/// The trainer scores every row of a step in one `score_batch` call, never row by row.
#[test]
fn the_trainer_scores_a_step_in_one_batch_call() {
    let (batches, rows, singles) = (Rc::default(), Rc::default(), Rc::default());
    let reward = Counting {
        batches: Rc::clone(&batches),
        rows: Rc::clone(&rows),
        singles: Rc::clone(&singles),
        short: false,
    };
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut trainer = Trainer::new(policy, reward, config()).unwrap();
    for step in 1..=3 {
        trainer.step(&batch()).unwrap();
        assert_eq!(batches.get(), step);
        assert_eq!(rows.get(), step * 12);
    }
    assert_eq!(singles.get(), 0);
    // One reward per row, or a typed error before anything changes.
    trainer.reward_fn().short = true;
    let history = trainer.history().clone();
    let err = trainer.step(&batch()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                what: "reward scores",
                got: 11,
                expected: 12,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(trainer.history(), &history);
    assert_eq!(trainer.steps_done(), 3);
}

/// Two functions: `len` (the action, weight 0.5) and `ok` (the preferred action, weight 2).
fn two_functions() -> WeightedRewards<u32, u32> {
    WeightedRewards::new()
        .with("len", 0.5, |_: &u32, c: &u32, _: &GroupKey| *c as f32)
        .with("ok", 2.0, |p: &u32, c: &u32, _: &GroupKey| {
            (p == c) as u8 as f32
        })
}

/// Each function's score reaches the rollout, the reward is their weighted sum, and the
/// metrics carry TRL's `rewards/<name>/mean` and `rewards/<name>/std`.
#[test]
fn per_function_scores_and_metrics() {
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut trainer = Trainer::new(policy, two_functions(), config()).unwrap();
    let b = batch();
    let rollout = trainer.rollout(&b).unwrap();
    assert_eq!(rollout.reward_names, ["len", "ok"]);
    assert_eq!(rollout.reward_parts.len(), 24);
    let mut cols = [Vec::new(), Vec::new()];
    for (i, r) in rollout.rewards.iter().enumerate() {
        let (len, ok) = (rollout.reward_parts[2 * i], rollout.reward_parts[2 * i + 1]);
        assert_eq!(len, rollout.completions[i] as f32);
        assert_eq!(
            ok,
            (rollout.completions[i] == *rollout.prompts[i]) as u8 as f32
        );
        assert_eq!(*r, 0.5 * len + 2.0 * ok, "row {i}");
        cols[0].push(len as f64);
        cols[1].push(ok as f64);
    }
    let m = trainer.update(rollout).unwrap();
    for (name, col) in ["len", "ok"].iter().zip(&cols) {
        let mean = col.iter().sum::<f64>() / 12.0;
        let std = (col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 11.0).sqrt();
        assert_close(
            m.get(&format!("rewards/{name}/mean")).unwrap(),
            mean,
            1e-12,
            1.0,
            name,
        );
        assert_close(
            m.get(&format!("rewards/{name}/std")).unwrap(),
            std,
            1e-12,
            1.0,
            name,
        );
    }
    // A single function reports under its name too.
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let reward = |p: &u32, c: &u32, _: &GroupKey| (p == c) as u8 as f32;
    let mut trainer = Trainer::new(policy, reward, config()).unwrap();
    let m = trainer.step(&b).unwrap();
    let mean = m.get("rewards/reward/mean").unwrap();
    assert_close(mean, m.reward(), 1e-12, 1.0, "single function");
}

/// GDPO with P-GRPO in training: every (group, function) has its own history, kept next to
/// the groups' history of the weighted reward, and saved and resumed with the checkpoint.
#[test]
fn normalize_then_sum_keeps_a_history_per_group_and_function() {
    let mut cfg = config();
    cfg.advantage.estimator = Estimator::PGrpo;
    cfg.advantage.reward_aggregation = RewardAggregation::NormalizeThenSum;
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut trainer = Trainer::new(policy, two_functions(), cfg).unwrap();
    let b = batch();
    for _ in 0..3 {
        trainer.step(&b).unwrap();
    }
    let h = trainer.history();
    let n = |k: &str| h.stats(&k.into()).map(|s| s.n);
    // Group a has 2 prompts × 4 completions per step, b has 1 × 4.
    for (key, want) in [
        ("a", 24),
        ("b", 12),
        ("a/len", 24),
        ("a/ok", 24),
        ("b/len", 12),
        ("b/ok", 12),
    ] {
        assert_eq!(n(key), Some(want), "{key}");
    }
    // History "a/ok" holds exactly the `ok` scores of group a's rows: check its mean against
    // the metrics of one more step.
    let before = h.clone();
    let rollout = trainer.rollout(&b).unwrap();
    let rows_a: Vec<usize> = (0..12).filter(|i| i / 4 != 1).collect();
    let ok_a: f64 = rows_a
        .iter()
        .map(|&i| rollout.reward_parts[2 * i + 1] as f64)
        .sum();
    trainer.update(rollout).unwrap();
    let s_before = before.stats(&"a/ok".into()).unwrap();
    let s_after = trainer.history().stats(&"a/ok".into()).unwrap();
    assert_close(
        s_after.mean,
        (s_before.mean * 24.0 + ok_a) / 32.0,
        1e-12,
        1.0,
        "a/ok",
    );
    // Saved and resumed with the per-function histories, the run continues exactly.
    let dir = std::env::temp_dir().join(format!("pgrpo-rewards-{}", std::process::id()));
    trainer.save(&dir).unwrap();
    let next = trainer.step(&b).unwrap();
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut resumed = Trainer::resume(&dir, policy, two_functions()).unwrap();
    assert_eq!(resumed.history().len(), 6);
    assert_eq!(resumed.step(&b).unwrap().values, next.values);
    std::fs::remove_dir_all(&dir).ok();
}

/// `A = R − 1` for every row.
struct MinusOne;

impl AdvantageEstimator for MinusOne {
    fn name(&self) -> &str {
        "minus_one"
    }
    fn advantages(&self, b: &RolloutRewards<'_>, _: &RewardHistory) -> pgrpo::Result<Vec<f32>> {
        Ok(b.rewards.iter().map(|r| r - 1.0).collect())
    }
}

/// The trainer computes advantages with the user's rule and still keeps the history.
#[test]
fn the_trainer_takes_a_custom_estimator() {
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let reward = |p: &u32, c: &u32, _: &GroupKey| (p == c) as u8 as f32 + 0.25 * *c as f32;
    let mut trainer = Trainer::new(policy, reward, config())
        .unwrap()
        .with_estimator(Box::new(MinusOne));
    assert_eq!(trainer.estimator().map(|e| e.name()), Some("minus_one"));
    let b = batch();
    let rollout = trainer.rollout(&b).unwrap();
    for (a, r) in rollout.advantages.iter().zip(&rollout.rewards) {
        assert_eq!(*a, r - 1.0);
    }
    trainer.update(rollout).unwrap();
    assert_eq!(trainer.history().stats(&"a".into()).unwrap().n, 8);
    // Under normalize_then_sum the rule runs on each function.
    let mut cfg = config();
    cfg.advantage.reward_aggregation = RewardAggregation::NormalizeThenSum;
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut trainer = Trainer::new(policy, two_functions(), cfg)
        .unwrap()
        .with_estimator(Box::new(MinusOne));
    let rollout = trainer.rollout(&b).unwrap();
    // S_i = 0.5 (len − 1) + 2 (ok − 1), then the batch z-score.
    let s: Vec<f64> = (0..12)
        .map(|i| {
            let (len, ok) = (rollout.reward_parts[2 * i], rollout.reward_parts[2 * i + 1]);
            0.5 * (len as f64 - 1.0) + 2.0 * (ok as f64 - 1.0)
        })
        .collect();
    let mean = s.iter().sum::<f64>() / 12.0;
    let sd = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 11.0).sqrt();
    for (a, x) in rollout.advantages.iter().zip(&s) {
        assert_close(
            *a as f64,
            (x - mean) / (sd + 1e-4),
            1e-5,
            1.0,
            "custom gdpo",
        );
    }
}
