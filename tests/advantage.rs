//! Tests of `pgrpo::advantage`: golden values per estimator (from NumPy), the P-GRPO identity,
//! update order and cold start, the offset weight, row order and sparse ids, diagnostics, bad
//! input (always a typed error, never a panic) and the tensor entry point.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, rewards, rng};
use pgrpo::advantage::{
    part_key, AdvantageDiagnostics, AdvantageEstimator, AnnealOptions, ColdStart, Level,
    LevelOptions, NonFinitePolicy, PGrpoOptions, RewardAggregation, RewardParts, UpdateOrder,
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
    // The new estimators, same batch and history (NumPy 2.4; `Ahat` = GRPO above, prompts in
    // order of first appearance 10, 7, 3, `g[q]` the group of prompt q):
    //
    // mq, vq, nq = per-prompt mean, sample variance, count; mp, sp, npp = per-group history
    // mean, sample std, count
    // anneal = Ahat + n0/(n0 + npp[G]) * (mq[P] - mp[G]) / (sp[G] + eps)          # n0 = 16
    // z2 = [nq[q] * ((mq[q] - mp[g[q]]) / (sp[g[q]] + eps))**2 for q in (10, 7, 3)]
    // K, S = 3, sum(z2)                       # S = 2.9777, so c = (K-2)/S = 0.33583
    // js = Ahat + c * (mq[P] - mp[G]) / (sp[G] + eps)
    // tau2 = max(0, S/K - 1)                  # = 0 here
    // r = tau2 + nq[P]/npp[G]; w = r/(r+1)
    // blend = (centred + (1-w)*(mq[P] - mp[G])) / (sqrt(w*vq[P] + (1-w)*sp[G]**2) + eps)
    // levels_group_batch = (R - mp[G]) / (R.std(ddof=1) + eps)
    pub const ANNEALED_OFFSET_N0_16: [f64; 12] = [1.0600563786412536, -1.1303539565312273, -0.17755858958464138, -0.5827513727381071, 1.0470862899737727, -1.4022034691430556, 0.5124537948481334, -0.17755858958464138, -0.5037992849333529, -0.5037992849333529, -0.5037992849333529, -0.5037992849333529];
    pub const JAMES_STEIN: [f64; 12] = [1.0760236589337289, -1.114386676238752, -0.08944415724407886, -0.5667840924456317, 1.1352007223143352, -1.3140890368024931, 0.5284210751406088, -0.08944415724407886, -0.2749349446492526, -0.2749349446492526, -0.2749349446492526, -0.2749349446492526];
    pub const BLEND: [f64; 12] = [1.4832564049651333, -1.548216538829702, -0.1852259189358143, -0.7903483028809931, 0.9261295946790715, -1.2965814325507001, 0.7253881690164246, -0.1852259189358143, -0.6918574102068457, -0.6918574102068457, -0.6918574102068457, -0.6918574102068457];
    pub const LEVELS_GROUP_BATCH: [f64; 12] = [0.703161493412306, -0.7466560183325732, -0.5436815669043297, -0.3842016403963534, 1.6310447007129891, -2.7184078345216487, 0.3407071154760862, -0.5436815669043297, -0.3117107475259379, -0.3117107475259379, -0.3117107475259379, -0.3117107475259379];
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
        (
            "annealed_offset n0=16",
            AdvantageConfig {
                anneal: AnnealOptions { n0: 16.0 },
                ..config(Estimator::AnnealedOffset)
            },
            cum.clone(),
            &ANNEALED_OFFSET_N0_16,
        ),
        (
            "james_stein",
            config(Estimator::JamesStein),
            cum.clone(),
            &JAMES_STEIN,
        ),
        ("blend", config(Estimator::Blend), cum.clone(), &BLEND),
        (
            "levels group/batch",
            AdvantageConfig {
                levels: LevelOptions {
                    mean: Level::Group,
                    std: Level::Batch,
                },
                ..config(Estimator::Levels)
            },
            cum.clone(),
            &LEVELS_GROUP_BATCH,
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
    // The population std of one reward is 0: defined, but a history without spread is
    // degenerate, so cold too (it used to divide by eps).
    let pop = AdvantageConfig {
        variance: Variance::Population,
        eps: 0.5,
        ..cfg
    };
    let adv = pop.compute(&b.view(), &h).unwrap();
    assert!(adv.diagnostics.groups.iter().all(|g| !g.used_history));
    let (mu_q, sd_q) = prompt_stats(&b, Variance::Population);
    assert_eq!(adv.values[0], ((1.0 - mu_q[0]) / (sd_q[0] + 0.5)) as f32);
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
    // Dr. GRPO and `grpo_batch_std` used to give such a prompt 0 silently (issue 12, defect
    // 7): their only signal is the contrast within the prompt.
    for estimator in [
        Estimator::Grpo,
        Estimator::Rloo,
        Estimator::DrGrpo,
        Estimator::GrpoBatchStd,
        Estimator::AnnealedOffset,
        Estimator::JamesStein,
        Estimator::Blend,
    ] {
        assert!(
            matches!(
                config(estimator).compute(&b.view(), &warm),
                Err(Error::TooFewCompletions { prompt: 77, count: 1, estimator: e }) if e == estimator.name()
            ),
            "{estimator:?}"
        );
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
    h.update("b", &[1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
        .unwrap();
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

// ---------------------------------------------------------------------------------------------
// The degenerate history (issue 12, defect 2)

/// A history whose rewards are all equal has `σ_p = 0`; it used to be "usable", so the first
/// reward unlike the others got `|A| ≈ 1/eps = 10⁴`. It is cold now: GRPO's advantages, and
/// the diagnostics say the history was not used. Fails on the old code (`|A| = 10⁴`).
#[test]
fn a_degenerate_history_is_cold() {
    let keys: Vec<GroupKey> = vec!["sparse".into()];
    let b = Batch {
        rewards: vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        prompt_ids: vec![0, 0, 0, 0, 1, 1, 1, 1],
        group_ids: vec![0; 8],
        keys,
    };
    let grpo = config(Estimator::Grpo)
        .compute(&b.view(), &RewardHistory::default())
        .unwrap();
    // (1 − 0.25) / (0.5 + 1e-4): a sparse minority's first success.
    assert_close(
        grpo.values[0] as f64,
        0.75 / (0.5 + 1e-4),
        1e-6,
        1.0,
        "grpo",
    );
    for kind in [
        HistoryKind::Cumulative,
        HistoryKind::Exponential { half_life: 4.0 },
        HistoryKind::Window { size: 16 },
    ] {
        // 0/1 rewards that were all 0 so far; and all 1 (σ = 0 ≤ 1e-6·|μ|).
        for value in [0.0f32, 1.0] {
            let mut h = RewardHistory::new(kind).unwrap();
            h.update("sparse", &[value; 20]).unwrap();
            for estimator in Estimator::ALL.into_iter().filter(|e| e.is_group_aware()) {
                let cfg = AdvantageConfig {
                    levels: LevelOptions {
                        mean: Level::Group,
                        std: Level::Group,
                    },
                    ..config(estimator)
                };
                let adv = cfg.compute(&b.view(), &h).unwrap();
                let what = format!("{estimator:?} {kind:?} history of {value}");
                assert!(
                    adv.values.iter().all(|a| a.abs() < 10.0),
                    "{what}: {:?}",
                    adv.values
                );
                assert!(!adv.diagnostics.groups[0].used_history, "{what}");
                assert_eq!(adv.values, grpo.values, "{what}: falls back to GRPO");
            }
        }
    }
    // Spread below f32 rounding of the mean is no spread either; a real spread is used.
    let mut h = RewardHistory::default();
    h.update(
        "sparse",
        &[
            1000.0, 1000.0001, 1000.0, 1000.0001, 1000.0, 1000.0, 1000.0, 1000.0,
        ],
    )
    .unwrap();
    let adv = config(Estimator::PGrpo).compute(&b.view(), &h).unwrap();
    assert!(!adv.diagnostics.groups[0].used_history);
    let mut h = RewardHistory::default();
    h.update("sparse", &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
        .unwrap();
    let adv = config(Estimator::PGrpo).compute(&b.view(), &h).unwrap();
    assert!(adv.diagnostics.groups[0].used_history);
    // μ_p = 0.125, σ_p = √(0.875/7) = 0.35355: (1 − 0.125) / 0.35365.
    assert_close(
        adv.values[0] as f64,
        0.875 / (0.125f64.sqrt() + 1e-4),
        1e-6,
        1.0,
        "warm",
    );
}

/// One degenerate group among warm ones falls back alone (the fused P-GRPO path declines the
/// batch and the general path decides).
#[test]
fn a_degenerate_group_among_warm_ones_falls_back_alone() {
    let mut r = rng(31);
    let b = random_batch(&mut r, 64, 4, 3);
    let cfg = config(Estimator::PGrpo);
    let mut h = RewardHistory::default();
    h.update(b.keys[0].clone(), &[2.0; 40]).unwrap();
    h.update(b.keys[1].clone(), &rewards(&mut r, 30)).unwrap();
    h.update(b.keys[2].clone(), &rewards(&mut r, 30)).unwrap();
    let adv = cfg.compute(&b.view(), &h).unwrap();
    let used: Vec<bool> = adv
        .diagnostics
        .groups
        .iter()
        .map(|g| g.used_history)
        .collect();
    assert_eq!(used, [false, true, true]);
    let grpo = config(Estimator::Grpo).compute(&b.view(), &h).unwrap();
    let pg = |i: usize| {
        let s = h.stats(&b.keys[b.group_ids[i] as usize]).unwrap();
        (b.rewards[i] as f64 - s.mean) / (s.sample_std + 1e-4f32 as f64)
    };
    for i in 0..b.rewards.len() {
        if b.group_ids[i] == 0 {
            assert_eq!(adv.values[i], grpo.values[i], "row {i}");
        } else {
            assert_close(adv.values[i] as f64, pg(i), 1e-6, 1.0, &format!("row {i}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The new estimators, by hand

/// Four prompts of two completions, all in group `a`, whose history of nine rewards
/// (−1 ×4, 1 ×4, 0) has `n_p = 9`, `μ_p = 0`, `σ_p = 1`. `eps = 0` and a tiny `std_floor`
/// keep the arithmetic exact:
///
/// | prompt | rewards | μ_q | σ_q² | Â (GRPO) | z_q² = n_q (μ_q − μ_p)² / σ_p² |
/// |---|---|---|---|---|---|
/// | 0 | 1, 3 | 2 | 2 | −1/√2, +1/√2 | 8 |
/// | 1 | 0, 0 | 0 | 0 | 0, 0 | 0 |
/// | 2 | −1, 1 | 0 | 2 | −1/√2, +1/√2 | 0 |
/// | 3 | 2, 2 | 2 | 0 | 0, 0 | 8 |
fn four_prompts() -> (Batch, RewardHistory, AdvantageConfig) {
    let b = Batch {
        rewards: vec![1.0, 3.0, 0.0, 0.0, -1.0, 1.0, 2.0, 2.0],
        prompt_ids: vec![0, 0, 1, 1, 2, 2, 3, 3],
        group_ids: vec![0; 8],
        keys: vec!["a".into()],
    };
    let mut h = RewardHistory::default();
    h.update("a", &[-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
        .unwrap();
    let s = h.stats(&"a".into()).unwrap();
    assert_eq!((s.n, s.mean, s.sample_std), (9, 0.0, 1.0));
    let cfg = AdvantageConfig {
        eps: 0.0,
        std_floor: 1e-9,
        ..Default::default()
    };
    (b, h, cfg)
}

const R2: f64 = std::f64::consts::FRAC_1_SQRT_2;

#[test]
fn annealed_offset_by_hand() {
    let (b, h, cfg) = four_prompts();
    // n0 = 9: λ_p = 9 / (9 + 9) = 0.5, so A = Â + 0.5 · (μ_q − 0) / 1.
    let cfg = AdvantageConfig {
        estimator: Estimator::AnnealedOffset,
        anneal: AnnealOptions { n0: 9.0 },
        ..cfg
    };
    let adv = cfg.compute(&b.view(), &h).unwrap();
    let want = [-R2 + 1.0, R2 + 1.0, 0.0, 0.0, -R2, R2, 1.0, 1.0];
    assert_values(&adv.values, &want, 1e-6, "n0 = 9");
    // n0 = 0 is GRPO, bit for bit.
    let grpo = config(Estimator::Grpo);
    let zero = AdvantageConfig {
        anneal: AnnealOptions { n0: 0.0 },
        ..cfg
    };
    assert_eq!(
        zero.compute(&b.view(), &h).unwrap().values,
        AdvantageConfig { eps: 0.0, ..grpo }
            .compute(&b.view(), &h)
            .unwrap()
            .values
    );
    // A huge n0 is GRPO's contrast plus P-GRPO's whole offset: Â + μ_q.
    let full = AdvantageConfig {
        anneal: AnnealOptions { n0: 1e12 },
        ..cfg
    };
    let want = [-R2 + 2.0, R2 + 2.0, 0.0, 0.0, -R2, R2, 2.0, 2.0];
    assert_values(
        &full.compute(&b.view(), &h).unwrap().values,
        &want,
        1e-6,
        "n0 = 1e12",
    );
}

#[test]
fn james_stein_by_hand() {
    let (b, h, cfg) = four_prompts();
    // K = 4 warm prompts, Σ z_q² = 16: c = (4 − 2) / 16 = 0.125, A = Â + 0.125 · μ_q.
    let cfg = AdvantageConfig {
        estimator: Estimator::JamesStein,
        ..cfg
    };
    let adv = cfg.compute(&b.view(), &h).unwrap();
    let want = [-R2 + 0.25, R2 + 0.25, 0.0, 0.0, -R2, R2, 0.25, 0.25];
    assert_values(&adv.values, &want, 1e-6, "c = 0.125");
    // With two prompts (K ≤ 2) there is no shrinkage estimate: c = 1, the full offset.
    let two = Batch {
        rewards: b.rewards[..4].to_vec(),
        prompt_ids: b.prompt_ids[..4].to_vec(),
        group_ids: b.group_ids[..4].to_vec(),
        keys: b.keys.clone(),
    };
    let adv = cfg.compute(&two.view(), &h).unwrap();
    assert_values(&adv.values, &[-R2 + 2.0, R2 + 2.0, 0.0, 0.0], 1e-6, "K = 2");
    // Prompts that scatter widely around their group (Σ z² ≫ K) shrink little: near GRPO.
    let wide = Batch {
        rewards: vec![20.0, 21.0, -20.0, -21.0, 30.0, 31.0, -30.0, -31.0],
        ..b.clone()
    };
    let adv = cfg.compute(&wide.view(), &h).unwrap();
    let grpo = AdvantageConfig {
        estimator: Estimator::Grpo,
        ..cfg
    }
    .compute(&wide.view(), &h)
    .unwrap();
    // Σ z² = 2·(20.5² + 20.5² + 30.5² + 30.5²) = 5402: c = 2/5402, offset ≤ 0.012.
    for (a, g) in adv.values.iter().zip(&grpo.values) {
        assert!((a - g).abs() < 0.012, "{a} vs {g}");
    }
}

#[test]
fn blend_by_hand() {
    let (b, h, cfg) = four_prompts();
    // τ² = max(0, Σ z²/K − 1) = 16/4 − 1 = 3; r = τ² + n_q/n_p = 3 + 2/9 = 29/9;
    // w = r/(r + 1) = 29/38 on the prompt, 9/38 on the group.
    // Prompt 0: b = (29/38)·2 = 1.5263, d² = (29/38)·2 + (9/38)·1 = 67/38, d = 1.32784:
    //   A = (1 − 1.5263)/1.32784 = −0.39637 and (3 − 1.5263)/1.32784 = 1.10984.
    // Prompt 1 (0, 0): numerator (9/38)·(0 − 0) = 0.
    // Prompt 2 (−1, 1): b = 0, d² = 67/38: A = ∓1/1.32784 = ∓0.75310.
    // Prompt 3 (2, 2): numerator 0 + (9/38)·2 = 0.47368, d² = (9/38)·1, d = 0.48666:
    //   A = 0.97333.
    let cfg = AdvantageConfig {
        estimator: Estimator::Blend,
        ..cfg
    };
    let adv = cfg.compute(&b.view(), &h).unwrap();
    let w: f64 = 29.0 / 38.0;
    let d = (w * 2.0 + (1.0 - w)).sqrt();
    let d3 = (1.0f64 - w).sqrt();
    let want = [
        (1.0 - 2.0 * w) / d,
        (3.0 - 2.0 * w) / d,
        0.0,
        0.0,
        -1.0 / d,
        1.0 / d,
        2.0 * (1.0 - w) / d3,
        2.0 * (1.0 - w) / d3,
    ];
    assert_values(&adv.values, &want, 1e-6, "blend");
    assert_values(
        &adv.values,
        &[
            -0.39637, 1.10984, 0.0, 0.0, -0.75310, 0.75310, 0.97333, 0.97333,
        ],
        2e-5,
        "blend, rounded",
    );
}

#[test]
fn levels_by_hand_and_equal_to_the_estimators_they_name() {
    let (b, h, cfg) = four_prompts();
    let levels = |mean, std| AdvantageConfig {
        estimator: Estimator::Levels,
        levels: LevelOptions { mean, std },
        ..cfg
    };
    // group/batch: (R − 0) / σ_B, σ_B² = Σ(R − 1)²/7 = 12/7, σ_B = 1.30931.
    let adv = levels(Level::Group, Level::Batch)
        .compute(&b.view(), &h)
        .unwrap();
    let sb = (12.0f64 / 7.0).sqrt();
    let want: Vec<f64> = b.rewards.iter().map(|&r| r as f64 / sb).collect();
    assert_values(&adv.values, &want, 1e-6, "group/batch");
    // prompt/group: (R − μ_q) / σ_p = ∓1 on prompts 0 and 2.
    let adv = levels(Level::Prompt, Level::Group)
        .compute(&b.view(), &h)
        .unwrap();
    assert_values(
        &adv.values,
        &[-1.0, 1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0],
        1e-6,
        "prompt/group",
    );
    // Bit for bit: prompt/prompt = GRPO, prompt/batch = grpo_batch_std, batch/batch =
    // batch_z_score; to rounding: group/group = P-GRPO, prompt/group = P-GRPO with λ = 0.
    let mut r = rng(12);
    let rb = random_batch(&mut r, 30, 4, 3);
    let rh = warm_history(&mut r, HistoryKind::Cumulative, &rb.keys, 20);
    let same = |a: AdvantageConfig, e: AdvantageConfig| {
        let x = a.compute(&rb.view(), &rh).unwrap().values;
        let y = e.compute(&rb.view(), &rh).unwrap().values;
        (x, y)
    };
    let lv = |m, s| AdvantageConfig {
        estimator: Estimator::Levels,
        levels: LevelOptions { mean: m, std: s },
        ..Default::default()
    };
    for (m, s, e) in [
        (Level::Prompt, Level::Prompt, Estimator::Grpo),
        (Level::Prompt, Level::Batch, Estimator::GrpoBatchStd),
        (Level::Batch, Level::Batch, Estimator::BatchZScore),
    ] {
        let (x, y) = same(lv(m, s), config(e));
        assert_eq!(x, y, "{m:?}/{s:?}");
    }
    let (x, y) = same(lv(Level::Group, Level::Group), config(Estimator::PGrpo));
    assert_values(
        &x,
        &y.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        1e-5,
        "group/group",
    );
    let (x, y) = same(
        lv(Level::Prompt, Level::Group),
        pgrpo(PGrpoOptions {
            offset_weight: 0.0,
            ..Default::default()
        }),
    );
    assert_values(
        &x,
        &y.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        1e-5,
        "prompt/group",
    );
}

/// Cold groups fall back as P-GRPO does, for every group-aware estimator; the names and
/// options go through serde.
#[test]
fn new_estimators_fall_back_when_cold_and_parse() {
    let b = hand_batch();
    let cold = RewardHistory::default();
    let grpo = config(Estimator::Grpo).compute(&b.view(), &cold).unwrap();
    for est in [
        Estimator::AnnealedOffset,
        Estimator::JamesStein,
        Estimator::Blend,
        Estimator::Levels,
    ] {
        let adv = config(est).compute(&b.view(), &cold).unwrap();
        assert_eq!(adv.values, grpo.values, "{est:?}");
        assert!(adv.diagnostics.groups.iter().all(|g| !g.used_history));
        assert_eq!(est.name().parse::<Estimator>().unwrap(), est);
    }
    let cfg: AdvantageConfig = serde_json::from_str(
        r#"{"estimator": "levels", "levels": {"mean": "batch", "std": "group"},
            "anneal": {"n0": 512}, "reward_aggregation": "normalize_then_sum"}"#,
    )
    .unwrap();
    assert_eq!(cfg.levels.mean, Level::Batch);
    assert_eq!(cfg.anneal.n0, 512.0);
    assert_eq!(cfg.reward_aggregation, RewardAggregation::NormalizeThenSum);
    for bad in [
        r#"{"anneal": {"n0": -1}}"#,
        r#"{"levels": {"mean": "batch", "std": "nowhere"}}"#,
    ] {
        let parsed: Result<AdvantageConfig, _> = serde_json::from_str(bad);
        assert!(
            parsed.is_err() || parsed.unwrap().validate().is_err(),
            "{bad}"
        );
    }
    let bad = AdvantageConfig {
        anneal: AnnealOptions { n0: f64::NAN },
        ..Default::default()
    };
    assert!(matches!(
        bad.validate(),
        Err(Error::InvalidConfig {
            field: "anneal.n0",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Custom estimators

/// `A_i = R_i − median of its prompt` (the example of the trait's docs).
struct Median;

impl AdvantageEstimator for Median {
    fn name(&self) -> &str {
        "median"
    }

    fn advantages(
        &self,
        batch: &RolloutRewards<'_>,
        _history: &RewardHistory,
    ) -> pgrpo::Result<Vec<f32>> {
        let median = |q: u32| {
            let mut v: Vec<f32> = (0..batch.rewards.len())
                .filter(|&i| batch.prompt_ids[i] == q && batch.rewards[i].is_finite())
                .map(|i| batch.rewards[i])
                .collect();
            v.sort_by(f32::total_cmp);
            let m = v.len() / 2;
            if v.len() % 2 == 1 {
                v[m]
            } else {
                0.5 * (v[m - 1] + v[m])
            }
        };
        Ok(batch
            .rewards
            .iter()
            .zip(batch.prompt_ids)
            .map(|(r, &q)| r - median(q))
            .collect())
    }
}

/// Returns whatever it was built with.
struct Fixed(Vec<f32>);

impl AdvantageEstimator for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }
    fn advantages(&self, _: &RolloutRewards<'_>, _: &RewardHistory) -> pgrpo::Result<Vec<f32>> {
        Ok(self.0.clone())
    }
}

#[test]
fn custom_estimators_run_on_a_checked_batch() {
    let b = hand_batch();
    let h = hand_history(HistoryKind::Cumulative);
    let cfg = AdvantageConfig::default();
    let adv = cfg.compute_with(&Median, &b.view(), &h).unwrap();
    // Prompt 10: rewards 1, 0, 0.25, 0.75 → median 0.5; prompt 7: 0.5, 2, −1, 0.5 → 0.5;
    // prompt 3: all 0.3.
    let want = [
        0.5, -0.5, 0.0, -0.25, 1.5, -1.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0,
    ];
    assert_values(&adv.values, &want, 1e-7, "median");
    // Deltas and diagnostics are the batch's, as `compute` gives them.
    let builtin = cfg.compute(&b.view(), &h).unwrap();
    assert_eq!(adv.deltas, builtin.deltas);
    assert_eq!(adv.diagnostics.num_prompts, 3);
    // Group "formal" (rows 0, 1, 3, 6 and prompt 3): 0.5 − 0.5 − 0.25 + 0.25 + 0 = 0.
    assert_close(
        adv.diagnostics.groups[0].advantage_mean,
        0.0,
        1e-9,
        1.0,
        "mean",
    );
    // The built-in estimators through the trait.
    for est in Estimator::ALL {
        let c = config(est);
        let via = c.compute_with(&c, &b.view(), &h).unwrap();
        assert_eq!(
            via.values,
            c.compute(&b.view(), &h).unwrap().values,
            "{est:?}"
        );
        assert_eq!(AdvantageEstimator::name(&c), est.name());
    }
    // Bad output is a typed error naming the estimator.
    let short = cfg.compute_with(&Fixed(vec![0.0; 3]), &b.view(), &h);
    assert!(matches!(short, Err(Error::Estimator { ref name, .. }) if name == "fixed"));
    let mut nan = vec![0.0; 12];
    nan[4] = f32::NAN;
    let e = cfg.compute_with(&Fixed(nan), &b.view(), &h).unwrap_err();
    assert!(e.to_string().contains("row 4"), "{e}");
    // The batch is checked before the estimator runs.
    let mut bad = b.clone();
    bad.rewards[2] = f32::INFINITY;
    assert!(matches!(
        cfg.compute_with(&Median, &bad.view(), &h),
        Err(Error::NonFiniteReward { row: 2, .. })
    ));
    // A missing reward's row gets 0 whatever the estimator said.
    let missing = AdvantageConfig {
        non_finite: NonFinitePolicy::Missing,
        ..cfg
    };
    let adv = missing
        .compute_with(&Fixed(vec![1.0; 12]), &bad.view(), &h)
        .unwrap();
    assert_eq!(adv.values[2], 0.0);
    assert_eq!(adv.diagnostics.num_missing, 1);
}

// ---------------------------------------------------------------------------------------------
// Several reward functions

/// Two prompts of three completions in groups `x` and `y`; two functions, `len` (weight 0.5)
/// and `ok` (weight 2).
fn two_functions() -> (Batch, Vec<f32>, Vec<String>, Vec<f32>) {
    let scores = vec![
        // len, ok
        2.0, 1.0, //
        4.0, 0.0, //
        6.0, 1.0, //
        1.0, 0.0, //
        1.0, 0.0, //
        4.0, 1.0,
    ];
    let names = vec!["len".to_string(), "ok".to_string()];
    let weights = vec![0.5, 2.0];
    let parts = RewardParts {
        scores: &scores,
        names: &names,
        weights: &weights,
    };
    let b = Batch {
        rewards: parts.combined(),
        prompt_ids: vec![0, 0, 0, 1, 1, 1],
        group_ids: vec![0, 0, 0, 1, 1, 1],
        keys: vec!["x".into(), "y".into()],
    };
    (b, scores, names, weights)
}

#[test]
fn sum_then_normalize_is_the_estimator_on_the_weighted_sum() {
    let (b, scores, names, weights) = two_functions();
    let parts = RewardParts {
        scores: &scores,
        names: &names,
        weights: &weights,
    };
    // R = 0.5·len + 2·ok = [3, 2, 5, 0.5, 0.5, 4].
    assert_eq!(b.rewards, [3.0, 2.0, 5.0, 0.5, 0.5, 4.0]);
    assert_eq!(parts.column(1), [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    let h = RewardHistory::default();
    for est in Estimator::ALL {
        let cfg = config(est);
        let a = cfg.compute_parts(&b.view(), &parts, &h).unwrap();
        let c = cfg.compute(&b.view(), &h).unwrap();
        assert_eq!(a.values, c.values, "{est:?}");
        assert_eq!(a.deltas, c.deltas);
        assert_eq!(cfg.history_keys(&b.keys, &names), b.keys);
    }
    // `rewards` must be the weighted sum.
    let mut wrong = b.clone();
    wrong.rewards[1] = 2.5;
    assert!(matches!(
        config(Estimator::Grpo).compute_parts(&wrong.view(), &parts, &h),
        Err(Error::InvalidConfig {
            field: "rewards",
            ..
        })
    ));
    // Malformed parts.
    let dup = vec!["len".to_string(), "len".to_string()];
    let bad = RewardParts {
        names: &dup,
        ..parts
    };
    assert!(matches!(
        config(Estimator::Grpo).compute_parts(&b.view(), &bad, &h),
        Err(Error::InvalidConfig {
            field: "reward names",
            ..
        })
    ));
    let bad = RewardParts {
        scores: &scores[..10],
        ..parts
    };
    assert!(matches!(
        config(Estimator::Grpo).compute_parts(&b.view(), &bad, &h),
        Err(Error::LengthMismatch {
            what: "reward scores",
            ..
        })
    ));
}

/// GDPO with GRPO, by hand (TRL's `normalize_then_sum`): per function and prompt z-scores,
/// weighted sum, batch z-score.
#[test]
fn normalize_then_sum_with_grpo_by_hand() {
    let (b, scores, names, weights) = two_functions();
    let parts = RewardParts {
        scores: &scores,
        names: &names,
        weights: &weights,
    };
    let cfg = AdvantageConfig {
        estimator: Estimator::Grpo,
        reward_aggregation: RewardAggregation::NormalizeThenSum,
        eps: 0.0,
        ..Default::default()
    };
    let adv = cfg
        .compute_parts(&b.view(), &parts, &RewardHistory::default())
        .unwrap();
    // len, prompt 0: 2, 4, 6 → mean 4, std 2 → −1, 0, 1; prompt 1: 1, 1, 4 → mean 2, std √3
    //   → −1/√3, −1/√3, 2/√3.
    // ok, prompt 0: 1, 0, 1 → mean 2/3, std 1/√3 → 1/√3, −2/√3, 1/√3; prompt 1: 0, 0, 1
    //   → −1/√3, −1/√3, 2/√3.
    // S = 0.5·len + 2·ok.
    let s3 = 3f64.sqrt();
    let s = [
        -0.5 + 2.0 / s3,
        -4.0 / s3,
        0.5 + 2.0 / s3,
        -0.5 / s3 - 2.0 / s3,
        -0.5 / s3 - 2.0 / s3,
        1.0 / s3 + 4.0 / s3,
    ];
    let mean = s.iter().sum::<f64>() / 6.0;
    let sd = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
    let want: Vec<f64> = s.iter().map(|x| (x - mean) / sd).collect();
    assert_values(&adv.values, &want, 1e-5, "gdpo");
    // The same with TRL's eps: every std + 1e-4.
    let trl = AdvantageConfig { eps: 1e-4, ..cfg };
    let adv = trl
        .compute_parts(&b.view(), &parts, &RewardHistory::default())
        .unwrap();
    assert_values(&adv.values, &want, 2e-4, "gdpo, eps 1e-4");
    // One function: the batch z-score of its GRPO advantages.
    let one = RewardParts {
        scores: &scores.iter().step_by(2).copied().collect::<Vec<_>>(),
        names: &names[..1],
        weights: &[1.0],
    };
    let single = Batch {
        rewards: one.combined(),
        ..b.clone()
    };
    let adv = cfg
        .compute_parts(&single.view(), &one, &RewardHistory::default())
        .unwrap();
    let g = config(Estimator::Grpo)
        .compute(&single.view(), &RewardHistory::default())
        .unwrap()
        .values;
    let gm = g.iter().map(|&x| x as f64).sum::<f64>() / 6.0;
    let gs = (g.iter().map(|&x| (x as f64 - gm).powi(2)).sum::<f64>() / 5.0).sqrt();
    let want: Vec<f64> = g.iter().map(|&x| (x as f64 - gm) / gs).collect();
    assert_values(&adv.values, &want, 1e-4, "one function");
}

/// P-GRPO with a history per (preference group, reward function): each function's reward
/// against its own history in the row's group, weighted sum, batch z-score; the histories
/// are folded in under their own keys.
#[test]
fn pgrpo_with_a_history_per_group_and_function_by_hand() {
    let (b, scores, names, weights) = two_functions();
    let parts = RewardParts {
        scores: &scores,
        names: &names,
        weights: &weights,
    };
    // Histories (8 rewards each, population-free sample std):
    // x/len: 0, 4 ×4 each → μ 2, σ² = 8·4/7 → σ = 2.13809; x/ok: 0, 1 ×4 → μ 0.5, σ = 0.53452
    // y/len: 1, 3 ×4 → μ 2, σ = 1.06904;                  y/ok: same as x/ok.
    let alt = |a: f32, c: f32| [a, c, a, c, a, c, a, c];
    let mut h = RewardHistory::default();
    h.update(part_key(&"x".into(), "len"), &alt(0.0, 4.0))
        .unwrap();
    h.update(part_key(&"x".into(), "ok"), &alt(0.0, 1.0))
        .unwrap();
    h.update(part_key(&"y".into(), "len"), &alt(1.0, 3.0))
        .unwrap();
    h.update(part_key(&"y".into(), "ok"), &alt(0.0, 1.0))
        .unwrap();
    let cfg = AdvantageConfig {
        estimator: Estimator::PGrpo,
        reward_aggregation: RewardAggregation::NormalizeThenSum,
        eps: 0.0,
        std_floor: 1e-9,
        ..Default::default()
    };
    let adv = cfg.compute_parts(&b.view(), &parts, &h).unwrap();
    let (sl_x, sl_y, so) = (
        (32.0f64 / 7.0).sqrt(),
        (8.0f64 / 7.0).sqrt(),
        (2.0f64 / 7.0).sqrt(),
    );
    // len: x rows (2, 4, 6 − 2)/σ, y rows (1, 1, 4 − 2)/σ; ok: (ok − 0.5)/σ.
    let len = [
        0.0,
        2.0 / sl_x,
        4.0 / sl_x,
        -1.0 / sl_y,
        -1.0 / sl_y,
        2.0 / sl_y,
    ];
    let ok = [
        0.5 / so,
        -0.5 / so,
        0.5 / so,
        -0.5 / so,
        -0.5 / so,
        0.5 / so,
    ];
    let s: Vec<f64> = (0..6).map(|i| 0.5 * len[i] + 2.0 * ok[i]).collect();
    let mean = s.iter().sum::<f64>() / 6.0;
    let sd = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
    let want: Vec<f64> = s.iter().map(|x| (x - mean) / sd).collect();
    assert_values(&adv.values, &want, 1e-5, "per-function P-GRPO");
    assert!(adv.diagnostics.groups.iter().all(|g| g.used_history));
    // The groups' history of R and one per (function, group), function-major.
    let keys = cfg.history_keys(&b.keys, &names);
    let want_keys: Vec<GroupKey> = ["x", "y", "x/len", "y/len", "x/ok", "y/ok"]
        .into_iter()
        .map(GroupKey::from)
        .collect();
    assert_eq!(keys, want_keys);
    let mut folded = h.clone();
    cfg.compute_parts_and_update(&b.view(), &parts, &mut folded)
        .unwrap();
    let stats = |k: &str| folded.stats(&k.into()).unwrap();
    assert_eq!(stats("x").n, 3);
    assert_close(stats("x").mean, 10.0 / 3.0, 1e-12, 1.0, "x");
    assert_eq!(stats("x/len").n, 11);
    assert_close(
        stats("x/len").mean,
        (16.0 + 12.0) / 11.0,
        1e-12,
        1.0,
        "x/len",
    );
    assert_close(stats("y/ok").mean, (4.0 + 1.0) / 11.0, 1e-12, 1.0, "y/ok");
    // A function's history that is cold falls back for that function only.
    let mut part = h.clone();
    part.clear();
    part.update(part_key(&"x".into(), "len"), &alt(0.0, 4.0))
        .unwrap();
    let adv = cfg.compute_parts(&b.view(), &parts, &part).unwrap();
    assert!(adv.diagnostics.groups.iter().all(|g| !g.used_history));
}
