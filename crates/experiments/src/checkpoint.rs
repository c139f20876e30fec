//! Atomic, verified checkpoints in a run directory.
//!
//! Layout: `checkpoints/step_00001000/{model,ema,optim}.safetensors, trainer_state.json, MANIFEST}`
//! and `checkpoints/LATEST` (the name of the newest complete one). A checkpoint is written into
//! `step_XXXXXXXX.tmp/`, every file fsynced, the MANIFEST (sha256 of every other file) written
//! last, the directory renamed into place, then LATEST replaced atomically, and only then are old
//! checkpoints beyond `keep` deleted. A directory without a valid MANIFEST is never loaded.
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

const MANIFEST: &str = "MANIFEST";
const LATEST: &str = "LATEST";

fn step_name(step: u64) -> String {
    format!("step_{step:08}")
}

fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", dir.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fsync_dir(dir)
}

/// What goes into one checkpoint.
pub struct CheckpointContents<'a> {
    /// (file stem, named tensors), e.g. ("model", vars) → model.safetensors
    pub tensors: Vec<(&'a str, Vec<(String, Tensor)>)>,
    /// trainer_state.json
    pub state: serde_json::Value,
}

/// A complete, verified checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
}

impl Checkpoint {
    /// The named tensors of `<stem>.safetensors`, on CPU.
    pub fn tensors(&self, stem: &str) -> Result<BTreeMap<String, Tensor>> {
        let path = self.dir.join(format!("{stem}.safetensors"));
        let list = Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(list.into_iter().collect())
    }
    pub fn state(&self) -> Result<serde_json::Value> {
        let path = self.dir.join("trainer_state.json");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The `checkpoints/` directory of a run.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    pub root: PathBuf,
    /// How many complete checkpoints to keep (at least 1).
    pub keep: usize,
}

impl CheckpointDir {
    pub fn new(root: impl Into<PathBuf>, keep: usize) -> Self {
        Self { root: root.into(), keep: keep.max(1) }
    }

    /// Writes a checkpoint atomically and returns it.
    pub fn save(&self, step: u64, contents: &CheckpointContents) -> Result<Checkpoint> {
        fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let name = step_name(step);
        let tmp = self.root.join(format!("{name}.tmp"));
        let fin = self.root.join(&name);
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        let mut manifest = String::new();
        for (stem, tensors) in &contents.tensors {
            let file = format!("{stem}.safetensors");
            let path = tmp.join(&file);
            let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
            Tensor::write_safetensors(&cpu, &path).with_context(|| format!("writing {}", path.display()))?;
            fs::File::open(&path)?.sync_all()?;
            manifest.push_str(&format!("{}  {file}\n", crate::cache::sha256_file(&path)?));
        }
        let state = serde_json::to_vec_pretty(&contents.state)?;
        write_synced(&tmp.join("trainer_state.json"), &state)?;
        manifest.push_str(&format!("{}  trainer_state.json\n", crate::cache::sha256_file(&tmp.join("trainer_state.json"))?));
        write_synced(&tmp.join(MANIFEST), manifest.as_bytes())?;
        fsync_dir(&tmp)?;
        if fin.exists() {
            fs::remove_dir_all(&fin)?; // re-saving the same step (e.g. after a resume)
        }
        fs::rename(&tmp, &fin).with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
        fsync_dir(&self.root)?;
        write_atomic(&self.root.join(LATEST), format!("{name}\n").as_bytes())?;
        self.prune()?;
        Ok(Checkpoint { step, dir: fin })
    }

    /// Complete checkpoint directories (name parses, MANIFEST present), ascending by step.
    /// Contents are verified by `verify`, not here.
    pub fn candidates(&self) -> Vec<Checkpoint> {
        let Ok(rd) = fs::read_dir(&self.root) else { return vec![] };
        let mut out: Vec<Checkpoint> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step = name.strip_prefix("step_")?.parse::<u64>().ok()?;
                e.path().join(MANIFEST).is_file().then(|| Checkpoint { step, dir: e.path() })
            })
            .collect();
        out.sort_by_key(|c| c.step);
        out
    }

    /// Deletes complete checkpoints beyond the newest `keep`, and stale `.tmp` directories.
    fn prune(&self) -> Result<()> {
        let all = self.candidates();
        for c in all.iter().take(all.len().saturating_sub(self.keep)) {
            fs::remove_dir_all(&c.dir).with_context(|| format!("removing old checkpoint {}", c.dir.display()))?;
        }
        for e in fs::read_dir(&self.root)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") && e.path().is_dir() {
                fs::remove_dir_all(e.path())?;
            }
        }
        Ok(())
    }

    /// The checkpoint to resume from: LATEST if it verifies, else the newest one that verifies.
    /// Incomplete or corrupt directories are skipped with a warning.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        let mut order = self.candidates();
        order.reverse();
        if let Ok(name) = fs::read_to_string(self.root.join(LATEST)) {
            if let Some(pos) = order.iter().position(|c| c.dir.file_name().map(|n| n.to_string_lossy() == name.trim()).unwrap_or(false)) {
                let c = order.remove(pos);
                order.insert(0, c);
            }
        }
        for c in order {
            match verify(&c.dir) {
                Ok(()) => return Ok(Some(c)),
                Err(e) => tracing::warn!("skipping checkpoint {}: {e:#}", c.dir.display()),
            }
        }
        Ok(None)
    }
}

/// Checks every file listed in the directory's MANIFEST against its sha256.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest = fs::read_to_string(dir.join(MANIFEST)).with_context(|| format!("{} has no MANIFEST (incomplete write)", dir.display()))?;
    let mut listed = 0;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let (want, file) = line.split_once("  ").ok_or_else(|| anyhow!("{}: malformed MANIFEST line {line:?}", dir.display()))?;
        let got = crate::cache::sha256_file(&dir.join(file))?;
        if got != want {
            bail!("{}: {file} does not match its MANIFEST checksum", dir.display());
        }
        listed += 1;
    }
    if listed == 0 {
        bail!("{}: empty MANIFEST", dir.display());
    }
    Ok(())
}
