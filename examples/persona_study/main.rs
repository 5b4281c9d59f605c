//! A persona study on SmolLM2-135M-Instruct where learning is visible: GRPO vs P-GRPO (and
//! P-GRPO with shuffled labels) × seeds, LoRA, held-out evaluation, paired intervals.
//!
//! ```text
//! scripts/fetch-smollm2.sh                                      # the model, into models/
//! cargo run --release --example persona_study                   # the study (resumable)
//! cargo run --release --example persona_study -- --smoke        # 2 steps, tiny eval (CI)
//! cargo run --release --example persona_study -- --base-rates   # each want's base rate
//! cargo run --release --example persona_study -- --report-only  # tables and plots again
//! ```
//!
//! # The task
//!
//! Six users ask everyday questions ("I am Ava. Recommend a book for me."). Each belongs to
//! one preference group — here the user *is* the group, and the group's label is its name —
//! and each group wants something different from the form of the answer. The model sees
//! the name in the prompt (nothing in a name says what its owner wants: that has to be
//! learned from rewards); the trainer gets the name as the preference-group label; the reward
//! function knows the true group.
//!
//! | group | share | want | reward rule (1, else 0) | conflicts with | base rate |
//! |---|---:|---|---|---|---:|
//! | Ava  | 40% | enthusiastic | the answer contains `!` | Ben | 0.25 |
//! | Ben  | 25% | a calm answer that asks back | contains `?` and no `!` | Ava | 0.14 |
//! | Cleo | 15% | personal | contains "Cleo" as a word | Eli | 0.11 |
//! | Dev  | 10% | brief | at most 12 words | Eli | 0.07 |
//! | Eli  |  6% | structured, anonymous | a line break inside the answer, and no "Eli" | Cleo, Dev | 0.12 |
//! | Fay  |  4% | concrete | contains a digit | — | 0.06 |
//!
//! Words are maximal runs of letters, digits and apostrophes; names match whole words in any
//! case (`Eli's` counts, `Elizabeth` does not). The rules are in `task.rs` with their tests.
//! The wants conflict: a `!` that Ava rewards costs Ben his reward, a habit of naming the
//! user (which Cleo rewards) costs Eli his, and the twelve words Dev wants leave little room
//! for Eli's line break. A policy that learns the majority's habit for everyone (say, a `!`
//! in every answer) therefore hurts the minorities; learning each group's want needs the
//! name in the prompt.
//!
//! Base rates: the rate at which the starting model (sampling at temperature 1, ≤ 24 new
//! tokens) satisfies each group's want on that group's prompts, measured on 80 samples per
//! group over 10 requests while designing the task (`--base-rates` measures them again, on
//! all twelve requests; the study's own step-0 evaluation is the "before" column of the
//! results).
//!
//! **Behaviour the base model never produces.** GRPO, P-GRPO and their variants learn only
//! from differences between sampled completions: a want the model never satisfies gives every
//! completion the same reward and no signal (per-prompt normalisation gives advantage 0;
//! P-GRPO's history gives `(0 − μ) / σ`, which only pushes away from everything sampled).
//! The task is designed around that: every want is a surface feature the model already
//! produces 5–40% of the time on its group's prompts (measured before the design was fixed,
//! see above). Two candidate wants were dropped for that reason: a bulleted or numbered list
//! (0–3% within 24 tokens) and a greeting such as "Hi" or "Hello" at the start (1–7%
//! depending on the name).
//!
//! Requests: eight for training, four held out (`task.rs`). The held-out evaluation samples
//! fresh completions for the four held-out requests of every group (`--eval-samples` each)
//! at `--evals` evenly spaced steps (the first is the starting model), with a sampling
//! stream fixed by the seed and step, so every estimator of a seed is evaluated on the same
//! stream.
//!
//! # The runs
//!
//! Every (estimator, seed) pair is a separate run in `<out>/runs/<estimator>-seed<k>/` with
//! its own trainer checkpoints (`Trainer::save`, every `--checkpoint-every` steps); a run
//! that finds a checkpoint resumes from it (`Trainer::resume`), so a killed study continues
//! where it stopped when the same command is run again. Runs are paired by seed: the same
//! initial adapters, training prompts and sampling seeds for every estimator of a seed. The
//! estimator list is a flag (`--estimators`): any name `pgrpo::Estimator` parses, and a
//! `_shuffled` suffix gives P-GRPO's ablation (labels drawn by share, independent of the
//! true group). Runs are spread over `--workers` threads (single-threaded candle each).
//!
//! The policy is LoRA over the frozen model (`LmPolicy::with_lora`): every run shares the
//! loaded weights and trains its own adapters. The study's settings are saved in
//! `<out>/study.json`; rerunning with other settings (other than `--estimators`, `--seeds`
//! and `--workers`) into the same directory is refused.
//!
//! Outputs in `<out>`: `results.md` (tables: per group before / final / paired differences
//! with 95% t-intervals; seconds per step; peak RSS), `heldout.svg`/`.png` (per-group
//! held-out curves), `train.svg`/`.png` (training-batch reward per group, moving average),
//! `curves.csv`.

mod report;
mod run;
mod task;

#[path = "../common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use pgrpo::lm::{LmPolicy, LoraTarget, SamplingConfig};
use pgrpo::{Policy, TrainerConfig};
use serde::{Deserialize, Serialize};

use run::{Arm, Outcome, Shared};
use task::{HELDOUT_REQUESTS, TRAIN_REQUESTS};

#[derive(Parser, Debug, Clone, Serialize, Deserialize)]
#[command(about = "GRPO vs P-GRPO on SmolLM2-135M with six preference groups (resumable)")]
#[serde(deny_unknown_fields)]
struct Args {
    /// A TOML or JSON file of settings (keys = flag names with `_`); flags given on the
    /// command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The model: a `.gguf` file or a Hugging Face checkpoint directory.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Output directory (run directories, tables, plots).
    #[arg(long, default_value = "runs/persona_study")]
    out: PathBuf,
    /// Estimators, comma-separated (any `pgrpo::Estimator` name; `_shuffled` = P-GRPO's
    /// label-shuffling ablation).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "grpo,p_grpo,p_grpo_shuffled"
    )]
    estimators: Vec<String>,
    /// Seeds per estimator (seeds `first_seed .. first_seed + seeds`).
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Training steps per run.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Prompts per step (groups drawn by share).
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 4)]
    g: usize,
    /// Maximum new tokens per completion (the stop token included).
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// Sampling temperature (training and evaluation).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    /// LoRA α (the update is scaled by α / r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// LoRA targets: `qv`, `all`, or a comma-free list joined by `+` (`q_proj+v_proj+o_proj`).
    #[arg(long, default_value = "all")]
    lora_targets: String,
    /// KL coefficient β against the starting model (0: no reference pass).
    #[arg(long, default_value_t = 0.0)]
    beta: f32,
    /// P-GRPO: rewards a group needs before its history is used.
    #[arg(long, default_value_t = 8)]
    min_count: u64,
    /// P-GRPO offset weight λ (1 = the paper).
    #[arg(long, default_value_t = 1.0)]
    offset_weight: f32,
    /// Held-out evaluations per run, evenly spaced, the first at step 0 and the last at the
    /// end.
    #[arg(long, default_value_t = 3)]
    evals: usize,
    /// Completions per held-out prompt (four held-out requests per group).
    #[arg(long, default_value_t = 8)]
    eval_samples: usize,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Runs trained at once (each with single-threaded candle when > 1).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Measure each want's base rate on the starting model instead of training.
    #[arg(long)]
    base_rates: bool,
    /// Completions per prompt for `--base-rates` (every group × all twelve requests).
    #[arg(long, default_value_t = 8)]
    base_samples: usize,
    /// CI smoke: 1 seed, 2 steps of 2 prompts × G = 2, ≤ 8 tokens, a tiny evaluation, into
    /// `<out>-smoke`.
    #[arg(long)]
    smoke: bool,
    /// Only write the tables and plots from what `<out>` holds.
    #[arg(long)]
    report_only: bool,
    /// Stop every run after this many steps in this invocation (after a checkpoint), as a
    /// kill would; the next invocation resumes. For testing the resume path.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Fewer progress lines.
    #[arg(long)]
    quiet: bool,
}

/// Everything that decides a run's numbers (what `<out>/study.json` holds). Estimators and
/// seeds are not in it: adding either to a study adds runs without changing the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub model: PathBuf,
    pub steps: usize,
    pub prompts: usize,
    pub g: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub lr: f64,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_targets: String,
    pub beta: f32,
    pub min_count: u64,
    pub offset_weight: f32,
    pub evals: usize,
    pub eval_samples: usize,
    pub checkpoint_every: usize,
}

impl Settings {
    fn from_args(a: &Args) -> Self {
        let mut s = Self {
            model: a.model.clone(),
            steps: a.steps,
            prompts: a.prompts,
            g: a.g,
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            lr: a.lr,
            lora_r: a.lora_r,
            lora_alpha: a.lora_alpha,
            lora_targets: a.lora_targets.clone(),
            beta: a.beta,
            min_count: a.min_count,
            offset_weight: a.offset_weight,
            evals: a.evals,
            eval_samples: a.eval_samples,
            checkpoint_every: a.checkpoint_every,
        };
        if a.smoke {
            s.steps = 2;
            s.prompts = 2;
            s.g = 2;
            s.max_new_tokens = 8;
            s.evals = 2;
            s.eval_samples = 1;
            s.checkpoint_every = 1;
        }
        s
    }

    fn validate(&self) -> Result<(), String> {
        let at_least_1 = [
            ("steps", self.steps),
            ("prompts", self.prompts),
            ("g", self.g),
            ("eval_samples", self.eval_samples),
            ("checkpoint_every", self.checkpoint_every),
        ];
        for (k, v) in at_least_1 {
            if v == 0 {
                return Err(format!("--{} must be at least 1", k.replace('_', "-")));
            }
        }
        if self.evals < 2 {
            return Err("--evals must be at least 2 (before and after training)".into());
        }
        self.lora_targets().map_err(|e| e.to_string())?;
        self.sampling().validate().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The LoRA targets named by `lora_targets`.
    pub fn lora_targets(&self) -> pgrpo::Result<Vec<LoraTarget>> {
        match self.lora_targets.as_str() {
            "all" => Ok(LoraTarget::ALL.to_vec()),
            "qv" => Ok(vec![LoraTarget::QProj, LoraTarget::VProj]),
            list => list
                .split('+')
                .map(|n| {
                    LoraTarget::from_name(n).ok_or_else(|| pgrpo::Error::InvalidConfig {
                        field: "lora_targets",
                        reason: format!(
                            "{n:?} is not a projection (q_proj, k_proj, v_proj, o_proj, \
                             gate_proj, up_proj, down_proj), `qv` or `all`"
                        ),
                    })
                })
                .collect(),
        }
    }

    pub fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            ..Default::default()
        }
    }

    /// The trainer's config for one run: everything at the library's defaults (TRL's) except
    /// G, the learning rate, the seed, β, the estimator and P-GRPO's two knobs.
    pub fn trainer_config(&self, arm: &Arm, seed: u64) -> TrainerConfig {
        let mut cfg = TrainerConfig {
            num_generations: self.g,
            learning_rate: self.lr,
            seed,
            ..Default::default()
        };
        cfg.advantage.estimator = arm.estimator;
        cfg.advantage.pgrpo.min_count = self.min_count;
        cfg.advantage.pgrpo.offset_weight = self.offset_weight;
        cfg.objective.beta = self.beta;
        cfg
    }

    /// Steps at which the held-out evaluation runs: `evals` evenly spaced from 0 to `steps`.
    pub fn eval_steps(&self) -> Vec<u64> {
        let k = self.evals.max(2) - 1;
        let mut v: Vec<u64> = (0..=k)
            .map(|i| ((i * self.steps) as f64 / k as f64).round() as u64)
            .collect();
        v.dedup();
        v
    }
}

/// Loads the model and tokenizes every prompt.
fn load(model: &Path) -> Result<Shared, Box<dyn std::error::Error>> {
    if !model.exists() {
        return Err(format!(
            "{} not found: run scripts/fetch-smollm2.sh first (or pass --model)",
            model.display()
        )
        .into());
    }
    let base = if model.extension().is_some_and(|e| e == "gguf") {
        LmPolicy::from_gguf(model, &Device::Cpu)?
    } else {
        LmPolicy::from_hf_dir(model, &Device::Cpu)?
    };
    // A throwaway adapter makes the model frozen; its snapshot is the base that every run
    // shares (no copy of the weights per run).
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let base = base
        .with_lora(pgrpo::lm::LoraConfig::default(), &mut rng)?
        .snapshot()?;
    let train = run::prompt_table(&base, &TRAIN_REQUESTS)?;
    let heldout = run::prompt_table(&base, &HELDOUT_REQUESTS)?;
    Ok(Shared {
        base,
        train,
        heldout,
    })
}

/// `--base-rates`: every want's rate on every group's prompts (all twelve requests).
fn base_rates(shared: &Shared, s: &Settings, n: usize, out: &Path) -> Result<(), String> {
    let policy = shared
        .base
        .snapshot()
        .and_then(|p| p.with_sampling(s.sampling()))
        .map_err(|e| e.to_string())?;
    let tokenizer = policy
        .tokenizer()
        .cloned()
        .ok_or("the model has no tokenizer")?;
    let reward = run::TextReward::new(tokenizer);
    let all: Vec<Vec<Vec<u32>>> = shared
        .train
        .iter()
        .zip(&shared.heldout)
        .map(|(t, h)| t.iter().chain(h).cloned().collect())
        .collect();
    let t = Instant::now();
    let ev = run::evaluate(&policy, &reward, &all, n, 12_345, 0).map_err(|e| e.to_string())?;
    let text = report::base_rate_table(&ev, t.elapsed().as_secs_f64(), s);
    println!("{text}");
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("base_rates.md"), &text).map_err(|e| e.to_string())?;
    Ok(())
}

/// Checks `<out>/study.json` against the settings (writing it on the first run).
fn check_study_file(out: &Path, s: &Settings) -> Result<(), String> {
    let path = out.join("study.json");
    let text = serde_json::to_string_pretty(s).map_err(|e| e.to_string())?;
    match std::fs::read_to_string(&path) {
        Ok(old) => {
            let old: Settings =
                serde_json::from_str(&old).map_err(|e| format!("{}: {e}", path.display()))?;
            if &old != s {
                let a = serde_json::to_value(&old).map_err(|e| e.to_string())?;
                let b = serde_json::to_value(s).map_err(|e| e.to_string())?;
                let diff: Vec<String> = a
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                    .map(|(k, v)| format!("{k}: {v} there, {} now", b[k.as_str()]))
                    .collect();
                return Err(format!(
                    "{} was started with other settings ({}); use another --out or the same \
                     settings",
                    out.display(),
                    diff.join("; ")
                ));
            }
            Ok(())
        }
        Err(_) => {
            std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
            std::fs::write(&path, text).map_err(|e| e.to_string())
        }
    }
}

/// A unit of work for the worker threads.
#[derive(Clone, Copy)]
enum Job {
    /// The step-0 evaluation of a seed.
    Base(u64),
    /// One (estimator, seed) run.
    Train(usize, u64),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_logging();
    let mut args: Args = common::config::parse()?;
    if args.smoke {
        args.seeds = 1;
        let mut name = args.out.as_os_str().to_owned();
        name.push("-smoke");
        args.out = PathBuf::from(name);
    }
    let s = Settings::from_args(&args);
    s.validate()?;
    // Each worker runs in its own rayon pool: with more than one worker, a pool of one
    // thread each (and `RAYON_NUM_THREADS=1`, which candle reads to keep its matmuls
    // single-threaded). A shared global pool of one thread would serialise the workers'
    // fused kernels.
    let worker_threads = if args.workers > 1 && !args.base_rates {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // Before any candle op or thread exists, so nothing reads it concurrently.
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
        1
    } else {
        0 // rayon's default
    };
    let arms: Vec<Arm> = args
        .estimators
        .iter()
        .map(|n| Arm::parse(n))
        .collect::<pgrpo::Result<_>>()?;
    let seeds: Vec<u64> = (args.first_seed..args.first_seed + args.seeds).collect();
    let out = args.out.clone();

    if args.report_only {
        let text = report::write(&out, &s, &arms, &seeds, None)?;
        println!("{text}");
        return Ok(());
    }

    let t_load = Instant::now();
    let shared = load(&s.model)?;
    eprintln!(
        "loaded {} in {:.1}s; prompt of Ava: {} tokens",
        s.model.display(),
        t_load.elapsed().as_secs_f64(),
        shared.train[0][0].len()
    );
    if args.base_rates {
        base_rates(&shared, &s, args.base_samples, &out)?;
        return Ok(());
    }
    check_study_file(&out, &s)?;
    eprintln!(
        "{} runs ({} estimators × {} seeds) of {} steps, {} workers, into {}",
        arms.len() * seeds.len(),
        arms.len(),
        seeds.len(),
        s.steps,
        args.workers,
        out.display()
    );

    let jobs: Vec<Job> = seeds
        .iter()
        .map(|&k| Job::Base(k))
        .chain(
            seeds
                .iter()
                .flat_map(|&k| (0..arms.len()).map(move |a| Job::Train(a, k))),
        )
        .collect();
    let next = Mutex::new(0usize);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let stopped = Mutex::new(0usize);
    let t0 = Instant::now();
    // One worker: take jobs until none is left or another worker failed.
    let work = || loop {
        let job = {
            let mut n = next.lock().expect("job counter");
            let j = jobs.get(*n).copied();
            *n += 1;
            j
        };
        let Some(job) = job else { break };
        if failure.lock().expect("failure").is_some() {
            break;
        }
        let t = Instant::now();
        let result = match job {
            Job::Base(k) => shared.base_eval(&s, &out, k).map(|ev| {
                if !args.quiet {
                    let r: Vec<String> = ev.rewards().iter().map(|x| format!("{x:.2}")).collect();
                    eprintln!(
                        "[base seed {k}] held-out rewards [{}] ({:.0}s)",
                        r.join(", "),
                        t.elapsed().as_secs_f64()
                    );
                }
            }),
            Job::Train(a, k) => {
                run::train(&shared, &s, &out, &arms[a], k, args.stop_after, !args.quiet).map(|o| {
                    match o {
                        Outcome::Finished => eprintln!(
                            "done: {} seed {k} in {:.0}s",
                            arms[a].name,
                            t.elapsed().as_secs_f64()
                        ),
                        Outcome::Stopped { at } => {
                            *stopped.lock().expect("stopped") += 1;
                            eprintln!(
                                "stopped: {} seed {k} at step {at} (--stop-after)",
                                arms[a].name
                            );
                        }
                        Outcome::AlreadyDone => {}
                    }
                })
            }
        };
        if let Err(e) = result {
            *failure.lock().expect("failure") = Some(e);
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..args.workers.max(1) {
            scope.spawn(|| {
                match rayon::ThreadPoolBuilder::new()
                    .num_threads(worker_threads)
                    .build()
                {
                    Ok(pool) => pool.install(work),
                    Err(e) => {
                        *failure.lock().expect("failure") = Some(format!("thread pool: {e}"));
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner()? {
        return Err(e.into());
    }
    let wall = t0.elapsed().as_secs_f64();
    let stopped = stopped.into_inner()?;
    if stopped > 0 {
        eprintln!("{stopped} runs stopped early; run the same command again to resume them");
        return Ok(());
    }
    let text = report::write(&out, &s, &arms, &seeds, Some((wall, args.workers)))?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let args = Args::parse_from(["persona_study"]);
        Settings::from_args(&args)
    }

    #[test]
    fn eval_steps_are_evenly_spaced_from_start_to_end() {
        let mut s = settings();
        s.steps = 100;
        s.evals = 3;
        assert_eq!(s.eval_steps(), [0, 50, 100]);
        s.evals = 4;
        assert_eq!(s.eval_steps(), [0, 33, 67, 100]);
        s.steps = 2;
        s.evals = 5;
        assert_eq!(s.eval_steps(), [0, 1, 2], "no step twice");
    }

    #[test]
    fn smoke_is_small_and_validates() {
        let args = Args::parse_from(["persona_study", "--smoke"]);
        let s = Settings::from_args(&args);
        s.validate().unwrap();
        assert_eq!((s.steps, s.prompts, s.g, s.evals), (2, 2, 2, 2));
        settings().validate().unwrap();
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag_named() {
        let mut s = settings();
        s.steps = 0;
        assert!(s.validate().unwrap_err().contains("--steps"));
        let mut s = settings();
        s.lora_targets = "q_proj+w_proj".into();
        assert!(s.validate().unwrap_err().contains("w_proj"));
        let mut s = settings();
        s.lora_targets = "q_proj+o_proj".into();
        assert_eq!(
            s.lora_targets().unwrap(),
            [LoraTarget::QProj, LoraTarget::OProj]
        );
        let mut s = settings();
        s.evals = 1;
        assert!(s.validate().unwrap_err().contains("--evals"));
        let mut s = settings();
        s.top_p = 0.0;
        assert!(s.validate().unwrap_err().contains("top_p"));
    }

    #[test]
    fn a_study_directory_refuses_other_settings() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings();
        check_study_file(dir.path(), &s).unwrap();
        check_study_file(dir.path(), &s).unwrap();
        let mut other = s.clone();
        other.lr = 1e-3;
        let err = check_study_file(dir.path(), &other).unwrap_err();
        assert!(err.contains("lr: 0.0005 there, 0.001 now"), "{err}");
    }

    #[test]
    fn the_trainer_config_carries_the_arm_and_seed() {
        let s = settings();
        let arm = Arm::parse("p_grpo_shuffled").unwrap();
        let cfg = s.trainer_config(&arm, 3);
        cfg.validate().unwrap();
        assert_eq!(cfg.advantage.estimator, pgrpo::Estimator::PGrpo);
        assert_eq!((cfg.seed, cfg.num_generations), (3, s.g));
        assert_eq!(cfg.learning_rate, s.lr);
    }
}
