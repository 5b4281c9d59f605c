//! Data-parallel P-GRPO over MPI: the same program on 1 or N processes trains one policy.
//!
//! ```text
//! cargo build --release --features mpi --example data_parallel
//! # one process (no launcher needed)
//! target/release/examples/data_parallel --steps 50
//! # two processes on this machine (as root, Open MPI also wants --allow-run-as-root)
//! mpirun -np 2 --bind-to none target/release/examples/data_parallel --steps 50
//! # the tiny Llama policy instead of the MLP
//! mpirun -np 2 --bind-to none target/release/examples/data_parallel --policy lm --steps 10
//! ```
//!
//! Every rank builds the same global batch each step (the prompt stream is seeded by the run's
//! seed and the step), samples and scores its contiguous shard, and takes part in one
//! all-gather of rewards, one small all-gather of loss normalisers and one gradient
//! all-reduce per optimizer step. Rank 0 prints the progress and the timing summary, writes
//! the metrics (global numbers) as JSON Lines and, with `--checkpoint-dir`, the checkpoint;
//! `--resume` continues it (with the same number of ranks).
//!
//! Policies: `mlp` — the preference bandit of `grpo_vs_pgrpo` with an MLP policy (one-hot
//! group features padded with zeros to `--features`, `--hidden` tanh units); `lm` — a
//! randomly initialised tiny Llama whose prompt starts with the group's token and whose
//! reward is the share of completion tokens equal to the group's favourite token.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use clap::Parser;
use pgrpo::distributed::{Collective, Mpi};
use pgrpo::lm::{Llama, LlamaConfig, LmPolicy, SamplingConfig};
use pgrpo::models::MlpPolicy;
use pgrpo::sink::{JsonlSink, MetricsSink};
use pgrpo::tasks::bandit::{BanditReward, PreferenceBandit};
use pgrpo::{
    Estimator, GroupKey, GroupedPrompt, Policy, RewardFn, StepMetrics, Trainer, TrainerConfig,
};
use rand::{rngs::StdRng, SeedableRng};

#[derive(Parser, Debug, Clone)]
#[command(about = "Data-parallel P-GRPO over MPI (launch with mpirun -np N)")]
struct Args {
    /// `mlp` (preference bandit, MLP policy) or `lm` (tiny random Llama).
    #[arg(long, default_value = "mlp")]
    policy: String,
    /// Training steps (in total, counting resumed ones).
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Prompts per step in the global batch (split across ranks).
    #[arg(long, default_value_t = 64)]
    prompts: usize,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 8)]
    g: usize,
    /// Advantage estimator (`p_grpo`, `grpo`, `grpo_batch_std`, `dr_grpo`, `batch_z_score`, `rloo`).
    #[arg(long, default_value = "p_grpo")]
    estimator: Estimator,
    /// MLP: input features (the first K are the group's one-hot).
    #[arg(long, default_value_t = 256)]
    features: usize,
    /// MLP: hidden units.
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// LM: hidden size (layers: 4, heads: 4).
    #[arg(long, default_value_t = 128)]
    lm_hidden: usize,
    /// LM: tokens generated per completion.
    #[arg(long, default_value_t = 8)]
    lm_tokens: usize,
    #[arg(long, default_value_t = 0.01)]
    learning_rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Steps left out of the timing summary (warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Print progress every this many steps (rank 0).
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Metrics as JSON Lines (rank 0).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Save a checkpoint here at the end (written by rank 0).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Resume from this checkpoint (every rank reads it; same number of ranks).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Append the timing summary as one JSON line to this file (rank 0).
    #[arg(long)]
    summary: Option<PathBuf>,
    /// After training, time this many gradient all-reduces of the policy's size alone (each
    /// after a barrier, so no rank waits for a slower one).
    #[arg(long, default_value_t = 10)]
    bench_all_reduce: usize,
}

fn main() {
    let args = Args::parse();
    let mpi = match Mpi::init() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&args, &mpi) {
        eprintln!("rank {}: error: {e}", mpi.rank());
        // Stop every rank: one waiting in a collective would never return otherwise.
        mpi.abort(1);
    }
}

fn run(args: &Args, mpi: &Mpi) -> pgrpo::Result<()> {
    let mut cfg = TrainerConfig {
        num_generations: args.g,
        learning_rate: args.learning_rate,
        seed: args.seed,
        ..Default::default()
    };
    cfg.advantage.estimator = args.estimator;
    // A group whose rewards have all been equal so far would otherwise be normalised by `eps`.
    cfg.advantage.std_floor = 0.05;
    let bandit = PreferenceBandit::new(vec![0.8, 0.15, 0.05], vec![1.0, 0.3, 0.1], 5, 0.5, 0.1)?;
    let k = bandit.num_groups();
    match args.policy.as_str() {
        "mlp" => {
            let make = || {
                MlpPolicy::new(
                    args.features.max(k),
                    args.hidden,
                    5,
                    args.seed,
                    &Device::Cpu,
                )
            };
            // Each rank draws its own reward noise.
            let reward = MlpReward(bandit.reward_fn(args.seed * 1000 + mpi.rank() as u64));
            let features = args.features.max(k);
            let batch_at = |step: u64| {
                groups_at(&bandit, args, step)
                    .into_iter()
                    .map(|g| {
                        let mut x = vec![0f32; features];
                        x[g as usize] = 1.0;
                        GroupedPrompt::new(x, g)
                    })
                    .collect::<Vec<_>>()
            };
            train(args, mpi, cfg, make, reward, batch_at)
        }
        "lm" => {
            let make = || tiny_lm(args);
            let batch_at = |step: u64| {
                groups_at(&bandit, args, step)
                    .into_iter()
                    .map(|g| GroupedPrompt::new(vec![1 + g, 10, 11, 12], g))
                    .collect::<Vec<_>>()
            };
            train(args, mpi, cfg, make, LmReward, batch_at)
        }
        other => Err(pgrpo::Error::InvalidConfig {
            field: "policy",
            reason: format!("unknown policy {other:?}; expected mlp or lm"),
        }),
    }
}

/// The global batch of step `step`: the same on every rank (seeded by the run and the step).
fn groups_at(bandit: &PreferenceBandit, args: &Args, step: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step);
    bandit.sample_groups(args.prompts, &mut rng)
}

/// The trainer's loop, for any policy: build (or resume), go data-parallel, step, report.
fn train<P, R>(
    args: &Args,
    mpi: &Mpi,
    cfg: TrainerConfig,
    make: impl Fn() -> pgrpo::Result<P>,
    reward: R,
    batch_at: impl Fn(u64) -> Vec<GroupedPrompt<P::Prompt>>,
) -> pgrpo::Result<()>
where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
{
    let (rank, world) = (mpi.rank(), mpi.world());
    let trainer = match &args.resume {
        Some(dir) => Trainer::resume(dir, make()?, reward)?,
        None => Trainer::new(make()?, reward, cfg)?,
    };
    let params: usize = trainer.policy().vars().iter().map(|v| v.elem_count()).sum();
    let mut trainer = trainer.with_collective(mpi)?;
    let root = rank == 0;
    if root {
        println!(
            "{} ranks, policy {} ({params} parameters), {} prompts x G={} per step",
            world, args.policy, args.prompts, args.g
        );
    }
    let mut sink = match (&args.out, root) {
        (Some(p), true) => Some(JsonlSink::create(p)?),
        _ => None,
    };
    let mut timed = Timing::default();
    let first = trainer.steps_done();
    for step in first..args.steps {
        let t = Instant::now();
        let m = trainer.step(&batch_at(step))?;
        let secs = t.elapsed().as_secs_f64();
        if step >= first + args.warmup {
            timed.add(secs, &m);
        }
        if let Some(s) = sink.as_mut() {
            s.write_row(&[("world", &world.to_string())], &m)?;
        }
        if root && (step % args.log_every == 0 || step + 1 == args.steps) {
            println!(
                "step {step:4}  reward {:+.4}  loss {:+.5}  {:.3} s/step",
                m.reward(),
                m.get("loss").unwrap_or(f64::NAN),
                secs
            );
        }
    }
    if let Some(mut s) = sink {
        s.flush()?;
    }
    if let Some(dir) = &args.checkpoint_dir {
        let path = trainer.save(dir)?;
        if root {
            println!("checkpoint: {}", path.display());
        }
    }
    trainer.check_replicas()?;
    let isolated = time_all_reduce(mpi, trainer.policy(), args.bench_all_reduce)?;
    if root && timed.steps > 0 {
        let line = serde_json::json!({
            "policy": args.policy,
            "params": params,
            "world": world,
            "threads_per_rank": candle_core::utils::get_num_threads(),
            "prompts": args.prompts,
            "g": args.g,
            "steps_timed": timed.steps,
            "steps_per_s": timed.steps as f64 / timed.total,
            "all_reduce_ms_per_step": 1e3 * timed.all_reduce / timed.steps as f64,
            "exchange_ms_per_step": 1e3 * timed.exchange / timed.steps as f64,
            "all_reduce_ms_isolated": isolated.map(|s| 1e3 * s),
        });
        println!("summary: {line}");
        if let Some(p) = &args.summary {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            writeln!(f, "{line}")?;
        }
    }
    Ok(())
}

/// Mean seconds of `reps` gradient all-reduces of the policy's size, each started together
/// (after a barrier); `None` without repetitions.
fn time_all_reduce<P: Policy>(mpi: &Mpi, policy: &P, reps: usize) -> pgrpo::Result<Option<f64>> {
    if reps == 0 {
        return Ok(None);
    }
    let vars = policy.vars();
    let mut total = 0.0;
    for _ in 0..reps {
        // Gradients of ones for every var.
        let mut loss = None;
        for v in &vars {
            let s = v.as_tensor().sum_all()?;
            loss = Some(match loss {
                None => s,
                Some(l) => (l + s)?,
            });
        }
        let Some(loss) = loss else { return Ok(None) };
        let mut grads = loss.backward()?;
        mpi.barrier()?;
        let t = Instant::now();
        mpi.all_reduce_gradients(&vars, &mut grads)?;
        total += t.elapsed().as_secs_f64();
    }
    Ok(Some(total / reps as f64))
}

#[derive(Default)]
struct Timing {
    steps: u64,
    total: f64,
    all_reduce: f64,
    exchange: f64,
}

impl Timing {
    fn add(&mut self, secs: f64, m: &StepMetrics) {
        self.steps += 1;
        self.total += secs;
        self.all_reduce += m.timings.get("all_reduce").copied().unwrap_or(0.0);
        self.exchange += m.timings.get("exchange_rewards").copied().unwrap_or(0.0);
    }
}

/// The bandit's reward for feature-vector prompts: the group is the prompt's one-hot index.
struct MlpReward(BanditReward);

impl RewardFn<Vec<f32>, u32> for MlpReward {
    fn score(&mut self, prompt: &Vec<f32>, action: &u32, group: &GroupKey) -> pgrpo::Result<f32> {
        let ctx = prompt.iter().position(|&x| x == 1.0).unwrap_or(0) as u32;
        self.0.score(&ctx, action, group)
    }

    fn state(&self) -> pgrpo::Result<Option<serde_json::Value>> {
        self.0.state()
    }

    fn restore(&mut self, state: serde_json::Value) -> pgrpo::Result<()> {
        self.0.restore(state)
    }
}

/// Share of completion tokens equal to the group's favourite token (`20 + group`).
struct LmReward;

impl RewardFn<Vec<u32>, Vec<u32>> for LmReward {
    fn score(
        &mut self,
        prompt: &Vec<u32>,
        completion: &Vec<u32>,
        _g: &GroupKey,
    ) -> pgrpo::Result<f32> {
        let want = 20 + prompt[0] - 1;
        let hits = completion.iter().filter(|&&t| t == want).count();
        Ok(hits as f32 / completion.len().max(1) as f32)
    }
}

/// A randomly initialised Llama: 4 layers, 4 heads, a 64-token vocabulary.
fn tiny_lm(args: &Args) -> pgrpo::Result<LmPolicy> {
    let cfg = LlamaConfig {
        hidden_size: args.lm_hidden,
        intermediate_size: 4 * args.lm_hidden,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(4),
        vocab_size: 64,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let model = Llama::new(cfg, &mut rng, &Device::Cpu, DType::F32)?;
    LmPolicy::new(model, None).with_sampling(SamplingConfig {
        max_new_tokens: args.lm_tokens,
        ..Default::default()
    })
}
