//! GRPO on a real language model, on the CPU: SmolLM2-135M-Instruct learns to mention a
//! colour in its answers, rewarded on the decoded text.
//!
//! ```text
//! scripts/fetch-smollm2.sh
//! cargo run --release --example smollm2_grpo        # 20 steps of 2 prompts × 4 completions
//! ```

use pgrpo::candle_core::Device;
use pgrpo::lm::{LmPolicy, SamplingConfig, TextReward};
use pgrpo::{Estimator, GroupKey, GroupedPrompt, Policy, Trainer, TrainerConfig};
use rand::{rngs::StdRng, SeedableRng};

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn main() -> pgrpo::Result<()> {
    if !std::path::Path::new(MODEL).exists() {
        eprintln!("{MODEL} is missing: run scripts/fetch-smollm2.sh first");
        return Ok(());
    }
    let policy = LmPolicy::from_gguf(MODEL, &Device::Cpu)?.with_sampling(SamplingConfig {
        max_new_tokens: 32,
        temperature: 0.8,
        ..Default::default()
    })?;

    // The reward reads text: the completion is decoded without special tokens.
    let colours = ["red", "blue", "green", "yellow", "purple", "orange"];
    let reward = TextReward::new(&policy, move |_prompt: &str, answer: &str, _: &GroupKey| {
        let answer = answer.to_lowercase();
        colours.iter().any(|c| answer.contains(c)) as u8 as f32
    })?
    .with_name("colour");

    // Plain GRPO: prompts need no preference-group label.
    let questions = [
        "Describe your ideal weekend.",
        "What should I cook tonight?",
    ];
    let batch = questions
        .iter()
        .map(|q| Ok(GroupedPrompt::ungrouped(policy.chat_prompt(q)?)))
        .collect::<pgrpo::Result<Vec<_>>>()?;

    let mut config = TrainerConfig {
        num_generations: 4,
        learning_rate: 2e-5,
        ..Default::default()
    };
    config.advantage.estimator = Estimator::Grpo;
    let mut trainer = Trainer::new(policy, reward, config)?;

    for step in 0..20 {
        let t = std::time::Instant::now();
        let m = trainer.step(&batch)?;
        let secs = t.elapsed().as_secs_f64();
        println!("step {step:2}: reward {:.2} ({secs:.1} s)", m.reward());
    }

    let policy = trainer.policy();
    let prompt = policy.chat_prompt("What is your favourite thing about autumn?")?;
    let answer = policy.sample(&[prompt], 1, &mut StdRng::seed_from_u64(0))?;
    println!("after training: {}", policy.decode(&answer[0])?);
    Ok(())
}
