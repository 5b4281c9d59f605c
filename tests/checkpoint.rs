//! Checkpoints: exact resume, atomic saves, and every kind of damaged input answered with a
//! typed error naming the file.

use std::path::{Path, PathBuf};

use candle_core::{Device, Var};
use candle_nn::Optimizer;
use pgrpo::checkpoint::{self, fault, files};
use pgrpo::checkpoint::{Checkpoint, CheckpointOptions};
use pgrpo::models::{MlpPolicy, TabularPolicy};
use pgrpo::optim::OptimizerState;
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::{
    CheckpointProblem, Error, Estimator, GroupKey, GroupedPrompt, HistoryKind, Policy, RewardFn,
    StepMetrics, Trainer, TrainerConfig,
};
use rand::{rngs::StdRng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// A generic exact-resume check, for any policy.

/// Bit patterns of every var, to compare runs bit for bit.
pub fn weight_bits(vars: &[Var]) -> Vec<Vec<u64>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

/// Metric values as bit patterns (NaN == NaN), timings left out.
pub fn metric_bits(m: &StepMetrics) -> Vec<(String, u64)> {
    m.values
        .iter()
        .map(|(k, v)| (k.clone(), v.to_bits()))
        .collect()
}

/// Runs `steps` steps straight, then `split` steps + save + a trainer rebuilt from scratch
/// (`make` builds a fresh policy and reward function) + resume + the rest, and asserts
/// identical metrics at every step and bit-identical final weights. `batch_at(s)` is the
/// batch of step `s` (the data stream is the caller's, indexed by step).
///
/// Works for any [`Policy`]: the lead's LM resume test calls it with the LM policy.
pub fn check_exact_resume<P, R>(
    make: impl Fn() -> (P, R),
    config: TrainerConfig,
    batch_at: impl Fn(u64) -> Vec<GroupedPrompt<P::Prompt>>,
    steps: u64,
    split: u64,
) where
    P: Policy,
    P::Prompt: Clone,
    R: RewardFn<P::Prompt, P::Completion>,
{
    assert!(0 < split && split < steps);
    let (p, r) = make();
    let mut straight = Trainer::new(p, r, config.clone()).unwrap();
    let mut want = Vec::new();
    for s in 0..steps {
        want.push(metric_bits(&straight.step(&batch_at(s)).unwrap()));
    }
    let want_weights = weight_bits(&straight.policy().vars());

    let dir = tempfile::tempdir().unwrap();
    let (p, r) = make();
    let mut first = Trainer::new(p, r, config).unwrap();
    for (s, w) in want.iter().enumerate().take(split as usize) {
        assert_eq!(
            &metric_bits(&first.step(&batch_at(s as u64)).unwrap()),
            w,
            "step {s} before the save"
        );
    }
    first.save(dir.path()).unwrap();
    drop(first);

    let (p, r) = make();
    let mut resumed = Trainer::resume(dir.path(), p, r).unwrap();
    assert_eq!(resumed.steps_done(), split);
    for s in split..steps {
        assert_eq!(
            metric_bits(&resumed.step(&batch_at(s)).unwrap()),
            want[s as usize],
            "metrics differ at step {s} after resuming at {split}"
        );
    }
    assert_eq!(
        weight_bits(&resumed.policy().vars()),
        want_weights,
        "weights differ after resuming"
    );
}

fn bandit() -> PreferenceBandit {
    PreferenceBandit::new(vec![0.6, 0.3, 0.1], vec![1.0, 0.5, 0.2], 4, 0.5, 0.3).unwrap()
}

fn tabular_batch(step: u64) -> Vec<GroupedPrompt<u32>> {
    let mut rng = StdRng::seed_from_u64(1000 + step);
    bandit()
        .sample_groups(8, &mut rng)
        .into_iter()
        .map(|g| GroupedPrompt::new(g, GroupKey::Name(format!("g{g}"))))
        .collect()
}

/// Every piece of state in play: P-GRPO history (exponential), KL to a reference, two
/// updates per rollout, a warm-up and a decaying schedule, noisy rewards.
fn full_config() -> TrainerConfig {
    let mut c = TrainerConfig {
        num_generations: 4,
        num_iterations: 2,
        learning_rate: 0.05,
        weight_decay: 0.01,
        warmup_steps: 3,
        lr_scheduler: pgrpo::optim::LrScheduler::Cosine,
        max_steps: Some(40),
        seed: 5,
        history: HistoryKind::Exponential { half_life: 16.0 },
        ..Default::default()
    };
    c.advantage.estimator = Estimator::PGrpo;
    c.advantage.pgrpo.min_count = 4;
    c.objective.beta = 0.04;
    c
}

fn tabular() -> (TabularPolicy, pgrpo::tasks::bandit::BanditReward) {
    let b = bandit();
    (
        TabularPolicy::with_init(3, 4, true, 0.1, 3, &Device::Cpu).unwrap(),
        b.reward_fn(77),
    )
}

#[test]
fn tabular_bandit_resumes_exactly() {
    check_exact_resume(tabular, full_config(), tabular_batch, 12, 5);
    // The default config too (cumulative history, no reference, one iteration).
    let c = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.05,
        ..Default::default()
    };
    check_exact_resume(tabular, c, tabular_batch, 8, 3);
}

fn mlp_batch(step: u64) -> Vec<GroupedPrompt<Vec<f32>>> {
    tabular_batch(step)
        .into_iter()
        .map(|p| {
            let mut x = vec![0.0; 3];
            x[p.prompt as usize] = 1.0;
            GroupedPrompt::new(x, p.group)
        })
        .collect()
}

/// The bandit's reward for one-hot features.
struct MlpReward(pgrpo::tasks::bandit::BanditReward);

impl RewardFn<Vec<f32>, u32> for MlpReward {
    fn score(&mut self, x: &Vec<f32>, a: &u32, g: &GroupKey) -> pgrpo::Result<f32> {
        let ctx = x.iter().position(|v| *v > 0.5).unwrap_or(0) as u32;
        self.0.score(&ctx, a, g)
    }
    fn state(&self) -> pgrpo::Result<Option<serde_json::Value>> {
        self.0.state()
    }
    fn restore(&mut self, s: serde_json::Value) -> pgrpo::Result<()> {
        self.0.restore(s)
    }
}

#[test]
fn mlp_bandit_resumes_exactly() {
    let make = || {
        (
            MlpPolicy::new(3, 16, 4, 9, &Device::Cpu).unwrap(),
            MlpReward(bandit().reward_fn(78)),
        )
    };
    check_exact_resume(make, full_config(), mlp_batch, 10, 4);
}

/// The tiny Llama LM policy resumes exactly too: weights, AdamW moments, the frozen reference
/// (beta > 0) and the history, with two updates per batch and a cosine schedule.
#[test]
#[cfg(feature = "lm")]
fn tiny_lm_resumes_exactly() {
    use pgrpo::lm::{Llama, LlamaConfig, LmPolicy, SamplingConfig};
    let calls = std::cell::Cell::new(0u64);
    let make = || {
        // The straight and the first run start from init seed 0; the resumed trainer's policy
        // is built from another seed, so only the checkpoint can make its weights right.
        let seed = if calls.get() < 2 { 0 } else { 99 };
        calls.set(calls.get() + 1);
        let cfg = LlamaConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            vocab_size: 16,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            ..Default::default()
        };
        // The weights are overwritten on resume; a different init seed proves it.
        let model = Llama::new(
            cfg,
            &mut StdRng::seed_from_u64(seed),
            &Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let policy = LmPolicy::new(model, None)
            .with_sampling(SamplingConfig {
                max_new_tokens: 4,
                ..Default::default()
            })
            .unwrap();
        // Reward: the fraction of completion tokens that equal the group's favourite token.
        let reward = |_p: &Vec<u32>, c: &Vec<u32>, g: &GroupKey| {
            let want = if g == &GroupKey::from("a") { 7 } else { 3 };
            c.iter().filter(|&&t| t == want).count() as f32 / c.len().max(1) as f32
        };
        (policy, reward)
    };
    let batch_at = |s: u64| {
        vec![
            GroupedPrompt::new(vec![1, 4, 5, (s % 16) as u32], "a"),
            GroupedPrompt::new(vec![1, 6], "b"),
        ]
    };
    let mut cfg = full_config();
    cfg.learning_rate = 1e-2;
    check_exact_resume(make, cfg, batch_at, 8, 3);
}

/// What the child process of `resume_in_a_fresh_process` reports: metrics and weights.
type ChildReport = (Vec<Vec<(String, u64)>>, Vec<Vec<u64>>);

/// The second half in a fresh process: this test binary re-runs itself with
/// `PGRPO_RESUME_CHILD` set, and the child resumes, steps and writes what it saw.
#[test]
fn resume_in_a_fresh_process() {
    let steps = 10u64;
    let split = 6u64;
    let (p, r) = tabular();
    let mut straight = Trainer::new(p, r, full_config()).unwrap();
    let mut want = Vec::new();
    for s in 0..steps {
        want.push(metric_bits(&straight.step(&tabular_batch(s)).unwrap()));
    }
    let (p, r) = tabular();
    let mut first = Trainer::new(p, r, full_config()).unwrap();
    for s in 0..split {
        first.step(&tabular_batch(s)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    first.save(dir.path()).unwrap();
    drop(first);
    let out = dir.path().join("child.json");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "resume_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PGRPO_RESUME_CHILD", dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "child process failed");
    let got: ChildReport = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(got.0, want[split as usize..].to_vec());
    assert_eq!(got.1, weight_bits(&straight.policy().vars()));
}

/// Does nothing unless started by `resume_in_a_fresh_process`.
#[test]
fn resume_child_entry() {
    let Some(dir) = std::env::var_os("PGRPO_RESUME_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (p, r) = tabular();
    let mut t = Trainer::resume(&dir, p, r).unwrap();
    let mut ms = Vec::new();
    for s in t.steps_done()..10 {
        ms.push(metric_bits(&t.step(&tabular_batch(s)).unwrap()));
    }
    let out = (ms, weight_bits(&t.policy().vars()));
    std::fs::write(dir.join("child.json"), serde_json::to_vec(&out).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Layout, rotation, atomicity.

fn trained(steps: u64) -> Trainer<TabularPolicy, pgrpo::tasks::bandit::BanditReward> {
    let (p, r) = tabular();
    let mut t = Trainer::new(p, r, full_config()).unwrap();
    for s in 0..steps {
        t.step(&tabular_batch(s)).unwrap();
    }
    t
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn layout_latest_and_keep_last_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (p, r) = tabular();
    let mut t = Trainer::new(p, r, full_config()).unwrap();
    let opts = CheckpointOptions { keep_last: Some(2) };
    for s in 0..4 {
        t.step(&tabular_batch(s)).unwrap();
        let path = t.save_with(dir.path(), &opts).unwrap();
        assert_eq!(path, dir.path().join(checkpoint::dir_name(s + 1)));
    }
    assert_eq!(
        names_in(dir.path()),
        ["checkpoint-000000003", "checkpoint-000000004", "latest"]
    );
    let files = names_in(&dir.path().join("checkpoint-000000004"));
    assert_eq!(
        files,
        [
            "config.json",
            "history.json",
            "manifest.json",
            "model.safetensors",
            "optimizer.json",
            "optimizer.safetensors",
            "reference.safetensors",
            "reward_state.json"
        ]
    );
    let ck = Checkpoint::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(ck.step, 4);
    assert!(ck.is_exact());
    assert_eq!(&ck.history, t.history());
    // A checkpoint directory loads directly too, and re-saving a step replaces it.
    let ck3 = Checkpoint::load(dir.path().join("checkpoint-000000003"), &Device::Cpu).unwrap();
    assert_eq!(ck3.step, 3);
    t.save_with(dir.path(), &opts).unwrap();
    assert_eq!(
        names_in(dir.path()),
        ["checkpoint-000000003", "checkpoint-000000004", "latest"]
    );
    assert!(matches!(
        t.save_with(dir.path(), &CheckpointOptions { keep_last: Some(0) }),
        Err(Error::InvalidConfig {
            field: "keep_last",
            ..
        })
    ));
}

/// Fails every operation of a save in turn (a full disk part-way through a file, a failed
/// rename, a failed directory sync), with and without clean-up (a crash): the run directory
/// always resumes, to the old state when the failure came before `latest` moved, and the next
/// save cleans up.
#[test]
fn a_failure_at_any_point_of_a_save_leaves_a_loadable_checkpoint() {
    for crash in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut t = trained(2);
        t.save_with(dir.path(), &CheckpointOptions { keep_last: Some(1) })
            .unwrap();
        let old_bits = weight_bits(&t.policy().vars());
        t.step(&tabular_batch(2)).unwrap();
        let new_bits = weight_bits(&t.policy().vars());
        let mut n = 0;
        loop {
            fault::fail_at(n, crash);
            let r = t.save_with(dir.path(), &CheckpointOptions { keep_last: Some(1) });
            let fired = fault::fired();
            fault::clear();
            if !fired {
                r.unwrap();
                break;
            }
            let err = r.expect_err("an injected failure must surface");
            assert!(
                matches!(
                    &err,
                    Error::Checkpoint {
                        problem: CheckpointProblem::Io(_),
                        ..
                    }
                ),
                "op {n}: {err}"
            );
            let (p, r) = tabular();
            let back = Trainer::resume(dir.path(), p, r)
                .unwrap_or_else(|e| panic!("op {n} (crash {crash}): not loadable: {e}"));
            let bits = weight_bits(&back.policy().vars());
            match back.steps_done() {
                2 => assert_eq!(bits, old_bits, "op {n}: old checkpoint changed"),
                3 => assert_eq!(bits, new_bits, "op {n}: new checkpoint damaged"),
                s => panic!("op {n}: resumed at step {s}"),
            }
            if !crash {
                assert!(
                    !names_in(dir.path()).iter().any(|f| f.starts_with(".tmp-")),
                    "op {n}: leftovers {:?}",
                    names_in(dir.path())
                );
            }
            n += 1;
        }
        assert!(n >= 10, "only {n} failure points");
        // The successful save cleaned up and rotated.
        assert_eq!(
            names_in(dir.path()),
            ["checkpoint-000000003", "latest"],
            "crash = {crash}"
        );
    }
}

#[test]
fn a_failed_resave_of_the_same_step_keeps_the_old_copy() {
    let dir = tempfile::tempdir().unwrap();
    let t = trained(2);
    t.save(dir.path()).unwrap();
    let mut n = 0;
    loop {
        fault::fail_at(n, true);
        let r = t.save(dir.path());
        let fired = fault::fired();
        fault::clear();
        if !fired {
            r.unwrap();
            break;
        }
        let ck =
            Checkpoint::load(dir.path(), &Device::Cpu).unwrap_or_else(|e| panic!("op {n}: {e}"));
        assert_eq!(ck.step, 2);
        n += 1;
    }
    assert_eq!(names_in(dir.path()), ["checkpoint-000000002", "latest"]);
}

// ---------------------------------------------------------------------------------------------
// Hostile input.

fn saved() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = trained(3).save(dir.path()).unwrap();
    (dir, path)
}

/// Rewrites `name` with `f` and re-signs it in the manifest, so that the parser behind the
/// checksum is reached.
fn tamper_signed(ckpt: &Path, name: &str, f: impl FnOnce(String) -> String) {
    tamper_bytes(ckpt, name, |b| {
        f(String::from_utf8(b).unwrap()).into_bytes()
    });
}

/// [`tamper_signed`] for binary files.
fn tamper_bytes(ckpt: &Path, name: &str, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let p = ckpt.join(name);
    let bytes = f(std::fs::read(&p).unwrap());
    std::fs::write(&p, &bytes).unwrap();
    let mp = ckpt.join(files::MANIFEST);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    for e in m["files"].as_array_mut().unwrap() {
        if e["name"] == name {
            e["bytes"] = (bytes.len() as u64).into();
            e["sha256"] = checkpoint::sha256_hex(&bytes).into();
        }
    }
    std::fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn load_err(path: &Path) -> (PathBuf, CheckpointProblem) {
    match Checkpoint::load(path, &Device::Cpu) {
        Err(Error::Checkpoint { path, problem }) => (path, problem),
        Err(e) => panic!("expected Error::Checkpoint, got {e}"),
        Ok(_) => panic!("a damaged checkpoint loaded"),
    }
}

fn resume_err(path: &Path) -> (PathBuf, CheckpointProblem) {
    let (p, r) = tabular();
    match Trainer::resume(path, p, r) {
        Err(Error::Checkpoint { path, problem }) => (path, problem),
        Err(e) => panic!("expected Error::Checkpoint, got {e}"),
        Ok(_) => panic!("a damaged checkpoint resumed"),
    }
}

#[test]
fn truncated_file() {
    let (_d, ck) = saved();
    let p = ck.join(files::MODEL);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let (path, problem) = load_err(&ck);
    assert_eq!(path, p);
    assert!(
        matches!(problem, CheckpointProblem::Size { expected, found } if found < expected),
        "{problem}"
    );
    // A truncated manifest.
    let m = ck.join(files::MANIFEST);
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&m, &bytes[..bytes.len() - 20]).unwrap();
    let (path, problem) = load_err(&ck);
    assert_eq!(path, m);
    assert!(
        matches!(problem, CheckpointProblem::Malformed(_)),
        "{problem}"
    );
}

#[test]
fn flipped_byte_fails_the_checksum_in_every_file() {
    let (_d, ck) = saved();
    for name in files::ALL {
        let p = ck.join(name);
        if name == files::POLICY {
            // Only policies with an identity (LoRA) write it; the manifest check is the same.
            assert!(!p.exists());
            continue;
        }
        let mut bytes = std::fs::read(&p).unwrap();
        let i = bytes.len() / 2;
        bytes[i] ^= 0x10;
        std::fs::write(&p, &bytes).unwrap();
        let (path, problem) = load_err(&ck);
        assert_eq!(path, p);
        assert!(
            matches!(problem, CheckpointProblem::Checksum { .. }),
            "{name}: {problem}"
        );
        let msg = Error::Checkpoint {
            path: path.clone(),
            problem,
        }
        .to_string();
        assert!(msg.contains(name) && msg.contains("checksum"), "{msg}");
        bytes[i] ^= 0x10;
        std::fs::write(&p, &bytes).unwrap();
    }
    Checkpoint::load(&ck, &Device::Cpu).unwrap();
}

#[test]
fn newer_format_versions_are_refused() {
    let (_d, ck) = saved();
    let m = ck.join(files::MANIFEST);
    let text = std::fs::read_to_string(&m).unwrap();
    // A future manifest may have other fields; the version is still reported.
    let newer = text.replace("\"version\": 1", "\"version\": 2, \"shards\": 4");
    std::fs::write(&m, newer).unwrap();
    let (path, problem) = load_err(&ck);
    assert_eq!(path, m);
    assert!(
        matches!(
            problem,
            CheckpointProblem::Version {
                found: 2,
                supported: 1
            }
        ),
        "{problem}"
    );
    std::fs::write(&m, &text).unwrap();
    // A newer history format inside a current checkpoint.
    tamper_signed(&ck, files::HISTORY, |h| {
        h.replace("\"version\": 1", "\"version\": 9")
    });
    let (path, problem) = load_err(&ck);
    assert_eq!(path, ck.join(files::HISTORY));
    assert!(
        matches!(problem, CheckpointProblem::Version { found: 9, .. }),
        "{problem}"
    );
}

#[test]
fn history_with_negative_counts_or_nan_means() {
    for (what, edit) in [
        ("negative count", r#""count": -3"#),
        ("negative seen", r#""seen": -1"#),
        ("NaN mean", r#""mean": NaN"#),
        ("null mean", r#""mean": null"#),
        ("overflowing mean", r#""mean": 1e999"#),
        ("negative m2", r#""m2": -1.0"#),
        ("negative weight", r#""weight": -2.0"#),
    ] {
        let (_d, ck) = saved();
        let field = edit.split(':').next().unwrap();
        tamper_signed(&ck, files::HISTORY, |h| {
            let start = h.find(field).expect(field);
            let end = start + h[start..].find([',', '\n']).unwrap();
            format!("{}{}{}", &h[..start], edit, &h[end..])
        });
        let (path, problem) = load_err(&ck);
        assert_eq!(path, ck.join(files::HISTORY), "{what}");
        assert!(
            matches!(
                problem,
                CheckpointProblem::Malformed(_) | CheckpointProblem::Invalid(_)
            ),
            "{what}: {problem}"
        );
    }
}

#[test]
fn weights_that_do_not_fit_the_policy() {
    let (_d, ck) = saved();
    // A policy with 5 actions instead of 4.
    let policy = TabularPolicy::new(3, 5, true, &Device::Cpu).unwrap();
    let before = weight_bits(&policy.vars());
    let vars = policy.vars();
    let err = Trainer::resume(&ck, policy, bandit().reward_fn(0))
        .err()
        .expect("shape mismatch must fail");
    let Error::Checkpoint { path, problem } = &err else {
        panic!("{err}")
    };
    assert_eq!(path, &ck.join(files::MODEL));
    assert!(
        matches!(problem, CheckpointProblem::Mismatch(m) if m.contains("[4]") && m.contains("[5]")),
        "{problem}"
    );
    assert_eq!(weight_bits(&vars), before, "the policy was changed");
    // A policy with a different number of vars (no shared logits).
    let policy = TabularPolicy::new(3, 4, false, &Device::Cpu).unwrap();
    let err = Trainer::resume(&ck, policy, bandit().reward_fn(0))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Checkpoint { problem: CheckpointProblem::Mismatch(m), .. } if m.contains("2 tensors")),
        "{err}"
    );
}

#[test]
fn missing_files_and_directories() {
    let (d, ck) = saved();
    for name in [files::HISTORY, files::OPTIMIZER_TENSORS, files::MANIFEST] {
        let p = ck.join(name);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        let (path, problem) = load_err(&ck);
        if name == files::MANIFEST {
            // Neither a checkpoint nor a run directory any more.
            assert_eq!(path, p);
        } else {
            assert_eq!(path, p);
        }
        assert!(
            matches!(problem, CheckpointProblem::Missing(_)),
            "{name}: {problem}"
        );
        std::fs::write(&p, bytes).unwrap();
    }
    // A run directory whose `latest` names a checkpoint that is gone.
    std::fs::remove_dir_all(&ck).unwrap();
    let (path, problem) = load_err(d.path());
    assert_eq!(path, ck);
    assert!(
        matches!(problem, CheckpointProblem::Missing(_)),
        "{problem}"
    );
    let (path, problem) = load_err(&d.path().join("nowhere"));
    assert_eq!(path, d.path().join("nowhere"));
    assert!(
        matches!(problem, CheckpointProblem::Missing(_)),
        "{problem}"
    );
    std::fs::write(d.path().join(files::LATEST), "../../etc").unwrap();
    let (path, problem) = load_err(d.path());
    assert_eq!(path, d.path().join(files::LATEST));
    assert!(
        matches!(problem, CheckpointProblem::Malformed(_)),
        "{problem}"
    );
}

#[test]
fn manifests_that_lie() {
    let (_d, ck) = saved();
    // An unknown file (path traversal attempt) listed in the manifest.
    let m = ck.join(files::MANIFEST);
    let text = std::fs::read_to_string(&m).unwrap();
    let evil = text.replace("\"config.json\"", "\"../config.json\"");
    std::fs::write(&m, evil).unwrap();
    let (path, problem) = load_err(&ck);
    assert_eq!(path, m);
    assert!(
        matches!(problem, CheckpointProblem::Malformed(ref s) if s.contains("unknown file")),
        "{problem}"
    );
    // A manifest that drops the model.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["files"]
        .as_array_mut()
        .unwrap()
        .retain(|e| e["name"] != "model.safetensors");
    std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
    let (path, problem) = load_err(&ck);
    assert_eq!(path, ck.join(files::MODEL));
    assert!(
        matches!(problem, CheckpointProblem::Missing(_)),
        "{problem}"
    );
    // Another format altogether.
    std::fs::write(&m, r#"{"format": "something.else", "version": 1}"#).unwrap();
    assert!(matches!(load_err(&ck).1, CheckpointProblem::Malformed(_)));
    std::fs::write(&m, &text).unwrap();
    // Invalid config values (re-signed): an invalid learning rate.
    tamper_signed(&ck, files::CONFIG, |c| {
        c.replace("\"learning_rate\": 0.05", "\"learning_rate\": -1.0")
    });
    let (path, problem) = load_err(&ck);
    assert_eq!(path, ck.join(files::CONFIG));
    assert!(
        matches!(problem, CheckpointProblem::Invalid(ref s) if s.contains("learning_rate")),
        "{problem}"
    );
}

#[test]
fn garbage_safetensors_and_reward_state() {
    let (_d, ck) = saved();
    // A model file that is not safetensors at all (re-signed).
    let p = ck.join(files::MODEL);
    let good = std::fs::read(&p).unwrap();
    tamper_bytes(&ck, files::MODEL, |_| b"not a safetensors file".to_vec());
    let (path, problem) = load_err(&ck);
    assert_eq!(path, p);
    assert!(
        matches!(problem, CheckpointProblem::Malformed(_)),
        "{problem}"
    );
    // A header that claims more data than the file has.
    tamper_bytes(&ck, files::MODEL, |_| {
        let mut b = good.clone();
        b.truncate(b.len() - 4);
        b
    });
    assert!(matches!(load_err(&ck).1, CheckpointProblem::Malformed(_)));
    // Renamed tensors.
    tamper_bytes(&ck, files::MODEL, |_| {
        let mut b = good.clone();
        let at = b.windows(9).position(|w| w == b"var.00001").unwrap();
        b[at + 8] = b'9';
        b
    });
    assert!(
        matches!(load_err(&ck).1, CheckpointProblem::Malformed(ref m) if m.contains("var.00009"))
    );
    tamper_bytes(&ck, files::MODEL, |_| good.clone());
    Checkpoint::load(&ck, &Device::Cpu).unwrap();
    // A reward state the reward function rejects.
    tamper_signed(&ck, files::REWARD_STATE, |s| {
        s.replace("pgrpo.bandit_reward", "other")
    });
    let (path, problem) = resume_err(&ck);
    assert_eq!(path, ck.join(files::REWARD_STATE));
    assert!(
        matches!(problem, CheckpointProblem::Invalid(_)),
        "{problem}"
    );
    // A reward function without state hooks cannot take the saved state.
    tamper_signed(&ck, files::REWARD_STATE, |s| {
        s.replace("\"other\"", "\"pgrpo.bandit_reward\"")
    });
    let closure = |_c: &u32, _a: &u32, _g: &GroupKey| 1.0f32;
    let err = Trainer::resume(&ck, tabular().0, closure).err().unwrap();
    assert!(
        matches!(&err, Error::Checkpoint { problem: CheckpointProblem::Invalid(m), .. } if m.contains("cannot restore")),
        "{err}"
    );
}

#[test]
fn an_optimizer_without_state_gives_an_inexact_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // One update per step: a step of several is undone on error, which needs the optimizer's
    // state, and candle_nn::AdamW cannot export it (tests/update.rs).
    let cfg = TrainerConfig {
        num_iterations: 1,
        ..full_config()
    };
    let (p, r) = tabular();
    let opt = candle_nn::AdamW::new(p.vars(), Default::default()).unwrap();
    let mut t = Trainer::with_optimizer(p, r, cfg, opt).unwrap();
    t.step(&tabular_batch(0)).unwrap();
    let ck = t.save(dir.path()).unwrap();
    assert!(!ck.join(files::OPTIMIZER_TENSORS).exists());
    let (p, r) = tabular();
    let opt = candle_nn::AdamW::new(p.vars(), Default::default()).unwrap();
    let err = Trainer::resume_with_optimizer(dir.path(), p, r, opt)
        .err()
        .unwrap();
    assert!(
        matches!(
            &err,
            Error::Checkpoint {
                problem: CheckpointProblem::Inexact(_),
                ..
            }
        ),
        "{err}"
    );
    // Explicitly accepted: resumes with fresh moments.
    let (p, r) = tabular();
    let opt = candle_nn::AdamW::new(p.vars(), Default::default()).unwrap();
    let ckpt = Checkpoint::load(dir.path(), &Device::Cpu)
        .unwrap()
        .with_fresh_optimizer();
    assert!(!ckpt.is_exact());
    let mut t = Trainer::from_checkpoint(ckpt, p, r, opt).unwrap();
    assert_eq!(t.steps_done(), 1);
    t.step(&tabular_batch(1)).unwrap();
    // An AdamW state offered to SGD does not fit.
    let (p, r) = tabular();
    let sgd = candle_nn::SGD::new(p.vars(), 0.1).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    trained(1).save(dir2.path()).unwrap();
    let err = Trainer::resume_with_optimizer(dir2.path(), p, r, sgd)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Checkpoint { problem: CheckpointProblem::Mismatch(_), path } if path.ends_with(files::OPTIMIZER_TENSORS)),
        "{err}"
    );
    let _ = sgd_state_is_exact();
}

fn sgd_state_is_exact() -> bool {
    let p = TabularPolicy::new(1, 2, false, &Device::Cpu).unwrap();
    candle_nn::SGD::new(p.vars(), 0.1)
        .unwrap()
        .export_state()
        .unwrap()
        .is_some()
}

#[test]
fn in_memory_files_load_like_a_directory() {
    let (_d, ck) = saved();
    let mut map = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(&ck).unwrap() {
        let e = e.unwrap();
        map.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path()).unwrap(),
        );
    }
    let a = Checkpoint::from_files(&map, "mem", &Device::Cpu).unwrap();
    let b = Checkpoint::load(&ck, &Device::Cpu).unwrap();
    assert_eq!(a.step, b.step);
    assert_eq!(a.history, b.history);
    map.remove(files::HISTORY);
    match Checkpoint::from_files(&map, "mem", &Device::Cpu) {
        Err(Error::Checkpoint {
            path,
            problem: CheckpointProblem::Missing(_),
        }) => assert_eq!(path, Path::new("mem").join(files::HISTORY)),
        other => panic!("{:?}", other.map(|c| c.step)),
    }
}

/// The history's JSON gives back every f64 bit for bit (serde_json's `float_roundtrip`;
/// without it, 1-ULP differences broke exact resume).
#[test]
fn history_json_round_trips_every_bit() {
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(3);
    for kind in [
        HistoryKind::Cumulative,
        HistoryKind::Exponential { half_life: 7.5 },
        HistoryKind::Window { size: 5 },
    ] {
        let mut h = pgrpo::RewardHistory::new(kind).unwrap();
        for g in 0..20u32 {
            let rewards: Vec<f32> = (0..37)
                .map(|_| rng.random_range(-3.0f32..3.0) * 10f32.powi(rng.random_range(-8..8)))
                .collect();
            h.update(g, &rewards).unwrap();
        }
        let back = pgrpo::RewardHistory::from_json(&h.to_json().unwrap()).unwrap();
        for (g, _) in h.iter() {
            let (a, b) = (h.moments(g).unwrap(), back.moments(g).unwrap());
            assert_eq!(a.mean.to_bits(), b.mean.to_bits(), "{kind:?} group {g}");
            assert_eq!(a.m2.to_bits(), b.m2.to_bits(), "{kind:?} group {g}");
            assert_eq!(a.weight.to_bits(), b.weight.to_bits(), "{kind:?} group {g}");
        }
    }
}

/// One message per kind of damage, each naming the file (printed with `--nocapture`: the
/// table in docs/checkpoints.md comes from here).
#[test]
fn every_message_names_the_file() {
    type Damage = (&'static str, &'static str, fn(&Path));
    let cases: [Damage; 8] = [
        ("truncated", files::MODEL, |ck| {
            let p = ck.join(files::MODEL);
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        }),
        ("flipped byte", files::OPTIMIZER_TENSORS, |ck| {
            let p = ck.join(files::OPTIMIZER_TENSORS);
            let mut b = std::fs::read(&p).unwrap();
            let i = b.len() - 3;
            b[i] ^= 1;
            std::fs::write(&p, &b).unwrap();
        }),
        ("newer manifest", files::MANIFEST, |ck| {
            let p = ck.join(files::MANIFEST);
            let t = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, t.replace("\"version\": 1", "\"version\": 2")).unwrap();
        }),
        ("negative count", files::HISTORY, |ck| {
            tamper_signed(ck, files::HISTORY, |h| {
                h.replacen("\"count\": ", "\"count\": -", 1)
            })
        }),
        ("NaN mean", files::HISTORY, |ck| {
            tamper_signed(ck, files::HISTORY, |h| {
                let i = h.find("\"mean\": ").unwrap() + 8;
                let j = i + h[i..].find(',').unwrap();
                format!("{}NaN{}", &h[..i], &h[j..])
            })
        }),
        ("negative m2", files::HISTORY, |ck| {
            tamper_signed(ck, files::HISTORY, |h| {
                h.replacen("\"m2\": ", "\"m2\": -", 1)
            })
        }),
        ("missing file", files::HISTORY, |ck| {
            std::fs::remove_file(ck.join(files::HISTORY)).unwrap()
        }),
        ("bad reward state", files::REWARD_STATE, |ck| {
            tamper_signed(ck, files::REWARD_STATE, |s| s.replace("word_pos", "pos"))
        }),
    ];
    for (what, file, damage) in cases {
        let (_d, ck) = saved();
        damage(&ck);
        let (p, r) = tabular();
        let err = Trainer::resume(&ck, p, r).err().expect(what);
        let msg = err.to_string();
        eprintln!("{what:>16}: {msg}");
        assert!(matches!(err, Error::Checkpoint { .. }), "{what}: {msg}");
        assert!(msg.contains(file), "{what}: {msg}");
    }
    let (_d, ck) = saved();
    let policy = TabularPolicy::new(3, 5, true, &Device::Cpu).unwrap();
    let msg = Trainer::resume(&ck, policy, bandit().reward_fn(0))
        .err()
        .unwrap()
        .to_string();
    eprintln!("{:>16}: {msg}", "shape mismatch");
    assert!(msg.contains(files::MODEL));
}

/// `BanditReward` draws the same noise as the closure it replaced (a `StdRng` seeded with
/// the same seed), so earlier results reproduce.
#[test]
fn bandit_noise_stream_is_unchanged() {
    let b = bandit();
    let mut r = b.reward_fn(123);
    let mut rng = StdRng::seed_from_u64(123);
    for i in 0..200u32 {
        let (ctx, a) = (i % 3, (i / 3) % 4);
        let want = b.reward(ctx, a, &mut rng);
        let got = r.score(&ctx, &a, &GroupKey::from("x")).unwrap();
        assert_eq!(got.to_bits(), want.to_bits(), "draw {i}");
    }
}

/// Editing the config before resuming: a longer schedule, and the KL term switched on (the
/// reference is then the resumed policy).
#[test]
fn an_edited_config_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let c = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.05,
        ..Default::default()
    };
    let (p, r) = tabular();
    let mut t = Trainer::new(p, r, c).unwrap();
    t.step(&tabular_batch(0)).unwrap();
    t.save(dir.path()).unwrap();
    let mut ck = Checkpoint::load(dir.path(), &Device::Cpu).unwrap();
    assert!(ck.reference.is_none());
    ck.config.objective.beta = 0.1;
    ck.config.max_steps = Some(100);
    let (p, r) = tabular();
    let mut t2 = Trainer::resume_from(ck, p, r).unwrap();
    assert_eq!(
        weight_bits(&t2.reference().unwrap().vars()),
        weight_bits(&t.policy().vars())
    );
    let m = t2.step(&tabular_batch(1)).unwrap();
    assert!(
        m.get("kl").unwrap().abs() < 1e-6,
        "KL to itself at the first update"
    );
    // An invalid edit is refused before anything happens.
    let mut ck = Checkpoint::load(dir.path(), &Device::Cpu).unwrap();
    ck.config.learning_rate = f64::NAN;
    let (p, r) = tabular();
    assert!(matches!(
        Trainer::resume_from(ck, p, r),
        Err(Error::InvalidConfig {
            field: "learning_rate",
            ..
        })
    ));
}
