//! The reference side of the ADM suite: a `.npz` with images (`arr_0`, e.g. the 10k images of
//! `VIRTUAL_imagenet256_labeled.npz`), precomputed statistics (`mu`, `sigma`, `mu_s`, `sigma_s`:
//! pool3 and sFID spatial features), or both. As in the ADM evaluator, statistics in the file win
//! for FID and sFID (they usually cover the whole data set), and the images give the features for
//! precision and recall. The Inception pass over the images is cached under the derived cache,
//! keyed by the file's sha256, the pre-processing and the Inception weights.
use super::activations::{batch_activations, BatchActivations};
use crate::data::cache;
use crate::eval::fid::stats::{read_array, write_npz};
use crate::eval::fid::{GaussianStats, Inception, RootedStats};
use crate::run::file_lock::FileLock;
use crate::run::world::World;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Bump when the cached content changes.
const CACHE_FORMAT: &str = "flowmap-adm-reference v1";

/// A reference batch, ready for the suite (rank 0's).
#[derive(Debug)]
pub struct ReferenceBatch {
    /// the file stem
    pub name: String,
    /// pool3 statistics for FID
    pub stats: RootedStats,
    /// spatial statistics for sFID (None: the file has neither `mu_s`/`sigma_s` nor images)
    pub spatial_stats: Option<RootedStats>,
    /// pool3 features of the images, (N, 2048) Float32, for precision/recall
    pub pool: Option<Tensor>,
    /// whether FID/sFID used the file's own statistics
    pub stats_from_file: bool,
}

/// `<derived cache>/adm-reference`.
pub fn default_cache_dir() -> PathBuf {
    cache::derived_root().join("adm-reference")
}

impl ReferenceBatch {
    /// Reads `path` and, when it holds images, their Inception activations (from `cache_dir` or
    /// computed, sharded over `world`'s ranks). Every rank must call it; rank 0 gets `Some`.
    pub fn load(path: &Path, inception: &Inception, world: &World, chunk: usize, cache_dir: &Path) -> Result<Option<Self>> {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("reference").to_string();
        let mut npz = npyz::npz::NpzArchive::open(path).with_context(|| format!("opening the reference batch {}", path.display()))?;
        let names: Vec<String> = npz.array_names().map(str::to_string).collect();
        let has = |n: &str| names.iter().any(|m| m == n);
        let file_stats = match (has("mu") && has("sigma"), has("mu_s") && has("sigma_s")) {
            (true, s) => {
                let stats = GaussianStats::read_npz(path)?;
                let spatial = match s {
                    true => Some(GaussianStats::new(read_array(&mut npz, "mu_s", path)?.context("mu_s")?, read_array(&mut npz, "sigma_s", path)?.context("sigma_s")?).with_context(|| format!("mu_s/sigma_s of {}", path.display()))?),
                    false => None,
                };
                Some((stats, spatial))
            }
            (false, _) => None,
        };
        if !has("arr_0") {
            let Some((stats, spatial_stats)) = file_stats else {
                bail!("{}: a reference batch holds images (`arr_0`, uint8 (N, H, W, 3)) or statistics (`mu`, `sigma`, optionally `mu_s`, `sigma_s`); found {names:?}", path.display());
            };
            return Ok(world.is_main().then(|| Self { name, stats: RootedStats::new(stats), spatial_stats: spatial_stats.map(RootedStats::new), pool: None, stats_from_file: true }));
        }
        let acts = cached_activations(path, inception, world, chunk, cache_dir)?;
        let Some(acts) = acts else { return Ok(None) };
        let (stats, spatial_stats, stats_from_file) = match file_stats {
            Some((stats, Some(spatial))) => (stats, Some(spatial), true),
            Some((stats, None)) => (stats, Some(acts.spatial.clone()), true),
            None => (acts.stats, Some(acts.spatial), false),
        };
        Ok(Some(Self { name, stats: RootedStats::new(stats), spatial_stats: spatial_stats.map(RootedStats::new), pool: Some(acts.pool), stats_from_file }))
    }
}

/// Reference activations: pool3 features and the statistics of both feature sets.
struct RefActivations {
    pool: Tensor,
    stats: GaussianStats,
    spatial: GaussianStats,
}

impl RefActivations {
    fn from_batch(a: BatchActivations) -> Result<Self> {
        Ok(Self { stats: a.pool_stats.finish()?, spatial: a.spatial_stats.finish()?, pool: a.pool })
    }
}

/// The activations of `path`'s images, from the cache or computed (by all ranks) and stored by
/// rank 0. Cache hits and misses are agreed by all ranks (a miss on rank 0 makes every rank compute).
fn cached_activations(path: &Path, inception: &Inception, world: &World, chunk: usize, cache_dir: &Path) -> Result<Option<RefActivations>> {
    let sha = cache::sha256_file(path)?;
    let key = crate::eval::fid::stats_cache_key(&format!("{CACHE_FORMAT}:{sha}"), 0, inception.preprocess(), inception.weights_sha256());
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("reference");
    let entry = cache_dir.join(format!("{name}-{}-{}.npz", inception.preprocess().name(), &key[..16]));
    let lock = match world.is_main() {
        true => Some(FileLock::acquire(&entry.with_extension("npz.lock"), &format!("computing {}", entry.display()))?),
        false => None,
    };
    let hit = match world.is_main() {
        true => read_cache(&entry)
            .inspect_err(|e| {
                if entry.exists() {
                    tracing::warn!("cached reference activations {} are unusable ({e:#}); recomputing", entry.display())
                }
            })
            .ok(),
        false => None,
    };
    if world.broadcast_i64(hit.is_some() as i64)? == 1 {
        tracing::info!(path = %entry.display(), "reference activations from the cache");
        return Ok(hit);
    }
    let acts = batch_activations(path, inception, world, chunk)?;
    let Some(acts) = acts else { return Ok(None) };
    let r = RefActivations::from_batch(acts)?;
    write_npz(&entry, &[("pool", &r.pool), ("mu", &r.stats.mu), ("sigma", &r.stats.sigma), ("mu_s", &r.spatial.mu), ("sigma_s", &r.spatial.sigma)])?;
    drop(lock);
    Ok(Some(r))
}

fn read_cache(entry: &Path) -> Result<RefActivations> {
    let mut npz = npyz::npz::NpzArchive::open(entry)?;
    let mut get = |n: &str| read_array(&mut npz, n, entry)?.with_context(|| format!("no `{n}`"));
    let pool = get("pool")?.to_kind(tch::Kind::Float);
    let stats = GaussianStats::new(get("mu")?, get("sigma")?)?;
    let spatial = GaussianStats::new(get("mu_s")?, get("sigma_s")?)?;
    Ok(RefActivations { pool, stats, spatial })
}
