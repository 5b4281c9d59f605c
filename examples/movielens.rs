//! GRPO vs P-GRPO on MovieLens-1M's users: recommend a genre of the next movie a user will
//! like, with the users' age brackets (or occupations, or genders) as preference groups.
//!
//! ```text
//! cargo run --release --example movielens                    # on a generated sample
//! cargo run --release --example movielens -- --data ml-1m    # on the real data
//! cargo run --release --example movielens -- --help          # every knob
//! ```
//!
//! **The data.** With `--data DIR` the example reads `users.dat`, `movies.dat` and
//! `ratings.dat` of MovieLens-1M from `DIR` (download `ml-1m.zip` from GroupLens and unzip it;
//! the licence does not allow redistributing it). Without it, it writes a synthetic sample in
//! exactly that format to `--sample-dir` (default `runs/movielens/sample`) and reads it back
//! through the same loader; in the sample each age bracket likes four genres
//! (`pgrpo::tasks::movielens::synthetic`), so the groups differ in what they like.
//!
//! **The task** (`pgrpo::tasks::movielens::NextGenreTask`). Each liked rating (≥ 4 stars) after a
//! user's first is a prompt: the user's demographics and the genre profile of their last 10
//! ratings. The policy picks one genre; the reward is 1 if the movie has that genre, else 0.
//! The last 20% of each user's prompts (in time) are held out. The prompt's preference group
//! is the user's age bracket (`--grouping age`, 7 groups of 4% to 35% of users), occupation
//! (21 groups) or gender (2).
//!
//! **The run.** For each estimator and seed, a policy (`--policy tabular`, the default: a
//! softmax over genres with shared logits plus one row per group, so it sees only the group;
//! `--policy mlp`: a one-hidden-layer MLP on all the features) is trained on batches of training
//! prompts drawn uniformly, so groups appear as often as they have liked ratings. Every
//! estimator sees the same batches for a seed. Every `--eval-every` steps the expected hit rate
//! `Σ_{a ∈ genres(next movie)} π(a | x)` is measured on the held-out prompts of each group.
//!
//! Outputs next to `--out` (default `runs/movielens.csv`, the hit-rate curves): `.svg` and
//! `.png` plots (one panel per group, mean and 95% band over seeds per estimator),
//! `.metrics.jsonl` / `.metrics.csv` (trainer metrics every `--log-every` steps) and
//! `.config.toml` (the effective settings, also printed at start; rerun with `--config`).

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Device, Var};
use clap::Parser;
use common::plot::{band_over_runs, Figure, Panel};
use common::{mean_ci, InOrder};
use indicatif::ProgressBar;
use pgrpo::models::{MlpPolicy, TabularPolicy};
use pgrpo::sink::{standard_columns, CsvSink, JsonlSink, MetricsSink};
use pgrpo::tasks::movielens::{
    synthetic, GenreExample, Grouping, MovieLens, NextGenreTask, TaskConfig,
};
use pgrpo::{Estimator, GroupedPrompt, Policy, StepMetrics, TokenLogProbs, Trainer, TrainerConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Clone, Serialize, Deserialize)]
#[command(about = "GRPO vs P-GRPO on MovieLens-1M: next liked genre, users grouped by age")]
#[serde(deny_unknown_fields)]
struct Args {
    /// A TOML or JSON file of settings (keys = flag names with `_`); flags given on the
    /// command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// MovieLens-1M folder (users.dat, movies.dat, ratings.dat). Without it, a synthetic
    /// sample is generated in --sample-dir.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where the synthetic sample is written when --data is not given.
    #[arg(long, default_value = "runs/movielens/sample")]
    sample_dir: PathBuf,
    /// Users in the synthetic sample.
    #[arg(long, default_value_t = 600)]
    sample_users: usize,
    /// Preference groups: `age`, `occupation` or `gender`.
    #[arg(long, default_value = "age")]
    grouping: String,
    /// Policy: `tabular` (shared logits plus one row per group) or `mlp` (features → genre;
    /// try `--lr 0.003`).
    #[arg(long, default_value = "tabular")]
    policy: String,
    /// Hidden units of the MLP.
    #[arg(long, default_value_t = 32)]
    hidden: usize,
    /// Completions (genres sampled) per prompt, G.
    #[arg(long, default_value_t = 4)]
    g: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 32)]
    prompts: usize,
    /// Training steps per run.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Seeds per estimator.
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// Adam learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Estimators to compare.
    #[arg(long, value_delimiter = ',', default_value = "grpo,p_grpo")]
    estimators: Vec<String>,
    /// Previous ratings in the genre profile.
    #[arg(long, default_value_t = 10)]
    history_len: usize,
    /// Stars for a rating to count as liked.
    #[arg(long, default_value_t = 4)]
    min_stars: u8,
    /// Held-out fraction of each user's prompts (the latest).
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Evaluate on the held-out prompts every this many steps.
    #[arg(long, default_value_t = 10)]
    eval_every: usize,
    /// At most this many held-out prompts per group are evaluated (a fixed random subset).
    #[arg(long, default_value_t = 5000)]
    eval_max: usize,
    /// Where to write the hit-rate curves (CSV); the plots, metrics and config go next to it.
    #[arg(long, default_value = "runs/movielens.csv")]
    out: PathBuf,
    /// Write the trainer's metrics every this many steps (and at the last step).
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Worker threads (runs are independent; results do not depend on this).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `runs/x.csv` → `runs/x.<suffix>`.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map_or_else(|| "movielens".into(), |s| s.to_string_lossy().into_owned());
    out.with_file_name(format!("{stem}.{suffix}"))
}

/// A policy whose prompts are indices into a table of inputs, so that the reward function can
/// look up each prompt's target by the same index.
struct Indexed<P: Policy> {
    inner: P,
    inputs: Arc<Vec<P::Prompt>>,
}

impl<P: Policy> Indexed<P> {
    fn input(&self, i: u32, row: usize) -> pgrpo::Result<&P::Prompt> {
        self.inputs
            .get(i as usize)
            .ok_or(pgrpo::Error::IndexOutOfRange {
                what: "prompts",
                row,
                value: i as usize,
                bound: self.inputs.len(),
                of: "inputs",
            })
    }
}

impl<P> Policy for Indexed<P>
where
    P: Policy,
    P::Prompt: Clone,
{
    type Prompt = u32;
    type Completion = P::Completion;

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn sample(
        &self,
        prompts: &[u32],
        n: usize,
        rng: &mut StdRng,
    ) -> pgrpo::Result<Vec<P::Completion>> {
        let xs = prompts
            .iter()
            .enumerate()
            .map(|(row, &i)| self.input(i, row).cloned())
            .collect::<pgrpo::Result<Vec<_>>>()?;
        self.inner.sample(&xs, n, rng)
    }

    fn log_probs(
        &self,
        prompts: &[&u32],
        completions: &[P::Completion],
    ) -> pgrpo::Result<TokenLogProbs> {
        let xs = prompts
            .iter()
            .enumerate()
            .map(|(row, &&i)| self.input(i, row))
            .collect::<pgrpo::Result<Vec<_>>>()?;
        self.inner.log_probs(&xs, completions)
    }

    fn log_probs_detached(
        &self,
        prompts: &[&u32],
        completions: &[P::Completion],
    ) -> pgrpo::Result<TokenLogProbs> {
        let xs = prompts
            .iter()
            .enumerate()
            .map(|(row, &&i)| self.input(i, row))
            .collect::<pgrpo::Result<Vec<_>>>()?;
        self.inner.log_probs_detached(&xs, completions)
    }

    fn vars(&self) -> Vec<Var> {
        self.inner.vars()
    }

    fn snapshot(&self) -> pgrpo::Result<Self> {
        Ok(Self {
            inner: self.inner.snapshot()?,
            inputs: Arc::clone(&self.inputs),
        })
    }
}

/// The held-out prompts evaluated: per group at most `eval_max`, a fixed random subset.
fn eval_subset(task: &NextGenreTask, eval_max: usize) -> Vec<GenreExample> {
    let mut rng = StdRng::seed_from_u64(17);
    let counts = task.group_counts(&task.test);
    let mut seen = vec![0usize; task.groups.len()];
    let mut out = Vec::new();
    for e in &task.test {
        // Reservoir-free thinning: keep each with probability eval_max / count.
        let keep = counts[e.group] <= eval_max
            || rng.random::<f64>() < eval_max as f64 / counts[e.group] as f64;
        if keep && seen[e.group] < eval_max {
            seen[e.group] += 1;
            out.push(e.clone());
        }
    }
    out
}

/// Hit-rate curves of one run: `(step, hit rate per group)`, and its metric rows.
struct RunOutput {
    curve: Vec<(usize, Vec<f64>)>,
    rows: Vec<StepMetrics>,
}

struct Ctx<'a> {
    args: &'a Args,
    task: &'a NextGenreTask,
    eval: &'a [GenreExample],
    checkpoints: &'a [usize],
    bar: &'a ProgressBar,
}

/// Trains one policy with one estimator and seed. `probs` gives the policy's action
/// probabilities for the evaluation prompts.
fn train<P>(
    ctx: &Ctx<'_>,
    policy: Indexed<P>,
    probs: impl Fn(&P) -> pgrpo::Result<Vec<Vec<f32>>>,
    estimator: Estimator,
    seed: u64,
) -> pgrpo::Result<RunOutput>
where
    P: Policy<Completion = u32>,
    P::Prompt: Clone,
{
    let (args, task) = (ctx.args, ctx.task);
    let mut cfg = TrainerConfig {
        num_generations: args.g,
        learning_rate: args.lr,
        seed,
        ..Default::default()
    };
    cfg.advantage.estimator = estimator;
    let train = &task.train;
    let reward = |i: &u32, a: &u32, _g: &pgrpo::GroupKey| {
        train
            .get(*i as usize)
            .map_or(f32::NAN, |e| NextGenreTask::reward(e, *a))
    };
    let mut trainer = Trainer::new(policy, reward, cfg)?;
    let mut data_rng = StdRng::seed_from_u64(seed.wrapping_mul(104_729) + 3);
    let evaluate = |p: &Indexed<P>| task.hit_rates(ctx.eval, &probs(&p.inner)?);
    let mut curve = vec![(0, evaluate(trainer.policy())?)];
    let mut rows = Vec::new();
    for step in 0..args.steps {
        let batch: Vec<GroupedPrompt<u32>> = (0..args.prompts)
            .map(|_| {
                let i = data_rng.random_range(0..train.len());
                GroupedPrompt::new(i as u32, task.group_key(train[i].group))
            })
            .collect();
        let mut m = trainer.step(&batch)?;
        ctx.bar.inc(1);
        if step % 16 == 0 {
            ctx.bar.set_message(format!(
                "{} seed {seed}: reward {:.3}",
                estimator.name(),
                m.reward()
            ));
        }
        let done = step + 1;
        if done % args.eval_every.max(1) == 0 || ctx.checkpoints.contains(&done) {
            let hits = evaluate(trainer.policy())?;
            for (k, h) in hits.iter().enumerate() {
                m.set(format!("eval/{}/hit_rate", task.groups[k]), *h);
            }
            curve.push((done, hits));
        }
        if step % args.log_every.max(1) == 0 || done == args.steps {
            rows.push(m);
        }
    }
    Ok(RunOutput { curve, rows })
}

fn softmax_rows(logits: &candle_core::Tensor) -> pgrpo::Result<Vec<Vec<f32>>> {
    Ok(candle_nn::ops::softmax_last_dim(logits)?.to_vec2::<f32>()?)
}

/// One run: builds the policy of `--policy` and trains it.
fn run(ctx: &Ctx<'_>, estimator: Estimator, seed: u64) -> pgrpo::Result<RunOutput> {
    let (args, task) = (ctx.args, ctx.task);
    let dev = Device::Cpu;
    match args.policy.as_str() {
        "mlp" => {
            let inputs: Vec<Vec<f32>> = task.train.iter().map(|e| e.features.clone()).collect();
            let mlp = MlpPolicy::new(
                task.num_features(),
                args.hidden,
                task.num_actions(),
                seed,
                &dev,
            )?;
            let eval_x: Vec<&Vec<f32>> = ctx.eval.iter().map(|e| &e.features).collect();
            let probs = |p: &MlpPolicy| softmax_rows(&p.logits(&eval_x, false)?);
            train(
                ctx,
                Indexed {
                    inner: mlp,
                    inputs: Arc::new(inputs),
                },
                probs,
                estimator,
                seed,
            )
        }
        "tabular" => {
            let inputs: Vec<u32> = task.train.iter().map(|e| e.group as u32).collect();
            let table = TabularPolicy::new(task.groups.len(), task.num_actions(), true, &dev)?;
            let probs = |p: &TabularPolicy| {
                let all = p.probs()?;
                Ok(ctx.eval.iter().map(|e| all[e.group].clone()).collect())
            };
            train(
                ctx,
                Indexed {
                    inner: table,
                    inputs: Arc::new(inputs),
                },
                probs,
                estimator,
                seed,
            )
        }
        other => Err(pgrpo::Error::InvalidConfig {
            field: "policy",
            reason: format!("unknown policy {other:?}; expected mlp or tabular"),
        }),
    }
}

struct RunResult {
    arm: usize,
    seed: u64,
    curve: Vec<(usize, Vec<f64>)>,
}

impl RunResult {
    fn at(&self, step: usize, group: usize) -> Option<f64> {
        self.curve
            .iter()
            .find(|(s, _)| *s == step)
            .map(|(_, h)| h[group])
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_logging();
    let args: Args = common::config::parse()?;
    let grouping: Grouping = args.grouping.parse()?;
    let estimators: Vec<Estimator> = args
        .estimators
        .iter()
        .map(|e| e.parse())
        .collect::<pgrpo::Result<_>>()?;
    if args.steps == 0 || args.seeds == 0 || args.prompts == 0 || estimators.is_empty() {
        return Err("--steps, --seeds, --prompts and --estimators must not be 0 or empty".into());
    }
    println!("# GRPO vs P-GRPO on MovieLens: next liked genre");
    common::config::print_and_save(&args, &sibling(&args.out, "config.toml"))?;

    let dir = match &args.data {
        Some(d) => d.clone(),
        None => {
            let cfg = synthetic::SampleConfig {
                users: args.sample_users,
                ..Default::default()
            };
            synthetic::write_sample(&args.sample_dir, &cfg)?;
            println!(
                "No --data given: wrote a synthetic sample in the MovieLens-1M format to {}",
                args.sample_dir.display()
            );
            args.sample_dir.clone()
        }
    };
    let t_load = Instant::now();
    let data = MovieLens::load(&dir)?;
    let task = NextGenreTask::new(
        &data,
        &TaskConfig {
            grouping,
            history_len: args.history_len,
            min_stars: args.min_stars,
            test_fraction: args.test_fraction,
        },
    )?;
    let eval = eval_subset(&task, args.eval_max);
    println!(
        "{}: {} users, {} movies, {} ratings; {} training and {} held-out prompts ({} evaluated), \
         {} genres, {} groups by {} (loaded in {:.1} s)",
        dir.display(),
        data.users().len(),
        data.movies().len(),
        data.ratings().len(),
        task.train.len(),
        task.test.len(),
        eval.len(),
        task.num_actions(),
        task.groups.len(),
        args.grouping,
        t_load.elapsed().as_secs_f64()
    );
    println!(
        "policy {}, G = {}, {} prompts/step, {} steps, {} seeds, Adam lr {}",
        args.policy, args.g, args.prompts, args.steps, args.seeds, args.lr
    );

    let checkpoints: Vec<usize> = {
        let s = args.steps;
        let mut c = vec![s / 6, s / 3, 2 * s / 3, s];
        c.retain(|&x| x > 0);
        c.dedup();
        c
    };

    // Metric sinks.
    let groups: Vec<pgrpo::GroupKey> = (0..task.groups.len()).map(|g| task.group_key(g)).collect();
    let mut columns = standard_columns(&groups);
    columns.extend(task.groups.iter().map(|g| format!("eval/{g}/hit_rate")));
    let jsonl_path = sibling(&args.out, "metrics.jsonl");
    let csv_path = sibling(&args.out, "metrics.csv");
    let sinks: Vec<Box<dyn MetricsSink + Send>> = vec![
        Box::new(JsonlSink::create(&jsonl_path)?),
        Box::new(CsvSink::create(&csv_path, &["estimator", "seed"], columns)?),
    ];
    let sinks = Mutex::new(sinks);
    let order: Mutex<InOrder<(usize, Vec<StepMetrics>)>> = Mutex::new(InOrder::default());

    let jobs: Vec<(usize, u64)> = (0..estimators.len())
        .flat_map(|a| (0..args.seeds).map(move |s| (a, s)))
        .collect();
    let bar = common::progress_bar((jobs.len() * args.steps) as u64, args.quiet);
    let ctx = Ctx {
        args: &args,
        task: &task,
        eval: &eval,
        checkpoints: &checkpoints,
        bar: &bar,
    };
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<RunResult>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.threads.max(1) {
            scope.spawn(|| loop {
                let index = {
                    let mut n = next.lock().expect("job counter");
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(&(a, seed)) = jobs.get(index) else {
                    break;
                };
                if failure.lock().expect("failure").is_some() {
                    break;
                }
                let outcome = run(&ctx, estimators[a], seed).and_then(|out| {
                    order
                        .lock()
                        .expect("order")
                        .push(index, (index, out.rows), |(i, rows)| {
                            let (a, seed) = jobs[i];
                            let seed = seed.to_string();
                            let labels =
                                [("estimator", estimators[a].name()), ("seed", seed.as_str())];
                            let mut sinks = sinks.lock().expect("sinks");
                            rows.iter().try_for_each(|m| sinks.write_row(&labels, m))
                        })?;
                    results.lock().expect("results").push(RunResult {
                        arm: a,
                        seed,
                        curve: out.curve,
                    });
                    Ok(())
                });
                if let Err(e) = outcome {
                    *failure.lock().expect("failure") =
                        Some(format!("{} seed {seed}: {e}", estimators[a].name()));
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = failure.into_inner()? {
        return Err(e.into());
    }
    sinks.into_inner()?.flush()?;
    let mut results = results.into_inner()?;
    results.sort_by_key(|r| (r.arm, r.seed));
    let wall = t0.elapsed().as_secs_f64();

    // Curves as CSV.
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    writeln!(csv, "estimator,seed,step,group,hit_rate")?;
    for r in &results {
        for (step, hits) in &r.curve {
            for (k, h) in hits.iter().enumerate() {
                writeln!(
                    csv,
                    "{},{},{},{},{:.6}",
                    estimators[r.arm].name(),
                    r.seed,
                    step,
                    task.groups[k],
                    h
                )?;
            }
        }
    }
    csv.flush()?;

    print_tables(&args, &task, &estimators, &results, &checkpoints);

    let mut outputs = vec![
        format!("curves {}", args.out.display()),
        format!(
            "metrics {} and {}",
            jsonl_path.display(),
            csv_path.display()
        ),
    ];
    let fig = figure(&args, &task, &estimators, &results);
    let (svg, png) = (sibling(&args.out, "svg"), sibling(&args.out, "png"));
    fig.write_svg(&svg)?;
    fig.write_png(&png)?;
    outputs.push(format!("plots {} and {}", svg.display(), png.display()));
    println!(
        "\n{} runs × {} steps in {wall:.1} s wall\n{}",
        results.len(),
        args.steps,
        outputs.join("\n")
    );
    Ok(())
}

fn print_tables(
    args: &Args,
    task: &NextGenreTask,
    estimators: &[Estimator],
    results: &[RunResult],
    checkpoints: &[usize],
) {
    let train_counts = task.group_counts(&task.train);
    let baseline = task.majority_genre_baseline();
    println!(
        "\nExpected hit rate on held-out prompts (probability mass on the next liked movie's \
         genres), mean ± 95% CI over {} seeds",
        args.seeds
    );
    let mut cols = vec![0];
    cols.extend_from_slice(checkpoints);
    for (k, name) in task.groups.iter().enumerate() {
        println!(
            "\n## group {name}: {:.1}% of training prompts; majority-genre baseline {:.3}",
            100.0 * train_counts[k] as f64 / task.train.len() as f64,
            baseline[k]
        );
        let mut header = format!("{:<10}", "estimator");
        for c in &cols {
            header += &format!(" {:>15}", format!("step {c}"));
        }
        println!("{header}");
        for (a, est) in estimators.iter().enumerate() {
            let mut line = format!("{:<10}", est.name());
            for &c in &cols {
                let v: Vec<f64> = results
                    .iter()
                    .filter(|r| r.arm == a)
                    .filter_map(|r| r.at(c, k))
                    .collect();
                let (m, ci) = mean_ci(&v);
                line += &format!(" {:>15}", format!("{m:.3} ± {ci:.3}"));
            }
            println!("{line}");
        }
    }

    // Paired summary: P-GRPO minus GRPO per group.
    let find = |e: Estimator| estimators.iter().position(|x| *x == e);
    let (Some(p), Some(g)) = (find(Estimator::PGrpo), find(Estimator::Grpo)) else {
        return;
    };
    let early = checkpoints.get(1).copied().unwrap_or(args.steps);
    println!("\n## Summary: p_grpo − grpo, paired by seed (mean ± 95% CI; * = CI excludes 0)");
    println!(
        "{:<22} {:>8} {:>9} {:>22} {:>22}",
        "group",
        "share",
        "baseline",
        format!("step {early}"),
        format!("step {}", args.steps)
    );
    for (k, name) in task.groups.iter().enumerate() {
        let mut cells = Vec::new();
        for step in [early, args.steps] {
            let diffs: Vec<f64> = (0..args.seeds)
                .filter_map(|seed| {
                    let get = |arm: usize| {
                        results
                            .iter()
                            .find(|r| r.arm == arm && r.seed == seed)
                            .and_then(|r| r.at(step, k))
                    };
                    Some(get(p)? - get(g)?)
                })
                .collect();
            let (m, ci) = mean_ci(&diffs);
            let star = if ci.is_finite() && (m - ci > 0.0 || m + ci < 0.0) {
                "*"
            } else {
                " "
            };
            cells.push(format!("{m:+.3} ± {ci:.3}{star}"));
        }
        println!(
            "{:<22} {:>7.1}% {:>9.3} {:>22} {:>22}",
            name,
            100.0 * train_counts[k] as f64 / task.train.len() as f64,
            baseline[k],
            cells[0],
            cells[1]
        );
    }
}

fn figure(
    args: &Args,
    task: &NextGenreTask,
    estimators: &[Estimator],
    results: &[RunResult],
) -> Figure {
    let steps: Vec<usize> = results
        .first()
        .map(|r| r.curve.iter().map(|(s, _)| *s).collect())
        .unwrap_or_default();
    let xs: Vec<f64> = steps.iter().map(|&s| s as f64).collect();
    let panels = task
        .groups
        .iter()
        .enumerate()
        .map(|(k, name)| Panel {
            title: format!("{} {name}", args.grouping),
            bands: estimators
                .iter()
                .enumerate()
                .map(|(a, est)| {
                    let runs: Vec<Vec<f64>> = results
                        .iter()
                        .filter(|r| r.arm == a)
                        .map(|r| r.curve.iter().map(|(_, h)| h[k]).collect())
                        .collect();
                    band_over_runs(est.name(), a, &xs, &runs)
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    let cols = panels.len().clamp(1, 4);
    Figure {
        title: format!(
            "MovieLens next liked genre: held-out hit rate per {} group, mean and 95% band over {} seeds",
            args.grouping, args.seeds
        ),
        x_label: "step".into(),
        y_label: "hit rate".into(),
        rows: panels.len().div_ceil(cols),
        cols,
        panels,
    }
}
