//! `flowmap sample`: images from a trained run at a list of step counts, as PNG grids and as a
//! safetensors file per step count (`images`, (N, C, H, W) float in [−1, 1], and `class`).
//! Runs on VAE latents are decoded to pixels first.
use crate::config::ExperimentConfig;
use crate::eval::sampling::Weights;
use crate::run::model::load_run_weights;
use crate::run::rng::{self, Stream};
use crate::run::run_dir::RunDir;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub steps: Vec<usize>,
    pub num: i64,
    pub weights: Weights,
    pub cfg_scale: Option<f64>,
    /// Class of every image (conditional models); default: cycle through the classes.
    pub class: Option<i64>,
    pub seed: u64,
    pub out: Option<PathBuf>,
}

impl SampleRequest {
    /// Range checks against the run's config (errors name the `flowmap sample` argument).
    pub fn validate(&self, cfg: &ExperimentConfig) -> Result<()> {
        ensure!(!self.steps.is_empty() && self.steps.iter().all(|&s| s >= 1), "--steps {:?}: every step count must be >= 1 (and at least one is needed)", self.steps);
        ensure!(self.num >= 1, "--num {}: must be >= 1", self.num);
        if let Some(w) = self.cfg_scale {
            ensure!(w.is_finite(), "--cfg-scale {w}: must be a finite number (1 = no guidance)");
        }
        let num_classes = cfg.data.num_classes();
        if let Some(c) = self.class {
            ensure!(num_classes > 0, "--class {c}: the run is unconditional (no classes)");
            ensure!((0..num_classes).contains(&c), "--class {c}: must be in 0..={} (the run has {num_classes} classes)", num_classes - 1);
        }
        Ok(())
    }
}

/// Writes `<out>/steps{N}.png` and `<out>/steps{N}.safetensors` for every step count; returns
/// the output folder. The request is checked first (nothing is loaded or written on an error).
pub fn sample_run(run: &Path, cfg: &ExperimentConfig, req: &SampleRequest, device: Device) -> Result<PathBuf> {
    req.validate(cfg)?;
    let out = req.out.clone().unwrap_or_else(|| RunDir::new(run).samples().join("sample"));
    // One noise tensor for all samples: under a data-parallel launch rank 0 samples alone.
    if !crate::run::world::World::global(device)?.is_main() {
        return Ok(out);
    }
    let net = load_run_weights(run, &cfg.model, req.weights, device)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut sampler = cfg.sampler()?;
    if let Some(w) = req.cfg_scale {
        sampler.cfg_scale = w;
    }
    sampler.attach_run(run, device)?;
    sampler.check_steps(&req.steps)?;
    let num_classes = cfg.data.num_classes();
    // Latent runs are decoded with the run's VAE before they are saved.
    let vae = crate::data::vae::for_run(&cfg.vae, &cfg.data).map(|v| v.load(device)).transpose()?;
    let shape = cfg.model.sample_shape();
    for &steps in &req.steps {
        rng::reseed(req.seed, 0, Stream::Eval); // the same noise for every step count
        let noise = crate::eval::sampling::noise(req.num, &shape, device);
        let class = match (req.class, num_classes) {
            (Some(c), _) => Tensor::full([req.num], c, (Kind::Int64, device)),
            (None, k) => crate::eval::sampling::cycled_classes(req.num, 0, k, net.net.null_class(), device),
        };
        let x = crate::data::vae::to_pixels(vae.as_ref(), sampler.generate(net.net.as_ref(), noise, &class, steps).to_kind(Kind::Float)).to_device(Device::Cpu);
        crate::eval::image_grid::save_grid(&x, &out.join(format!("steps{steps}.png")))?;
        let path = out.join(format!("steps{steps}.safetensors"));
        crate::run::atomic_file::write_atomic_to(&path, |tmp| Ok(Tensor::write_safetensors(&[("images", &x), ("class", &class.to_device(Device::Cpu))], tmp)?))?;
        tracing::info!("{} samples with {steps} steps → {}", req.num, path.display());
    }
    Ok(out)
}
