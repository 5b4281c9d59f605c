//! `verify` (the lab reproduces the crate) and `study` (every rule × setting × G).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use pgrpo::{AdvantageConfig, Estimator};

use crate::common::mean_ci;
use crate::estimators::Rule;
use crate::report::{fmt_diff, fmt_val, sig_neg, sig_pos, steps_to_90};
use crate::sim::{RunOut, RunSpec, Schedule, Setting};
use crate::{run_jobs, Job};

type Err = Box<dyn std::error::Error>;

/// Runs the lab's `grpo` and `p_grpo` with the crate computing the same estimator inside the
/// trainer, checks every step's advantages bit for bit, prints `grpo_vs_pgrpo`'s table and
/// writes its curve CSV (same columns) for a `diff`.
pub fn verify(
    setting: &Setting,
    sched: &Schedule,
    gs: &[usize],
    seeds: &[u64],
    threads: usize,
    out: &Path,
) -> Result<(), Err> {
    let crate_cfg = |estimator| AdvantageConfig {
        estimator,
        ..Default::default()
    };
    // The lab's count-annealed offset against the crate's, which ports it.
    let arms = [
        (Rule::Grpo, crate_cfg(Estimator::Grpo), "grpo"),
        (Rule::PGrpo, crate_cfg(Estimator::PGrpo), "p_grpo"),
        (
            Rule::AnnealCount {
                n0: 2048.0,
                prompt_scale: true,
            },
            crate_cfg(Estimator::AnnealedOffset),
            "anneal:n0=2048,scale=prompt",
        ),
    ];
    let mut jobs = Vec::new();
    for &g in gs {
        for (rule, est, _) in &arms {
            for &seed in seeds {
                jobs.push(Job {
                    setting: 0,
                    spec: RunSpec {
                        g,
                        rule: rule.clone(),
                        shuffled: false,
                        seed,
                        verify: Some(*est),
                        diagnose: false,
                    },
                });
            }
        }
    }
    let t = std::time::Instant::now();
    let outs = run_jobs(std::slice::from_ref(setting), sched, &jobs, threads)?;
    let wall = t.elapsed().as_secs_f64();
    let mismatched: usize = outs.iter().map(|o| o.mismatched_steps).sum();
    let blowups: u64 = outs.iter().map(|o| o.blowups).sum();
    println!(
        "# verify: {} runs × {} steps; steps whose lab advantages differ from the crate's: {mismatched}; rows with |A| > 50: {blowups}; {wall:.1} s",
        outs.len(),
        sched.steps
    );
    let bandit = setting.bandit()?;
    let s = sched.steps;
    let mut checkpoints = vec![s / 6, s / 3, 2 * s / 3, s];
    checkpoints.retain(|&x| x > 0);
    checkpoints.dedup();
    let csv_path = out.join(format!("verify_{}.csv", setting.name));
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&csv_path)?);
    writeln!(csv, "g,estimator,seed,step,group,fraction_of_optimum")?;
    for &g in gs {
        let runs_of = |name: &str| -> Vec<(&Job, &RunOut)> {
            jobs.iter()
                .zip(&outs)
                .filter(|(j, _)| j.spec.g == g && j.spec.rule.to_string() == name)
                .collect()
        };
        for (_, _, name) in &arms {
            for (j, o) in runs_of(name) {
                for (step, row) in o.curves.iter().enumerate() {
                    for (k, v) in row.iter().enumerate() {
                        writeln!(csv, "{g},{name},{},{step},g{k},{v:.6}", j.spec.seed)?;
                    }
                }
            }
        }
        for k in 0..bandit.num_groups() {
            println!(
                "\n## G = {g}, group g{k}: {:.0}% of prompts, reward scale {}",
                100.0 * setting.frequencies[k],
                setting.scales[k]
            );
            let mut header = format!("{:<18}", "estimator");
            for c in &checkpoints {
                header += &format!(" {:>15}", format!("step {c}"));
            }
            println!("{header} {:>18}", "steps to 90%");
            for (_, _, name) in &arms {
                let runs = runs_of(name);
                let mut line = format!("{name:<18}");
                for &c in &checkpoints {
                    let v: Vec<f64> = runs.iter().map(|(_, o)| o.curves[c][k]).collect();
                    let (m, ci) = mean_ci(&v);
                    line += &format!(" {:>15}", format!("{m:.3} ± {ci:.3}"));
                }
                let curves: Vec<&Vec<Vec<f64>>> = runs.iter().map(|(_, o)| &o.curves).collect();
                println!("{line} {:>18}", steps_to_90(&curves, k));
            }
        }
    }
    csv.flush()?;
    println!("\ncurves {}", csv_path.display());
    if mismatched > 0 {
        return Err(format!("{mismatched} steps differ from the crate").into());
    }
    Ok(())
}

/// The key of a run in the study.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    setting: usize,
    g: usize,
    rule: String,
    shuffled: bool,
}

/// Every rule × setting × G × seed; paired tables, verdict, CSV and markdown.
#[allow(clippy::too_many_arguments)]
pub fn study(
    settings: &[Setting],
    sched: &Schedule,
    gs: &[usize],
    rules: &[Rule],
    shuffled: &[Rule],
    seeds: &[u64],
    threads: usize,
    early: usize,
    out: &Path,
) -> Result<(), Err> {
    let mut jobs = Vec::new();
    for (si, _) in settings.iter().enumerate() {
        for &g in gs {
            let arms = rules
                .iter()
                .map(|r| (r, false))
                .chain(shuffled.iter().map(|r| (r, true)));
            for (rule, sh) in arms {
                for &seed in seeds {
                    jobs.push(Job {
                        setting: si,
                        spec: RunSpec {
                            g,
                            rule: rule.clone(),
                            shuffled: sh,
                            seed,
                            verify: None,
                            diagnose: false,
                        },
                    });
                }
            }
        }
    }
    eprintln!("{} runs", jobs.len());
    let t = std::time::Instant::now();
    let outs = run_jobs(settings, sched, &jobs, threads)?;
    let wall = t.elapsed().as_secs_f64();
    let mut by: HashMap<Key, Vec<(u64, &RunOut)>> = HashMap::new();
    for (j, o) in jobs.iter().zip(&outs) {
        by.entry(Key {
            setting: j.setting,
            g: j.spec.g,
            rule: j.spec.rule.to_string(),
            shuffled: j.spec.shuffled,
        })
        .or_default()
        .push((j.spec.seed, o));
    }
    let end = sched.steps;
    let early = early.min(end);

    // Per-run CSV.
    let mut csv = std::io::BufWriter::new(std::fs::File::create(out.with_extension("csv"))?);
    writeln!(
        csv,
        "setting,g,rule,shuffled,seed,group,step{early},step{end},steps_to_90,blowups"
    )?;
    for (j, o) in jobs.iter().zip(&outs) {
        for k in 0..settings[j.setting].frequencies.len() {
            let s90 = o
                .curves
                .iter()
                .position(|r| r[k] >= 0.9)
                .map_or("".into(), |s| s.to_string());
            writeln!(
                csv,
                "{},{},\"{}\",{},{},g{k},{:.6},{:.6},{s90},{}",
                settings[j.setting].name,
                j.spec.g,
                j.spec.rule,
                j.spec.shuffled,
                j.spec.seed,
                o.curves[early][k],
                o.curves[end][k],
                o.blowups
            )?;
        }
    }
    csv.flush()?;

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Estimator study: {} seeds ({}..{}), {} steps, {} prompts/step, lr {}\n",
        seeds.len(),
        seeds.first().copied().unwrap_or(0),
        seeds.last().copied().unwrap_or(0),
        sched.steps,
        sched.prompts,
        sched.lr
    );
    let _ = writeln!(
        md,
        "Paired differences (same seed: same prompts, labels, sampling and reward noise streams) \
         in fraction of the group's optimum, mean ± 95% t-interval over seeds; `*`: the interval \
         excludes 0. `sh:` = shuffled labels. Blow-ups: rows with |A| > 50, summed over seeds.\n"
    );
    // Verdict bookkeeping: per arm, cells where the smallest group ends significantly below
    // GRPO, and cells where P-GRPO is significantly ahead early and the arm is not.
    // The compact summary: per cell, each arm's smallest-group Δ vs GRPO early / at the end;
    // and per arm, runs whose smallest group ends below 0.9 of its optimum.
    let mut summary: Vec<(String, Vec<String>)> = Vec::new();
    let mut stuck: HashMap<String, (usize, usize)> = HashMap::new();
    let mut worse_end: HashMap<String, Vec<String>> = HashMap::new();
    let mut lost_early: HashMap<String, Vec<String>> = HashMap::new();
    let mut gained_early: HashMap<String, Vec<String>> = HashMap::new();
    let arm_names: Vec<(String, bool)> = rules
        .iter()
        .map(|r| (r.to_string(), false))
        .chain(shuffled.iter().map(|r| (r.to_string(), true)))
        .collect();
    for (si, st) in settings.iter().enumerate() {
        let small = st.smallest();
        let fifteen = st.fifteen();
        for &g in gs {
            let get = |rule: &str, sh: bool| {
                by.get(&Key {
                    setting: si,
                    g,
                    rule: rule.into(),
                    shuffled: sh,
                })
            };
            let (Some(grpo), Some(pg)) = (get("grpo", false), get("p_grpo", false)) else {
                continue;
            };
            let diffs =
                |runs: &[(u64, &RunOut)], base: &[(u64, &RunOut)], step: usize, k: usize| {
                    runs.iter()
                        .filter_map(|(s, o)| {
                            base.iter()
                                .find(|(b, _)| b == s)
                                .map(|(_, b)| o.curves[step][k] - b.curves[step][k])
                        })
                        .collect::<Vec<f64>>()
                };
            let cell = format!("{} G={g}", st.name);
            let pg_early_gain = sig_pos(&diffs(pg, grpo, early, small));
            let mut row = Vec::new();
            let _ = writeln!(
                md,
                "## {} G = {g}: smallest group g{small} ({:.0}%, scale {}){}\n",
                st.name,
                100.0 * st.frequencies[small],
                st.scales[small],
                fifteen.map_or(String::new(), |f| format!(", 15% group g{f}"))
            );
            let _ = writeln!(
                md,
                "| rule | g{small} @{early} | g{small} @{end} | Δgrpo @{early} | Δgrpo @{end} | Δp_grpo @{early} | Δp_grpo @{end} | g{small} steps→90% | 15% Δgrpo @{early} | 15% Δgrpo @{end} | blow-ups |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
            for (name, sh) in &arm_names {
                let Some(runs) = get(name, *sh) else { continue };
                let at = |step: usize| -> Vec<f64> {
                    runs.iter().map(|(_, o)| o.curves[step][small]).collect()
                };
                let curves: Vec<&Vec<Vec<f64>>> = runs.iter().map(|(_, o)| &o.curves).collect();
                let d_early = diffs(runs, grpo, early, small);
                let d_end = diffs(runs, grpo, end, small);
                let f15 = |step: usize| {
                    fifteen.map_or("–".into(), |f| fmt_diff(&diffs(runs, grpo, step, f)))
                };
                let blow: u64 = runs.iter().map(|(_, o)| o.blowups).sum();
                let label = if *sh {
                    format!("sh:{name}")
                } else {
                    name.clone()
                };
                row.push(format!("{} / {}", fmt_diff(&d_early), fmt_diff(&d_end)));
                let st_ = stuck.entry(label.clone()).or_default();
                st_.0 += runs
                    .iter()
                    .filter(|(_, o)| o.curves[end][small] < 0.9)
                    .count();
                st_.1 += runs.len();
                let _ = writeln!(
                    md,
                    "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {blow} |",
                    fmt_val(&at(early)),
                    fmt_val(&at(end)),
                    fmt_diff(&d_early),
                    fmt_diff(&d_end),
                    fmt_diff(&diffs(runs, pg, early, small)),
                    fmt_diff(&diffs(runs, pg, end, small)),
                    steps_to_90(&curves, small),
                    f15(early),
                    f15(end),
                );
                if !sh {
                    if sig_neg(&d_end) {
                        worse_end
                            .entry(name.clone())
                            .or_default()
                            .push(cell.clone());
                    }
                    if pg_early_gain && !sig_pos(&d_early) {
                        lost_early
                            .entry(name.clone())
                            .or_default()
                            .push(cell.clone());
                    }
                    if sig_pos(&d_early) {
                        gained_early
                            .entry(name.clone())
                            .or_default()
                            .push(cell.clone());
                    }
                }
            }
            let _ = writeln!(md);
            summary.push((cell, row));
        }
    }
    let labels: Vec<String> = arm_names
        .iter()
        .map(|(n, sh)| if *sh { format!("sh:{n}") } else { n.clone() })
        .collect();
    let _ = writeln!(
        md,
        "## Summary: the smallest group, Δ vs GRPO at step {early} / at step {end}\n\n\
         Mean ± 95% t-interval of the paired difference over seeds (`*`: excludes 0); `sh:` = \
         shuffled labels. Per-cell details (absolute values, Δ vs P-GRPO, steps to 90%) above.\n"
    );
    let _ = writeln!(md, "| cell | {} |", labels.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(labels.len()));
    for (cell, row) in &summary {
        let _ = writeln!(md, "| {cell} | {} |", row.join(" | "));
    }
    let _ = writeln!(
        md,
        "\nRuns whose smallest group ends below 0.9 of its optimum (all cells): {}\n",
        labels
            .iter()
            .map(|l| {
                let (k, n) = stuck.get(l).copied().unwrap_or_default();
                format!("{l} {k}/{n}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "## Verdict against the default bar (smallest group: never significantly below GRPO at \
         step {end} in any cell, and significantly above GRPO at step {early} wherever p_grpo is)\n"
    );
    let _ = writeln!(
        md,
        "| rule | cells significantly below GRPO at {end} | cells where p_grpo's early gain is lost | cells significantly above GRPO at {early} | meets the bar |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in rules {
        let name = r.to_string();
        let w = worse_end.get(&name).cloned().unwrap_or_default();
        let l = lost_early.get(&name).cloned().unwrap_or_default();
        let gnd = gained_early.get(&name).cloned().unwrap_or_default();
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} |",
            list(&w),
            list(&l),
            list(&gnd),
            if w.is_empty() && l.is_empty() {
                "yes"
            } else {
                "no"
            }
        );
    }
    let total_steps = jobs.len() * sched.steps;
    let _ = writeln!(
        md,
        "\n{} runs × {} steps in {wall:.1} s wall on {threads} threads ({:.3} ms per step).",
        jobs.len(),
        sched.steps,
        1e3 * wall * threads as f64 / total_steps as f64
    );
    print!("{md}");
    std::fs::write(out.with_extension("md"), &md)?;
    println!(
        "written {} and {}",
        out.with_extension("md").display(),
        out.with_extension("csv").display()
    );
    Ok(())
}
