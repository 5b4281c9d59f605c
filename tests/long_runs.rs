//! Long runs: 10^7 history updates against an f64/Kahan reference, and (ignored, run by hand)
//! a 10^4-step soak of the bandit trainer that reports its memory.

use candle_core::Device;
use pgrpo::checkpoint::CheckpointOptions;
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::{GroupKey, GroupedPrompt, HistoryKind, RewardHistory, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Kahan–Babuška (Neumaier) compensated sum.
#[derive(Default)]
struct Kahan {
    sum: f64,
    c: f64,
}

impl Kahan {
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.c += (self.sum - t) + x;
        } else {
            self.c += (x - t) + self.sum;
        }
        self.sum = t;
    }
    fn total(&self) -> f64 {
        self.sum + self.c
    }
}

/// The reward stream of group `g`: a large offset with a small spread (the case that breaks
/// naive sum-of-squares variance), in batches of varying length.
fn stream(g: u64) -> impl Iterator<Item = Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(g);
    let offset = [1000.0f32, -3.5, 1e-3][g as usize % 3];
    let spread = [0.01f32, 2.0, 1e-4][g as usize % 3];
    std::iter::from_fn(move || {
        let len = rng.random_range(1..128usize);
        Some(
            (0..len)
                .map(|_| offset + spread * (rng.random::<f32>() * 2.0 - 1.0))
                .collect(),
        )
    })
}

#[test]
fn ten_million_updates_match_a_kahan_reference() {
    const TOTAL: usize = 10_000_000;
    const GROUPS: u64 = 3;
    let mut h = RewardHistory::new(HistoryKind::Cumulative).unwrap();
    let mut values: Vec<Vec<f32>> = vec![Vec::new(); GROUPS as usize];
    let mut streams: Vec<_> = (0..GROUPS).map(stream).collect();
    let mut done = 0usize;
    let mut turn = 0u64;
    while done < TOTAL {
        let g = turn % GROUPS;
        turn += 1;
        let mut batch = streams[g as usize].next().unwrap();
        batch.truncate(TOTAL - done);
        done += batch.len();
        h.update(g, &batch).unwrap();
        values[g as usize].extend_from_slice(&batch);
    }
    let total: u64 = h.iter().map(|(_, s)| s.n).sum();
    assert_eq!(total, TOTAL as u64);
    for g in 0..GROUPS {
        let v = &values[g as usize];
        let n = v.len() as f64;
        let mut s = Kahan::default();
        for &x in v {
            s.add(x as f64);
        }
        let mean = s.total() / n;
        let mut q = Kahan::default();
        for &x in v {
            let d = x as f64 - mean;
            q.add(d * d);
        }
        let var = q.total() / (n - 1.0);
        let st = h.stats(&GroupKey::from(g)).unwrap();
        assert_eq!(st.n, v.len() as u64);
        let mean_err = (st.mean - mean).abs() / mean.abs().max(1e-300);
        let std_err = (st.sample_std - var.sqrt()).abs() / var.sqrt();
        eprintln!(
            "group {g}: n = {}, mean {mean:.12e} (rel err {mean_err:.1e}), std {:.12e} (rel err {std_err:.1e})",
            st.n,
            var.sqrt()
        );
        assert!(mean_err < 1e-12, "group {g}: mean rel err {mean_err}");
        assert!(std_err < 1e-9, "group {g}: std rel err {std_err}");
    }
}

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Soak: 10^4 steps (or `PGRPO_SOAK_STEPS`) of the bandit trainer, with a checkpoint every
/// 1000 steps keeping 2, printing peak and current RSS. Run with
/// `cargo test --release --test long_runs -- --ignored --nocapture soak`.
#[test]
#[ignore = "soak run (seconds, prints RSS); run by hand"]
fn soak_bandit_trainer_memory() {
    let bandit =
        PreferenceBandit::new(vec![0.8, 0.15, 0.05], vec![1.0, 0.3, 0.1], 4, 0.5, 0.3).unwrap();
    let mut cfg = pgrpo::TrainerConfig {
        num_generations: 4,
        learning_rate: 0.05,
        history: HistoryKind::Exponential { half_life: 256.0 },
        ..Default::default()
    };
    cfg.objective.beta = 0.04;
    let mut t = Trainer::new(
        bandit.policy(&Device::Cpu).unwrap(),
        bandit.reward_fn(1),
        cfg,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let start = std::time::Instant::now();
    // `PGRPO_SOAK_STEPS` for a longer soak.
    let steps: u64 = std::env::var("PGRPO_SOAK_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    for step in 1..=steps {
        let batch: Vec<_> = bandit
            .sample_groups(16, &mut rng)
            .into_iter()
            .map(|g| GroupedPrompt::new(g, GroupKey::Id(g as u64)))
            .collect();
        t.step(&batch).unwrap();
        if step % 1000 == 0 {
            t.save_with(dir.path(), &CheckpointOptions { keep_last: Some(2) })
                .unwrap();
        }
        if [100, 1_000, 5_000, 10_000, 50_000, 100_000].contains(&step) || step == steps {
            println!(
                "step {step:>6}: peak RSS (VmHWM) {} KiB, RSS {} KiB, {:.1} s",
                status_kib("VmHWM:").unwrap_or(0),
                status_kib("VmRSS:").unwrap_or(0),
                start.elapsed().as_secs_f64()
            );
        }
    }
    assert_eq!(
        pgrpo::checkpoint::list(dir.path()).unwrap().len(),
        2,
        "rotation kept two checkpoints"
    );
    let probs = t.policy().probs().unwrap();
    println!("final policy: {probs:?}");
}
