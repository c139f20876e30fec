//! `flowmap train`: one generic loop over any [`Objective`](flowmap_objectives::Objective), configured from TOML.
//!
//! Every step takes the next global batch of a per-epoch permutation and splits it into
//! world size × `run.micro_batches` equal micro-batches; each rank computes the objective's loss
//! on its own micro-batches (the generator reseeded from (seed, step, micro-batch index), so the
//! split does not change the draws) and accumulates their gradients; one all-reduce of a flat
//! buffer sums the gradients, the losses and the stop requests of every rank. Then the loss (and
//! the gradient norm) is checked for finiteness and AdamW and the EMA step, alike on every rank.
//! Rank 0 alone writes the run directory. Checkpoints hold every part of the run's state (model, EMA,
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
use crate::run::world::World;
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
    /// Held for the trainer's life by rank 0: one job per run directory.
    _lock: Option<FileLock>,
    /// The ranks of a data-parallel job (a world of one without a launcher).
    world: &'static World,
    /// Every rank asked to stop at the last step (a SIGTERM on any rank), agreed by all-reduce.
    stop_agreed: bool,
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
        let objective = cfg.objective.build()?;
        Self::open_with_objective(cfg, table, opts, objective)
    }

    /// [`Trainer::open`] with an objective built by the caller (one that is not in
    /// [`flowmap_objectives::ObjectiveConfig`], e.g. an ablation in a researcher's own binary);
    /// `cfg.objective` still has to validate, and config.toml records `table` as given.
    pub fn open_with_objective(cfg: &ExperimentConfig, table: &toml::Table, opts: &TrainOptions, mut objective: Box<dyn Objective>) -> Result<Self> {
        cfg.validate()?;
        if let Some(n) = cfg.run.threads {
            tch::set_num_threads(n);
        }
        let device = cfg.run.device.device()?;
        let world = World::global(device)?;
        let device = world.device(device);
        // The objective's checks (e.g. Shortcut's bootstrap rows per level) apply to what one
        // loss call sees: a micro-batch.
        let micro_size = cfg.run.micro_batch_size(world.size())?;
        objective.check_batch_size(micro_size).with_context(|| format!("a micro-batch of {micro_size} rows (run.batch_size = {} over {} rank(s) × run.micro_batches = {})", cfg.run.batch_size, world.size(), cfg.run.micro_batches))?;
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

        if !objective.trains_model() {
            // AMED: the model is the frozen teacher; only the objective's parameters train.
            online.vs.freeze();
        }
        let run = RunDir::new(opts.run_dir.clone().unwrap_or_else(|| cfg.default_run_dir()));
        let ckdir = CheckpointDir::new(run.checkpoints(), cfg.run.keep_checkpoints);
        let (lock, resume_from) = open_run_dir(world, &run, &ckdir, cfg, table, opts)?;

        let Net { vs: ema_vs, net: ema_net } = cfg.model.build(device)?;
        let ema = Ema::with_shadow(ema_vs, &online.vs, cfg.ema.decay, cfg.ema.warmup)?;
        let opt = AdamW::over(&[("", &online.vs), (OBJECTIVE_PREFIX, &objective_vs)], cfg.optimizer.clone());
        let order = Order::new(data.len(), cfg.run.batch_size as usize, cfg.run.seed, Default::default())?;
        let state = TrainerState { seed: cfg.run.seed, flowmap_version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
        let mut trainer = Self { cfg: cfg.clone(), opts: opts.clone(), device, run, _lock: lock, world, stop_agreed: false, ckdir, objective, objective_vs, online, ema, ema_net, opt, teacher, data, order, state, saved_step: None, start_step: 0 };
        if let Some(ck) = resume_from {
            trainer.restore(&ck)?;
        }
        // Every rank starts from rank 0's weights (whatever its own initialisation drew).
        for (_, slot) in trainer.parts() {
            if let Slot::Vars(vs) = slot {
                world.broadcast_vars(vs)?;
            }
        }
        trainer.state.world_size = world.size();
        trainer.state.micro_batches = cfg.run.micro_batches;
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
        if (state.world_size, state.micro_batches) != (self.world.size(), self.cfg.run.micro_batches) {
            tracing::warn!(
                "{}: written by {} rank(s) × {} micro-batch(es), resumed by {} × {}: the data order continues exactly, the random draws of each step follow the new split",
                ck.dir.display(),
                state.world_size,
                state.micro_batches,
                self.world.size(),
                self.cfg.run.micro_batches
            );
        }
        self.ema.set_updates(state.ema_updates);
        self.order = Order::new(self.data.len(), self.cfg.run.batch_size as usize, self.cfg.run.seed, state.data)?;
        tracing::info!("resumed from {} (step {})", ck.dir.display(), state.step);
        (self.saved_step, self.start_step, self.state) = (Some(ck.step), state.step, state);
        Ok(())
    }

    /// Writes a checkpoint of the current step (every part, then `trainer_state.json`); rank 0
    /// writes, the other ranks hold the same state.
    pub fn save(&mut self) -> Result<()> {
        let step = self.state.step;
        if !self.world.is_main() {
            self.saved_step = Some(step);
            return Ok(());
        }
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

    /// `sampler` as this run samples now: the `amed` rule gets a copy of the predictor's current
    /// parameters (an optimised grid is not read while training: its file is made afterwards).
    fn live_sampler(&self, sampler: &Sampler) -> Result<Sampler> {
        let mut s = sampler.clone();
        if s.rule == flowmap_core::StepRule::Amed {
            let params = self.objective_params().into_iter().collect();
            s.amed = Some(crate::eval::amed_weights::AmedWeights::from_named(&params, self.device, "the run's AMED predictor")?);
        }
        Ok(s)
    }

    /// The objective's own parameters, by name (empty for most objectives).
    pub fn objective_params(&self) -> Vec<(String, Tensor)> {
        named_vars(&self.objective_vs)
    }

    /// One optimizer step: the next batch, the objective's loss, backward, a finiteness check of
    /// the loss and gradient norm, AdamW and the EMA. A non-finite step is skipped or stops the
    /// run (`run.on_nonfinite`); either way the step counts.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let (step, device) = (self.state.step, self.device);
        // The run settings this step reads (copied: the loop below borrows self mutably).
        let (seed, on_nonfinite, max_skips) = (self.cfg.run.seed, self.cfg.run.on_nonfinite, self.cfg.run.max_consecutive_skips);
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
        let (rank, world_size, micro_batches) = (self.world.rank(), self.world.size(), self.cfg.run.micro_batches as usize);
        let parts = world_size * micro_batches;
        // This rank's micro-batches: global indices rank·m … rank·m + m − 1 of the split batch.
        let mine = |step: u64, m: usize, rows: &[i64]| -> (u64, Vec<i64>) {
            let micro = rank * micro_batches + m;
            let size = rows.len() / parts;
            (rng::draw_key(step, micro), rows[micro * size..(micro + 1) * size].to_vec())
        };
        if self.data.prefetch_depth() > 0 {
            let ahead = self.order.peek(self.data.prefetch_depth());
            let upcoming: Vec<(u64, Vec<i64>)> = ahead.iter().zip(step + 1..).flat_map(|(rows, s)| (0..micro_batches).map(move |m| mine(s, m, rows))).collect();
            self.data.prefetch(&upcoming);
        }
        self.opt.zero_grad();
        // Σ over this rank's micro-batches of loss / parts (and of each metric): after the sum over
        // ranks, the mean over the global batch.
        let mut totals: Option<(Tensor, Vec<(&'static str, Tensor)>)> = None;
        for m in 0..micro_batches {
            let (key, rows) = mine(step, m, &idx);
            let (x, class) = self.data.batch(&rows, key, device)?;
            rng::reseed(seed, key, Stream::Train);
            let batch = match self.data.coupled_noise(&rows, device) {
                Some(noise) => Batch::coupled(x, class, noise),
                None => Batch::new(x, class),
            };
            let nets = Nets { online: self.online.net.as_ref(), ema: self.ema_net.as_ref(), teacher: self.teacher.as_ref().map(|t| t.net.as_ref()) };
            let mut loss = self.objective.loss(nets, &batch, step);
            if self.opts.inject_nan_at.contains(&step) {
                loss.value = &loss.value * f64::NAN;
            }
            // One micro-batch in all: the loss as it is (bit for bit what a plain step computes).
            let scale = |t: &Tensor| if parts == 1 { t.shallow_clone() } else { t / parts as f64 };
            scale(&loss.value).backward();
            let value = scale(&loss.value.detach());
            let metrics: Vec<(&'static str, Tensor)> = loss.metrics.iter().map(|(k, t)| (*k, scale(&t.detach().to_kind(value.kind())))).collect();
            totals = Some(match totals {
                None => (value, metrics),
                Some((v, ms)) => (v + value, ms.into_iter().zip(metrics).map(|((k, a), (_, b))| (k, a + b)).collect()),
            });
        }
        let (value, metrics) = totals.context("run.micro_batches must be at least 1")?;
        let loss = self.reduce_over_ranks(value, metrics)?;
        let grad_norm = self.opt.clip_and_norm();
        // One host read per step: skipping or stopping needs to know now. CPU–GPU sync.
        let applied = loss.value.isfinite().logical_and(&grad_norm.isfinite()).int64_value(&[]) == 1;
        if applied {
            self.state.consecutive_skips = 0;
            self.opt.step()?;
            self.ema.update(&self.online.vs);
        } else {
            match on_nonfinite {
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
                    ensure!(self.state.consecutive_skips <= max_skips, "{} non-finite steps in a row (run.max_consecutive_skips = {}); stopping", self.state.consecutive_skips, max_skips);
                    self.opt.zero_grad();
                }
            }
        }
        self.state.step += 1;
        self.state.data = self.order.position();
        self.state.ema_updates = self.ema.updates();
        Ok(StepReport { loss, grad_norm, applied })
    }

    /// Sums the gradients, the loss, its metrics and the stop requests of every rank, in one
    /// collective over flat buckets (the losses ride in the first bucket's buffer). A world of one
    /// hands back the loss as it is.
    fn reduce_over_ranks(&mut self, value: Tensor, metrics: Vec<(&'static str, Tensor)>) -> Result<Loss> {
        let stop_here = self.opts.stop.load(Ordering::SeqCst);
        if self.world.size() == 1 {
            self.stop_agreed = stop_here;
            return Ok(Loss { value, metrics });
        }
        let grads = self.opt.grads();
        let kind = grads.first().map(|g| g.kind()).unwrap_or(Kind::Float);
        let mut scalars: Vec<Tensor> = vec![value.reshape([1])];
        scalars.extend(metrics.iter().map(|(_, t)| t.reshape([1])));
        scalars.push(Tensor::from_slice(&[f64::from(u8::from(stop_here))]));
        let packed = Tensor::cat(&scalars.iter().map(|t| t.to_kind(kind).to_device(self.device)).collect::<Vec<_>>(), 0);
        let mut tensors = vec![packed.shallow_clone()];
        tensors.extend(grads);
        self.world.sum_flat(&tensors).with_context(|| format!("summing the gradients of step {}", self.state.step))?;
        let n = metrics.len() as i64;
        self.stop_agreed = packed.double_value(&[n + 1]) > 0.0;
        let value = packed.get(0).to_kind(value.kind());
        let metrics = metrics.iter().zip(1..).map(|((k, t), i)| (*k, packed.get(i).to_kind(t.kind()))).collect();
        Ok(Loss { value, metrics })
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

        // Rank 0 writes metrics, TensorBoard, grids and progress; every rank trains and evaluates.
        let main = self.world.is_main();
        let mut writers = match main {
            true => Some((MetricsWriter::open(&self.run.metrics(), self.saved_step)?, EventWriter::create(&self.run.tensorboard())?)),
            false => None,
        };
        // Latent-space runs decode their sample grids with the VAE.
        let grid_vae = match crate::data::vae::for_run(&cfg.vae, &cfg.data) {
            Some(v) if main => Some(v.load(self.device)?),
            _ => None,
        };
        let null_class = self.online.net.null_class();
        let (grid_noise, grid_class) = fixed_inputs(cfg.run.seed, cfg.sampling.grid_images, &cfg.model.sample_shape(), cfg.data.num_classes(), null_class, self.device);
        let sampler = cfg.sampler()?;
        let mut eval_inputs = cfg.eval_inputs()?;
        let mut progress = main.then(|| Progress::new(self.state.step, total, &cfg.run.name));
        let mut evaluator: Option<Evaluator> = None;
        let mut last_log = (Instant::now(), self.state.step);
        let mut last_loss = None;
        let mut outcome = Outcome::Finished;
        let clock = Instant::now();
        let base_time = self.state.train_time_s;

        while self.state.step < total {
            let stop = self.stop_agreed || (self.world.size() == 1 && self.opts.stop.load(Ordering::SeqCst));
            if stop || self.opts.max_steps_this_call.is_some_and(|m| self.state.step - self.start_step >= m) {
                outcome = Outcome::Interrupted;
                break;
            }
            let report = self.train_step()?;
            let step = self.state.step;

            let mut logged = None;
            if log.due(step, total) {
                let rate = (step - last_log.1) as f64 * cfg.run.batch_size as f64 / last_log.0.elapsed().as_secs_f64().max(1e-9);
                last_log = (Instant::now(), step);
                let shown = match writers.as_mut() {
                    Some((metrics, tb)) => self.log_step(&report, step, rate, metrics, tb)?,
                    None => report.loss.value.double_value(&[]),
                };
                (logged, last_loss) = (Some((shown, rate)), Some(shown));
            }
            if let Some(p) = progress.as_mut() {
                p.tick(step, logged.map(|l| l.0), logged.map(|l| l.1));
            }

            if let (true, Some((_, tb))) = (grids.due(step, total), writers.as_mut()) {
                write_grids(&self.live_sampler(&sampler)?, &cfg.sampling.steps, self.sampling_net(), &grid_noise, &grid_class, &self.run, step, tb, grid_vae.as_ref())?;
                if let Some(p) = progress.as_mut() {
                    p.pause_done();
                }
            }
            if checkpoints.due(step, total) {
                self.state.train_time_s = base_time + clock.elapsed().as_secs_f64();
                self.save()?;
                if let Some(p) = progress.as_mut() {
                    p.pause_done();
                }
            }
            // In-training FID (after the checkpoint, so a failing evaluation loses no training).
            // It reseeds the generator from its own stream; the next step reseeds for training.
            if let (Some(ev), true) = (&cfg.eval, evals.is_some_and(|c| c.due(step, total))) {
                let evaluator = match &evaluator {
                    Some(e) => e,
                    None => evaluator.insert(Evaluator::new(&eval_inputs, ev, self.world, self.device)?),
                };
                let steps = ev.steps.clone().unwrap_or_else(|| cfg.sampling.steps.clone());
                eval_inputs.sampler = self.live_sampler(&sampler)?;
                let rows = evaluator.evaluate(&eval_inputs, self.sampling_net(), cfg.sampling.weights, step, &steps, &self.run.root, self.device)?;
                if let Some((_, tb)) = writers.as_mut() {
                    for r in rows {
                        tb.scalar(&format!("fid/steps{}", r.steps), r.fid as f32, step as i64)?;
                    }
                }
                if let Some(p) = progress.as_mut() {
                    p.pause_done();
                }
            }
        }
        if let Some(p) = progress {
            p.finish();
        }
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

/// Rank 0 locks the run directory, chooses the checkpoint to resume from (or creates the
/// directory) and tells the other ranks its step; they open the same checkpoint read-only.
fn open_run_dir(world: &World, run: &RunDir, ckdir: &CheckpointDir, cfg: &ExperimentConfig, table: &toml::Table, opts: &TrainOptions) -> Result<(Option<FileLock>, Option<Checkpoint>)> {
    /// Sent in place of a step when rank 0 could not open the run directory.
    const FAILED: i64 = -2;
    if world.is_main() {
        let opened = (|| -> Result<(FileLock, Option<Checkpoint>)> {
            let lock = run.lock()?;
            let resume_from = match opts.resume {
                Resume::Auto => ckdir.latest()?,
                Resume::Never => {
                    ensure!(!ckdir.has_any(), "{} already has checkpoints: pass --resume auto to continue it, or choose another run.name", run.root.display());
                    None
                }
            };
            match &resume_from {
                None => run.create(table)?,
                Some(ck) => crate::config::change::check_resume(run, cfg, table, ck.step, opts.allow_config_change)?,
            }
            Ok((lock, resume_from))
        })();
        let told = match &opened {
            Ok((_, ck)) => ck.as_ref().map_or(-1, |c| c.step as i64),
            Err(_) => FAILED,
        };
        world.broadcast_i64(told)?;
        let (lock, resume_from) = opened?;
        tracing::info!("run directory {}", run.root.display());
        return Ok((Some(lock), resume_from));
    }
    match world.broadcast_i64(0)? {
        FAILED => bail!("rank 0 could not open the run directory {} (its log says why)", run.root.display()),
        -1 => Ok((None, None)),
        step => {
            let ck = ckdir
                .candidates()
                .into_iter()
                .find(|c| c.step as i64 == step)
                .with_context(|| format!("rank 0 resumes {} from step {step}, which rank {} cannot see (is the run directory on a shared filesystem?)", run.root.display(), world.rank()))?;
            Ok((None, Some(ck)))
        }
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
