//! Where flowmap keeps what is not in git: the Python venv with torch and the downloaded data.
//!
//! `FLOWMAP_CACHE` overrides the root (default `$XDG_CACHE_HOME/flowmap` or `~/.cache/flowmap`);
//! `scripts/setup.sh` fills it and `data/SHA256SUMS` lists what must be there.
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The checksum list shipped with the sources (also used by `data/fetch.sh`).
pub const SHA256SUMS: &str = include_str!("../../../../data/SHA256SUMS");

/// The cache root.
pub fn root() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOWMAP_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    base.join("flowmap")
}

/// The root of derived caches (what flowmap can recompute from the data, such as FID reference
/// statistics): `FLOWMAP_DERIVED_CACHE`, default the cache root. Tests and CI point it at an empty
/// folder to see what a fresh machine sees.
pub fn derived_root() -> PathBuf {
    std::env::var_os("FLOWMAP_DERIVED_CACHE").map(PathBuf::from).unwrap_or_else(root)
}

/// The data directory inside the cache.
pub fn data_dir() -> PathBuf {
    root().join("data")
}

/// The MNIST directory (raw IDX).
pub fn mnist_dir() -> PathBuf {
    data_dir().join("mnist")
}

/// The Fashion-MNIST directory (gzip IDX).
pub fn fashion_mnist_dir() -> PathBuf {
    data_dir().join("fashion-mnist")
}

/// The FID Inception-v3 TorchScript file.
pub fn inception_weights() -> PathBuf {
    data_dir().join("inception").join("pt_inception-2015-12-05.pt")
}

/// (sha256, path relative to the data dir) for every file flowmap reads (not the packages).
pub fn expected_files() -> Vec<(&'static str, &'static str)> {
    SHA256SUMS.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(|l| l.split_once("  ")).filter(|(_, rel)| !rel.starts_with("packages/")).collect()
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// State of one expected file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    Verified,
    Missing,
    Mismatch { got: String },
}

/// Checks a file in the data dir against its expected sha256.
pub fn check_file(rel: &str, want: &str) -> Result<FileState> {
    let path = data_dir().join(rel);
    if !path.exists() {
        return Ok(FileState::Missing);
    }
    let got = sha256_file(&path)?;
    Ok(if got == want { FileState::Verified } else { FileState::Mismatch { got } })
}

/// Fails with a message naming the file and the fix unless every file under `prefix` verifies.
pub fn require(prefix: &str) -> Result<()> {
    for (want, rel) in expected_files().into_iter().filter(|(_, r)| r.starts_with(prefix)) {
        match check_file(rel, want)? {
            FileState::Verified => {}
            FileState::Missing => bail!("{} is missing: run `make setup` (or scripts/setup.sh) to download it", data_dir().join(rel).display()),
            FileState::Mismatch { got } => bail!("{} has sha256 {got}, expected {want}: delete it and run `make setup`", data_dir().join(rel).display()),
        }
    }
    Ok(())
}
