//! The experiment config: one TOML file with `[run]`, `[data]`, `[model]`, `[objective]`,
//! `[optimizer]`, `[ema]`, `[sampling]` and optional `[teacher]`, `[eval]`, `[vae]` sections,
//! loaded with `--set` overrides and validated before anything touches the disk. Each section's
//! own checks live beside its type; `ExperimentConfig::validate` adds the cross-section ones.
//! Files in an older form are refused with the edits that fix them ([`migrate`]).
pub mod change;
pub mod migrate;
pub mod overrides;

use crate::data::config::DataConfig;
use crate::eval::sampling::{Sampler, SamplingConfig, Weights};
use crate::run::device::DeviceChoice;
use crate::run::model::ModelConfig;
use crate::train::adamw::AdamWConfig;
use anyhow::{ensure, Context, Result};
use flowmap_objectives::ObjectiveConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole experiment file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub objective: ObjectiveConfig,
    pub optimizer: AdamWConfig,
    #[serde(default)]
    pub ema: EmaConfig,
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub teacher: Option<TeacherConfig>,
    #[serde(default)]
    pub eval: Option<crate::eval::evaluator::EvalConfig>,
    #[serde(default)]
    pub vae: Option<crate::data::vae::VaeSection>,
}

/// `[run]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// run directory name under out_dir
    pub name: String,
    /// base seed of every random stream; default 0
    #[serde(default)]
    pub seed: u64,
    /// optimizer steps
    pub steps: u64,
    /// images per optimizer step, over all ranks (the global batch)
    pub batch_size: i64,
    /// micro-batches each rank accumulates per step (gradient accumulation); the global batch is
    /// split into world size × micro_batches equal slices; default 1
    #[serde(default = "default_micro_batches")]
    pub micro_batches: i64,
    /// auto (CUDA if available) | cpu | cuda
    #[serde(default)]
    pub device: DeviceChoice,
    /// default "runs"
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    /// metrics/progress every N steps (reads the loss: one sync); default 50
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// sample grids every N steps; 0 = only at the end
    #[serde(default)]
    pub sample_every: u64,
    /// 0 = only at the end (and on SIGTERM)
    #[serde(default)]
    pub checkpoint_every: u64,
    /// complete checkpoints kept; default 2
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// stop (default) | skip
    #[serde(default)]
    pub on_nonfinite: NonFinite,
    /// with skip: stop after this many non-finite steps in a row; default 10
    #[serde(default = "default_max_skips")]
    pub max_consecutive_skips: u64,
    /// intra-op CPU threads (default: libtorch's choice)
    #[serde(default)]
    pub threads: Option<i32>,
}

impl RunConfig {
    /// Range checks (errors name the key and the allowed range).
    pub fn validate(&self) -> Result<()> {
        let name = &self.name;
        ensure!(
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\']) && !name.chars().any(char::is_control),
            "run.name = {name:?}: must be a non-empty folder name (not \".\" or \"..\", no '/', '\\' or control characters); it names the run directory under run.out_dir"
        );
        ensure!(self.steps >= 1, "run.steps = {}: must be >= 1", self.steps);
        ensure!(self.batch_size >= 1, "run.batch_size = {}: must be >= 1", self.batch_size);
        ensure!(self.micro_batches >= 1, "run.micro_batches = {}: must be >= 1", self.micro_batches);
        self.micro_batch_size(1)?;
        ensure!(self.log_every >= 1, "run.log_every = {}: must be >= 1", self.log_every);
        ensure!(self.keep_checkpoints >= 1, "run.keep_checkpoints = {}: must be >= 1", self.keep_checkpoints);
        ensure!(!self.out_dir.as_os_str().is_empty(), "run.out_dir: empty path (default \"runs\")");
        if let Some(n) = self.threads {
            ensure!(n >= 1, "run.threads = {n}: must be >= 1 (leave it out for libtorch's choice)");
        }
        Ok(())
    }

    /// Rows of one micro-batch when `world_size` ranks each accumulate `run.micro_batches`:
    /// `run.batch_size` must split evenly (the error names both keys and the world size).
    pub fn micro_batch_size(&self, world_size: usize) -> Result<i64> {
        let parts = self.micro_batches * world_size as i64;
        ensure!(self.batch_size % parts == 0, "run.batch_size = {} does not split into {world_size} rank(s) × run.micro_batches = {} = {parts} equal micro-batches; choose a batch size divisible by {parts}", self.batch_size, self.micro_batches);
        Ok(self.batch_size / parts)
    }
}

fn default_micro_batches() -> i64 {
    1
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_log_every() -> u64 {
    50
}
fn default_keep() -> usize {
    2
}
fn default_max_skips() -> u64 {
    10
}

/// What a non-finite loss or gradient does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    /// Stop with an error; the last complete checkpoint is kept untouched.
    #[default]
    Stop,
    /// Skip the update (parameters, EMA and optimizer unchanged) and count it.
    Skip,
}

/// `[ema]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// default 0.9999
    #[serde(default = "default_decay")]
    pub decay: f64,
    /// decay_n = min(decay, (1 + n)/(10 + n)); default false
    #[serde(default)]
    pub warmup: bool,
}

fn default_decay() -> f64 {
    0.9999
}

impl EmaConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!((0.0..=1.0).contains(&self.decay), "ema.decay = {}: must be in [0, 1]", self.decay);
        Ok(())
    }
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self { decay: default_decay(), warmup: false }
    }
}

/// `[teacher]`: a trained run whose weights distillation objectives use (and reflow pairs come
/// from). Progressive distillation also starts the student from it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// the teacher's run directory (its config.toml must describe the same model)
    pub run: PathBuf,
    /// ema (default) | online
    #[serde(default)]
    pub weights: Weights,
    /// also start the student (and its EMA) from these weights
    #[serde(default)]
    pub init_student: bool,
}

impl TeacherConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.run.as_os_str().is_empty(), "teacher.run: empty path (the teacher's run directory)");
        Ok(())
    }
}

/// Loads an experiment file with `--set` overrides (errors name the file and the key). A file in
/// an older form is refused with the edits to make and the `flowmap migrate-config` command.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<(ExperimentConfig, toml::Table)> {
    let file = crate::config::overrides::read_table(path)?;
    let mut table = file.clone();
    for o in overrides {
        crate::config::overrides::apply_override(&mut table, o)?;
    }
    migrate::refuse_old(path, &file, &table)?;
    let cfg: ExperimentConfig = crate::config::overrides::deserialize(&table, &crate::config::overrides::origin(path, overrides))?;
    cfg.validate().with_context(|| format!("{}: invalid config", path.display()))?;
    Ok((cfg, table))
}

impl ExperimentConfig {
    /// What an evaluation of this run reads.
    pub fn eval_inputs(&self) -> Result<crate::eval::evaluator::EvalInputs<'_>> {
        Ok(crate::eval::evaluator::EvalInputs { model: &self.model, data: &self.data, vae: &self.vae, sampler: self.sampler()?, seed: self.run.seed })
    }

    /// How this run samples: the objective's path and rule with `[sampling]`'s overrides (the
    /// one place they are combined; errors name the disagreeing keys).
    pub fn sampler(&self) -> Result<Sampler> {
        self.sampling.resolve(&self.objective)
    }

    /// `run.out_dir/run.name`, the run directory unless the caller names another.
    pub fn default_run_dir(&self) -> PathBuf {
        self.run.out_dir.join(&self.run.name)
    }

    /// Cross-section checks serde cannot express.
    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        self.data.validate()?;
        if let Some(limit) = self.data.limit() {
            ensure!(self.run.batch_size as usize <= limit, "run.batch_size = {} is larger than data.limit = {limit} (the images one epoch draws from)", self.run.batch_size);
        }
        self.model.validate()?;
        self.optimizer.validate()?;
        self.ema.validate()?;
        if let Some(t) = &self.teacher {
            t.validate()?;
        }
        if let Some(e) = &self.eval {
            e.validate()?;
        }
        if let Some(v) = crate::data::vae::for_run(&self.vae, &self.data) {
            v.arch.validate().context("[vae.arch]")?;
            if let Some(latents) = self.data.latents() {
                let s = latents.image_size;
                let (made, want) = (v.arch.latent_shape(s, s).to_vec(), self.data.sample_shape());
                ensure!(made == want, "the VAE of [vae.arch] makes latents {made:?} of {s}² images, data.image_size = {s} implies {want:?} (4 channels, 8× downsampling)");
            }
        }
        ensure!(
            self.model.num_classes() == self.data.num_classes(),
            "model.num_classes = {} but the data has {} classes (data.conditional = {}); set model.num_classes = {}",
            self.model.num_classes(),
            self.data.num_classes(),
            self.data.conditional(),
            self.data.num_classes()
        );
        let shape = self.model.sample_shape();
        let data_shape = self.data.sample_shape();
        ensure!(shape == data_shape, "the model takes samples of shape {shape:?} but {} samples are {data_shape:?} (set model.in_channels / model.input_size)", self.data.name());
        let objective = self.objective.build_for_batch(self.run.batch_size).with_context(|| format!("[objective] (kind = {:?}, run.batch_size = {})", self.objective.kind(), self.run.batch_size))?;
        ensure!(
            !objective.needs_coupled_data() || self.data.reflow_pairs().is_some(),
            "objective.kind = {:?} trains on stored (noise, sample) pairs: set data.reflow_pairs to a file made by `flowmap reflow-pairs --teacher RUN`",
            self.objective.kind()
        );
        ensure!(!objective.needs_teacher() || self.teacher.is_some(), "objective.kind = {:?} needs a [teacher] table with the run directory of a trained model", self.objective.kind());
        ensure!(
            !objective.needs_guidance_input() || self.model.takes_guidance(),
            "objective.guidance of objective.kind = {:?} conditions the network on the guidance scale and interval: set model.guidance_conditioning = true (model.kind = \"dit\"), or remove objective.guidance",
            self.objective.kind()
        );
        ensure!(
            !self.model.takes_guidance() || objective.needs_guidance_input(),
            "model.guidance_conditioning = true but objective.kind = {:?} does not train the guidance inputs (only improved_mean_flow with an [objective.guidance] table does): sampling would pass sampling.cfg_scale to inputs the network never learned; set model.guidance_conditioning = false",
            self.objective.kind()
        );
        if !objective.trains_model() {
            // The run samples with its own (frozen) weights: they must be the teacher's.
            ensure!(
                self.teacher.as_ref().is_some_and(|t| t.init_student),
                "objective.kind = {:?} trains only its own parameters around the frozen teacher: set teacher.init_student = true so the run's weights are the teacher's",
                self.objective.kind()
            );
        }
        if let flowmap_objectives::ObjectiveConfig::Amed(a) = &self.objective {
            ensure!(
                a.grid == self.sampling.grid,
                "objective.grid = {{ kind = {:?}, … }} (the grids the AMED predictor trains on) differs from sampling.grid = {{ kind = {:?}, … }} (the grids it samples): set both to the same grid",
                a.grid.name(),
                self.sampling.grid.name()
            );
        }
        self.sampler()?;
        Ok(())
    }
}
