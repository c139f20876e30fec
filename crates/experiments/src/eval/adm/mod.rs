//! The ADM evaluation suite (openai/guided-diffusion `evaluations/evaluator.py`), which the
//! ImageNet-256 tables of DiT, MeanFlow, iMF and most few-step papers report: FID, sFID, Inception
//! Score, precision and recall of a sample batch `.npz` against a reference batch, from one
//! Inception pass per batch with the TF1 resize and uint8 quantisation ([`Preprocess::Tf`]).
//!
//! * [`sample_batch`]: the `.npz` format (`arr_0` uint8 (N, H, W, 3), `arr_1` labels), streamed;
//! * [`activations`]: the Inception pass, sharded over ranks;
//! * [`reference_batch`]: images and/or `mu`, `sigma`, `mu_s`, `sigma_s`;
//! * [`evaluate_batch`]: the numbers (`flowmap evaluate`).
pub mod activations;
pub mod reference_batch;
pub mod sample_batch;

use crate::eval::fid::inception_score::{inception_score, InceptionScore, IsSplits};
use crate::eval::fid::precision_recall::{precision_recall, PrecisionRecall, DEFAULT_K};
use crate::eval::fid::{Inception, Preprocess};
use crate::run::world::World;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

pub use activations::{batch_activations, BatchActivations};
pub use reference_batch::ReferenceBatch;

/// Settings of the suite (defaults: the ADM evaluator's).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmSettings {
    /// neighbourhood size of precision/recall (3)
    pub k: usize,
    /// Inception Score splits (10)
    pub is_splits: IsSplits,
    /// images per Inception chunk (also the unit of sharding over ranks)
    pub chunk: usize,
}

impl Default for AdmSettings {
    fn default() -> Self {
        Self { k: DEFAULT_K, is_splits: IsSplits::default(), chunk: 100 }
    }
}

/// The suite's numbers for one sample batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdmMetrics {
    pub samples: String,
    pub num_samples: usize,
    pub reference: String,
    /// images of the reference batch that went through Inception (precision/recall); None for a
    /// statistics-only reference
    pub num_reference_images: Option<usize>,
    /// FID and sFID used the reference file's `mu`, `sigma` (`mu_s`, `sigma_s`)
    pub reference_stats_from_file: bool,
    pub preprocess: Preprocess,
    pub inception_sha256: String,
    /// None without the classifier matrix (not in any package registry; see `LogitsHead`)
    pub inception_score: Option<InceptionScore>,
    pub fid: f64,
    /// None when the reference has neither spatial statistics nor images
    pub sfid: Option<f64>,
    /// None for a statistics-only reference
    pub precision_recall: Option<PrecisionRecall>,
}

impl AdmMetrics {
    /// The lines the ADM evaluator prints (values that could not be computed say why).
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.inception_score {
            Some(is) => out.push_str(&format!("Inception Score: {}\n", is.mean)),
            None => out.push_str("Inception Score: not computed (no Inception classifier matrix: --inception-logits FILE)\n"),
        }
        out.push_str(&format!("FID: {}\n", self.fid));
        match self.sfid {
            Some(s) => out.push_str(&format!("sFID: {s}\n")),
            None => out.push_str("sFID: not computed (the reference has neither mu_s/sigma_s nor images)\n"),
        }
        match &self.precision_recall {
            Some(pr) => out.push_str(&format!("Precision: {}\nRecall: {}\n", pr.precision, pr.recall)),
            None => out.push_str("Precision: not computed (the reference has no images)\nRecall: not computed\n"),
        }
        out
    }
}

/// `flowmap evaluate`: loads the Inception network (with the classifier matrix when given) on
/// every rank of this process's world, the reference batch, and scores `samples`. Rank 0 returns
/// the metrics.
pub fn evaluate_files(samples: &Path, reference: &Path, logits: Option<&Path>, preprocess: Preprocess, settings: &AdmSettings, device: tch::Device) -> Result<Option<AdmMetrics>> {
    anyhow::ensure!(settings.chunk >= 1, "--batch {}: must be >= 1", settings.chunk);
    anyhow::ensure!(settings.k >= 1, "--k {}: must be >= 1", settings.k);
    let world = World::global(device)?;
    let device = world.device(device);
    let mut inception = Inception::load(device, preprocess)?.with_batch_size(settings.chunk);
    if let Some(path) = logits {
        inception = inception.with_logits(&crate::eval::fid::inception_net::LogitsHead::read_npz(path)?);
    }
    let reference = ReferenceBatch::load(reference, &inception, world, settings.chunk, &reference_batch::default_cache_dir())?;
    evaluate_batch(samples, reference.as_ref(), &inception, world, settings)
}

/// The ADM suite of the sample batch at `samples` against `reference` (loaded with the same
/// `inception`). Every rank of `world` must call it (the Inception pass is sharded); rank 0
/// returns the metrics, the others `None`.
pub fn evaluate_batch(samples: &Path, reference: Option<&ReferenceBatch>, inception: &Inception, world: &World, settings: &AdmSettings) -> Result<Option<AdmMetrics>> {
    let acts = activations::batch_activations(samples, inception, world, settings.chunk)?;
    let (Some(acts), Some(reference)) = (acts, reference) else { return Ok(None) };
    score_activations(&samples.display().to_string(), &acts, reference, inception, settings).map(Some)
}

/// The suite's numbers from a sample batch's activations (see [`evaluate_batch`]).
pub fn score_activations(samples: &str, acts: &BatchActivations, reference: &ReferenceBatch, inception: &Inception, settings: &AdmSettings) -> Result<AdmMetrics> {
    let stats = acts.pool_stats.finish()?;
    let fid = reference.stats.frechet_distance(&stats)?;
    let sfid = match &reference.spatial_stats {
        Some(r) => Some(r.frechet_distance(&acts.spatial_stats.finish()?)?),
        None => None,
    };
    let precision_recall = match &reference.pool {
        Some(ref_pool) => Some(precision_recall(ref_pool, &acts.pool, settings.k, inception.device())?),
        None => None,
    };
    let inception_score = acts.logits.as_ref().map(|l| inception_score(l, settings.is_splits)).transpose()?;
    Ok(AdmMetrics {
        samples: samples.to_string(),
        num_samples: acts.count(),
        reference: reference.name.clone(),
        num_reference_images: reference.pool.as_ref().map(|p| p.size()[0] as usize),
        reference_stats_from_file: reference.stats_from_file,
        preprocess: inception.preprocess(),
        inception_sha256: inception.weights_sha256().to_string(),
        inception_score,
        fid,
        sfid,
        precision_recall,
    })
}
