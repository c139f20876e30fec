//! `flowmap train`: one generic loop over any [`Objective`](flowmap_objectives::Objective), configured from TOML.
//!
//! Every step reseeds the global generator from (seed, step), takes the next batch of a
//! per-epoch permutation, computes the objective's loss, checks it (and the gradient norm) for
//! finiteness, steps AdamW and the EMA. Checkpoints hold every part of the run's state (model, EMA,
//! AdamW moments, the teacher it changes, the objective's own parameters; see
//! [`crate::run::state`]) plus step, data position and counters, so `--resume auto` continues
//! exactly (same parameters, same losses).
use crate::config::{ExperimentConfig, NonFinite};
use crate::data::loader::Order;
use crate::data::source::DataSource;
use crate::eval::evaluator::Evaluator;
use crate::eval::sampling::{fixed_inputs, Sampler, Weights};
use crate::run::checkpoint::{Checkpoint, CheckpointContents, CheckpointDir};
use crate::run::file_lock::FileLock;
use crate::run::model::{load_run_weights, load_vars, named_vars, Net};
use crate::run::rng::{self, Stream};
use crate::run::run_dir::RunDir;
use crate::run::state::{Part, TrainerState};
use crate::train::adamw::AdamW;
use crate::train::cadence::Cadence;
use crate::train::metrics::MetricsWriter;
use crate::train::progress::Progress;
use crate::train::tensorboard::EventWriter;
use anyhow::{bail, ensure, Context, Result};
use flowmap_core::{Ema, VelocityField};
use flowmap_objectives::{Batch, Loss, Nets, Objective, TargetNet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// Prefix of the objective's parameters in the optimizer state (`m.objective.<name>`).
const OBJECTIVE_PREFIX: &str = "objective.";

/// How a `train` call treats an existing run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

/// One run being trained: the networks, optimizer, objective (with any parameters of its own),
/// data order and counters, in a locked run directory.
///
/// [`Trainer::open`] builds a run or resumes it from its newest checkpoint, [`Trainer::train_step`]
/// does one optimizer step, [`Trainer::save`] writes a checkpoint of every [`Part`] the run has
/// and [`Trainer::run`] is the loop with its cadences (log, sample grids, checkpoint, evaluation).
pub struct Trainer {
    cfg: ExperimentConfig,
    opts: TrainOptions,
    device: Device,
    run: RunDir,
    /// Held for the trainer's life: one process per run directory.
    _lock: FileLock,
    ckdir: CheckpointDir,
    objective: Box<dyn Objective>,
    /// The objective's own trainable parameters ([`Objective::init_params`]); empty for most.
    objective_vs: nn::VarStore,
    online: Net,
    ema: Ema,
    ema_net: Box<dyn VelocityField>,
    opt: AdamW,
    teacher: Option<Net>,
    data: Box<dyn DataSource>,
    order: Order,
    state: TrainerState,
    /// The step of the newest checkpoint on disk (an interrupted call does not re-save it).
    saved_step: Option<u64>,
    /// The step this call started (resumed) at.
    start_step: u64,
}

/// What one optimizer step produced (tensors: reading them costs a CPU–GPU sync).
pub struct StepReport {
    pub loss: Loss,
    pub grad_norm: Tensor,
    /// False when the loss or the gradient was not finite and the update was skipped.
    pub applied: bool,
}

/// Where a part of the trainer's state lives, for saving and restoring it.
enum Slot<'a> {
    Vars(&'a nn::VarStore),
    Optim(&'a mut AdamW),
}

/// Trains (or continues) the experiment; the resolved `table` is written as config.toml.
pub fn train(cfg: &ExperimentConfig, table: &toml::Table, opts: &TrainOptions) -> Result<Summary> {
    Trainer::open(cfg, table, opts)?.run()
}

impl Trainer {
    /// Builds the run, or resumes it from its newest complete checkpoint (`opts.resume`).
    pub fn open(cfg: &ExperimentConfig, table: &toml::Table, opts: &TrainOptions) -> Result<Self> {
        cfg.validate()?;
        let objective = cfg.objective.build_for_batch(cfg.run.batch_size)?;
        Self::open_with_objective(cfg, table, opts, objective)
    }

    /// [`Trainer::open`] with an objective built by the caller (one that is not in
    /// [`flowmap_objectives::ObjectiveConfig`], e.g. an ablation in a researcher's own binary);
    /// `cfg.objective` still has to validate, and config.toml records `table` as given.
    pub fn open_with_objective(cfg: &ExperimentConfig, table: &toml::Table, opts: &TrainOptions, mut objective: Box<dyn Objective>) -> Result<Self> {
        cfg.validate()?;
        objective.check_batch_size(cfg.run.batch_size)?;
        if let Some(n) = cfg.run.threads {
            tch::set_num_threads(n);
        }
        let device = cfg.run.device.device()?;
        // Data, model and teacher first: their errors (missing files, a damaged shard) leave no
        // run directory behind.
        rng::reseed(cfg.run.seed, 0, Stream::Init);
        let mut online = cfg.model.build(device)?;
        let objective_vs = nn::VarStore::new(device);
        objective.init_params(&objective_vs.root()).context("creating the objective's parameters")?;
        let null_class = online.net.null_class();
        let data = cfg.data.open(null_class, cfg.run.seed, true)?; // latent shards: sha256 vs manifest
        tracing::info!("{}; model {} parameters on {:?}", data.describe(), online.num_parameters(), device);
        let teacher: Option<Net> = match &cfg.teacher {
            Some(t) if objective.needs_teacher() || t.init_student => Some(load_run_weights(&t.run, &cfg.model, t.weights, device)?),
            _ => None,
        };
        if let (Some(t), Some(tc)) = (&teacher, &cfg.teacher) {
            if tc.init_student {
                online.vs.copy(&t.vs)?;
            }
        }

        let run = RunDir::new(opts.run_dir.clone().unwrap_or_else(|| cfg.default_run_dir()));
        let lock = run.lock()?;
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
            Some(ck) => crate::config::change::check_resume(&run, cfg, table, ck.step, opts.allow_config_change)?,
        }
        tracing::info!("run directory {}", run.root.display());

        let Net { vs: ema_vs, net: ema_net } = cfg.model.build(device)?;
        let ema = Ema::with_shadow(ema_vs, &online.vs, cfg.ema.decay, cfg.ema.warmup)?;
        let opt = AdamW::over(&[("", &online.vs), (OBJECTIVE_PREFIX, &objective_vs)], cfg.optimizer.clone());
        let order = Order::new(data.len(), cfg.run.batch_size as usize, cfg.run.seed, Default::default())?;
        let state = TrainerState { seed: cfg.run.seed, flowmap_version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
        let mut trainer = Self { cfg: cfg.clone(), opts: opts.clone(), device, run, _lock: lock, ckdir, objective, objective_vs, online, ema, ema_net, opt, teacher, data, order, state, saved_step: None, start_step: 0 };
        if let Some(ck) = resume_from {
            trainer.restore(&ck)?;
        }
        Ok(trainer)
    }

    /// The parts of the state this run saves and restores (see [`Part`]), in one list.
    fn parts(&mut self) -> Vec<(Part, Slot<'_>)> {
        let mut parts = vec![(Part::Model, Slot::Vars(&self.online.vs)), (Part::Ema, Slot::Vars(self.ema.shadow())), (Part::Optim, Slot::Optim(&mut self.opt))];
        if let (Some(t), true) = (&self.teacher, self.objective.needs_teacher()) {
            parts.push((Part::Teacher, Slot::Vars(&t.vs)));
        }
        if !self.objective_vs.variables().is_empty() {
            parts.push((Part::Objective, Slot::Vars(&self.objective_vs)));
        }
        parts
    }

    fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        let state: TrainerState = serde_json::from_value(ck.state()?).with_context(|| format!("{}: trainer_state.json", ck.dir.display()))?;
        ensure!(state.seed == self.cfg.run.seed, "{}: checkpoint was written with run.seed = {}, the config says {}", ck.dir.display(), state.seed, self.cfg.run.seed);
        for (part, slot) in self.parts() {
            let file = ck.dir.join(format!("{}.safetensors", part.name()));
            // Checkpoints of a teacher-trained run written before the teacher was saved resume
            // with the teacher loaded from `[teacher].run`.
            if part == Part::Teacher && !file.exists() {
                continue;
            }
            let tensors = ck.tensors(part.name())?;
            match slot {
                Slot::Vars(vs) => load_vars(vs, &tensors, &file.display().to_string())?,
                Slot::Optim(opt) => opt.load_state(&tensors, state.step).with_context(|| file.display().to_string())?,
            }
        }
        self.ema.set_updates(state.ema_updates);
        self.order = Order::new(self.data.len(), self.cfg.run.batch_size as usize, self.cfg.run.seed, state.data)?;
        tracing::info!("resumed from {} (step {})", ck.dir.display(), state.step);
        (self.saved_step, self.start_step, self.state) = (Some(ck.step), state.step, state);
        Ok(())
    }

    /// Writes a checkpoint of the current step (every part, then `trainer_state.json`).
    pub fn save(&mut self) -> Result<()> {
        let step = self.state.step;
        let state = serde_json::to_value(&self.state)?;
        let tensors = self
            .parts()
            .into_iter()
            .map(|(part, slot)| {
                let named = match slot {
                    Slot::Vars(vs) => named_vars(vs),
                    Slot::Optim(opt) => opt.state(),
                };
                (part.name(), named)
            })
            .collect();
        self.ckdir.save(step, &CheckpointContents { tensors, state })?;
        self.saved_step = Some(step);
        Ok(())
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run.root
    }

    /// The objective's own parameters, by name (empty for most objectives).
    pub fn objective_params(&self) -> Vec<(String, Tensor)> {
        named_vars(&self.objective_vs)
    }

    /// One optimizer step: the next batch, the objective's loss, backward, a finiteness check of
    /// the loss and gradient norm, AdamW and the EMA. A non-finite step is skipped or stops the
    /// run (`run.on_nonfinite`); either way the step counts.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let (cfg, step, device) = (&self.cfg, self.state.step, self.device);
        if self.objective.refresh_teacher_at(step) {
            let t = self.teacher.as_mut().context("the objective refreshes its teacher but there is none")?;
            let source = self.objective.teacher_refresh_source();
            match source {
                TargetNet::Online => t.vs.copy(&self.online.vs)?,
                TargetNet::Ema => t.vs.copy(self.ema.shadow())?,
            }
            tracing::info!("step {step}: teacher refreshed from the {} weights", source.name());
        }
        let idx = self.order.next_batch();
        if self.data.prefetch_depth() > 0 {
            self.data.prefetch(step + 1, &self.order.peek(self.data.prefetch_depth()));
        }
        let (x, class) = self.data.batch(&idx, step, device)?;
        rng::reseed(cfg.run.seed, step, Stream::Train);
        let batch = match self.data.coupled_noise(&idx, device) {
            Some(noise) => Batch::coupled(x, class, noise),
            None => Batch::new(x, class),
        };
        let nets = Nets { online: self.online.net.as_ref(), ema: self.ema_net.as_ref(), teacher: self.teacher.as_ref().map(|t| t.net.as_ref()) };
        let mut loss = self.objective.loss(nets, &batch, step);
        if self.opts.inject_nan_at.contains(&step) {
            loss.value = &loss.value * f64::NAN;
        }
        self.opt.zero_grad();
        loss.value.backward();
        let grad_norm = self.opt.clip_and_norm();
        // One host read per step: skipping or stopping needs to know now. CPU–GPU sync.
        let applied = loss.value.isfinite().logical_and(&grad_norm.isfinite()).int64_value(&[]) == 1;
        if applied {
            self.state.consecutive_skips = 0;
            self.opt.step()?;
            self.ema.update(&self.online.vs);
        } else {
            match cfg.run.on_nonfinite {
                NonFinite::Stop => {
                    let last = self.ckdir.latest().ok().flatten().map(|c| c.dir.display().to_string()).unwrap_or_else(|| "none yet".into());
                    bail!("non-finite loss or gradient at step {step} (loss {}); stopping. Last good checkpoint: {last}. Lower the learning rate, or set run.on_nonfinite = \"skip\"", loss.value.double_value(&[]));
                }
                NonFinite::Skip => {
                    // The update is skipped; the step still counts, and its checkpoint, grid and
                    // evaluation work still happens.
                    self.state.skipped_steps += 1;
                    self.state.consecutive_skips += 1;
                    tracing::warn!("step {step}: non-finite loss or gradient, update skipped ({} in a row)", self.state.consecutive_skips);
                    ensure!(self.state.consecutive_skips <= cfg.run.max_consecutive_skips, "{} non-finite steps in a row (run.max_consecutive_skips = {}); stopping", self.state.consecutive_skips, cfg.run.max_consecutive_skips);
                    self.opt.zero_grad();
                }
            }
        }
        self.state.step += 1;
        self.state.data = self.order.position();
        self.state.ema_updates = self.ema.updates();
        Ok(StepReport { loss, grad_norm, applied })
    }

    /// The weights `[sampling].weights` names (grids and in-training evaluation).
    fn sampling_net(&self) -> &dyn VelocityField {
        match self.cfg.sampling.weights {
            Weights::Ema => self.ema_net.as_ref(),
            Weights::Online => self.online.net.as_ref(),
        }
    }

    /// Trains to `run.steps` (or until stopped), with the run's cadences: metrics and progress
    /// every `run.log_every` steps, grids every `run.sample_every`, checkpoints every
    /// `run.checkpoint_every`, FID every `eval.every`, each also at the last step.
    pub fn run(mut self) -> Result<Summary> {
        let cfg = self.cfg.clone();
        let total = cfg.run.steps;
        if self.state.step >= total {
            tracing::info!("already at step {} of {}", self.state.step, total);
            return Ok(Summary { run_dir: self.run.root.clone(), step: self.state.step, outcome: Outcome::Finished, skipped_steps: self.state.skipped_steps, last_loss: None });
        }
        let log = Cadence { every: cfg.run.log_every, at_end: true };
        let grids = Cadence::every_and_at_end(cfg.run.sample_every);
        let checkpoints = Cadence::every_and_at_end(cfg.run.checkpoint_every);
        let evals = cfg.eval.as_ref().filter(|e| e.every > 0).map(|e| Cadence::every_and_at_end(e.every));

        let mut metrics = MetricsWriter::open(&self.run.metrics(), self.saved_step)?;
        let mut tb = EventWriter::create(&self.run.tensorboard())?;
        // Latent-space runs decode their sample grids with the VAE.
        let grid_vae = match crate::data::vae::for_run(&cfg.vae, &cfg.data) {
            Some(v) => Some(v.load(self.device)?),
            None => None,
        };
        let null_class = self.online.net.null_class();
        let (grid_noise, grid_class) = fixed_inputs(cfg.run.seed, cfg.sampling.grid_images, &cfg.model.sample_shape(), cfg.data.num_classes(), null_class, self.device);
        let sampler = cfg.sampler()?;
        let eval_inputs = cfg.eval_inputs()?;
        let mut progress = Progress::new(self.state.step, total, &cfg.run.name);
        let mut evaluator: Option<Evaluator> = None;
        let mut last_log = (Instant::now(), self.state.step);
        let mut last_loss = None;
        let mut outcome = Outcome::Finished;
        let clock = Instant::now();
        let base_time = self.state.train_time_s;

        while self.state.step < total {
            if self.opts.stop.load(Ordering::SeqCst) || self.opts.max_steps_this_call.is_some_and(|m| self.state.step - self.start_step >= m) {
                outcome = Outcome::Interrupted;
                break;
            }
            let report = self.train_step()?;
            let step = self.state.step;

            let mut logged = None;
            if log.due(step, total) {
                let rate = (step - last_log.1) as f64 * cfg.run.batch_size as f64 / last_log.0.elapsed().as_secs_f64().max(1e-9);
                last_log = (Instant::now(), step);
                let shown = self.log_step(&report, step, rate, &mut metrics, &mut tb)?;
                (logged, last_loss) = (Some((shown, rate)), Some(shown));
            }
            progress.tick(step, logged.map(|l| l.0), logged.map(|l| l.1));

            if grids.due(step, total) {
                write_grids(&sampler, &cfg.sampling.steps, self.sampling_net(), &grid_noise, &grid_class, &self.run, step, &mut tb, grid_vae.as_ref())?;
                progress.pause_done();
            }
            if checkpoints.due(step, total) {
                self.state.train_time_s = base_time + clock.elapsed().as_secs_f64();
                self.save()?;
                progress.pause_done();
            }
            // In-training FID (after the checkpoint, so a failing evaluation loses no training).
            // It reseeds the generator from its own stream; the next step reseeds for training.
            if let (Some(ev), true) = (&cfg.eval, evals.is_some_and(|c| c.due(step, total))) {
                let evaluator = match &evaluator {
                    Some(e) => e,
                    None => evaluator.insert(Evaluator::new(&eval_inputs, ev, self.device)?),
                };
                let steps = ev.steps.clone().unwrap_or_else(|| cfg.sampling.steps.clone());
                for r in evaluator.evaluate(&eval_inputs, self.sampling_net(), cfg.sampling.weights, step, &steps, &self.run.root, self.device)? {
                    tb.scalar(&format!("fid/steps{}", r.steps), r.fid as f32, step as i64)?;
                }
                progress.pause_done();
            }
        }
        progress.finish();
        if self.data.skipped() > 0 {
            tracing::warn!("{} unreadable image files were skipped (each replaced by the next readable index)", self.data.skipped());
        }
        if outcome == Outcome::Interrupted {
            if self.saved_step != Some(self.state.step) {
                self.state.train_time_s = base_time + clock.elapsed().as_secs_f64();
                self.save()?;
            }
            tracing::info!("stopped at step {}; checkpoint in place; continue with --resume auto", self.state.step);
        }
        Ok(Summary { run_dir: self.run.root.clone(), step: self.state.step, outcome, skipped_steps: self.state.skipped_steps, last_loss })
    }

    /// One metrics.jsonl record and the TensorBoard scalars of a log step; returns the loss shown
    /// (the objective's reported metric, or the optimised value).
    fn log_step(&self, report: &StepReport, step: u64, rate: f64, metrics: &mut MetricsWriter, tb: &mut EventWriter) -> Result<f64> {
        let loss = &report.loss;
        let shown = self.objective.reported_metric().and_then(|name| loss.metrics.iter().find(|(k, _)| *k == name)).map(|(_, t)| t).unwrap_or(&loss.value).double_value(&[]);
        let grad_norm = report.grad_norm.double_value(&[]);
        let mut rec = serde_json::json!({ "step": step, "loss": shown, "loss_optimized": loss.value.double_value(&[]), "grad_norm": grad_norm, "lr": self.opt.lr(), "img_per_s": rate, "skipped_steps": self.state.skipped_steps });
        for (name, value) in &loss.metrics {
            rec[*name] = serde_json::json!(value.double_value(&[]));
        }
        metrics.write(&rec)?;
        tb.scalar("loss", shown as f32, step as i64)?;
        tb.scalar("grad_norm", grad_norm as f32, step as i64)?;
        tb.scalar("img_per_s", rate as f32, step as i64)?;
        Ok(shown)
    }
}

/// Sample grids at every configured step count: `samples/step_XXXXXXX_stepsN.png` and TensorBoard.
#[allow(clippy::too_many_arguments)]
pub fn write_grids(sampler: &Sampler, step_counts: &[usize], net: &dyn VelocityField, noise: &Tensor, class: &Tensor, run: &RunDir, step: u64, tb: &mut EventWriter, vae: Option<&flowmap_models::vae::Vae>) -> Result<()> {
    for &steps in step_counts {
        let x = crate::data::vae::to_pixels(vae, sampler.generate(net, noise.shallow_clone(), class, steps).to_kind(Kind::Float));
        let path = run.samples().join(format!("step_{step:07}_steps{steps}.png"));
        crate::eval::image_grid::save_grid(&x, &path)?;
        let (png, h, w, c) = crate::eval::image_grid::grid_png(&x)?;
        tb.image(&format!("samples/steps{steps}"), &png, h, w, c, step as i64)?;
    }
    Ok(())
}
