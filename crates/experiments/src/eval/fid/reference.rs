//! Reference statistics: computed from a data set's split and cached on disk under a key that
//! hashes everything that changes them, or read from a published `.npz` (`mu`, `sigma`).
use crate::data::cache;
use crate::data::idx::{self, Split};
use crate::run::file_lock::FileLock;
use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

use super::inception::Inception;
use super::stats::{read_array, write_npz, FeatureStats, GaussianStats};
use super::Preprocess;

/// Bump when the cached content or the key recipe changes.
const CACHE_FORMAT: &str = "flowmap-fid-stats v1";

/// The built-in data sets reference statistics can be computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefDataset {
    Mnist,
    FashionMnist,
}

impl RefDataset {
    pub fn name(self) -> &'static str {
        match self {
            RefDataset::Mnist => "mnist",
            RefDataset::FashionMnist => "fashion_mnist",
        }
    }

    /// Folder inside the data dir (also the prefix of its lines in data/SHA256SUMS).
    fn rel_dir(self) -> &'static str {
        match self {
            RefDataset::Mnist => "mnist",
            RefDataset::FashionMnist => "fashion-mnist",
        }
    }

    fn gz(self) -> bool {
        matches!(self, RefDataset::FashionMnist)
    }
}

impl std::str::FromStr for RefDataset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mnist" => Ok(RefDataset::Mnist),
            "fashion_mnist" | "fashion-mnist" | "fashionmnist" => Ok(RefDataset::FashionMnist),
            other => bail!("no reference statistics for data set `{other}` (expected `mnist` or `fashion_mnist`)"),
        }
    }
}

/// Which images reference statistics come from: the first `num_images` of a split (all if None).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSpec {
    pub dataset: RefDataset,
    pub split: Split,
    pub num_images: Option<usize>,
    /// Side of the images (32: as stored, padded; 16 or 8: average-pooled as the training data).
    pub image_size: i64,
}

impl SplitSpec {
    /// Label for `fid.csv`'s `ref_stats` column, e.g. `mnist-train-60000` (needs the count).
    pub fn label(&self, count: usize) -> String {
        let split = match self.split {
            Split::Train => "train",
            Split::Test => "test",
        };
        match self.image_size {
            idx::PADDED => format!("{}-{split}-{count}", self.dataset.name()),
            s => format!("{}{s}px-{split}-{count}", self.dataset.name()),
        }
    }
}

/// Reference statistics for FID (and features for KID when known).
#[derive(Debug)]
pub struct Reference {
    /// What `fid.csv` records as `ref_stats`.
    pub name: String,
    /// The convention the statistics were computed with; None for an external file that does not
    /// say (then the caller vouches for it).
    pub preprocess: Option<Preprocess>,
    pub stats: GaussianStats,
    /// (N, 2048) Float64 on the CPU, when available (needed for KID).
    pub features: Option<Tensor>,
}

/// The default cache folder for reference statistics: `<derived cache>/fid-stats` (see
/// [`cache::derived_root`]).
pub fn default_cache_dir() -> PathBuf {
    cache::derived_root().join("fid-stats")
}

/// The reference cached at `path` (an `.npz` with `features`, holding `n` rows), or `compute`d and
/// stored there. One process computes a given entry at a time: the others wait on its lock
/// (`<path>.lock`) and then read what it stored. A cached file that cannot be read (a corrupt or
/// truncated file) is recomputed and replaced, with a warning. Returns whether it came from the cache.
pub fn cached_reference(path: &Path, n: usize, compute: impl FnOnce() -> Result<Reference>) -> Result<(Reference, bool)> {
    let _lock = FileLock::acquire(&path.with_extension("npz.lock"), &format!("computing {}", path.display()))?;
    if path.exists() {
        let read = Reference::from_npz(path).and_then(|r| {
            let count = r.features.as_ref().map(|f| f.size()[0] as usize);
            ensure!(count == Some(n), "it holds {count:?} feature rows, expected {n}");
            Ok(r)
        });
        match read {
            Ok(r) => {
                tracing::info!(path = %path.display(), "reference statistics from the cache");
                return Ok((r, true));
            }
            Err(e) => tracing::warn!("cached reference statistics {} are unusable ({e:#}); recomputing them", path.display()),
        }
    }
    let r = compute()?;
    r.write_npz(path)?;
    Ok((r, false))
}

/// sha256 (hex) of everything that determines a set of reference statistics: the data's identity
/// (a file checksum or [`tensor_identity`]), the image count, the pre-processing convention and the
/// Inception weights' checksum.
pub fn stats_cache_key(data_identity: &str, num_images: usize, preprocess: Preprocess, weights_sha256: &str) -> String {
    let mut h = Sha256::new();
    for part in [CACHE_FORMAT, data_identity, &num_images.to_string(), preprocess.name(), weights_sha256] {
        h.update(part.as_bytes());
        h.update([0u8]); // separator, so that no two part lists hash the same bytes
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 (hex) of an image tensor's shape, kind and bytes (as quantised for Inception, so that
/// values which map to the same uint8 image give the same identity).
pub fn tensor_identity(images: &Tensor) -> Result<String> {
    let q = super::inception::quantize(images).to_device(tch::Device::Cpu).contiguous();
    let bytes: Vec<u8> = Vec::try_from(q.reshape([-1]))?;
    let mut h = Sha256::new();
    h.update(format!("{:?}", images.size()).as_bytes());
    h.update(&bytes);
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Reference {
    /// Statistics and features from an (N, 2048) feature matrix.
    pub fn from_features(name: impl Into<String>, preprocess: Option<Preprocess>, features: Tensor) -> Result<Self> {
        let features = features.to_device(tch::Device::Cpu).to_kind(Kind::Double);
        let stats = FeatureStats::from_features(&features)?.finish()?;
        Ok(Self { name: name.into(), preprocess, stats, features: Some(features) })
    }

    /// Computes the reference from images in [−1, 1] (no cache).
    pub fn from_images(inception: &Inception, images: &Tensor, name: impl Into<String>) -> Result<Self> {
        let features = inception.features(images)?;
        Self::from_features(name, Some(inception.preprocess()), features)
    }

    /// Like [`Reference::from_images`], but first looks in `cache_dir` under
    /// [`stats_cache_key`]`(data_identity, N, preprocess, weights)`; computes and stores on a miss.
    /// Returns the reference and whether it came from the cache.
    pub fn from_images_cached(inception: &Inception, images: &Tensor, name: &str, data_identity: &str, cache_dir: &Path) -> Result<(Self, bool)> {
        let n = images.size()[0] as usize;
        let key = stats_cache_key(data_identity, n, inception.preprocess(), inception.weights_sha256());
        let path = cache_dir.join(format!("{name}-{}-{}.npz", inception.preprocess().name(), &key[..16]));
        let (mut r, cached) = cached_reference(&path, n, || {
            tracing::info!(images = n, name, "computing reference statistics");
            let r = Self::from_images(inception, images, name)?;
            let meta = serde_json::json!({
                "format": CACHE_FORMAT, "name": name, "data": data_identity, "num_images": n,
                "preprocess": inception.preprocess().name(), "inception_sha256": inception.weights_sha256(), "key": key,
            });
            crate::run::atomic_file::write_atomic(&path.with_extension("json"), (serde_json::to_string_pretty(&meta)? + "\n").as_bytes())?;
            Ok(r)
        })?;
        r.name = name.to_string();
        r.preprocess = Some(inception.preprocess());
        Ok((r, cached))
    }

    /// Reference statistics of a built-in data set's split (verified against data/SHA256SUMS),
    /// cached in `cache_dir` (usually [`default_cache_dir`]). Returns whether it came from the cache.
    pub fn from_split(inception: &Inception, spec: &SplitSpec, cache_dir: &Path) -> Result<(Self, bool)> {
        let ds = spec.dataset;
        cache::require(&format!("{}/", ds.rel_dir()))?;
        let dir = cache::data_dir().join(ds.rel_dir());
        let (images_path, labels_path) = idx::split_files(&dir, spec.split, ds.gz());
        let file_name = images_path.file_name().and_then(|f| f.to_str()).context("non-UTF-8 file name")?;
        let rel = format!("{}/{file_name}", ds.rel_dir());
        let sha = cache::expected_files().into_iter().find(|(_, r)| *r == rel).map(|(s, _)| s).with_context(|| format!("data/SHA256SUMS lists no {rel}"))?;
        let images = idx::read_pair(&images_path, &labels_path)?.images;
        let total = images.size()[0] as usize;
        let n = spec.num_images.unwrap_or(total);
        ensure!((2..=total).contains(&n), "{}: asked for {n} reference images, the split has {total}", images_path.display());
        let images = idx::downsample(&images.narrow(0, 0, n as i64), spec.image_size)?;
        let identity = match spec.image_size {
            idx::PADDED => format!("{rel}:{sha}:first"),
            s => format!("{rel}:{sha}:first:avgpool{s}"),
        };
        Self::from_images_cached(inception, &images, &spec.label(n), &identity, cache_dir)
    }

    /// Reads `mu`, `sigma` and, if present, `features` from an `.npz` (pytorch-fid and ADM
    /// reference batches hold `mu` and `sigma`). The name is the file stem; the pre-processing
    /// convention is unknown.
    pub fn from_npz(path: &Path) -> Result<Self> {
        let stats = GaussianStats::read_npz(path)?;
        let mut npz = npyz::npz::NpzArchive::open(path).with_context(|| format!("opening {}", path.display()))?;
        let features = read_array(&mut npz, "features", path)?;
        if let Some(f) = &features {
            ensure!(f.dim() == 2 && f.size()[1] == stats.dim(), "{}: `features` is {:?}, expected (N, {})", path.display(), f.size(), stats.dim());
        }
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("reference").to_string();
        Ok(Self { name, preprocess: None, stats, features })
    }

    /// Writes `mu`, `sigma` (float64) and `features` (float32: Inception's own precision, so
    /// lossless) when present.
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        let mut arrays: Vec<(&str, &Tensor)> = vec![("mu", &self.stats.mu), ("sigma", &self.stats.sigma)];
        let features = self.features.as_ref().map(|f| f.to_kind(Kind::Float));
        if let Some(f) = &features {
            arrays.push(("features", f));
        }
        write_npz(path, &arrays)
    }
}
