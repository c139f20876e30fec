//! Exclusive advisory locks between processes (`flock` on a lock file), released by the kernel
//! when the holder exits, however it exits (a kill -9 leaves no stale lock). The holder writes
//! its pid and command into the file so that a refused process can say who holds it.
//!
//! Used for a run directory (one `flowmap train` per run), a cache entry (the second process
//! waits and reuses what the first computed) and append-only files such as `fid.csv`.
use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A held lock; dropping it releases the lock (the file stays, so no other process can race on
/// re-creating it).
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

fn open(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).with_context(|| format!("opening lock file {}", path.display()))
}

/// Who holds the lock, as written by the holder (best effort).
fn holder(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => s.split_whitespace().collect::<Vec<_>>().join(" "),
        _ => "another process".into(),
    }
}

impl FileLock {
    /// Takes the lock at `path` or fails at once with an error naming `what`, the lock file and
    /// the holding process.
    pub fn try_acquire(path: &Path, what: &str) -> Result<Self> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => Self::held(file, path),
            Err(TryLockError::WouldBlock) => bail!("{what} is in use by {} (lock file {}); wait for it to finish or stop it first", holder(path), path.display()),
            Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// Takes the lock at `path`, waiting for the holder to release it (logged once, naming `what`).
    pub fn acquire(path: &Path, what: &str) -> Result<Self> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => return Self::held(file, path),
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
            Err(TryLockError::WouldBlock) => {}
        }
        tracing::info!("waiting for {} to finish {what} (lock file {})", holder(path), path.display());
        let t0 = Instant::now();
        file.lock().with_context(|| format!("locking {}", path.display()))?;
        tracing::info!("lock {} acquired after {:.1} s", path.display(), t0.elapsed().as_secs_f64());
        Self::held(file, path)
    }

    fn held(mut file: File, path: &Path) -> Result<Self> {
        let cmd: Vec<String> = std::env::args().collect();
        let me = format!("pid {} ({})\n", std::process::id(), cmd.join(" "));
        file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(me.as_bytes())).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}
