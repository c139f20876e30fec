//! Whole-file writes that a crash or a second process cannot tear: the bytes go into a uniquely
//! named temporary file in the destination's folder (so two writers never share one), which is
//! fsynced and then renamed over the destination; the folder is fsynced so the rename survives a
//! crash. A reader sees the old file or the new one, never half of either.
use anyhow::{anyhow, Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use tempfile::NamedTempFile;

/// fsyncs a directory (makes renames and new entries in it durable).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", dir.display()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| Ok(f.write_all(bytes)?))
}

/// Writes `path` atomically with `write`, which receives the temporary file (positioned at 0).
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    atomically(path, |tmp| write(tmp.as_file_mut()))
}

/// Writes `path` atomically with `write`, which receives the temporary file's path (for writers
/// that open the file by name, such as `Tensor::write_safetensors`).
pub fn write_atomic_to(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    atomically(path, |tmp| write(tmp.path()))
}

fn atomically(path: &Path, write: impl FnOnce(&mut NamedTempFile) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let mut tmp = tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".partial").tempfile_in(dir).with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    // A writer that opens the path by name truncates and writes the same inode, so syncing the
    // handle held here flushes what it wrote.
    write(&mut tmp).and_then(|_| Ok(tmp.as_file().sync_all()?)).with_context(|| format!("writing {} (temporary {})", path.display(), tmp.path().display()))?;
    tmp.persist(path).map_err(|e| anyhow!("renaming {} to {}: {}", e.file.path().display(), path.display(), e.error))?;
    fsync_dir(dir)
}
