//! Seconds and memory of GRPO steps on a real model, with or without LoRA.
//!
//! ```text
//! scripts/fetch-smollm2.sh
//! cargo run --release --example lora_step -- --model models/SmolLM2-135M-Instruct.Q4_1.gguf
//! cargo run --release --example lora_step -- --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --lora --targets all --r 8
//! ```
//!
//! Each step: 2 chat prompts × `G` = 4 completions of ≤ 32 new tokens, a toy reward, one
//! update (AdamW). Prints per step the sampling seconds (`sample`), the old/reference
//! log-prob seconds (`old_logp`, with `--beta > 0`: the KL reference, which for LoRA is the
//! base with adapters off) and the update seconds (forward + backward + optimizer), then the
//! process's resident memory after loading, after building the trainer (policy, reference
//! and optimizer) and its peak (`VmHWM` of `/proc/self/status`, Linux).

use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use pgrpo::lm::{LmPolicy, LoraConfig, LoraTarget, SamplingConfig};
use pgrpo::{GroupKey, GroupedPrompt, Policy, Trainer, TrainerConfig};
use rand::{rngs::StdRng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// A `.gguf` file or an HF checkpoint directory.
    #[arg(long)]
    model: String,
    /// Train LoRA adapters over the frozen model instead of every weight.
    #[arg(long)]
    lora: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// LoRA alpha (default: equal to r, PEFT's default ratio).
    #[arg(long)]
    alpha: Option<f64>,
    /// LoRA targets: `qv` (PEFT's default for Llama) or `all` (the seven projections).
    #[arg(long, default_value = "all")]
    targets: String,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// KL coefficient (> 0 computes reference log-probs each step).
    #[arg(long, default_value_t = 0.04)]
    beta: f32,
    /// Training steps (the first is reported too; the summary uses the others).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 4)]
    g: usize,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Learning rate (default: 1e-4 with LoRA, 2e-5 without).
    #[arg(long)]
    lr: Option<f64>,
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

/// A toy reward: the share of completion tokens that are not the stop token.
#[allow(clippy::ptr_arg)]
fn reward(_p: &Vec<u32>, c: &Vec<u32>, _g: &GroupKey) -> f32 {
    c.iter().filter(|&&t| t != 2).count() as f32 / 32.0
}

fn main() -> pgrpo::Result<()> {
    let args = Args::parse();
    let t = Instant::now();
    let policy = if args.model.ends_with(".gguf") {
        LmPolicy::from_gguf(&args.model, &Device::Cpu)?
    } else {
        LmPolicy::from_hf_dir(&args.model, &Device::Cpu)?
    }
    .with_sampling(SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        ..Default::default()
    })?;
    let (rss_load, _) = rss_mib();
    println!(
        "loaded in {:.1} s, RSS {rss_load:.0} MiB",
        t.elapsed().as_secs_f64()
    );
    let policy = if args.lora {
        let targets = match args.targets.as_str() {
            "qv" => vec![LoraTarget::QProj, LoraTarget::VProj],
            "all" => LoraTarget::ALL.to_vec(),
            other => {
                return Err(pgrpo::Error::InvalidConfig {
                    field: "targets",
                    reason: format!("`{other}` (use qv or all)"),
                })
            }
        };
        let cfg = LoraConfig {
            r: args.r,
            alpha: args.alpha.unwrap_or(args.r as f64),
            dropout: args.dropout,
            target_modules: targets,
        };
        policy.with_lora(cfg, &mut StdRng::seed_from_u64(0))?
    } else {
        policy
    };
    let trainable: usize = policy.vars().iter().map(|v| v.elem_count()).sum();
    let prompts: Vec<GroupedPrompt<Vec<u32>>> = ["Ana", "Bo"]
        .iter()
        .map(|name| {
            let text = format!("I am {name}. Recommend some music for me.");
            Ok(GroupedPrompt::new(policy.chat_prompt(&text)?, *name))
        })
        .collect::<pgrpo::Result<_>>()?;
    let mut cfg = TrainerConfig {
        num_generations: args.g,
        learning_rate: args.lr.unwrap_or(if args.lora { 1e-4 } else { 2e-5 }),
        seed: 1,
        ..Default::default()
    };
    cfg.objective.beta = args.beta;
    let mut trainer = Trainer::new(policy, reward, cfg)?;
    let (rss_trainer, _) = rss_mib();
    println!(
        "{}: {trainable} trainable parameters; RSS with trainer (policy, reference, optimizer) {rss_trainer:.0} MiB",
        if args.lora { "LoRA" } else { "full fine-tuning" }
    );
    let mut rows = Vec::new();
    for step in 0..args.steps {
        let t = Instant::now();
        let m = trainer.step(&prompts)?;
        let total = t.elapsed().as_secs_f64();
        let time = |k: &str| m.timings.get(k).copied().unwrap_or(0.0);
        let (sample, old, update) = (time("sample"), time("old_logp"), time("update"));
        println!(
            "step {step}: total {total:.2} s = sample {sample:.2} + old/ref logp {old:.2} + update {update:.2} (+ rest), reward {:.3}",
            m.reward()
        );
        rows.push((total, sample, old, update));
    }
    let (rss_now, peak) = rss_mib();
    println!("RSS now {rss_now:.0} MiB, peak {peak:.0} MiB");
    let tail = if rows.len() > 1 {
        &rows[1..]
    } else {
        &rows[..]
    };
    let mean = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        tail.iter().map(f).sum::<f64>() / tail.len().max(1) as f64
    };
    println!(
        "summary (steps 1..): step {:.2} s, sample {:.2} s, old/ref logp {:.2} s, update {:.2} s, peak RSS {peak:.0} MiB",
        mean(|r| r.0),
        mean(|r| r.1),
        mean(|r| r.2),
        mean(|r| r.3)
    );
    Ok(())
}
