//! Greedy (or sampled) chat completion with a checkpoint loaded into the trainable model.
//!
//! ```text
//! scripts/fetch-smollm2.sh
//! cargo run --release --example lm_generate -- \
//!     --model models/SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is the capital of France?"
//! ```
//!
//! `--model` is a `.gguf` file or a Hugging Face checkpoint directory.

use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use pgrpo::lm::{LmPolicy, SamplingConfig};
use pgrpo::Policy;
use rand::{rngs::StdRng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// A `.gguf` file or an HF checkpoint directory.
    #[arg(long)]
    model: String,
    /// The user message (wrapped in the ChatML template).
    #[arg(long)]
    prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Number of completions.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> pgrpo::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let policy = if args.model.ends_with(".gguf") {
        LmPolicy::from_gguf(&args.model, &Device::Cpu)?
    } else {
        LmPolicy::from_hf_dir(&args.model, &Device::Cpu)?
    };
    let policy = policy.with_sampling(SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        ..Default::default()
    })?;
    let params = policy.model().config().num_parameters();
    eprintln!(
        "loaded {} ({:.1}M params, f32) in {:.2}s",
        args.model,
        params as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    let prompt = policy.chat_prompt(&args.prompt)?;
    let start = Instant::now();
    let outs = policy.sample(&[prompt], args.n, &mut StdRng::seed_from_u64(args.seed))?;
    let secs = start.elapsed().as_secs_f64();
    let tokens: usize = outs.iter().map(Vec::len).sum();
    for (i, out) in outs.iter().enumerate() {
        if i > 0 {
            println!("---");
        }
        println!("{}", policy.decode(out)?);
    }
    eprintln!(
        "{tokens} tokens in {secs:.2}s ({:.1} tokens/s)",
        tokens as f64 / secs
    );
    Ok(())
}
