//! The study's results from its run directories: markdown tables with paired 95% intervals,
//! per-group curves (SVG and PNG), timings, peak memory and a CSV of every curve.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use crate::common::mean_ci;
use crate::common::plot::{Band, Figure, Panel};
use crate::run::{self, Arm, Done, Eval, StepRecord};
use crate::task::GROUPS;
use crate::Settings;

/// What one run left on disk.
struct RunData {
    arm: usize,
    seed: u64,
    /// Held-out evaluations, step 0 (the seed's base evaluation) first.
    evals: Vec<Eval>,
    steps: Vec<StepRecord>,
    done: Option<Done>,
}

impl RunData {
    /// Held-out reward per group at `step`, with the macro and share-weighted means appended.
    fn at(&self, step: u64) -> Option<Vec<f64>> {
        self.evals
            .iter()
            .find(|e| e.step == step)
            .map(|e| with_means(&e.rewards()))
    }
}

/// Row labels: the groups, then the unweighted and the share-weighted mean.
fn row_names() -> Vec<String> {
    let mut v: Vec<String> = GROUPS
        .iter()
        .map(|g| format!("{} ({:.0}%, {})", g.name, 100.0 * g.share, g.want.name()))
        .collect();
    v.push("mean over groups".into());
    v.push("mean by share".into());
    v
}

fn with_means(per_group: &[f64]) -> Vec<f64> {
    let mut v = per_group.to_vec();
    v.push(per_group.iter().sum::<f64>() / per_group.len() as f64);
    v.push(
        per_group
            .iter()
            .zip(&GROUPS)
            .map(|(r, g)| r * g.share)
            .sum(),
    );
    v
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, ci) = mean_ci(v);
    if ci.is_finite() {
        format!("{m:.3} ± {ci:.3}")
    } else {
        format!("{m:.3}")
    }
}

/// Mean ± 95% t-interval of paired differences, bold when the interval excludes 0.
fn diff_cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, ci) = mean_ci(v);
    if !ci.is_finite() {
        return format!("{m:+.3}");
    }
    if m - ci > 0.0 || m + ci < 0.0 {
        format!("**{m:+.3} ± {ci:.3}**")
    } else {
        format!("{m:+.3} ± {ci:.3}")
    }
}

fn load_runs(out: &Path, arms: &[Arm], seeds: &[u64]) -> Result<Vec<RunData>, String> {
    let mut runs = Vec::new();
    for &seed in seeds {
        let base_path = out.join("base").join(format!("seed-{seed}.json"));
        let base: Option<Eval> = match fs::read_to_string(&base_path) {
            Ok(t) => Some(
                serde_json::from_str(&t).map_err(|e| format!("{}: {e}", base_path.display()))?,
            ),
            Err(_) => None,
        };
        for (a, arm) in arms.iter().enumerate() {
            let dir = run::run_dir(out, &arm.name, seed);
            if !dir.exists() {
                continue;
            }
            let mut evals: Vec<Eval> = base.iter().cloned().collect();
            evals.extend(run::read_jsonl::<Eval>(&dir.join("evals.jsonl"))?);
            let done = match fs::read_to_string(dir.join("done.json")) {
                Ok(t) => Some(serde_json::from_str(&t).map_err(|e| e.to_string())?),
                Err(_) => None,
            };
            runs.push(RunData {
                arm: a,
                seed,
                evals,
                steps: run::read_jsonl(&dir.join("steps.jsonl"))?,
                done,
            });
        }
    }
    Ok(runs)
}

/// Paired differences `a − b` of row `row` at `step` over the seeds both have.
fn paired(runs: &[RunData], a: usize, b: usize, step: u64, row: usize) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.arm == a)
        .filter_map(|ra| {
            let rb = runs.iter().find(|r| r.arm == b && r.seed == ra.seed)?;
            Some(ra.at(step)?[row] - rb.at(step)?[row])
        })
        .collect()
}

/// Values of row `row` at `step` for arm `a`.
fn values(runs: &[RunData], a: usize, step: u64, row: usize) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.arm == a)
        .filter_map(|r| Some(r.at(step)?[row]))
        .collect()
}

/// Improvement over the starting model, `arm(step) − before`, paired by seed.
fn gains(runs: &[RunData], a: usize, step: u64, row: usize) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.arm == a)
        .filter_map(|r| Some(r.at(step)?[row] - r.at(0)?[row]))
        .collect()
}

fn table_header(out: &mut String, first: &str, cols: &[String]) {
    let _ = writeln!(out, "| {first} | {} |", cols.join(" | "));
    let _ = writeln!(
        out,
        "|---|{}",
        cols.iter().map(|_| "---:|").collect::<String>()
    );
}

/// The base-rate table of `--base-rates`: rows = whose prompts, columns = whose want.
pub fn base_rate_table(ev: &Eval, secs: f64, s: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Base rates of every want on every group's prompts\n\n{} samples per group (all 12 \
         requests), temperature {}, top-p {}, ≤ {} new tokens; {secs:.0}s, load {:.1}.\n\
         Diagonal = the group's own want (its base reward). Name rules use the row's name.\n",
        ev.n,
        s.temperature,
        s.top_p,
        s.max_new_tokens,
        run::load_average()
    );
    let cols: Vec<String> = GROUPS
        .iter()
        .map(|g| format!("{} ({})", g.want.name(), g.name))
        .collect();
    table_header(&mut out, "prompts of", &cols);
    for (g, group) in GROUPS.iter().enumerate() {
        let cells: Vec<String> = ev.rates[g]
            .iter()
            .enumerate()
            .map(|(w, r)| {
                if w == g {
                    format!("**{r:.3}**")
                } else {
                    format!("{r:.3}")
                }
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", group.name, cells.join(" | "));
    }
    out
}

/// Writes `results.md`, the plots and `curves.csv` into `out`, and returns the markdown.
/// `wall` is this invocation's wall time and worker count (`None` for `--report-only`).
pub fn write(
    out: &Path,
    s: &Settings,
    arms: &[Arm],
    seeds: &[u64],
    wall: Option<(f64, usize)>,
) -> Result<String, Box<dyn std::error::Error>> {
    let runs = load_runs(out, arms, seeds)?;
    if runs.is_empty() {
        return Err(format!(
            "{} holds no runs of these estimators and seeds",
            out.display()
        )
        .into());
    }
    let names: Vec<String> = arms.iter().map(|a| a.name.clone()).collect();
    let rows = row_names();
    let eval_steps = s.eval_steps();
    let last = s.steps as u64;
    let mid = eval_steps[eval_steps.len() / 2];
    let complete = |a: usize| {
        runs.iter()
            .filter(|r| r.arm == a && r.done.is_some())
            .count()
    };
    let mut md = String::new();

    let _ = writeln!(md, "# Persona study: {}\n", names.join(" vs "));
    let _ = writeln!(
        md,
        "Model {}; LoRA r = {}, α = {}, targets {}; AdamW lr {}; {} steps of {} prompts × G = \
         {}, ≤ {} new tokens, temperature {}, top-p {}; β = {}; P-GRPO min_count {}, offset \
         weight {}. Held-out: {} requests × {} samples per group at steps {:?}.\n",
        s.model.display(),
        s.lora_r,
        s.lora_alpha,
        s.lora_targets,
        s.lr,
        s.steps,
        s.prompts,
        s.g,
        s.max_new_tokens,
        s.temperature,
        s.top_p,
        s.beta,
        s.min_count,
        s.offset_weight,
        crate::task::HELDOUT_REQUESTS.len(),
        s.eval_samples,
        eval_steps
    );
    let counts: Vec<String> = arms
        .iter()
        .enumerate()
        .map(|(a, arm)| format!("{} {}/{}", arm.name, complete(a), seeds.len()))
        .collect();
    let _ = writeln!(
        md,
        "Complete runs: {}. Cells: mean ± 95% t-interval over seeds; \
        differences are paired by seed (bold: the interval excludes 0).\n",
        counts.join(", ")
    );

    let _ = writeln!(md, "## Task\n");
    table_header(
        &mut md,
        "group",
        &["share".into(), "want".into(), "reward rule".into()],
    );
    for g in &GROUPS {
        let _ = writeln!(
            md,
            "| {} | {:.0}% | {} | {} |",
            g.name,
            100.0 * g.share,
            g.want.name(),
            g.want.rule()
        );
    }
    md.push('\n');

    for (title, step) in [("end of training", last), ("middle", mid)] {
        if step == 0 || (title == "middle" && step == last) {
            continue;
        }
        let _ = writeln!(md, "## Held-out reward, {title} (step {step})\n");
        let mut cols = vec!["before".to_owned()];
        cols.extend(names.iter().cloned());
        cols.extend(names.iter().map(|n| format!("{n} − before")));
        table_header(&mut md, "group", &cols);
        for (row, name) in rows.iter().enumerate() {
            let before: Vec<f64> = runs
                .iter()
                .filter(|r| r.arm == 0)
                .filter_map(|r| Some(r.at(0)?[row]))
                .collect();
            let mut cells = vec![cell(&before)];
            cells.extend((0..arms.len()).map(|a| cell(&values(&runs, a, step, row))));
            cells.extend((0..arms.len()).map(|a| diff_cell(&gains(&runs, a, step, row))));
            let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
        }
        md.push('\n');
        // Paired differences against GRPO and against P-GRPO.
        let mut pairs: Vec<(usize, usize)> = Vec::new();
        for reference in ["grpo", "p_grpo"] {
            if let Some(b) = names.iter().position(|n| n == reference) {
                for a in 0..arms.len() {
                    if a != b && !pairs.contains(&(b, a)) {
                        pairs.push((a, b));
                    }
                }
            }
        }
        if !pairs.is_empty() {
            let cols: Vec<String> = pairs
                .iter()
                .map(|&(a, b)| format!("{} − {}", names[a], names[b]))
                .collect();
            let _ = writeln!(md, "Paired differences at step {step}:\n");
            table_header(&mut md, "group", &cols);
            for (row, name) in rows.iter().enumerate() {
                let cells: Vec<String> = pairs
                    .iter()
                    .map(|&(a, b)| diff_cell(&paired(&runs, a, b, step, row)))
                    .collect();
                let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
            }
            md.push('\n');
        }
    }

    // How far the majority's habit spread: the rate of Ava's `!` on every group's prompts.
    let _ = writeln!(
        md,
        "## Spread of the majority's habit: rate of `!` on each group's held-out prompts (step \
         {last})\n"
    );
    let mut cols = vec!["before".to_owned()];
    cols.extend(names.iter().cloned());
    table_header(&mut md, "prompts of", &cols);
    for (g, group) in GROUPS.iter().enumerate() {
        let rate = |r: &RunData, step: u64| {
            r.evals
                .iter()
                .find(|e| e.step == step)
                .map(|e| e.rates[g][0])
        };
        let before: Vec<f64> = runs
            .iter()
            .filter(|r| r.arm == 0)
            .filter_map(|r| rate(r, 0))
            .collect();
        let mut cells = vec![cell(&before)];
        for a in 0..arms.len() {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.arm == a)
                .filter_map(|r| rate(r, last))
                .collect();
            cells.push(cell(&v));
        }
        let _ = writeln!(md, "| {} | {} |", group.name, cells.join(" | "));
    }
    md.push('\n');

    // Timings.
    let _ = writeln!(
        md,
        "## Seconds per training step\n\nMean over steps and seeds. Wall seconds: sampling, \
         reward (decoding and rules), update (log-probs, backward, AdamW), whole step; CPU \
         seconds of the worker's thread (each worker runs single-threaded when there are \
         several, so on a machine with a free core per worker the wall time of a step is \
         about its CPU time); load = the machine's 1-minute load average while the steps \
         ran.\n"
    );
    table_header(
        &mut md,
        "estimator",
        &[
            "steps".into(),
            "sampling".into(),
            "reward".into(),
            "update".into(),
            "step total".into(),
            "CPU: rollout".into(),
            "CPU: update".into(),
            "held-out eval (s each, CPU)".into(),
            "load".into(),
        ],
    );
    let mut all_steps = 0usize;
    let mut step_secs = 0.0;
    let mut eval_secs = 0.0;
    let mut cpu_secs = 0.0;
    for (a, name) in names.iter().enumerate() {
        let recs: Vec<&StepRecord> = runs
            .iter()
            .filter(|r| r.arm == a)
            .flat_map(|r| r.steps.iter())
            .collect();
        let evs: Vec<&Eval> = runs
            .iter()
            .filter(|r| r.arm == a)
            .flat_map(|r| r.evals.iter().filter(|e| e.step > 0))
            .collect();
        let n = recs.len().max(1) as f64;
        let mean = |f: fn(&StepRecord) -> f64| recs.iter().map(|r| f(r)).sum::<f64>() / n;
        let ev = evs.iter().map(|e| e.secs).sum::<f64>() / evs.len().max(1) as f64;
        let ev_cpu = evs.iter().map(|e| e.cpu).sum::<f64>() / evs.len().max(1) as f64;
        all_steps += recs.len();
        step_secs += recs.iter().map(|r| r.total).sum::<f64>();
        eval_secs += evs.iter().map(|e| e.secs).sum::<f64>();
        cpu_secs += recs
            .iter()
            .map(|r| r.rollout_cpu + r.update_cpu)
            .sum::<f64>()
            + evs.iter().map(|e| e.cpu).sum::<f64>();
        let _ = writeln!(
            md,
            "| {name} | {} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {ev:.1} ({ev_cpu:.1}) | {:.1} |",
            recs.len(),
            mean(|r| r.sample),
            mean(|r| r.score),
            mean(|r| r.update),
            mean(|r| r.total),
            mean(|r| r.rollout_cpu),
            mean(|r| r.update_cpu),
            mean(|r| r.load)
        );
    }
    let base: Vec<Eval> = seeds
        .iter()
        .filter_map(|k| {
            let p = out.join("base").join(format!("seed-{k}.json"));
            serde_json::from_str(&fs::read_to_string(p).ok()?).ok()
        })
        .collect();
    let base_secs: f64 = base.iter().map(|e| e.secs).sum();
    cpu_secs += base.iter().map(|e| e.cpu).sum::<f64>();
    let peak = runs
        .iter()
        .filter_map(|r| r.done.as_ref().map(|d| d.peak_rss_mib))
        .fold(run::peak_rss_mib(), f64::max);
    let _ = writeln!(
        md,
        "\nRun time summed over runs: {all_steps} training steps {:.0}s, held-out evaluations \
         {:.0}s, base evaluations {base_secs:.0}s (total {:.1} min of worker time).",
        step_secs,
        eval_secs,
        (step_secs + eval_secs + base_secs) / 60.0
    );
    let _ = writeln!(
        md,
        "CPU time of the workers' threads: {:.1} min (with one free core per single-threaded \
         worker, the study's wall time is about this divided by the number of workers).",
        cpu_secs / 60.0
    );
    if let Some((wall, workers)) = wall {
        let _ = writeln!(
            md,
            "This invocation: {:.1} min wall with {workers} worker(s).",
            wall / 60.0
        );
    }
    let _ = writeln!(
        md,
        "Peak resident memory of the process (VmHWM; all workers together): {peak:.0} MiB.\n"
    );

    // Examples.
    let _ = writeln!(
        md,
        "## One held-out completion per group at step {last} (first seed)\n"
    );
    for (a, name) in names.iter().enumerate() {
        let Some(r) = runs.iter().find(|r| r.arm == a && r.at(last).is_some()) else {
            continue;
        };
        let Some(e) = r.evals.iter().find(|e| e.step == last) else {
            continue;
        };
        let _ = writeln!(md, "**{name}** (seed {}):\n", r.seed);
        for (g, text) in GROUPS.iter().zip(&e.examples) {
            let _ = writeln!(md, "- {}: {:?}", g.name, text);
        }
        md.push('\n');
    }

    fs::create_dir_all(out)?;
    fs::write(out.join("results.md"), &md)?;
    write_csv(&out.join("curves.csv"), &runs, &names)?;
    plot(out, &runs, &names, &eval_steps, s.steps)?;
    Ok(md)
}

fn write_csv(path: &Path, runs: &[RunData], names: &[String]) -> std::io::Result<()> {
    let mut text = String::from("estimator,seed,step,group,source,reward\n");
    for r in runs {
        let arm = &names[r.arm];
        for e in &r.evals {
            for (g, x) in GROUPS.iter().zip(e.rewards()) {
                let _ = writeln!(
                    text,
                    "{arm},{},{},{},heldout,{x:.6}",
                    r.seed, e.step, g.name
                );
            }
        }
        for st in &r.steps {
            for (g, x) in GROUPS.iter().zip(&st.reward) {
                if let Some(x) = x {
                    let _ = writeln!(text, "{arm},{},{},{},train,{x:.6}", r.seed, st.step, g.name);
                }
            }
        }
    }
    fs::write(path, text)
}

/// Moving average of the training-batch reward of group `g` over a window of `w` steps
/// (NaN where the window holds no sample of the group).
fn moving(steps: &[StepRecord], g: usize, w: usize, total: usize) -> Vec<f64> {
    let mut per_step = vec![None; total + 1];
    for s in steps {
        if let Some(slot) = per_step.get_mut(s.step as usize) {
            *slot = s.reward[g];
        }
    }
    (1..=total)
        .map(|i| {
            let lo = i.saturating_sub(w - 1).max(1);
            let v: Vec<f64> = per_step[lo..=i].iter().flatten().copied().collect();
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        })
        .collect()
}

/// Mean and 95% band over runs at each x, ignoring runs without a value there (NaN).
fn band(name: &str, color: usize, xs: &[f64], runs: &[Vec<f64>]) -> Band {
    let mut b = Band {
        name: name.to_owned(),
        color,
        x: xs.to_vec(),
        mean: Vec::with_capacity(xs.len()),
        lo: Vec::with_capacity(xs.len()),
        hi: Vec::with_capacity(xs.len()),
    };
    for i in 0..xs.len() {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.get(i).copied())
            .filter(|x| x.is_finite())
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

fn plot(
    out: &Path,
    runs: &[RunData],
    names: &[String],
    eval_steps: &[u64],
    total: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let titles = row_names();
    let xs: Vec<f64> = eval_steps.iter().map(|&s| s as f64).collect();
    let heldout_panels: Vec<Panel> = titles
        .iter()
        .enumerate()
        .map(|(row, title)| Panel {
            title: title.clone(),
            bands: names
                .iter()
                .enumerate()
                .map(|(a, name)| {
                    let curves: Vec<Vec<f64>> = runs
                        .iter()
                        .filter(|r| r.arm == a)
                        .map(|r| {
                            eval_steps
                                .iter()
                                .map(|&s| r.at(s).map_or(f64::NAN, |v| v[row]))
                                .collect()
                        })
                        .collect();
                    band(name, a, &xs, &curves)
                })
                .collect(),
        })
        .collect();
    let fig = Figure {
        title: "Held-out reward per group (mean and 95% interval over seeds)".into(),
        x_label: "step".into(),
        y_label: "reward".into(),
        rows: 2,
        cols: 4,
        panels: heldout_panels,
    };
    fig.write_svg(&out.join("heldout.svg"))?;
    fig.write_png(&out.join("heldout.png"))?;

    let window = 10.min(total.max(1));
    let steps: Vec<f64> = (1..=total).map(|s| s as f64).collect();
    let train_panels: Vec<Panel> = GROUPS
        .iter()
        .enumerate()
        .map(|(g, group)| Panel {
            title: format!(
                "{} ({:.0}%, {})",
                group.name,
                100.0 * group.share,
                group.want.name()
            ),
            bands: names
                .iter()
                .enumerate()
                .map(|(a, name)| {
                    let curves: Vec<Vec<f64>> = runs
                        .iter()
                        .filter(|r| r.arm == a)
                        .map(|r| moving(&r.steps, g, window, total))
                        .collect();
                    band(name, a, &steps, &curves)
                })
                .collect(),
        })
        .collect();
    let fig = Figure {
        title: format!("Training-batch reward per group ({window}-step moving average)"),
        x_label: "step".into(),
        y_label: "reward".into(),
        rows: 2,
        cols: 3,
        panels: train_panels,
    };
    fig.write_svg(&out.join("train.svg"))?;
    fig.write_png(&out.join("train.png"))?;
    Ok(())
}
