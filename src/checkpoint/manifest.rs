//! The two small JSON documents that describe a checkpoint: the manifest (`manifest.json`:
//! format name and version, step, exactness, and the length and SHA-256 of every other file)
//! and the optimizer metadata (`optimizer.json`). Building them, parsing them, and checking
//! the files against the manifest.
//!
//! The struct fields are serialized in declaration order: that order is part of the bytes a
//! checkpoint is made of (a re-save of the same state gives the same file), so keep it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{files, problem, Source};
use crate::error::CheckpointProblem;
use crate::optim::OptimizerSnapshot;
use crate::{Error, Result};

/// The newest checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "pgrpo.checkpoint";
const OPTIMIZER_FORMAT: &str = "pgrpo.optimizer_state";

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `manifest.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    format: String,
    version: u32,
    /// Steps completed when the checkpoint was written.
    pub step: u64,
    created_by: String,
    /// False when the optimizer state is missing.
    pub exact: bool,
    files: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

impl Manifest {
    /// The manifest of a checkpoint of `step` made of `contents` (file name, bytes).
    pub fn describe(step: u64, exact: bool, contents: &[(&str, Vec<u8>)]) -> Self {
        Self {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            step,
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
        }
    }

    /// The file's bytes (pretty JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(Error::Json)
    }

    /// Parses `manifest.json` (read from `path`, for messages).
    ///
    /// The format name and version are read first, so that a manifest from a newer format is
    /// reported as [`CheckpointProblem::Version`] even when its fields changed.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let malformed = |m: String| problem(path, CheckpointProblem::Malformed(m));
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
        check_version(version, path)?;
        let m: Self = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
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

    /// Reads every file the manifest lists from `src`: each must be a known checkpoint file
    /// (no other path), listed once, of the listed length and SHA-256. `path` is the
    /// manifest's (for messages).
    pub fn read_files(
        &self,
        src: &dyn Source,
        path: &Path,
    ) -> Result<BTreeMap<&'static str, Vec<u8>>> {
        let mut data = BTreeMap::new();
        for entry in &self.files {
            let Some(name) = files::ALL.iter().copied().find(|k| *k == entry.name) else {
                return Err(problem(
                    path,
                    CheckpointProblem::Malformed(format!("lists an unknown file {:?}", entry.name)),
                ));
            };
            if data.contains_key(name) {
                return Err(problem(
                    path,
                    CheckpointProblem::Malformed(format!("lists {name} twice")),
                ));
            }
            let bytes = src.read(name, Some(entry.bytes))?;
            entry.check(&bytes, &src.path(name))?;
            data.insert(name, bytes);
        }
        Ok(data)
    }
}

impl FileEntry {
    /// Checks `bytes` (read from `path`) against the entry's length and checksum.
    fn check(&self, bytes: &[u8], path: &Path) -> Result<()> {
        let found = bytes.len() as u64;
        if found != self.bytes {
            return Err(problem(
                path,
                CheckpointProblem::Size {
                    expected: self.bytes,
                    found,
                },
            ));
        }
        let found = sha256_hex(bytes);
        if !found.eq_ignore_ascii_case(&self.sha256) {
            return Err(problem(
                path,
                CheckpointProblem::Checksum {
                    expected: self.sha256.clone(),
                    found,
                },
            ));
        }
        Ok(())
    }
}

/// A version this build reads: `1..=FORMAT_VERSION`.
fn check_version(version: u64, path: &Path) -> Result<()> {
    if version == 0 || version > u64::from(FORMAT_VERSION) {
        return Err(problem(
            path,
            CheckpointProblem::Version {
                found: u32::try_from(version).unwrap_or(u32::MAX),
                supported: FORMAT_VERSION,
            },
        ));
    }
    Ok(())
}

/// `optimizer.json`: what [`OptimizerSnapshot`] holds besides its tensors, and the order of
/// the tensors in `optimizer.safetensors`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OptimizerMeta {
    format: String,
    version: u32,
    pub kind: String,
    pub step: u64,
    pub tensors: Vec<String>,
    pub meta: serde_json::Value,
}

impl OptimizerMeta {
    /// The metadata of `snap`.
    ///
    /// # Errors
    /// [`Error::OptimizerState`] when two of its tensors have the same name.
    pub fn of(snap: &OptimizerSnapshot) -> Result<Self> {
        let meta = Self {
            format: OPTIMIZER_FORMAT.to_owned(),
            version: FORMAT_VERSION,
            kind: snap.kind.clone(),
            step: snap.step,
            tensors: snap.tensors.iter().map(|(n, _)| n.clone()).collect(),
            meta: snap.meta.clone(),
        };
        if !all_distinct(&meta.tensors) {
            return Err(Error::OptimizerState(format!(
                "the {:?} state names two tensors alike",
                snap.kind
            )));
        }
        Ok(meta)
    }

    /// The file's bytes (pretty JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(Error::Json)
    }

    /// Parses `optimizer.json` (read from `path`, for messages).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let malformed = |m: String| problem(path, CheckpointProblem::Malformed(m));
        let meta: Self = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if meta.format != OPTIMIZER_FORMAT {
            return Err(malformed(format!(
                "format is {:?}, expected {OPTIMIZER_FORMAT:?}",
                meta.format
            )));
        }
        check_version(u64::from(meta.version), path)?;
        if !all_distinct(&meta.tensors) {
            return Err(malformed("names a tensor twice".into()));
        }
        Ok(meta)
    }
}

fn all_distinct(names: &[String]) -> bool {
    names.iter().collect::<BTreeSet<_>>().len() == names.len()
}
