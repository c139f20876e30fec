//! `flowmap reflow-pairs`: stage one of two-stage reflow (Liu et al., arXiv 2209.03003). Draws
//! noise, maps it through a trained run's sampler (its `[sampling]` rule and guidance, at a chosen
//! step count) and stores the couplings (noise, sample, class) as safetensors; a `reflow` run then
//! trains on them through `data.reflow_pairs`.
use crate::config::ExperimentConfig;
use crate::data::reflow_pairs::{generate_pairs, Pairs};
use crate::eval::sampling::Weights;
use crate::run::model::load_run_weights;
use crate::run::rng::{self, Stream};
use anyhow::{ensure, Result};
use std::path::Path;
use tch::Device;

/// What `flowmap reflow-pairs` asks for.
#[derive(Debug, Clone, Copy)]
pub struct PairsRequest {
    /// Couplings to generate.
    pub count: i64,
    /// Sampling steps of the run's `[sampling]` rule.
    pub steps: usize,
    /// Couplings per sampler call.
    pub batch: i64,
    pub weights: Weights,
}

impl PairsRequest {
    /// Range checks (errors name the `flowmap reflow-pairs` argument).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.count >= 1, "--count {}: must be >= 1", self.count);
        ensure!(self.steps >= 1, "--steps {}: must be >= 1", self.steps);
        ensure!(self.batch >= 1, "--batch {}: must be >= 1", self.batch);
        Ok(())
    }
}

/// Generates `req.count` couplings with `req.steps` sampling steps and writes them to `out`.
/// Labels cycle through the classes (all null for an unconditional run). Seeded by (run.seed,
/// Eval stream). The request is checked before anything is loaded.
pub fn make_pairs(run: &Path, cfg: &ExperimentConfig, req: &PairsRequest, out: &Path, device: Device) -> Result<Pairs> {
    req.validate()?;
    let PairsRequest { count, steps, batch, weights } = *req;
    let net = load_run_weights(run, &cfg.model, weights, device)?;
    let num_classes = cfg.data.num_classes();
    let null = net.net.null_class();
    let mut next = 0i64;
    let classes = |n: i64| {
        let c = crate::eval::sampling::cycled_classes(n, next, num_classes, null, Device::Cpu);
        next += n;
        c
    };
    let mut sampler = cfg.sampler()?;
    sampler.attach_run(run, device)?;
    sampler.check_steps(&[steps])?;
    rng::reseed(cfg.run.seed, 0, Stream::Eval);
    let pairs = generate_pairs(count, batch, &cfg.model.sample_shape(), device, classes, |noise, class| sampler.generate(net.net.as_ref(), noise.shallow_clone(), class, steps), Some(out))?;
    tracing::info!("{count} couplings ({steps} steps; {sampler}) written to {}", out.display());
    Ok(pairs)
}
