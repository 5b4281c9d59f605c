//! Throughput of the advantage estimators and of the reward-history updates, in rewards per
//! second, at 1K, 64K and 1M rewards (G = 8 completions per prompt) with 8 and 10,000
//! preference groups. P-GRPO runs on a warm history (every group past `min_count`).
//!
//! `cargo bench --bench advantage` (about three minutes); `-- p_grpo` runs a subset.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use pgrpo::{AdvantageConfig, Estimator, GroupKey, HistoryKind, RewardHistory, RolloutRewards};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZES: [usize; 3] = [1_000, 64_000, 1_000_000];
const GROUPS: [usize; 2] = [8, 10_000];
const G: usize = 8;

/// A rollout batch: `n / G` prompts of `G` contiguous completions, prompt `q` in preference
/// group `q % groups`, rewards around a per-group level (a few prompts without spread).
struct Batch {
    rewards: Vec<f32>,
    prompt_ids: Vec<u32>,
    group_ids: Vec<u32>,
    keys: Vec<GroupKey>,
}

impl Batch {
    fn new(n: usize, groups: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let level: Vec<f32> = (0..groups).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut b = Batch {
            rewards: Vec::with_capacity(n),
            prompt_ids: Vec::with_capacity(n),
            group_ids: Vec::with_capacity(n),
            keys: (0..groups as u64).map(GroupKey::Id).collect(),
        };
        for q in 0..n / G {
            let g = q % groups;
            let flat = rng.random_bool(0.1);
            for _ in 0..G {
                let noise = if flat {
                    0.0
                } else {
                    rng.random_range(-0.5..0.5)
                };
                b.rewards.push(level[g] + noise);
                b.prompt_ids.push(q as u32);
                b.group_ids.push(g as u32);
            }
        }
        b
    }

    fn view(&self) -> RolloutRewards<'_> {
        RolloutRewards {
            rewards: &self.rewards,
            prompt_ids: &self.prompt_ids,
            group_ids: &self.group_ids,
            group_keys: &self.keys,
        }
    }
}

/// A history in which every group already has 16 rewards.
fn warm_history(kind: HistoryKind, keys: &[GroupKey]) -> RewardHistory {
    let mut rng = StdRng::seed_from_u64(7);
    let mut h = RewardHistory::new(kind).expect("valid kind");
    for k in keys {
        let r: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
        h.update(k, &r).expect("finite rewards");
    }
    h
}

fn batches() -> Vec<(usize, usize, Batch)> {
    let mut v = Vec::new();
    for groups in GROUPS {
        for n in SIZES {
            v.push((groups, n, Batch::new(n, groups, n as u64 ^ groups as u64)));
        }
    }
    v
}

/// `compute` for every estimator (pure: no setup inside the timed loop).
fn estimators(c: &mut Criterion) {
    let data = batches();
    for estimator in Estimator::ALL {
        let cfg = AdvantageConfig {
            estimator,
            ..Default::default()
        };
        for groups in GROUPS {
            let mut group =
                c.benchmark_group(format!("advantage_{}/{groups}_groups", estimator.name()));
            for (_, n, b) in data.iter().filter(|d| d.0 == groups) {
                let h = warm_history(HistoryKind::Cumulative, &b.keys);
                group.throughput(Throughput::Elements(*n as u64));
                group.bench_with_input(BenchmarkId::from_parameter(n), b, |bench, b| {
                    bench.iter(|| cfg.compute(black_box(&b.view()), &h).expect("valid batch"))
                });
            }
            group.finish();
        }
    }
}

/// P-GRPO `compute_and_update`: the history is cloned outside the timing.
fn pgrpo_compute_and_update(c: &mut Criterion) {
    let data = batches();
    let cfg = AdvantageConfig::default();
    for groups in GROUPS {
        let mut group = c.benchmark_group(format!("p_grpo_compute_and_update/{groups}_groups"));
        for (_, n, b) in data.iter().filter(|d| d.0 == groups) {
            let h = warm_history(HistoryKind::Cumulative, &b.keys);
            group.throughput(Throughput::Elements(*n as u64));
            group.bench_with_input(BenchmarkId::from_parameter(n), b, |bench, b| {
                bench.iter_batched(
                    || h.clone(),
                    |mut h| {
                        let adv = cfg.compute_and_update(&b.view(), &mut h).expect("valid");
                        (h, adv)
                    },
                    BatchSize::LargeInput,
                )
            });
        }
        group.finish();
    }
}

/// `RewardHistory::update_rows` for each kind: the history is cloned outside the timing.
fn history_update_rows(c: &mut Criterion) {
    let data = batches();
    let kinds = [
        ("cumulative", HistoryKind::Cumulative),
        ("exponential", HistoryKind::Exponential { half_life: 256.0 }),
        ("window", HistoryKind::Window { size: 256 }),
    ];
    for (name, kind) in kinds {
        for groups in GROUPS {
            let mut group =
                c.benchmark_group(format!("history_update_rows_{name}/{groups}_groups"));
            for (_, n, b) in data.iter().filter(|d| d.0 == groups) {
                let h = warm_history(kind, &b.keys);
                group.throughput(Throughput::Elements(*n as u64));
                group.bench_with_input(BenchmarkId::from_parameter(n), b, |bench, b| {
                    bench.iter_batched(
                        || h.clone(),
                        |mut h| {
                            h.update_rows(&b.keys, &b.group_ids, &b.rewards)
                                .expect("valid rows");
                            h
                        },
                        BatchSize::LargeInput,
                    )
                });
            }
            group.finish();
        }
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = estimators, pgrpo_compute_and_update, history_update_rows
}
criterion_main!(benches);
