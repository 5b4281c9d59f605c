//! One training run (one estimator, one seed) with its files, and the held-out evaluation.
//!
//! A run directory holds the trainer's checkpoints (`checkpoint-NNNNNNNNN/`, `latest`), and
//! three files of its own:
//!
//! | file | what |
//! |---|---|
//! | `steps.jsonl` | one line per training step: batch reward per true group, seconds (sampling, reward, update), load average |
//! | `evals.jsonl` | one line per held-out evaluation after step 0 (the rates of every want on every group's held-out prompts) |
//! | `done.json` | written last: the run is complete |
//!
//! A run that finds `latest` resumes from it ([`Trainer::resume`]) and drops the lines of
//! `steps.jsonl` and `evals.jsonl` written after that checkpoint: the steps and evaluations
//! it redoes are the same (every random stream is a function of the seed and the step), so
//! a killed study continues exactly.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Var};
use pgrpo::checkpoint::CheckpointOptions;
use pgrpo::lm::{LmPolicy, LoraConfig, Tokenizer};
use pgrpo::rng::step_rng;
use pgrpo::{Estimator, GroupKey, GroupedPrompt, Policy, RewardFn, TokenLogProbs, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::task::{group_of, Want, GROUPS};
use crate::Settings;

/// Stream tags: each random stream of a seed is `step_rng(seed ^ TAG, step)`.
const BATCH_STREAM: u64 = 0xB47C_0000_0000_0001;
const LABEL_STREAM: u64 = 0x1ABE_0000_0000_0002;
const EVAL_STREAM: u64 = 0xE7A1_0000_0000_0003;
const LORA_STREAM: u64 = 0x10BA_0000_0000_0004;

/// One estimator as the study runs it.
#[derive(Clone, Debug)]
pub struct Arm {
    /// As given on the command line (`p_grpo_shuffled`, ...).
    pub name: String,
    pub estimator: Estimator,
    /// Group labels drawn at random by share, independent of the true group (the paper's
    /// ablation).
    pub shuffled: bool,
}

impl Arm {
    /// Parses `name` (an estimator name, optionally with the `_shuffled` suffix).
    pub fn parse(name: &str) -> pgrpo::Result<Self> {
        let (base, shuffled) = match name.strip_suffix("_shuffled") {
            Some(b) => (b, true),
            None => (name, false),
        };
        Ok(Self {
            name: name.to_owned(),
            estimator: base.parse()?,
            shuffled,
        })
    }
}

/// A prompt's tokens and its true group. Only the tokens reach the model.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyPrompt {
    pub group: usize,
    pub tokens: Vec<u32>,
}

/// [`LmPolicy`] over [`StudyPrompt`]s: forwards the tokens, drops the group.
pub struct StudyPolicy(pub LmPolicy);

fn tokens_of<'a>(prompts: &[&'a StudyPrompt]) -> Vec<&'a Vec<u32>> {
    prompts.iter().map(|p| &p.tokens).collect()
}

impl Policy for StudyPolicy {
    type Prompt = StudyPrompt;
    type Completion = Vec<u32>;

    fn device(&self) -> &Device {
        self.0.device()
    }

    fn sample(
        &self,
        prompts: &[StudyPrompt],
        n: usize,
        rng: &mut StdRng,
    ) -> pgrpo::Result<Vec<Vec<u32>>> {
        let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
        self.0.sample(&tokens, n, rng)
    }

    fn log_probs(
        &self,
        prompts: &[&StudyPrompt],
        completions: &[Vec<u32>],
    ) -> pgrpo::Result<TokenLogProbs> {
        self.0.log_probs(&tokens_of(prompts), completions)
    }

    fn log_probs_detached(
        &self,
        prompts: &[&StudyPrompt],
        completions: &[Vec<u32>],
    ) -> pgrpo::Result<TokenLogProbs> {
        self.0.log_probs_detached(&tokens_of(prompts), completions)
    }

    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }

    fn snapshot(&self) -> pgrpo::Result<Self> {
        Ok(Self(self.0.snapshot()?))
    }
}

/// Decodes a completion and scores it for the prompt's **true** group (never the label,
/// which the ablation shuffles). Keeps `(group, reward)` of every call for the curves.
pub struct TextReward {
    tokenizer: Tokenizer,
    pub log: Vec<(usize, f32)>,
}

impl TextReward {
    pub fn new(tokenizer: Tokenizer) -> Self {
        Self {
            tokenizer,
            log: Vec::new(),
        }
    }

    pub fn text(&self, ids: &[u32]) -> pgrpo::Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| pgrpo::Error::Tokenizer(e.to_string()))
    }
}

impl RewardFn<StudyPrompt, Vec<u32>> for TextReward {
    fn score(
        &mut self,
        prompt: &StudyPrompt,
        completion: &Vec<u32>,
        _group: &GroupKey,
    ) -> pgrpo::Result<f32> {
        let text = self.text(completion)?;
        let r = GROUPS[prompt.group].reward(&text);
        self.log.push((prompt.group, r));
        Ok(r)
    }

    fn name(&self) -> &str {
        "want"
    }
}

/// Token ids of every group's prompt for each request: `[group][request]`.
pub fn prompt_table(policy: &LmPolicy, requests: &[&str]) -> pgrpo::Result<Vec<Vec<Vec<u32>>>> {
    GROUPS
        .iter()
        .map(|g| {
            requests
                .iter()
                .map(|r| policy.chat_prompt(&crate::task::user_message(g, r)))
                .collect()
        })
        .collect()
}

/// The training batch of step `step` for seed `seed`: groups drawn by share, requests
/// uniformly, labels true or (shuffled) drawn by share independently. The same for every
/// estimator of a seed.
pub fn batch(
    train: &[Vec<Vec<u32>>],
    prompts: usize,
    seed: u64,
    step: u64,
    shuffled: bool,
) -> Vec<GroupedPrompt<StudyPrompt>> {
    let mut rng = step_rng(seed ^ BATCH_STREAM, step);
    let mut labels = step_rng(seed ^ LABEL_STREAM, step);
    (0..prompts)
        .map(|_| {
            let group = group_of(rng.random());
            let request = rng.random_range(0..train[group].len());
            let label = if shuffled {
                group_of(labels.random())
            } else {
                group
            };
            GroupedPrompt::new(
                StudyPrompt {
                    group,
                    tokens: train[group][request].clone(),
                },
                GROUPS[label].name,
            )
        })
        .collect()
}

/// A held-out evaluation: for each group, the rate of every want over its samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Eval {
    /// Training steps done when it was taken (0 = the starting model).
    pub step: u64,
    /// Samples per group.
    pub n: usize,
    /// `rates[g][w]`: fraction of group `g`'s samples that satisfy want `w` (of group `w`,
    /// with group `g`'s name for the name rules). The reward of group `g` is `rates[g][g]`.
    pub rates: Vec<Vec<f64>>,
    /// One completion per group (the first sample of its first held-out request).
    pub examples: Vec<String>,
    /// Seconds it took (wall and CPU of the worker's thread), and the 1-minute load
    /// average when it ended.
    pub secs: f64,
    pub cpu: f64,
    pub load: f64,
}

impl Eval {
    /// Held-out reward of every group.
    pub fn rewards(&self) -> Vec<f64> {
        (0..GROUPS.len()).map(|g| self.rates[g][g]).collect()
    }
}

/// Samples `n` fresh completions for every held-out prompt (`heldout[group][request]`) with
/// the evaluation stream of `seed` and measures every want's rate per group; `step` is
/// recorded.
pub fn evaluate(
    policy: &LmPolicy,
    reward: &TextReward,
    heldout: &[Vec<Vec<u32>>],
    n: usize,
    seed: u64,
    step: u64,
) -> pgrpo::Result<Eval> {
    let t = Instant::now();
    let c = thread_cpu_secs();
    let flat: Vec<Vec<u32>> = heldout.iter().flatten().cloned().collect();
    // The same stream at every step of a seed (common random numbers): an unchanged model
    // gets the same samples, so differences between steps are the model's.
    let mut rng = step_rng(seed ^ EVAL_STREAM, 0);
    let outs = policy.sample(&flat, n, &mut rng)?;
    let per_group = heldout[0].len() * n;
    let mut rates = Vec::with_capacity(GROUPS.len());
    let mut examples = Vec::with_capacity(GROUPS.len());
    for (g, group) in GROUPS.iter().enumerate() {
        let texts: Vec<String> = outs[g * per_group..(g + 1) * per_group]
            .iter()
            .map(|ids| reward.text(ids))
            .collect::<pgrpo::Result<_>>()?;
        let rate = |want: Want| {
            texts
                .iter()
                .filter(|t| want.satisfied(t, group.name))
                .count() as f64
                / texts.len() as f64
        };
        rates.push(GROUPS.iter().map(|w| rate(w.want)).collect());
        examples.push(texts[0].clone());
    }
    Ok(Eval {
        step,
        n: per_group,
        rates,
        examples,
        secs: t.elapsed().as_secs_f64(),
        cpu: thread_cpu_secs() - c,
        load: load_average(),
    })
}

/// One training step as recorded in `steps.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Steps done after this one (1-based).
    pub step: u64,
    /// Batch reward per true group (`None`: the group was not in the batch).
    pub reward: Vec<Option<f64>>,
    /// Seconds: sampling, decoding + rules, update (log-probs, backward, optimizer).
    pub sample: f64,
    pub score: f64,
    pub update: f64,
    /// Wall seconds of the whole step.
    pub total: f64,
    /// CPU seconds of the worker's thread: sampling and scoring (`rollout`), and the update.
    pub rollout_cpu: f64,
    pub update_cpu: f64,
    /// 1-minute load average after the step.
    pub load: f64,
}

/// What a finished run leaves in `done.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    pub steps: u64,
    /// The process's peak resident memory (`VmHWM`) when the run ended, MiB.
    pub peak_rss_mib: f64,
}

/// The 1-minute load average (NaN where `/proc/loadavg` is missing).
pub fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU seconds used so far by the calling thread (user + system, from
/// `/proc/thread-self/stat` at 100 ticks per second; NaN elsewhere). A worker runs its
/// run inside its own single-threaded rayon pool, so this is all of the run's CPU time.
pub fn thread_cpu_secs() -> f64 {
    let Ok(stat) = fs::read_to_string("/proc/thread-self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (`state`);
    // utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// The process's peak resident memory in MiB (`VmHWM` of `/proc/self/status`; NaN elsewhere).
pub fn peak_rss_mib() -> f64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Reads a JSON-lines file (missing = empty).
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, String> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Rewrites a JSON-lines file with `items` (write to a temporary file, then rename).
fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<(), String> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut text = String::new();
    for it in items {
        text += &serde_json::to_string(it).map_err(|e| e.to_string())?;
        text.push('\n');
    }
    fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Appends one line to a JSON-lines file.
fn append_jsonl<T: Serialize>(path: &Path, item: &T) -> Result<(), String> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let line = serde_json::to_string(item).map_err(|e| e.to_string())?;
    writeln!(f, "{line}").map_err(|e| format!("{}: {e}", path.display()))
}

/// The prompts and the base model shared by every run of the process.
pub struct Shared {
    /// The loaded model, frozen: every run's policy shares its weights and adds its own
    /// adapters.
    pub base: LmPolicy,
    pub train: Vec<Vec<Vec<u32>>>,
    pub heldout: Vec<Vec<Vec<u32>>>,
}

impl Shared {
    fn tokenizer(&self) -> pgrpo::Result<Tokenizer> {
        self.base
            .tokenizer()
            .cloned()
            .ok_or_else(|| pgrpo::Error::Tokenizer("the model has no tokenizer".into()))
    }

    /// The initial policy of seed `seed`: the shared frozen base with fresh adapters (`B = 0`,
    /// so it is the base model until the first update), the same for every estimator.
    fn policy(&self, s: &Settings, seed: u64) -> pgrpo::Result<LmPolicy> {
        let mut rng = step_rng(seed ^ LORA_STREAM, 0);
        let mut lora_rng = StdRng::seed_from_u64(rng.random());
        let lora = LoraConfig {
            r: s.lora_r,
            alpha: s.lora_alpha,
            dropout: 0.0,
            target_modules: s.lora_targets()?,
        };
        self.base.snapshot()?.with_lora(lora, &mut lora_rng)
    }

    /// The step-0 evaluation of seed `seed` (shared by every estimator: the adapters start
    /// at `B = 0` and the evaluation stream depends on the seed and step only), cached in
    /// `out/base/seed-K.json`.
    pub fn base_eval(&self, s: &Settings, out: &Path, seed: u64) -> Result<Eval, String> {
        let path = out.join("base").join(format!("seed-{seed}.json"));
        if let Ok(text) = fs::read_to_string(&path) {
            return serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()));
        }
        let reward = TextReward::new(self.tokenizer().map_err(|e| e.to_string())?);
        let eval = evaluate(&self.base, &reward, &self.heldout, s.eval_samples, seed, 0)
            .map_err(|e| e.to_string())?;
        fs::create_dir_all(path.parent().unwrap_or(out)).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&eval).map_err(|e| e.to_string())?;
        fs::write(&tmp, text).map_err(|e| e.to_string())?;
        fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        Ok(eval)
    }
}

/// How a call to [`train`] ended.
pub enum Outcome {
    Finished,
    /// Stopped by `--stop-after` (as a kill would stop it, after a checkpoint).
    Stopped {
        at: u64,
    },
    /// Already complete before this call.
    AlreadyDone,
}

/// Directory of one run.
pub fn run_dir(out: &Path, arm: &str, seed: u64) -> PathBuf {
    out.join("runs").join(format!("{arm}-seed{seed}"))
}

/// Trains one (estimator, seed) run to `s.steps`, resuming from its directory if it has a
/// checkpoint; evaluates at `s.eval_steps()` (after step 0) and checkpoints every
/// `s.checkpoint_every` steps and at the end.
pub fn train(
    shared: &Shared,
    s: &Settings,
    out: &Path,
    arm: &Arm,
    seed: u64,
    stop_after: Option<u64>,
    verbose: bool,
) -> Result<Outcome, String> {
    let dir = run_dir(out, &arm.name, seed);
    if dir.join("done.json").exists() {
        return Ok(Outcome::AlreadyDone);
    }
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let e = |e: pgrpo::Error| format!("{} seed {seed}: {e}", arm.name);
    let tokenizer = shared.tokenizer().map_err(e)?;
    let policy = StudyPolicy(
        shared
            .policy(s, seed)
            .map_err(e)?
            .with_sampling(s.sampling())
            .map_err(e)?
            .with_entropy(false),
    );
    let reward = TextReward::new(tokenizer.clone());
    let eval_reward = TextReward::new(tokenizer);
    let mut trainer = if dir.join("latest").exists() {
        Trainer::resume(&dir, policy, reward).map_err(e)?
    } else {
        Trainer::new(policy, reward, s.trainer_config(arm, seed)).map_err(e)?
    };
    let start = trainer.steps_done();
    // Drop what was written after the checkpoint: it is redone identically.
    let steps_path = dir.join("steps.jsonl");
    let evals_path = dir.join("evals.jsonl");
    let mut steps: Vec<StepRecord> = read_jsonl(&steps_path)?;
    steps.retain(|r| r.step <= start);
    write_jsonl(&steps_path, &steps)?;
    let mut evals: Vec<Eval> = read_jsonl(&evals_path)?;
    evals.retain(|r| r.step <= start);
    write_jsonl(&evals_path, &evals)?;
    if start > 0 && verbose {
        eprintln!("[{} seed {seed}] resumed at step {start}", arm.name);
    }
    let eval_steps = s.eval_steps();
    let total = s.steps as u64;
    let opts = CheckpointOptions { keep_last: Some(1) };
    for (done_here, step) in (1u64..).zip(start..total) {
        let t = Instant::now();
        let b = batch(&shared.train, s.prompts, seed, step, arm.shuffled);
        let c0 = thread_cpu_secs();
        let rollout = trainer.rollout(&b).map_err(e)?;
        let c1 = thread_cpu_secs();
        let m = trainer.update(rollout).map_err(e)?;
        let c2 = thread_cpu_secs();
        let time = |k: &str| m.timings.get(k).copied().unwrap_or(0.0);
        let mut sums = vec![(0.0f64, 0usize); GROUPS.len()];
        for (g, r) in trainer.reward_fn().log.drain(..) {
            sums[g].0 += f64::from(r);
            sums[g].1 += 1;
        }
        let rec = StepRecord {
            step: step + 1,
            reward: sums
                .iter()
                .map(|&(sum, n)| (n > 0).then(|| sum / n as f64))
                .collect(),
            sample: time("sample"),
            score: time("reward"),
            update: time("update") + time("old_logp"),
            total: t.elapsed().as_secs_f64(),
            rollout_cpu: c1 - c0,
            update_cpu: c2 - c1,
            load: load_average(),
        };
        append_jsonl(&steps_path, &rec)?;
        if verbose {
            eprintln!(
                "[{} seed {seed}] step {}/{total}: reward {:.3}, sample {:.1}s, update {:.1}s \
                 (CPU {:.1}s + {:.1}s), load {:.1}",
                arm.name,
                step + 1,
                m.reward(),
                rec.sample,
                rec.update,
                rec.rollout_cpu,
                rec.update_cpu,
                rec.load
            );
        }
        if eval_steps.contains(&(step + 1)) {
            let ev = evaluate(
                &trainer.policy().0,
                &eval_reward,
                &shared.heldout,
                s.eval_samples,
                seed,
                step + 1,
            )
            .map_err(e)?;
            if verbose {
                let r: Vec<String> = ev.rewards().iter().map(|x| format!("{x:.2}")).collect();
                eprintln!(
                    "[{} seed {seed}] held-out at step {}: [{}] ({:.0}s, CPU {:.0}s)",
                    arm.name,
                    step + 1,
                    r.join(", "),
                    ev.secs,
                    ev.cpu
                );
            }
            append_jsonl(&evals_path, &ev)?;
        }
        let last = step + 1 == total;
        let stop = stop_after.is_some_and(|n| done_here >= n);
        if last || stop || (step + 1) % s.checkpoint_every as u64 == 0 {
            trainer.save_with(&dir, &opts).map_err(e)?;
        }
        if stop && !last {
            return Ok(Outcome::Stopped { at: step + 1 });
        }
    }
    let done = Done {
        steps: total,
        peak_rss_mib: peak_rss_mib(),
    };
    let text = serde_json::to_string_pretty(&done).map_err(|e| e.to_string())?;
    fs::write(dir.join("done.json"), text).map_err(|e| e.to_string())?;
    Ok(Outcome::Finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token table `[group][request]` whose prompts encode their group and request.
    fn table() -> Vec<Vec<Vec<u32>>> {
        (0..GROUPS.len() as u32)
            .map(|g| (0..8).map(|r| vec![100 + g, r]).collect())
            .collect()
    }

    fn groups_and_labels(b: &[GroupedPrompt<StudyPrompt>]) -> (Vec<usize>, Vec<String>) {
        (
            b.iter().map(|p| p.prompt.group).collect(),
            b.iter().map(|p| p.group.to_string()).collect(),
        )
    }

    #[test]
    fn batches_are_paired_by_seed_and_shuffling_changes_only_labels() {
        let t = table();
        let a = batch(&t, 64, 3, 7, false);
        assert_eq!(a, batch(&t, 64, 3, 7, false), "a function of (seed, step)");
        let shuffled = batch(&t, 64, 3, 7, true);
        let prompts = |b: &[GroupedPrompt<StudyPrompt>]| -> Vec<StudyPrompt> {
            b.iter().map(|p| p.prompt.clone()).collect()
        };
        assert_eq!(
            prompts(&a),
            prompts(&shuffled),
            "same prompts for every estimator"
        );
        let (groups, labels) = groups_and_labels(&a);
        for (g, l) in groups.iter().zip(&labels) {
            assert_eq!(GROUPS[*g].name, l, "true labels");
        }
        for p in &a {
            assert_eq!(p.prompt.tokens[0], 100 + p.prompt.group as u32);
        }
        let (_, shuffled_labels) = groups_and_labels(&shuffled);
        let agree = labels
            .iter()
            .zip(&shuffled_labels)
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            agree < 48,
            "shuffled labels mostly differ: {agree}/64 agree"
        );
        assert_ne!(
            prompts(&a),
            prompts(&batch(&t, 64, 3, 8, false)),
            "steps differ"
        );
        assert_ne!(
            prompts(&a),
            prompts(&batch(&t, 64, 4, 7, false)),
            "seeds differ"
        );
    }

    #[test]
    fn batches_follow_the_shares() {
        let t = table();
        let mut counts = [0usize; GROUPS.len()];
        for step in 0..500 {
            for p in batch(&t, 8, 0, step, false) {
                counts[p.prompt.group] += 1;
            }
        }
        for (g, c) in GROUPS.iter().zip(counts) {
            let share = c as f64 / 4000.0;
            assert!((share - g.share).abs() < 0.025, "{}: {share}", g.name);
        }
    }

    #[test]
    fn arms_parse_estimators_and_the_shuffled_suffix() {
        let a = Arm::parse("p_grpo_shuffled").unwrap();
        assert_eq!((a.estimator, a.shuffled), (Estimator::PGrpo, true));
        let a = Arm::parse("grpo").unwrap();
        assert_eq!((a.estimator, a.shuffled), (Estimator::Grpo, false));
        assert!(Arm::parse("nonsense").is_err());
    }

    #[test]
    fn jsonl_round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        assert!(read_jsonl::<StepRecord>(&p).unwrap().is_empty());
        let rec = |step| StepRecord {
            step,
            reward: vec![Some(0.5), None, Some(1.0), None, None, None],
            sample: 1.0,
            score: 0.01,
            update: 2.0,
            total: 3.0,
            rollout_cpu: 1.0,
            update_cpu: 2.0,
            load: 0.5,
        };
        append_jsonl(&p, &rec(1)).unwrap();
        append_jsonl(&p, &rec(2)).unwrap();
        let back: Vec<StepRecord> = read_jsonl(&p).unwrap();
        assert_eq!(back, vec![rec(1), rec(2)]);
        write_jsonl(&p, &back[..1]).unwrap();
        assert_eq!(read_jsonl::<StepRecord>(&p).unwrap(), vec![rec(1)]);
        fs::write(&p, "{not json}\n").unwrap();
        let err = read_jsonl::<StepRecord>(&p).unwrap_err();
        assert!(err.contains("x.jsonl:1"), "{err}");
    }

    #[test]
    fn thread_cpu_time_counts_this_threads_work() {
        let before = thread_cpu_secs();
        if before.is_nan() {
            eprintln!("SKIPPED: no /proc/thread-self/stat");
            return;
        }
        // Spin until the thread has been charged 0.2 s (at most 20 s of wall time on a
        // crowded machine); the charge can never exceed the wall time.
        let t = Instant::now();
        let mut x = 0u64;
        let mut used = 0.0;
        while used < 0.2 && t.elapsed().as_secs_f64() < 20.0 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            used = thread_cpu_secs() - before;
        }
        std::hint::black_box(x);
        assert!(used >= 0.2, "{used}");
        assert!(used <= t.elapsed().as_secs_f64() + 0.02, "{used}");
    }
}
