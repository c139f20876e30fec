//! `metrics.jsonl`: one JSON object per log step, flushed at once (the source of truth for plots).
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens for appending. On resume, lines with `step` > `resume_step` (logged after the
    /// checkpoint the run resumes from) are dropped first, so the file has no duplicates.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let (Some(from), true) = (resume_step, path.exists()) {
            let kept: Vec<String> = read_lines(path)?.into_iter().filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).map(|s| s <= from).unwrap_or(false)).collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            crate::run::atomic_file::write_atomic(path, text.as_bytes())?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").and_then(|_| self.file.flush()).with_context(|| format!("writing {}", self.path.display()))
    }
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(BufReader::new(f).lines().map_while(|l| l.ok()).filter(|l| !l.trim().is_empty()).collect())
}

/// Every record of a metrics file.
pub fn read(path: &Path) -> Result<Vec<serde_json::Value>> {
    read_lines(path)?.iter().map(|l| serde_json::from_str(l).with_context(|| format!("{}: bad JSON line {l:?}", path.display()))).collect()
}
