//! `[eval]` and `flowmap fid`: FID (and KID) of a trained run at a list of step counts, against
//! reference statistics of a data split (cached) or a published `.npz`, appended to `fid.csv`.
use crate::data::config::{expand_env, DataConfig, DataSet, SplitName};
use crate::data::idx::Split;
use crate::data::image_folder::{load_batch, ImageFolder, Layout, SkipLog};
use crate::data::vae::VaeSection;
use crate::eval::fid::{self, EvalSettings, FidRow, Inception, KidSettings, Preprocess, RefDataset, Reference, SampleSetting, SplitSpec};
use crate::eval::sampling::Sampler;
use crate::eval::sampling::Weights;
use crate::run::model::{load_run_weights, ModelConfig};
use crate::run::rng::{self, Stream};
use crate::run::run_dir::RunDir;
use crate::run::world::World;
use anyhow::{ensure, Context, Result};
use flowmap_core::VelocityField;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// `[eval]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// generated images per step count (state it with the number: not FID-50k)
    pub num_samples: usize,
    /// default: sampling.steps
    #[serde(default)]
    pub steps: Option<Vec<usize>>,
    /// default: the training data set's test split, all 10k images
    #[serde(default)]
    pub reference: ReferenceConfig,
    /// pytorch_fid (default) | tf
    #[serde(default)]
    pub preprocess: Preprocess,
    /// also KID (unbiased; meaningful at small counts); default true
    #[serde(default = "yes")]
    pub kid: bool,
    /// images per generation / Inception batch; default 100
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// also evaluate while training, every N steps and at the end; 0 (default) = only by `fid`/`table`
    #[serde(default)]
    pub every: u64,
    /// evaluation seeds: each draws its own noise and labels and gives its own rows (eval_seed
    /// 0, 1, …), so tables can show the seed-to-seed spread; default 1 (the run's seed)
    #[serde(default = "one_seed")]
    pub seeds: u64,
}

fn one_seed() -> u64 {
    1
}

fn yes() -> bool {
    true
}
fn default_batch() -> usize {
    100
}

/// Where reference statistics come from.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReferenceConfig {
    /// default: the run's data set
    #[serde(default)]
    pub dataset: Option<DataSet>,
    /// default: test
    #[serde(default)]
    pub split: Option<SplitName>,
    /// default: the whole split
    #[serde(default)]
    pub num_images: Option<usize>,
    /// a published `mu`/`sigma` file instead (no KID then); ${VAR} expanded
    #[serde(default)]
    pub npz: Option<PathBuf>,
    /// an image folder instead (ADM center crop at data.image_size); default for image_folder and
    /// latents runs: data.path / the latents' source folder
    #[serde(default)]
    pub folder: Option<String>,
    #[serde(default)]
    pub layout: Option<crate::data::image_folder::Layout>, // of `folder`; default class_folders
}

impl EvalConfig {
    /// Range checks (errors name the key, and the `flowmap fid` argument that sets it).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.num_samples >= 2, "eval.num_samples = {} (fid --num-samples): must be >= 2 (FID needs a covariance)", self.num_samples);
        ensure!(self.batch >= 1, "eval.batch = {}: must be >= 1", self.batch);
        ensure!(self.seeds >= 1, "eval.seeds = {} (fid --seeds): must be >= 1", self.seeds);
        if let Some(steps) = &self.steps {
            check_steps(steps, "eval.steps")?;
        }
        self.reference.validate()
    }
}

impl ReferenceConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(n) = self.num_images {
            ensure!(n >= 2, "eval.reference.num_images = {n} (fid --ref-images): must be >= 2 (FID needs a covariance)");
        }
        ensure!(self.npz.as_ref().is_none_or(|p| !p.as_os_str().is_empty()), "eval.reference.npz (fid --ref-npz): empty path");
        ensure!(self.folder.as_ref().is_none_or(|f| !f.is_empty()), "eval.reference.folder: empty path");
        Ok(())
    }
}

/// Step counts to evaluate: at least one, each >= 1. `what` names the key or argument.
pub fn check_steps(steps: &[usize], what: &str) -> Result<()> {
    ensure!(!steps.is_empty() && steps.iter().all(|&s| s >= 1), "{what} = {steps:?}: every step count must be >= 1 (and at least one is needed)");
    Ok(())
}

/// The reference for a run, computed (or read from the cache) with `inception`.
pub fn reference(data: &DataConfig, eval: &EvalConfig, inception: &Inception) -> Result<Reference> {
    if let Some(npz) = &eval.reference.npz {
        let npz = PathBuf::from(expand_env(&npz.display().to_string()).context("eval.reference.npz")?);
        return Reference::from_npz(&npz);
    }
    if let Some((root, layout)) = reference_folder(data, eval)? {
        return folder_reference(inception, &root, layout, data.image_size() as u32, eval.reference.num_images);
    }
    let dataset = eval.reference.dataset.unwrap_or(data.data_set());
    let spec = SplitSpec {
        dataset: dataset.name().parse::<RefDataset>()?,
        split: match eval.reference.split.unwrap_or(SplitName::Test) {
            SplitName::Train => Split::Train,
            SplitName::Test => Split::Test,
        },
        num_images: eval.reference.num_images,
        image_size: if data.is_builtin() { data.image_size() } else { crate::data::idx::PADDED },
    };
    let (r, cached) = Reference::from_split(inception, &spec, &fid::default_cache_dir())?;
    tracing::info!("reference statistics {} ({})", r.name, if cached { "cached" } else { "computed and cached" });
    Ok(r)
}

/// The image folder reference statistics come from, if any: `eval.reference.folder`, else the run's
/// image folder or the source folder of its latents.
fn reference_folder(data: &DataConfig, eval: &EvalConfig) -> Result<Option<(PathBuf, Layout)>> {
    if let Some(f) = &eval.reference.folder {
        return Ok(Some((PathBuf::from(expand_env(f).context("eval.reference.folder")?), eval.reference.layout.unwrap_or(Layout::ClassFolders))));
    }
    if eval.reference.dataset.is_some_and(|d| d.is_builtin()) {
        return Ok(None);
    }
    data.source_folder()
}

/// Reference statistics of an image folder (ADM center crop at `size`, no flips), from
/// `num_images` evenly spaced files of the sorted listing (default all); unreadable files are
/// skipped. Cached by listing sha256, size, count, convention and Inception weights.
pub fn folder_reference(inception: &Inception, root: &Path, layout: Layout, size: u32, num_images: Option<usize>) -> Result<Reference> {
    let folder = ImageFolder::scan(root, layout)?;
    let n = num_images.unwrap_or(folder.len());
    ensure!((2..=folder.len()).contains(&n), "{}: asked for {n} reference images, the folder has {}", root.display(), folder.len());
    let identity = format!("folder:{}:{}:{size}:adm_center_crop", folder.listing_sha256(), folder.len());
    let key = fid::stats_cache_key(&identity, n, inception.preprocess(), inception.weights_sha256());
    let name = format!("{}-{size}", root.file_name().and_then(|f| f.to_str()).unwrap_or("folder"));
    let cache = fid::default_cache_dir().join(format!("{name}-{}-{}.npz", inception.preprocess().name(), &key[..16]));
    let (mut r, _) = fid::cached_reference(&cache, n, || folder_features(inception, &folder, n, size))?;
    r.name = format!("{name} ({n} images)");
    r.preprocess = Some(inception.preprocess());
    Ok(r)
}

/// Inception features of `n` evenly spaced images of `folder` (ADM center crop at `size`).
fn folder_features(inception: &Inception, folder: &ImageFolder, n: usize, size: u32) -> Result<Reference> {
    let picks: Vec<i64> = (0..n).map(|i| (i * folder.len() / n) as i64).collect();
    let skips = SkipLog::default();
    let mut feats = vec![];
    for chunk in picks.chunks(inception.batch_size().max(1)) {
        let b = load_batch(folder, chunk, &vec![false; chunk.len()], size, &skips)?;
        let (x, _) = b.to_tensors(size as i64, Device::Cpu);
        feats.push(inception.features(&x)?);
    }
    if skips.count() > 0 {
        tracing::warn!("{} unreadable reference images replaced by their next readable neighbour", skips.count());
    }
    Reference::from_features("folder", Some(inception.preprocess()), Tensor::cat(&feats, 0))
}

/// What an evaluation reads from a run's config (see `ExperimentConfig::eval_inputs`): the model
/// (sample shape, weights to load), the data (classes, reference statistics), the VAE of a latent
/// run, the resolved sampler and the seed of the evaluation noise.
#[derive(Debug, Clone)]
pub struct EvalInputs<'a> {
    pub model: &'a ModelConfig,
    pub data: &'a DataConfig,
    pub vae: &'a Option<VaeSection>,
    pub sampler: Sampler,
    pub seed: u64,
}

/// The Inception network, reference statistics and (for latent runs) the VAE of an evaluation,
/// loaded once and reused (e.g. at every `eval.every` steps of a training run).
pub struct Evaluator {
    inception: Inception,
    /// Rank 0's (the ranks that only generate need none).
    reference: Option<fid::Reference>,
    world: &'static World,
    /// `[eval].seeds`.
    seeds: u64,
    vae: Option<flowmap_models::vae::Vae>,
    settings: EvalSettings,
}

impl Evaluator {
    /// Loads what an evaluation by `world` needs: Inception on every rank, the reference
    /// statistics on rank 0.
    pub fn new(run: &EvalInputs, eval: &EvalConfig, world: &'static World, device: Device) -> Result<Self> {
        let inception = Inception::load(device, eval.preprocess)?.with_batch_size(eval.batch);
        let reference = match world.is_main() {
            true => Some(reference(run.data, eval, &inception)?),
            false => None,
        };
        // Latent-space runs: decode with the VAE before the Inception network.
        let vae = crate::data::vae::for_run(run.vae, run.data).map(|v| v.load(device)).transpose()?;
        let settings = EvalSettings { num_samples: eval.num_samples, generate_batch: eval.batch, kid: eval.kid.then(KidSettings::default) };
        Ok(Self { inception, reference, world, vae, settings, seeds: eval.seeds })
    }

    /// FID (and KID) of `net` at `steps` with the run's sampler, appended to `<run>/fid.csv` with
    /// `train_step`, the step count and the NFE counted while sampling. Noise and labels are fixed
    /// by (seed, chunk), so every step count and every training step sees the same inputs, a
    /// re-evaluation gives the same numbers, and so does any number of ranks (each generates its
    /// share of the chunks; rank 0 scores, writes and returns the rows, see [`fid::evaluate_steps`]).
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(&self, run_cfg: &EvalInputs, net: &dyn VelocityField, weights: Weights, train_step: u64, steps: &[usize], run: &Path, device: Device) -> Result<Vec<FidRow>> {
        check_steps(steps, "step counts")?;
        let shape = run_cfg.model.sample_shape();
        let num_classes = run_cfg.data.num_classes();
        let null = net.null_class();
        let batch = self.settings.generate_batch;
        let csv = RunDir::new(run).fid_csv();
        let mut rows = Vec::new();
        for eval_seed in 0..self.seeds {
            // Seed 0 is the run's own stream; the others are derived from it.
            let base = if eval_seed == 0 { run_cfg.seed } else { rng::seed(run_cfg.seed, eval_seed, Stream::EvalSeed) as u64 };
            let setting = SampleSetting { train_step, cfg_scale: run_cfg.sampler.cfg_scale, weights: weights.name().into(), eval_seed };
            let generate = |s: usize, chunk: usize, n: usize| -> Result<fid::Sampled> {
                rng::reseed(base, chunk as u64, Stream::Eval);
                let noise = crate::eval::sampling::noise(n as i64, &shape, device);
                let class = crate::eval::sampling::cycled_classes(n as i64, (chunk * batch) as i64, num_classes, null, device);
                let generated = run_cfg.sampler.generate_counted(net, noise, &class, s);
                Ok(fid::Sampled { images: crate::data::vae::to_pixels(self.vae.as_ref(), generated.x.to_kind(Kind::Float)), nfe: Some(generated.nfe) })
            };
            rows.extend(fid::evaluate_steps(&self.inception, self.reference.as_ref(), self.world, steps, &setting, &self.settings, Some(&csv), generate)?);
        }
        Ok(rows)
    }
}

/// Evaluates the newest complete checkpoint of a trained run (see [`Evaluator::evaluate`]).
/// `eval` and `steps` are checked first (nothing is loaded, computed or written on an error).
pub fn evaluate_run(run: &Path, run_cfg: &EvalInputs, eval: &EvalConfig, weights: Weights, steps: &[usize], device: Device) -> Result<Vec<FidRow>> {
    evaluate_run_into(run, run, run_cfg, eval, weights, steps, device)
}

/// [`evaluate_run`] of the weights (and AMED predictor or optimised grid) of `run`, with the
/// rows appended to `csv_dir`'s `fid.csv`: `flowmap table` rows that sample one trained run with
/// several samplers keep their rows apart.
pub fn evaluate_run_into(run: &Path, csv_dir: &Path, run_cfg: &EvalInputs, eval: &EvalConfig, weights: Weights, steps: &[usize], device: Device) -> Result<Vec<FidRow>> {
    check_steps(steps, "--steps")?;
    eval.validate()?;
    let ck = crate::run::checkpoint::CheckpointDir::new(RunDir::new(run).checkpoints(), 1).latest()?.with_context(|| format!("{} has no complete checkpoint to evaluate", run.display()))?;
    let world = World::global(device)?;
    let device = world.device(device);
    let mut sampler = run_cfg.sampler.clone();
    sampler.attach_run(run, device)?;
    sampler.check_steps(steps)?;
    let inputs = EvalInputs { model: run_cfg.model, data: run_cfg.data, vae: run_cfg.vae, sampler, seed: run_cfg.seed };
    let net = load_run_weights(run, run_cfg.model, weights, device)?;
    Evaluator::new(&inputs, eval, world, device)?.evaluate(&inputs, net.net.as_ref(), weights, ck.step, steps, csv_dir, device)
}
