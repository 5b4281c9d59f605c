//! Helpers shared by the examples (included with `#[path]`; not an example itself): config
//! files, progress bars, logging, confidence intervals and plots.
#![allow(dead_code)] // each example uses a subset

pub mod config;
pub mod plot;

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Sends the library's `tracing` events to stderr, filtered by `RUST_LOG` (default `warn`;
/// e.g. `RUST_LOG=pgrpo=debug` shows one line per trainer step).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Ignore the error of a second initialisation (there is none in the examples).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A progress bar over `total` training steps on stderr, showing steps, the latest reward
/// and the ETA. Hidden with `--quiet`, and when stdout is not a terminal (a log file or a
/// pipe should hold the results, not redraws).
pub fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{bar:30.cyan/blue} {pos}/{len} steps  {elapsed} elapsed, ETA {eta}  {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Two-sided 95% Student-t quantile for `n - 1` degrees of freedom.
pub fn t95(n: usize) -> f64 {
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

/// Mean and half-width of the 95% t-interval of `v`.
pub fn mean_ci(v: &[f64]) -> (f64, f64) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t95(n) * (var / n as f64).sqrt())
}

/// Writes results in job order while jobs finish in any order: `push(i, item)` stores the
/// result of job `i` and hands every result that is now next in line to `emit`.
pub struct InOrder<T> {
    next: usize,
    pending: std::collections::BTreeMap<usize, T>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        Self {
            next: 0,
            pending: Default::default(),
        }
    }
}

impl<T> InOrder<T> {
    /// Stores job `index`'s result, then emits every result that is next in line.
    pub fn push<E>(
        &mut self,
        index: usize,
        item: T,
        mut emit: impl FnMut(T) -> Result<(), E>,
    ) -> Result<(), E> {
        self.pending.insert(index, item);
        while let Some(item) = self.pending.remove(&self.next) {
            emit(item)?;
            self.next += 1;
        }
        Ok(())
    }
}
