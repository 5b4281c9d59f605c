//! Peak resident memory and seconds of GRPO steps on a SmolLM2-135M-shaped model, with and
//! without gradient accumulation (`TrainerConfig::gradient_accumulation_steps`).
//!
//! ```text
//! cargo build --release --example accumulation_memory
//! /usr/bin/time -v target/release/examples/accumulation_memory --ga 1   # one pass
//! /usr/bin/time -v target/release/examples/accumulation_memory --ga 8   # 8 micro-batches
//! # the real weights instead of a random initialisation of the same shape:
//! target/release/examples/accumulation_memory --model models/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```
//!
//! A step is `--prompts` prompts × `--g` completions (64 by default) of `--completion-len`
//! tokens after `--prompt-len` prompt tokens, with a KL reference (`beta = 0.04`, so the
//! rollout also computes reference log-probs) and full fine-tuning with AdamW. By default the
//! completions are random token sequences of exactly that length, so that what is measured
//! is the update and not generation (`--generate` samples them from the model instead, up to
//! `--completion-len` new tokens). Prints the resident memory after building the model and
//! the trainer, and the peak (`VmHWM` of `/proc/self/status`, Linux; `/usr/bin/time -v`'s
//! "Maximum resident set size" is the same number), and each step's seconds by phase.

use std::time::Instant;

use candle_core::{DType, Device, Var};
use clap::Parser;
use pgrpo::lm::{Llama, LlamaConfig, LmPolicy, SamplingConfig};
use pgrpo::{GroupKey, GroupedPrompt, Policy, Result, TokenLogProbs, Trainer, TrainerConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// A `.gguf` file or an HF checkpoint directory; without it, a random initialisation of
    /// SmolLM2-135M's configuration.
    #[arg(long)]
    model: Option<String>,
    /// `gradient_accumulation_steps`: micro-batches per update.
    #[arg(long, default_value_t = 1)]
    ga: usize,
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 8)]
    g: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    completion_len: usize,
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Sample the completions from the model (otherwise: random tokens, full length).
    #[arg(long)]
    generate: bool,
}

/// Resident memory in MiB: (current, peak), from `/proc/self/status`.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The model, with completions either sampled or random tokens of a fixed length.
struct Bench {
    lm: LmPolicy,
    generate: bool,
    len: usize,
}

impl Policy for Bench {
    type Prompt = Vec<u32>;
    type Completion = Vec<u32>;

    fn device(&self) -> &Device {
        self.lm.device()
    }

    fn sample(&self, prompts: &[Vec<u32>], n: usize, rng: &mut StdRng) -> Result<Vec<Vec<u32>>> {
        if self.generate {
            return self.lm.sample(prompts, n, rng);
        }
        let vocab = self.lm.model().config().vocab_size as u32;
        Ok((0..prompts.len() * n)
            .map(|_| (0..self.len).map(|_| rng.random_range(3..vocab)).collect())
            .collect())
    }

    fn log_probs(&self, p: &[&Vec<u32>], c: &[Vec<u32>]) -> Result<TokenLogProbs> {
        self.lm.log_probs(p, c)
    }

    fn log_probs_detached(&self, p: &[&Vec<u32>], c: &[Vec<u32>]) -> Result<TokenLogProbs> {
        self.lm.log_probs_detached(p, c)
    }

    fn vars(&self) -> Vec<Var> {
        self.lm.vars()
    }

    fn snapshot(&self) -> Result<Self> {
        Ok(Self {
            lm: self.lm.snapshot()?,
            generate: self.generate,
            len: self.len,
        })
    }
}

/// A toy reward that varies between completions: the share of even token ids.
#[allow(clippy::ptr_arg)]
fn reward(_p: &Vec<u32>, c: &Vec<u32>, _g: &GroupKey) -> f32 {
    c.iter().filter(|&&t| t % 2 == 0).count() as f32 / c.len().max(1) as f32
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    let lm = match &args.model {
        Some(m) if m.ends_with(".gguf") => LmPolicy::from_gguf(m, &dev)?,
        Some(m) => LmPolicy::from_hf_dir(m, &dev)?,
        None => {
            let config = LlamaConfig {
                eos_token_id: None,
                ..Default::default()
            };
            let model = Llama::new(config, &mut StdRng::seed_from_u64(0), &dev, DType::F32)?;
            LmPolicy::new(model, None)
        }
    }
    .with_sampling(SamplingConfig {
        max_new_tokens: args.completion_len,
        ..Default::default()
    })?;
    let (rss_model, _) = rss_mib();
    let params: usize = lm.vars().iter().map(|v| v.elem_count()).sum();
    let vocab = lm.model().config().vocab_size as u32;
    let policy = Bench {
        lm,
        generate: args.generate,
        len: args.completion_len,
    };
    let mut rng = StdRng::seed_from_u64(1);
    let batch: Vec<GroupedPrompt<Vec<u32>>> = (0..args.prompts)
        .map(|i| {
            let prompt = (0..args.prompt_len)
                .map(|_| rng.random_range(3..vocab))
                .collect();
            GroupedPrompt::new(prompt, if i % 2 == 0 { "a" } else { "b" })
        })
        .collect();
    let mut cfg = TrainerConfig {
        num_generations: args.g,
        gradient_accumulation_steps: args.ga,
        learning_rate: 1e-5,
        seed: 1,
        ..Default::default()
    };
    cfg.objective.beta = 0.04;
    let mut trainer = Trainer::new(policy, reward, cfg)?;
    let (rss_trainer, _) = rss_mib();
    let rows = args.prompts * args.g;
    println!(
        "{params} parameters; {rows} completions of {} tokens after {} prompt tokens; \
         gradient_accumulation_steps {} (micro-batches of {} completions)",
        args.completion_len,
        args.prompt_len,
        args.ga,
        rows.div_ceil(args.ga)
    );
    println!(
        "RSS: model {rss_model:.0} MiB, trainer (policy, reference, AdamW) {rss_trainer:.0} MiB"
    );
    for step in 0..args.steps {
        let t = Instant::now();
        let m = trainer.step(&batch)?;
        let time = |k: &str| m.timings.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "step {step}: {:.1} s (sample {:.1}, old/ref log-probs {:.1}, update {:.1}), loss {:.4}, \
             grad_norm {:.4}",
            t.elapsed().as_secs_f64(),
            time("sample"),
            time("old_logp"),
            time("update"),
            m.get("loss").unwrap_or(f64::NAN),
            m.get("grad_norm").unwrap_or(f64::NAN),
        );
    }
    let (now, peak) = rss_mib();
    println!("RSS now {now:.0} MiB, peak {peak:.0} MiB (ga {})", args.ga);
    Ok(())
}
