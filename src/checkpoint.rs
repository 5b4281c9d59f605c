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
//!
//! The sampling generator needs no file: step `s` samples with
//! [`step_rng(seed, s)`](crate::step_rng), and the seed is in the config.
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

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use safetensors::tensor as st;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::CheckpointProblem;
use crate::optim::OptimizerSnapshot;
use crate::{Error, Result, RewardHistory, TrainerConfig};

/// The newest checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "pgrpo.checkpoint";
const OPTIMIZER_FORMAT: &str = "pgrpo.optimizer_state";

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
    /// In a run directory: the name of the newest complete checkpoint.
    pub const LATEST: &str = "latest";

    /// Every file a checkpoint directory may hold besides the manifest.
    pub const ALL: [&str; 7] = [
        CONFIG,
        MODEL,
        REFERENCE,
        OPTIMIZER_TENSORS,
        OPTIMIZER_META,
        HISTORY,
        REWARD_STATE,
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
    fresh_optimizer: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: String,
    version: u32,
    step: u64,
    created_by: String,
    /// False when the optimizer state is missing.
    exact: bool,
    files: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimizerMeta {
    format: String,
    version: u32,
    kind: String,
    step: u64,
    tensors: Vec<String>,
    meta: serde_json::Value,
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

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Name of the checkpoint directory of `step` in a run directory.
pub fn dir_name(step: u64) -> String {
    format!("checkpoint-{step:09}")
}

fn step_of_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Tensors <-> safetensors bytes

struct RawTensor {
    dtype: st::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl st::View for &RawTensor {
    fn dtype(&self) -> st::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn le_bytes<T: candle_core::WithDType, const N: usize>(
    t: &Tensor,
    f: impl Fn(T) -> [u8; N],
) -> Result<Vec<u8>> {
    let v = t.flatten_all()?.to_vec1::<T>()?;
    let mut out = Vec::with_capacity(v.len() * N);
    for x in v {
        out.extend_from_slice(&f(x));
    }
    Ok(out)
}

fn raw_tensor(t: &Tensor) -> Result<RawTensor> {
    let (dtype, data) = match t.dtype() {
        DType::F32 => (st::Dtype::F32, le_bytes(t, f32::to_le_bytes)?),
        DType::F64 => (st::Dtype::F64, le_bytes(t, f64::to_le_bytes)?),
        DType::F16 => (st::Dtype::F16, le_bytes(t, half::f16::to_le_bytes)?),
        DType::BF16 => (st::Dtype::BF16, le_bytes(t, half::bf16::to_le_bytes)?),
        DType::U8 => (st::Dtype::U8, le_bytes(t, u8::to_le_bytes)?),
        DType::U32 => (st::Dtype::U32, le_bytes(t, u32::to_le_bytes)?),
        DType::I16 => (st::Dtype::I16, le_bytes(t, i16::to_le_bytes)?),
        DType::I32 => (st::Dtype::I32, le_bytes(t, i32::to_le_bytes)?),
        DType::I64 => (st::Dtype::I64, le_bytes(t, i64::to_le_bytes)?),
        other => {
            return Err(Error::UnsupportedModel(format!(
                "checkpoints store f32/f64/f16/bf16/u8/u32/i16/i32/i64 tensors, not {other:?}"
            )))
        }
    };
    Ok(RawTensor {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

fn candle_dtype(d: st::Dtype) -> Option<DType> {
    Some(match d {
        st::Dtype::F32 => DType::F32,
        st::Dtype::F64 => DType::F64,
        st::Dtype::F16 => DType::F16,
        st::Dtype::BF16 => DType::BF16,
        st::Dtype::U8 => DType::U8,
        st::Dtype::U32 => DType::U32,
        st::Dtype::I16 => DType::I16,
        st::Dtype::I32 => DType::I32,
        st::Dtype::I64 => DType::I64,
        _ => return None,
    })
}

fn encode_tensors(named: &[(String, &Tensor)]) -> Result<Vec<u8>> {
    let raws = named
        .iter()
        .map(|(n, t)| Ok((n.clone(), raw_tensor(t)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), None)
        .map_err(|e| Error::UnsupportedModel(format!("safetensors: {e}")))
}

/// Decodes exactly the tensors `names` (in that order) from safetensors `bytes`; any other
/// tensor in the file is an error.
fn decode_tensors(
    bytes: &[u8],
    names: &[String],
    path: &Path,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let malformed = |m: String| problem(path, CheckpointProblem::Malformed(m));
    let sts = st::SafeTensors::deserialize(bytes).map_err(|e| malformed(e.to_string()))?;
    if sts.len() != names.len() {
        return Err(malformed(format!(
            "holds {} tensors, expected {}",
            sts.len(),
            names.len()
        )));
    }
    names
        .iter()
        .map(|name| {
            let view = sts
                .tensor(name)
                .map_err(|_| malformed(format!("no tensor `{name}`")))?;
            let dtype = candle_dtype(view.dtype()).ok_or_else(|| {
                malformed(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    view.dtype()
                ))
            })?;
            Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
                .map_err(|e| malformed(format!("tensor `{name}`: {e}")))
        })
        .collect()
}

fn var_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("var.{i:05}")).collect()
}

/// Names of the tensors in a safetensors file whose names are `var.NNNNN`: checks that they
/// are exactly `var.00000 .. var.{n-1}`.
fn model_names(bytes: &[u8], path: &Path) -> Result<Vec<String>> {
    let sts = st::SafeTensors::deserialize(bytes)
        .map_err(|e| problem(path, CheckpointProblem::Malformed(e.to_string())))?;
    let want = var_names(sts.len());
    let have: BTreeSet<&str> = sts.names().into_iter().collect();
    if let Some(bad) = have.iter().find(|n| !want.iter().any(|w| w == *n)) {
        return Err(problem(
            path,
            CheckpointProblem::Malformed(format!(
                "unexpected tensor `{bad}` (expected var.00000 .. var.{:05})",
                want.len().saturating_sub(1)
            )),
        ));
    }
    Ok(want)
}

// ---------------------------------------------------------------------------------------------
// Fault injection (tests only)

/// Simulated failures for tests of atomic saving (hidden from the docs).
///
/// Every file write, rename, directory sync and removal during a save is an *operation*.
/// `fail_at(n, crash)` makes operation number `n` (0-based) of this thread's next saves fail: a file
/// write writes half its bytes and then reports a full disk. With `crash = true` the save
/// also skips its clean-up, as a process killed at that point would.
#[doc(hidden)]
pub mod fault {
    use std::cell::Cell;
    use std::io;

    thread_local! {
        static PLAN: Cell<Option<(u64, bool)>> = const { Cell::new(None) };
        static COUNT: Cell<u64> = const { Cell::new(0) };
        static FIRED: Cell<bool> = const { Cell::new(false) };
    }

    /// Makes operation `n` fail (see the module docs).
    pub fn fail_at(n: u64, crash: bool) {
        PLAN.with(|p| p.set(Some((n, crash))));
        COUNT.with(|c| c.set(0));
        FIRED.with(|f| f.set(false));
    }

    /// Stops injecting failures.
    pub fn clear() {
        PLAN.with(|p| p.set(None));
        FIRED.with(|f| f.set(false));
    }

    /// Whether an injected failure fired since the last [`fail_at`].
    pub fn fired() -> bool {
        FIRED.with(|f| f.get())
    }

    /// Counts one operation; `Err` if it is the one planned to fail.
    pub(crate) fn op() -> io::Result<()> {
        let Some((n, _)) = PLAN.with(|p| p.get()) else {
            return Ok(());
        };
        let i = COUNT.with(|c| {
            let i = c.get();
            c.set(i + 1);
            i
        });
        if i == n {
            FIRED.with(|f| f.set(true));
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "injected failure: no space left on device",
            ));
        }
        Ok(())
    }

    /// Whether the planned failure fired and is a crash (no clean-up).
    pub(crate) fn crashed() -> bool {
        fired() && PLAN.with(|p| p.get()).is_some_and(|(_, c)| c)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::File::create(path)?;
    if let Err(e) = fault::op() {
        // A full disk part-way through the file.
        f.write_all(&bytes[..bytes.len() / 2])?;
        return Err(e);
    }
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(path: &Path) -> io::Result<()> {
    fault::op()?;
    fs::File::open(path)?.sync_all()
}

fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fault::op()?;
    fs::rename(from, to)
}

fn remove_dir(path: &Path) -> io::Result<()> {
    fault::op()?;
    fs::remove_dir_all(path)
}

/// Writes one checkpoint of `parts` into the run directory `root` (see the module docs) and
/// returns the checkpoint's directory.
pub(crate) fn write(root: &Path, parts: Parts<'_>, opts: &CheckpointOptions) -> Result<PathBuf> {
    if opts.keep_last == Some(0) {
        return Err(Error::InvalidConfig {
            field: "keep_last",
            reason: "must be at least 1".into(),
        });
    }
    // Serialize everything before touching the disk.
    let mut contents: Vec<(&'static str, Vec<u8>)> = Vec::new();
    contents.push((
        files::CONFIG,
        serde_json::to_vec_pretty(parts.config).map_err(Error::Json)?,
    ));
    contents.push((files::HISTORY, parts.history.to_json()?.into_bytes()));
    let names = var_names(parts.vars.len());
    let named: Vec<(String, &Tensor)> = names
        .iter()
        .cloned()
        .zip(parts.vars.iter().map(|v| v.as_tensor()))
        .collect();
    contents.push((files::MODEL, encode_tensors(&named)?));
    if let Some(reference) = &parts.reference {
        let named: Vec<(String, &Tensor)> = var_names(reference.len())
            .into_iter()
            .zip(reference.iter().map(|v| v.as_tensor()))
            .collect();
        contents.push((files::REFERENCE, encode_tensors(&named)?));
    }
    let exact = parts.optimizer.is_some();
    if let Some(snap) = &parts.optimizer {
        let meta = OptimizerMeta {
            format: OPTIMIZER_FORMAT.to_owned(),
            version: FORMAT_VERSION,
            kind: snap.kind.clone(),
            step: snap.step,
            tensors: snap.tensors.iter().map(|(n, _)| n.clone()).collect(),
            meta: snap.meta.clone(),
        };
        let distinct: BTreeSet<&String> = meta.tensors.iter().collect();
        if distinct.len() != meta.tensors.len() {
            return Err(Error::OptimizerState(format!(
                "the {:?} state names two tensors alike",
                snap.kind
            )));
        }
        contents.push((
            files::OPTIMIZER_META,
            serde_json::to_vec_pretty(&meta).map_err(Error::Json)?,
        ));
        let named: Vec<(String, &Tensor)> =
            snap.tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        contents.push((files::OPTIMIZER_TENSORS, encode_tensors(&named)?));
    }
    if let Some(state) = &parts.reward_state {
        contents.push((
            files::REWARD_STATE,
            serde_json::to_vec_pretty(state).map_err(Error::Json)?,
        ));
    }
    let manifest = Manifest {
        format: FORMAT_NAME.to_owned(),
        version: FORMAT_VERSION,
        step: parts.step,
        created_by: format!("pgrpo {}", env!("CARGO_PKG_VERSION")),
        exact,
        files: contents
            .iter()
            .map(|(name, bytes)| FileEntry {
                name: (*name).to_owned(),
                bytes: bytes.len() as u64,
                sha256: sha256_hex(bytes),
            })
            .collect(),
    };
    let manifest = serde_json::to_vec_pretty(&manifest).map_err(Error::Json)?;

    fs::create_dir_all(root).map_err(|e| io_problem(root, e))?;
    remove_leftovers(root);
    let name = dir_name(parts.step);
    let tmp = root.join(format!(
        ".tmp-{name}-{}-{}",
        std::process::id(),
        unique_suffix()
    ));
    let result = write_dir(&tmp, &contents, &manifest)
        .and_then(|()| install(root, &tmp, &name))
        .and_then(|final_dir| {
            rotate(root, &name, opts.keep_last)?;
            Ok(final_dir)
        });
    if result.is_err() && !fault::crashed() {
        let _ = fs::remove_dir_all(&tmp);
        remove_leftovers(root);
    }
    result
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Removes temporary directories and files a crashed save left behind.
fn remove_leftovers(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(".tmp-") {
            let p = e.path();
            if p.is_dir() {
                let _ = fs::remove_dir_all(&p);
            } else {
                let _ = fs::remove_file(&p);
            }
        } else if let Some(orig) = name.strip_prefix(".replaced-") {
            // Only once the checkpoint it was replaced by is complete.
            if root.join(orig).join(files::MANIFEST).is_file() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn write_dir(tmp: &Path, contents: &[(&str, Vec<u8>)], manifest: &[u8]) -> Result<()> {
    fs::create_dir(tmp).map_err(|e| io_problem(tmp, e))?;
    for (name, bytes) in contents {
        let p = tmp.join(name);
        write_synced(&p, bytes).map_err(|e| io_problem(&p, e))?;
    }
    // The manifest last: a directory with a manifest is complete.
    let p = tmp.join(files::MANIFEST);
    write_synced(&p, manifest).map_err(|e| io_problem(&p, e))?;
    sync_dir(tmp).map_err(|e| io_problem(tmp, e))
}

/// Renames the complete `tmp` to `root/name` and points `latest` at it.
fn install(root: &Path, tmp: &Path, name: &str) -> Result<PathBuf> {
    let final_dir = root.join(name);
    let replaced = root.join(format!(".replaced-{name}"));
    let had_old = final_dir.exists();
    if had_old {
        // Re-saving a step: keep the old copy aside until the new one is in place.
        if replaced.exists() {
            remove_dir(&replaced).map_err(|e| io_problem(&replaced, e))?;
        }
        rename(&final_dir, &replaced).map_err(|e| io_problem(&final_dir, e))?;
    }
    rename(tmp, &final_dir).map_err(|e| io_problem(&final_dir, e))?;
    sync_dir(root).map_err(|e| io_problem(root, e))?;
    let latest_tmp = root.join(format!(".tmp-latest-{}", std::process::id()));
    let latest = root.join(files::LATEST);
    write_synced(&latest_tmp, format!("{name}\n").as_bytes())
        .map_err(|e| io_problem(&latest_tmp, e))?;
    rename(&latest_tmp, &latest).map_err(|e| io_problem(&latest, e))?;
    sync_dir(root).map_err(|e| io_problem(root, e))?;
    if had_old {
        remove_dir(&replaced).map_err(|e| io_problem(&replaced, e))?;
    }
    Ok(final_dir)
}

/// Checkpoint directories of a run directory, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).map_err(|e| io_problem(root, e))? {
        let e = e.map_err(|e| io_problem(root, e))?;
        if let Some(step) = e.file_name().to_str().and_then(step_of_dir_name) {
            if e.path().is_dir() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn rotate(root: &Path, newest: &str, keep_last: Option<usize>) -> Result<()> {
    let Some(keep) = keep_last else {
        return Ok(());
    };
    let all = list(root)?;
    let excess = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(excess) {
        if p.file_name().and_then(|n| n.to_str()) == Some(newest) {
            continue;
        }
        remove_dir(&p).map_err(|e| io_problem(&p, e))?;
    }
    sync_dir(root).map_err(|e| io_problem(root, e))
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

/// Finds the checkpoint directory `path` stands for: a checkpoint directory itself (it has a
/// `manifest.json`), or a run directory whose `latest` names one.
///
/// # Errors
/// [`Error::Checkpoint`] when neither is found or `latest` is damaged.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(files::MANIFEST).is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(files::LATEST);
    if !latest.is_file() {
        if !path.is_dir() {
            return Err(problem(
                path,
                CheckpointProblem::Missing("no checkpoint or run directory"),
            ));
        }
        return Err(problem(
            path.join(files::MANIFEST),
            CheckpointProblem::Missing(
                "neither a checkpoint (manifest.json) nor a run directory (latest)",
            ),
        ));
    }
    let text = fs::read(&latest).map_err(|e| io_problem(&latest, e))?;
    let name = std::str::from_utf8(&text)
        .ok()
        .map(str::trim)
        .filter(|n| step_of_dir_name(n).is_some())
        .ok_or_else(|| {
            problem(
                &latest,
                CheckpointProblem::Malformed("does not name a checkpoint-NNN directory".into()),
            )
        })?;
    let dir = path.join(name);
    if dir.join(files::MANIFEST).is_file() {
        return Ok(dir);
    }
    // A crash while re-saving the same step leaves the previous copy aside.
    let replaced = path.join(format!(".replaced-{name}"));
    if replaced.join(files::MANIFEST).is_file() {
        return Ok(replaced);
    }
    Err(problem(
        dir,
        CheckpointProblem::Missing("`latest` names it but it has no manifest.json"),
    ))
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

    fn load_from(src: &dyn Source, dir: PathBuf, device: &Device) -> Result<Self> {
        let manifest_path = src.path(files::MANIFEST);
        let bytes = src.read(files::MANIFEST, None)?;
        let manifest = parse_manifest(&bytes, &manifest_path)?;

        // Every listed file: known name, listed once, right length and checksum.
        let mut data: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for entry in &manifest.files {
            let Some(name) = files::ALL.iter().find(|k| **k == entry.name) else {
                return Err(problem(
                    &manifest_path,
                    CheckpointProblem::Malformed(format!("lists an unknown file {:?}", entry.name)),
                ));
            };
            if data.contains_key(name) {
                return Err(problem(
                    &manifest_path,
                    CheckpointProblem::Malformed(format!("lists {name} twice")),
                ));
            }
            let p = src.path(name);
            let bytes = src.read(name, Some(entry.bytes))?;
            if bytes.len() as u64 != entry.bytes {
                return Err(problem(
                    p,
                    CheckpointProblem::Size {
                        expected: entry.bytes,
                        found: bytes.len() as u64,
                    },
                ));
            }
            let found = sha256_hex(&bytes);
            if !found.eq_ignore_ascii_case(&entry.sha256) {
                return Err(problem(
                    p,
                    CheckpointProblem::Checksum {
                        expected: entry.sha256.clone(),
                        found,
                    },
                ));
            }
            data.insert(name, bytes);
        }
        let take = |name: &'static str| -> Result<&Vec<u8>> {
            data.get(name).ok_or_else(|| {
                problem(
                    src.path(name),
                    CheckpointProblem::Missing("the manifest does not list it"),
                )
            })
        };

        // Config.
        let p = src.path(files::CONFIG);
        let config: TrainerConfig = serde_json::from_slice(take(files::CONFIG)?)
            .map_err(|e| problem(&p, CheckpointProblem::Malformed(e.to_string())))?;
        config
            .validate()
            .map_err(|e| problem(&p, CheckpointProblem::Invalid(e.to_string())))?;

        // History.
        let p = src.path(files::HISTORY);
        let text = std::str::from_utf8(take(files::HISTORY)?)
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

        // Weights.
        let p = src.path(files::MODEL);
        let bytes = take(files::MODEL)?;
        let names = model_names(bytes, &p)?;
        if names.is_empty() {
            return Err(problem(
                &p,
                CheckpointProblem::Malformed("holds no tensor".into()),
            ));
        }
        let weights = decode_tensors(bytes, &names, &p, device)?;
        let reference = match (data.get(files::REFERENCE), config.objective.beta > 0.0) {
            (Some(bytes), true) => {
                let p = src.path(files::REFERENCE);
                let names = model_names(bytes, &p)?;
                let r = decode_tensors(bytes, &names, &p, device)?;
                check_like(&r, &weights, &p, "the model's")?;
                Some(r)
            }
            (None, false) => None,
            (None, true) => {
                return Err(problem(
                    src.path(files::REFERENCE),
                    CheckpointProblem::Missing("the config has beta > 0 (a reference policy)"),
                ))
            }
            (Some(_), false) => {
                return Err(problem(
                    src.path(files::REFERENCE),
                    CheckpointProblem::Invalid(
                        "present, but the config has beta = 0 (no reference policy)".into(),
                    ),
                ))
            }
        };

        // Optimizer.
        let optimizer = match (
            data.get(files::OPTIMIZER_META),
            data.get(files::OPTIMIZER_TENSORS),
        ) {
            (Some(meta), Some(tensors)) => {
                let mp = src.path(files::OPTIMIZER_META);
                let meta = parse_optimizer_meta(meta, &mp)?;
                let tp = src.path(files::OPTIMIZER_TENSORS);
                let ts = decode_tensors(tensors, &meta.tensors, &tp, device)?;
                Some(OptimizerSnapshot {
                    kind: meta.kind,
                    step: meta.step,
                    tensors: meta.tensors.into_iter().zip(ts).collect(),
                    meta: meta.meta,
                })
            }
            (None, None) => None,
            (m, _) => {
                let missing = if m.is_some() {
                    files::OPTIMIZER_TENSORS
                } else {
                    files::OPTIMIZER_META
                };
                return Err(problem(
                    src.path(missing),
                    CheckpointProblem::Missing("the other optimizer file is listed"),
                ));
            }
        };
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

        // Reward state.
        let reward_state = match data.get(files::REWARD_STATE) {
            Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|e| {
                problem(
                    src.path(files::REWARD_STATE),
                    CheckpointProblem::Malformed(e.to_string()),
                )
            })?),
            None => None,
        };

        Ok(Self {
            dir,
            step: manifest.step,
            config,
            history,
            weights,
            reference,
            optimizer,
            reward_state,
            fresh_optimizer: false,
        })
    }

    /// Checks that the checkpoint's weights fit `vars` (count, dtype, shape).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] with [`CheckpointProblem::Mismatch`] naming the first var that
    /// does not fit.
    pub fn check_weights(&self, vars: &[Var]) -> Result<()> {
        check_vars(&self.weights, vars, &self.file(files::MODEL))?;
        if let Some(r) = &self.reference {
            check_vars(r, vars, &self.file(files::REFERENCE))?;
        }
        Ok(())
    }
}

fn parse_manifest(bytes: &[u8], path: &Path) -> Result<Manifest> {
    let malformed = |m: String| problem(path, CheckpointProblem::Malformed(m));
    // Format and version first, so that a newer manifest is reported as such even when its
    // fields changed.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let format = value.get("format").and_then(|f| f.as_str());
    if format != Some(FORMAT_NAME) {
        return Err(malformed(format!(
            "format is {format:?}, expected {FORMAT_NAME:?}"
        )));
    }
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| malformed("no integer `version`".into()))?;
    if version > FORMAT_VERSION as u64 || version == 0 {
        return Err(problem(
            path,
            CheckpointProblem::Version {
                found: u32::try_from(version).unwrap_or(u32::MAX),
                supported: FORMAT_VERSION,
            },
        ));
    }
    let m: Manifest = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
    for f in &m.files {
        if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed(format!(
                "{}: sha256 must be 64 hex digits",
                f.name
            )));
        }
    }
    Ok(m)
}

fn parse_optimizer_meta(bytes: &[u8], path: &Path) -> Result<OptimizerMeta> {
    let malformed = |m: String| problem(path, CheckpointProblem::Malformed(m));
    let meta: OptimizerMeta =
        serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    if meta.format != OPTIMIZER_FORMAT {
        return Err(malformed(format!(
            "format is {:?}, expected {OPTIMIZER_FORMAT:?}",
            meta.format
        )));
    }
    if meta.version > FORMAT_VERSION || meta.version == 0 {
        return Err(problem(
            path,
            CheckpointProblem::Version {
                found: meta.version,
                supported: FORMAT_VERSION,
            },
        ));
    }
    let distinct: BTreeSet<&String> = meta.tensors.iter().collect();
    if distinct.len() != meta.tensors.len() {
        return Err(malformed("names a tensor twice".into()));
    }
    Ok(meta)
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
