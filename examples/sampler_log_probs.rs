//! How close the sampler's own log-probs are to the scoring passes, and what using them saves.
//!
//! ```text
//! scripts/fetch-smollm2.sh
//! cargo run --release --example sampler_log_probs [-- --model PATH --reps 3 --steps 3]
//! ```
//!
//! 1. For 2 chat prompts × G = 4 completions of ≤ 32 tokens, at temperature 1 and 0.7, the
//!    largest and mean absolute difference over completion tokens between the sampler's
//!    log-probs (KV-cache decode), `log_probs_detached` (full forward, no graph) and
//!    `log_probs` (the training forward). The iteration-1 ratio of `num_iterations > 1` is
//!    `exp(training − old)`: its error is `|training − sampler|` with the sampler's
//!    log-probs as `old`, `|training − detached|` with a second pass.
//! 2. Seconds of `sample`, `sample_with_log_probs` and `log_probs_detached` (fastest of
//!    `--reps`, interleaved), and of trainer steps with `num_iterations = 2` with the
//!    sampler's log-probs and with a second pass (mean of `--steps` after one warm-up step).
//!    Timings on a shared machine are noisy.

use std::time::Instant;

use clap::Parser;
use pgrpo::candle_core::{Device, Tensor};
use pgrpo::lm::{LmPolicy, SamplingConfig};
use pgrpo::{Estimator, GroupKey, GroupedPrompt, Policy, Result, Trainer, TrainerConfig};
use rand::{rngs::StdRng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// A `.gguf` file or an HF checkpoint directory.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    /// Repetitions of each timed pass.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Timed trainer steps per variant.
    #[arg(long, default_value_t = 3)]
    steps: usize,
}

/// Largest and mean `|a − b|` over the mask.
fn diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> Result<(f32, f32)> {
    let d = ((a - b)?.abs()? * mask)?;
    let max = d.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let mean = d.sum_all()?.to_scalar::<f32>()? / mask.sum_all()?.to_scalar::<f32>()?;
    Ok((max, mean))
}

fn secs<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let out = f()?;
    Ok((out, t.elapsed().as_secs_f64()))
}

/// Mean seconds per phase over `steps` trainer steps with `num_iterations = 2`, after one
/// warm-up step.
fn time_steps(policy: LmPolicy, batch: &[GroupedPrompt<Vec<u32>>], steps: usize) -> Result<String> {
    let mut config = TrainerConfig {
        num_generations: 4,
        num_iterations: 2,
        learning_rate: 2e-5,
        ..Default::default()
    };
    config.advantage.estimator = Estimator::Grpo;
    let reward = |_p: &Vec<u32>, c: &Vec<u32>, _g: &GroupKey| c.len() as f32 / 32.0;
    let mut trainer = Trainer::new(policy, reward, config)?;
    trainer.step(batch)?;
    let (mut sample, mut old, mut total) = (0.0, 0.0, 0.0);
    for _ in 0..steps {
        let (m, s) = secs(|| trainer.step(batch))?;
        total += s;
        sample += m.timings.get("sample").copied().unwrap_or(0.0);
        old += m.timings.get("old_logp").copied().unwrap_or(0.0);
    }
    let n = steps as f64;
    Ok(format!(
        "sample {:.2} s, old_logp {:.2} s, whole step {:.2} s",
        sample / n,
        old / n,
        total / n
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !std::path::Path::new(&args.model).exists() {
        eprintln!(
            "{} is missing: run scripts/fetch-smollm2.sh first",
            args.model
        );
        return Ok(());
    }
    let base = if args.model.ends_with(".gguf") {
        LmPolicy::from_gguf(&args.model, &Device::Cpu)?
    } else {
        LmPolicy::from_hf_dir(&args.model, &Device::Cpu)?
    };
    let prompts = vec![
        base.chat_prompt("I am Ann. Recommend some music for me.")?,
        base.chat_prompt("What should I cook tonight?")?,
    ];
    let rows: Vec<&Vec<u32>> = prompts.iter().flat_map(|p| [p; 4]).collect();
    let sampling = |temperature| SamplingConfig {
        max_new_tokens: 32,
        temperature,
        ..Default::default()
    };
    for temperature in [1.0, 0.7] {
        let policy = base.clone().with_sampling(sampling(temperature))?;
        let rng = || StdRng::seed_from_u64(1);
        let (completions, sampled) = policy.sample_with_log_probs(&prompts, 4, &mut rng())?;
        let sampled = sampled.expect("the LM sampler returns log-probs").logp;
        let detached = policy.log_probs_detached(&rows, &completions)?;
        let training = policy.log_probs(&rows, &completions)?.logp.detach();
        let mask = &detached.mask;
        let tokens = mask.sum_all()?.to_scalar::<f32>()?;
        println!("T = {temperature}: {tokens} completion tokens, |a − b| max / mean:");
        for (name, a, b) in [
            ("sampler − detached ", &sampled, &detached.logp),
            ("training − sampler ", &training, &sampled),
            ("training − detached", &training, &detached.logp),
        ] {
            let (max, mean) = diff(a, b, mask)?;
            println!("  {name}: {max:.2e} / {mean:.2e}");
        }
        let mut best = [f64::INFINITY; 3];
        for _ in 0..args.reps {
            best[0] = best[0].min(secs(|| policy.sample(&prompts, 4, &mut rng()))?.1);
            let with = secs(|| policy.sample_with_log_probs(&prompts, 4, &mut rng()))?.1;
            best[1] = best[1].min(with);
            let det = secs(|| policy.log_probs_detached(&rows, &completions))?.1;
            best[2] = best[2].min(det);
        }
        println!(
            "  sample {:.2} s, sample_with_log_probs {:.2} s, log_probs_detached {:.2} s",
            best[0], best[1], best[2]
        );
        // What the sampler adds per token (a log-sum-exp over the vocabulary), on as many
        // rows at once: the same arithmetic as the fused kernel.
        let vocab = policy.model().config().vocab_size;
        let logits = Tensor::randn(0f32, 3.0, (tokens as usize, vocab), &Device::Cpu)?;
        let targets = Tensor::zeros(
            tokens as usize,
            pgrpo::candle_core::DType::U32,
            &Device::Cpu,
        )?;
        let mut extra = f64::INFINITY;
        for _ in 0..args.reps {
            let t = secs(|| {
                Ok(pgrpo::ops::log_softmax_gather_at(
                    &logits,
                    &targets,
                    temperature,
                )?)
            })?;
            extra = extra.min(t.1);
        }
        println!(
            "  the sampler's extra arithmetic ({tokens} rows × {vocab}): {:.1} ms",
            extra * 1e3
        );
    }
    let policy = base.with_sampling(sampling(0.7))?;
    let batch: Vec<_> = prompts.into_iter().map(GroupedPrompt::ungrouped).collect();
    println!("trainer steps, 2 prompts × G = 4, ≤ 32 tokens, T = 0.7, num_iterations = 2:");
    let with = time_steps(policy.snapshot()?, &batch, args.steps)?;
    println!("  sampler's log-probs: {with}");
    let without = time_steps(policy.with_sampler_log_probs(false), &batch, args.steps)?;
    println!("  a second pass:       {without}");
    Ok(())
}
