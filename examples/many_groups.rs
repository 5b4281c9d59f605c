//! Bytes of one step's metrics (a JSON line) in a run with 10,000 preference groups, with
//! every group's history reported (`GroupMetrics::All`, what every step reported before
//! `group_metrics` existed) and with the default (`GroupMetrics::Bounded { top_k: 16 }`).
//!
//! ```text
//! cargo run --release --example many_groups
//! ```
//!
//! The reward history is seeded with 10,000 groups (ids, 8 rewards each), then each step
//! trains on 64 prompts × 4 completions whose groups are drawn among them.

use candle_core::Device;
use pgrpo::metrics::GroupMetrics;
use pgrpo::models::TabularPolicy;
use pgrpo::sink::{JsonlSink, MetricsSink};
use pgrpo::{GroupKey, GroupedPrompt, Trainer, TrainerConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn reward(_c: &u32, a: &u32, _g: &GroupKey) -> f32 {
    *a as f32
}

fn main() -> pgrpo::Result<()> {
    let (groups, prompts, steps) = (10_000u64, 64, 3);
    for select in [GroupMetrics::All, GroupMetrics::default()] {
        let cfg = TrainerConfig {
            num_generations: 4,
            learning_rate: 0.01,
            group_metrics: select,
            ..Default::default()
        };
        let policy = TabularPolicy::new(1, 4, true, &Device::Cpu)?;
        let mut trainer = Trainer::new(policy, reward, cfg)?;
        for g in 0..groups {
            let r = [0.0, 1.0, 2.0, 3.0, (g % 4) as f32, 1.5, 0.5, 2.5];
            trainer.history_mut().update(GroupKey::Id(g), &r)?;
        }
        let mut rng = StdRng::seed_from_u64(0);
        for s in 0..steps {
            let batch: Vec<GroupedPrompt<u32>> = (0..prompts)
                .map(|_| GroupedPrompt::new(0u32, rng.random_range(0..groups)))
                .collect();
            let m = trainer.step(&batch)?;
            let mut sink = JsonlSink::new(Vec::new());
            sink.write(&m)?;
            let bytes = sink.into_inner()?.len();
            println!(
                "{select:?}, step {s}: {} groups in the history, {} metrics, {bytes} bytes of JSONL",
                trainer.history().iter().count(),
                m.values.len()
            );
        }
    }
    Ok(())
}
