//! Statistics and tables over runs: paired differences with 95% t-intervals, steps to 90%,
//! and the diagnosis's per-window averages.

use crate::common::mean_ci;

/// `mean ± ci` with a `*` when the interval excludes 0.
pub fn fmt_diff(v: &[f64]) -> String {
    let (m, ci) = mean_ci(v);
    let star = if ci.is_finite() && (m - ci > 0.0 || m + ci < 0.0) {
        "*"
    } else {
        " "
    };
    format!("{m:+.3}±{ci:.3}{star}")
}

/// `mean ± ci` of values.
pub fn fmt_val(v: &[f64]) -> String {
    let (m, ci) = mean_ci(v);
    format!("{m:.3}±{ci:.3}")
}

/// Whether the paired difference is significantly below 0.
pub fn sig_neg(v: &[f64]) -> bool {
    let (m, ci) = mean_ci(v);
    ci.is_finite() && m + ci < 0.0
}

/// Whether the paired difference is significantly above 0.
pub fn sig_pos(v: &[f64]) -> bool {
    let (m, ci) = mean_ci(v);
    ci.is_finite() && m - ci > 0.0
}

/// Steps to reach 90% of the optimum for one group, over runs (`curves[step][group]`):
/// `mean ± ci` when every run got there, else the mean of those that did and the count.
pub fn steps_to_90(runs: &[&Vec<Vec<f64>>], group: usize) -> String {
    let reached: Vec<f64> = runs
        .iter()
        .filter_map(|c| c.iter().position(|row| row[group] >= 0.9).map(|s| s as f64))
        .collect();
    if reached.len() == runs.len() {
        let (m, ci) = mean_ci(&reached);
        format!("{m:.0}±{ci:.0}")
    } else if reached.is_empty() {
        format!("never(0/{})", runs.len())
    } else {
        format!(
            "{:.0}({}/{})",
            mean_ci(&reached).0,
            reached.len(),
            runs.len()
        )
    }
}

/// Mean of the finite values (`NaN` when none).
pub fn nanmean(v: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v.filter(|x| x.is_finite()) {
        s += x;
        n += 1;
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}
