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

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use pgrpo::bandit::PreferenceBandit;
use pgrpo::{Estimator, GroupKey, GroupedPrompt, HistoryKind, Trainer, TrainerConfig};
use rand::{rngs::StdRng, SeedableRng};

#[derive(Parser, Debug, Clone)]
#[command(about = "GRPO vs P-GRPO on a heterogeneous-preference contextual bandit")]
struct Args {
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
    /// Estimators to run (`p_grpo_shuffled` is the ablation).
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
) -> pgrpo::Result<Vec<Vec<f64>>> {
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
    for _ in 0..args.steps {
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
        trainer.step(&batch)?;
        curves.push(bandit.evaluate(trainer.policy())?);
    }
    Ok(curves)
}

/// Two-sided 95% Student-t quantile for `n - 1` degrees of freedom.
fn t95(n: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match n {
        0 | 1 => f64::NAN,
        2..=11 => T[n - 2],
        12..=30 => 2.1,
        _ => 1.96,
    }
}

fn mean_ci(v: &[f64]) -> (f64, f64) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t95(n) * (var / n as f64).sqrt())
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
    let args = Args::parse();
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

    let jobs: Vec<(usize, usize, u64)> = args
        .g
        .iter()
        .flat_map(|&g| (0..arms.len()).flat_map(move |a| (0..args.seeds).map(move |s| (g, a, s))))
        .collect();
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<RunResult>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.threads.max(1) {
            scope.spawn(|| loop {
                let job = {
                    let mut n = next.lock().expect("job counter");
                    let j = jobs.get(*n).copied();
                    *n += 1;
                    j
                };
                let Some((g, a, seed)) = job else { break };
                let t = Instant::now();
                match run(&args, &bandit, history, g, &arms[a], seed) {
                    Ok(curves) => results.lock().expect("results").push(RunResult {
                        g,
                        arm: a,
                        seed,
                        curves,
                        secs: t.elapsed().as_secs_f64(),
                    }),
                    Err(e) => {
                        *failure.lock().expect("failure") =
                            Some(format!("{} G={g} seed {seed}: {e}", arms[a].name));
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner()? {
        return Err(e.into());
    }
    let mut results = results.into_inner()?;
    results.sort_by_key(|r| (r.g, r.arm, r.seed));
    let wall = t0.elapsed().as_secs_f64();

    // CSV of every curve.
    if let Some(dir) = args.out.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut csv = fs::File::create(&args.out)?;
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
    let secs: f64 = results.iter().map(|r| r.secs).sum();
    println!(
        "\n{} runs × {} steps in {wall:.1} s wall ({:.2} ms per step per run); curves: {}",
        results.len(),
        args.steps,
        1e3 * secs / (results.len() * args.steps) as f64,
        args.out.display()
    );
    Ok(())
}
