//! `flowmap train`: one generic loop over any [`Objective`](flowmap_objectives::Objective), configured from TOML.
//!
//! Every step reseeds the global generator from (seed, step), takes the next batch of a
//! per-epoch permutation, computes the objective's loss, checks it (and the gradient norm) for
//! finiteness, steps AdamW and the EMA. Checkpoints hold model, EMA, AdamW moments, step, data
//! position and counters, so `--resume auto` continues exactly (same parameters, same losses).
use crate::adamw::{AdamW, AdamWConfig};
use crate::checkpoint::{CheckpointContents, CheckpointDir};
use crate::data::source::DataConfig;
use crate::loader::{DataPosition, Order};
use crate::metrics::MetricsWriter;
use crate::model::{load_vars, named_vars, ModelConfig, Net};
use crate::progress::Progress;
use crate::rng::{self, Stream};
use crate::run_dir::RunDir;
use crate::sampling::{fixed_inputs, SamplingConfig, Weights};
use crate::tensorboard::EventWriter;
use anyhow::{bail, ensure, Context, Result};
use flowmap_core::{Ema, VelocityField};
use flowmap_objectives::{Batch, Nets, ObjectiveConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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
    pub eval: Option<crate::eval::EvalConfig>,
    #[serde(default)]
    pub vae: Option<crate::vae_section::VaeSection>,
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
    /// images per step
    pub batch_size: i64,
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
        ensure!(self.log_every >= 1, "run.log_every = {}: must be >= 1", self.log_every);
        ensure!(self.keep_checkpoints >= 1, "run.keep_checkpoints = {}: must be >= 1", self.keep_checkpoints);
        ensure!(!self.out_dir.as_os_str().is_empty(), "run.out_dir: empty path (default \"runs\")");
        if let Some(n) = self.threads {
            ensure!(n >= 1, "run.threads = {n}: must be >= 1 (leave it out for libtorch's choice)");
        }
        Ok(())
    }
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// `auto` without CUDA warns once with the reason; `cuda` without CUDA is an error (crate::device).
    pub fn device(self) -> Result<Device> {
        crate::device::resolve(self)
    }
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

/// How a `train` call treats an existing run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Start at step 0 (an existing run directory with checkpoints is an error).
    Never,
    /// Continue from the newest complete checkpoint if there is one.
    Auto,
}

/// Options that are not part of the experiment (they do not change results).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Overrides `run.out_dir/run.name`.
    pub run_dir: Option<PathBuf>,
    pub resume: Resume,
    /// Set (by SIGTERM/SIGINT) to checkpoint at the next step boundary and return.
    pub stop: Arc<AtomicBool>,
    /// Stop after this many steps of this call (tests: "k steps, then a new process").
    pub max_steps_this_call: Option<u64>,
    /// Test hook: make the loss non-finite at these steps.
    pub inject_nan_at: Vec<u64>,
    /// Continue a run whose config.toml differs from this config in keys that change results
    /// (the change is recorded in the run directory); without it such a resume is refused.
    pub allow_config_change: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { run_dir: None, resume: Resume::Auto, stop: Arc::new(AtomicBool::new(false)), max_steps_this_call: None, inject_nan_at: vec![], allow_config_change: false }
    }
}

/// How a `train` call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished,
    /// Stopped by a signal or `max_steps_this_call`; a checkpoint was written.
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub step: u64,
    pub outcome: Outcome,
    pub skipped_steps: u64,
    /// Loss at the last log step.
    pub last_loss: Option<f64>,
}

/// Counters saved in trainer_state.json.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    data: DataPosition,
    ema_updates: u64,
    skipped_steps: u64,
    consecutive_skips: u64,
    seed: u64,
    train_time_s: f64,
    flowmap_version: String,
}

/// Loads an experiment file with `--set` overrides (errors name the file and the key).
pub fn load_config(path: &Path, overrides: &[String]) -> Result<(ExperimentConfig, toml::Table)> {
    let (cfg, table): (ExperimentConfig, toml::Table) = crate::overrides::load(path, overrides)?;
    cfg.validate().with_context(|| format!("{}: invalid config", path.display()))?;
    Ok((cfg, table))
}

impl ExperimentConfig {
    /// Cross-section checks serde cannot express.
    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        self.data.validate()?;
        if let (Some(limit), None) = (self.data.limit, &self.data.reflow_pairs) {
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
        if let Some(v) = crate::vae_section::for_run(&self.vae, &self.data) {
            v.arch.validate().context("[vae.arch]")?;
            if self.data.dataset == crate::data::source::DataSet::Latents {
                let s = self.data.image_size();
                let (made, want) = (v.arch.latent_shape(s, s).to_vec(), self.data.sample_shape());
                ensure!(made == want, "the VAE of [vae.arch] makes latents {made:?} of {s}² images, data.image_size = {s} implies {want:?} (4 channels, 8× downsampling)");
            }
        }
        ensure!(
            self.model.num_classes() == self.data.num_classes(),
            "model.num_classes = {} but the data has {} classes (data.conditional = {}); set model.num_classes = {}",
            self.model.num_classes(),
            self.data.num_classes(),
            self.data.conditional,
            self.data.num_classes()
        );
        let shape = self.model.sample_shape();
        let data_shape = self.data.sample_shape();
        ensure!(shape == data_shape, "the model takes samples of shape {shape:?} but {} samples are {data_shape:?} (set model.in_channels / model.input_size)", self.data.dataset.name());
        self.sampling.validate()?;
        let objective = self.objective.build_for_batch(self.run.batch_size).with_context(|| format!("[objective] (kind = {:?}, run.batch_size = {})", objective_kind(&self.objective), self.run.batch_size))?;
        ensure!(
            !objective.needs_coupled_data() || self.data.reflow_pairs.is_some(),
            "objective.kind = {:?} trains on stored (noise, sample) pairs: set data.reflow_pairs to a file made by `flowmap reflow-pairs --teacher RUN`",
            objective_kind(&self.objective)
        );
        ensure!(!objective.needs_teacher() || self.teacher.is_some(), "objective.kind = {:?} needs a [teacher] table with the run directory of a trained model", objective_kind(&self.objective));
        Ok(())
    }

    pub fn run_dir(&self, opts: &TrainOptions) -> PathBuf {
        opts.run_dir.clone().unwrap_or_else(|| self.run.out_dir.join(&self.run.name))
    }
}

/// The `kind` string of an objective config.
pub fn objective_kind(cfg: &ObjectiveConfig) -> String {
    toml::Value::try_from(cfg).ok().and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from)).unwrap_or_else(|| "?".into())
}

/// Loads a trained run's weights into a freshly built network of `model` (errors if they differ).
pub fn load_run_weights(run: &Path, model: &ModelConfig, weights: Weights, device: Device) -> Result<Net> {
    let ck = CheckpointDir::new(RunDir::new(run).checkpoints(), 1).latest()?.with_context(|| format!("{} has no complete checkpoint", run.display()))?;
    let mut net = model.build(device)?;
    let stem = weights.name();
    net.load_named(&ck.tensors(if stem == "online" { "model" } else { "ema" })?, &format!("{} ({stem} weights)", ck.dir.display()))?;
    Ok(net)
}

/// Trains (or continues) the experiment; the resolved `table` is written as config.toml.
pub fn train(cfg: &ExperimentConfig, table: &toml::Table, opts: &TrainOptions) -> Result<Summary> {
    cfg.validate()?;
    if let Some(n) = cfg.run.threads {
        tch::set_num_threads(n);
    }
    let device = cfg.run.device.device()?;
    // Data, model and teacher first: their errors (missing files, a damaged shard) leave no run
    // directory behind.
    let objective = cfg.objective.build_for_batch(cfg.run.batch_size)?;
    rng::reseed(cfg.run.seed, 0, Stream::Init);
    let mut online = cfg.model.build(device)?;
    let null_class = online.net.null_class();
    let mut data = cfg.data.open(null_class, cfg.run.seed, true)?; // latent shards: sha256 vs manifest
    tracing::info!("{}; model {} parameters on {:?}", data.describe(), online.num_parameters(), device);

    // Teacher, EMA, optimizer.
    let mut teacher: Option<Net> = match &cfg.teacher {
        Some(t) if objective.needs_teacher() || t.init_student => Some(load_run_weights(&t.run, &cfg.model, t.weights, device)?),
        _ => None,
    };
    if let (Some(t), Some(tc)) = (&teacher, &cfg.teacher) {
        if tc.init_student {
            online.vs.copy(&t.vs)?;
        }
    }
    let run = RunDir::new(cfg.run_dir(opts));
    // One process per run directory for the whole call: a second `train` on it is refused.
    let _lock = run.lock()?;
    let ckdir = CheckpointDir::new(run.checkpoints(), cfg.run.keep_checkpoints);
    let resume_from = match opts.resume {
        Resume::Auto => ckdir.latest()?,
        Resume::Never => {
            ensure!(!ckdir.has_any(), "{} already has checkpoints: pass --resume auto to continue it, or choose another run.name", run.root.display());
            None
        }
    };
    match &resume_from {
        None => run.create(table)?,
        Some(ck) => crate::config_change::check_resume(&run, cfg, table, ck.step, opts.allow_config_change)?,
    }
    tracing::info!("run directory {}", run.root.display());

    let Net { vs: ema_vs, net: ema_net } = cfg.model.build(device)?;
    let mut ema = Ema::with_shadow(ema_vs, &online.vs, cfg.ema.decay, cfg.ema.warmup)?;
    let mut opt = AdamW::new(&online.vs, cfg.optimizer.clone());

    let mut state = TrainerState { seed: cfg.run.seed, flowmap_version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
    if let Some(ck) = &resume_from {
        state = serde_json::from_value(ck.state()?).with_context(|| format!("{}: trainer_state.json", ck.dir.display()))?;
        ensure!(state.seed == cfg.run.seed, "{}: checkpoint was written with run.seed = {}, the config says {}", ck.dir.display(), state.seed, cfg.run.seed);
        online.load_named(&ck.tensors("model")?, &format!("{}/model.safetensors", ck.dir.display()))?;
        let ema_tensors = ck.tensors("ema")?;
        load_vars(ema.shadow(), &ema_tensors, &format!("{}/ema.safetensors", ck.dir.display()))?;
        ema.set_updates(state.ema_updates);
        opt.load_state(&ck.tensors("optim")?, state.step)?;
        if let (Some(t), true) = (teacher.as_mut(), objective.needs_teacher()) {
            if ck.dir.join("teacher.safetensors").exists() {
                t.load_named(&ck.tensors("teacher")?, &format!("{}/teacher.safetensors", ck.dir.display()))?;
            }
        }
        tracing::info!("resumed from {} (step {})", ck.dir.display(), state.step);
    }
    if state.step >= cfg.run.steps {
        tracing::info!("already at step {} of {}", state.step, cfg.run.steps);
        return Ok(Summary { run_dir: run.root.clone(), step: state.step, outcome: Outcome::Finished, skipped_steps: state.skipped_steps, last_loss: None });
    }

    let mut order = Order::new(data.len(), cfg.run.batch_size as usize, cfg.run.seed, state.data)?;
    let mut metrics = MetricsWriter::open(&run.metrics(), resume_from.as_ref().map(|c| c.step))?;
    let mut tb = EventWriter::create(&run.tensorboard())?;
    // Latent-space runs decode their sample grids with the VAE.
    let grid_vae = match crate::vae_section::for_run(&cfg.vae, &cfg.data) {
        Some(v) => Some(v.load(device)?),
        None => None,
    };
    let (grid_noise, grid_class) = fixed_inputs(cfg.run.seed, cfg.sampling.grid_images, &cfg.model.sample_shape(), cfg.data.num_classes(), null_class, device);
    let mut progress = Progress::new(state.step, cfg.run.steps, &cfg.run.name);
    let mut evaluator: Option<crate::eval::Evaluator> = None;
    let start_step = state.step;
    let mut last_log = (Instant::now(), state.step);
    let mut last_loss = None;
    let mut outcome = Outcome::Finished;
    let clock = Instant::now();
    let base_time = state.train_time_s;
    let mut saved_step = resume_from.as_ref().map(|c| c.step);

    let save = |state: &TrainerState, online: &Net, ema: &Ema, opt: &AdamW, teacher: &Option<Net>| -> Result<()> {
        let mut tensors = vec![("model", online.named()), ("ema", named_vars(ema.shadow())), ("optim", opt.state())];
        if let (Some(t), true) = (teacher, objective.needs_teacher()) {
            tensors.push(("teacher", t.named()));
        }
        ckdir.save(state.step, &CheckpointContents { tensors, state: serde_json::to_value(state)? })?;
        Ok(())
    };

    while state.step < cfg.run.steps {
        if opts.stop.load(Ordering::SeqCst) || opts.max_steps_this_call.map(|m| state.step - start_step >= m).unwrap_or(false) {
            outcome = Outcome::Interrupted;
            break;
        }
        let step = state.step;
        if objective.refresh_teacher_at(step) {
            let t = teacher.as_mut().context("the objective refreshes its teacher but there is none")?;
            t.vs.copy(&online.vs)?;
            tracing::info!("step {step}: teacher refreshed from the online weights");
        }
        let idx = order.next_batch();
        if data.prefetch_depth() > 0 {
            data.prefetch(step + 1, &order.peek(data.prefetch_depth()));
        }
        let (x, class) = data.batch(&idx, step, device)?;
        rng::reseed(cfg.run.seed, step, Stream::Train);
        let batch = match data.coupled_noise(&idx, device) {
            Some(noise) => Batch::coupled(x, class, noise),
            None => Batch::new(x, class),
        };
        let nets = Nets { online: online.net.as_ref(), ema: ema_net.as_ref(), teacher: teacher.as_ref().map(|t| t.net.as_ref()) };
        let mut loss = objective.loss(nets, &batch, step);
        if opts.inject_nan_at.contains(&step) {
            loss.value = &loss.value * f64::NAN;
        }
        opt.zero_grad();
        loss.value.backward();
        let grad_norm = opt.clip_and_norm();
        // One host read per step: skipping or stopping needs to know now. CPU–GPU sync.
        let finite = loss.value.isfinite().logical_and(&grad_norm.isfinite()).int64_value(&[]) == 1;
        if finite {
            state.consecutive_skips = 0;
            opt.step()?;
            ema.update(&online.vs);
        } else {
            match cfg.run.on_nonfinite {
                NonFinite::Stop => {
                    let last = ckdir.latest().ok().flatten().map(|c| c.dir.display().to_string()).unwrap_or_else(|| "none yet".into());
                    bail!("non-finite loss or gradient at step {step} (loss {}); stopping. Last good checkpoint: {last}. Lower the learning rate, or set run.on_nonfinite = \"skip\"", loss.value.double_value(&[]));
                }
                NonFinite::Skip => {
                    // The update is skipped; the step still counts, and its checkpoint, grid and
                    // evaluation work below still happens.
                    state.skipped_steps += 1;
                    state.consecutive_skips += 1;
                    tracing::warn!("step {step}: non-finite loss or gradient, update skipped ({} in a row)", state.consecutive_skips);
                    ensure!(state.consecutive_skips <= cfg.run.max_consecutive_skips, "{} non-finite steps in a row (run.max_consecutive_skips = {}); stopping", state.consecutive_skips, cfg.run.max_consecutive_skips);
                    opt.zero_grad();
                }
            }
        }
        state.step += 1;
        state.data = order.position();
        state.ema_updates = ema.updates();
        let step = state.step;

        let log_now = step.is_multiple_of(cfg.run.log_every) || step == cfg.run.steps;
        let (mut loss_read, mut rate) = (None, None);
        if log_now {
            let shown = objective.reported_metric().and_then(|name| loss.metrics.iter().find(|(k, _)| *k == name)).map(|(_, t)| t).unwrap_or(&loss.value);
            let l = shown.double_value(&[]);
            let dt = last_log.0.elapsed().as_secs_f64();
            let r = (step - last_log.1) as f64 * cfg.run.batch_size as f64 / dt.max(1e-9);
            last_log = (Instant::now(), step);
            let mut rec = serde_json::json!({ "step": step, "loss": l, "loss_optimized": loss.value.double_value(&[]), "grad_norm": grad_norm.double_value(&[]), "lr": opt.lr(), "img_per_s": r, "skipped_steps": state.skipped_steps });
            for (name, value) in &loss.metrics {
                rec[*name] = serde_json::json!(value.double_value(&[]));
            }
            metrics.write(&rec)?;
            tb.scalar("loss", l as f32, step as i64)?;
            tb.scalar("grad_norm", grad_norm.double_value(&[]) as f32, step as i64)?;
            tb.scalar("img_per_s", r as f32, step as i64)?;
            (loss_read, rate) = (Some(l), Some(r));
            last_loss = Some(l);
        }
        progress.tick(step, loss_read, rate);

        let end = step == cfg.run.steps;
        if (cfg.run.sample_every > 0 && step.is_multiple_of(cfg.run.sample_every)) || end {
            let net: &dyn VelocityField = match cfg.sampling.weights {
                Weights::Ema => ema_net.as_ref(),
                Weights::Online => online.net.as_ref(),
            };
            write_grids(&cfg.sampling, net, &grid_noise, &grid_class, &run, step, &mut tb, grid_vae.as_ref())?;
            progress.pause_done();
        }
        if (cfg.run.checkpoint_every > 0 && step.is_multiple_of(cfg.run.checkpoint_every)) || end {
            state.train_time_s = base_time + clock.elapsed().as_secs_f64();
            save(&state, &online, &ema, &opt, &teacher)?;
            saved_step = Some(step);
            progress.pause_done();
        }
        // In-training FID (after the checkpoint, so a failing evaluation loses no training). It
        // reseeds the generator from its own stream; the next step reseeds for training again.
        if let Some(ev) = cfg.eval.as_ref().filter(|e| e.every > 0 && (step.is_multiple_of(e.every) || end)) {
            let evaluator = match &evaluator {
                Some(e) => e,
                None => evaluator.insert(crate::eval::Evaluator::new(cfg, ev, device)?),
            };
            let net: &dyn VelocityField = match cfg.sampling.weights {
                Weights::Ema => ema_net.as_ref(),
                Weights::Online => online.net.as_ref(),
            };
            let steps = ev.steps.clone().unwrap_or_else(|| cfg.sampling.steps.clone());
            for r in evaluator.evaluate(cfg, net, cfg.sampling.weights, step, &steps, &run.root, device)? {
                tb.scalar(&format!("fid/steps{}", r.nfe), r.fid as f32, step as i64)?;
            }
            progress.pause_done();
        }
    }
    progress.finish();
    if data.skipped() > 0 {
        tracing::warn!("{} unreadable image files were skipped (each replaced by the next readable index)", data.skipped());
    }
    if outcome == Outcome::Interrupted {
        if saved_step != Some(state.step) {
            state.train_time_s = base_time + clock.elapsed().as_secs_f64();
            save(&state, &online, &ema, &opt, &teacher)?;
        }
        tracing::info!("stopped at step {}; checkpoint in place; continue with --resume auto", state.step);
    }
    Ok(Summary { run_dir: run.root.clone(), step: state.step, outcome, skipped_steps: state.skipped_steps, last_loss })
}

/// Sample grids at every configured step count: `samples/step_XXXXXXX_stepsN.png` and TensorBoard.
#[allow(clippy::too_many_arguments)]
pub fn write_grids(cfg: &SamplingConfig, net: &dyn VelocityField, noise: &Tensor, class: &Tensor, run: &RunDir, step: u64, tb: &mut EventWriter, vae: Option<&flowmap_models::vae::Vae>) -> Result<()> {
    for &steps in &cfg.steps {
        let x = cfg.generate(net, noise.shallow_clone(), class, steps).to_kind(Kind::Float);
        let x = match vae {
            Some(v) => flowmap_models::vae::decode_for_fid(v, &x),
            None => x,
        };
        let path = run.samples().join(format!("step_{step:07}_steps{steps}.png"));
        crate::image_grid::save_grid(&x, &path)?;
        let (png, h, w, c) = crate::image_grid::grid_png(&x)?;
        tb.image(&format!("samples/steps{steps}"), &png, h, w, c, step as i64)?;
    }
    Ok(())
}
