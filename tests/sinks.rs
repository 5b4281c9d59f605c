//! Metric sinks: JSON Lines and CSV rows written by a real training run, read back and checked
//! field by field; a stable CSV header when per-group metrics appear late; NaN handling;
//! quoting; label and column errors.

use std::path::PathBuf;

use candle_core::Device;
use pgrpo::metrics::GLOBAL_NAMES;
use pgrpo::models::TabularPolicy;
use pgrpo::sink::{standard_columns, CsvSink, JsonlSink, MetricsSink};
use pgrpo::{Error, GroupKey, GroupedPrompt, StepMetrics, Trainer, TrainerConfig};
use serde_json::Value;

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sinks");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A minimal RFC 4180 reader (quoted fields, doubled quotes), so the test does not trust the
/// writer's own logic.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && row.is_empty(),
        "CSV must end with a line break"
    );
    rows
}

/// Trains 6 steps; group "b" first appears at step 3. Returns the metrics of every step.
fn train_rows() -> Vec<StepMetrics> {
    let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
    let reward = |ctx: &u32, a: &u32, _g: &GroupKey| (*a == *ctx) as u8 as f32;
    let cfg = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.1,
        ..Default::default()
    };
    let mut trainer = Trainer::new(policy, reward, cfg).unwrap();
    (0..6)
        .map(|step| {
            let mut batch = vec![GroupedPrompt::new(0u32, "a")];
            if step >= 3 {
                batch.push(GroupedPrompt::new(1u32, "b"));
            }
            trainer.step(&batch).unwrap()
        })
        .collect()
}

#[test]
fn jsonl_rows_hold_every_metric_and_read_back() {
    let rows = train_rows();
    let path = tmp("run.jsonl");
    let mut sink = JsonlSink::create(&path).unwrap();
    for m in &rows {
        sink.write_row(&[("estimator", "p_grpo"), ("seed", "0")], m)
            .unwrap();
    }
    sink.flush().unwrap();
    drop(sink);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), rows.len());
    for (line, m) in lines.iter().zip(&rows) {
        let v: Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj["estimator"], "p_grpo");
        assert_eq!(obj["seed"], "0");
        assert_eq!(obj["step"].as_u64().unwrap(), m.step);
        // Every metric is there, with its exact value (or null for NaN).
        assert_eq!(obj.len(), 3 + m.values.len());
        for (name, &x) in &m.values {
            match &obj[name.as_str()] {
                Value::Null => assert!(x.is_nan(), "{name}: null for {x}"),
                v => assert_eq!(v.as_f64().unwrap(), x, "{name}"),
            }
        }
        // Labels come first and `step` right after, as documented.
        assert!(line.starts_with("{\"estimator\":\"p_grpo\",\"seed\":\"0\",\"step\":"));
    }
    // Per-group names of features.md are present once the group is seen.
    let last: Value = serde_json::from_str(lines[5]).unwrap();
    for name in pgrpo::metrics::group_names(&"b".into()) {
        assert!(last.get(&name).is_some(), "{name} missing");
    }
    let first: Value = serde_json::from_str(lines[0]).unwrap();
    assert!(first.get("group/b/count").is_none());
    assert!(first["history/a/std"].is_number()); // 4 rewards after step 0
}

/// pandas reads both files with one call each, no glue. Runs only where `python3` can import
/// pandas (not part of the crate's requirements); prints why it skipped otherwise.
#[test]
fn pandas_reads_both_files_when_installed() {
    let python = std::env::var("PGRPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_pandas = std::process::Command::new(&python)
        .args(["-c", "import pandas"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_pandas {
        eprintln!("skipped: {python} cannot import pandas (set PGRPO_PYTHON to one that can)");
        return;
    }
    let rows = train_rows();
    let groups: Vec<GroupKey> = vec!["a".into(), "b".into()];
    let (jp, cp) = (tmp("pandas.jsonl"), tmp("pandas.csv"));
    let mut sinks: Vec<Box<dyn MetricsSink>> = vec![
        Box::new(JsonlSink::create(&jp).unwrap()),
        Box::new(CsvSink::create(&cp, &["estimator", "seed"], standard_columns(&groups)).unwrap()),
    ];
    for m in &rows {
        sinks
            .write_row(&[("estimator", "p_grpo"), ("seed", "3")], m)
            .unwrap();
    }
    sinks.flush().unwrap();
    drop(sinks);
    let script = format!(
        r#"
import math, pandas as pd
j = pd.read_json({jp:?}, lines=True)
c = pd.read_csv({cp:?})
assert len(j) == 6 and len(c) == 6, (len(j), len(c))
assert list(c.columns[:3]) == ["estimator", "seed", "step"], list(c.columns[:3])
for col in ["reward", "group/b/reward_mean", "history/b/n"]:
    for a, b in zip(j[col], c[col]):
        assert (math.isnan(a) and math.isnan(b)) or a == b, (col, a, b)
assert c["group/b/reward_mean"].isna().sum() == 3
assert j["seed"].tolist() == [3] * 6 and c["seed"].tolist() == [3] * 6
assert str(c["reward"].dtype) == "float64"
print("pandas", pd.__version__, "ok")
"#,
        jp = jp.to_str().unwrap(),
        cp = cp.to_str().unwrap()
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
}

#[test]
fn jsonl_timings_are_opt_in() {
    let rows = train_rows();
    let mut plain = JsonlSink::new(Vec::new());
    plain.write(&rows[0]).unwrap();
    let plain = String::from_utf8(plain.into_inner().unwrap()).unwrap();
    assert!(!plain.contains("time/"));
    let mut timed = JsonlSink::new(Vec::new()).with_timings(true);
    timed.write(&rows[0]).unwrap();
    let timed: Value = serde_json::from_slice(&timed.into_inner().unwrap()).unwrap();
    assert!(timed["time/update"].as_f64().unwrap() >= 0.0);
}

#[test]
fn csv_header_is_fixed_while_groups_appear_later() {
    let rows = train_rows();
    let groups: Vec<GroupKey> = vec!["a".into(), "b".into()];
    let path = tmp("run.csv");
    let mut sink = CsvSink::create(&path, &["estimator"], standard_columns(&groups)).unwrap();
    for m in &rows {
        sink.write_row(&[("estimator", "grpo")], m).unwrap();
    }
    assert!(sink.dropped().is_empty(), "dropped {:?}", sink.dropped());
    sink.flush().unwrap();
    drop(sink);
    let table = parse_csv(&std::fs::read_to_string(&path).unwrap());
    let header = &table[0];
    assert_eq!(header.len(), 1 + 1 + GLOBAL_NAMES.len() + 2 + 2 * 6);
    assert_eq!(&header[..3], &["estimator", "step", "reward"]);
    assert_eq!(table.len(), 1 + rows.len());
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    for (row, m) in table[1..].iter().zip(&rows) {
        assert_eq!(row.len(), header.len(), "ragged row");
        assert_eq!(row[col("step")], m.step.to_string());
        for (name, &x) in &m.values {
            let cell = &row[col(name)];
            if x.is_nan() {
                assert_eq!(cell, "", "{name}");
            } else {
                assert_eq!(cell.parse::<f64>().unwrap(), x, "{name}");
            }
        }
    }
    // Group b's columns are empty before it appears and filled after.
    assert_eq!(table[1][col("group/b/reward_mean")], "");
    assert_ne!(table[6][col("group/b/reward_mean")], "");
    assert_eq!(table[6][col("history/b/n")], "12"); // 3 steps × 4
}

#[test]
fn csv_reports_undeclared_metrics_instead_of_growing_the_header() {
    let rows = train_rows();
    let mut sink = CsvSink::standard(Vec::new(), &[], &["a".into()]).unwrap();
    for m in &rows {
        sink.write(m).unwrap();
    }
    let dropped: Vec<&str> = sink.dropped().iter().map(String::as_str).collect();
    assert_eq!(
        dropped,
        [
            "group/b/advantage_mean",
            "group/b/count",
            "group/b/reward_mean",
            "history/b/mean",
            "history/b/n",
            "history/b/std"
        ]
    );
    let text = String::from_utf8(sink.into_inner().unwrap()).unwrap();
    let table = parse_csv(&text);
    assert!(table.iter().all(|r| r.len() == table[0].len()));
}

#[test]
fn csv_quotes_fields_and_writes_nan_and_infinity() {
    let mut m = StepMetrics {
        step: 7,
        ..Default::default()
    };
    m.set("reward", f64::NAN);
    m.set("grad_norm", f64::INFINITY);
    m.set("loss", -0.125);
    let mut sink = CsvSink::new(
        Vec::new(),
        &["run"],
        ["reward", "grad_norm", "loss", "group/x,\"y\"/count"],
    )
    .unwrap();
    sink.write_row(&[("run", "a,b \"quoted\"")], &m).unwrap();
    let text = String::from_utf8(sink.into_inner().unwrap()).unwrap();
    assert_eq!(
        text,
        "run,step,reward,grad_norm,loss,\"group/x,\"\"y\"\"/count\"\n\
         \"a,b \"\"quoted\"\"\",7,,inf,-0.125,\n"
    );
    let table = parse_csv(&text);
    assert_eq!(table[0][5], "group/x,\"y\"/count");
    assert_eq!(table[1][0], "a,b \"quoted\"");
}

#[test]
fn label_and_column_mistakes_are_errors() {
    let m = StepMetrics::default();
    let mut csv = CsvSink::new(Vec::new(), &["estimator", "seed"], ["reward"]).unwrap();
    let e = csv.write_row(&[("seed", "1"), ("estimator", "x")], &m);
    assert!(
        matches!(
            e,
            Err(Error::InvalidConfig {
                field: "labels",
                ..
            })
        ),
        "{e:?}"
    );
    let e = csv.write(&m);
    assert!(matches!(e, Err(Error::InvalidConfig { .. })));

    let e = CsvSink::new(Vec::new(), &["reward"], ["reward"]);
    assert!(matches!(
        e,
        Err(Error::InvalidConfig {
            field: "columns",
            ..
        })
    ));
    let e = CsvSink::new(Vec::new(), &[], ["step"]);
    assert!(matches!(
        e,
        Err(Error::InvalidConfig {
            field: "columns",
            ..
        })
    ));

    let mut jsonl = JsonlSink::new(Vec::new());
    let e = jsonl.write_row(&[("step", "1")], &m);
    assert!(matches!(
        e,
        Err(Error::InvalidConfig {
            field: "labels",
            ..
        })
    ));
    let mut with_reward = StepMetrics::default();
    with_reward.set("reward", 1.0);
    let e = jsonl.write_row(&[("reward", "1")], &with_reward);
    assert!(matches!(e, Err(Error::InvalidConfig { .. })));
    let e = jsonl.write_row(&[("a", "1"), ("a", "2")], &m);
    assert!(matches!(e, Err(Error::InvalidConfig { .. })));
}

#[test]
fn a_vec_of_boxed_sinks_writes_to_each() {
    let rows = train_rows();
    let dir = tmp("multi");
    let mut sinks: Vec<Box<dyn MetricsSink>> = vec![
        Box::new(JsonlSink::create(dir.join("m.jsonl")).unwrap()),
        Box::new(CsvSink::create(dir.join("m.csv"), &[], ["reward"]).unwrap()),
    ];
    for m in &rows {
        sinks.write(m).unwrap();
    }
    sinks.flush().unwrap();
    let jsonl = std::fs::read_to_string(dir.join("m.jsonl")).unwrap();
    let csv = std::fs::read_to_string(dir.join("m.csv")).unwrap();
    assert_eq!(jsonl.lines().count(), rows.len());
    assert_eq!(csv.lines().count(), rows.len() + 1);
}

#[test]
fn creating_a_sink_in_an_impossible_place_names_the_file() {
    let file = tmp("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let e = JsonlSink::create(file.join("m.jsonl")).unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e:?}");
    assert!(e.to_string().contains("not-a-dir"), "{e}");
}
