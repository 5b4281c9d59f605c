//! Metric sinks: where each step's [`StepMetrics`] go.
//!
//! A [`MetricsSink`] takes one row per step. Two writers ship with the crate, both readable by
//! pandas with one call and no post-processing:
//!
//! | sink | file | read back with |
//! |---|---|---|
//! | [`JsonlSink`] | JSON Lines: one flat object per step, every metric the step reported | `pandas.read_json(path, lines=True)` |
//! | [`CsvSink`] | CSV with a header row; the columns are fixed when the sink is made | `pandas.read_csv(path)` |
//!
//! # Row layout
//!
//! A row is: the run's **labels** (constant strings such as the estimator or the seed, so that
//! several runs can share one file and be told apart with `groupby`), then `step`, then the
//! metric values under the names of the [metrics module](crate::metrics)
//! (`reward`, `clip_ratio/low_mean`, `group/<g>/reward_mean`, `history/<g>/n`, …).
//! A value that is NaN — e.g. `history/<g>/std` of a group with one reward — is written as
//! JSON `null` and as an empty CSV field; pandas reads both as `NaN`.
//!
//! # Why the CSV columns are declared up front
//!
//! Per-group metrics appear only once a group has been seen, so the set of names grows during
//! a run. A CSV header cannot grow after the first row, so [`CsvSink`] takes its full column
//! list when it is created ([`CsvSink::standard`] builds it from
//! [`GLOBAL_NAMES`] and the preference groups you expect; a group's columns are named with its
//! [`group_segment`](crate::metrics::group_segment), so `GroupKey::Id(3)` and `"3"` get columns
//! of their own). A
//! declared column with no value in a step is left empty. A metric that was not declared is
//! not written; the sink lists it in [`CsvSink::dropped`] and logs a `tracing` warning the
//! first time it sees it. [`JsonlSink`] has no such limit: every row carries every metric it
//! has, so use it when the groups are not known in advance.
//!
//! ```
//! use pgrpo::sink::{CsvSink, JsonlSink, MetricsSink};
//! use pgrpo::StepMetrics;
//!
//! let mut m = StepMetrics { step: 3, ..Default::default() };
//! m.set("reward", 0.5);
//! m.set("group/casual/reward_mean", 0.25);
//! m.set("history/casual/std", f64::NAN);
//!
//! let mut jsonl = JsonlSink::new(Vec::new());
//! jsonl.write_row(&[("estimator", "p_grpo")], &m)?;
//! let text = String::from_utf8(jsonl.into_inner()?).unwrap();
//! assert_eq!(
//!     text,
//!     "{\"estimator\":\"p_grpo\",\"step\":3,\"group/casual/reward_mean\":0.25,\
//!      \"history/casual/std\":null,\"reward\":0.5}\n"
//! );
//!
//! let mut csv = CsvSink::standard(Vec::new(), &["estimator"], &["casual".into()])?;
//! csv.write_row(&[("estimator", "p_grpo")], &m)?;
//! let text = String::from_utf8(csv.into_inner()?).unwrap();
//! let mut lines = text.lines();
//! assert!(lines.next().unwrap().starts_with("estimator,step,reward,reward_std,"));
//! assert!(lines.next().unwrap().starts_with("p_grpo,3,0.5,,"));
//! # Ok::<(), pgrpo::Error>(())
//! ```

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::metrics::{group_names, reward_names, GLOBAL_NAMES};
use crate::{Error, GroupKey, Result, StepMetrics};

/// Somewhere to put one row of metrics per training step.
///
/// Implement it to send metrics elsewhere (a database, a dashboard); a `Vec` of sinks is a
/// sink that writes to each in turn.
pub trait MetricsSink {
    /// Writes one row: `labels` (name, value pairs that identify the run; may be empty) and
    /// `metrics`.
    ///
    /// # Errors
    /// I/O errors of the underlying writer; [`Error::InvalidConfig`] for labels that clash
    /// with the row's other names (or, for [`CsvSink`], differ from the declared ones).
    fn write_row(&mut self, labels: &[(&str, &str)], metrics: &StepMetrics) -> Result<()>;

    /// Writes one row without labels.
    ///
    /// # Errors
    /// As [`write_row`](Self::write_row).
    fn write(&mut self, metrics: &StepMetrics) -> Result<()> {
        self.write_row(&[], metrics)
    }

    /// Flushes buffered output to the underlying writer.
    ///
    /// # Errors
    /// I/O errors.
    fn flush(&mut self) -> Result<()>;
}

impl<S: MetricsSink + ?Sized> MetricsSink for Box<S> {
    fn write_row(&mut self, labels: &[(&str, &str)], metrics: &StepMetrics) -> Result<()> {
        (**self).write_row(labels, metrics)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
}

impl<S: MetricsSink + ?Sized> MetricsSink for &mut S {
    fn write_row(&mut self, labels: &[(&str, &str)], metrics: &StepMetrics) -> Result<()> {
        (**self).write_row(labels, metrics)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
}

impl<S: MetricsSink> MetricsSink for Vec<S> {
    fn write_row(&mut self, labels: &[(&str, &str)], metrics: &StepMetrics) -> Result<()> {
        self.iter_mut()
            .try_for_each(|s| s.write_row(labels, metrics))
    }
    fn flush(&mut self) -> Result<()> {
        self.iter_mut().try_for_each(|s| s.flush())
    }
}

/// Errors unless every label name is distinct and none is `step` or a metric name.
fn check_labels(labels: &[(&str, &str)], metrics: &StepMetrics) -> Result<()> {
    for (i, (name, _)) in labels.iter().enumerate() {
        if *name == "step"
            || metrics.values.contains_key(*name)
            || labels[..i].iter().any(|(n, _)| n == name)
        {
            return Err(Error::InvalidConfig {
                field: "labels",
                reason: format!(
                    "label {name:?} is used twice in one row (labels must differ from each \
                     other, from `step` and from the metric names)"
                ),
            });
        }
    }
    Ok(())
}

/// JSON Lines: one JSON object per step, `{labels…, "step": s, metrics…}`, metric names in
/// sorted order, NaN as `null`. Read it with `pandas.read_json(path, lines=True)`.
///
/// Timings (wall-clock seconds per phase) are left out by default because they differ between
/// otherwise identical runs; [`with_timings`](Self::with_timings) adds them as `time/<phase>`.
#[derive(Debug)]
pub struct JsonlSink<W: Write> {
    out: W,
    timings: bool,
}

impl JsonlSink<BufWriter<File>> {
    /// A sink writing to a new file at `path` (parent folders are created; an existing file is
    /// replaced).
    ///
    /// # Errors
    /// [`Error::File`] if the file cannot be created.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::new(create_file(path.as_ref())?))
    }
}

impl<W: Write> JsonlSink<W> {
    /// A sink writing to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            timings: false,
        }
    }

    /// Also write each step's timings as `time/<phase>` (seconds).
    pub fn with_timings(mut self, timings: bool) -> Self {
        self.timings = timings;
        self
    }

    /// Flushes and returns the writer.
    ///
    /// # Errors
    /// I/O errors of the final flush.
    pub fn into_inner(mut self) -> Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Appends `"key":` to `line`.
fn json_key(line: &mut String, key: &str) -> Result<()> {
    line.push_str(&serde_json::to_string(key)?);
    line.push(':');
    Ok(())
}

/// Appends a number, or `null` for NaN/±inf (JSON has no non-finite numbers).
fn json_number(line: &mut String, v: f64) -> Result<()> {
    if v.is_finite() {
        line.push_str(&serde_json::to_string(&v)?);
    } else {
        line.push_str("null");
    }
    Ok(())
}

impl<W: Write> MetricsSink for JsonlSink<W> {
    fn write_row(&mut self, labels: &[(&str, &str)], metrics: &StepMetrics) -> Result<()> {
        check_labels(labels, metrics)?;
        let mut line = String::with_capacity(64 + 40 * metrics.values.len());
        line.push('{');
        for (name, value) in labels {
            json_key(&mut line, name)?;
            line.push_str(&serde_json::to_string(value)?);
            line.push(',');
        }
        line.push_str(&format!("\"step\":{}", metrics.step));
        for (name, &v) in &metrics.values {
            line.push(',');
            json_key(&mut line, name)?;
            json_number(&mut line, v)?;
        }
        if self.timings {
            for (name, &v) in &metrics.timings {
                line.push(',');
                json_key(&mut line, &format!("time/{name}"))?;
                json_number(&mut line, v)?;
            }
        }
        line.push_str("}\n");
        self.out.write_all(line.as_bytes())?;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.out.flush()?)
    }
}

/// CSV with a fixed header: `labels…, step, columns…`. Read it with `pandas.read_csv(path)`.
///
/// The header is written when the sink is created, so a file from a run that stopped early
/// still has it. Fields are quoted as RFC 4180 says (only when they hold a comma, a quote or a
/// line break); a missing or NaN value is an empty field, ±infinity is `inf` / `-inf`. See the
/// [module docs](self) for why the columns are declared up front and what happens to metrics
/// that were not declared.
#[derive(Debug)]
pub struct CsvSink<W: Write> {
    out: W,
    labels: Vec<String>,
    columns: Vec<String>,
    dropped: BTreeSet<String>,
}

impl CsvSink<BufWriter<File>> {
    /// A sink writing to a new file at `path` (parent folders are created; an existing file is
    /// replaced), with the given label and metric columns.
    ///
    /// # Errors
    /// As [`new`](CsvSink::new), and [`Error::File`] if the file cannot be created.
    pub fn create(
        path: impl AsRef<Path>,
        labels: &[&str],
        columns: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Self> {
        Self::new(create_file(path.as_ref())?, labels, columns)
    }
}

impl<W: Write> CsvSink<W> {
    /// A sink writing to `out`: one column per label name, then `step`, then one per entry of
    /// `columns` (metric names). Writes the header.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if a name appears twice (or is `step`); I/O errors.
    pub fn new(
        out: W,
        labels: &[&str],
        columns: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Self> {
        let labels: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        let columns: Vec<String> = columns.into_iter().map(Into::into).collect();
        let mut seen = BTreeSet::new();
        for name in labels.iter().chain(&columns) {
            if name == "step" || !seen.insert(name.as_str()) {
                return Err(Error::InvalidConfig {
                    field: "columns",
                    reason: format!("column {name:?} is declared twice (or is `step`)"),
                });
            }
        }
        let mut sink = Self {
            out,
            labels,
            columns,
            dropped: BTreeSet::new(),
        };
        let header: Vec<&str> = sink
            .labels
            .iter()
            .map(String::as_str)
            .chain(["step"])
            .chain(sink.columns.iter().map(String::as_str))
            .collect();
        let mut line = String::new();
        push_record(&mut line, header);
        sink.out.write_all(line.as_bytes())?;
        Ok(sink)
    }

    /// A sink with the standard columns ([`standard_columns`]): [`GLOBAL_NAMES`], the
    /// default-named reward function's two, then the six [`group_names`] of each group in
    /// `groups`.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn standard(out: W, labels: &[&str], groups: &[GroupKey]) -> Result<Self> {
        Self::new(out, labels, standard_columns(groups))
    }

    /// The declared metric columns (after the labels and `step`).
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Metric names that were reported but not written because they were not declared.
    pub fn dropped(&self) -> &BTreeSet<String> {
        &self.dropped
    }

    /// Flushes and returns the writer.
    ///
    /// # Errors
    /// I/O errors of the final flush.
    pub fn into_inner(mut self) -> Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// [`GLOBAL_NAMES`], the [`reward_names`] of a reward function with the default name
/// (`rewards/reward/mean`, `rewards/reward/std`: a closure's), then the [`group_names`] of
/// each group: the columns of [`CsvSink::standard`]. A reward function with another
/// [`name`](crate::RewardFn::name) adds its own two: append `reward_names(name)`.
pub fn standard_columns(groups: &[GroupKey]) -> Vec<String> {
    GLOBAL_NAMES
        .iter()
        .map(|s| (*s).to_owned())
        .chain(reward_names("reward"))
        .chain(groups.iter().flat_map(group_names))
        .collect()
}

/// Appends one CSV record (with its line break) to `line`.
fn push_record<'a>(line: &mut String, fields: impl IntoIterator<Item = &'a str>) {
    for (i, f) in fields.into_iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if f.contains([',', '"', '\n', '\r']) {
            line.push('"');
            line.push_str(&f.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(f);
        }
    }
    line.push('\n');
}

fn csv_number(v: f64) -> String {
    if v.is_nan() {
        String::new()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        // `{}` on f64 prints the shortest string that reads back to the same value.
        format!("{v}")
    }
}

impl<W: Write> MetricsSink for CsvSink<W> {
    fn write_row(&mut self, labels: &[(&str, &str)], metrics: &StepMetrics) -> Result<()> {
        let names_match = labels.len() == self.labels.len()
            && labels.iter().zip(&self.labels).all(|((n, _), d)| n == d);
        if !names_match {
            return Err(Error::InvalidConfig {
                field: "labels",
                reason: format!(
                    "this CSV declares labels {:?}, the row has {:?}",
                    self.labels,
                    labels.iter().map(|(n, _)| *n).collect::<Vec<_>>()
                ),
            });
        }
        check_labels(labels, metrics)?;
        for name in metrics.values.keys() {
            if !self.columns.contains(name) && self.dropped.insert(name.clone()) {
                tracing::warn!(
                    metric = name.as_str(),
                    "metric not among the CSV sink's declared columns; not written"
                );
            }
        }
        let step = metrics.step.to_string();
        let values: Vec<String> = self
            .columns
            .iter()
            .map(|c| metrics.get(c).map(csv_number).unwrap_or_default())
            .collect();
        let mut line = String::new();
        push_record(
            &mut line,
            labels
                .iter()
                .map(|(_, v)| *v)
                .chain([step.as_str()])
                .chain(values.iter().map(String::as_str)),
        );
        self.out.write_all(line.as_bytes())?;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.out.flush()?)
    }
}

fn create_file(path: &Path) -> Result<BufWriter<File>> {
    let err = |e: std::io::Error| Error::File {
        path: path.to_owned(),
        reason: format!("cannot create: {e}"),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    Ok(BufWriter::new(File::create(path).map_err(err)?))
}
