//! Atomic file writes: write a temporary sibling, flush it to disk, rename it over the target.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A temporary path next to `path` (same directory, so the rename stays on one filesystem).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: readers see the old file or the new one, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })
}

/// Runs `write` on a temporary sibling of `path`, then renames it over `path`; the temporary
/// file is removed if `write` fails.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = temp_sibling(path);
    let res = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("cannot move the written file into place: {e}"),
        })
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
