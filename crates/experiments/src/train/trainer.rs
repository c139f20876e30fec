//! `flowmap train`: one generic loop over any [`Objective`](flowmap_objectives::Objective), configured from TOML.
//!
//! Every step reseeds the global generator from (seed, step), takes the next batch of a
//! per-epoch permutation, computes the objective's loss, checks it (and the gradient norm) for
//! finiteness, steps AdamW and the EMA. Checkpoints hold model, EMA, AdamW moments, step, data
//! position and counters, so `--resume auto` continues exactly (same parameters, same losses).
use crate::config::{ExperimentConfig, NonFinite};
use crate::data::loader::{DataPosition, Order};
use crate::eval::sampling::{fixed_inputs, Sampler, Weights};
use crate::run::checkpoint::{CheckpointContents, CheckpointDir};
use crate::run::model::{load_run_weights, load_vars, named_vars, Net};
use crate::run::rng::{self, Stream};
use crate::run::run_dir::RunDir;
use crate::train::adamw::AdamW;
use crate::train::metrics::MetricsWriter;
use crate::train::progress::Progress;
use crate::train::tensorboard::EventWriter;
use anyhow::{bail, ensure, Context, Result};
use flowmap_core::{Ema, VelocityField};
use flowmap_objectives::{Batch, Nets};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Kind, Tensor};

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
    let run = RunDir::new(opts.run_dir.clone().unwrap_or_else(|| cfg.default_run_dir()));
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
        Some(ck) => crate::config::change::check_resume(&run, cfg, table, ck.step, opts.allow_config_change)?,
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
    let grid_vae = match crate::data::vae::for_run(&cfg.vae, &cfg.data) {
        Some(v) => Some(v.load(device)?),
        None => None,
    };
    let (grid_noise, grid_class) = fixed_inputs(cfg.run.seed, cfg.sampling.grid_images, &cfg.model.sample_shape(), cfg.data.num_classes(), null_class, device);
    let mut progress = Progress::new(state.step, cfg.run.steps, &cfg.run.name);
    let mut evaluator: Option<crate::eval::evaluator::Evaluator> = None;
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
            write_grids(&cfg.sampler()?, &cfg.sampling.steps, net, &grid_noise, &grid_class, &run, step, &mut tb, grid_vae.as_ref())?;
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
                None => evaluator.insert(crate::eval::evaluator::Evaluator::new(&cfg.eval_inputs()?, ev, device)?),
            };
            let net: &dyn VelocityField = match cfg.sampling.weights {
                Weights::Ema => ema_net.as_ref(),
                Weights::Online => online.net.as_ref(),
            };
            let steps = ev.steps.clone().unwrap_or_else(|| cfg.sampling.steps.clone());
            for r in evaluator.evaluate(&cfg.eval_inputs()?, net, cfg.sampling.weights, step, &steps, &run.root, device)? {
                tb.scalar(&format!("fid/steps{}", r.steps), r.fid as f32, step as i64)?;
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
