//! `[sampling]`: how a run turns noise into samples for grids, `sample`, reflow pairs and FID.
//!
//! The objective names its sampler (the path it trains on and its paper's rule,
//! `ObjectiveConfig::default_sampler`); `[sampling].rule` and `.path` are optional overrides,
//! checked against it. [`SamplingConfig::resolve`] is the one place that combines the two: every
//! caller samples through the [`Sampler`] it returns (`ExperimentConfig::sampler`).
use crate::eval::amed_weights::AmedWeights;
use crate::eval::optimized_grid::GridFile;
use anyhow::{ensure, Context, Result};
use flowmap_core::{amed_sample, check_grid, sample, Diffusion, GridKind, Guided, InterpolantConfig, NfeCounter, RuleName, StepRule, VelocityField};
use flowmap_objectives::ObjectiveConfig;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use tch::{Device, Kind, Tensor};

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
    /// euler | heun | jump | ddim | ddpm_ancestral | sde | renoise | dpm_solver_pp_2m |
    /// dpm_solver_pp_3m | unipc | trig_flow | amed (runs of objective.kind = "amed" only); default:
    /// the objective's (flow_matching, reflow: euler; ddpm: ddim; consistency_*: renoise; scm_*:
    /// trig_flow; the others: jump). The multistep solvers read velocity
    /// (flow_matching, reflow) or eps (ddpm) models.
    #[serde(default)]
    pub rule: Option<RuleName>,
    /// the interpolant; default (and the only value allowed): the one the objective trains on
    #[serde(default)]
    pub path: Option<InterpolantConfig>,
    /// g(t) for rule = "sde"
    #[serde(default)]
    pub diffusion: Option<Diffusion>,
    /// step counts for grids and FID; default [1, 2, 4, 8, 16]
    #[serde(default = "default_steps")]
    pub steps: Vec<usize>,
    /// the grid for each step count: { kind = "uniform" } (default), { kind = "logsnr" } or
    /// { kind = "edm", rho = 7.0 } (both with optional sigma_min = 0.002, sigma_max = 80: VE noise
    /// levels sigma/alpha; see flowmap_core::grids)
    #[serde(default)]
    pub grid: GridKind,
    /// explicit times 1 = t_0 > … > t_N = 0, walked instead of `grid` whenever N steps are
    /// sampled (N must be in `steps`; the other step counts use `grid`); default none, except
    /// scm_*: [1, 2·objective.mid_tau/π, 0] (sCM's 2-step sampler)
    #[serde(default)]
    pub time_grid: Option<Vec<f64>>,
    /// the name of a grid file `<run>/grids/<name>.toml` made by `flowmap optimize-grid`: its
    /// grids are walked at their step counts (every sampled step count needs one); default none
    #[serde(default)]
    pub optimized_grid: Option<String>,
    /// classifier-free guidance w; 1 = none
    #[serde(default = "one")]
    pub cfg_scale: f64,
    /// [t_min, t_max]: guidance only for t in the interval (a network that takes guidance as an
    /// input, improved MeanFlow's, receives it with cfg_scale); default none (every t)
    #[serde(default)]
    pub cfg_interval: Option<[f64; 2]>,
    /// ema (default) | online
    #[serde(default)]
    pub weights: Weights,
    /// images in each sample grid; default 64
    #[serde(default = "default_grid")]
    pub grid_images: i64,
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

/// A path as one line of TOML with `kind` first (`{ kind = "vp_cosine", offset = 0.008 }`), for
/// messages.
fn inline(path: &InterpolantConfig) -> String {
    match toml::Value::try_from(path) {
        Ok(toml::Value::Table(t)) => {
            let mut fields: Vec<(&String, &toml::Value)> = t.iter().collect();
            fields.sort_by_key(|(k, _)| *k != "kind");
            format!("{{ {} }}", fields.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", "))
        }
        _ => format!("{path:?}"),
    }
}

fn names(rules: &[RuleName]) -> String {
    rules.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
}

impl SamplingConfig {
    /// Checks of this section alone (the objective is checked in [`Self::resolve`]).
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.steps.is_empty() && self.steps.iter().all(|&s| s >= 1), "sampling.steps must be a non-empty list of step counts >= 1, got {:?}", self.steps);
        ensure!(self.rule != Some(RuleName::Sde) || self.diffusion.is_some(), "sampling.rule = \"sde\" needs sampling.diffusion (e.g. {{ kind = \"sigma\", scale = 1.0 }})");
        if let Some(Diffusion::Constant(d) | Diffusion::Sigma(d)) = self.diffusion {
            ensure!(d.scale.is_finite() && d.scale >= 0.0, "sampling.diffusion.scale = {}: must be finite and >= 0", d.scale);
        }
        ensure!(self.cfg_scale.is_finite(), "sampling.cfg_scale = {}: must be a finite number (1 = no guidance)", self.cfg_scale);
        if let Some([lo, hi]) = self.cfg_interval {
            ensure!(0.0 <= lo && lo <= hi && hi <= 1.0, "sampling.cfg_interval = [{lo}, {hi}]: need 0 <= t_min <= t_max <= 1");
        }
        self.grid.validate().with_context(|| format!("sampling.grid = {{ kind = {:?}, … }}", self.grid.name()))?;
        ensure!(self.grid_images >= 1, "sampling.grid_images = {}: must be >= 1", self.grid_images);
        if let Some(grid) = &self.time_grid {
            check_time_grid(grid)?;
            let n = grid.len() - 1;
            ensure!(self.steps.contains(&n), "sampling.time_grid has {n} steps but sampling.steps = {:?} does not include {n}: the grid is walked whenever {n} steps are sampled, so add {n} to sampling.steps", self.steps);
        }
        if let Some(path) = &self.path {
            path.validate().context("sampling.path")?;
        }
        if let Some(name) = &self.optimized_grid {
            crate::eval::optimized_grid::check_name(name, "sampling.optimized_grid")?;
            ensure!(self.time_grid.is_none(), "sampling.optimized_grid and sampling.time_grid are both set: choose one explicit grid");
        }
        Ok(())
    }

    /// The sampler of a run training `objective`: the objective's path and rule, with this
    /// section's overrides. A path other than the one the objective trains on, or a rule that
    /// cannot read what the objective's network predicts, is an error naming both keys.
    pub fn resolve(&self, objective: &ObjectiveConfig) -> Result<Sampler> {
        self.validate()?;
        let native = objective.default_sampler();
        let kind = objective.kind();
        if let Some(path) = &self.path {
            ensure!(
                *path == native.path,
                "sampling.path = {} disagrees with {} (objective.kind = {kind:?}), which trains on the path {}: a model samples on the path it was trained on; leave sampling.path out (the objective's path is used) or set it to the same value",
                inline(path),
                native.path_key,
                inline(&native.path)
            );
        }
        let rule = self.rule.unwrap_or(native.rule);
        ensure!(
            rule != RuleName::Amed || native.rule == RuleName::Amed,
            "sampling.rule = \"amed\" needs a trained AMED step predictor, which objective.kind = {kind:?} does not train: train one with objective.kind = \"amed\" and this run as [teacher] (see the README), and sample that run"
        );
        ensure!(
            native.prediction.accepts(rule),
            "sampling.rule = {:?} cannot sample objective.kind = {kind:?}: its network predicts {}, which the rules {} read ({} by default); leave sampling.rule out or choose one of them",
            rule.name(),
            native.prediction.describe(),
            names(native.prediction.rules()),
            native.rule.name()
        );
        let step_rule = rule.step_rule_for(native.prediction, self.diffusion).context("sampling.rule = \"sde\" needs sampling.diffusion")?;
        // The objective's own grid (sCM's 2-step τ_mid) unless the section names one.
        let time_grid = self.time_grid.clone().or_else(|| objective.default_time_grid());
        Ok(Sampler {
            path: native.path,
            rule: step_rule,
            cfg_scale: self.cfg_scale,
            cfg_interval: self.cfg_interval.map(|[lo, hi]| (lo, hi)),
            grid: self.grid,
            time_grid,
            optimized_grid: self.optimized_grid.clone().map(|name| NamedGrid { name, file: None }),
            amed: None,
        })
    }
}

/// Checks an explicit `sampling.time_grid`: finite, from exactly 1 (noise) strictly down to
/// exactly 0 (data), at least two points.
pub fn check_time_grid(grid: &[f64]) -> Result<()> {
    ensure!(grid.len() >= 2, "sampling.time_grid = {grid:?}: needs at least 2 times (one step), from 1.0 down to 0.0");
    ensure!(grid.iter().all(|t| t.is_finite()), "sampling.time_grid = {grid:?}: every time must be a finite number");
    ensure!(grid[0] == 1.0 && grid[grid.len() - 1] == 0.0, "sampling.time_grid = {grid:?}: must start at 1.0 (noise) and end at 0.0 (data)");
    check_grid(grid).context("sampling.time_grid")
}

/// How a run generates: the path, the step rule, the guidance scale and the optional explicit
/// time grid, resolved from the objective and `[sampling]` ([`SamplingConfig::resolve`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    pub path: InterpolantConfig,
    pub rule: StepRule,
    /// classifier-free guidance w; 1 = none
    pub cfg_scale: f64,
    /// guidance only for t in [lo, hi]; none = every t
    pub cfg_interval: Option<(f64, f64)>,
    /// the grid for step counts `time_grid` does not cover
    pub grid: GridKind,
    /// walked instead of `grid` when its number of steps is sampled
    pub time_grid: Option<Vec<f64>>,
    /// `[sampling] optimized_grid`: its file is read by [`Self::attach_run`]
    pub optimized_grid: Option<NamedGrid>,
    /// the AMED predictor of the `amed` rule, loaded by [`Self::attach_run`] (or set by the
    /// trainer from its live parameters)
    pub amed: Option<AmedWeights>,
}

/// An optimised grid by name, and its file once read.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedGrid {
    pub name: String,
    pub file: Option<GridFile>,
}

/// Samples and what they cost.
#[derive(Debug)]
pub struct Generated {
    pub x: Tensor,
    /// network evaluations per sample, counted by [`NfeCounter`] (a guided step counts 2)
    pub nfe: f64,
}

impl Sampler {
    /// The times of a `steps`-step sampling (`steps` >= 1, which every caller's input check
    /// ensures): the explicit grid if it has `steps` steps, `grid` on the path otherwise.
    pub fn grid(&self, steps: usize) -> Vec<f64> {
        if let Some(times) = self.optimized_grid.as_ref().and_then(|g| g.file.as_ref()).and_then(|f| f.times(steps)) {
            return times.to_vec();
        }
        match &self.time_grid {
            Some(g) if g.len() == steps + 1 => g.clone(),
            _ => self.grid.times(self.path.build().as_ref(), steps),
        }
    }

    /// Samples from `noise` (B, ...) in `steps` steps (see [`Self::grid`]), with guidance if
    /// cfg_scale != 1, and counts the network evaluations per sample.
    pub fn generate_counted(&self, net: &dyn VelocityField, noise: Tensor, class: &Tensor, steps: usize) -> Generated {
        let path = self.path.build();
        let batch = noise.size()[0];
        // The counter sits inside the guidance wrapper, so the one 2B-row guided call counts 2.
        let counter = NfeCounter::new(net);
        let guided = Guided { interval: self.cfg_interval, ..Guided::new(&counter, self.cfg_scale) };
        let x = match (&self.rule, &self.amed) {
            (StepRule::Amed, Some(amed)) => amed_sample(&guided, amed.predictor(), noise, class, &self.grid(steps)),
            (StepRule::Amed, None) => panic!("sampling.rule = \"amed\" without its predictor: call Sampler::attach_run first"),
            _ => sample(&guided, path.as_ref(), noise, class, &self.grid(steps), self.rule),
        };
        Generated { x, nfe: counter.nfe(batch.max(1)) }
    }

    /// Loads what this sampler needs from the run directory `run`: the AMED predictor of the
    /// `amed` rule (from the newest checkpoint) and the `optimized_grid` file. Errors name the
    /// file and the setting.
    pub fn attach_run(&mut self, run: &Path, device: Device) -> Result<()> {
        if self.rule == StepRule::Amed && self.amed.is_none() {
            self.amed = Some(AmedWeights::load(run, device)?);
        }
        if let Some(named) = &mut self.optimized_grid {
            let file = GridFile::read(run, &named.name, "sampling.optimized_grid")?;
            ensure!(
                file.rule == self.rule.name(),
                "sampling.optimized_grid = {:?}: {} was optimised for rule {:?}, but this sampler uses {:?}; sample it with sampling.rule = {:?} or optimise a grid for this rule",
                named.name,
                crate::eval::optimized_grid::grid_file(run, &named.name).display(),
                file.rule.name(),
                self.rule.name().name(),
                file.rule.name()
            );
            named.file = Some(file);
        }
        Ok(())
    }

    /// Checks that every step count in `steps` can be sampled: an optimised grid must have a
    /// grid for each (the error lists the ones it has), and the amed rule needs its predictor.
    pub fn check_steps(&self, steps: &[usize]) -> Result<()> {
        if let Some(NamedGrid { name, file }) = &self.optimized_grid {
            let file = file.as_ref().with_context(|| format!("sampling.optimized_grid = {name:?}: the grid file was not read (Sampler::attach_run)"))?;
            let missing: Vec<usize> = steps.iter().copied().filter(|&s| file.times(s).is_none()).collect();
            ensure!(missing.is_empty(), "sampling.optimized_grid = {name:?} has grids for steps {:?}, not for {missing:?}; run `flowmap optimize-grid` with those --steps", file.step_counts());
        }
        ensure!(self.rule != StepRule::Amed || self.amed.is_some(), "sampling.rule = \"amed\": the run's AMED predictor was not loaded (Sampler::attach_run)");
        Ok(())
    }

    /// [`Self::generate_counted`] without the count.
    pub fn generate(&self, net: &dyn VelocityField, noise: Tensor, class: &Tensor, steps: usize) -> Tensor {
        self.generate_counted(net, noise, class, steps).x
    }
}

impl fmt::Display for Sampler {
    /// `rule heun, path { kind = "linear" }, cfg_scale 1, grid [1.0, 0.5, 0.0] at 2 steps`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}, path {}, cfg_scale {}", self.rule.name().name(), inline(&self.path), self.cfg_scale)?;
        if let Some((lo, hi)) = self.cfg_interval {
            write!(f, ", cfg_interval [{lo}, {hi}]")?;
        }
        if self.grid != GridKind::Uniform {
            write!(f, ", grid {:?}", self.grid)?;
        }
        if let Some(g) = &self.time_grid {
            write!(f, ", grid {g:?} at {} steps ({} otherwise)", g.len() - 1, self.grid.name())?;
        }
        if let Some(g) = &self.optimized_grid {
            write!(f, ", optimized grid {:?}", g.name)?;
        }
        Ok(())
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
