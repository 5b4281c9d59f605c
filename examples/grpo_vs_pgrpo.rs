//! GRPO vs P-GRPO, side by side, on a contextual bandit with heterogeneous preference groups.
//!
//! ```text
//! cargo run --release --example grpo_vs_pgrpo              # the default experiment
//! cargo run --release --example grpo_vs_pgrpo -- --help    # every knob
//! ```
//!
//! Three preference groups (80% / 15% / 5% of prompts) each prefer a different action; rewards
//! are scaled 1.0 / 0.3 / 0.1, so the minorities' rewards are small as well as rare. A
//! tabular policy with shared and per-group logits is trained with every estimator over
//! several seeds (same prompt stream and sampling seed per seed for every estimator). The
//! table reports each group's expected reward as a fraction of its optimum at fixed steps
//! (mean ± 95% t-interval over seeds) and the steps to reach 90% of it. The curves go to CSV.
//!
//! `p_grpo_shuffled` is the paper's ablation: P-GRPO with random group labels (drawn with the
//! same frequencies, independent of the true group).
//!
//! Outputs, next to `--out` (default `runs/grpo_vs_pgrpo.csv`, the curves):
//! - `<out>.svg` and `<out>.png`: each group's curve per estimator of `--plot-estimators`,
//!   mean and 95% band over seeds, one row of panels per `G`;
//! - `<out>.metrics.jsonl` and `<out>.metrics.csv`: the trainer's metrics every `--log-every`
//!   steps of every run (labels `g`, `estimator`, `seed`), plus `eval/<g>/fraction_of_optimum`;
//! - `<out>.config.toml`: the effective settings, also printed at start.
//!
//! Settings come from flags and/or a TOML or JSON file (`--config run.toml`, keys = flag names
//! with `_`); flags win. `--quiet` hides the progress bar (hidden anyway when stdout is not a
//! terminal); `RUST_LOG=pgrpo=debug` logs every trainer step to stderr.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use common::plot::{band_over_runs, Figure, Panel};
use common::{mean_ci, InOrder};
use indicatif::ProgressBar;
use pgrpo::sink::{standard_columns, CsvSink, JsonlSink, MetricsSink};
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::{Estimator, GroupKey, GroupedPrompt, HistoryKind, StepMetrics, Trainer, TrainerConfig};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Clone, Serialize, Deserialize)]
#[command(about = "GRPO vs P-GRPO on a heterogeneous-preference contextual bandit")]
#[serde(deny_unknown_fields)]
struct Args {
    /// A TOML or JSON file of settings (keys = flag names with `_`); flags given on the
    /// command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Completions per prompt (G), comma-separated: one experiment per value. P-GRPO's edge
    /// over GRPO depends on G, so the default runs three.
    #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
    g: Vec<usize>,
    /// Prompts per step.
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// Group frequencies, comma-separated, summing to 1.
    #[arg(long, default_value = "0.80,0.15,0.05", value_delimiter = ',')]
    frequencies: Vec<f64>,
    /// Reward scale per group, comma-separated.
    #[arg(long, default_value = "1.0,0.3,0.1", value_delimiter = ',')]
    scales: Vec<f32>,
    /// Number of actions (at least the number of groups).
    #[arg(long, default_value_t = 5)]
    actions: usize,
    /// Quality of the majority's action for the other groups (a compromise).
    #[arg(long, default_value_t = 0.5)]
    majority_quality: f32,
    /// Reward noise std, relative to the group's scale.
    #[arg(long, default_value_t = 0.1)]
    noise: f32,
    /// Training steps per run.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Seeds per estimator.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// Adam learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// History kind for P-GRPO: `cumulative`, `ema:<half-life>` or `window:<size>`.
    #[arg(long, default_value = "cumulative")]
    history: String,
    /// P-GRPO offset weight λ (1 = the paper).
    #[arg(long, default_value_t = 1.0)]
    offset_weight: f32,
    /// P-GRPO cold-start minimum count.
    #[arg(long, default_value_t = 8)]
    min_count: u64,
    /// Estimators to run: any of grpo, grpo_batch_std, dr_grpo, batch_z_score, rloo, p_grpo,
    /// annealed_offset, james_stein, blend, levels (their default options); a `_shuffled`
    /// suffix draws the group labels at random (`p_grpo_shuffled` is the paper's ablation).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "grpo,grpo_batch_std,batch_z_score,p_grpo,p_grpo_shuffled"
    )]
    estimators: Vec<String>,
    /// Where to write the curves.
    #[arg(long, default_value = "runs/grpo_vs_pgrpo.csv")]
    out: PathBuf,
    /// Worker threads (runs are independent; results do not depend on this).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Estimators drawn in the plot (`<out>.svg`, `<out>.png`); empty: no plot.
    #[arg(long, value_delimiter = ',', default_value = "grpo,p_grpo")]
    plot_estimators: Vec<String>,
    /// Write the trainer's metrics every this many steps (and at the last step).
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `runs/x.csv` → `runs/x.<suffix>`.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map_or_else(
        || "grpo_vs_pgrpo".into(),
        |s| s.to_string_lossy().into_owned(),
    );
    out.with_file_name(format!("{stem}.{suffix}"))
}

/// One estimator as run by the experiment.
#[derive(Clone, Debug)]
struct Arm {
    name: String,
    estimator: Estimator,
    shuffled: bool,
}

/// `curves[step][group]`: fraction of optimum after `step` updates (index 0 = before training).
struct RunResult {
    g: usize,
    arm: usize,
    seed: u64,
    curves: Vec<Vec<f64>>,
    secs: f64,
}

/// What one run produces: its curves and the metric rows to log.
struct RunOutput {
    curves: Vec<Vec<f64>>,
    rows: Vec<StepMetrics>,
}

fn parse_history(s: &str) -> Result<HistoryKind, Box<dyn std::error::Error>> {
    let kind = match s.split_once(':') {
        None if s == "cumulative" => HistoryKind::Cumulative,
        Some(("ema", h)) => HistoryKind::Exponential {
            half_life: h.parse()?,
        },
        Some(("window", n)) => HistoryKind::Window { size: n.parse()? },
        _ => {
            return Err(format!(
                "unknown history {s:?}: use cumulative, ema:<half-life> or window:<size>"
            )
            .into())
        }
    };
    kind.validate()?;
    Ok(kind)
}

fn run(
    args: &Args,
    bandit: &PreferenceBandit,
    history: HistoryKind,
    g: usize,
    arm: &Arm,
    seed: u64,
    bar: &ProgressBar,
) -> pgrpo::Result<RunOutput> {
    let mut cfg = TrainerConfig {
        num_generations: g,
        learning_rate: args.lr,
        seed,
        history,
        ..Default::default()
    };
    cfg.advantage.estimator = arm.estimator;
    cfg.advantage.pgrpo.offset_weight = args.offset_weight;
    cfg.advantage.pgrpo.min_count = args.min_count;
    let policy = bandit.policy(&Device::Cpu)?;
    let mut trainer = Trainer::new(policy, bandit.reward_fn(seed.wrapping_mul(7919) + 1), cfg)?;
    // The prompt stream depends on the seed only, so every estimator sees the same prompts.
    let mut data_rng = StdRng::seed_from_u64(seed.wrapping_mul(104_729) + 3);
    let mut label_rng = StdRng::seed_from_u64(seed.wrapping_mul(15_485_863) + 5);
    let mut curves = vec![bandit.evaluate(trainer.policy())?];
    let mut rows = Vec::new();
    for step in 0..args.steps {
        let groups = bandit.sample_groups(args.prompts, &mut data_rng);
        let labels = if arm.shuffled {
            bandit.sample_groups(args.prompts, &mut label_rng)
        } else {
            groups.clone()
        };
        let batch: Vec<GroupedPrompt<u32>> = groups
            .iter()
            .zip(&labels)
            .map(|(&g, &l)| GroupedPrompt::new(g, GroupKey::Name(format!("g{l}"))))
            .collect();
        let mut m = trainer.step(&batch)?;
        let eval = bandit.evaluate(trainer.policy())?;
        bar.inc(1);
        if step % 16 == 0 {
            bar.set_message(format!(
                "{} G={g} seed {seed}: reward {:.3}",
                arm.name,
                m.reward()
            ));
        }
        if step % args.log_every.max(1) == 0 || step + 1 == args.steps {
            for (k, v) in eval.iter().enumerate() {
                m.set(format!("eval/g{k}/fraction_of_optimum"), *v);
            }
            rows.push(m);
        }
        curves.push(eval);
    }
    Ok(RunOutput { curves, rows })
}

fn print_group_table(
    by_arm: &BTreeMap<usize, Vec<&RunResult>>,
    arms: &[Arm],
    checkpoints: &[usize],
    g: usize,
) {
    let mut header = format!("{:<18}", "estimator");
    for c in checkpoints {
        header += &format!(" {:>15}", format!("step {c}"));
    }
    header += &format!(" {:>18}", "steps to 90%");
    println!("{header}");
    for (a, runs) in by_arm {
        let mut line = format!("{:<18}", arms[*a].name);
        for &c in checkpoints {
            let vals: Vec<f64> = runs.iter().map(|r| r.curves[c][g]).collect();
            let (m, ci) = mean_ci(&vals);
            line += &format!(" {:>15}", format!("{m:.3} ± {ci:.3}"));
        }
        let reached: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                r.curves
                    .iter()
                    .position(|row| row[g] >= 0.9)
                    .map(|s| s as f64)
            })
            .collect();
        let cell = if reached.len() == runs.len() {
            let (m, ci) = mean_ci(&reached);
            format!("{m:.0} ± {ci:.0}")
        } else if reached.is_empty() {
            format!("never (0/{})", runs.len())
        } else {
            format!(
                "{:.0} ({}/{} runs)",
                mean_ci(&reached).0,
                reached.len(),
                runs.len()
            )
        };
        line += &format!(" {cell:>18}");
        println!("{line}");
    }
}

/// P-GRPO minus GRPO, paired by seed (same prompts and sampling seed), at one third of the run
/// and at the end: the honest answer to "does P-GRPO help here?".
fn print_paired_summary(results: &[RunResult], arms: &[Arm], args: &Args, groups: usize) {
    let find = |name: &str| arms.iter().position(|a| a.name == name);
    let (Some(a), Some(b)) = (find("p_grpo"), find("grpo")) else {
        return;
    };
    let early = (args.steps / 3).max(1);
    println!("\n## Summary: p_grpo − grpo, paired by seed (mean ± 95% CI; * = CI excludes 0)");
    println!(
        "{:<6} {:<6} {:>22} {:>22}",
        "G",
        "group",
        format!("step {early}"),
        format!("step {}", args.steps)
    );
    for &g in &args.g {
        for k in 0..groups {
            let mut cells = Vec::new();
            for step in [early, args.steps] {
                let diffs: Vec<f64> = (0..args.seeds)
                    .filter_map(|seed| {
                        let get = |arm: usize| {
                            results
                                .iter()
                                .find(|r| r.g == g && r.arm == arm && r.seed == seed)
                                .map(|r| r.curves[step][k])
                        };
                        Some(get(a)? - get(b)?)
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
                "{:<6} {:<6} {:>22} {:>22}",
                g,
                format!("g{k}"),
                cells[0],
                cells[1]
            );
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_logging();
    let args: Args = common::config::parse()?;
    let bandit = PreferenceBandit::new(
        args.frequencies.clone(),
        args.scales.clone(),
        args.actions,
        args.majority_quality,
        args.noise,
    )?;
    let history = parse_history(&args.history)?;
    let arms: Vec<Arm> = args
        .estimators
        .iter()
        .map(|name| -> pgrpo::Result<Arm> {
            let (base, shuffled) = match name.strip_suffix("_shuffled") {
                Some(b) => (b, true),
                None => (name.as_str(), false),
            };
            Ok(Arm {
                name: name.clone(),
                estimator: base.parse()?,
                shuffled,
            })
        })
        .collect::<pgrpo::Result<_>>()?;
    if args.steps == 0 || args.seeds == 0 || args.prompts == 0 || args.g.is_empty() {
        return Err("--g, --steps, --seeds and --prompts must be at least 1".into());
    }
    println!("# GRPO vs P-GRPO on a preference bandit");
    common::config::print_and_save(&args, &sibling(&args.out, "config.toml"))?;
    println!(
        "groups: {} (frequencies {:?}, reward scales {:?}), {} actions, noise {}",
        bandit.num_groups(),
        args.frequencies,
        args.scales,
        args.actions,
        args.noise
    );
    println!(
        "G in {:?}, {} prompts/step, {} steps, {} seeds, Adam lr {}, history {:?}, offset weight {}, min_count {}",
        args.g, args.prompts, args.steps, args.seeds, args.lr, history, args.offset_weight, args.min_count
    );

    // Metric sinks: every run's rows, labelled, in job order.
    let groups: Vec<GroupKey> = (0..bandit.num_groups())
        .map(|k| GroupKey::Name(format!("g{k}")))
        .collect();
    let mut columns = standard_columns(&groups);
    columns.extend((0..bandit.num_groups()).map(|k| format!("eval/g{k}/fraction_of_optimum")));
    let labels = ["g", "estimator", "seed"];
    let jsonl_path = sibling(&args.out, "metrics.jsonl");
    let csv_path = sibling(&args.out, "metrics.csv");
    let sinks: Vec<Box<dyn MetricsSink + Send>> = vec![
        Box::new(JsonlSink::create(&jsonl_path)?),
        Box::new(CsvSink::create(&csv_path, &labels, columns)?),
    ];
    let sinks = Mutex::new(sinks);
    let order: Mutex<InOrder<(usize, Vec<StepMetrics>)>> = Mutex::new(InOrder::default());

    let jobs: Vec<(usize, usize, u64)> = args
        .g
        .iter()
        .flat_map(|&g| (0..arms.len()).flat_map(move |a| (0..args.seeds).map(move |s| (g, a, s))))
        .collect();
    let bar = common::progress_bar((jobs.len() * args.steps) as u64, args.quiet);
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
                let Some(&(g, a, seed)) = jobs.get(index) else {
                    break;
                };
                if failure.lock().expect("failure").is_some() {
                    break;
                }
                let t = Instant::now();
                let outcome =
                    run(&args, &bandit, history, g, &arms[a], seed, &bar).and_then(|out| {
                        let secs = t.elapsed().as_secs_f64();
                        order.lock().expect("order").push(
                            index,
                            (index, out.rows),
                            |(i, rows)| {
                                let (g, a, seed) = jobs[i];
                                let (g, seed) = (g.to_string(), seed.to_string());
                                let labels = [
                                    ("g", g.as_str()),
                                    ("estimator", arms[a].name.as_str()),
                                    ("seed", seed.as_str()),
                                ];
                                let mut sinks = sinks.lock().expect("sinks");
                                rows.iter().try_for_each(|m| sinks.write_row(&labels, m))
                            },
                        )?;
                        results.lock().expect("results").push(RunResult {
                            g,
                            arm: a,
                            seed,
                            curves: out.curves,
                            secs,
                        });
                        Ok(())
                    });
                if let Err(e) = outcome {
                    *failure.lock().expect("failure") =
                        Some(format!("{} G={g} seed {seed}: {e}", arms[a].name));
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
    results.sort_by_key(|r| (r.g, r.arm, r.seed));
    let wall = t0.elapsed().as_secs_f64();

    // CSV of every curve.
    if let Some(dir) = args.out.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut csv = std::io::BufWriter::new(fs::File::create(&args.out)?);
    writeln!(csv, "g,estimator,seed,step,group,fraction_of_optimum")?;
    for r in &results {
        for (step, row) in r.curves.iter().enumerate() {
            for (k, v) in row.iter().enumerate() {
                writeln!(
                    csv,
                    "{},{},{},{},g{},{:.6}",
                    r.g, arms[r.arm].name, r.seed, step, k, v
                )?;
            }
        }
    }
    csv.flush()?;

    // Per-group table.
    let checkpoints: Vec<usize> = {
        let s = args.steps;
        let mut c = vec![s / 6, s / 3, 2 * s / 3, s];
        c.retain(|&x| x > 0);
        c.dedup();
        c
    };
    println!(
        "\nFraction of each group's optimum (expected reward / best reward), mean ± 95% CI over {} seeds",
        args.seeds
    );
    for &gsize in &args.g {
        let by_arm: BTreeMap<usize, Vec<&RunResult>> = results
            .iter()
            .filter(|r| r.g == gsize)
            .fold(BTreeMap::new(), |mut m, r| {
                m.entry(r.arm).or_insert_with(Vec::new).push(r);
                m
            });
        for g in 0..bandit.num_groups() {
            println!(
                "\n## G = {gsize}, group g{g}: {:.0}% of prompts, reward scale {}",
                100.0 * args.frequencies[g],
                args.scales[g]
            );
            print_group_table(&by_arm, &arms, &checkpoints, g);
        }
    }
    print_paired_summary(&results, &arms, &args, bandit.num_groups());

    let mut outputs = vec![
        format!("curves {}", args.out.display()),
        format!(
            "metrics {} and {}",
            jsonl_path.display(),
            csv_path.display()
        ),
    ];
    if let Some(fig) = figure(&args, &arms, &results, &bandit) {
        let (svg, png) = (sibling(&args.out, "svg"), sibling(&args.out, "png"));
        fig.write_svg(&svg)?;
        fig.write_png(&png)?;
        outputs.push(format!("plots {} and {}", svg.display(), png.display()));
    }
    let secs: f64 = results.iter().map(|r| r.secs).sum();
    println!(
        "\n{} runs × {} steps in {wall:.1} s wall ({:.2} ms per step per run)\n{}",
        results.len(),
        args.steps,
        1e3 * secs / (results.len() * args.steps) as f64,
        outputs.join("\n")
    );
    Ok(())
}

/// One row of panels per `G`, one panel per group: each plotted estimator's fraction of
/// optimum, mean and 95% band over seeds. `None` when no plotted estimator was run.
fn figure(
    args: &Args,
    arms: &[Arm],
    results: &[RunResult],
    bandit: &PreferenceBandit,
) -> Option<Figure> {
    let plotted: Vec<usize> = args
        .plot_estimators
        .iter()
        .filter_map(|name| arms.iter().position(|a| &a.name == name))
        .collect();
    if plotted.is_empty() {
        return None;
    }
    // At most ~100 points per curve keeps the SVG small.
    let stride = (args.steps / 100).max(1);
    let idx: Vec<usize> = (0..=args.steps).step_by(stride).collect();
    let steps: Vec<f64> = idx.iter().map(|&i| i as f64).collect();
    let mut panels = Vec::new();
    for &gsize in &args.g {
        for k in 0..bandit.num_groups() {
            let bands = plotted
                .iter()
                .enumerate()
                .map(|(color, &a)| {
                    let runs: Vec<Vec<f64>> = results
                        .iter()
                        .filter(|r| r.g == gsize && r.arm == a)
                        .map(|r| idx.iter().map(|&i| r.curves[i][k]).collect())
                        .collect();
                    band_over_runs(&arms[a].name, color, &steps, &runs)
                })
                .collect();
            panels.push(Panel {
                title: format!(
                    "G = {gsize}, group g{k} ({:.0}% of prompts, scale {})",
                    100.0 * args.frequencies[k],
                    args.scales[k]
                ),
                bands,
            });
        }
    }
    Some(Figure {
        title: format!(
            "Fraction of each group's optimum, mean and 95% band over {} seeds",
            args.seeds
        ),
        x_label: "step".into(),
        y_label: "fraction of optimum".into(),
        rows: args.g.len(),
        cols: bandit.num_groups(),
        panels,
    })
}
