//! A run directory: `runs/<name>/` with the resolved config, command line, git state, versions,
//! logs, metrics, TensorBoard events, sample grids and checkpoints (ecosystem.md §3.1).
use crate::run::file_lock::FileLock;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    pub fn tensorboard(&self) -> PathBuf {
        self.root.join("tb")
    }
    pub fn fid_csv(&self) -> PathBuf {
        self.root.join("fid.csv")
    }
    pub fn plots(&self) -> PathBuf {
        self.root.join("plots")
    }
    pub fn config_changes(&self) -> PathBuf {
        self.root.join("config_changes.jsonl")
    }

    /// Takes the run directory's exclusive lock (`LOCK`; held until dropped), creating the
    /// directory if needed. Fails at once, naming the holding process, if another has it.
    pub fn lock(&self) -> Result<FileLock> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating run directory {}", self.root.display()))?;
        FileLock::try_acquire(&self.root.join("LOCK"), &format!("run directory {}", self.root.display()))
    }

    /// Writes the resolved config as config.toml.
    pub fn write_config(&self, resolved: &toml::Table) -> Result<()> {
        let text = format!("# resolved config written by flowmap train\n{}", toml::to_string(resolved)?);
        crate::run::atomic_file::write_atomic(&self.config(), text.as_bytes())
    }

    /// Creates the directory and writes config.toml, cmd.txt, git.txt and env.txt.
    pub fn create(&self, resolved: &toml::Table) -> Result<()> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating run directory {}", self.root.display()))?;
        self.write_config(resolved)?;
        let cmd: Vec<String> = std::env::args().collect();
        crate::run::atomic_file::write_atomic(&self.root.join("cmd.txt"), format!("{}\n", cmd.join(" ")).as_bytes())?;
        crate::run::atomic_file::write_atomic(&self.root.join("git.txt"), git_state().as_bytes())?;
        crate::run::atomic_file::write_atomic(&self.root.join("env.txt"), env_facts().as_bytes())?;
        Ok(())
    }
}

fn git_state() -> String {
    let run = |args: &[&str]| std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match run(&["rev-parse", "HEAD"]) {
        Some(head) => {
            let dirty = run(&["status", "--porcelain"]).map(|s| !s.is_empty()).unwrap_or(false);
            format!("commit {head}\ndirty {dirty}\n")
        }
        None => "not a git checkout\n".into(),
    }
}

fn env_facts() -> String {
    let cuda = tch::Cuda::is_available();
    let device = if cuda { flowmap_sys::cuda_device_name(0).unwrap_or_else(|e| e.0) } else { "cpu".into() };
    format!("flowmap {}\ntch 0.24.0\nlibtorch {}\ncuda {}\ndevice {}\nthreads {}\n", env!("CARGO_PKG_VERSION"), flowmap_sys::torch_version(), cuda, device, tch::get_num_threads())
}

/// Reads a run's resolved config table back (for `sample`, `fid`, `reflow-pairs`, `--resume`).
/// A config.toml written in an older form is read as migrated, with a warning (the file is left
/// as it is: `flowmap migrate-config` rewrites it).
pub fn read_config(run: &Path) -> Result<toml::Table> {
    let path = run.join("config.toml");
    let (table, changes) = crate::config::migrate::migrate(crate::config::overrides::read_table(&path)?).with_context(|| path.display().to_string())?;
    if !changes.is_empty() {
        let list = changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
        tracing::warn!("{}: written in an older config form; read as migrated ({list}); `flowmap migrate-config {}` rewrites it", path.display(), path.display());
    }
    Ok(table)
}
