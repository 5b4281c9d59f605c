//! `paired`: paired differences between estimators in another example's curve CSV (the
//! MovieLens and persona tasks of the study), per group and for the macro mean over groups.
//!
//! The CSV is long-format, one value per `(estimator, seed, step, group)`, e.g.
//! `runs/movielens.csv` (`estimator,seed,step,group,hit_rate`) or `runs/personas.csv`
//! (`estimator,seed,step,persona,source,reward`, filtered on `source=eval`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::report::{fmt_diff, fmt_val};

type Err = Box<dyn std::error::Error>;

/// `values[(estimator, seed, step, group)]`, the groups in order of first appearance.
struct Curves {
    values: BTreeMap<(String, u64, usize, String), f64>,
    estimators: Vec<String>,
    groups: Vec<String>,
    steps: BTreeSet<usize>,
}

fn read(
    path: &Path,
    group_col: &str,
    value_col: &str,
    filter: Option<(&str, &str)>,
) -> Result<Curves, Err> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty CSV")?.split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("{}: no column {name:?} in {header:?}", path.display()))
    };
    let (ce, cs, ct, cg, cv) = (
        col("estimator")?,
        col("seed")?,
        col("step")?,
        col(group_col)?,
        col(value_col)?,
    );
    let cf = filter.map(|(c, v)| col(c).map(|i| (i, v))).transpose()?;
    let mut c = Curves {
        values: BTreeMap::new(),
        estimators: Vec::new(),
        groups: Vec::new(),
        steps: BTreeSet::new(),
    };
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != header.len() {
            return Err(format!("{}:{}: {} fields", path.display(), i + 2, f.len()).into());
        }
        if let Some((fi, fv)) = cf {
            if f[fi] != fv {
                continue;
            }
        }
        let (e, g) = (f[ce].to_string(), f[cg].to_string());
        if !c.estimators.contains(&e) {
            c.estimators.push(e.clone());
        }
        if !c.groups.contains(&g) {
            c.groups.push(g.clone());
        }
        let step: usize = f[ct].parse()?;
        c.steps.insert(step);
        c.values
            .insert((e, f[cs].parse()?, step, g), f[cv].parse()?);
    }
    Ok(c)
}

impl Curves {
    /// Per seed: the value of `group` (`None`: the macro mean over groups) at `step`.
    fn at(&self, est: &str, step: usize, group: Option<&str>) -> BTreeMap<u64, f64> {
        let mut out: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
        for ((e, seed, s, g), v) in &self.values {
            if e == est && *s == step && group.is_none_or(|x| x == g) {
                let slot = out.entry(*seed).or_default();
                slot.0 += v;
                slot.1 += 1;
            }
        }
        out.into_iter()
            .map(|(s, (v, n))| (s, v / n as f64))
            .collect()
    }
}

/// The markdown tables: per base, per step, rows = groups and the macro mean, columns = the
/// other estimators' paired differences (plus each estimator's value).
#[allow(clippy::too_many_arguments)]
pub fn paired(
    csv: &Path,
    group_col: &str,
    value_col: &str,
    filter: Option<(&str, &str)>,
    steps: &[usize],
    bases: &[String],
    title: &str,
    out: &Path,
) -> Result<(), Err> {
    let c = read(csv, group_col, value_col, filter)?;
    let steps: Vec<usize> = if steps.is_empty() {
        let last = *c.steps.iter().next_back().ok_or("no rows")?;
        vec![last]
    } else {
        steps.to_vec()
    };
    let mut rows: Vec<(String, Option<&str>)> = c
        .groups
        .iter()
        .map(|g| (g.clone(), Some(g.as_str())))
        .collect();
    rows.push(("macro mean".into(), None));
    let mut md = String::new();
    let _ = writeln!(md, "# {title}\n");
    let _ = writeln!(
        md,
        "From `{}` ({value_col} per {group_col}); mean ± 95% t-interval over seeds, paired by \
         seed (`*`: the interval excludes 0).\n",
        csv.display()
    );
    for &step in &steps {
        let _ = writeln!(md, "## Values at step {step}\n");
        let _ = writeln!(md, "| {group_col} | {} |", c.estimators.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(c.estimators.len()));
        for (name, g) in &rows {
            let cells: Vec<String> = c
                .estimators
                .iter()
                .map(|e| fmt_val(&c.at(e, step, *g).into_values().collect::<Vec<_>>()))
                .collect();
            let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
        }
        let _ = writeln!(md);
        for base in bases {
            if !c.estimators.contains(base) {
                continue;
            }
            let others: Vec<&String> = c.estimators.iter().filter(|e| *e != base).collect();
            let _ = writeln!(md, "## Δ vs {base} at step {step}\n");
            let _ = writeln!(
                md,
                "| {group_col} | {} |",
                others
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = writeln!(md, "|---|{}", "---|".repeat(others.len()));
            for (name, g) in &rows {
                let b = c.at(base, step, *g);
                let cells: Vec<String> = others
                    .iter()
                    .map(|e| {
                        let d: Vec<f64> = c
                            .at(e, step, *g)
                            .iter()
                            .filter_map(|(s, v)| b.get(s).map(|x| v - x))
                            .collect();
                        fmt_diff(&d)
                    })
                    .collect();
                let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
            }
            let _ = writeln!(md);
        }
    }
    print!("{md}");
    std::fs::write(out, &md)?;
    println!("written {}", out.display());
    Ok(())
}
