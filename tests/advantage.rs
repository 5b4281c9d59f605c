//! Tests of `pgrpo::advantage`: golden values per estimator (from NumPy), the P-GRPO identity,
//! update order and cold start, the offset weight, row order and sparse ids, diagnostics, bad
//! input (always a typed error, never a panic) and the tensor entry point.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, rewards, rng};
use pgrpo::advantage::{
    AdvantageDiagnostics, ColdStart, NonFinitePolicy, PGrpoOptions, UpdateOrder,
};
use pgrpo::history::Variance;
use pgrpo::{
    AdvantageConfig, Error, Estimator, GroupKey, HistoryKind, RewardHistory, RolloutRewards,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// An owned batch.
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

    /// The batch with rows reordered: row `i` of the result is row `perm[i]` of this one.
    fn permuted(&self, perm: &[usize]) -> Batch {
        Batch {
            rewards: perm.iter().map(|&i| self.rewards[i]).collect(),
            prompt_ids: perm.iter().map(|&i| self.prompt_ids[i]).collect(),
            group_ids: perm.iter().map(|&i| self.group_ids[i]).collect(),
            keys: self.keys.clone(),
        }
    }

    /// Rows of group `g`'s rewards, in row order.
    fn group_rewards(&self, g: u32) -> Vec<f32> {
        (0..self.rewards.len())
            .filter(|&i| self.group_ids[i] == g)
            .map(|i| self.rewards[i])
            .collect()
    }
}

/// `prompts` prompts of `g` completions each, every prompt in one of `groups` preference
/// groups, rows shuffled (prompts are not contiguous) and prompt ids sparse.
fn random_batch(r: &mut StdRng, prompts: usize, g: usize, groups: usize) -> Batch {
    let keys: Vec<GroupKey> = (0..groups)
        .map(|i| {
            if i % 2 == 0 {
                GroupKey::Id(1000 + i as u64)
            } else {
                format!("persona-{i}").into()
            }
        })
        .collect();
    let mut rows = Vec::new();
    for q in 0..prompts {
        let group = r.random_range(0..groups) as u32;
        let id = q as u32 * 7919 + 13;
        // Some prompts have no spread at all.
        let x = if r.random_bool(0.15) {
            vec![r.random_range(-1.0..1.0f32); g]
        } else {
            rewards(r, g)
        };
        for v in x {
            rows.push((v, id, group));
        }
    }
    rows.shuffle(r);
    Batch {
        rewards: rows.iter().map(|r| r.0).collect(),
        prompt_ids: rows.iter().map(|r| r.1).collect(),
        group_ids: rows.iter().map(|r| r.2).collect(),
        keys,
    }
}

/// A history in which every key has `n` random rewards.
fn warm_history(r: &mut StdRng, kind: HistoryKind, keys: &[GroupKey], n: usize) -> RewardHistory {
    let mut h = RewardHistory::new(kind).unwrap();
    for k in keys {
        h.update(k, &rewards(r, n)).unwrap();
    }
    h
}

fn config(estimator: Estimator) -> AdvantageConfig {
    AdvantageConfig {
        estimator,
        ..Default::default()
    }
}

fn pgrpo(options: PGrpoOptions) -> AdvantageConfig {
    AdvantageConfig {
        estimator: Estimator::PGrpo,
        pgrpo: options,
        ..Default::default()
    }
}

/// Equality of diagnostics in which `NaN` (an unused field) equals `NaN`.
#[track_caller]
fn assert_same_diagnostics(a: &AdvantageDiagnostics, b: &AdvantageDiagnostics) {
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[track_caller]
fn assert_values(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_close(g as f64, w, tol, 1.0, &format!("{what}: row {i}"));
    }
}

/// `μ_q` and `σ_q` (under `variance`) of each row's prompt, computed directly.
fn prompt_stats(b: &Batch, variance: Variance) -> (Vec<f64>, Vec<f64>) {
    let n = b.rewards.len();
    let mut mean = vec![0.0; n];
    let mut std = vec![0.0; n];
    for i in 0..n {
        let x: Vec<f64> = (0..n)
            .filter(|&j| b.prompt_ids[j] == b.prompt_ids[i])
            .map(|j| b.rewards[j] as f64)
            .collect();
        let c = x.len() as f64;
        let m = x.iter().sum::<f64>() / c;
        let m2: f64 = x.iter().map(|v| (v - m) * (v - m)).sum();
        mean[i] = m;
        std[i] = match variance {
            Variance::Population => (m2 / c).sqrt(),
            Variance::Sample => (m2 / (c - 1.0)).sqrt(),
        };
    }
    (mean, std)
}

// ---------------------------------------------------------------------------------------------
// Golden values

/// Three prompts (ids 10, 7, 3; rows interleaved), two preference groups ("formal" and id 42);
/// prompt 3 has no spread.
fn hand_batch() -> Batch {
    Batch {
        rewards: vec![
            1.0, 0.0, 0.5, 0.25, 2.0, -1.0, 0.75, 0.5, 0.3, 0.3, 0.3, 0.3,
        ],
        prompt_ids: vec![10, 10, 7, 10, 7, 7, 10, 7, 3, 3, 3, 3],
        group_ids: vec![0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0],
        keys: vec!["formal".into(), 42u32.into()],
    }
}

const HIST_FORMAL: [f32; 10] = [0.2, 0.9, 0.4, 0.6, 0.1, 0.8, 0.5, 0.7, 0.3, 0.65];
const HIST_42: [f32; 8] = [1.5, -0.5, 0.0, 2.5, 1.0, 0.5, -1.0, 3.0];

fn hand_history(kind: HistoryKind) -> RewardHistory {
    let mut h = RewardHistory::new(kind).unwrap();
    h.update("formal", &HIST_FORMAL).unwrap();
    h.update(42u32, &HIST_42).unwrap();
    h
}

// Computed with NumPy 2.4 (float32 inputs widened to float64, eps = float32(1e-4)):
//
// import numpy as np
// f = lambda xs: np.array(xs, dtype=np.float32).astype(np.float64)
// R = f([1.0, 0.0, 0.5, 0.25, 2.0, -1.0, 0.75, 0.5, 0.3, 0.3, 0.3, 0.3])
// P = np.array([10, 10, 7, 10, 7, 7, 10, 7, 3, 3, 3, 3])
// G = np.array([0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0])
// H = [f([0.2, 0.9, 0.4, 0.6, 0.1, 0.8, 0.5, 0.7, 0.3, 0.65]),
//      f([1.5, -0.5, 0.0, 2.5, 1.0, 0.5, -1.0, 3.0])]
// eps = float(np.float32(1e-4))
// def per_prompt(fn):
//     out = np.zeros_like(R)
//     for q in np.unique(P):
//         m = P == q
//         out[m] = fn(R[m])
//     return out
// sd = lambda x, ddof=1: x.std(ddof=ddof)
// grpo = per_prompt(lambda x: (x - x.mean()) / (sd(x) + eps) if np.ptp(x) > 0 else 0 * x)
// grpo_pop = per_prompt(lambda x: (x - x.mean()) / (sd(x, 0) + eps) if np.ptp(x) > 0 else 0 * x)
// grpo_batch_std = per_prompt(lambda x: x - x.mean()) / (sd(R) + eps)
// dr_grpo = per_prompt(lambda x: x - x.mean())
// batch_z = (R - R.mean()) / (sd(R) + eps)
// rloo = per_prompt(lambda x: x - (x.sum() - x) / (len(x) - 1))
// def pgrpo(lam=1.0, after=False, w=None, ddof=1):
//     out = np.zeros_like(R)
//     mq = per_prompt(lambda x: 0 * x + x.mean())
//     for g in (0, 1):
//         h = np.concatenate([H[g], R[G == g]]) if after else H[g]
//         wt = np.ones_like(h) if w is None else w(len(h))
//         W = wt.sum(); mp = (wt * h).sum() / W
//         m2 = (wt * (h - mp) ** 2).sum()
//         sp = np.sqrt(m2 / (W - ddof))
//         m = G == g
//         out[m] = (R[m] - ((1 - lam) * mq[m] + lam * mp)) / (sp + eps)
//     return out
// ema = lambda hl: (lambda n: 2.0 ** (-(n - 1 - np.arange(n)) / hl))
// for name, v in [("grpo", grpo), ("grpo_population", grpo_pop),
//                 ("grpo_batch_std", grpo_batch_std), ("dr_grpo", dr_grpo),
//                 ("batch_z_score", batch_z), ("rloo", rloo),
//                 ("p_grpo", pgrpo()), ("p_grpo_offset_0_5", pgrpo(0.5)),
//                 ("p_grpo_offset_0", pgrpo(0.0)), ("p_grpo_after_batch", pgrpo(after=True)),
//                 ("p_grpo_exponential_hl4", pgrpo(w=ema(4.0)))]:
//     print(f"pub const {name.upper()}: [f64; 12] = [{', '.join(repr(float(x)) for x in v)}];")
#[rustfmt::skip]
mod golden {
    pub const GRPO: [f64; 12] = [1.0952051675862404, -1.0952051675862404, 0.0, -0.5476025837931202, 1.2246448795584142, -1.2246448795584142, 0.5476025837931202, 0.0, 0.0, 0.0, 0.0, 0.0];
    pub const GRPO_POPULATION: [f64; 12] = [1.2645911450092648, -1.2645911450092648, 0.0, -0.6322955725046324, 1.4140802416127316, -1.4140802416127316, 0.6322955725046324, 0.0, 0.0, 0.0, 0.0, 0.0];
    pub const GRPO_BATCH_STD: [f64; 12] = [0.7249087558724396, -0.7249087558724396, 0.0, -0.3624543779362198, 2.1747262676173187, -2.1747262676173187, 0.3624543779362198, 0.0, 0.0, 0.0, 0.0, 0.0];
    pub const DR_GRPO: [f64; 12] = [0.5, -0.5, 0.0, -0.25, 1.5, -1.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0];
    pub const BATCH_Z_SCORE: [f64; 12] = [0.8215632508943743, -0.6282542608505048, 0.09665449502193477, -0.265799882914285, 2.2713807626392537, -2.078071772595384, 0.45910887295815456, 0.09665449502193477, -0.19330899004386953, -0.19330899004386953, -0.19330899004386953, -0.19330899004386953];
    pub const RLOO: [f64; 12] = [0.6666666666666667, -0.6666666666666666, 0.0, -0.33333333333333337, 2.0, -2.0, 0.3333333333333333, 0.0, 0.0, 0.0, 0.0, 0.0];
    pub const P_GRPO: [f64; 12] = [1.8467759713979848, -1.9610095354691919, -0.2663378843769621, -1.0090631587523977, 0.7990136531308862, -1.3316894218848103, 0.8948295946811906, -0.2663378843769621, -0.8186738380166984, -0.8186738380166984, -0.8186738380166984, -0.8186738380166984];
    pub const P_GRPO_OFFSET_0_5: [f64; 12] = [1.8753343624157865, -1.93245114445139, -0.13316894218848105, -0.9805047677345959, 0.9321825953193673, -1.1985204796963294, 0.9233879856989924, -0.13316894218848105, -0.4093369190083492, -0.4093369190083492, -0.4093369190083492, -0.4093369190083492];
    pub const P_GRPO_OFFSET_0: [f64; 12] = [1.9038927534335883, -1.9038927534335883, 0.0, -0.9519463767167942, 1.0653515375078484, -1.0653515375078484, 0.9519463767167942, 0.0, 0.0, 0.0, 0.0, 0.0];
    pub const P_GRPO_AFTER_BATCH: [f64; 12] = [1.8782555875047309, -1.6252263541453829, -0.19147075600826652, -0.7493558687328544, 0.9573537800413326, -1.3402952920578657, 1.0023851020922026, -0.19147075600826652, -0.5741817298855894, -0.5741817298855894, -0.5741817298855894, -0.5741817298855894];
    pub const P_GRPO_EXPONENTIAL_HL4: [f64; 12] = [1.8959592107523822, -2.1254234389789644, -0.2940597027092949, -1.1200777765461276, 0.6221216243102922, -1.2102410297288817, 0.8906135483195455, -0.2940597027092949, -0.9190085961209435, -0.9190085961209435, -0.9190085961209435, -0.9190085961209435];
}
use golden::*;

#[test]
fn golden_advantages_per_estimator() {
    let b = hand_batch();
    let cum = hand_history(HistoryKind::Cumulative);
    let with_lambda = |l: f32| {
        pgrpo(PGrpoOptions {
            offset_weight: l,
            ..Default::default()
        })
    };
    let cases: Vec<(&str, AdvantageConfig, RewardHistory, &[f64; 12])> = vec![
        ("grpo", config(Estimator::Grpo), cum.clone(), &GRPO),
        (
            "grpo population",
            AdvantageConfig {
                variance: Variance::Population,
                ..config(Estimator::Grpo)
            },
            cum.clone(),
            &GRPO_POPULATION,
        ),
        (
            "grpo_batch_std",
            config(Estimator::GrpoBatchStd),
            cum.clone(),
            &GRPO_BATCH_STD,
        ),
        ("dr_grpo", config(Estimator::DrGrpo), cum.clone(), &DR_GRPO),
        (
            "batch_z_score",
            config(Estimator::BatchZScore),
            cum.clone(),
            &BATCH_Z_SCORE,
        ),
        ("rloo", config(Estimator::Rloo), cum.clone(), &RLOO),
        ("p_grpo", config(Estimator::PGrpo), cum.clone(), &P_GRPO),
        (
            "p_grpo λ=0.5",
            with_lambda(0.5),
            cum.clone(),
            &P_GRPO_OFFSET_0_5,
        ),
        (
            "p_grpo λ=0",
            with_lambda(0.0),
            cum.clone(),
            &P_GRPO_OFFSET_0,
        ),
        (
            "p_grpo after batch",
            pgrpo(PGrpoOptions {
                update_order: UpdateOrder::AfterBatch,
                ..Default::default()
            }),
            cum.clone(),
            &P_GRPO_AFTER_BATCH,
        ),
        (
            "p_grpo exponential",
            config(Estimator::PGrpo),
            hand_history(HistoryKind::Exponential { half_life: 4.0 }),
            &P_GRPO_EXPONENTIAL_HL4,
        ),
    ];
    for (what, cfg, h, want) in cases {
        let adv = cfg.compute(&b.view(), &h).unwrap();
        assert_values(&adv.values, want, 2e-6, what);
        // A prompt without spread gives exactly 0 under the per-prompt estimators.
        if matches!(
            cfg.estimator,
            Estimator::Grpo | Estimator::DrGrpo | Estimator::Rloo | Estimator::GrpoBatchStd
        ) {
            assert!(adv.values[8..].iter().all(|&v| v == 0.0), "{what}");
        }
    }
}

/// The paper's corollary: `A_pgrpo = (σ_G/σ_p)·Â + (μ_G − μ_p)/σ_p` with `eps = 0`, `Â` the GRPO
/// advantage and `σ_G` the prompt std, under the same variance convention.
#[test]
fn pgrpo_equals_rescaled_grpo_plus_offset() {
    for variance in [Variance::Sample, Variance::Population] {
        for seed in 0..20 {
            let mut r = rng(seed);
            let g = r.random_range(2..9);
            let b = random_batch(&mut r, 30, g, 3);
            let h = warm_history(&mut r, HistoryKind::Cumulative, &b.keys, 50);
            let grpo = AdvantageConfig {
                estimator: Estimator::Grpo,
                eps: 0.0,
                variance,
                ..Default::default()
            };
            // eps = 0 needs a floor for P-GRPO; 1e-30 is far below every history std here.
            let p = AdvantageConfig {
                estimator: Estimator::PGrpo,
                std_floor: 1e-30,
                ..grpo
            };
            let a_hat = grpo.compute(&b.view(), &h).unwrap().values;
            let a = p.compute(&b.view(), &h).unwrap();
            let (mu_g, sigma_g) = prompt_stats(&b, variance);
            for i in 0..b.rewards.len() {
                let s = h.stats(&b.keys[b.group_ids[i] as usize]).unwrap();
                let sigma_p = s.std_with(variance).unwrap();
                let want = sigma_g[i] / sigma_p * a_hat[i] as f64 + (mu_g[i] - s.mean) / sigma_p;
                let what = format!("{variance:?} seed {seed} row {i}");
                assert_close(a.values[i] as f64, want, 1e-5, 1.0, &what);
            }
            assert!(a
                .diagnostics
                .groups
                .iter()
                .all(|g| g.count == 0 || g.used_history));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Update order, purity, cold start

#[test]
fn before_batch_uses_the_history_as_it_stood_and_after_batch_includes_the_batch() {
    let b = hand_batch();
    for kind in [
        HistoryKind::Cumulative,
        HistoryKind::Exponential { half_life: 6.0 },
        HistoryKind::Window { size: 9 },
    ] {
        let h = hand_history(kind);
        let before = h.clone();
        for order in [UpdateOrder::BeforeBatch, UpdateOrder::AfterBatch] {
            let cfg = pgrpo(PGrpoOptions {
                update_order: order,
                ..Default::default()
            });
            let adv = cfg.compute(&b.view(), &h).unwrap();
            assert_eq!(h, before, "compute must not change the history");
            for (g, key) in b.keys.iter().enumerate() {
                let mut expected = h.clone();
                if order == UpdateOrder::AfterBatch {
                    expected.update(key, &b.group_rewards(g as u32)).unwrap();
                }
                let s = expected.stats(key).unwrap();
                let d = &adv.diagnostics.groups[g];
                assert!(d.used_history);
                assert_close(d.history_mean, s.mean, 1e-12, 1.0, "history mean");
                assert_close(d.history_std, s.sample_std, 1e-6, 1.0, "history std");
                for i in (0..b.rewards.len()).filter(|&i| b.group_ids[i] == g as u32) {
                    let want = (b.rewards[i] as f64 - s.mean) / (s.sample_std + cfg.eps as f64);
                    let what = format!("{kind:?} {order:?} row {i}");
                    assert_close(adv.values[i] as f64, want, 1e-6, 1.0, &what);
                }
            }
        }
    }
}

#[test]
fn first_batch_of_a_fresh_group_falls_back_before_but_not_after() {
    let mut r = rng(3);
    let b = random_batch(&mut r, 4, 8, 1); // 32 rows of one group: > min_count
    let fresh = RewardHistory::default();
    let grpo = config(Estimator::Grpo).compute(&b.view(), &fresh).unwrap();
    let before = config(Estimator::PGrpo).compute(&b.view(), &fresh).unwrap();
    assert_eq!(before.values, grpo.values);
    assert!(!before.diagnostics.groups[0].used_history);
    assert!(before.diagnostics.groups[0].history_mean.is_nan());
    let after = pgrpo(PGrpoOptions {
        update_order: UpdateOrder::AfterBatch,
        ..Default::default()
    })
    .compute(&b.view(), &fresh)
    .unwrap();
    assert!(after.diagnostics.groups[0].used_history);
    let mut h = fresh.clone();
    h.update(&b.keys[0], &b.rewards).unwrap();
    let s = h.stats(&b.keys[0]).unwrap();
    let want: Vec<f64> = b
        .rewards
        .iter()
        .map(|&x| (x as f64 - s.mean) / (s.sample_std + 1e-4f32 as f64))
        .collect();
    assert_values(&after.values, &want, 1e-6, "after batch, fresh group");
}

#[test]
fn compute_and_update_equals_compute_then_apply() {
    for kind in [
        HistoryKind::Cumulative,
        HistoryKind::Exponential { half_life: 10.0 },
        HistoryKind::Window { size: 20 },
    ] {
        for estimator in Estimator::ALL {
            let mut r = rng(9);
            let mut h1 = warm_history(&mut r, kind, &[1000u32.into()], 12);
            let mut h2 = h1.clone();
            for step in 0..4 {
                let b = random_batch(&mut r, 8, 4, 4);
                let cfg = config(estimator);
                let a1 = cfg.compute_and_update(&b.view(), &mut h1).unwrap();
                let a2 = cfg.compute(&b.view(), &h2).unwrap();
                assert_eq!(a1.values, a2.values);
                assert_same_diagnostics(&a1.diagnostics, &a2.diagnostics);
                h2.apply(&b.keys, a2.deltas).unwrap();
                assert_eq!(h1, h2, "{kind:?} {estimator:?} step {step}");
                // The update folds in exactly the batch's rewards, in row order.
                let mut h3 = h2.clone();
                let mut replay = h1.clone();
                let b2 = random_batch(&mut r, 3, 5, 2);
                config(estimator)
                    .compute_and_update(&b2.view(), &mut h3)
                    .unwrap();
                replay
                    .update_rows(&b2.keys, &b2.group_ids, &b2.rewards)
                    .unwrap();
                for k in replay.groups() {
                    let (x, y) = (h3.stats(k).unwrap(), replay.stats(k).unwrap());
                    assert_eq!(x.n, y.n);
                    assert_close(x.mean, y.mean, 1e-12, 1.0, "replayed mean");
                    assert_close(x.std, y.std, 1e-10, 1.0, "replayed std");
                }
            }
        }
    }
}

#[test]
fn apply_rejects_deltas_for_other_keys_or_kinds() {
    let b = hand_batch();
    let h = RewardHistory::default();
    let adv = config(Estimator::Grpo).compute(&b.view(), &h).unwrap();
    let mut other = RewardHistory::new(HistoryKind::Window { size: 3 }).unwrap();
    assert!(matches!(
        other.apply(&b.keys, adv.deltas.clone()),
        Err(Error::InvalidHistory { .. })
    ));
    let mut same = h.clone();
    assert!(matches!(
        same.apply(&b.keys[..1], adv.deltas),
        Err(Error::LengthMismatch { .. })
    ));
    assert_eq!(same, h);
    assert!(other.is_empty());
}

/// One warm group (0) and one with `min_count − 1` rewards (1), two prompts each.
fn cold_start_setup() -> (Batch, RewardHistory) {
    let mut r = rng(21);
    let mut b = random_batch(&mut r, 4, 6, 2);
    // Prompts 0, 1 in group 0, prompts 2, 3 in group 1 (rows stay shuffled).
    for i in 0..b.rewards.len() {
        b.group_ids[i] = u32::from((b.prompt_ids[i] - 13) / 7919 >= 2);
    }
    let mut h = RewardHistory::default();
    h.update(&b.keys[0], &rewards(&mut r, 8)).unwrap();
    h.update(&b.keys[1], &rewards(&mut r, 7)).unwrap();
    (b, h)
}

#[test]
fn cold_groups_use_the_fallback_and_diagnostics_say_so() {
    let (b, h) = cold_start_setup();
    let warm = h.stats(&b.keys[0]).unwrap();
    let warm_adv =
        |i: usize| (b.rewards[i] as f64 - warm.mean) / (warm.sample_std + 1e-4f32 as f64);
    let grpo = config(Estimator::Grpo)
        .compute(&b.view(), &h)
        .unwrap()
        .values;
    let batch_z = config(Estimator::BatchZScore)
        .compute(&b.view(), &h)
        .unwrap()
        .values;
    let mut with_batch = h.clone();
    with_batch.update(&b.keys[1], &b.group_rewards(1)).unwrap();
    let wb = with_batch.stats(&b.keys[1]).unwrap();

    for cold_start in [
        ColdStart::PerPrompt,
        ColdStart::Batch,
        ColdStart::HistoryWithBatch,
    ] {
        let cfg = pgrpo(PGrpoOptions {
            cold_start,
            ..Default::default()
        });
        let adv = cfg.compute(&b.view(), &h).unwrap();
        let d = &adv.diagnostics.groups;
        assert!(d[0].used_history && !d[1].used_history, "{cold_start:?}");
        assert_close(d[0].history_mean, warm.mean, 1e-12, 1.0, "warm mean");
        assert!(d[1].history_mean.is_nan() && d[1].history_std.is_nan());
        for i in 0..b.rewards.len() {
            let what = format!("{cold_start:?} row {i}");
            if b.group_ids[i] == 0 {
                assert_close(adv.values[i] as f64, warm_adv(i), 1e-6, 1.0, &what);
                continue;
            }
            match cold_start {
                ColdStart::PerPrompt => assert_eq!(adv.values[i], grpo[i], "{what}"),
                ColdStart::Batch => assert_eq!(adv.values[i], batch_z[i], "{what}"),
                ColdStart::HistoryWithBatch => {
                    let want = (b.rewards[i] as f64 - wb.mean) / (wb.sample_std + 1e-4f32 as f64);
                    assert_close(adv.values[i] as f64, want, 1e-6, 1.0, &what);
                }
            }
        }
    }
    // The threshold is `n >= min_count`: with min_count 7 both groups are warm, with 9 neither.
    for (min_count, used) in [(7, [true, true]), (9, [false, false]), (0, [true, true])] {
        let cfg = pgrpo(PGrpoOptions {
            min_count,
            ..Default::default()
        });
        let d = cfg.compute(&b.view(), &h).unwrap().diagnostics.groups;
        assert_eq!(
            [d[0].used_history, d[1].used_history],
            used,
            "min_count {min_count}"
        );
    }
}

#[test]
fn a_history_without_a_defined_std_is_cold() {
    // One reward: no sample std, so even min_count 1 falls back.
    let b = hand_batch();
    let mut h = RewardHistory::default();
    h.update("formal", &[0.5]).unwrap();
    h.update(42u32, &[0.5]).unwrap();
    let cfg = pgrpo(PGrpoOptions {
        min_count: 1,
        ..Default::default()
    });
    let adv = cfg.compute(&b.view(), &h).unwrap();
    assert!(adv.diagnostics.groups.iter().all(|g| !g.used_history));
    assert_values(&adv.values, &GRPO, 2e-6, "falls back to GRPO");
    // The population std of one reward is 0: defined, so used (divided by eps).
    let pop = AdvantageConfig {
        variance: Variance::Population,
        eps: 0.5,
        ..cfg
    };
    let adv = pop.compute(&b.view(), &h).unwrap();
    assert!(adv.diagnostics.groups.iter().all(|g| g.used_history));
    assert_eq!(adv.values[0], (1.0 - 0.5) / 0.5);
}

// ---------------------------------------------------------------------------------------------
// Offset weight

#[test]
fn offset_weight_interpolates_between_prompt_and_history_centres() {
    let mut r = rng(4);
    let b = random_batch(&mut r, 40, 4, 3);
    let h = warm_history(&mut r, HistoryKind::Cumulative, &b.keys, 30);
    let (mu_q, _) = prompt_stats(&b, Variance::Sample);
    for lambda in [0.0f32, 0.3, 1.0] {
        let cfg = pgrpo(PGrpoOptions {
            offset_weight: lambda,
            ..Default::default()
        });
        let adv = cfg.compute(&b.view(), &h).unwrap();
        for (i, mu_q) in mu_q.iter().enumerate() {
            let s = h.stats(&b.keys[b.group_ids[i] as usize]).unwrap();
            let l = lambda as f64;
            let centre = (1.0 - l) * mu_q + l * s.mean;
            let want = (b.rewards[i] as f64 - centre) / (s.sample_std + cfg.eps as f64);
            assert_close(
                adv.values[i] as f64,
                want,
                1e-6,
                1.0,
                &format!("λ={lambda} row {i}"),
            );
        }
        if lambda == 0.0 {
            // Centred on the prompt: zero mean per prompt, exactly 0 for a prompt without spread.
            for q in b.prompt_ids.iter() {
                let rows: Vec<usize> = (0..b.rewards.len())
                    .filter(|&i| b.prompt_ids[i] == *q)
                    .collect();
                let sum: f64 = rows.iter().map(|&i| adv.values[i] as f64).sum();
                let size: f64 = rows.iter().map(|&i| adv.values[i].abs() as f64).sum();
                assert!(sum.abs() <= 1e-6 * (1.0 + size), "prompt {q}: {sum}");
                if rows.iter().all(|&i| b.rewards[i] == b.rewards[rows[0]]) {
                    assert!(rows.iter().all(|&i| adv.values[i] == 0.0));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row order and ids

/// Every estimator worth checking for row-order independence: the plain ones with a warm
/// history, and P-GRPO with each cold start on a partly cold history.
fn all_configs() -> Vec<AdvantageConfig> {
    let mut v: Vec<AdvantageConfig> = Estimator::ALL.into_iter().map(config).collect();
    for cold_start in [
        ColdStart::PerPrompt,
        ColdStart::Batch,
        ColdStart::HistoryWithBatch,
    ] {
        for update_order in [UpdateOrder::BeforeBatch, UpdateOrder::AfterBatch] {
            v.push(pgrpo(PGrpoOptions {
                cold_start,
                update_order,
                min_count: 20,
                offset_weight: 0.7,
            }));
        }
    }
    v
}

#[test]
fn a_permutation_of_rows_permutes_the_advantages() {
    for seed in 0..5 {
        let mut r = rng(50 + seed);
        let b = random_batch(&mut r, 25, 4, 4);
        // Two groups warm, two cold (min_count 20 in the P-GRPO configs).
        let mut h = warm_history(&mut r, HistoryKind::Cumulative, &b.keys[..2], 25);
        h.update(&b.keys[2], &rewards(&mut r, 5)).unwrap();
        let mut perm: Vec<usize> = (0..b.rewards.len()).collect();
        perm.shuffle(&mut r);
        let pb = b.permuted(&perm);
        for cfg in all_configs() {
            let a = cfg.compute(&b.view(), &h).unwrap();
            let pa = cfg.compute(&pb.view(), &h).unwrap();
            for (i, &p) in perm.iter().enumerate() {
                let what = format!("{:?} seed {seed} row {i}", cfg);
                assert_close(pa.values[i] as f64, a.values[p] as f64, 1e-5, 1.0, &what);
            }
            let (d, pd) = (&a.diagnostics, &pa.diagnostics);
            assert_eq!(d.num_prompts, pd.num_prompts);
            assert_eq!(d.frac_reward_zero_std, pd.frac_reward_zero_std);
            for (g, pg) in d.groups.iter().zip(&pd.groups) {
                assert_eq!((g.count, g.used_history), (pg.count, pg.used_history));
            }
        }
    }
}

#[test]
fn sparse_prompt_ids_give_the_same_advantages_as_dense_ones() {
    let mut r = rng(8);
    let b = random_batch(&mut r, 30, 5, 2);
    let h = warm_history(&mut r, HistoryKind::Cumulative, &b.keys, 30);
    let mut order: Vec<u32> = Vec::new();
    for &p in &b.prompt_ids {
        if !order.contains(&p) {
            order.push(p);
        }
    }
    let relabel = |f: &dyn Fn(usize) -> u32| Batch {
        prompt_ids: b
            .prompt_ids
            .iter()
            .map(|p| f(order.iter().position(|q| q == p).unwrap()))
            .collect(),
        ..b.clone()
    };
    let dense = relabel(&|k| k as u32);
    let sparse = relabel(&|k| {
        if k == 0 {
            u32::MAX
        } else {
            4_000_000_000 + 12_345 * k as u32
        }
    });
    for cfg in all_configs() {
        let a = cfg.compute(&dense.view(), &h).unwrap();
        let s = cfg.compute(&sparse.view(), &h).unwrap();
        assert_eq!(a.values, s.values, "{cfg:?}");
        assert_same_diagnostics(&a.diagnostics, &s.diagnostics);
    }
    // Errors name the prompt by its own id.
    let mut one = sparse.clone();
    let last = one.rewards.len() - 1;
    one.prompt_ids[last] = 4_123_456_789;
    assert!(matches!(
        config(Estimator::Grpo).compute(&one.view(), &h),
        Err(Error::TooFewCompletions {
            prompt: 4_123_456_789,
            count: 1,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Diagnostics

#[test]
fn diagnostics_report_groups_spread_and_missing_rows() {
    let mut b = hand_batch();
    let h = hand_history(HistoryKind::Cumulative);
    let adv = config(Estimator::PGrpo).compute(&b.view(), &h).unwrap();
    let d = &adv.diagnostics;
    assert_eq!(d.num_prompts, 3);
    assert_eq!(d.frac_reward_zero_std, 1.0 / 3.0);
    assert_eq!((d.num_missing, d.num_degenerate_prompts), (0, 0));
    // Group "formal": rows 0, 1, 3, 6, 8..12; group 42: rows 2, 4, 5, 7.
    let formal = [0, 1, 3, 6, 8, 9, 10, 11];
    let mean = |rows: &[usize], f: &dyn Fn(usize) -> f64| {
        rows.iter().map(|&i| f(i)).sum::<f64>() / rows.len() as f64
    };
    let g0 = &d.groups[0];
    assert_eq!(g0.count, 8);
    assert_close(
        g0.reward_mean,
        mean(&formal, &|i| b.rewards[i] as f64),
        1e-12,
        1.0,
        "g0 r",
    );
    assert_close(
        g0.advantage_mean,
        mean(&formal, &|i| P_GRPO[i]),
        1e-6,
        1.0,
        "g0 a",
    );
    assert_eq!(d.groups[1].count, 4);
    assert_close(d.groups[1].reward_mean, 0.5, 1e-12, 1.0, "g1 r");
    let s = h.stats(&"formal".into()).unwrap();
    assert_close(g0.history_mean, s.mean, 1e-15, 1.0, "history mean");
    assert_close(g0.history_std, s.sample_std, 1e-7, 1.0, "history std");
    // R.mean(), R.std(ddof=1) with R as in the NumPy snippet above.
    assert_close(d.reward_mean, 0.4333333373069763, 1e-12, 1.0, "reward mean");
    assert_close(d.reward_std, 0.6896419791820186, 1e-12, 1.0, "reward std");

    // Two missing rows (one in a prompt without spread), a group absent from the batch.
    b.rewards[1] = f32::NAN;
    b.rewards[9] = f32::INFINITY;
    b.keys.push("absent".into());
    let cfg = AdvantageConfig {
        non_finite: NonFinitePolicy::Missing,
        ..config(Estimator::Grpo)
    };
    let d = cfg.compute(&b.view(), &h).unwrap().diagnostics;
    assert_eq!((d.num_missing, d.num_degenerate_prompts), (2, 0));
    assert_eq!(d.groups[0].count, 6);
    assert_eq!(d.groups[2].count, 0);
    assert!(d.groups[2].reward_mean.is_nan() && d.groups[2].advantage_mean.is_nan());
    assert_eq!(d.frac_reward_zero_std, 1.0 / 3.0);
    let finite: Vec<f64> = b
        .rewards
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| x as f64)
        .collect();
    assert_close(
        d.reward_mean,
        finite.iter().sum::<f64>() / 10.0,
        1e-12,
        1.0,
        "mean",
    );
}

#[test]
fn frac_reward_zero_std_counts_prompts_without_spread() {
    let keys: Vec<GroupKey> = vec![0u32.into()];
    let b = Batch {
        rewards: vec![1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 5.0, 5.0],
        prompt_ids: vec![0, 0, 1, 1, 2, 2, 3, 3],
        group_ids: vec![0; 8],
        keys,
    };
    let d = config(Estimator::Grpo)
        .compute(&b.view(), &RewardHistory::default())
        .unwrap()
        .diagnostics;
    assert_eq!(d.frac_reward_zero_std, 0.75);
    assert_eq!(d.num_prompts, 4);
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn non_finite_reward_is_an_error_naming_the_row() {
    let mut b = hand_batch();
    for (row, bad) in [(5, f32::NAN), (0, f32::INFINITY), (11, f32::NEG_INFINITY)] {
        b.rewards = hand_batch().rewards;
        b.rewards[row] = bad;
        for cfg in all_configs() {
            let mut h = hand_history(HistoryKind::Cumulative);
            let before = h.clone();
            let e = cfg.compute_and_update(&b.view(), &mut h).unwrap_err();
            assert!(
                matches!(e, Error::NonFiniteReward { row: r, .. } if r == row),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("row {row}")));
            assert_eq!(h, before, "a failed update changes nothing");
        }
    }
}

#[test]
fn missing_rewards_get_zero_and_are_left_out_of_every_statistic() {
    for seed in 0..6 {
        let mut r = rng(70 + seed);
        let b = random_batch(&mut r, 20, 6, 3);
        let n = b.rewards.len();
        let mut holed = b.clone();
        let mut missing = vec![false; n];
        for (i, m) in missing.iter_mut().enumerate() {
            // At most one hole per prompt of 6: every prompt keeps its spread.
            if r.random_bool(0.1)
                && !(0..i).any(|j| {
                    holed.prompt_ids[j] == b.prompt_ids[i] && !holed.rewards[j].is_finite()
                })
            {
                *m = true;
                holed.rewards[i] = if r.random_bool(0.5) {
                    f32::NAN
                } else {
                    f32::INFINITY
                };
            }
        }
        let kept: Vec<usize> = (0..n).filter(|&i| !missing[i]).collect();
        let filtered = b.permuted(&kept);
        let warm = warm_history(
            &mut r,
            HistoryKind::Exponential { half_life: 20.0 },
            &b.keys[..2],
            10,
        );
        for mut cfg in all_configs() {
            cfg.non_finite = NonFinitePolicy::Missing;
            let (mut h1, mut h2) = (warm.clone(), warm.clone());
            let a = cfg.compute_and_update(&holed.view(), &mut h1).unwrap();
            let f = cfg.compute_and_update(&filtered.view(), &mut h2).unwrap();
            for (i, _) in missing.iter().enumerate().filter(|m| *m.1) {
                assert_eq!(a.values[i], 0.0, "missing row {i}");
            }
            let got: Vec<f32> = kept.iter().map(|&i| a.values[i]).collect();
            let want: Vec<f64> = f.values.iter().map(|&v| v as f64).collect();
            assert_values(&got, &want, 1e-5, &format!("{cfg:?} seed {seed}"));
            assert_eq!(h1, h2, "the history update skips missing rows");
            assert_eq!(
                a.diagnostics.num_missing,
                missing.iter().filter(|&&m| m).count()
            );
            for (g, fg) in a.diagnostics.groups.iter().zip(&f.diagnostics.groups) {
                assert_eq!((g.count, g.used_history), (fg.count, fg.used_history));
                if g.count > 0 {
                    assert_close(g.reward_mean, fg.reward_mean, 1e-12, 1.0, "group mean");
                }
            }
            assert_close(
                a.diagnostics.reward_mean,
                f.diagnostics.reward_mean,
                1e-12,
                1.0,
                "mean",
            );
            assert_close(
                a.diagnostics.reward_std,
                f.diagnostics.reward_std,
                1e-12,
                1.0,
                "std",
            );
        }
    }
}

#[test]
fn missing_rewards_that_leave_a_prompt_without_contrast_give_zero() {
    let keys: Vec<GroupKey> = vec!["g".into()];
    let b = Batch {
        rewards: vec![1.0, f32::NAN, 0.0, 2.0, f32::NAN, f32::NAN],
        prompt_ids: vec![5, 5, 6, 6, 7, 7],
        group_ids: vec![0; 6],
        keys,
    };
    let h = RewardHistory::default();
    for estimator in [Estimator::Grpo, Estimator::Rloo, Estimator::PGrpo] {
        let cfg = AdvantageConfig {
            estimator,
            non_finite: NonFinitePolicy::Missing,
            ..Default::default()
        };
        let adv = cfg.compute(&b.view(), &h).unwrap();
        assert!(adv.values[2] < 0.0 && adv.values[3] > 0.0, "{estimator:?}");
        for i in [0, 1, 4, 5] {
            assert_eq!(adv.values[i], 0.0, "{estimator:?} row {i}");
        }
        assert_eq!(adv.diagnostics.num_missing, 3);
        // Prompt 5 (one usable row) for every estimator; prompt 7 (none) is also "left
        // without contrast by missing rewards" for GRPO and RLOO.
        let degenerate = adv.diagnostics.num_degenerate_prompts;
        match estimator {
            Estimator::PGrpo => assert!(degenerate >= 1),
            _ => assert_eq!(degenerate, 2, "{estimator:?}"),
        }
        let only_5 = Batch {
            rewards: b.rewards[..4].to_vec(),
            prompt_ids: b.prompt_ids[..4].to_vec(),
            group_ids: b.group_ids[..4].to_vec(),
            keys: b.keys.clone(),
        };
        let adv = cfg.compute(&only_5.view(), &h).unwrap();
        assert_eq!(adv.diagnostics.num_degenerate_prompts, 1, "{estimator:?}");
        assert_eq!(&adv.values[..2], &[0.0, 0.0]);
    }
    // With the row removed instead, prompt 5 has one completion: an error for GRPO.
    let cut = Batch {
        rewards: vec![1.0, 0.0, 2.0],
        prompt_ids: vec![5, 6, 6],
        group_ids: vec![0; 3],
        keys: b.keys.clone(),
    };
    assert!(matches!(
        config(Estimator::Grpo).compute(&cut.view(), &h),
        Err(Error::TooFewCompletions {
            prompt: 5,
            count: 1,
            estimator: "grpo"
        })
    ));
}

#[test]
fn length_mismatch_empty_batch_and_bad_group_ids_are_errors() {
    let b = hand_batch();
    let h = RewardHistory::default();
    for cfg in all_configs() {
        let mut v = b.view();
        v.prompt_ids = &b.prompt_ids[1..];
        assert!(matches!(
            cfg.compute(&v, &h),
            Err(Error::LengthMismatch {
                what: "prompt_ids",
                got: 11,
                expected: 12,
                ..
            })
        ));
        let mut v = b.view();
        let longer = [b.group_ids.clone(), vec![0]].concat();
        v.group_ids = &longer;
        assert!(matches!(
            cfg.compute(&v, &h),
            Err(Error::LengthMismatch {
                what: "group_ids",
                got: 13,
                ..
            })
        ));
        let empty = RolloutRewards {
            rewards: &[],
            prompt_ids: &[],
            group_ids: &[],
            group_keys: &b.keys,
        };
        assert!(matches!(cfg.compute(&empty, &h), Err(Error::Empty(_))));
        let mut bad = b.clone();
        bad.group_ids[4] = 2;
        assert!(matches!(
            cfg.compute(&bad.view(), &h),
            Err(Error::IndexOutOfRange {
                what: "group_ids",
                row: 4,
                value: 2,
                bound: 2,
                ..
            })
        ));
        let mut v = b.view();
        v.group_keys = &[];
        assert!(matches!(
            cfg.compute(&v, &h),
            Err(Error::IndexOutOfRange { row: 0, .. })
        ));
    }
}

#[test]
fn one_completion_per_prompt() {
    // Prompt 77 (row 12) has a single completion.
    let mut b = hand_batch();
    b.rewards.push(0.9);
    b.prompt_ids.push(77);
    b.group_ids.push(0);
    let warm = hand_history(HistoryKind::Cumulative);
    let cold = RewardHistory::default();
    for (estimator, name) in [(Estimator::Grpo, "grpo"), (Estimator::Rloo, "rloo")] {
        assert!(matches!(
            config(estimator).compute(&b.view(), &warm),
            Err(Error::TooFewCompletions { prompt: 77, count: 1, estimator: e }) if e == name
        ));
    }
    for estimator in [Estimator::DrGrpo, Estimator::GrpoBatchStd] {
        let adv = config(estimator).compute(&b.view(), &cold).unwrap();
        assert_eq!(adv.values[12], 0.0, "{estimator:?}");
    }
    assert!(config(Estimator::BatchZScore)
        .compute(&b.view(), &cold)
        .is_ok());
    // P-GRPO with a warm history needs no per-prompt spread.
    let adv = config(Estimator::PGrpo).compute(&b.view(), &warm).unwrap();
    let s = warm.stats(&"formal".into()).unwrap();
    assert_close(
        adv.values[12] as f64,
        (0.9f32 as f64 - s.mean) / (s.sample_std + 1e-4f32 as f64),
        1e-6,
        1.0,
        "warm",
    );
    // Cold, it falls back: per prompt fails like GRPO, the batch fallback works.
    assert!(matches!(
        config(Estimator::PGrpo).compute(&b.view(), &cold),
        Err(Error::TooFewCompletions {
            prompt: 77,
            estimator: "p_grpo",
            ..
        })
    ));
    let batch = pgrpo(PGrpoOptions {
        cold_start: ColdStart::Batch,
        ..Default::default()
    });
    assert!(batch.compute(&b.view(), &cold).is_ok());
    // A whole batch of single completions (G = 1) under warm P-GRPO.
    let single = Batch {
        prompt_ids: (0..12).collect(),
        ..hand_batch()
    };
    let adv = config(Estimator::PGrpo)
        .compute(&single.view(), &warm)
        .unwrap();
    assert_values(&adv.values, &P_GRPO, 2e-6, "G = 1");
}

/// G = 1 under warm P-GRPO: every prompt has one completion and none falls back. The check
/// "does this prompt fall back?" must not scan the batch once per prompt (it did: 40K rows took
/// a second, 200K would take half a minute); linear time is a few milliseconds.
#[test]
fn single_completion_prompts_under_warm_pgrpo_take_linear_time() {
    let n = 200_000;
    let keys: Vec<GroupKey> = vec!["a".into(), "b".into()];
    let rewards: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let prompt_ids: Vec<u32> = (0..n as u32).collect();
    let group_ids: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
    let mut h = RewardHistory::default();
    h.update("a", &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
        .unwrap();
    h.update("b", &[1.0; 8]).unwrap();
    let b = RolloutRewards {
        rewards: &rewards,
        prompt_ids: &prompt_ids,
        group_ids: &group_ids,
        group_keys: &keys,
    };
    let t = std::time::Instant::now();
    let adv = config(Estimator::PGrpo).compute(&b, &h).unwrap();
    let took = t.elapsed();
    assert!(took.as_secs_f64() < 3.0, "{took:?} for {n} rows");
    assert_eq!(adv.diagnostics.num_prompts, n);
    assert!(adv.diagnostics.groups.iter().all(|g| g.used_history));
}

#[test]
fn invalid_config_values_are_typed_errors() {
    let b = hand_batch();
    let h = hand_history(HistoryKind::Cumulative);
    let base = AdvantageConfig::default();
    let with_l = |l: f32| AdvantageConfig {
        pgrpo: PGrpoOptions {
            offset_weight: l,
            ..Default::default()
        },
        ..base
    };
    let cases = [
        ("eps", AdvantageConfig { eps: -1e-4, ..base }),
        (
            "eps",
            AdvantageConfig {
                eps: f32::NAN,
                ..base
            },
        ),
        (
            "eps",
            AdvantageConfig {
                eps: f32::INFINITY,
                ..base
            },
        ),
        (
            "std_floor",
            AdvantageConfig {
                std_floor: -1.0,
                ..base
            },
        ),
        (
            "std_floor",
            AdvantageConfig {
                std_floor: f32::NAN,
                ..base
            },
        ),
        ("pgrpo.offset_weight", with_l(2.0)),
        ("pgrpo.offset_weight", with_l(-0.1)),
        ("pgrpo.offset_weight", with_l(f32::NAN)),
        (
            "eps",
            AdvantageConfig {
                eps: 0.0,
                std_floor: 0.0,
                ..base
            },
        ),
    ];
    for (field, cfg) in cases {
        assert!(
            matches!(cfg.validate(), Err(Error::InvalidConfig { field: f, .. }) if f == field),
            "{cfg:?}"
        );
        assert!(matches!(
            cfg.compute(&b.view(), &h),
            Err(Error::InvalidConfig { field: f, .. }) if f == field
        ));
    }
    // eps = 0 is fine where no history std is divided by, and for P-GRPO with a floor.
    for cfg in [
        AdvantageConfig {
            eps: 0.0,
            ..config(Estimator::Grpo)
        },
        AdvantageConfig {
            eps: 0.0,
            std_floor: 1e-3,
            ..base
        },
    ] {
        cfg.validate().unwrap();
    }
    assert!(matches!(
        "median".parse::<Estimator>(),
        Err(Error::InvalidConfig {
            field: "estimator",
            ..
        })
    ));
    for e in Estimator::ALL {
        assert_eq!(e.name().parse::<Estimator>().unwrap(), e);
        assert_eq!(e.name().replace('_', "-").parse::<Estimator>().unwrap(), e);
    }
    // Unknown fields in a serialized config.
    assert!(serde_json::from_str::<AdvantageConfig>(r#"{"epsilon": 0.1}"#).is_err());
    assert!(serde_json::from_str::<AdvantageConfig>(r#"{"pgrpo": {"min_cnt": 1}}"#).is_err());
    let cfg: AdvantageConfig = serde_json::from_str(r#"{"estimator": "rloo"}"#).unwrap();
    assert_eq!(cfg, config(Estimator::Rloo));
}

/// No estimator returns a non-finite advantage for finite rewards under a valid config,
/// including `eps = 0` (allowed for every estimator but P-GRPO) and constant batches.
#[test]
fn advantages_are_always_finite() {
    let keys: Vec<GroupKey> = vec!["a".into(), "b".into()];
    let constant = Batch {
        rewards: vec![0.25; 8],
        prompt_ids: vec![0, 0, 0, 0, 1, 1, 1, 1],
        group_ids: vec![0, 0, 0, 0, 1, 1, 1, 1],
        keys: keys.clone(),
    };
    let mut r = rng(12);
    let batches = [constant, random_batch(&mut r, 6, 3, 2), hand_batch()];
    let mut flat = RewardHistory::default();
    flat.update("a", &[1.0; 10]).unwrap();
    flat.update("b", &[-1.0; 10]).unwrap();
    for b in &batches {
        for h in [
            RewardHistory::default(),
            flat.clone(),
            hand_history(HistoryKind::Cumulative),
        ] {
            for mut cfg in all_configs() {
                for variance in [Variance::Sample, Variance::Population] {
                    for (eps, floor) in [(0.0, 0.0), (0.0, 1e-6), (1e-8, 0.0)] {
                        cfg.variance = variance;
                        cfg.eps = eps;
                        cfg.std_floor = floor;
                        if cfg.validate().is_err() {
                            continue;
                        }
                        let adv = cfg.compute(&b.view(), &h).unwrap();
                        assert!(
                            adv.values.iter().all(|v| v.is_finite()),
                            "{cfg:?} on {:?}: {:?}",
                            b.rewards,
                            adv.values
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors

#[test]
fn compute_tensor_equals_compute() {
    let dev = Device::Cpu;
    let mut r = rng(31);
    let b = random_batch(&mut r, 10, 4, 3);
    let h = warm_history(&mut r, HistoryKind::Cumulative, &b.keys, 20);
    let n = b.rewards.len();
    let p = Tensor::from_slice(&b.prompt_ids, n, &dev).unwrap();
    let g = Tensor::from_slice(&b.group_ids, n, &dev).unwrap();
    for cfg in all_configs() {
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let rt = Tensor::from_slice(&b.rewards, n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (t, adv) = cfg.compute_tensor(&rt, &p, &g, &b.keys, &h).unwrap();
            assert_eq!(t.dims(), &[n]);
            assert_eq!(t.dtype(), DType::F32);
            let as_f32 = rt.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let want = cfg
                .compute(
                    &RolloutRewards {
                        rewards: &as_f32,
                        ..b.view()
                    },
                    &h,
                )
                .unwrap();
            assert_eq!(t.to_vec1::<f32>().unwrap(), want.values);
            assert_eq!(adv.values, want.values);
            assert_same_diagnostics(&adv.diagnostics, &want.diagnostics);
        }
        // (N, 1) rewards are flattened.
        let col = Tensor::from_slice(&b.rewards, (n, 1), &dev).unwrap();
        let (t, _) = cfg.compute_tensor(&col, &p, &g, &b.keys, &h).unwrap();
        assert_eq!(
            t.to_vec1::<f32>().unwrap(),
            cfg.compute(&b.view(), &h).unwrap().values
        );
    }
    // Wrong dtypes and lengths are errors, not panics.
    let cfg = config(Estimator::PGrpo);
    let rt = Tensor::from_slice(&b.rewards, n, &dev).unwrap();
    let pf = p.to_dtype(DType::F32).unwrap();
    assert!(matches!(
        cfg.compute_tensor(&rt, &pf, &g, &b.keys, &h),
        Err(Error::Candle(_))
    ));
    let short = g.narrow(0, 0, n - 1).unwrap();
    assert!(matches!(
        cfg.compute_tensor(&rt, &p, &short, &b.keys, &h),
        Err(Error::LengthMismatch {
            what: "group_ids",
            ..
        })
    ));
    let nan = Tensor::from_slice(&[f32::NAN; 4], 4, &dev).unwrap();
    let p4 = Tensor::from_slice(&[0u32, 0, 1, 1], 4, &dev).unwrap();
    let g4 = Tensor::from_slice(&[0u32; 4], 4, &dev).unwrap();
    assert!(matches!(
        cfg.compute_tensor(&nan, &p4, &g4, &b.keys, &h),
        Err(Error::NonFiniteReward { row: 0, .. })
    ));
}
