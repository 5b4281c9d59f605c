//! A whole GRPO step, pgrpo against TRL's `GRPOTrainer`, on the same machine, model file,
//! prompts, reward function and sampling settings, in one command:
//!
//! ```text
//! scripts/fetch-smollm2.sh                       # SmolLM2-135M-Instruct (GGUF) into models/
//! pip install torch transformers trl datasets    # TRL's side (CPU is enough)
//! cargo bench --bench vs_trl                     # 2 prompts × G = 4 and 8 × 8
//! PGRPO_TRL_SETTINGS=2x4 PGRPO_TRL_ROUNDS=3 cargo bench --bench vs_trl
//! PGRPO_TRL_PYTHON=/path/to/venv/bin/python cargo bench --bench vs_trl
//! ```
//!
//! Both sides load the same `f32` weights: the bench writes the GGUF model once as a Hugging
//! Face directory (`LmPolicy::save_hf_dir`, `target/vs_trl/smollm2-hf`), which pgrpo reads
//! with `LmPolicy::from_hf_dir` and TRL with `AutoModelForCausalLM`. Each measurement is a
//! child process (this binary with `--child`, or `benches/trl/grpo_step.py`) that runs
//! `PGRPO_TRL_STEPS` (8) steps and reports each step's seconds split into sampling (with
//! scoring) and update, the mean completion length, and its peak RSS. The sides alternate
//! setting by setting and round by round (`PGRPO_TRL_ROUNDS`, default 2), so a change of
//! machine load hits both. A row reports the median over steps 2.. of each run, the median
//! of the rounds, and the ratio pgrpo / TRL.
//!
//! Settings on both sides: plain GRPO (per-prompt normalisation), `beta = 0`, one update per
//! generation, AdamW at lr 1e-6, sampling at temperature 1 with top-k and top-p off, at most 32
//! new tokens, the reward `chars(completion) / 100`, 2 threads (`PGRPO_TRL_THREADS`). TRL runs
//! with its default gradient checkpointing on and (a second column) off. TRL's `generate` keeps
//! finished rows in the batch until every row is done; pgrpo drops them: compare seconds per
//! generated token as well as per step.
//!
//! pgrpo runs twice per round: as it is by default (`f32` throughout) and with bf16 decode
//! weights ([`DecodePrecision::Bf16`](pgrpo::lm::DecodePrecision): decode steps of at most 16
//! rows read the weight matrices in bf16; prefill, logits, sampling and the update stay `f32`;
//! with one update per generation no old log-probs are needed), the row "pgrpo, bf16 decode"
//! with a ratio column of its own; `PGRPO_TRL_BF16=0` leaves that side out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use pgrpo::lm::{DecodePrecision, LmPolicy, SamplingConfig, TextReward};
use pgrpo::{Estimator, GroupKey, GroupedPrompt, Trainer, TrainerConfig};
use serde_json::{json, Value};

#[path = "common/proc.rs"]
mod proc;
use proc::{load_avg, peak_rss_mb};

/// pgrpo with bf16 decode weights (`SamplingConfig::decode_weights`), a side of its own;
/// `PGRPO_TRL_BF16=0` leaves it out.
const BF16: &str = "pgrpo, bf16 decode";
#[path = "common/smollm2.rs"]
mod smollm2;
use smollm2::{GGUF, QUESTIONS};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// pgrpo's side: `steps` GRPO steps, one JSON object on stdout.
fn child(model: &Path, prompts: usize, g: usize, steps: usize) -> pgrpo::Result<()> {
    let decode_weights = match std::env::var("PGRPO_TRL_DECODE").as_deref() {
        Ok("bf16") => DecodePrecision::Bf16,
        _ => DecodePrecision::F32,
    };
    let policy = LmPolicy::from_hf_dir(model, &Device::Cpu)?.with_sampling(SamplingConfig {
        max_new_tokens: 32,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        decode_weights,
        ..Default::default()
    })?;
    let reward = TextReward::new(&policy, |_: &str, answer: &str, _: &GroupKey| {
        answer.chars().count() as f32 / 100.0
    })?;
    let batch = QUESTIONS[..prompts]
        .iter()
        .map(|q| Ok(GroupedPrompt::ungrouped(policy.chat_prompt(q)?)))
        .collect::<pgrpo::Result<Vec<_>>>()?;
    let mut config = TrainerConfig {
        num_generations: g,
        learning_rate: 1e-6,
        seed: 0,
        ..Default::default()
    };
    config.advantage.estimator = Estimator::Grpo;
    let mut trainer = Trainer::new(policy, reward, config)?;
    let mut out = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        let m = trainer.step(&batch)?;
        let total = t.elapsed().as_secs_f64();
        let sample = ["sample", "reward", "exchange_rewards", "old_logp"]
            .iter()
            .map(|k| m.timings.get(*k).copied().unwrap_or(0.0))
            .sum::<f64>();
        out.push(json!({
            "total": total,
            "sample": sample,
            "update": total - sample,
            "mean_length": m.get("completions/mean_length"),
        }));
    }
    println!("{}", json!({ "steps": out, "peak_rss_mib": peak_rss_mb() }));
    Ok(())
}

struct Run {
    total: f64,
    sample: f64,
    update: f64,
    length: f64,
    rss: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn parse_run(stdout: &str) -> Option<Run> {
    let v: Value = serde_json::from_str(stdout.lines().last()?).ok()?;
    let steps = v["steps"].as_array()?;
    let tail = if steps.len() > 1 { &steps[1..] } else { steps };
    let col = |k: &str| median(tail.iter().filter_map(|s| s[k].as_f64()).collect());
    Some(Run {
        total: col("total"),
        sample: col("sample"),
        update: col("update"),
        length: col("mean_length"),
        rss: v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
    })
}

fn run(mut cmd: Command, what: &str) -> Option<Run> {
    let threads = env_usize("PGRPO_TRL_THREADS", 2).to_string();
    cmd.env("RAYON_NUM_THREADS", &threads)
        .env("OMP_NUM_THREADS", &threads);
    match cmd.output() {
        Ok(o) if o.status.success() => {
            let r = parse_run(&String::from_utf8_lossy(&o.stdout));
            if r.is_none() {
                eprintln!("{what}: no result line");
            }
            r
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            eprintln!("{what} failed:");
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
            None
        }
        Err(e) => {
            eprintln!("{what}: cannot start: {e}");
            None
        }
    }
}

fn main() -> pgrpo::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let a = |k: usize| args[i + k].clone();
        return child(
            Path::new(&a(1)),
            a(2).parse().unwrap_or(2),
            a(3).parse().unwrap_or(4),
            a(4).parse().unwrap_or(8),
        );
    }
    if args.iter().any(|a| a == "--list") {
        return Ok(()); // `cargo bench -- --list`
    }
    if !Path::new(GGUF).exists() {
        eprintln!("{GGUF} is missing: run scripts/fetch-smollm2.sh first");
        return Ok(());
    }
    let hf = PathBuf::from("target/vs_trl/smollm2-hf");
    if !hf.join("model.safetensors").exists() {
        LmPolicy::from_gguf(GGUF, &Device::Cpu)?.save_hf_dir(&hf)?;
    }
    let python = std::env::var("PGRPO_TRL_PYTHON").unwrap_or_else(|_| "python3".into());
    let steps = env_usize("PGRPO_TRL_STEPS", 8);
    let rounds = env_usize("PGRPO_TRL_ROUNDS", 2);
    let settings = std::env::var("PGRPO_TRL_SETTINGS").unwrap_or_else(|_| "2x4,8x8".into());
    let me = std::env::current_exe().expect("own path");
    println!(
        "| prompts × G | side | step s | sampling s | update s | tokens per completion | ms per generated token | peak RSS MiB | step pgrpo / side | step pgrpo bf16 decode / side | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for setting in settings.split(',') {
        let (p, g) = setting.split_once('x').expect("settings look like 2x4,8x8");
        let (p, g): (usize, usize) = (p.parse().expect("prompts"), g.parse().expect("G"));
        let mut sides: Vec<(&str, Vec<Run>)> = vec![
            ("pgrpo", vec![]),
            (BF16, vec![]),
            ("TRL", vec![]),
            ("TRL, no grad. ckpt", vec![]),
        ];
        if std::env::var("PGRPO_TRL_BF16").as_deref() == Ok("0") {
            sides.retain(|(name, _)| *name != BF16);
        }
        for _ in 0..rounds {
            for (name, runs) in sides.iter_mut() {
                let mut cmd = if name.starts_with("pgrpo") {
                    let mut c = Command::new(&me);
                    if *name == BF16 {
                        c.env("PGRPO_TRL_DECODE", "bf16");
                    } else {
                        c.env_remove("PGRPO_TRL_DECODE");
                    }
                    c.arg("--child")
                        .arg(&hf)
                        .arg(p.to_string())
                        .arg(g.to_string())
                        .arg(steps.to_string());
                    c
                } else {
                    let mut c = Command::new(&python);
                    c.arg("benches/trl/grpo_step.py")
                        .arg("--model")
                        .arg(&hf)
                        .args(["--prompts", &p.to_string(), "--g", &g.to_string()])
                        .args(["--steps", &steps.to_string()]);
                    if *name == "TRL" {
                        c.arg("--gradient-checkpointing");
                    }
                    c
                };
                cmd.stderr(std::process::Stdio::piped());
                if let Some(r) = run(cmd, &format!("{name} {p}x{g}")) {
                    runs.push(r);
                }
            }
            // The next round starts with the next side.
            sides.rotate_left(1);
        }
        sides.sort_by_key(|(name, _)| match *name {
            "pgrpo" => 0,
            BF16 => 1,
            "TRL" => 2,
            _ => 3,
        });
        let step_of = |side: &str| {
            sides
                .iter()
                .find(|(name, runs)| *name == side && !runs.is_empty())
                .map(|(_, runs)| median(runs.iter().map(|r| r.total).collect()))
        };
        let (ours, ours_bf16) = (step_of("pgrpo"), step_of(BF16));
        for (name, runs) in &sides {
            let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
            let (total, length) = (m(|r| r.total), m(|r| r.length));
            let per_token = 1e3 * m(|r| r.sample) / (length * (p * g) as f64);
            if runs.is_empty() {
                println!(
                    "| {p} × {g} | {name} | failed | | | | | | | | {} |",
                    load_avg()
                );
                continue;
            }
            let ratio = |a: Option<f64>| match a {
                Some(a) if !name.starts_with("pgrpo") => format!("**{:.2}×**", a / total),
                _ => "–".to_owned(),
            };
            println!(
                "| {p} × {g} | {name} | {total:.2} | {:.2} | {:.2} | {length:.1} | {per_token:.1} | {:.0} | {} | {} | {} |",
                m(|r| r.sample),
                m(|r| r.update),
                m(|r| r.rss),
                ratio(ours),
                ratio(ours_bf16),
                load_avg()
            );
        }
    }
    Ok(())
}
