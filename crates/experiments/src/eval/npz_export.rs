//! `flowmap export-samples`: N samples of a trained run per step count as an ADM sample batch
//! (`samples_{N}x{H}x{W}x3.npz`: `arr_0` uint8 (N, H, W, 3), `arr_1` the class labels of a
//! conditional run), for the ADM evaluator (`flowmap evaluate`, or openai/guided-diffusion's
//! `evaluator.py` itself).
//!
//! * **Streaming.** Samples are made and written one shard (`--shard-size` images) at a time, and
//!   the merged file is written from the shards in chunks: 50k 256×256 images never sit in memory.
//! * **Resumable.** Shards are written atomically under `steps{S}/shards/`; a second call keeps the
//!   shards that are complete and makes the rest. `steps{S}/manifest.json` records what was asked
//!   (checkpoint, weights, sampler, CFG scale, seed, N, shard and batch size); a call that asks for
//!   something else stops with the differences instead of mixing two sets.
//! * **Sharded over ranks.** Under `flowmap launch` / torchrun, rank k makes shards k, k + W, …;
//!   after a barrier rank 0 merges them (the ranks must share the output folder). Sample i's noise
//!   and label are functions of (seed, i) only, a shard is always generated in the same batches,
//!   and what a stochastic rule draws is seeded by (seed, the batch's first index), so any number
//!   of ranks writes the same bytes as one process.
//! * **Labels** are drawn uniformly at random per sample (the FID-50k protocol, DiT `sample_ddp.py`).
use crate::config::ExperimentConfig;
use crate::eval::adm::sample_batch::{read_labels, to_hwc_u8, write_batch, BatchWriter, ImageArrayReader};
use crate::eval::sampling::Weights;
use crate::run::model::load_run_weights;
use crate::run::rng::{self, Stream};
use crate::run::run_dir::RunDir;
use crate::run::world::World;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const FORMAT: &str = "flowmap-npz-export v1";

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// step counts (one batch each), each >= 1
    pub steps: Vec<usize>,
    /// samples per step count
    pub num: usize,
    pub weights: Weights,
    /// default: the run's `sampling.cfg_scale`
    pub cfg_scale: Option<f64>,
    pub seed: u64,
    /// images per shard file (the unit of resuming and of sharding over ranks)
    pub shard_size: usize,
    /// images per sampler call
    pub batch: usize,
    /// default: `<run>/samples/npz`
    pub out: Option<PathBuf>,
}

impl ExportRequest {
    /// Range checks (errors name the `flowmap export-samples` argument).
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.steps.is_empty() && self.steps.iter().all(|&s| s >= 1), "--steps {:?}: every step count must be >= 1 (and at least one is needed)", self.steps);
        ensure!(self.num >= 1, "--num {}: must be >= 1", self.num);
        ensure!(self.shard_size >= 1, "--shard-size {}: must be >= 1", self.shard_size);
        ensure!(self.batch >= 1, "--batch {}: must be >= 1", self.batch);
        if let Some(w) = self.cfg_scale {
            ensure!(w.is_finite(), "--cfg-scale {w}: must be a finite number (1 = no guidance)");
        }
        Ok(())
    }
}

/// `steps{S}/manifest.json`: everything that decides the bytes of the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportManifest {
    pub format: String,
    pub checkpoint_step: u64,
    pub weights: String,
    pub sampler: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub seed: u64,
    pub num: usize,
    pub shard_size: usize,
    pub batch: usize,
    /// (H, W) of the saved images
    pub image_size: [i64; 2],
    /// "uniform" (conditional run) or "none"
    pub labels: String,
}

impl ExportManifest {
    /// The fields in which `self` differs from `other`, as `name: old -> new`.
    fn differences(&self, other: &Self) -> Vec<String> {
        let (a, b) = (serde_json::to_value(self).unwrap_or_default(), serde_json::to_value(other).unwrap_or_default());
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec![] };
        a.iter().filter(|(k, v)| b.get(*k) != Some(v)).map(|(k, v)| format!("{k}: {v} -> {}", b.get(k).cloned().unwrap_or_default())).collect()
    }

    fn shards(&self) -> usize {
        self.num.div_ceil(self.shard_size)
    }

    /// Rows of shard k.
    fn shard_rows(&self, k: usize) -> std::ops::Range<usize> {
        k * self.shard_size..((k + 1) * self.shard_size).min(self.num)
    }
}

/// Where the files of one step count go.
#[derive(Debug, Clone)]
pub struct ExportPaths {
    pub dir: PathBuf,
}

impl ExportPaths {
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }
    pub fn shard(&self, k: usize) -> PathBuf {
        self.dir.join("shards").join(format!("shard_{k:06}.npz"))
    }
    /// The merged batch, named as guided-diffusion's `image_sample.py` names its output.
    pub fn merged(&self, m: &ExportManifest) -> PathBuf {
        self.dir.join(format!("samples_{}x{}x{}x3.npz", m.num, m.image_size[0], m.image_size[1]))
    }
}

/// The label of sample `i` of a `num_classes`-way run: uniform, a function of (seed, i).
pub fn sample_label(seed: u64, i: usize, num_classes: i64) -> i64 {
    (rng::seed(seed, i as u64, Stream::ExportLabel) as u64 % num_classes as u64) as i64
}

/// The noise of samples `rows` (n, ...): sample i from its own (seed, i) stream.
fn sample_noise(seed: u64, rows: std::ops::Range<usize>, shape: &[i64], device: Device) -> Tensor {
    let noise: Vec<Tensor> = rows
        .map(|i| {
            rng::reseed(seed, i as u64, Stream::ExportNoise);
            crate::eval::sampling::noise(1, shape, Device::Cpu)
        })
        .collect();
    Tensor::cat(&noise, 0).to_device(device)
}

/// Whether shard `path` holds exactly `rows` images of `size` (and labels iff `labelled`).
fn shard_complete(path: &Path, rows: usize, size: [i64; 2], labelled: bool) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let r = ImageArrayReader::open(path)?;
    ensure!(r.num == rows && [r.height as i64, r.width as i64] == size && r.channels == 3, "holds ({}, {}, {}, {}) images, expected ({rows}, {}, {}, 3)", r.num, r.height, r.width, r.channels, size[0], size[1]);
    let labels = read_labels(path)?;
    ensure!(labels.as_ref().map(|l| l.len()) == labelled.then_some(rows), "has {:?} labels, expected {}", labels.map(|l| l.len()), if labelled { rows } else { 0 });
    Ok(true)
}

/// Writes the batches; returns the merged file of each step count (on every rank).
pub fn export_samples(run: &Path, cfg: &ExperimentConfig, req: &ExportRequest, device: Device) -> Result<Vec<PathBuf>> {
    req.validate()?;
    let world = World::global(device)?;
    let device = world.device(device);
    let ck = crate::run::checkpoint::CheckpointDir::new(RunDir::new(run).checkpoints(), 1).latest()?.with_context(|| format!("{} has no complete checkpoint to sample from", run.display()))?;
    let net = load_run_weights(run, &cfg.model, req.weights, device)?;
    let mut sampler = cfg.sampler()?;
    if let Some(w) = req.cfg_scale {
        sampler.cfg_scale = w;
    }
    sampler.attach_run(run, device)?;
    sampler.check_steps(&req.steps)?;
    let vae = crate::data::vae::for_run(&cfg.vae, &cfg.data).map(|v| v.load(device)).transpose()?;
    let num_classes = cfg.data.num_classes();
    let shape = cfg.model.sample_shape();
    let out = req.out.clone().unwrap_or_else(|| RunDir::new(run).samples().join("npz"));
    // The saved image size: decode one latent-sized zero to learn it without sampling.
    let image_size = {
        let _guard = tch::no_grad_guard();
        let probe = crate::data::vae::to_pixels(vae.as_ref(), Tensor::zeros(std::iter::once(1).chain(shape.iter().copied()).collect::<Vec<_>>(), (Kind::Float, device)));
        [probe.size()[2], probe.size()[3]]
    };
    let mut merged = Vec::new();
    for &steps in &req.steps {
        let paths = ExportPaths { dir: out.join(format!("steps{steps}")) };
        let manifest = ExportManifest {
            format: FORMAT.into(),
            checkpoint_step: ck.step,
            weights: req.weights.name().into(),
            sampler: sampler.to_string(),
            steps,
            cfg_scale: sampler.cfg_scale,
            seed: req.seed,
            num: req.num,
            shard_size: req.shard_size,
            batch: req.batch,
            image_size,
            labels: if num_classes > 0 { "uniform" } else { "none" }.into(),
        };
        // Rank 0 writes or checks the manifest; then every rank checks it (a shared folder).
        if world.is_main() {
            match std::fs::read_to_string(paths.manifest()) {
                Ok(text) => check_manifest(&paths, &text, &manifest)?,
                Err(_) => crate::run::atomic_file::write_atomic(&paths.manifest(), (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes())?,
            }
        }
        world.barrier()?;
        let text = std::fs::read_to_string(paths.manifest()).with_context(|| format!("reading {} (the ranks must share the output folder)", paths.manifest().display()))?;
        check_manifest(&paths, &text, &manifest)?;
        let target = paths.merged(&manifest);
        if target.exists() && world.is_main() {
            tracing::info!("{} exists (complete); not sampling again", target.display());
        }
        if !target.exists() {
            let start = std::time::Instant::now();
            let mut made = 0;
            for k in (world.rank()..manifest.shards()).step_by(world.size()) {
                let rows = manifest.shard_rows(k);
                let path = paths.shard(k);
                match shard_complete(&path, rows.len(), image_size, num_classes > 0) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("shard {} is unusable ({e:#}); making it again", path.display()),
                }
                let mut images = Vec::new();
                let mut labels = Vec::new();
                for first in rows.clone().step_by(req.batch) {
                    let sub = first..(first + req.batch).min(rows.end);
                    let noise = sample_noise(req.seed, sub.clone(), &shape, device);
                    let class: Vec<i64> = sub.clone().map(|i| if num_classes > 0 { sample_label(req.seed, i, num_classes) } else { net.net.null_class() }).collect();
                    // Stochastic rules (DDPM ancestral, SDE, consistency re-noising) draw from here.
                    rng::reseed(req.seed, first as u64, Stream::ExportSampler);
                    let x = sampler.generate(net.net.as_ref(), noise, &Tensor::from_slice(&class).to_device(device), steps);
                    images.push(to_hwc_u8(&crate::data::vae::to_pixels(vae.as_ref(), x.to_kind(Kind::Float))));
                    labels.extend(class);
                }
                write_batch(&path, &Tensor::cat(&images, 0), (num_classes > 0).then_some(labels.as_slice()))?;
                made += rows.len();
                tracing::info!(steps, shard = k, shards = manifest.shards(), images = made, per_s = made as f64 / start.elapsed().as_secs_f64(), "wrote {}", path.display());
            }
            world.barrier()?;
            if world.is_main() {
                merge(&paths, &manifest, num_classes > 0)?;
                tracing::info!("{} samples with {steps} steps → {}", manifest.num, target.display());
            }
            world.barrier()?;
        }
        merged.push(target);
    }
    Ok(merged)
}

fn check_manifest(paths: &ExportPaths, text: &str, want: &ExportManifest) -> Result<()> {
    let have: ExportManifest = serde_json::from_str(text).with_context(|| format!("reading {}", paths.manifest().display()))?;
    let diff = have.differences(want);
    if !diff.is_empty() {
        bail!("{} holds an export made with other settings ({}); choose another --out or remove that folder", paths.dir.display(), diff.join("; "));
    }
    Ok(())
}

/// Concatenates the shards into the merged batch (atomically; shards are read in chunks).
fn merge(paths: &ExportPaths, m: &ExportManifest, labelled: bool) -> Result<()> {
    let target = paths.merged(m);
    let mut labels = Vec::new();
    crate::run::atomic_file::write_atomic_with(&target, |file| {
        let mut w = BatchWriter::new(BufWriter::with_capacity(1 << 20, file), m.num as u64, m.image_size[0] as u64, m.image_size[1] as u64)?;
        for k in 0..m.shards() {
            let path = paths.shard(k);
            ensure!(shard_complete(&path, m.shard_rows(k).len(), m.image_size, labelled)?, "shard {} is missing", path.display());
            let mut r = ImageArrayReader::open(&path)?;
            while let Some(rows) = r.next_u8(256)? {
                w.write_rows(&rows)?;
            }
            if labelled {
                labels.extend(read_labels(&path)?.unwrap_or_default());
            }
        }
        w.finish(labelled.then_some(labels.as_slice()))?;
        Ok(())
    })
}
