//! `[sampling]`: how a run turns noise into samples for grids, `sample` and FID.
use anyhow::{ensure, Context, Result};
use flowmap_core::{sample, uniform_grid, Diffusion, Guided, InterpolantConfig, NoParams, StepRule, VelocityField};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The step rule of core's sampler, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleName {
    Euler,
    Heun,
    Jump,
    Ddim,
    DdpmAncestral,
    Sde,
    Renoise,
}

/// Which weights generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    #[default]
    Ema,
    Online,
}

impl Weights {
    pub fn name(self) -> &'static str {
        match self {
            Weights::Ema => "ema",
            Weights::Online => "online",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// euler | heun | jump | ddim | ddpm_ancestral | sde | renoise
    pub rule: RuleName,
    /// the interpolant the model was trained on; default linear
    #[serde(default = "default_path")]
    pub path: InterpolantConfig,
    /// g(t) for rule = "sde"
    #[serde(default)]
    pub diffusion: Option<Diffusion>,
    /// step counts for grids and FID; default [1, 2, 4, 8, 16]
    #[serde(default = "default_steps")]
    pub steps: Vec<usize>,
    /// classifier-free guidance w; 1 = none
    #[serde(default = "one")]
    pub cfg_scale: f64,
    /// ema (default) | online
    #[serde(default)]
    pub weights: Weights,
    /// images in each sample grid; default 64
    #[serde(default = "default_grid")]
    pub grid_images: i64,
}

fn default_path() -> InterpolantConfig {
    InterpolantConfig::Linear(NoParams {})
}
fn default_steps() -> Vec<usize> {
    vec![1, 2, 4, 8, 16]
}
fn one() -> f64 {
    1.0
}
fn default_grid() -> i64 {
    64
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.steps.is_empty() && self.steps.iter().all(|&s| s >= 1), "sampling.steps must be a non-empty list of step counts >= 1, got {:?}", self.steps);
        ensure!(self.rule != RuleName::Sde || self.diffusion.is_some(), "sampling.rule = \"sde\" needs sampling.diffusion (e.g. {{ kind = \"sigma\", scale = 1.0 }})");
        if let Some(Diffusion::Constant(d) | Diffusion::Sigma(d)) = self.diffusion {
            ensure!(d.scale.is_finite() && d.scale >= 0.0, "sampling.diffusion.scale = {}: must be finite and >= 0", d.scale);
        }
        ensure!(self.cfg_scale.is_finite(), "sampling.cfg_scale = {}: must be a finite number (1 = no guidance)", self.cfg_scale);
        ensure!(self.grid_images >= 1, "sampling.grid_images = {}: must be >= 1", self.grid_images);
        self.path.validate().context("sampling.path")
    }

    pub fn step_rule(&self) -> StepRule {
        match self.rule {
            RuleName::Euler => StepRule::Euler,
            RuleName::Heun => StepRule::Heun,
            RuleName::Jump => StepRule::Jump,
            RuleName::Ddim => StepRule::Ddim,
            RuleName::DdpmAncestral => StepRule::DdpmAncestral,
            RuleName::Sde => StepRule::Sde { diffusion: self.diffusion.expect("validated") },
            RuleName::Renoise => StepRule::Renoise,
        }
    }

    /// Network evaluations per step (Heun: 2; guidance doubles the batch, not the count).
    pub fn nfe(&self, steps: usize) -> usize {
        if self.rule == RuleName::Heun {
            2 * steps
        } else {
            steps
        }
    }

    /// Samples from `noise` (B, ...) in `steps` uniform steps, with guidance if cfg_scale != 1.
    pub fn generate(&self, net: &dyn VelocityField, noise: Tensor, class: &Tensor, steps: usize) -> Tensor {
        let path = self.path.build();
        let guided = Guided::new(net, self.cfg_scale);
        sample(&guided, path.as_ref(), noise, class, &uniform_grid(steps), self.step_rule())
    }
}

/// Fixed noise and labels for the grids: drawn from their own stream, the same at every step and
/// after a resume. Labels cycle through the classes (all null when unconditional).
pub fn fixed_inputs(seed: u64, n: i64, shape: &[i64], num_classes: i64, null_class: i64, device: Device) -> (Tensor, Tensor) {
    crate::run::rng::reseed(seed, 0, crate::run::rng::Stream::Grid);
    (noise(n, shape, device), cycled_classes(n, 0, num_classes, null_class, device))
}

/// `n` standard-normal samples of `shape` from the global generator, drawn on the CPU and moved to
/// `device`, so that a seed gives the same noise on every device.
pub fn noise(n: i64, shape: &[i64], device: Device) -> Tensor {
    let mut full = vec![n];
    full.extend_from_slice(shape);
    Tensor::randn(full.as_slice(), (Kind::Float, Device::Cpu)).to_device(device)
}

/// Labels for `n` generated samples numbered `start..start + n`: sample i gets class i mod K, so
/// every class is equally represented; all `null_class` when the model is unconditional (K = 0).
pub fn cycled_classes(n: i64, start: i64, num_classes: i64, null_class: i64, device: Device) -> Tensor {
    if num_classes > 0 {
        (Tensor::arange(n, (Kind::Int64, device)) + start).remainder(num_classes)
    } else {
        Tensor::full([n], null_class, (Kind::Int64, device))
    }
}
