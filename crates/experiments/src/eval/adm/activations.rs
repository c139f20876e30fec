//! One Inception pass over an ADM batch (`arr_0`), sharded over the ranks of a data-parallel job:
//! everything the suite needs from it (pool3 features kept for precision/recall, running
//! statistics of pool3 and of the sFID spatial features, logits for Inception Score).
use super::sample_batch::ImageArrayReader;
use crate::eval::fid::inception_net::{NUM_LOGITS, SPATIAL_DIM};
use crate::eval::fid::{FeatureStats, Inception, FEATURE_DIM};
use crate::run::world::World;
use anyhow::{ensure, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What the suite reads from one batch's Inception pass (rank 0's; rows in file order).
#[derive(Debug)]
pub struct BatchActivations {
    /// (N, 2048) Float32 (the network's precision; precision/recall reads it as Float64)
    pub pool: Tensor,
    pub pool_stats: FeatureStats,
    /// of the (N, 2023) `mixed_6/conv` features
    pub spatial_stats: FeatureStats,
    /// (N, 1008) Float32, when the Inception network has its classifier
    pub logits: Option<Tensor>,
}

impl BatchActivations {
    pub fn count(&self) -> usize {
        self.pool.size()[0] as usize
    }
}

/// Runs `inception` over every image of `path`'s `arr_0` in chunks of `chunk` rows. Rank k of W
/// computes chunks k, k + W, … (every rank reads the file; only its own chunks go through the
/// network); rank 0 gathers the outputs and adds them in chunk order, so any number of ranks gives
/// the numbers of one process. Returns `Some` on rank 0 and `None` on the others.
pub fn batch_activations(path: &Path, inception: &Inception, world: &World, chunk: usize) -> Result<Option<BatchActivations>> {
    ensure!(chunk >= 1, "chunk must be at least 1 row");
    let mut reader = ImageArrayReader::open(path)?;
    let n = reader.num;
    ensure!(n >= 2, "{}: {n} images; the statistics need at least 2", path.display());
    let chunks = n.div_ceil(chunk);
    let with_logits = inception.has_logits();
    let width = FEATURE_DIM + SPATIAL_DIM + if with_logits { NUM_LOGITS } else { 0 };
    let mut pool = Vec::with_capacity(chunks);
    let mut logits = Vec::new();
    let (mut pool_stats, mut spatial_stats) = (FeatureStats::new(FEATURE_DIM), FeatureStats::new(SPATIAL_DIM));
    let start = std::time::Instant::now();
    for round in (0..chunks).step_by(world.size()) {
        // Read this round's chunks in order; compute only this rank's.
        let mut mine = None;
        for c in round..(round + world.size()).min(chunks) {
            let rows = chunk.min(n - c * chunk);
            match c % world.size() == world.rank() {
                true => mine = reader.next_images(rows)?,
                false => reader.skip(rows)?,
            }
        }
        // One (chunk, width) Float64 block per rank: [pool | spatial | logits], zero-padded, and
        // its row count in a (1,) tensor.
        let (block, rows) = match mine {
            Some(images) => {
                let a = inception.activations(&images)?;
                let mut parts = vec![a.pool, a.spatial];
                parts.extend(a.logits);
                (Tensor::cat(&parts, 1), images.size()[0])
            }
            None => (Tensor::zeros([0, width], (Kind::Double, Device::Cpu)), 0),
        };
        let padded = match world.size() {
            1 => block,
            _ => Tensor::cat(&[block.shallow_clone(), Tensor::zeros([chunk as i64 - rows, width], (Kind::Double, Device::Cpu))], 0).to_device(inception.device()),
        };
        let count = Tensor::from_slice(&[rows]).to_device(padded.device());
        let (blocks, counts) = (world.gather(&padded)?, world.gather(&count)?);
        if !world.is_main() {
            continue;
        }
        for (b, c) in blocks.iter().zip(&counts) {
            let rows = c.int64_value(&[0]);
            if rows == 0 {
                continue;
            }
            let b = b.narrow(0, 0, rows).to_device(Device::Cpu);
            let p = b.narrow(1, 0, FEATURE_DIM);
            pool_stats.update(&p)?;
            spatial_stats.update(&b.narrow(1, FEATURE_DIM, SPATIAL_DIM))?;
            pool.push(p.to_kind(Kind::Float));
            if with_logits {
                logits.push(b.narrow(1, FEATURE_DIM + SPATIAL_DIM, NUM_LOGITS).to_kind(Kind::Float));
            }
        }
    }
    tracing::info!(images = n, ranks = world.size(), seconds = start.elapsed().as_secs_f64(), "Inception activations of {}", path.display());
    if !world.is_main() {
        return Ok(None);
    }
    Ok(Some(BatchActivations { pool: Tensor::cat(&pool, 0), pool_stats, spatial_stats, logits: with_logits.then(|| Tensor::cat(&logits, 0)) }))
}
