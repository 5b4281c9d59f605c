//! Times the LM policy's passes on a batch of random token sequences.
//!
//! ```text
//! cargo run --release --example lm_speed -- --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --batch 8 --prompt-len 16 --completion-len 32
//! ```
//!
//! Reports, per repetition: the detached full forward (logits at every position), detached
//! completion log-probs (`log_probs_detached`), and differentiable completion log-probs plus
//! `backward()` of `Σ mask ⊙ logp` (the training step's forward + backward, without optimizer).

use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Parser;
use pgrpo::lm::LmPolicy;
use pgrpo::Policy;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// A `.gguf` file or an HF checkpoint directory.
    #[arg(long)]
    model: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    completion_len: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn main() -> pgrpo::Result<()> {
    let args = Args::parse();
    let policy = if args.model.ends_with(".gguf") {
        LmPolicy::from_gguf(&args.model, &Device::Cpu)?
    } else {
        LmPolicy::from_hf_dir(&args.model, &Device::Cpu)?
    };
    let vocab = policy.model().config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(0);
    let mut seq = |n: usize| {
        (0..n)
            .map(|_| rng.random_range(3..vocab))
            .collect::<Vec<u32>>()
    };
    let prompts: Vec<Vec<u32>> = (0..args.batch).map(|_| seq(args.prompt_len)).collect();
    let completions: Vec<Vec<u32>> = (0..args.batch).map(|_| seq(args.completion_len)).collect();
    let refs: Vec<&Vec<u32>> = prompts.iter().collect();
    let full: Vec<u32> = prompts
        .iter()
        .zip(&completions)
        .flat_map(|(p, c)| p.iter().chain(c).copied())
        .collect();
    let t = args.prompt_len + args.completion_len;
    let ids = Tensor::from_vec(full, (args.batch, t), &Device::Cpu)?;
    println!(
        "{} sequences x {t} tokens ({} prompt + {} completion)",
        args.batch, args.prompt_len, args.completion_len
    );
    for rep in 0..args.reps {
        let s = Instant::now();
        let logits = policy.model().forward_detached(&ids, None)?;
        let full_fwd = s.elapsed().as_secs_f64();
        drop(logits);
        let s = Instant::now();
        let _ = policy.log_probs_detached(&refs, &completions)?;
        let lp_fwd = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let lp = policy.log_probs(&refs, &completions)?;
        let loss = (lp.logp * lp.mask)?.sum_all()?;
        let fwd = s.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let total = s.elapsed().as_secs_f64();
        drop(grads);
        println!(
            "rep {rep}: no-grad full forward {full_fwd:.3}s | no-grad log-probs {lp_fwd:.3}s | \
             grad log-probs {fwd:.3}s + backward {:.3}s = {total:.3}s",
            total - fwd
        );
    }
    Ok(())
}
