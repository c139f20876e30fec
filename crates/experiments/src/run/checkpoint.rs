//! Atomic, verified checkpoints in a run directory.
//!
//! Layout: `checkpoints/step_00001000/{model,ema,optim}.safetensors, trainer_state.json, MANIFEST}`
//! and `checkpoints/LATEST` (the name of the newest complete one). A checkpoint is written into a
//! uniquely named `step_XXXXXXXX.tmp-*/`, every file fsynced, the MANIFEST (sha256 of every other
//! file) written last, the directory renamed into place, then LATEST replaced atomically, and only
//! then are old checkpoints beyond `keep` deleted. A directory without a valid MANIFEST is never
//! loaded.
//!
//! Re-saving a step that already has a checkpoint first renames the old one aside
//! (`step_XXXXXXXX.old-*`) and deletes it only after the new one is in place, so that at every
//! instant some complete checkpoint of that step exists: a complete `.tmp-*` or `.old-*` directory
//! (MANIFEST present and verifying) is a valid resume point too.
//!
//! One writer per run: the caller holds the run directory's lock (see [`crate::run::file_lock`]).
use crate::run::atomic_file::{fsync_dir, write_atomic};
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

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// What a directory entry of `checkpoints/` is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EntryKind {
    /// Being written (`step_N.tmp-*`); complete once its MANIFEST exists.
    Temp,
    /// A complete checkpoint being replaced by a re-save of the same step (`step_N.old-*`).
    Superseded,
    /// `step_N`.
    Final,
}

#[derive(Debug, Clone)]
struct Entry {
    step: u64,
    kind: EntryKind,
    dir: PathBuf,
}

fn parse_entry(name: &str) -> Option<(u64, EntryKind)> {
    let rest = name.strip_prefix("step_")?;
    let (digits, kind) = match rest.split_once('.') {
        None => (rest, EntryKind::Final),
        Some((d, suffix)) if suffix.starts_with("tmp") => (d, EntryKind::Temp),
        Some((d, suffix)) if suffix.starts_with("old") => (d, EntryKind::Superseded),
        Some(_) => return None,
    };
    Some((digits.parse().ok()?, kind))
}

/// A fault to inject in [`CheckpointDir::save`] (tests of crash safety).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail after the existing checkpoint of the step was renamed aside, before the new one is
    /// renamed into place (what a kill at that instant leaves).
    BetweenRenames,
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
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl CheckpointDir {
    pub fn new(root: impl Into<PathBuf>, keep: usize) -> Self {
        Self { root: root.into(), keep: keep.max(1), fault: None }
    }

    /// Writes a checkpoint atomically and returns it.
    pub fn save(&self, step: u64, contents: &CheckpointContents) -> Result<Checkpoint> {
        fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let name = step_name(step);
        let tmp = tempfile::Builder::new().prefix(&format!("{name}.tmp-")).tempdir_in(&self.root).with_context(|| format!("creating a checkpoint folder in {}", self.root.display()))?.keep();
        let fin = self.root.join(&name);
        let mut manifest = String::new();
        for (stem, tensors) in &contents.tensors {
            let file = format!("{stem}.safetensors");
            let path = tmp.join(&file);
            let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
            Tensor::write_safetensors(&cpu, &path).with_context(|| format!("writing {}", path.display()))?;
            fs::File::open(&path).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", path.display()))?;
            manifest.push_str(&format!("{}  {file}\n", crate::data::cache::sha256_file(&path)?));
        }
        let state = serde_json::to_vec_pretty(&contents.state)?;
        write_synced(&tmp.join("trainer_state.json"), &state)?;
        manifest.push_str(&format!("{}  trainer_state.json\n", crate::data::cache::sha256_file(&tmp.join("trainer_state.json"))?));
        write_synced(&tmp.join(MANIFEST), manifest.as_bytes())?;
        fsync_dir(&tmp)?;
        let rename = |from: &Path, to: &Path| fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display())).and_then(|_| fsync_dir(&self.root));
        if fin.exists() {
            // Re-saving a step (a stop right after a checkpoint step, a resume): the complete
            // old one stays on disk, under another name, until the new one is in place.
            let old = tmp.with_file_name(tmp.file_name().and_then(|n| n.to_str()).unwrap_or_default().replacen(".tmp-", ".old-", 1));
            rename(&fin, &old)?;
            if self.fault == Some(Fault::BetweenRenames) {
                bail!("injected fault: {} renamed aside, {} not yet renamed into place", fin.display(), tmp.display());
            }
            rename(&tmp, &fin)?;
            fs::remove_dir_all(&old).with_context(|| format!("removing the replaced checkpoint {}", old.display()))?;
        } else {
            rename(&tmp, &fin)?;
        }
        write_atomic(&self.root.join(LATEST), format!("{name}\n").as_bytes())?;
        self.prune(step)?;
        Ok(Checkpoint { step, dir: fin })
    }

    /// Every `step_*` entry, complete or not, in resume order: newest step first and, within a
    /// step, the final directory before a superseded one before a temporary one.
    fn entries(&self) -> Vec<Entry> {
        let Ok(rd) = fs::read_dir(&self.root) else { return vec![] };
        let mut out: Vec<Entry> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| {
                let (step, kind) = parse_entry(e.file_name().to_str()?)?;
                Some(Entry { step, kind, dir: e.path() })
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse((e.step, e.kind)));
        out
    }

    /// Complete checkpoint directories (MANIFEST present), ascending by step, one per step (the
    /// final directory when there is one). Contents are verified by `verify`, not here.
    pub fn candidates(&self) -> Vec<Checkpoint> {
        let mut out: Vec<Checkpoint> = Vec::new();
        for e in self.entries().into_iter().filter(|e| e.dir.join(MANIFEST).is_file()) {
            if out.last().map(|c| c.step) != Some(e.step) {
                out.push(Checkpoint { step: e.step, dir: e.dir });
            }
        }
        out.reverse();
        out
    }

    /// Whether the folder holds any `step_*` directory at all (complete or not).
    pub fn has_any(&self) -> bool {
        !self.entries().is_empty()
    }

    /// Deletes final checkpoints beyond the newest `keep`, and temporary or superseded
    /// directories of steps up to `saved` (left by an earlier crash; never newer ones, which may
    /// be the only copy of a later step).
    fn prune(&self, saved: u64) -> Result<()> {
        let entries = self.entries();
        let stale_finals = entries.iter().filter(|e| e.kind == EntryKind::Final).skip(self.keep);
        let leftovers = entries.iter().filter(|e| e.kind != EntryKind::Final && e.step <= saved);
        for e in stale_finals.chain(leftovers) {
            fs::remove_dir_all(&e.dir).with_context(|| format!("removing old checkpoint {}", e.dir.display()))?;
        }
        Ok(())
    }

    /// The checkpoint to resume from: LATEST if it verifies, else the newest one that verifies;
    /// `None` only when the folder holds no `step_*` directory at all. Incomplete or corrupt
    /// directories are skipped with a warning each; when there are some but none verifies, this is
    /// an error listing every one and why (a run is never silently restarted from step 0).
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        let mut order = self.entries();
        if order.is_empty() {
            return Ok(None);
        }
        if let Ok(name) = fs::read_to_string(self.root.join(LATEST)) {
            if let Some(pos) = order.iter().position(|e| e.dir.file_name().is_some_and(|n| n.to_string_lossy() == name.trim())) {
                let e = order.remove(pos);
                order.insert(0, e);
            }
        }
        let mut rejected = Vec::new();
        for e in order {
            match verify(&e.dir) {
                Ok(()) => {
                    for r in &rejected {
                        tracing::warn!("skipping checkpoint {r}");
                    }
                    if e.kind != EntryKind::Final {
                        tracing::warn!("resuming from {}, a complete checkpoint left by an interrupted save", e.dir.display());
                    }
                    return Ok(Some(Checkpoint { step: e.step, dir: e.dir }));
                }
                Err(err) => rejected.push(format!("{err:#}")),
            }
        }
        bail!(
            "{} holds checkpoint directories but none is complete and intact:\n  {}\nNothing was changed. Move the run directory aside (or delete the broken checkpoints) to start again, or restore a checkpoint from a backup.",
            self.root.display(),
            rejected.join("\n  ")
        )
    }
}

/// Checks every file listed in the directory's MANIFEST against its sha256.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest = fs::read_to_string(dir.join(MANIFEST)).with_context(|| format!("{} has no MANIFEST (incomplete write)", dir.display()))?;
    let mut listed = 0;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let (want, file) = line.split_once("  ").ok_or_else(|| anyhow!("{}: malformed MANIFEST line {line:?}", dir.display()))?;
        let got = crate::data::cache::sha256_file(&dir.join(file))?;
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
