//! Tests of `pgrpo::history`: streaming statistics against direct references, exact merging,
//! the exponential and window kinds' semantics, JSON round trips and validation, and
//! numerical stability far from zero.

mod common;

use common::{assert_close, normal, rewards, rng, weighted};
use pgrpo::history::{RunningMoments, Stats, Variance};
use pgrpo::{Error, GroupKey, HistoryKind, RewardHistory};
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};

const KINDS: [HistoryKind; 5] = [
    HistoryKind::Cumulative,
    HistoryKind::Exponential { half_life: 4.0 },
    HistoryKind::Exponential { half_life: 37.5 },
    HistoryKind::Window { size: 1 },
    HistoryKind::Window { size: 50 },
];

/// The statistics a group should have after seeing `values` (oldest first), computed directly:
/// explicit weights `2^(-age/h)` for the exponential kind, the last `size` values for a window.
fn reference(kind: HistoryKind, values: &[f64]) -> Stats {
    let n = values.len();
    let (vals, weights): (&[f64], Vec<f64>) = match kind {
        HistoryKind::Cumulative => (values, vec![1.0; n]),
        HistoryKind::Exponential { half_life } => (
            values,
            (0..n)
                .map(|j| 2f64.powf(-((n - 1 - j) as f64) / half_life))
                .collect(),
        ),
        HistoryKind::Window { size } => {
            let v = &values[n.saturating_sub(size)..];
            (v, vec![1.0; v.len()])
        }
    };
    let (w, mean, m2) = weighted(vals, &weights);
    Stats {
        n: n as u64,
        weight: w,
        mean,
        std: (m2 / w).sqrt(),
        sample_std: if w > 1.0 {
            (m2 / (w - 1.0)).sqrt()
        } else {
            f64::NAN
        },
    }
}

#[track_caller]
fn assert_stats(got: Stats, want: Stats, tol: f64, what: &str) {
    assert_eq!(got.n, want.n, "{what}: n");
    assert_close(
        got.weight,
        want.weight,
        tol,
        1.0,
        &format!("{what}: weight"),
    );
    // Deviations are judged against the data's own scale: a std of 0 must come out as ~0.
    let scale = want.mean.abs() + want.std + 1e-300;
    assert_close(got.mean, want.mean, tol, scale, &format!("{what}: mean"));
    assert_close(
        got.std,
        want.std,
        tol,
        1e-7 * scale,
        &format!("{what}: std"),
    );
    if want.sample_std.is_nan() {
        assert!(
            got.sample_std.is_nan(),
            "{what}: sample std {}",
            got.sample_std
        );
    } else {
        assert_close(
            got.sample_std,
            want.sample_std,
            tol,
            1e-7 * scale,
            &format!("{what}: sample std"),
        );
    }
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Random chunk boundaries over `0..n`, empty chunks included.
fn chunks(rng: &mut impl Rng, n: usize, max: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < n {
        let len = rng.random_range(0..=max).min(n - at);
        out.push(at..at + len);
        at += len;
    }
    out
}

#[test]
fn streaming_in_random_chunks_matches_two_pass_statistics() {
    for seed in 0..40 {
        let mut r = rng(seed);
        let n = r.random_range(1..2000);
        let x = rewards(&mut r, n);
        let mut h = RewardHistory::new(HistoryKind::Cumulative).unwrap();
        let mut pushed = RunningMoments::default();
        for c in chunks(&mut r, n, 300) {
            h.update("g", &x[c.clone()]).unwrap();
            for &v in &x[c.clone()] {
                pushed.push(v as f64, 1.0);
            }
            let want = reference(HistoryKind::Cumulative, &as_f64(&x[..c.end]));
            let what = format!("seed {seed}, after {} rewards", c.end);
            assert_stats(h.stats(&"g".into()).unwrap(), want, 1e-12, &what);
            let m = h.moments(&"g".into()).unwrap();
            assert_eq!(m.count, c.end as u64);
            assert_close(
                m.variance(Variance::Population).unwrap().sqrt(),
                want.std,
                1e-12,
                1e-7 * (want.mean.abs() + want.std),
                &what,
            );
        }
        let want = reference(HistoryKind::Cumulative, &as_f64(&x));
        let s = h.stats(&"g".into()).unwrap();
        assert_eq!(s.std_with(Variance::Population), Some(s.std));
        if n > 1 {
            assert_eq!(s.std_with(Variance::Sample), Some(s.sample_std));
        } else {
            assert_eq!(s.std_with(Variance::Sample), None);
        }
        let from_push = Stats {
            n: pushed.count,
            weight: pushed.weight,
            mean: pushed.mean,
            std: (pushed.m2 / pushed.weight).sqrt(),
            sample_std: pushed
                .variance(Variance::Sample)
                .map_or(f64::NAN, f64::sqrt),
        };
        assert_stats(from_push, want, 1e-12, &format!("seed {seed}: push"));
        let two_pass = RunningMoments::from_slice(&as_f64(&x));
        assert_close(two_pass.mean, want.mean, 1e-14, want.std, "from_slice mean");
    }
}

/// Every kind, several interleaved groups (ids and names) folded with `update_rows` in random
/// chunks, against statistics computed directly from each group's reward sequence.
#[test]
fn update_rows_matches_direct_reference_for_every_kind() {
    let keys: Vec<GroupKey> = vec![
        0u32.into(),
        "formal".into(),
        4_000_000_000u64.into(),
        "3".into(),
    ];
    for kind in KINDS {
        for seed in 0..10 {
            let mut r = rng(seed);
            let n = r.random_range(1..1500);
            let x = rewards(&mut r, n);
            // Group 2 is rare, group 3 never appears.
            let ids: Vec<u32> = (0..n)
                .map(|_| match r.random_range(0..20) {
                    0 => 2,
                    k if k < 8 => 0,
                    _ => 1,
                })
                .collect();
            let mut h = RewardHistory::new(kind).unwrap();
            for c in chunks(&mut r, n, 200) {
                h.update_rows(&keys, &ids[c.clone()], &x[c.clone()])
                    .unwrap();
                for (g, key) in keys.iter().enumerate() {
                    let seq: Vec<f64> = (0..c.end)
                        .filter(|&i| ids[i] as usize == g)
                        .map(|i| x[i] as f64)
                        .collect();
                    let what = format!("{kind:?} seed {seed} group {key} after {}", c.end);
                    match h.stats(key) {
                        None => assert!(seq.is_empty(), "{what}: missing"),
                        Some(s) => assert_stats(s, reference(kind, &seq), 1e-10, &what),
                    }
                }
            }
            assert!(h.stats(&keys[3]).is_none());
            let distinct: std::collections::BTreeSet<u32> = ids.iter().copied().collect();
            assert_eq!(h.len(), distinct.len());
            // Same as per-group `update` of each group's sequence at once.
            let mut g = RewardHistory::new(kind).unwrap();
            for (gi, key) in keys.iter().enumerate() {
                let seq: Vec<f32> = (0..n)
                    .filter(|&i| ids[i] as usize == gi)
                    .map(|i| x[i])
                    .collect();
                g.update(key, &seq).unwrap();
                if let (Some(a), Some(b)) = (h.stats(key), g.stats(key)) {
                    assert_stats(a, b, 1e-10, &format!("{kind:?}: update vs update_rows"));
                }
            }
        }
    }
}

#[test]
fn exponential_weight_of_an_old_reward_halves_after_half_life_rewards() {
    let h_life = 4.0;
    let kind = HistoryKind::Exponential { half_life: h_life };
    assert_close(kind.decay().powi(4), 0.5, 1e-15, 1.0, "decay^h");
    // One reward 1.0, then h rewards 0.0: the 1.0 now has weight 1/2.
    let mut h = RewardHistory::new(kind).unwrap();
    h.update("a", &[1.0]).unwrap();
    for _ in 0..4 {
        h.update("a", &[0.0]).unwrap();
    }
    let newer: f64 = (0..4).map(|age| 2f64.powf(-age as f64 / h_life)).sum();
    let s = h.stats(&"a".into()).unwrap();
    assert_close(s.weight, 0.5 + newer, 1e-14, 1.0, "weight");
    assert_close(s.mean, 0.5 / (0.5 + newer), 1e-14, 1.0, "mean");
    // Another group's rewards do not age this one.
    h.update("b", &[5.0; 100]).unwrap();
    assert_eq!(h.stats(&"a".into()).unwrap(), s);
    // After many rewards the effective sample size tends to 1 / (1 − d).
    let mut h = RewardHistory::new(kind).unwrap();
    h.update("a", &vec![1.0; 1000]).unwrap();
    let s = h.stats(&"a".into()).unwrap();
    assert_close(s.weight, 1.0 / (1.0 - kind.decay()), 1e-12, 1.0, "limit");
    assert_eq!((s.n, s.mean, s.std), (1000, 1.0, 0.0));
}

#[test]
fn exponential_matches_explicit_weighted_mean_and_variance() {
    for half_life in [0.3, 1.0, 2.5, 16.0, 1e6] {
        let kind = HistoryKind::Exponential { half_life };
        let mut r = rng(7);
        let x = rewards(&mut r, 400);
        let mut h = RewardHistory::new(kind).unwrap();
        let mut pushed = RunningMoments::default();
        for c in chunks(&mut r, x.len(), 40) {
            h.update(1u8, &x[c.clone()]).unwrap();
            for &v in &x[c.clone()] {
                pushed.push(v as f64, kind.decay());
            }
            let want = reference(kind, &as_f64(&x[..c.end]));
            let what = format!("half-life {half_life} after {}", c.end);
            assert_stats(h.stats(&1u8.into()).unwrap(), want, 1e-10, &what);
            if c.end > 0 {
                assert_close(pushed.mean, want.mean, 1e-10, want.std, &what);
                assert_close(
                    pushed.m2.sqrt(),
                    (want.std.powi(2) * want.weight).sqrt(),
                    1e-9,
                    1e-9,
                    &what,
                );
            }
        }
    }
}

#[test]
fn window_counts_only_the_last_rewards_and_n_counts_all() {
    let mut h = RewardHistory::new(HistoryKind::Window { size: 5 }).unwrap();
    h.update("w", &[100.0, 200.0]).unwrap();
    let s = h.stats(&"w".into()).unwrap();
    assert_eq!((s.n, s.weight, s.mean, s.std), (2, 2.0, 150.0, 50.0));
    // A chunk longer than the window: only its last 5 count.
    h.update("w", &[9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let s = h.stats(&"w".into()).unwrap();
    assert_eq!((s.n, s.weight, s.mean), (9, 5.0, 3.0));
    assert_close(s.std, 2f64.sqrt(), 1e-15, 1.0, "window std");
    assert_close(s.sample_std, 2.5f64.sqrt(), 1e-15, 1.0, "window sample std");
    // One more pushes the oldest out.
    h.update("w", &[6.0]).unwrap();
    let s = h.stats(&"w".into()).unwrap();
    assert_eq!((s.n, s.weight, s.mean), (10, 5.0, 4.0));
    // A window of one: population std 0, sample std undefined.
    let mut h = RewardHistory::new(HistoryKind::Window { size: 1 }).unwrap();
    h.update("w", &[1.0, 2.0, 3.0]).unwrap();
    let s = h.stats(&"w".into()).unwrap();
    assert_eq!((s.n, s.weight, s.mean, s.std), (3, 1.0, 3.0, 0.0));
    assert!(s.sample_std.is_nan() && s.std_with(Variance::Sample).is_none());
}

/// Splits `0..n` into `parts` non-empty, contiguous ranges.
fn split(rng: &mut impl Rng, n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let mut cuts: Vec<usize> = (1..n).collect();
    cuts.shuffle(rng);
    let mut cuts: Vec<usize> = cuts.into_iter().take(parts - 1).collect();
    cuts.push(0);
    cuts.push(n);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

#[test]
fn merge_of_any_split_equals_sequential_updates() {
    let keys: Vec<GroupKey> = vec![7u32.into(), "casual".into(), "formal".into()];
    for kind in KINDS {
        for seed in 0..25 {
            let mut r = rng(100 + seed);
            let n = r.random_range(5..800);
            let x = rewards(&mut r, n);
            let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..3)).collect();
            let k = r.random_range(2..=5);
            let parts = split(&mut r, n, k);
            let stores: Vec<RewardHistory> = parts
                .iter()
                .map(|p| {
                    let mut h = RewardHistory::new(kind).unwrap();
                    for c in chunks(&mut r, p.len(), 60) {
                        let c = p.start + c.start..p.start + c.end;
                        h.update_rows(&keys, &ids[c.clone()], &x[c]).unwrap();
                    }
                    h
                })
                .collect();
            // Merged in some order == one store that saw the parts in that order. The identity
            // order is tried first; for the cumulative kind every order must also equal it.
            let mut sequential_in_order = None;
            for trial in 0..3 {
                let mut order: Vec<usize> = (0..parts.len()).collect();
                if trial > 0 {
                    order.shuffle(&mut r);
                }
                let mut merged = RewardHistory::new(kind).unwrap();
                let mut seq = RewardHistory::new(kind).unwrap();
                for &p in &order {
                    merged.merge(&stores[p]).unwrap();
                    let c = parts[p].clone();
                    seq.update_rows(&keys, &ids[c.clone()], &x[c]).unwrap();
                }
                assert_eq!(merged.len(), seq.len());
                for key in seq.groups() {
                    let what = format!("{kind:?} seed {seed} order {order:?} group {key}");
                    let got = merged.stats(key).unwrap();
                    assert_stats(got, seq.stats(key).unwrap(), 1e-10, &what);
                    if kind == HistoryKind::Cumulative {
                        let first = sequential_in_order.get_or_insert_with(|| seq.clone());
                        assert_stats(got, first.stats(key).unwrap(), 1e-10, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn exponential_and_window_merge_treat_the_later_store_as_newer() {
    for kind in [
        HistoryKind::Exponential { half_life: 2.0 },
        HistoryKind::Window { size: 3 },
    ] {
        let mut old = RewardHistory::new(kind).unwrap();
        old.update("g", &[0.0; 4]).unwrap();
        let mut new = RewardHistory::new(kind).unwrap();
        new.update("g", &[1.0; 4]).unwrap();
        let mut a = old.clone();
        a.merge(&new).unwrap();
        let mut b = new.clone();
        b.merge(&old).unwrap();
        let (ma, mb) = (
            a.stats(&"g".into()).unwrap().mean,
            b.stats(&"g".into()).unwrap().mean,
        );
        assert!(ma > 0.5 && mb < 0.5, "{kind:?}: {ma} {mb}");
        let want = reference(kind, &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        assert_stats(a.stats(&"g".into()).unwrap(), want, 1e-13, "old.merge(new)");
        // Merging an empty store, or into one, changes nothing.
        let mut c = RewardHistory::new(kind).unwrap();
        c.merge(&a).unwrap();
        c.merge(&RewardHistory::new(kind).unwrap()).unwrap();
        assert_eq!(c, a);
    }
}

#[test]
fn merge_of_different_kinds_is_an_error() {
    let mut a = RewardHistory::new(HistoryKind::Exponential { half_life: 2.0 }).unwrap();
    a.update("g", &[1.0]).unwrap();
    for other in [
        HistoryKind::Cumulative,
        HistoryKind::Exponential { half_life: 3.0 },
        HistoryKind::Window { size: 2 },
    ] {
        let mut b = RewardHistory::new(other).unwrap();
        b.update("g", &[2.0]).unwrap();
        let before = a.clone();
        assert!(matches!(a.merge(&b), Err(Error::InvalidHistory { .. })));
        assert_eq!(a, before, "a failed merge changes nothing");
    }
}

#[test]
fn update_rejects_bad_input_without_folding_anything() {
    let mut h = RewardHistory::new(HistoryKind::Cumulative).unwrap();
    h.update("g", &[1.0, 2.0]).unwrap();
    let before = h.clone();
    assert!(matches!(
        h.update("g", &[3.0, f32::NAN]),
        Err(Error::NonFiniteReward { row: 1, .. })
    ));
    assert!(matches!(
        h.update("h", &[f32::NEG_INFINITY]),
        Err(Error::NonFiniteReward { row: 0, .. })
    ));
    let keys: Vec<GroupKey> = vec!["g".into(), "h".into()];
    assert!(matches!(
        h.update_rows(&keys, &[0, 1], &[1.0]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        h.update_rows(&keys, &[0, 1, 2], &[1.0, 2.0, 3.0]),
        Err(Error::IndexOutOfRange {
            row: 2,
            value: 2,
            bound: 2,
            ..
        })
    ));
    assert!(matches!(
        h.update_rows(&keys, &[0, 1, 1], &[1.0, 2.0, f32::INFINITY]),
        Err(Error::NonFiniteReward { row: 2, .. })
    ));
    assert_eq!(h, before);
    // An empty update creates no group.
    h.update("empty", &[]).unwrap();
    assert!(h.stats(&"empty".into()).is_none());
    assert_eq!(h, before);
}

#[test]
fn invalid_history_kinds_are_config_errors() {
    for kind in [
        HistoryKind::Exponential { half_life: 0.0 },
        HistoryKind::Exponential { half_life: -1.0 },
        HistoryKind::Exponential {
            half_life: f64::NAN,
        },
        HistoryKind::Exponential {
            half_life: f64::INFINITY,
        },
        HistoryKind::Window { size: 0 },
    ] {
        assert!(
            matches!(kind.validate(), Err(Error::InvalidConfig { field, .. }) if field.starts_with("history.")),
            "{kind:?}"
        );
        assert!(
            matches!(RewardHistory::new(kind), Err(Error::InvalidConfig { .. })),
            "{kind:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

fn populated(kind: HistoryKind) -> RewardHistory {
    let mut h = RewardHistory::new(kind).unwrap();
    let mut r = rng(5);
    let keys: [GroupKey; 5] = [
        0u32.into(),
        u64::MAX.into(),
        "formal".into(),
        "3".into(), // a name that looks like an id: a different group from id 3
        "ünï \"quoted\"".into(),
    ];
    for (i, k) in keys.iter().enumerate() {
        h.update(k, &rewards(&mut r, 3 + 7 * i)).unwrap();
    }
    h.update(3u32, &[0.1, 0.2]).unwrap();
    h
}

#[test]
fn json_round_trip_for_every_kind() {
    for kind in KINDS {
        let h = populated(kind);
        assert_eq!(h.len(), 6);
        let json = h.to_json().unwrap();
        let back = RewardHistory::from_json(&json).unwrap();
        assert_eq!(back, h, "{kind:?}");
        assert_eq!(back.kind(), kind);
        // Through serde as well.
        let via_serde: RewardHistory =
            serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(via_serde, h);
        // Ids are JSON numbers, names strings.
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["version"], json!(1));
        let keys: Vec<&Value> = v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| &g["key"])
            .collect();
        assert!(keys.contains(&&json!(3)) && keys.contains(&&json!("3")));
        assert!(keys.contains(&&json!(u64::MAX)) && keys.contains(&&json!("formal")));
        // The restored state keeps going exactly like the original.
        let (mut a, mut b) = (h.clone(), back);
        for k in ["formal", "new"] {
            a.update(k, &[0.5, 9.0, -2.0]).unwrap();
            b.update(k, &[0.5, 9.0, -2.0]).unwrap();
        }
        assert_eq!(a, b);
        assert_eq!(
            RewardHistory::from_json(&RewardHistory::new(kind).unwrap().to_json().unwrap())
                .unwrap(),
            RewardHistory::new(kind).unwrap()
        );
    }
}

/// `h`'s JSON after `edit`.
fn edited(h: &RewardHistory, edit: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(&h.to_json().unwrap()).unwrap();
    edit(&mut v);
    v.to_string()
}

#[test]
fn malformed_json_is_a_typed_error() {
    let cum = populated(HistoryKind::Cumulative);
    let win = populated(HistoryKind::Window { size: 4 });
    let json_err = |s: &str| matches!(RewardHistory::from_json(s), Err(Error::Json(_)));
    let invalid = |s: &str| {
        matches!(
            RewardHistory::from_json(s),
            Err(Error::InvalidHistory { .. })
        )
    };
    let g0 = |v: &mut Value| v["groups"][0].clone();

    // Not JSON, or not this shape: serde errors.
    for s in [
        "",
        "{",
        "[]",
        "null",
        r#"{"format":"pgrpo.reward_history"}"#,
    ] {
        assert!(json_err(s), "{s:?}");
    }
    let cases_json: Vec<(&str, String)> = vec![
        (
            "negative count",
            edited(&cum, |v| v["groups"][0]["count"] = json!(-1)),
        ),
        (
            "negative seen",
            edited(&cum, |v| v["groups"][0]["seen"] = json!(-3)),
        ),
        (
            "null mean",
            edited(&cum, |v| v["groups"][0]["mean"] = Value::Null),
        ),
        (
            "string mean",
            edited(&cum, |v| v["groups"][0]["mean"] = json!("1.0")),
        ),
        ("unknown top field", edited(&cum, |v| v["extra"] = json!(1))),
        (
            "unknown group field",
            edited(&cum, |v| v["groups"][0]["mu"] = json!(1)),
        ),
        (
            "unknown kind field",
            edited(&win, |v| v["kind"]["half_life"] = json!(2)),
        ),
        (
            "missing field",
            edited(&cum, |v| {
                v["groups"][0].as_object_mut().unwrap().remove("m2");
            }),
        ),
        (
            "negative key",
            edited(&cum, |v| v["groups"][0]["key"] = json!(-1)),
        ),
        (
            "fractional key",
            edited(&cum, |v| v["groups"][0]["key"] = json!(1.5)),
        ),
        (
            "unknown kind",
            edited(&cum, |v| v["kind"] = json!({"type": "median"})),
        ),
        (
            "window with null",
            edited(&win, |v| v["groups"][0]["window"][0] = Value::Null),
        ),
    ];
    for (what, s) in &cases_json {
        assert!(json_err(s), "{what}: {:?}", RewardHistory::from_json(s));
    }
    // Literal NaN and out-of-range numbers are not JSON.
    let text = cum.to_json().unwrap();
    let mean = format!("\"mean\": {}", cum.stats(&0u32.into()).unwrap().mean);
    assert!(text.contains(&mean), "{text}");
    assert!(json_err(&text.replacen(&mean, "\"mean\": NaN", 1)));
    assert!(json_err(&text.replacen(&mean, "\"mean\": 1e999", 1)));
    // A field given twice in one object.
    assert!(json_err(&text.replacen(
        &mean,
        &format!("{mean}, \"mean\": 1.0"),
        1
    )));

    let cases_invalid: Vec<(&str, String)> = vec![
        ("format", edited(&cum, |v| v["format"] = json!("other"))),
        (
            "negative m2",
            edited(&cum, |v| v["groups"][0]["m2"] = json!(-1e-3)),
        ),
        (
            "negative weight",
            edited(&cum, |v| v["groups"][0]["weight"] = json!(-1.0)),
        ),
        (
            "weight > count",
            edited(&cum, |v| {
                let c = v["groups"][0]["count"].as_f64().unwrap();
                v["groups"][0]["weight"] = json!(c + 1.0);
            }),
        ),
        (
            "cumulative weight < count",
            edited(&cum, |v| {
                let c = v["groups"][0]["count"].as_f64().unwrap();
                v["groups"][0]["weight"] = json!(c - 0.5);
            }),
        ),
        (
            "cumulative count < seen",
            edited(&cum, |v| {
                let s = v["groups"][0]["seen"].as_u64().unwrap();
                v["groups"][0]["seen"] = json!(s + 5);
            }),
        ),
        (
            "exponential weight above 1/(1-d)",
            edited(
                &populated(HistoryKind::Exponential { half_life: 2.0 }),
                |v| {
                    v["groups"][0]["weight"] = json!(3.5);
                },
            ),
        ),
        (
            "count > seen",
            edited(&cum, |v| {
                let s = v["groups"][0]["seen"].as_u64().unwrap();
                v["groups"][0]["count"] = json!(s + 1);
            }),
        ),
        (
            "empty moments with m2",
            edited(&cum, |v| {
                v["groups"][0]["count"] = json!(0);
                v["groups"][0]["weight"] = json!(0.0);
            }),
        ),
        (
            "duplicate group",
            edited(&cum, |v| {
                let g = g0(v);
                v["groups"].as_array_mut().unwrap().push(g);
            }),
        ),
        (
            "half-life 0",
            edited(&cum, |v| {
                v["kind"] = json!({"type": "exponential", "half_life": 0.0});
            }),
        ),
        (
            "window size 0",
            edited(&win, |v| v["kind"]["size"] = json!(0)),
        ),
        (
            "window longer than size",
            edited(&win, |v| {
                v["groups"][1]["window"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!(1.0));
                v["groups"][1]["count"] = json!(5);
                v["groups"][1]["weight"] = json!(5.0);
            }),
        ),
        (
            "window shorter than count",
            edited(&win, |v| {
                v["groups"][1]["window"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "window without values",
            edited(&win, |v| {
                v["groups"][1].as_object_mut().unwrap().remove("window");
            }),
        ),
        (
            "values without window",
            edited(&cum, |v| v["groups"][1]["window"] = json!([1.0])),
        ),
    ];
    for (what, s) in &cases_invalid {
        assert!(invalid(s), "{what}: {:?}", RewardHistory::from_json(s));
        // The serde path fails too.
        assert!(serde_json::from_str::<RewardHistory>(s).is_err(), "{what}");
    }

    for version in [0u32, 2, 1000] {
        let s = edited(&cum, |v| v["version"] = json!(version));
        assert!(
            matches!(
                RewardHistory::from_json(&s),
                Err(Error::UnsupportedVersion { found, supported: 1, .. }) if found == version
            ),
            "version {version}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Numerical stability

/// Rewards 1e9 + noise of std 1e-3 (in `f64`): Welford's `push`, the two-pass `from_slice` and
/// chunks merged with `append` all keep mean and std; the textbook `Σx² − (Σx)²/n` does not.
#[test]
fn statistics_far_from_zero_stay_accurate() {
    let mut r = rng(11);
    let base = 1e9;
    let x: Vec<f64> = (0..100_000).map(|_| base + 1e-3 * normal(&mut r)).collect();
    // x - base is exact (Sterbenz), so the reference works on the small deviations only.
    let d: Vec<f64> = x.iter().map(|v| v - base).collect();
    let (_, dmean, m2) = weighted(&d, &vec![1.0; d.len()]);
    let want_std = (m2 / d.len() as f64).sqrt();
    assert!((want_std - 1e-3).abs() < 1e-5);

    let mut pushed = RunningMoments::default();
    for &v in &x {
        pushed.push(v, 1.0);
    }
    let mut appended = RunningMoments::default();
    for c in x.chunks(977) {
        appended.append(&RunningMoments::from_slice(c), 1.0);
    }
    for (what, m) in [
        ("push", pushed),
        ("from_slice", RunningMoments::from_slice(&x)),
        ("append", appended),
    ] {
        // An f64 holding 1e9 has an ulp of 1.2e-7 and each of the n rounding steps of a running
        // mean adds up to half of one, so ~ulp·sqrt(n) is the best a streaming mean can do:
        // ask for 2e-5 absolute (2e-14 relative, 2% of the std) and the std to 2e-4 relative.
        let err = (m.mean - base - dmean).abs();
        assert!(err <= 2e-5, "{what}: mean off by {err:e}");
        let std = m.variance(Variance::Population).unwrap().sqrt();
        assert_close(std, want_std, 2e-4, 0.0, &format!("{what}: std"));
    }
    // The tolerance has teeth: the one-pass textbook formula is far off here.
    let (s1, s2) = x.iter().fold((0.0, 0.0), |(a, b), v| (a + v, b + v * v));
    let naive_var = (s2 - s1 * s1 / x.len() as f64) / x.len() as f64;
    assert!(
        (naive_var.max(0.0).sqrt() - want_std).abs() > 0.5 * want_std,
        "naive std {:e}",
        naive_var.max(0.0).sqrt()
    );

    // The same through `update` in `f32`: rewards 1e9 ± a few ulps (64), several batches,
    // merged from two stores.
    let y: Vec<f32> = (0..50_000)
        .map(|_| 1e9f32 + 64.0 * r.random_range(-3i32..=3) as f32)
        .collect();
    let dy: Vec<f64> = y.iter().map(|&v| v as f64 - base).collect();
    let (_, dmean, m2) = weighted(&dy, &vec![1.0; dy.len()]);
    let want_std = (m2 / dy.len() as f64).sqrt();
    let (mut a, mut b) = (RewardHistory::default(), RewardHistory::default());
    for c in y[..20_000].chunks(1000) {
        a.update("g", c).unwrap();
    }
    b.update("g", &y[20_000..]).unwrap();
    a.merge(&b).unwrap();
    let s = a.stats(&"g".into()).unwrap();
    assert!(
        (s.mean - base - dmean).abs() <= 1e-6,
        "{} vs {dmean}",
        s.mean - base
    );
    assert_close(s.std, want_std, 1e-9, 0.0, "f32 update std");
}

/// 1e8 single-reward `push`es against a two-pass reference with Kahan sums (the stream is
/// regenerated from its seed for each pass instead of being stored).
#[test]
fn hundred_million_pushes_match_kahan_two_pass() {
    const N: u64 = 100_000_000;
    // SplitMix64: fast, so the test runs in about a second in release.
    let stream = || {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        (0..N).map(move |i| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            // A slow drift plus uniform noise, around 1000.
            1000.0 + 1e-6 * i as f64 + (u - 0.5)
        })
    };
    let kahan = |it: &mut dyn Iterator<Item = f64>| {
        let (mut sum, mut c) = (0.0f64, 0.0f64);
        for v in it {
            let y = v - c;
            let t = sum + y;
            c = (t - sum) - y;
            sum = t;
        }
        sum
    };
    let mean = kahan(&mut stream()) / N as f64;
    let m2 = kahan(&mut stream().map(|v| (v - mean) * (v - mean)));
    let mut m = RunningMoments::default();
    for v in stream() {
        m.push(v, 1.0);
    }
    assert_eq!(m.count, N);
    assert_eq!(m.weight, N as f64);
    assert_close(m.mean, mean, 1e-12, 1.0, "mean");
    assert_close(m.m2, m2, 1e-9, 0.0, "m2");
}

// ---------------------------------------------------------------------------------------------
// Batch deltas from outside (issue 12, defect 7)

/// A batch's deltas for `kind` (groups "a" and "b"), as JSON.
fn deltas_json(kind: HistoryKind) -> (Vec<GroupKey>, Value) {
    let keys: Vec<GroupKey> = vec!["a".into(), "b".into()];
    let rewards = [0.5f32, -1.0, 2.0, 0.25, 3.0, 1.0];
    let batch = pgrpo::RolloutRewards {
        rewards: &rewards,
        prompt_ids: &[0, 0, 0, 1, 1, 1],
        group_ids: &[0, 0, 0, 1, 1, 1],
        group_keys: &keys,
    };
    let h = RewardHistory::new(kind).unwrap();
    let cfg = pgrpo::AdvantageConfig::default();
    let adv = cfg.compute(&batch, &h).unwrap();
    (
        keys,
        serde_json::from_str(&adv.deltas.to_json().unwrap()).unwrap(),
    )
}

/// Deltas a peer could send that no batch of `f32` rewards produces. Each is refused by
/// `BatchDeltas::from_json` (and by serde); the old check (finite sums, `w <= count`,
/// `(count == 0) == (w == 0)`) accepted the first six, and folding them in gave a history
/// that saved but did not load again: a later checkpoint was unloadable. The test asserts,
/// for every case, that whatever is accepted folds into a history that round-trips, and that
/// each case is refused; on the old code the round trip fails for the first six.
#[test]
fn crafted_deltas_are_refused_or_keep_the_history_loadable() {
    let ema = HistoryKind::Exponential { half_life: 4.0 };
    let win = HistoryKind::Window { size: 8 };
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, HistoryKind, Edit)> = vec![
        // Cumulative weights must equal counts (the format checks weight = count = seen).
        (
            "cumulative weight below count",
            HistoryKind::Cumulative,
            |d| d["w"] = json!(1.0),
        ),
        // Exponential weights are bounded by 1/(1 − d) (here 6.3); 1000 pushes give ~6.3.
        ("exponential weight of an undecayed count", ema, |d| {
            d["count"] = json!(1000);
            d["w"] = json!(1000.0)
        }),
        // A mean far beyond f32: merging it with the stored mean overflows M2 to infinity.
        ("a mean of 1e300", HistoryKind::Cumulative, |d| {
            d["shift"] = json!(1e300);
            d["s1"] = json!(0.0);
            d["s2"] = json!(0.0)
        }),
        // The same through a window's values.
        ("window values of 1e300", win, |d| {
            d["values"][0] = json!(1e300);
            d["values"][1] = json!(-1e300)
        }),
        // More rewards than a u64 `seen` can add (it wrapped around in release builds).
        ("count near u64::MAX", HistoryKind::Cumulative, |d| {
            d["count"] = json!(u64::MAX);
            d["w"] = json!(u64::MAX as f64)
        }),
        // An exponential delta of weight below 1 (every push adds 1).
        ("exponential weight below 1", ema, |d| d["w"] = json!(0.5)),
        // Refused by the old check too.
        (
            "an empty delta with a weight",
            HistoryKind::Cumulative,
            |d| d["count"] = json!(0),
        ),
        ("negative s2", HistoryKind::Cumulative, |d| {
            d["s2"] = json!(-1.0)
        }),
        ("a window delta with sums", win, |d| d["s1"] = json!(1.0)),
        ("a window value that is not an f32", win, |d| {
            d["values"][0] = json!(0.1f64)
        }),
    ];
    for (what, kind, edit) in cases {
        let (keys, mut v) = deltas_json(kind);
        // The untouched deltas are accepted and round-trip.
        let good = pgrpo::history::BatchDeltas::from_json(&v.to_string()).unwrap();
        let mut h = populated(kind);
        h.update("a", &[0.0, 1.0, 2.0]).unwrap();
        let mut ok = h.clone();
        ok.apply(&keys, good).unwrap();
        RewardHistory::from_json(&ok.to_json().unwrap()).unwrap();

        edit(&mut v["deltas"][0]);
        let json = v.to_string();
        let parsed = pgrpo::history::BatchDeltas::from_json(&json);
        if let Ok(d) = &parsed {
            let mut folded = h.clone();
            folded.apply(&keys, d.clone()).unwrap();
            let back = folded.to_json().and_then(|j| RewardHistory::from_json(&j));
            assert!(
                back.is_ok(),
                "{what}: accepted, but the history it makes does not load: {:?}",
                back.err()
            );
        }
        assert!(
            matches!(parsed, Err(Error::InvalidHistory { .. })),
            "{what}: {:?}",
            parsed.map(|_| "accepted")
        );
        let via_serde: Result<pgrpo::history::BatchDeltas, _> = serde_json::from_str(&json);
        assert!(via_serde.is_err(), "{what}: accepted through serde");
    }
}

/// A fold that would take a group past 2⁵³ rewards (where its count stops converting to f64
/// exactly) is refused and changes nothing.
#[test]
fn apply_refuses_to_overfill_a_group() {
    let mut h = RewardHistory::default();
    h.update("a", &[1.0, 2.0]).unwrap();
    let full = edited(&h, |v| {
        let n = (1u64 << 53) - 1;
        v["groups"][0]["seen"] = json!(n);
        v["groups"][0]["count"] = json!(n);
        v["groups"][0]["weight"] = json!(n as f64);
    });
    let mut h = RewardHistory::from_json(&full).unwrap();
    let before = h.clone();
    let (keys, v) = deltas_json(HistoryKind::Cumulative);
    let d = pgrpo::history::BatchDeltas::from_json(&v.to_string()).unwrap();
    assert!(matches!(
        h.apply(&keys, d),
        Err(Error::InvalidHistory { group: Some(ref g), .. }) if g == "a"
    ));
    assert_eq!(h, before);
}

/// The format refuses means and spreads that `f32` rewards cannot give (they would overflow
/// when later rewards are merged in).
#[test]
fn the_format_refuses_statistics_beyond_f32_rewards() {
    let h = populated(HistoryKind::Cumulative);
    for (what, edit) in [
        (
            "mean",
            (|g: &mut Value| g["mean"] = json!(1e300)) as fn(&mut Value),
        ),
        ("m2", |g| g["m2"] = json!(1e300)),
    ] {
        let json = edited(&h, |v| edit(&mut v["groups"][0]));
        assert!(
            matches!(
                RewardHistory::from_json(&json),
                Err(Error::InvalidHistory { .. })
            ),
            "{what}"
        );
    }
    let win = populated(HistoryKind::Window { size: 4 });
    let json = edited(&win, |v| v["groups"][0]["window"][0] = json!(1e300));
    assert!(matches!(
        RewardHistory::from_json(&json),
        Err(Error::InvalidHistory { .. })
    ));
}

/// The checks accept what a batch really produces, for any kind: a long half-life (where the
/// weight `(1 − d^n)/(1 − d)` is computed with little cancellation to spare) and a batch large
/// enough to be summed in several chunks.
#[test]
fn real_deltas_of_every_kind_are_accepted() {
    let n = 100_000;
    let keys: Vec<GroupKey> = vec!["a".into(), "b".into()];
    let mut r = rng(8);
    let rewards = common::rewards(&mut r, n);
    let prompt_ids: Vec<u32> = (0..n as u32).map(|i| i / 4).collect();
    let group_ids: Vec<u32> = (0..n as u32).map(|i| (i / 4) % 2).collect();
    let batch = pgrpo::RolloutRewards {
        rewards: &rewards,
        prompt_ids: &prompt_ids,
        group_ids: &group_ids,
        group_keys: &keys,
    };
    for kind in [
        HistoryKind::Cumulative,
        HistoryKind::Exponential { half_life: 0.5 },
        HistoryKind::Exponential { half_life: 64.0 },
        HistoryKind::Exponential { half_life: 1e9 },
        HistoryKind::Window { size: 1000 },
    ] {
        let h = RewardHistory::new(kind).unwrap();
        let adv = pgrpo::AdvantageConfig::default()
            .compute(&batch, &h)
            .unwrap();
        let back = pgrpo::history::BatchDeltas::from_json(&adv.deltas.to_json().unwrap());
        assert_eq!(back.as_ref().ok(), Some(&adv.deltas), "{kind:?}: {back:?}");
        let mut folded = h.clone();
        folded.apply(&keys, back.unwrap()).unwrap();
        RewardHistory::from_json(&folded.to_json().unwrap()).unwrap();
    }
}
