//! Statistics over seeds, the per-persona tables, the paired summary and the CSV.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::task::PERSONAS;

/// What one training run (one estimator, one seed) recorded.
pub struct RunResult {
    pub arm: usize,
    pub seed: u64,
    /// `(step, reward per persona)` on held-out samples, step 0 = before training.
    pub evals: Vec<(usize, Vec<f64>)>,
    /// `(step, batch reward per persona)` during training (`None`: persona not in the batch).
    pub train: Vec<(usize, Vec<Option<f64>>)>,
    /// Seconds per training step: sampling, reward (decode + rules), update.
    pub sample_secs: Vec<f64>,
    pub reward_secs: Vec<f64>,
    pub update_secs: Vec<f64>,
    /// Seconds spent in evaluations (not part of a training step).
    pub eval_secs: f64,
    /// One decoded completion per persona from the last evaluation.
    pub examples: Vec<String>,
}

/// Rows of the tables: the seven personas, then the unweighted mean and the mean weighted by
/// frequency (the reward a random user sees).
pub fn row_names() -> Vec<String> {
    let mut names: Vec<String> = PERSONAS
        .iter()
        .map(|p| format!("{} ({:.0}%)", p.name, 100.0 * p.frequency))
        .collect();
    names.push("mean (macro)".into());
    names.push("mean (by freq.)".into());
    names
}

/// Per-persona rewards with the macro and frequency-weighted means appended.
pub fn with_aggregates(per_persona: &[f64]) -> Vec<f64> {
    let mut v = per_persona.to_vec();
    v.push(per_persona.iter().sum::<f64>() / per_persona.len() as f64);
    v.push(
        per_persona
            .iter()
            .zip(PERSONAS.iter())
            .map(|(r, p)| r * p.frequency)
            .sum(),
    );
    v
}

/// Two-sided 95% Student-t quantile for `n` samples (`n − 1` degrees of freedom).
pub fn t95(n: usize) -> f64 {
    const T: [f64; 29] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045,
    ];
    match n {
        0 | 1 => f64::NAN,
        2..=30 => T[n - 2],
        _ => 1.96,
    }
}

/// Mean and 95% t-interval half-width (NaN for fewer than two values).
pub fn mean_ci(v: &[f64]) -> (f64, f64) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t95(n) * (var / n as f64).sqrt())
}

fn cell(v: &[f64]) -> String {
    let (m, ci) = mean_ci(v);
    if ci.is_finite() {
        format!("{m:.3} ± {ci:.3}")
    } else {
        format!("{m:.3}")
    }
}

fn diff_cell(v: &[f64]) -> String {
    let (m, ci) = mean_ci(v);
    if !ci.is_finite() {
        return format!("{m:+.3}");
    }
    let star = if m - ci > 0.0 || m + ci < 0.0 {
        "*"
    } else {
        " "
    };
    format!("{m:+.3} ± {ci:.3}{star}")
}

/// The evaluation of `r` at `step` (with aggregates).
fn eval_at(r: &RunResult, step: usize) -> Option<Vec<f64>> {
    r.evals
        .iter()
        .find(|(s, _)| *s == step)
        .map(|(_, v)| with_aggregates(v))
}

/// One table: rows = personas and means, columns = before training, then each estimator at
/// `step`; cells are mean ± 95% CI over seeds.
pub fn print_table(results: &[RunResult], arms: &[String], step: usize) {
    let names = row_names();
    let mut header = format!("{:<18} {:>15}", "persona", "before");
    for a in arms {
        header += &format!(" {:>15}", a);
    }
    println!("{header}");
    for (row, name) in names.iter().enumerate() {
        // Before training every estimator has the same model and samples: take arm 0's runs.
        let before: Vec<f64> = results
            .iter()
            .filter(|r| r.arm == 0)
            .filter_map(|r| eval_at(r, 0).map(|v| v[row]))
            .collect();
        let mut line = format!("{name:<18} {:>15}", cell(&before));
        for a in 0..arms.len() {
            let vals: Vec<f64> = results
                .iter()
                .filter(|r| r.arm == a)
                .filter_map(|r| eval_at(r, step).map(|v| v[row]))
                .collect();
            line += &format!(" {:>15}", cell(&vals));
        }
        println!("{line}");
    }
}

/// Paired differences `a − b` by seed at the given steps, per persona and for the means.
pub fn print_paired(results: &[RunResult], arms: &[String], a: &str, b: &str, steps: &[usize]) {
    let find = |name: &str| arms.iter().position(|x| x == name);
    let (Some(ia), Some(ib)) = (find(a), find(b)) else {
        return;
    };
    println!("\n## {a} − {b}, paired by seed (mean ± 95% CI; * = CI excludes 0)");
    let mut header = format!("{:<18}", "persona");
    for s in steps {
        header += &format!(" {:>20}", format!("step {s}"));
    }
    println!("{header}");
    for (row, name) in row_names().iter().enumerate() {
        let mut line = format!("{name:<18}");
        for &step in steps {
            let diffs: Vec<f64> = results
                .iter()
                .filter(|r| r.arm == ia)
                .filter_map(|ra| {
                    let rb = results.iter().find(|r| r.arm == ib && r.seed == ra.seed)?;
                    Some(eval_at(ra, step)?[row] - eval_at(rb, step)?[row])
                })
                .collect();
            line += &format!(" {:>20}", diff_cell(&diffs));
        }
        println!("{line}");
    }
}

/// Mean seconds per training step for each estimator.
pub fn print_timings(results: &[RunResult], arms: &[String]) {
    println!("\n## Seconds per training step (mean over steps and seeds)");
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "estimator", "sample", "reward", "update", "total", "eval (run)"
    );
    for (a, name) in arms.iter().enumerate() {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.arm == a).collect();
        let mean = |f: fn(&RunResult) -> &Vec<f64>| {
            let all: Vec<f64> = runs.iter().flat_map(|r| f(r).iter().copied()).collect();
            all.iter().sum::<f64>() / all.len().max(1) as f64
        };
        let (s, rw, u) = (
            mean(|r| &r.sample_secs),
            mean(|r| &r.reward_secs),
            mean(|r| &r.update_secs),
        );
        let eval = runs.iter().map(|r| r.eval_secs).sum::<f64>() / runs.len().max(1) as f64;
        println!(
            "{name:<18} {s:>9.3} {rw:>9.3} {u:>9.3} {:>9.3} {eval:>12.1}",
            s + rw + u
        );
    }
}

/// Writes every curve: `estimator,seed,step,persona,source,reward` with `source` = `eval`
/// (held-out samples) or `train` (the training batch's mean for that persona).
pub fn write_csv(path: &Path, results: &[RunResult], arms: &[String]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    writeln!(f, "estimator,seed,step,persona,source,reward")?;
    for r in results {
        let arm = &arms[r.arm];
        for (step, v) in &r.evals {
            for (p, x) in PERSONAS.iter().zip(v) {
                writeln!(f, "{arm},{},{step},{},eval,{x:.6}", r.seed, p.name)?;
            }
        }
        for (step, v) in &r.train {
            for (p, x) in PERSONAS.iter().zip(v) {
                if let Some(x) = x {
                    writeln!(f, "{arm},{},{step},{},train,{x:.6}", r.seed, p.name)?;
                }
            }
        }
    }
    f.flush()
}
