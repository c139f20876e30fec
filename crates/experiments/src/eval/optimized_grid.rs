//! Time grids optimised for one trained run at fixed step counts (flowmap_core::grid_search),
//! saved under the run as `grids/<name>.toml` by `flowmap optimize-grid` and walked whenever
//! `[sampling] optimized_grid = "<name>"` (or `--grid <name>` of `sample` / `fid`) samples one of
//! its step counts. The file records the rule it was optimised for; sampling it with another
//! rule is an error, as is a step count it has no grid for.
//!
//! The objective of the search is the mean squared distance of the N-step samples to a
//! many-step reference solution (Heun, or DPM-Solver++(3M) for eps models) from the same noise:
//! fitted on one noise batch, reported on a second, held-out one.
use crate::config::ExperimentConfig;
use crate::eval::sampling::{check_time_grid, cycled_classes, noise, Weights};
use crate::run::rng::{self, Stream};
use anyhow::{ensure, Context, Result};
use flowmap_core::{grid_error, search_grid, Guided, RuleName, StepRule};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

/// A grid file: the rule and reference it was fitted with, and one grid per step count.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GridFile {
    /// the rule every grid was optimised for (`[sampling] rule` must match)
    pub rule: RuleName,
    /// the many-step reference: its rule and uniform step count
    pub reference_rule: RuleName,
    pub reference_steps: usize,
    /// noise samples of the fit and of the held-out check
    pub samples: i64,
    /// ema | online: the weights it was fitted on
    pub weights: Weights,
    pub grids: Vec<SavedGrid>,
}

/// One optimised grid and its errors (mean squared distance to the reference samples).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SavedGrid {
    pub steps: usize,
    /// 1 = t_0 > … > t_N = 0
    pub times: Vec<f64>,
    /// the grid the search started from (`[sampling] grid` of the run) and its times
    pub start: Vec<f64>,
    pub fit_error: f64,
    pub fit_start_error: f64,
    pub held_out_error: f64,
    pub held_out_start_error: f64,
}

/// `<run>/grids/<name>.toml`.
pub fn grid_file(run: &Path, name: &str) -> PathBuf {
    run.join("grids").join(format!("{name}.toml"))
}

/// A grid name is a file stem: non-empty, letters, digits, '-', '_' or '.' only, not starting with '.'.
pub fn check_name(name: &str, key: &str) -> Result<()> {
    ensure!(
        !name.is_empty() && !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "{key} = {name:?}: a grid name is a file stem under <run>/grids/ (letters, digits, '-', '_', '.'; not starting with '.')"
    );
    Ok(())
}

impl GridFile {
    /// Reads and checks `<run>/grids/<name>.toml`; errors name the file (and `key`, the setting
    /// that asked for it).
    pub fn read(run: &Path, name: &str, key: &str) -> Result<Self> {
        check_name(name, key)?;
        let path = grid_file(run, name);
        ensure!(path.exists(), "{key} = {name:?}: {} does not exist; make it with `flowmap optimize-grid --run {} --name {name} --steps …`", path.display(), run.display());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: GridFile = toml::from_str(&text).with_context(|| format!("{key} = {name:?}: {} is not a grid file", path.display()))?;
        file.validate().with_context(|| format!("{key} = {name:?}: {}", path.display()))?;
        Ok(file)
    }

    /// Every grid valid (1 → 0, strictly descending, its `steps` matching its length), no step
    /// count twice.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.grids.is_empty(), "no [[grids]]");
        for (i, g) in self.grids.iter().enumerate() {
            check_time_grid(&g.times).with_context(|| format!("grids[{i}].times"))?;
            ensure!(g.times.len() == g.steps + 1, "grids[{i}]: steps = {} but times has {} points (steps + 1 expected)", g.steps, g.times.len());
            ensure!(self.grids[..i].iter().all(|o| o.steps != g.steps), "grids[{i}]: a second grid for steps = {}", g.steps);
        }
        Ok(())
    }

    /// The grid of `steps` steps, if the file has one.
    pub fn times(&self, steps: usize) -> Option<&[f64]> {
        self.grids.iter().find(|g| g.steps == steps).map(|g| g.times.as_slice())
    }

    /// The step counts it has grids for.
    pub fn step_counts(&self) -> Vec<usize> {
        self.grids.iter().map(|g| g.steps).collect()
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = format!("# written by `flowmap optimize-grid`; walked when [sampling] optimized_grid names this file\n{}", toml::to_string(self)?);
        crate::run::atomic_file::write_atomic(path, text.as_bytes())
    }
}

/// What `flowmap optimize-grid` searches.
#[derive(Debug, Clone)]
pub struct GridSearchRequest {
    pub name: String,
    pub steps: Vec<usize>,
    /// default: the run's sampling rule
    pub rule: Option<RuleName>,
    /// noise samples for the fit, and as many again held out
    pub samples: i64,
    pub reference_steps: usize,
    /// coordinate sweeps and golden-section evaluations per time per sweep
    pub sweeps: usize,
    pub probes: usize,
    pub weights: Weights,
}

impl GridSearchRequest {
    pub fn new(name: &str, steps: Vec<usize>) -> Self {
        Self { name: name.into(), steps, rule: None, samples: 256, reference_steps: 128, sweeps: 3, probes: 8, weights: Weights::Ema }
    }
}

/// Searches one grid per requested step count for the newest checkpoint of `run` and writes
/// `<run>/grids/<name>.toml`; returns its path and contents.
pub fn optimize_run_grid(run: &Path, cfg: &ExperimentConfig, req: &GridSearchRequest, device: Device) -> Result<(PathBuf, GridFile)> {
    check_name(&req.name, "--name")?;
    ensure!(!req.steps.is_empty() && req.steps.iter().all(|&s| (1..=64).contains(&s)), "--steps {:?}: give step counts in 1..=64", req.steps);
    ensure!(req.samples >= 1, "--samples = {}: must be >= 1", req.samples);
    ensure!(req.reference_steps >= 2, "--reference-steps = {}: must be >= 2", req.reference_steps);
    ensure!(req.probes >= 2, "--probes = {}: must be >= 2", req.probes);
    let mut sampling = cfg.sampling.clone();
    sampling.optimized_grid = None;
    if let Some(r) = req.rule {
        sampling.rule = Some(r);
    }
    let sampler = sampling.resolve(&cfg.objective).context("optimize-grid --rule")?;
    ensure!(sampler.rule != StepRule::Amed, "optimize-grid: the amed rule chooses its own intermediate times; optimise a grid for euler, heun, dpm_solver_pp_2m, … (--rule)");
    let prediction = cfg.objective.default_sampler().prediction;
    let reference_name = if prediction.accepts(RuleName::Heun) { RuleName::Heun } else { RuleName::DpmSolverPp3M };
    let reference_rule = reference_name.step_rule_for(prediction, None)?;
    let model = crate::run::model::load_run_weights(run, &cfg.model, req.weights, device)?;
    let path = sampler.path.build();
    let guided = Guided::new(model.net.as_ref(), sampler.cfg_scale);
    let shape = cfg.model.sample_shape();
    let null = model.net.null_class();
    // Fit and held-out noise from their own stream.
    rng::reseed(cfg.run.seed, 7, Stream::Eval);
    let draw = |start: i64| (noise(req.samples, &shape, device), cycled_classes(req.samples, start, cfg.data.num_classes(), null, device));
    let (fit_noise, fit_class) = draw(0);
    let (held_noise, held_class) = draw(req.samples);
    let reference = |n: &tch::Tensor, c: &tch::Tensor| tch::no_grad(|| flowmap_core::sample(&guided, path.as_ref(), n.copy(), c, &flowmap_core::uniform_grid(req.reference_steps), reference_rule));
    let (fit_ref, held_ref) = (reference(&fit_noise, &fit_class), reference(&held_noise, &held_class));
    let mut grids = Vec::new();
    for &steps in &req.steps {
        let start = sampler.grid(steps);
        let found = search_grid(&start, req.sweeps, req.probes, |g| grid_error(&guided, path.as_ref(), sampler.rule, &fit_noise, &fit_class, &fit_ref, g));
        let held = |g: &[f64]| grid_error(&guided, path.as_ref(), sampler.rule, &held_noise, &held_class, &held_ref, g);
        let saved = SavedGrid { steps: start.len() - 1, held_out_error: held(&found.times), held_out_start_error: held(&start), times: found.times, start, fit_error: found.error, fit_start_error: found.start_error };
        tracing::info!("{} steps: grid {:?}; held-out error {:.4e} (start {:.4e})", saved.steps, saved.times, saved.held_out_error, saved.held_out_start_error);
        grids.push(saved);
    }
    let file = GridFile { rule: sampler.rule.name(), reference_rule: reference_name, reference_steps: req.reference_steps, samples: req.samples, weights: req.weights, grids };
    file.validate()?;
    let out = grid_file(run, &req.name);
    file.write(&out)?;
    Ok((out, file))
}
