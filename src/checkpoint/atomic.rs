//! The run directory: writing a checkpoint atomically, pointing `latest` at it, rotating old
//! checkpoints, removing what a crashed save left behind, and finding the checkpoint a path
//! stands for.
//!
//! A save writes every file into a temporary sibling directory (`.tmp-…`) and `fsync`s it,
//! `fsync`s the directory and renames it into place, then replaces `latest` the same way
//! (temporary file, `fsync`, rename, `fsync` of the run directory); only then are old
//! checkpoints rotated away. Re-saving a step moves the old copy aside (`.replaced-…`) until
//! the new one is in place. Whatever fails, `latest` names a complete checkpoint.
//!
//! Every file write, rename, directory sync and removal goes through one of the four
//! functions below, which are the points where `super::fault` can make a save fail
//! (in tests only: without the `fault-injection` feature they are plain `std::fs` calls).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{files, io_problem, problem};
use crate::error::CheckpointProblem;
use crate::Result;

#[cfg(any(test, feature = "fault-injection"))]
use super::fault::{crashed, point as fault_point};

/// Without fault injection: never fails.
#[cfg(not(any(test, feature = "fault-injection")))]
#[inline(always)]
fn fault_point() -> io::Result<()> {
    Ok(())
}

/// Without fault injection: no save ever "crashes".
#[cfg(not(any(test, feature = "fault-injection")))]
#[inline(always)]
fn crashed() -> bool {
    false
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

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::File::create(path)?;
    if let Err(e) = fault_point() {
        // A full disk part-way through the file.
        f.write_all(&bytes[..bytes.len() / 2])?;
        return Err(e);
    }
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(path: &Path) -> io::Result<()> {
    fault_point()?;
    fs::File::open(path)?.sync_all()
}

fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fault_point()?;
    fs::rename(from, to)
}

fn remove_dir(path: &Path) -> io::Result<()> {
    fault_point()?;
    fs::remove_dir_all(path)
}

/// Writes the checkpoint directory `root/name` holding `contents` (file name, bytes) and the
/// `manifest`, points `latest` at it, keeps only the newest `keep_last` checkpoints, and
/// returns its path. On failure, removes what it wrote (unless a test simulates a crash).
pub(super) fn commit(
    root: &Path,
    name: &str,
    contents: &[(&str, Vec<u8>)],
    manifest: &[u8],
    keep_last: Option<usize>,
) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(|e| io_problem(root, e))?;
    remove_leftovers(root);
    let tmp = root.join(format!(
        ".tmp-{name}-{}-{}",
        std::process::id(),
        unique_suffix()
    ));
    let result = write_dir(&tmp, contents, manifest)
        .and_then(|()| install(root, &tmp, name))
        .and_then(|final_dir| {
            rotate(root, name, keep_last)?;
            Ok(final_dir)
        });
    if result.is_err() && !crashed() {
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
///
/// # Errors
/// [`Error::Checkpoint`](crate::Error::Checkpoint) when the directory cannot be read.
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

/// Finds the checkpoint directory `path` stands for: a checkpoint directory itself (it has a
/// `manifest.json`), or a run directory whose `latest` names one.
///
/// # Errors
/// [`Error::Checkpoint`](crate::Error::Checkpoint) when neither is found or `latest` is
/// damaged.
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
