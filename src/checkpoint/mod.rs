//! Checkpoints: everything a run needs to continue exactly, written atomically and loaded
//! defensively.
//!
//! A P-GRPO run's state is more than weights: the per-group [`RewardHistory`] decides every
//! future advantage, so it is saved with them. A checkpoint is a directory:
//!
//! | file | what |
//! |---|---|
//! | `manifest.json` | format name and version, step, and the length and SHA-256 of every other file |
//! | `config.json` | the [`TrainerConfig`] |
//! | `model.safetensors` | the policy's vars in [`Policy::vars`](crate::Policy::vars) order, named `var.00000`, `var.00001`, … |
//! | `reference.safetensors` | the frozen reference policy's vars (only when `objective.beta > 0`) |
//! | `optimizer.safetensors`, `optimizer.json` | the optimizer's state tensors, and its kind, step count, tensor order and metadata ([`OptimizerState`](crate::optim::OptimizerState)) |
//! | `history.json` | the reward history ([`RewardHistory::to_json`], versioned) |
//! | `reward_state.json` | the reward function's state, when it has one ([`RewardFn::state`](crate::RewardFn::state)) |
//! | `policy.json` | what the policy's vars are relative to, when they are not the whole model ([`Policy::checkpoint_identity`](crate::Policy::checkpoint_identity): a LoRA policy's base-model fingerprint), checked on resume |
//!
//! The sampling generator needs no file: step `s` samples with
//! [`step_rng(seed, s)`](crate::rng::step_rng), and the seed is in the config.
//!
//! # Layout of a run directory and atomicity
//! [`Trainer::save`](crate::Trainer::save) writes into a *run directory*:
//!
//! ```text
//! runs/a/
//!   checkpoint-000000040/   (complete checkpoints, one per saved step)
//!   checkpoint-000000080/
//!   latest                  (the name of the newest complete checkpoint)
//! ```
//!
//! Every file is written into a temporary sibling directory (`.tmp-…`) and `fsync`ed, then the
//! directory is `fsync`ed and renamed into place, then `latest` is replaced the same way (write
//! a temporary file, `fsync`, rename, `fsync` the run directory). Only after that are old
//! checkpoints rotated away ([`CheckpointOptions::keep_last`]). A crash or a full disk at any
//! point leaves `latest` naming a complete checkpoint; leftovers (`.tmp-…`) are removed by the
//! next save.
//!
//! # Loading
//! [`Checkpoint::load`] reads every file, checks lengths and checksums against the manifest,
//! parses and validates everything, and only then returns; the trainer then checks every
//! tensor against the policy and optimizer before it changes any of them. Each failure is an
//! [`Error::Checkpoint`] naming the file and the [`CheckpointProblem`].
//!
//! # Where things are
//!
//! | file | what |
//! |---|---|
//! | `checkpoint/mod.rs` | [`Checkpoint`], loading and validating, serialization for [`Trainer::save`](crate::Trainer::save), the file names ([`files`]) |
//! | `checkpoint/manifest.rs` | `manifest.json` and `optimizer.json`: format versions, lengths, SHA-256, parsing and checks |
//! | `checkpoint/tensors.rs` | tensors to and from `.safetensors` bytes, through candle's safetensors support |
//! | `checkpoint/atomic.rs` | the run directory: temporary directory, `fsync`, rename, `latest`, rotation, leftovers |
//! | `checkpoint/fault.rs` | simulated I/O failures for tests (`fault-injection` feature only) |
//!
//! Tensors are written with `safetensors::serialize` over candle's `Tensor` (which implements
//! `safetensors::View`) and read with [`candle_core::safetensors::Load`]; the checkpoint adds
//! its own checks: tensor names, the nine dtypes format version 1 stores (f32, f64, f16,
//! bf16, u8, u32, i16, i32, i64; others are [`CheckpointProblem::UnsupportedDType`] when
//! saving and [`CheckpointProblem::Malformed`] when loading), and shapes against the policy.
//!
//! # Testing failures
//!
//! The `fault` module (simulated full disks and failed renames, to test that saves are
//! atomic) exists only with the `fault-injection` cargo feature, which is for testing and
//! off by default: a normal build's save path has no hook. This crate's own tests turn it on
//! through a dev-dependency on itself (`pgrpo = { path = ".", features = ["fault-injection"] }`),
//! which cargo applies only when it builds tests, examples or benches; see
//! docs/checkpoints.md.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};

use crate::error::CheckpointProblem;
use crate::optim::OptimizerSnapshot;
use crate::{Error, Result, RewardHistory, TrainerConfig};

mod atomic;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault;
mod manifest;
mod tensors;

pub use atomic::{dir_name, list, resolve};
pub use manifest::{sha256_hex, FORMAT_VERSION};

use manifest::{Manifest, OptimizerMeta};

/// File names inside a checkpoint directory.
pub mod files {
    /// The manifest.
    pub const MANIFEST: &str = "manifest.json";
    /// The trainer config.
    pub const CONFIG: &str = "config.json";
    /// The policy's weights.
    pub const MODEL: &str = "model.safetensors";
    /// The reference policy's weights.
    pub const REFERENCE: &str = "reference.safetensors";
    /// The optimizer's state tensors.
    pub const OPTIMIZER_TENSORS: &str = "optimizer.safetensors";
    /// The optimizer's kind, step count and tensor order.
    pub const OPTIMIZER_META: &str = "optimizer.json";
    /// The reward history.
    pub const HISTORY: &str = "history.json";
    /// The reward function's state.
    pub const REWARD_STATE: &str = "reward_state.json";
    /// What the policy's vars are relative to ([`Policy::checkpoint_identity`](crate::Policy::checkpoint_identity)).
    pub const POLICY: &str = "policy.json";
    /// In a run directory: the name of the newest complete checkpoint.
    pub const LATEST: &str = "latest";

    /// Every file a checkpoint directory may hold besides the manifest.
    pub const ALL: [&str; 8] = [
        CONFIG,
        MODEL,
        REFERENCE,
        OPTIMIZER_TENSORS,
        OPTIMIZER_META,
        HISTORY,
        REWARD_STATE,
        POLICY,
    ];
}

/// How [`Trainer::save_with`](crate::Trainer::save_with) manages a run directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Keep only the newest `n` checkpoints (`n ≥ 1`); `None` (default) keeps all.
    pub keep_last: Option<usize>,
}

/// A checkpoint read from disk (or memory), fully validated. Build a trainer from it with
/// [`Trainer::from_checkpoint`](crate::Trainer::from_checkpoint); the fields are public so
/// that a caller can inspect it, or change the config before resuming (e.g. a longer
/// `max_steps`).
#[derive(Debug)]
pub struct Checkpoint {
    /// Where it was read from (used in error messages).
    pub dir: PathBuf,
    /// Steps completed when it was saved.
    pub step: u64,
    /// The run's configuration.
    pub config: TrainerConfig,
    /// The reward history.
    pub history: RewardHistory,
    /// The policy's vars, in [`Policy::vars`](crate::Policy::vars) order.
    pub weights: Vec<Tensor>,
    /// The reference policy's vars (when the config has `objective.beta > 0`).
    pub reference: Option<Vec<Tensor>>,
    /// The optimizer's state; `None` when the optimizer could not export it.
    pub optimizer: Option<OptimizerSnapshot>,
    /// The reward function's state, if it had one.
    pub reward_state: Option<serde_json::Value>,
    /// What the policy's vars are relative to, if the policy said
    /// ([`Policy::checkpoint_identity`](crate::Policy::checkpoint_identity)).
    pub policy: Option<serde_json::Value>,
    fresh_optimizer: bool,
}

/// What a trainer hands to [`write`] (borrowed).
pub(crate) struct Parts<'a> {
    pub step: u64,
    pub config: &'a TrainerConfig,
    pub history: &'a RewardHistory,
    pub vars: &'a [Var],
    pub reference: Option<Vec<Var>>,
    pub optimizer: Option<OptimizerSnapshot>,
    pub reward_state: Option<serde_json::Value>,
    pub policy: Option<serde_json::Value>,
}

fn problem(path: impl Into<PathBuf>, problem: CheckpointProblem) -> Error {
    Error::Checkpoint {
        path: path.into(),
        problem,
    }
}

fn io_problem(path: impl Into<PathBuf>, e: io::Error) -> Error {
    let path = path.into();
    if e.kind() == io::ErrorKind::NotFound {
        problem(
            path,
            CheckpointProblem::Missing("no such file or directory"),
        )
    } else {
        problem(path, CheckpointProblem::Io(e))
    }
}

fn to_json(value: &impl serde::Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(Error::Json)
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Writes one checkpoint of `parts` into the run directory `root` (see the module docs) and
/// returns the checkpoint's directory. Everything is serialized before the disk is touched;
/// errors name the file as it would be in the finished checkpoint.
pub(crate) fn write(root: &Path, parts: Parts<'_>, opts: &CheckpointOptions) -> Result<PathBuf> {
    if opts.keep_last == Some(0) {
        return Err(Error::InvalidConfig {
            field: "keep_last",
            reason: "must be at least 1".into(),
        });
    }
    let name = dir_name(parts.step);
    let file = |f: &str| root.join(&name).join(f);
    let mut contents: Vec<(&'static str, Vec<u8>)> = vec![
        (files::CONFIG, to_json(parts.config)?),
        (files::HISTORY, parts.history.to_json()?.into_bytes()),
        (
            files::MODEL,
            tensors::encode_vars(parts.vars.iter().map(Var::as_tensor), &file(files::MODEL))?,
        ),
    ];
    if let Some(reference) = &parts.reference {
        let bytes = tensors::encode_vars(
            reference.iter().map(Var::as_tensor),
            &file(files::REFERENCE),
        )?;
        contents.push((files::REFERENCE, bytes));
    }
    if let Some(snap) = &parts.optimizer {
        let meta = OptimizerMeta::of(snap)?;
        contents.push((files::OPTIMIZER_META, meta.to_bytes()?));
        let named = snap.tensors.iter().map(|(n, t)| (n.clone(), t));
        let bytes = tensors::encode(named, &file(files::OPTIMIZER_TENSORS))?;
        contents.push((files::OPTIMIZER_TENSORS, bytes));
    }
    if let Some(state) = &parts.reward_state {
        contents.push((files::REWARD_STATE, to_json(state)?));
    }
    if let Some(identity) = &parts.policy {
        contents.push((files::POLICY, to_json(identity)?));
    }
    let manifest = Manifest::describe(parts.step, parts.optimizer.is_some(), &contents);
    atomic::commit(
        root,
        &name,
        &contents,
        &manifest.to_bytes()?,
        opts.keep_last,
    )
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Where a checkpoint's files come from.
trait Source {
    fn path(&self, name: &str) -> PathBuf;
    /// The file's bytes; `expect_len` lets a file source reject a wrong length before
    /// reading it.
    fn read(&self, name: &str, expect_len: Option<u64>) -> Result<Vec<u8>>;
}

struct DirSource(PathBuf);

impl Source for DirSource {
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn read(&self, name: &str, expect_len: Option<u64>) -> Result<Vec<u8>> {
        let p = self.path(name);
        if let Some(expected) = expect_len {
            let found = fs::metadata(&p).map_err(|e| io_problem(&p, e))?.len();
            if found != expected {
                return Err(problem(p, CheckpointProblem::Size { expected, found }));
            }
        }
        fs::read(&p).map_err(|e| io_problem(&p, e))
    }
}

struct MemSource<'a> {
    label: PathBuf,
    files: &'a BTreeMap<String, Vec<u8>>,
}

impl Source for MemSource<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.label.join(name)
    }

    fn read(&self, name: &str, _expect_len: Option<u64>) -> Result<Vec<u8>> {
        self.files.get(name).cloned().ok_or_else(|| {
            problem(
                self.path(name),
                CheckpointProblem::Missing("no such file in the checkpoint"),
            )
        })
    }
}

/// The files of one checkpoint, read and checked against its manifest.
struct Files<'a> {
    src: &'a dyn Source,
    data: BTreeMap<&'static str, Vec<u8>>,
}

impl Files<'_> {
    /// A file the checkpoint holds, if the manifest lists it.
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.data.get(name).map(Vec::as_slice)
    }

    /// A file the checkpoint must hold.
    fn require(&self, name: &str) -> Result<&[u8]> {
        self.get(name).ok_or_else(|| {
            problem(
                self.src.path(name),
                CheckpointProblem::Missing("the manifest does not list it"),
            )
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.src.path(name)
    }
}

impl Checkpoint {
    /// Reads and validates the checkpoint at `path` (a checkpoint directory, or a run
    /// directory whose `latest` names one), placing tensors on `device`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file and the problem: missing, truncated, checksum
    /// mismatch, newer format version, malformed, or invalid values. Nothing is returned
    /// unless every file is good.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = resolve(path.as_ref())?;
        Self::load_from(&DirSource(dir.clone()), dir, device)
    }

    /// Reads a checkpoint from in-memory files (`name → bytes`, with the names of a
    /// checkpoint directory), e.g. fetched from object storage. `label` stands for the
    /// directory in error messages.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn from_files(
        files: &BTreeMap<String, Vec<u8>>,
        label: impl Into<PathBuf>,
        device: &Device,
    ) -> Result<Self> {
        let label = label.into();
        Self::load_from(
            &MemSource {
                label: label.clone(),
                files,
            },
            label,
            device,
        )
    }

    /// Allows [`Trainer::from_checkpoint`](crate::Trainer::from_checkpoint) to resume a
    /// checkpoint that has no optimizer state (saved with an optimizer that cannot export it)
    /// with the optimizer as given, i.e. fresh moments. The resumed run is then **not**
    /// identical to an uninterrupted one.
    pub fn with_fresh_optimizer(mut self) -> Self {
        self.fresh_optimizer = true;
        self
    }

    /// Whether resuming this checkpoint continues the run exactly (it has the optimizer's
    /// state).
    pub fn is_exact(&self) -> bool {
        self.optimizer.is_some()
    }

    /// Whether [`with_fresh_optimizer`](Self::with_fresh_optimizer) was called.
    pub fn fresh_optimizer_allowed(&self) -> bool {
        self.fresh_optimizer
    }

    /// The path of one of its files (for messages).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Checks that the checkpoint's weights fit `vars` (count, dtype, shape).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] with [`CheckpointProblem::Mismatch`] naming the first var that
    /// does not fit.
    pub fn check_weights(&self, vars: &[Var]) -> Result<()> {
        check_vars(&self.weights, vars, &self.file(files::MODEL))?;
        // An empty reference belongs to a policy whose reference trains nothing (LoRA: the
        // base with adapters off); the trainer checks it against the policy's snapshot.
        if let Some(r) = self.reference.as_ref().filter(|r| !r.is_empty()) {
            check_vars(r, vars, &self.file(files::REFERENCE))?;
        }
        Ok(())
    }

    /// Reads everything, in this order: the manifest, every file it lists (name, length,
    /// checksum), the config, the history, the weights, the reference weights, the optimizer
    /// state, the reward state. The first problem found is the error.
    fn load_from(src: &dyn Source, dir: PathBuf, device: &Device) -> Result<Self> {
        let manifest_path = src.path(files::MANIFEST);
        let manifest = Manifest::parse(&src.read(files::MANIFEST, None)?, &manifest_path)?;
        let ck = Files {
            src,
            data: manifest.read_files(src, &manifest_path)?,
        };
        let config = load_config(&ck)?;
        let history = load_history(&ck, &config)?;
        let weights = load_weights(&ck, device)?;
        let reference = load_reference(&ck, &config, &weights, device)?;
        let optimizer = load_optimizer(&ck, device)?;
        if manifest.exact != optimizer.is_some() {
            return Err(problem(
                &manifest_path,
                CheckpointProblem::Invalid(format!(
                    "says exact = {} but {} optimizer state",
                    manifest.exact,
                    if optimizer.is_some() {
                        "holds"
                    } else {
                        "has no"
                    }
                )),
            ));
        }
        let json = |name: &'static str| -> Result<Option<serde_json::Value>> {
            match ck.get(name) {
                Some(bytes) => Ok(Some(serde_json::from_slice(bytes).map_err(|e| {
                    problem(ck.path(name), CheckpointProblem::Malformed(e.to_string()))
                })?)),
                None => Ok(None),
            }
        };
        let reward_state = json(files::REWARD_STATE)?;
        let policy = json(files::POLICY)?;
        Ok(Self {
            dir,
            step: manifest.step,
            config,
            history,
            weights,
            reference,
            optimizer,
            reward_state,
            policy,
            fresh_optimizer: false,
        })
    }
}

fn load_config(ck: &Files<'_>) -> Result<TrainerConfig> {
    let p = ck.path(files::CONFIG);
    let config: TrainerConfig = serde_json::from_slice(ck.require(files::CONFIG)?)
        .map_err(|e| problem(&p, CheckpointProblem::Malformed(e.to_string())))?;
    config
        .validate()
        .map_err(|e| problem(&p, CheckpointProblem::Invalid(e.to_string())))?;
    Ok(config)
}

fn load_history(ck: &Files<'_>, config: &TrainerConfig) -> Result<RewardHistory> {
    let p = ck.path(files::HISTORY);
    let text = std::str::from_utf8(ck.require(files::HISTORY)?)
        .map_err(|e| problem(&p, CheckpointProblem::Malformed(e.to_string())))?;
    let history = RewardHistory::from_json(text).map_err(|e| match e {
        Error::UnsupportedVersion {
            found, supported, ..
        } => problem(&p, CheckpointProblem::Version { found, supported }),
        Error::Json(e) => problem(&p, CheckpointProblem::Malformed(e.to_string())),
        e => problem(&p, CheckpointProblem::Invalid(e.to_string())),
    })?;
    if history.kind() != config.history {
        return Err(problem(
            &p,
            CheckpointProblem::Mismatch(format!(
                "history kind {:?} but the config says {:?}",
                history.kind(),
                config.history
            )),
        ));
    }
    Ok(history)
}

fn load_weights(ck: &Files<'_>, device: &Device) -> Result<Vec<Tensor>> {
    let p = ck.path(files::MODEL);
    let weights = tensors::decode_vars(ck.require(files::MODEL)?, &p, device)?;
    if weights.is_empty() {
        return Err(problem(
            &p,
            CheckpointProblem::Malformed("holds no tensor".into()),
        ));
    }
    Ok(weights)
}

/// The reference weights: present exactly when the config has `beta > 0`, and like the model's
/// (or empty, for a policy whose reference has no trainable weights).
fn load_reference(
    ck: &Files<'_>,
    config: &TrainerConfig,
    weights: &[Tensor],
    device: &Device,
) -> Result<Option<Vec<Tensor>>> {
    let p = ck.path(files::REFERENCE);
    match (ck.get(files::REFERENCE), config.objective.beta > 0.0) {
        (Some(bytes), true) => {
            let r = tensors::decode_vars(bytes, &p, device)?;
            // A reference with no trainable weights (a LoRA policy's: the frozen base with
            // the adapters off) holds no tensor; any other must be like the model's. The
            // trainer checks it against the policy's snapshot either way.
            if !r.is_empty() {
                check_like(&r, weights, &p, "the model's")?;
            }
            Ok(Some(r))
        }
        (None, false) => Ok(None),
        (None, true) => Err(problem(
            p,
            CheckpointProblem::Missing("the config has beta > 0 (a reference policy)"),
        )),
        (Some(_), false) => Err(problem(
            p,
            CheckpointProblem::Invalid(
                "present, but the config has beta = 0 (no reference policy)".into(),
            ),
        )),
    }
}

/// The optimizer state: both optimizer files or neither.
fn load_optimizer(ck: &Files<'_>, device: &Device) -> Result<Option<OptimizerSnapshot>> {
    match (
        ck.get(files::OPTIMIZER_META),
        ck.get(files::OPTIMIZER_TENSORS),
    ) {
        (Some(meta), Some(tensors)) => {
            let meta = OptimizerMeta::parse(meta, &ck.path(files::OPTIMIZER_META))?;
            let tp = ck.path(files::OPTIMIZER_TENSORS);
            let ts = tensors::decode(tensors, &meta.tensors, &tp, device)?;
            Ok(Some(OptimizerSnapshot {
                kind: meta.kind,
                step: meta.step,
                tensors: meta.tensors.into_iter().zip(ts).collect(),
                meta: meta.meta,
            }))
        }
        (None, None) => Ok(None),
        (m, _) => {
            let missing = if m.is_some() {
                files::OPTIMIZER_TENSORS
            } else {
                files::OPTIMIZER_META
            };
            Err(problem(
                ck.path(missing),
                CheckpointProblem::Missing("the other optimizer file is listed"),
            ))
        }
    }
}

fn check_like(a: &[Tensor], b: &[Tensor], path: &Path, what: &str) -> Result<()> {
    if a.len() != b.len() {
        return Err(problem(
            path,
            CheckpointProblem::Mismatch(format!("{} tensors, {what} has {}", a.len(), b.len())),
        ));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.dims() != y.dims() || x.dtype() != y.dtype() {
            return Err(problem(
                path,
                CheckpointProblem::Mismatch(format!(
                    "tensor `var.{i:05}` is {:?} {:?}, {what} is {:?} {:?}",
                    x.dtype(),
                    x.dims(),
                    y.dtype(),
                    y.dims()
                )),
            ));
        }
    }
    Ok(())
}

fn check_vars(ts: &[Tensor], vars: &[Var], path: &Path) -> Result<()> {
    if ts.len() != vars.len() {
        return Err(problem(
            path,
            CheckpointProblem::Mismatch(format!(
                "holds {} tensors, the policy has {} vars",
                ts.len(),
                vars.len()
            )),
        ));
    }
    for (i, (t, v)) in ts.iter().zip(vars).enumerate() {
        if t.dims() != v.dims() || t.dtype() != v.dtype() {
            return Err(problem(
                path,
                CheckpointProblem::Mismatch(format!(
                    "tensor `var.{i:05}` is {:?} {:?}, the policy's var {i} is {:?} {:?}",
                    t.dtype(),
                    t.dims(),
                    v.dtype(),
                    v.dims()
                )),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HistoryKind;
    use candle_core::DType;

    /// A tensor of a dtype the format does not store: a typed error naming the file the
    /// tensor was meant for and the tensor, and nothing on disk.
    #[test]
    fn saving_an_unstored_dtype_names_the_file_and_the_tensor() {
        let dev = Device::Cpu;
        let ok = Var::from_tensor(&Tensor::zeros(3, DType::F32, &dev).unwrap()).unwrap();
        let f8 = Tensor::ones(2, DType::F32, &dev)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let bad = Var::from_tensor(&f8).unwrap();
        let root =
            std::env::temp_dir().join(format!("pgrpo-unstored-dtype-{}", std::process::id()));
        let config = TrainerConfig::default();
        let history = RewardHistory::new(HistoryKind::Cumulative).unwrap();
        let parts = Parts {
            step: 7,
            config: &config,
            history: &history,
            vars: &[ok, bad],
            reference: None,
            optimizer: None,
            reward_state: None,
            policy: None,
        };
        let err = write(&root, parts, &CheckpointOptions::default()).unwrap_err();
        let Error::Checkpoint { path, problem } = &err else {
            panic!("{err}")
        };
        assert_eq!(path, &root.join("checkpoint-000000007").join(files::MODEL));
        assert!(
            matches!(problem, CheckpointProblem::UnsupportedDType { tensor, dtype: DType::F8E4M3 } if tensor == "var.00001"),
            "{problem}"
        );
        assert!(!root.exists(), "something was written");
    }
}
