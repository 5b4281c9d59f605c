//! Trainer: gradients reach every parameter, learning happens, runs are reproducible, and bad
//! input is a typed error.

use candle_core::{Device, Tensor, Var};
use pgrpo::advantage::NonFinitePolicy;
use pgrpo::models::{MlpPolicy, TabularPolicy};
use pgrpo::optim::clip_grad_norm;
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::{
    Error, Estimator, GroupKey, GroupedPrompt, HistoryKind, Policy, StepMetrics, Trainer,
    TrainerConfig,
};
use rand::{rngs::StdRng, SeedableRng};

fn easy_bandit() -> PreferenceBandit {
    PreferenceBandit::new(vec![0.5, 0.3, 0.2], vec![1.0, 1.0, 1.0], 4, 0.5, 0.05).unwrap()
}

fn batch_for(bandit: &PreferenceBandit, n: usize, rng: &mut StdRng) -> Vec<GroupedPrompt<u32>> {
    bandit
        .sample_groups(n, rng)
        .into_iter()
        .map(|g| GroupedPrompt::new(g, GroupKey::Name(format!("g{g}"))))
        .collect()
}

fn cfg(estimator: Estimator) -> TrainerConfig {
    let mut c = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.05,
        ..Default::default()
    };
    c.advantage.estimator = estimator;
    c
}

fn values(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn every_var_receives_a_nonzero_gradient() {
    let bandit = easy_bandit();
    let mut rng = StdRng::seed_from_u64(0);
    let batch = batch_for(&bandit, 16, &mut rng);
    // Tabular policy with shared logits.
    let mut t = Trainer::new(
        bandit.policy(&Device::Cpu).unwrap(),
        bandit.reward_fn(1),
        cfg(Estimator::Grpo),
    )
    .unwrap();
    let rollout = t.rollout(&batch).unwrap();
    let (out, _) = t.loss(&rollout).unwrap();
    let grads = out.loss.backward().unwrap();
    for (i, v) in t.policy().vars().iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("var {i} got no gradient"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s > 0.0, "var {i} has an all-zero gradient");
    }
    // MLP policy over one-hot features.
    let mlp = MlpPolicy::new(3, 8, 4, 7, &Device::Cpu).unwrap();
    let reward =
        |x: &Vec<f32>, a: &u32, _g: &GroupKey| if x[*a as usize % 3] > 0.0 { 1.0 } else { 0.0 };
    let mut t = Trainer::new(mlp, reward, cfg(Estimator::Grpo)).unwrap();
    let batch: Vec<_> = (0..6)
        .map(|i| {
            let mut x = vec![0.0; 3];
            x[i % 3] = 1.0;
            GroupedPrompt::new(x, (i % 3) as u32)
        })
        .collect();
    let rollout = t.rollout(&batch).unwrap();
    assert!(rollout.advantages.iter().any(|a| *a != 0.0));
    let (out, _) = t.loss(&rollout).unwrap();
    let grads = out.loss.backward().unwrap();
    for (i, v) in t.policy().vars().iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("mlp var {i} got no gradient"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s > 0.0, "mlp var {i} has an all-zero gradient");
    }
}

#[test]
fn a_step_changes_the_parameters_and_fills_the_history() {
    let bandit = easy_bandit();
    let mut rng = StdRng::seed_from_u64(3);
    let mut t = Trainer::new(
        bandit.policy(&Device::Cpu).unwrap(),
        bandit.reward_fn(1),
        cfg(Estimator::PGrpo),
    )
    .unwrap();
    let before = values(&t.policy().vars());
    let batch = batch_for(&bandit, 16, &mut rng);
    let m = t.step(&batch).unwrap();
    let after = values(&t.policy().vars());
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b, a, "a parameter tensor did not move");
    }
    let total: u64 = t.history().iter().map(|(_, s)| s.n).sum();
    assert_eq!(
        total, 64,
        "16 prompts × 4 completions folded into the history"
    );
    assert_eq!(t.steps_done(), 1);
    for name in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "policy_loss",
        "loss",
        "kl",
        "approx_kl",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "entropy",
        "completions/mean_length",
        "grad_norm",
        "learning_rate",
    ] {
        let v = m
            .get(name)
            .unwrap_or_else(|| panic!("metric {name} missing"));
        assert!(v.is_finite(), "metric {name} = {v}");
    }
    for (key, _) in t.history().iter() {
        for what in ["mean", "std", "n"] {
            assert!(
                m.get(&format!("history/{key}/{what}")).is_some(),
                "history/{key}/{what} missing"
            );
        }
    }
    for item in &batch {
        assert!(m
            .get(&format!("group/{}/reward_mean", item.group))
            .is_some());
        assert!(m
            .get(&format!("group/{}/advantage_mean", item.group))
            .is_some());
        assert!(m.get(&format!("group/{}/count", item.group)).unwrap() >= 4.0);
    }
    assert_eq!(m.get("completions/mean_length"), Some(1.0));
}

fn train_and_eval(estimator: Estimator, steps: usize) -> (Vec<f64>, Vec<f64>) {
    let bandit = easy_bandit();
    let mut rng = StdRng::seed_from_u64(11);
    let mut t = Trainer::new(
        bandit.policy(&Device::Cpu).unwrap(),
        bandit.reward_fn(5),
        cfg(estimator),
    )
    .unwrap();
    let start = bandit.evaluate(t.policy()).unwrap();
    for _ in 0..steps {
        let batch = batch_for(&bandit, 16, &mut rng);
        t.step(&batch).unwrap();
    }
    (start, bandit.evaluate(t.policy()).unwrap())
}

#[test]
fn every_group_improves_on_an_easy_bandit() {
    for est in [
        Estimator::Grpo,
        Estimator::PGrpo,
        Estimator::Rloo,
        Estimator::DrGrpo,
    ] {
        let (start, end) = train_and_eval(est, 120);
        for (k, (s, e)) in start.iter().zip(&end).enumerate() {
            assert!(*s < 0.5, "{est:?}: group {k} starts at {s}");
            assert!(
                *e > 0.9,
                "{est:?}: group {k} only reached {e} of its optimum (start {s})"
            );
        }
    }
}

fn run_metrics(seed: u64, steps: usize) -> (Vec<StepMetrics>, Vec<Vec<f32>>) {
    let bandit = easy_bandit();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = cfg(Estimator::PGrpo);
    c.seed = seed;
    c.num_iterations = 2;
    c.objective.beta = 0.04;
    c.history = HistoryKind::Exponential { half_life: 32.0 };
    let mut t = Trainer::new(
        bandit.policy(&Device::Cpu).unwrap(),
        bandit.reward_fn(seed),
        c,
    )
    .unwrap();
    let ms = (0..steps)
        .map(|_| {
            let b = batch_for(&bandit, 8, &mut rng);
            t.step(&b).unwrap()
        })
        .collect();
    (ms, values(&t.policy().vars()))
}

#[test]
fn same_seed_gives_identical_runs() {
    let (a, pa) = run_metrics(9, 15);
    let (b, pb) = run_metrics(9, 15);
    assert_eq!(pa, pb, "parameters differ between identical runs");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.values, y.values, "metrics differ at step {}", x.step);
    }
    let (c, pc) = run_metrics(10, 15);
    assert_ne!(pa, pc, "a different seed gave the same parameters");
    assert_ne!(a.last().unwrap().values, c.last().unwrap().values);
}

#[test]
fn several_iterations_move_the_ratio_and_kl_is_tracked() {
    let (ms, _) = run_metrics(4, 10);
    // With two updates per batch the second sees a ratio != 1: approx_kl > 0 averaged.
    assert!(ms.iter().any(|m| m.get("approx_kl").unwrap() > 0.0));
    // The reference policy is the initial one: KL to it is 0 at the first update of step 0
    // (the logged value averages that with the second update's) and grows with training.
    let kl_first = ms[0].get("kl").unwrap();
    let kl_last = ms.last().unwrap().get("kl").unwrap();
    assert!((0.0..0.01).contains(&kl_first), "kl at step 0: {kl_first}");
    assert!(
        kl_last > kl_first,
        "kl did not grow: {kl_first} -> {kl_last}"
    );
}

#[test]
fn nan_reward_is_a_typed_error_naming_the_row_and_leaves_state_alone() {
    let bandit = easy_bandit();
    let mut calls = 0usize;
    let reward = move |_p: &u32, _a: &u32, _g: &GroupKey| {
        calls += 1;
        if calls == 6 {
            f32::NAN
        } else {
            1.0
        }
    };
    let mut t = Trainer::new(
        bandit.policy(&Device::Cpu).unwrap(),
        reward,
        cfg(Estimator::PGrpo),
    )
    .unwrap();
    let before = values(&t.policy().vars());
    let batch = vec![GroupedPrompt::new(0u32, "a"), GroupedPrompt::new(1u32, "b")];
    match t.step(&batch) {
        Err(Error::NonFiniteReward { row, value }) => {
            assert_eq!(row, 5);
            assert!(value.is_nan());
        }
        other => panic!(
            "expected NonFiniteReward, got {other:?}",
            other = other.map(|m| m.step)
        ),
    }
    assert!(t.history().is_empty(), "history changed on a failed step");
    assert_eq!(
        values(&t.policy().vars()),
        before,
        "parameters changed on a failed step"
    );
    assert_eq!(t.steps_done(), 0);
}

#[test]
fn missing_rewards_are_skipped_when_asked() {
    let bandit = easy_bandit();
    let mut calls = 0usize;
    let reward = move |_p: &u32, a: &u32, _g: &GroupKey| {
        calls += 1;
        if calls.is_multiple_of(3) {
            f32::INFINITY
        } else {
            *a as f32
        }
    };
    let mut c = cfg(Estimator::PGrpo);
    c.advantage.non_finite = NonFinitePolicy::Missing;
    let mut t = Trainer::new(bandit.policy(&Device::Cpu).unwrap(), reward, c).unwrap();
    let batch = vec![
        GroupedPrompt::new(0u32, "a"),
        GroupedPrompt::new(1u32, "b"),
        GroupedPrompt::new(2u32, "a"),
    ];
    let m = t.step(&batch).unwrap();
    assert_eq!(m.get("num_missing_rewards"), Some(4.0));
    let n: u64 = t.history().iter().map(|(_, s)| s.n).sum();
    assert_eq!(n, 8, "missing rewards must stay out of the history");
    assert!(m.reward().is_finite());
}

#[test]
fn bad_configs_and_inputs_are_typed_errors() {
    let bandit = easy_bandit();
    let new = |c: TrainerConfig| {
        Trainer::new(bandit.policy(&Device::Cpu).unwrap(), bandit.reward_fn(0), c)
    };
    let field_of = |r: pgrpo::Result<_>| match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("expected InvalidConfig, got {e}"),
        Ok(_) => panic!("expected InvalidConfig, got Ok"),
    };
    let mut c = cfg(Estimator::Grpo);
    c.num_generations = 0;
    assert_eq!(field_of(new(c.clone()).map(|_| ())), "num_generations");
    c.num_generations = 1; // GRPO needs a per-prompt spread
    assert_eq!(field_of(new(c.clone()).map(|_| ())), "num_generations");
    let mut c = cfg(Estimator::PGrpo);
    c.num_generations = 1;
    c.advantage.pgrpo.cold_start = pgrpo::advantage::ColdStart::Batch;
    assert!(
        new(c).is_ok(),
        "P-GRPO with a batch cold start works with one completion per prompt"
    );
    let mut c = cfg(Estimator::Grpo);
    c.learning_rate = -1.0;
    assert_eq!(field_of(new(c).map(|_| ())), "learning_rate");
    let mut c = cfg(Estimator::Grpo);
    c.num_iterations = 0;
    assert_eq!(field_of(new(c).map(|_| ())), "num_iterations");
    let mut c = cfg(Estimator::Grpo);
    c.max_grad_norm = Some(f64::NAN);
    assert_eq!(field_of(new(c).map(|_| ())), "max_grad_norm");
    let mut c = cfg(Estimator::Grpo);
    c.lr_scheduler = pgrpo::optim::LrScheduler::Cosine;
    assert_eq!(field_of(new(c).map(|_| ())), "max_steps");
    let mut c = cfg(Estimator::Grpo);
    c.adam_beta2 = 1.0;
    assert_eq!(field_of(new(c).map(|_| ())), "adam_beta2");
    let mut c = cfg(Estimator::Grpo);
    c.history = HistoryKind::Window { size: 0 };
    assert_eq!(field_of(new(c).map(|_| ())), "history.size");
    let mut c = cfg(Estimator::PGrpo);
    c.history = HistoryKind::Window { size: 4 }; // can never reach min_count = 8
    assert_eq!(field_of(new(c).map(|_| ())), "pgrpo.min_count");
    let mut c = cfg(Estimator::PGrpo);
    c.advantage.pgrpo.offset_weight = 2.0;
    assert_eq!(field_of(new(c).map(|_| ())), "pgrpo.offset_weight");

    let mut t = new(cfg(Estimator::Grpo)).unwrap();
    assert!(matches!(t.step(&[]), Err(Error::Empty("batch"))));
    // A context the policy does not have.
    let r = t.step(&[GroupedPrompt::new(99u32, "x")]);
    assert!(
        matches!(
            r,
            Err(Error::IndexOutOfRange {
                what: "prompts",
                value: 99,
                ..
            })
        ),
        "{r:?}",
        r = r.map(|m| m.step)
    );
}

#[test]
fn warmup_and_schedules_set_the_learning_rate() {
    let bandit = easy_bandit();
    let mut c = cfg(Estimator::Grpo);
    c.warmup_steps = 4;
    c.lr_scheduler = pgrpo::optim::LrScheduler::Linear;
    c.max_steps = Some(8);
    let mut t = Trainer::new(bandit.policy(&Device::Cpu).unwrap(), bandit.reward_fn(0), c).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let lrs: Vec<f64> = (0..8)
        .map(|_| {
            t.step(&batch_for(&bandit, 4, &mut rng))
                .unwrap()
                .get("learning_rate")
                .unwrap()
        })
        .collect();
    let want = [0.0125, 0.025, 0.0375, 0.05, 0.05, 0.0375, 0.025, 0.0125];
    for (g, w) in lrs.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{lrs:?}");
    }
}

#[test]
fn clip_grad_norm_scales_to_the_max_norm() {
    let a = Var::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
    let b = Var::new(&[0.0f32, 4.0], &Device::Cpu).unwrap();
    let loss = (a.as_tensor().sum_all().unwrap() * 1.0).unwrap();
    let loss = (loss
        + (b.as_tensor() * &Tensor::new(&[0.0f32, 1.0], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    // Gradients: a -> [1, 1], b -> [0, 1]; norm sqrt(3).
    let mut grads = loss.backward().unwrap();
    let vars = [a.clone(), b.clone()];
    let norm = clip_grad_norm(&vars, &mut grads, 0.5).unwrap();
    assert!((norm - 3f64.sqrt()).abs() < 1e-6);
    let after = pgrpo::optim::grad_norm(&vars, &grads).unwrap();
    assert!((after - 0.5).abs() < 1e-5, "norm after clipping {after}");
    // Under the limit nothing changes.
    let norm2 = clip_grad_norm(&vars, &mut grads, 10.0).unwrap();
    assert!((norm2 - after).abs() < 1e-12);
}

#[test]
fn policies_reject_bad_prompts_and_snapshots_are_frozen() {
    let p = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let snap = p.snapshot().unwrap();
    // Change the live policy; the snapshot must not follow.
    p.vars()[1]
        .set(&Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(snap.probs().unwrap()[0], vec![1.0 / 3.0; 3]);
    let lp = p.log_probs(&[&0, &1], &[0, 5]);
    assert!(matches!(
        lp,
        Err(Error::IndexOutOfRange {
            what: "completions",
            value: 5,
            ..
        })
    ));
    let mlp = MlpPolicy::new(2, 4, 3, 0, &Device::Cpu).unwrap();
    assert!(matches!(
        mlp.log_probs(&[&vec![1.0]], &[0]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        TabularPolicy::new(0, 3, true, &Device::Cpu),
        Err(Error::InvalidConfig {
            field: "num_contexts",
            ..
        })
    ));
}
