//! Step metrics say what their names say: group keys have names of their own, the reward
//! metrics are TRL's, the documented timings are written, and a run with thousands of
//! preference groups reports a bounded number of per-group metrics.

use candle_core::Device;
use pgrpo::advantage::NonFinitePolicy;
use pgrpo::metrics::{group_names, parse_group_segment, GroupMetrics};
use pgrpo::models::TabularPolicy;
use pgrpo::sink::{CsvSink, JsonlSink, MetricsSink};
use pgrpo::{Estimator, GroupKey, GroupedPrompt, Result, RewardFn, Trainer, TrainerConfig};

fn cfg() -> TrainerConfig {
    let mut c = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.05,
        ..Default::default()
    };
    c.advantage.estimator = Estimator::Grpo;
    c
}

fn reward(c: &u32, a: &u32, _g: &GroupKey) -> f32 {
    if a == c {
        1.0
    } else {
        0.1 * *a as f32
    }
}

/// Every `group/…` and `history/…` metric name has three `/`-separated parts whose middle one
/// reads back as a key.
fn group_keys_in(names: impl Iterator<Item = String>, prefix: &str) -> Vec<GroupKey> {
    let mut keys: Vec<GroupKey> = names
        .filter(|n| n.starts_with(prefix) && n.ends_with("/count"))
        .map(|n| {
            let parts: Vec<&str> = n.split('/').collect();
            assert_eq!(parts.len(), 3, "{n}");
            parse_group_segment(parts[1]).unwrap_or_else(|| panic!("{n}"))
        })
        .collect();
    keys.sort();
    keys
}

/// Defect 5: `GroupKey::Id(3)` and `Name("3")` wrote the same metric names (one group's
/// values overwrote the other's), and a `/` in a group's name added a level to the metric's
/// path. Ids are now `#3`, names percent-escape `%`, `/` and `#`.
#[test]
fn every_group_key_has_metric_names_of_its_own() {
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut t = Trainer::new(policy, reward, cfg()).unwrap();
    let keys: Vec<GroupKey> = vec![
        GroupKey::Id(3),
        "3".into(),
        "a/b".into(),
        "#3".into(),
        "50%".into(),
    ];
    let batch: Vec<GroupedPrompt<u32>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| GroupedPrompt::new((i % 2) as u32, k.clone()))
        .collect();
    let m = t.step(&batch).unwrap();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(
        group_keys_in(m.values.keys().cloned(), "group/"),
        want,
        "{:?}",
        m.values.keys().collect::<Vec<_>>()
    );
    for k in &keys {
        for name in group_names(k) {
            assert!(m.get(&name).is_some(), "{name} missing");
        }
        assert_eq!(m.get(&group_names(k)[2]), Some(4.0), "{k:?}: 4 rows");
    }
    assert_eq!(m.get("group/#3/count"), Some(4.0));
    assert_eq!(m.get("group/a%2Fb/count"), Some(4.0));
    assert_eq!(m.group_reward(3u32), m.get("group/#3/reward_mean"));
    // The CSV sink's standard columns are distinct for these keys too (it refused them).
    let mut csv = CsvSink::standard(Vec::new(), &[], &keys).unwrap();
    csv.write(&m).unwrap();
    assert!(csv.dropped().is_empty(), "{:?}", csv.dropped());
}

struct Judge;

impl RewardFn<u32, u32> for Judge {
    fn score(&mut self, c: &u32, a: &u32, g: &GroupKey) -> Result<f32> {
        Ok(if *a == 2 { f32::NAN } else { reward(c, a, g) })
    }

    fn name(&self) -> &str {
        "judge"
    }
}

/// Defect 5: `RewardFn::name` promised `rewards/<name>` metrics that were never written.
/// A reward function's `rewards/<name>/mean` and `/std` are now TRL's: the mean and sample
/// std of the batch's usable rewards, the same as `reward` and `reward_std` (TRL logs
/// `nanmean` and `nanstd` of the whole batch's rewards; its `nanstd` is Bessel-corrected).
#[test]
fn reward_metrics_are_trls() {
    let mut c = cfg();
    c.advantage.non_finite = NonFinitePolicy::Missing;
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut t = Trainer::new(policy, Judge, c).unwrap();
    let batch = [GroupedPrompt::new(0u32, "x"), GroupedPrompt::new(1u32, "y")];
    let rollout = t.rollout(&batch).unwrap();
    let usable: Vec<f64> = rollout
        .rewards
        .iter()
        .filter(|r| r.is_finite())
        .map(|&r| r as f64)
        .collect();
    assert!(
        usable.len() < 8 && usable.len() >= 2,
        "{:?}",
        rollout.rewards
    );
    let n = usable.len() as f64;
    let mean = usable.iter().sum::<f64>() / n;
    let std = (usable.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let m = t.update(rollout).unwrap();
    for (name, want) in [
        ("reward", mean),
        ("rewards/judge/mean", mean),
        ("reward_std", std),
        ("rewards/judge/std", std),
    ] {
        let got = m.get(name).unwrap();
        assert!((got - want).abs() < 1e-12, "{name}: {got} vs {want}");
    }
    // A closure's name is the default one.
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut t = Trainer::new(policy, reward, cfg()).unwrap();
    let m = t.step(&batch).unwrap();
    assert_eq!(m.get("rewards/reward/mean"), m.get("reward"));
}

/// Defect 5: `timings/total` was documented and never written.
#[test]
fn every_documented_timing_is_written() {
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let mut t = Trainer::new(policy, reward, cfg()).unwrap();
    let m = t.step(&[GroupedPrompt::new(0u32, "x")]).unwrap();
    for phase in [
        "sample",
        "reward",
        "exchange_rewards",
        "old_logp",
        "rollout",
        "update",
        "all_reduce",
        "total",
    ] {
        assert!(m.timings.contains_key(phase), "{phase}: {:?}", m.timings);
    }
    let total = m.timings["total"];
    assert_eq!(total, m.timings["rollout"] + m.timings["update"]);
    assert!(total >= m.timings["sample"] && total > 0.0);
}

/// Runs `steps` steps of `per_step` prompts, each prompt a new preference group (ids), and
/// returns the last step's metrics and its JSON line.
fn many_groups(
    select: GroupMetrics,
    per_step: usize,
    steps: usize,
) -> (pgrpo::StepMetrics, String) {
    let mut c = cfg();
    c.group_metrics = select;
    c.num_generations = 2;
    let policy = TabularPolicy::new(1, 3, true, &Device::Cpu).unwrap();
    let mut t = Trainer::new(policy, reward, c).unwrap();
    let mut last = None;
    for s in 0..steps {
        // Group 0 is in every batch: the largest group.
        let batch: Vec<GroupedPrompt<u32>> = (0..per_step)
            .map(|i| GroupedPrompt::new(0u32, if i == 0 { 0 } else { (s * per_step + i) as u64 }))
            .collect();
        last = Some(t.step(&batch).unwrap());
    }
    let m = last.unwrap();
    let mut sink = JsonlSink::new(Vec::new());
    sink.write(&m).unwrap();
    let line = String::from_utf8(sink.into_inner().unwrap()).unwrap();
    (m, line)
}

/// Parity 8: with `GroupMetrics::All` every group ever seen adds three `history/…` metrics
/// to every step; `Bounded` reports the batch's groups and the `top_k` largest, plus the
/// aggregates, so a step's size does not grow with the number of groups.
#[test]
fn history_metrics_are_bounded_by_the_batch_and_top_k() {
    let history_groups = |m: &pgrpo::StepMetrics| {
        m.values
            .keys()
            .filter(|k| k.starts_with("history/") && k.ends_with("/n"))
            .count()
    };
    let (all, all_line) = many_groups(GroupMetrics::All, 10, 30);
    // 1 + 9 · 30 groups.
    assert_eq!(all.get("history/num_groups"), Some(271.0));
    assert_eq!(history_groups(&all), 271);
    let (bounded, line) = many_groups(GroupMetrics::Bounded { top_k: 3 }, 10, 30);
    assert_eq!(bounded.get("history/num_groups"), Some(271.0));
    // The batch's 10 groups and the top 3 (group 0, then the smallest ids of those with 2
    // rewards: 1 and 2).
    assert_eq!(history_groups(&bounded), 12);
    for g in ["#0", "#1", "#2", "#291"] {
        assert!(bounded.get(&format!("history/{g}/n")).is_some(), "{g}");
    }
    assert!(bounded.get("history/#3/n").is_none());
    assert_eq!(bounded.get("history/n_max"), Some(60.0)); // group 0: 2 rewards × 30 steps
    assert_eq!(bounded.get("history/n_min"), Some(2.0));
    // Everything else is the same.
    for (k, v) in &bounded.values {
        assert_eq!(
            all.values.get(k).map(|x| x.to_bits()),
            Some(v.to_bits()),
            "{k}"
        );
    }
    assert!(
        line.len() * 5 < all_line.len(),
        "{} vs {}",
        line.len(),
        all_line.len()
    );
    // The default reports every group of a small run.
    assert_eq!(
        TrainerConfig::default().group_metrics,
        GroupMetrics::Bounded { top_k: 16 }
    );
}

#[test]
fn group_metrics_round_trip_through_toml() {
    let c: TrainerConfig = toml::from_str("group_metrics = { type = \"all\" }").unwrap();
    assert_eq!(c.group_metrics, GroupMetrics::All);
    let c: TrainerConfig =
        toml::from_str("group_metrics = { type = \"bounded\", top_k = 2 }").unwrap();
    assert_eq!(c.group_metrics, GroupMetrics::Bounded { top_k: 2 });
    assert!(toml::from_str::<TrainerConfig>("group_metrics = { type = \"some\" }").is_err());
}
