//! The smallest complete P-GRPO loop: `cargo run --release --example basic`.
//!
//! Two preference groups share one policy over 4 actions. The majority ("casual", 3 of 4
//! prompts) wants action 0; the minority ("formal") wants action 1 and scores on a scale ten
//! times smaller. P-GRPO normalises each reward against its own group's reward history.

use pgrpo::candle_core::Device;
use pgrpo::models::TabularPolicy;
use pgrpo::{Estimator, GroupKey, GroupedPrompt, Trainer, TrainerConfig};

fn main() -> pgrpo::Result<()> {
    // A prompt is a context id (0 = casual, 1 = formal); a completion is an action id.
    // `shared = true`: one logit vector common to both contexts, plus one row per context.
    let policy = TabularPolicy::new(2, 4, true, &Device::Cpu)?;

    // The reward sees the prompt, the completion and the prompt's preference group.
    let reward = |_ctx: &u32, action: &u32, group: &GroupKey| -> f32 {
        match group.to_string().as_str() {
            "casual" => (*action == 0) as u8 as f32,
            _ => 0.1 * (*action == 1) as u8 as f32,
        }
    };

    let mut config = TrainerConfig {
        num_generations: 4,  // G completions per prompt
        learning_rate: 0.05, // AdamW
        ..Default::default()
    };
    config.advantage.estimator = Estimator::PGrpo; // the default; try Estimator::Grpo
    let mut trainer = Trainer::new(policy, reward, config)?;

    // Every prompt carries its preference-group label.
    let batch = [
        GroupedPrompt::new(0u32, "casual"),
        GroupedPrompt::new(0u32, "casual"),
        GroupedPrompt::new(0u32, "casual"),
        GroupedPrompt::new(1u32, "formal"),
    ];
    for step in 0..60 {
        let m = trainer.step(&batch)?;
        if step % 10 == 0 {
            let casual = m.get("group/casual/reward_mean").unwrap_or(f64::NAN);
            let formal = m.get("group/formal/reward_mean").unwrap_or(f64::NAN);
            println!("step {step:2}: reward casual {casual:.2}, formal {formal:.3} (max 0.1)");
        }
    }

    let probs = trainer.policy().probs()?;
    println!("P(action 0 | casual) = {:.2}", probs[0][0]);
    println!("P(action 1 | formal) = {:.2}", probs[1][1]);
    for (group, stats) in trainer.history().iter() {
        let (n, mean, std) = (stats.n, stats.mean, stats.sample_std);
        println!("history of {group}: n = {n}, mean = {mean:.3}, std = {std:.3}");
    }
    Ok(())
}
