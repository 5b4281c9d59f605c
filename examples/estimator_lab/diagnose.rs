//! `diagnose`: what P-GRPO's advantages look like over training, per group, against GRPO's.
//!
//! For every step and true group the run records (see [`GroupStep`]): the batch mean reward
//! of the group, its history mean `μ_p` and std `σ_p` (before the batch), the oracle mean
//! `μ*` and std `σ*` of its reward under the sampling policy, the fraction of its rows with a
//! positive advantage (overall and among rows whose action is not the group's preferred
//! one), the mean within-prompt std of the advantages (the good-vs-bad contrast), the mean
//! |prompt-mean advantage| (the offset), the fraction of zero-spread prompts, and the
//! advantage-weighted push on the preferred action's logit. The table averages each over
//! windows of steps (per run, then over seeds); the plot shows them for one `G`.

use std::path::Path;

use crate::common::mean_ci;
use crate::common::plot::{Band, Figure, Panel};
use crate::estimators::Rule;
use crate::report::nanmean;
use crate::sim::{GroupStep, RunOut, RunSpec, Schedule, Setting};
use crate::{run_jobs, Job};

type Err = Box<dyn std::error::Error>;

/// Reads one diagnosed quantity from a step.
type Getter = fn(&GroupStep) -> f64;

/// One diagnosed quantity: a name and how to read it from a step.
struct Metric {
    name: &'static str,
    get: Getter,
}

const METRICS: [Metric; 9] = [
    Metric {
        name: "μ_batch",
        get: |s| s.batch_mean,
    },
    Metric {
        name: "μ_p",
        get: |s| s.hist_mean,
    },
    Metric {
        name: "(μ*−μ_p)/σ_p",
        get: |s| (s.oracle_mean - s.hist_mean) / s.hist_std,
    },
    Metric {
        name: "σ_p/σ*",
        get: |s| s.hist_std / s.oracle_std,
    },
    Metric {
        name: "P(A>0)",
        get: |s| s.frac_pos,
    },
    Metric {
        name: "P(A>0|bad)",
        get: |s| s.frac_pos_bad,
    },
    Metric {
        name: "spread",
        get: |s| s.spread,
    },
    Metric {
        name: "|offset|",
        get: |s| s.offset_abs,
    },
    Metric {
        name: "zero-spr",
        get: |s| s.zero_spread,
    },
];

/// Runs the rules with diagnostics on, prints the window table per G and plots one G.
#[allow(clippy::too_many_arguments)]
pub fn diagnose(
    setting: &Setting,
    sched: &Schedule,
    gs: &[usize],
    rules: &[Rule],
    seeds: &[u64],
    threads: usize,
    plot_g: usize,
    plot: &Path,
) -> Result<(), Err> {
    let mut jobs = Vec::new();
    for &g in gs {
        for rule in rules {
            for &seed in seeds {
                jobs.push(Job {
                    setting: 0,
                    spec: RunSpec {
                        g,
                        rule: rule.clone(),
                        shuffled: false,
                        seed,
                        verify: None,
                        diagnose: true,
                    },
                });
            }
        }
    }
    let outs = run_jobs(std::slice::from_ref(setting), sched, &jobs, threads)?;
    let s = sched.steps;
    let windows: Vec<(usize, usize)> = [
        (0, s / 6),
        (s / 6, s / 3),
        (s / 3, 2 * s / 3),
        (2 * s / 3, s),
    ]
    .into_iter()
    .filter(|(a, b)| b > a)
    .collect();
    let k = setting.frequencies.len();
    println!(
        "# Diagnosis on `{}`: {} seeds; per window of steps, the mean over seeds of each run's window mean",
        setting.name,
        seeds.len()
    );
    println!(
        "# μ_batch: the group's batch mean reward; μ_p, σ_p: its cumulative history before the batch; μ*, σ*: oracle mean/std of its reward under the sampling policy;"
    );
    println!(
        "# P(A>0|bad): share of positive advantages among rows whose action is not the group's preferred one; spread: mean within-prompt std of A; |offset|: mean |prompt-mean A|; zero-spr: share of zero-spread prompts;"
    );
    println!(
        "# push: 100 × Σ A(1[a=k]−π_k)/rows, the advantage-weighted push on the preferred action's logit; push0: the same on action 0 (the majority's, a compromise for the others); P(p0>0): share of steps where push0 > 0"
    );
    for &g in gs {
        for rule in rules {
            let runs: Vec<&RunOut> = jobs
                .iter()
                .zip(&outs)
                .filter(|(j, _)| j.spec.g == g && &j.spec.rule == rule)
                .map(|(_, o)| o)
                .collect();
            println!("\n## G = {g}, {rule}");
            let mut header = format!("{:<4} {:>9} {:>6}", "grp", "steps", "frac");
            for m in &METRICS {
                header += &format!(" {:>12}", m.name);
            }
            header += &format!(" {:>8} {:>8} {:>8}", "push", "push0", "P(p0>0)");
            println!("{header}");
            for grp in 0..k {
                for &(a, b) in &windows {
                    let frac: Vec<f64> = runs.iter().map(|o| o.curves[b][grp]).collect();
                    let mut line = format!(
                        "g{grp:<3} {:>9} {:>6.3}",
                        format!("{}-{}", a + 1, b),
                        mean_ci(&frac).0
                    );
                    for m in &METRICS {
                        let v = window_mean(&runs, grp, a, b, m.get);
                        line += &format!(" {v:>12.3}");
                    }
                    line += &format!(
                        " {:>8.3} {:>8.3} {:>8.3}",
                        100.0 * window_mean(&runs, grp, a, b, |s| s.push),
                        100.0 * window_mean(&runs, grp, a, b, |s| s.push0),
                        window_mean(&runs, grp, a, b, |s| {
                            if s.push0.is_finite() {
                                (s.push0 > 0.0) as u8 as f64
                            } else {
                                f64::NAN
                            }
                        })
                    );
                    println!("{line}");
                }
            }
            // The shared logits at the end: how far the majority's action is ahead.
            let shared: Vec<Vec<f32>> = runs.iter().map(|o| o.shared_logits.clone()).collect();
            let a = shared.first().map_or(0, |v| v.len());
            let mean_of = |i: usize| nanmean(shared.iter().map(|v| v[i] as f64));
            let line: Vec<String> = (0..a).map(|i| format!("{:+.2}", mean_of(i))).collect();
            println!(
                "shared logits at step {s} (mean over seeds): [{}]",
                line.join(", ")
            );
        }
    }
    if gs.contains(&plot_g) {
        let fig = figure(setting, &jobs, &outs, rules, plot_g, sched.steps);
        if let Some(dir) = plot.parent() {
            std::fs::create_dir_all(dir)?;
        }
        fig.write_svg(plot)?;
        fig.write_png(&plot.with_extension("png"))?;
        println!("\nplot {} (and .png)", plot.display());
    }
    Ok(())
}

/// Mean over runs of each run's mean of `get` over diag steps `a..b` (non-finite skipped).
fn window_mean(runs: &[&RunOut], grp: usize, a: usize, b: usize, get: Getter) -> f64 {
    nanmean(
        runs.iter()
            .map(|o| nanmean(o.diag[a..b].iter().map(|row| get(&row[grp])))),
    )
}

/// Rows: fraction of optimum and five diagnosed quantities; columns: groups; one band per
/// rule (10-step bins per run, then mean and 95% interval over runs).
fn figure(
    setting: &Setting,
    jobs: &[Job],
    outs: &[RunOut],
    rules: &[Rule],
    g: usize,
    steps: usize,
) -> Figure {
    const BIN: usize = 10;
    let rows: [(&str, Option<Getter>); 6] = [
        ("fraction of optimum", None),
        (
            "(μ*−μ_p)/σ_p (lag of the history mean)",
            Some(|s| (s.oracle_mean - s.hist_mean) / s.hist_std),
        ),
        (
            "σ_p/σ* (history std vs current)",
            Some(|s| s.hist_std / s.oracle_std),
        ),
        ("P(A>0)", Some(|s| s.frac_pos)),
        ("P(A>0 | non-preferred action)", Some(|s| s.frac_pos_bad)),
        ("within-prompt std of A", Some(|s| s.spread)),
    ];
    let k = setting.frequencies.len();
    let bins: Vec<(usize, usize)> = (0..steps.div_ceil(BIN))
        .map(|b| (b * BIN, ((b + 1) * BIN).min(steps)))
        .collect();
    let x: Vec<f64> = bins.iter().map(|(a, b)| (a + b) as f64 / 2.0).collect();
    let mut panels = Vec::new();
    for (title, get) in &rows {
        for grp in 0..k {
            let bands = rules
                .iter()
                .enumerate()
                .map(|(color, rule)| {
                    let runs: Vec<&RunOut> = jobs
                        .iter()
                        .zip(outs)
                        .filter(|(j, _)| j.spec.g == g && &j.spec.rule == rule)
                        .map(|(_, o)| o)
                        .collect();
                    let per_run: Vec<Vec<f64>> = runs
                        .iter()
                        .map(|o| {
                            bins.iter()
                                .map(|&(a, b)| match get {
                                    None => o.curves[b][grp],
                                    Some(f) => nanmean(o.diag[a..b].iter().map(|r| f(&r[grp]))),
                                })
                                .collect()
                        })
                        .collect();
                    nan_band(&rule.to_string(), color, &x, &per_run)
                })
                .collect();
            panels.push(Panel {
                title: format!(
                    "g{grp} ({:.0}%, scale {}): {title}",
                    100.0 * setting.frequencies[grp],
                    setting.scales[grp]
                ),
                bands,
            });
        }
    }
    Figure {
        title: format!(
            "Diagnosis, {} bandit, G = {g}: per group, 10-step bins, mean and 95% band over seeds",
            setting.name
        ),
        x_label: "step".into(),
        y_label: "".into(),
        rows: rows.len(),
        cols: k,
        panels,
    }
}

/// Mean and 95% band over runs at each x, skipping non-finite values.
fn nan_band(name: &str, color: usize, x: &[f64], runs: &[Vec<f64>]) -> Band {
    let mut b = Band {
        name: name.to_owned(),
        color,
        x: x.to_vec(),
        mean: Vec::new(),
        lo: Vec::new(),
        hi: Vec::new(),
    };
    for i in 0..x.len() {
        let v: Vec<f64> = runs
            .iter()
            .map(|r| r[i])
            .filter(|v| v.is_finite())
            .collect();
        let (m, ci) = if v.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            mean_ci(&v)
        };
        let ci = if ci.is_finite() { ci } else { 0.0 };
        b.mean.push(m);
        b.lo.push(m - ci);
        b.hi.push(m + ci);
    }
    b
}
