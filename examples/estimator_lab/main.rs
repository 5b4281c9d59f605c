//! Estimator lab: diagnosing P-GRPO's late deficit on the preference bandit and prototyping
//! advantage estimators that mix prompt and preference-group statistics (issue 13, phase 1).
//!
//! ```text
//! cargo run --release --example estimator_lab -- rules       # every rule and its equation
//! cargo run --release --example estimator_lab -- verify      # lab grpo/p_grpo == crate, bit for bit
//! cargo run --release --example estimator_lab -- diagnose    # the mechanism, table + docs/ plot
//! cargo run --release --example estimator_lab -- study       # candidates × settings × G, paired CIs
//! cargo run --release --example estimator_lab -- phase2      # the crate's estimators: the study
//! ```
//!
//! Every run uses the crate's [`Trainer`](pgrpo::Trainer) on the preference bandit exactly as
//! `examples/grpo_vs_pgrpo.rs` does (same seeds, same prompt streams, same sampling), with
//! one change: between `trainer.rollout(&batch)` and `trainer.update(rollout)` the
//! rollout's advantages are replaced by those of a prototype estimator computed here
//! (`estimators.rs`) from the rewards and the lab's own per-group state. `verify` checks
//! that the lab's `grpo` and `p_grpo` give the crate's advantages bit for bit at every step
//! of every run, so the rest of the lab can be trusted to differ from the crate only where a
//! rule says so.
//!
//! Settings (`--settings`, comma-separated):
//!
//! | name | groups (share / reward scale) | majority action for others | noise |
//! |---|---|---|---|
//! | `default` | 80% / 1.0, 15% / 0.3, 5% / 0.1 | 0.5 | 0.1 |
//! | `sparse`  | as default, rewards 0 or the scale | 0 | 0 |
//! | `noisy`   | as default | 0.5 | 0.5 |
//! | `small`   | 70% / 1.0, 15% / 0.5, 12% / 0.2, 3% / 0.05 | 0.5 | 0.1 |
//!
//! All settings have 5 actions, 16 prompts per step, Adam (lr 0.05), 200 steps.
//!
//! `phase2` (issue 13's study) runs the **crate's** estimators (`Rule::Crate`: the trainer's
//! own advantages, untouched) on a grid of reward regimes × group layouts, named
//! `<regime>/<layout>`:
//!
//! | regime | majority action for others | noise |
//! |---|---|---|
//! | `continuous` | 0.5 | 0.1 |
//! | `sparse` (0/1 rewards) | 0 | 0 |
//! | `noisy` | 0.5 | 0.5 |
//!
//! | layout | groups (share / reward scale) | actions |
//! |---|---|---|
//! | `two` | 97% / 1.0, 3% / 0.05 | 5 |
//! | `three` | 80% / 1.0, 15% / 0.3, 5% / 0.1 (= `default`) | 5 |
//! | `four` | 70% / 1.0, 15% / 0.5, 12% / 0.2, 3% / 0.05 (= `small`) | 5 |
//! | `six` | 40% / 1.0, 25% / 0.6, 15% / 0.3, 10% / 0.2, 7% / 0.1, 3% / 0.05 | 8 |

#[path = "../common/mod.rs"]
mod common;

mod batch;
mod diagnose;
mod estimators;
mod paired;
mod report;
mod sim;
mod study;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use clap::{Parser, Subcommand};
use estimators::Rule;
use sim::{RunOut, RunSpec, Schedule, Setting};

#[derive(Parser, Debug)]
#[command(about = "Prototype advantage estimators for P-GRPO on the preference bandit")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Worker threads (runs are independent; results do not depend on this).
    #[arg(long, default_value_t = 2, global = true)]
    threads: usize,
    /// Training steps per run.
    #[arg(long, default_value_t = 200, global = true)]
    steps: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 16, global = true)]
    prompts: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 0.05, global = true)]
    lr: f64,
    /// Seeds per arm.
    #[arg(long, default_value_t = 20, global = true)]
    seeds: u64,
    /// First seed (evaluation uses 0..; tuning uses a disjoint range, e.g. 1000..).
    #[arg(long, default_value_t = 0, global = true)]
    first_seed: u64,
    /// Output folder for CSV and markdown.
    #[arg(long, default_value = "runs/estimator_lab", global = true)]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print every rule with its equation.
    Rules,
    /// Check that the lab's grpo and p_grpo equal the crate's advantages bit for bit at every
    /// step, and print the grpo_vs_pgrpo-style table for comparison.
    Verify {
        /// G values.
        #[arg(long, default_value = "4", value_delimiter = ',')]
        g: Vec<usize>,
        /// Setting.
        #[arg(long, default_value = "default")]
        setting: String,
    },
    /// The mechanism: per-group history vs batch means, advantage signs and spreads over
    /// training, for the given rules; a table per G and a plot for one G.
    Diagnose {
        /// G values.
        #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
        g: Vec<usize>,
        /// Rules to diagnose.
        #[arg(long, default_value = "grpo;p_grpo", value_delimiter = ';')]
        rules: Vec<String>,
        /// Setting.
        #[arg(long, default_value = "default")]
        setting: String,
        /// Which G to plot.
        #[arg(long, default_value_t = 4)]
        plot_g: usize,
        /// Plot path (SVG; a PNG is written next to it).
        #[arg(long, default_value = "docs/estimators-diagnosis.svg")]
        plot: PathBuf,
    },
    /// Every rule × setting × G, paired differences vs GRPO and P-GRPO for the smallest and
    /// the 15% group at an early step and at the end, steps to 90%.
    Study {
        /// Settings.
        #[arg(
            long,
            default_value = "default,sparse,noisy,small",
            value_delimiter = ','
        )]
        settings: Vec<String>,
        /// G values.
        #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
        g: Vec<usize>,
        /// Rules (`;`-separated, since rule arguments use `,`); grpo and p_grpo are always run.
        #[arg(long, default_value = "p_grpo_fix", value_delimiter = ';')]
        rules: Vec<String>,
        /// Rules also run with shuffled labels (`;`-separated).
        #[arg(long, default_value = "", value_delimiter = ';')]
        shuffled: Vec<String>,
        /// The early step of the paired comparison.
        #[arg(long, default_value_t = 66)]
        early: usize,
        /// Name of the markdown/CSV outputs under --out.
        #[arg(long, default_value = "study")]
        name: String,
    },
    /// Paired differences between estimators in another example's curve CSV (MovieLens,
    /// personas), per group and for the macro mean.
    Paired {
        /// The CSV (long format: estimator, seed, step, group, value columns).
        #[arg(long)]
        csv: PathBuf,
        /// The group column (`group` for MovieLens, `persona` for the persona task).
        #[arg(long, default_value = "group")]
        group_col: String,
        /// The value column (`hit_rate`, `reward`).
        #[arg(long, default_value = "hit_rate")]
        value_col: String,
        /// Keep only rows with `column=value` (e.g. `source=eval`).
        #[arg(long)]
        filter: Option<String>,
        /// Steps to compare (default: the last).
        #[arg(long, value_delimiter = ',')]
        at: Vec<usize>,
        /// The estimators every other is compared with.
        #[arg(long, default_value = "grpo,p_grpo", value_delimiter = ',')]
        bases: Vec<String>,
        /// Title of the markdown.
        #[arg(long, default_value = "Paired differences")]
        title: String,
        /// Name of the markdown output under --out.
        #[arg(long, default_value = "paired")]
        name: String,
    },
    /// Issue 13's study of the crate's estimators: regimes × layouts × G, every estimator
    /// and the shuffled-label ablation of the group-aware ones, paired differences against
    /// GRPO and P-GRPO, steps to 90%, the default bar's verdict, one markdown table.
    Phase2 {
        /// Reward regimes: continuous, sparse, noisy.
        #[arg(long, default_value = "continuous,sparse,noisy", value_delimiter = ',')]
        regimes: Vec<String>,
        /// Group layouts: two, three, four, six.
        #[arg(long, default_value = "two,three,four,six", value_delimiter = ',')]
        layouts: Vec<String>,
        /// G values.
        #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
        g: Vec<usize>,
        /// Crate estimators (`;`-separated; `name` or `name:options`, e.g.
        /// `annealed_offset:n0=512`, `levels:prompt/group`); grpo and p_grpo are always run.
        #[arg(
            long,
            default_value = "annealed_offset;james_stein;blend;levels:prompt/group",
            value_delimiter = ';'
        )]
        estimators: Vec<String>,
        /// Estimators also run with shuffled labels (`;`-separated).
        #[arg(
            long,
            default_value = "p_grpo;annealed_offset;james_stein;blend;levels:prompt/group",
            value_delimiter = ';'
        )]
        shuffled: Vec<String>,
        /// The early step of the paired comparison.
        #[arg(long, default_value_t = 66)]
        early: usize,
        /// Name of the markdown/CSV outputs under --out.
        #[arg(long, default_value = "phase2")]
        name: String,
    },
}

/// A reward regime of phase 2: `(majority_quality, noise)`.
fn regime(name: &str) -> Result<(f32, f32), String> {
    match name {
        "continuous" => Ok((0.5, 0.1)),
        "sparse" => Ok((0.0, 0.0)),
        "noisy" => Ok((0.5, 0.5)),
        _ => Err(format!(
            "unknown regime {name:?}: continuous, sparse, noisy"
        )),
    }
}

/// A group layout of phase 2: `(frequencies, scales, actions)`.
fn layout(name: &str) -> Result<(Vec<f64>, Vec<f32>, usize), String> {
    match name {
        "two" => Ok((vec![0.97, 0.03], vec![1.0, 0.05], 5)),
        "three" => Ok((vec![0.80, 0.15, 0.05], vec![1.0, 0.3, 0.1], 5)),
        "four" => Ok((vec![0.70, 0.15, 0.12, 0.03], vec![1.0, 0.5, 0.2, 0.05], 5)),
        "six" => Ok((
            vec![0.40, 0.25, 0.15, 0.10, 0.07, 0.03],
            vec![1.0, 0.6, 0.3, 0.2, 0.1, 0.05],
            8,
        )),
        _ => Err(format!("unknown layout {name:?}: two, three, four, six")),
    }
}

/// The setting `<regime>/<layout>`.
fn grid_setting(regime_name: &str, layout_name: &str) -> Result<Setting, String> {
    let (majority_quality, noise) = regime(regime_name)?;
    let (frequencies, scales, actions) = layout(layout_name)?;
    Ok(Setting {
        name: format!("{regime_name}/{layout_name}"),
        frequencies,
        scales,
        actions,
        majority_quality,
        noise,
    })
}

/// A named setting.
fn setting(name: &str) -> Result<Setting, String> {
    let base = Setting {
        name: name.into(),
        frequencies: vec![0.80, 0.15, 0.05],
        scales: vec![1.0, 0.3, 0.1],
        actions: 5,
        majority_quality: 0.5,
        noise: 0.1,
    };
    Ok(match name {
        "default" => base,
        "sparse" => Setting {
            majority_quality: 0.0,
            noise: 0.0,
            ..base
        },
        "noisy" => Setting { noise: 0.5, ..base },
        "small" => Setting {
            frequencies: vec![0.70, 0.15, 0.12, 0.03],
            scales: vec![1.0, 0.5, 0.2, 0.05],
            ..base
        },
        _ => {
            return Err(format!(
                "unknown setting {name:?}: default, sparse, noisy, small"
            ))
        }
    })
}

/// One job: a setting, a run.
pub struct Job {
    setting: usize,
    spec: RunSpec,
}

/// Runs every job on `threads` workers; results in job order. Prints progress to stderr.
fn run_jobs(
    settings: &[Setting],
    sched: &Schedule,
    jobs: &[Job],
    threads: usize,
) -> Result<Vec<RunOut>, String> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<RunOut>>> = Mutex::new(vec![None; jobs.len()]);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let done = Mutex::new(0usize);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let i = {
                    let mut n = next.lock().expect("counter");
                    *n += 1;
                    *n - 1
                };
                let Some(job) = jobs.get(i) else { break };
                if failure.lock().expect("failure").is_some() {
                    break;
                }
                match sim::run(&settings[job.setting], sched, &job.spec) {
                    Ok(out) => {
                        results.lock().expect("results")[i] = Some(out);
                        let mut d = done.lock().expect("done");
                        *d += 1;
                        if d.is_multiple_of(200) || *d == jobs.len() {
                            eprintln!(
                                "  {}/{} runs, {:.0} s",
                                *d,
                                jobs.len(),
                                t0.elapsed().as_secs_f64()
                            );
                        }
                    }
                    Err(e) => {
                        *failure.lock().expect("failure") = Some(format!(
                            "{} G={} seed {}: {e}",
                            job.spec.rule, job.spec.g, job.spec.seed
                        ))
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("failure") {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .expect("results")
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_logging();
    let cli = Cli::parse();
    let sched = Schedule {
        steps: cli.steps,
        prompts: cli.prompts,
        lr: cli.lr,
    };
    let seeds: Vec<u64> = (cli.first_seed..cli.first_seed + cli.seeds).collect();
    std::fs::create_dir_all(&cli.out)?;
    let t0 = Instant::now();
    match &cli.cmd {
        Cmd::Rules => println!("{}", Rule::catalogue()),
        Cmd::Verify { g, setting: s } => {
            study::verify(&setting(s)?, &sched, g, &seeds, cli.threads, &cli.out)?;
        }
        Cmd::Diagnose {
            g,
            rules,
            setting: s,
            plot_g,
            plot,
        } => {
            let rules = parse_rules(rules)?;
            diagnose::diagnose(
                &setting(s)?,
                &sched,
                g,
                &rules,
                &seeds,
                cli.threads,
                *plot_g,
                plot,
            )?;
        }
        Cmd::Paired {
            csv,
            group_col,
            value_col,
            filter,
            at,
            bases,
            title,
            name,
        } => {
            let filter = filter
                .as_deref()
                .map(|f| f.split_once('=').ok_or("--filter column=value"))
                .transpose()?;
            paired::paired(
                csv,
                group_col,
                value_col,
                filter,
                at,
                bases,
                title,
                &cli.out.join(format!("{name}.md")),
            )?;
        }
        Cmd::Phase2 {
            regimes,
            layouts,
            g,
            estimators,
            shuffled,
            early,
            name,
        } => {
            let mut settings = Vec::new();
            for r in regimes {
                for l in layouts {
                    settings.push(grid_setting(r, l)?);
                }
            }
            let mut all = vec![Rule::parse_crate("grpo")?, Rule::parse_crate("p_grpo")?];
            for e in estimators
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
            {
                let r = Rule::parse_crate(e)?;
                if !all.contains(&r) {
                    all.push(r);
                }
            }
            let shuffled = shuffled
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(Rule::parse_crate)
                .collect::<Result<Vec<_>, _>>()?;
            study::study(
                &settings,
                &sched,
                g,
                &all,
                &shuffled,
                &seeds,
                cli.threads,
                *early,
                &cli.out.join(name),
            )?;
        }
        Cmd::Study {
            settings,
            g,
            rules,
            shuffled,
            early,
            name,
        } => {
            let settings: Vec<Setting> = settings
                .iter()
                .map(|s| setting(s))
                .collect::<Result<_, _>>()?;
            let mut all = vec![Rule::Grpo, Rule::PGrpo];
            for r in parse_rules(rules)? {
                if !all.contains(&r) {
                    all.push(r);
                }
            }
            let shuffled = parse_rules(shuffled)?;
            study::study(
                &settings,
                &sched,
                g,
                &all,
                &shuffled,
                &seeds,
                cli.threads,
                *early,
                &cli.out.join(name),
            )?;
        }
    }
    eprintln!("wall time {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn parse_rules(names: &[String]) -> Result<Vec<Rule>, String> {
    names
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(Rule::parse)
        .collect()
}
