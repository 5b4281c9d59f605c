//! Property tests (proptest) of the history and the advantage estimators on hostile input.
//!
//! Case counts are kept modest (`PROPTEST_CASES` overrides them) so the suite stays fast.

use pgrpo::advantage::{ColdStart, Level, LevelOptions, NonFinitePolicy, UpdateOrder};
use pgrpo::{
    AdvantageConfig, Error, Estimator, GroupKey, HistoryKind, RewardHistory, RolloutRewards,
};
use proptest::prelude::*;

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    ProptestConfig::with_cases(n)
}

/// Rewards of one magnitude class: ordinary, tiny, huge, or the f32 extremes.
fn reward() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        4 => -10.0f32..10.0,
        1 => Just(0.0f32),
        1 => prop::sample::select(vec![1e30f32, -1e30, 1e-30, -1e-30, 3e38, -3e38, f32::MAX, f32::MIN]),
        1 => (-1.0f32..1.0).prop_map(|x| x * 1e30),
        1 => (-1.0f32..1.0).prop_map(|x| x * 1e-30),
    ]
}

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

fn history_of(kind: HistoryKind, parts: &[(u32, Vec<f32>)]) -> RewardHistory {
    let mut h = RewardHistory::new(kind).unwrap();
    for (g, rs) in parts {
        h.update(*g, rs).unwrap();
    }
    h
}

fn group_batches() -> impl Strategy<Value = Vec<(u32, Vec<f32>)>> {
    prop::collection::vec(
        (0u32..4, prop::collection::vec(-100.0f32..100.0, 0..20)),
        0..5,
    )
}

fn assert_stats_close(a: &RewardHistory, b: &RewardHistory) {
    assert_eq!(a.len(), b.len());
    for ((ka, sa), (kb, sb)) in a.iter().zip(b.iter()) {
        assert_eq!(ka, kb);
        assert_eq!(sa.n, sb.n);
        assert!(
            rel_close(sa.mean, sb.mean, 1e-9),
            "{ka}: mean {} vs {}",
            sa.mean,
            sb.mean
        );
        assert!(
            rel_close(sa.std, sb.std, 1e-7),
            "{ka}: std {} vs {}",
            sa.std,
            sb.std
        );
    }
}

proptest! {
    #![proptest_config(cases())]

    /// Cumulative merge: (a ∪ b) ∪ c = a ∪ (b ∪ c), a ∪ b = b ∪ a, and both equal one store
    /// that saw everything.
    #[test]
    fn cumulative_merge_is_associative_and_commutative(
        a in group_batches(), b in group_batches(), c in group_batches()
    ) {
        let k = HistoryKind::Cumulative;
        let (ha, hb, hc) = (history_of(k, &a), history_of(k, &b), history_of(k, &c));
        let mut left = ha.clone();
        left.merge(&hb).unwrap();
        left.merge(&hc).unwrap();
        let mut bc = hb.clone();
        bc.merge(&hc).unwrap();
        let mut right = ha.clone();
        right.merge(&bc).unwrap();
        assert_stats_close(&left, &right);
        let mut ab = ha.clone();
        ab.merge(&hb).unwrap();
        let mut ba = hb.clone();
        ba.merge(&ha).unwrap();
        assert_stats_close(&ab, &ba);
        let all: Vec<_> = a.iter().chain(&b).chain(&c).cloned().collect();
        assert_stats_close(&left, &history_of(k, &all));
    }

    /// Exponential and window merges are "append": merging equals one store that saw the
    /// rewards in that order.
    #[test]
    fn ordered_merges_equal_sequential_updates(
        a in group_batches(), b in group_batches(), half_life in 0.5f64..50.0, size in 1usize..12
    ) {
        for k in [HistoryKind::Exponential { half_life }, HistoryKind::Window { size }] {
            let mut merged = history_of(k, &a);
            merged.merge(&history_of(k, &b)).unwrap();
            let all: Vec<_> = a.iter().chain(&b).cloned().collect();
            assert_stats_close(&merged, &history_of(k, &all));
        }
    }
}

/// A batch: rows with a prompt (0..P) and a group (0..K), rewards from `reward()`.
#[derive(Debug, Clone)]
struct Batch {
    rewards: Vec<f32>,
    prompt_ids: Vec<u32>,
    group_ids: Vec<u32>,
    keys: Vec<GroupKey>,
}

impl Batch {
    fn view(&self) -> RolloutRewards<'_> {
        RolloutRewards {
            rewards: &self.rewards,
            prompt_ids: &self.prompt_ids,
            group_ids: &self.group_ids,
            group_keys: &self.keys,
        }
    }
}

/// `P` prompts × `G` completions (G ≥ 2), each prompt in one of `K` groups.
fn batch_with(rewards: impl Strategy<Value = f32> + Clone) -> impl Strategy<Value = Batch> {
    (1usize..6, 2usize..6, 1usize..4).prop_flat_map(move |(p, g, k)| {
        (
            prop::collection::vec(rewards.clone(), p * g),
            prop::collection::vec(0u32..k as u32, p),
            Just((p, g, k)),
        )
            .prop_map(|(rewards, prompt_group, (p, g, k))| Batch {
                rewards,
                prompt_ids: (0..p * g).map(|i| (i / g) as u32).collect(),
                group_ids: (0..p * g).map(|i| prompt_group[i / g]).collect(),
                keys: (0..k as u32).map(GroupKey::from).collect(),
            })
    })
}

/// A history with some rewards in every group (some constant, some spread).
fn warm_history() -> RewardHistory {
    let mut h = RewardHistory::new(HistoryKind::Cumulative).unwrap();
    h.update(0u32, &[1.0; 12]).unwrap(); // constant group: std 0
    h.update(1u32, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
        .unwrap();
    h.update(2u32, &[-1e3, 1e3, 0.0, 5.0, -5.0, 2.0, 7.0, 1.0, 1.0])
        .unwrap();
    h
}

fn configs() -> Vec<AdvantageConfig> {
    let mut out = Vec::new();
    for est in Estimator::ALL {
        for cold in [
            ColdStart::PerPrompt,
            ColdStart::Batch,
            ColdStart::HistoryWithBatch,
        ] {
            if !est.is_group_aware() && cold != ColdStart::PerPrompt {
                continue;
            }
            for order in [UpdateOrder::BeforeBatch, UpdateOrder::AfterBatch] {
                if !est.is_group_aware() && order == UpdateOrder::AfterBatch {
                    continue;
                }
                let mut c = AdvantageConfig {
                    estimator: est,
                    ..Default::default()
                };
                c.pgrpo.cold_start = cold;
                c.pgrpo.update_order = order;
                c.pgrpo.min_count = 4;
                out.push(c);
            }
        }
    }
    // Every pair of levels.
    for mean in Level::ALL {
        for std in Level::ALL {
            let mut c = AdvantageConfig {
                estimator: Estimator::Levels,
                levels: LevelOptions { mean, std },
                ..Default::default()
            };
            c.pgrpo.min_count = 4;
            out.push(c);
        }
    }
    out
}

proptest! {
    #![proptest_config(cases())]

    /// Every finite input, from 1e-30 to f32::MAX and constant groups, gives finite
    /// advantages under every estimator and option.
    #[test]
    fn advantages_are_finite_for_every_finite_input(b in batch_with(reward())) {
        for cfg in configs() {
            for hist in [RewardHistory::default(), warm_history()] {
                let adv = cfg.compute(&b.view(), &hist).unwrap();
                prop_assert_eq!(adv.values.len(), b.rewards.len());
                for (i, a) in adv.values.iter().enumerate() {
                    prop_assert!(a.is_finite(), "{:?}: row {} advantage {} (reward {})",
                        cfg.estimator, i, a, b.rewards[i]);
                }
            }
        }
    }

    /// Constant prompts get exactly zero from the per-prompt estimators.
    #[test]
    fn constant_prompts_get_zero(v in reward(), p in 1usize..5, g in 2usize..6) {
        let b = Batch {
            rewards: vec![v; p * g],
            prompt_ids: (0..p * g).map(|i| (i / g) as u32).collect(),
            group_ids: vec![0; p * g],
            keys: vec![GroupKey::from(0u32)],
        };
        for est in [Estimator::Grpo, Estimator::DrGrpo, Estimator::Rloo, Estimator::GrpoBatchStd] {
            let cfg = AdvantageConfig { estimator: est, ..Default::default() };
            let adv = cfg.compute(&b.view(), &RewardHistory::default()).unwrap();
            prop_assert!(adv.values.iter().all(|a| *a == 0.0), "{:?}: {:?}", est, adv.values);
        }
    }

    /// Shuffling the rows permutes the advantages and changes nothing else.
    #[test]
    fn row_permutation_permutes_advantages(
        b in batch_with(-100.0f32..100.0), seed in any::<u64>()
    ) {
        use rand::{seq::SliceRandom, SeedableRng};
        let n = b.rewards.len();
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let shuffled = Batch {
            rewards: perm.iter().map(|&i| b.rewards[i]).collect(),
            prompt_ids: perm.iter().map(|&i| b.prompt_ids[i]).collect(),
            group_ids: perm.iter().map(|&i| b.group_ids[i]).collect(),
            keys: b.keys.clone(),
        };
        for cfg in configs() {
            let hist = warm_history();
            let a = cfg.compute(&b.view(), &hist).unwrap();
            let s = cfg.compute(&shuffled.view(), &hist).unwrap();
            for (j, &i) in perm.iter().enumerate() {
                prop_assert!(
                    rel_close(a.values[i] as f64, s.values[j] as f64, 1e-5),
                    "{:?} {:?}: row {} -> {}: {} vs {}",
                    cfg.estimator, cfg.pgrpo.cold_start, i, j, a.values[i], s.values[j]
                );
            }
        }
    }

    /// z-score estimators: A(s·r + c) = sign(s)·A(r) (eps and the history transformed alike).
    /// Rewards are quarter-integers and `s` a power of two, so the transform is exact in f32.
    #[test]
    fn z_scores_are_shift_and_scale_equivariant(
        b in batch_with((-64i32..64).prop_map(|x| x as f32 / 4.0)),
        exp in -6i32..6, negative in any::<bool>(), shift in -50i32..50
    ) {
        let s = if negative { -(2f32.powi(exp)) } else { 2f32.powi(exp) };
        let c = shift as f32;
        let t = Batch {
            rewards: b.rewards.iter().map(|r| s * r + c).collect(),
            ..b.clone()
        };
        let base_hist = [(0u32, vec![0.5f32, 1.0, 1.5, -2.0, 3.0, 0.25, 1.0, 2.0, 4.0])];
        let moved_hist: Vec<(u32, Vec<f32>)> = base_hist
            .iter()
            .map(|(g, rs)| (*g, rs.iter().map(|r| s * r + c).collect()))
            .collect();
        let (h0, h1) = (
            history_of(HistoryKind::Cumulative, &base_hist),
            history_of(HistoryKind::Cumulative, &moved_hist),
        );
        for est in [
            Estimator::Grpo, Estimator::BatchZScore, Estimator::GrpoBatchStd, Estimator::PGrpo,
            Estimator::AnnealedOffset, Estimator::JamesStein, Estimator::Blend, Estimator::Levels,
        ] {
            let eps = 1e-3f32;
            let cfg0 = AdvantageConfig { estimator: est, eps, ..Default::default() };
            let cfg1 = AdvantageConfig { estimator: est, eps: eps * s.abs(), ..Default::default() };
            let a0 = cfg0.compute(&b.view(), &h0).unwrap();
            let a1 = cfg1.compute(&t.view(), &h1).unwrap();
            for (i, (x, y)) in a0.values.iter().zip(&a1.values).enumerate() {
                let want = if negative { -x } else { *x };
                prop_assert!(
                    rel_close(want as f64, *y as f64, 2e-4),
                    "{:?}: row {}: {} vs {} (s = {}, c = {})", est, i, want, y, s, c
                );
            }
        }
    }

    /// NaN and ±inf: an error naming the first such row under `Error`; under `Missing` the row
    /// gets 0, is counted, and stays out of the history.
    #[test]
    fn non_finite_rewards_follow_the_policy(
        b in batch_with(-10.0f32..10.0),
        bad in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY])), 1..4)
    ) {
        let mut b = b;
        for (idx, v) in &bad {
            let i = idx.index(b.rewards.len());
            b.rewards[i] = *v;
        }
        let first = b.rewards.iter().position(|r| !r.is_finite()).unwrap();
        let missing = b.rewards.iter().filter(|r| !r.is_finite()).count();
        for est in Estimator::ALL {
            let cfg = AdvantageConfig { estimator: est, ..Default::default() };
            let mut h = RewardHistory::default();
            match cfg.compute_and_update(&b.view(), &mut h) {
                Err(Error::NonFiniteReward { row, .. }) => prop_assert_eq!(row, first),
                other => prop_assert!(false, "{:?}: {:?}", est, other.map(|a| a.values)),
            }
            prop_assert!(h.is_empty());
            let cfg = AdvantageConfig { non_finite: NonFinitePolicy::Missing, ..cfg };
            match cfg.compute_and_update(&b.view(), &mut h) {
                Ok(adv) => {
                    prop_assert_eq!(adv.diagnostics.num_missing, missing);
                    for (a, r) in adv.values.iter().zip(&b.rewards) {
                        prop_assert!(a.is_finite());
                        if !r.is_finite() {
                            prop_assert_eq!(*a, 0.0);
                        }
                    }
                    let n: u64 = h.iter().map(|(_, s)| s.n).sum();
                    prop_assert_eq!(n as usize, b.rewards.len() - missing);
                }
                // A prompt left with a single usable reward under an estimator that needs a
                // spread is still an error only when nothing was missing in it.
                Err(e) => prop_assert!(matches!(e, Error::TooFewCompletions { .. }), "{}", e),
            }
        }
    }
}

/// Found by the `advantage` fuzz target: a constant batch under a batch-std estimator with
/// `eps = 0` divided 0 by 0 and returned NaN advantages. Now 0.
#[test]
fn constant_batch_with_zero_eps_gives_zero_not_nan() {
    let keys = [GroupKey::from(0u32), GroupKey::from(1u32)];
    let batch = RolloutRewards {
        rewards: &[0.0; 6],
        prompt_ids: &[0, 0, 1, 1, 2, 2],
        group_ids: &[0, 0, 1, 1, 0, 0],
        group_keys: &keys,
    };
    for est in [
        Estimator::GrpoBatchStd,
        Estimator::BatchZScore,
        Estimator::Grpo,
    ] {
        let cfg = AdvantageConfig {
            estimator: est,
            eps: 0.0,
            ..Default::default()
        };
        let adv = cfg.compute(&batch, &RewardHistory::default()).unwrap();
        assert_eq!(adv.values, vec![0.0; 6], "{est:?}");
    }
}

/// Values beyond f32's range saturate instead of becoming infinite.
#[test]
fn huge_advantages_saturate() {
    let keys = [GroupKey::from(0u32)];
    let batch = RolloutRewards {
        rewards: &[f32::MAX, -f32::MAX, -f32::MAX],
        prompt_ids: &[0, 0, 0],
        group_ids: &[0, 0, 0],
        group_keys: &keys,
    };
    let cfg = AdvantageConfig {
        estimator: Estimator::DrGrpo,
        ..Default::default()
    };
    let adv = cfg.compute(&batch, &RewardHistory::default()).unwrap();
    assert_eq!(adv.values[0], f32::MAX, "{:?}", adv.values);
    assert!(adv.values.iter().all(|a| a.is_finite()));
}
