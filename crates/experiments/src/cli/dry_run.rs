//! `flowmap train CONFIG --dry-run`: checks a config and its data without training.
//!
//! Parses and validates the config (with `--set` overrides), builds the model on the CPU and
//! counts its parameters, opens the data (an image folder is listed and two images decoded; a
//! latents manifest is read and every shard's sha256 verified), reads one batch, loads the VAE
//! weights named in `[vae]` (and checks their sha256 against the latents manifest), optionally runs
//! one forward pass of the model on that batch, and reports the teacher run (which may not exist
//! yet: a warning, not an error).
use crate::config::ExperimentConfig;
use anyhow::{ensure, Context, Result};
use std::fmt::Write as _;
use tch::{Device, Kind, Tensor};

/// What the dry run checked.
#[derive(Debug, Clone, Default)]
pub struct DryRunReport {
    pub lines: Vec<String>,
    pub warnings: Vec<String>,
    pub parameters: i64,
    pub data_len: usize,
    pub data_classes: i64,
}

impl DryRunReport {
    pub fn render(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            let _ = writeln!(s, "ok   {l}");
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warn {w}");
        }
        s
    }
}

/// Options of a dry run.
#[derive(Debug, Clone, Copy)]
pub struct DryRunOptions {
    /// Run one forward pass of the model on a batch of 1 (seconds on the CPU for XL/2).
    pub forward: bool,
}

/// Checks `cfg` (already parsed and validated by `load_config`) and its data on the CPU.
pub fn dry_run(cfg: &ExperimentConfig, opts: DryRunOptions) -> Result<DryRunReport> {
    let mut r = DryRunReport::default();
    cfg.validate()?;
    r.lines.push(format!("config: run {:?}, {} steps of batch {}, objective {}", cfg.run.name, cfg.run.steps, cfg.run.batch_size, cfg.objective.kind()));
    r.lines.push(format!("sampling: {}; step counts {:?}", cfg.sampler()?, cfg.sampling.steps));
    // The data first: a missing data set fails in milliseconds, before an XL model is built.
    let mut data = cfg.data.open(cfg.model.null_class(), cfg.run.seed, true).context("opening the data")?;
    r.data_len = data.len();
    r.data_classes = data.num_classes();
    r.lines.push(format!("data: {}", data.describe()));
    if cfg.data.latents().is_some() {
        r.lines.push("data: every shard's sha256 matches the manifest".into());
    }
    ensure!(!data.is_empty(), "the data is empty");
    if (data.len() as i64) < cfg.run.batch_size {
        r.warnings.push(format!("the data has {} items, fewer than run.batch_size = {}: training would refuse to start", data.len(), cfg.run.batch_size));
    }
    let n = data.len().min(2) as i64;
    let idx: Vec<i64> = (0..n).collect();
    let (x, class) = data.batch(&idx, 0, Device::Cpu).context("reading a first batch")?;
    ensure!(x.size()[1..] == cfg.model.sample_shape()[..], "a batch has shape {:?}, the model takes {:?}", x.size(), cfg.model.sample_shape());
    ensure!(x.isfinite().all().int64_value(&[]) == 1, "the first batch holds non-finite values");
    r.lines.push(format!("batch: x {:?} in [{:.3}, {:.3}], class {:?}", x.size(), x.min().double_value(&[]), x.max().double_value(&[]), Vec::<i64>::try_from(&class).unwrap_or_default()));
    if data.skipped() > 0 {
        r.warnings.push(format!("{} unreadable image files in the first batch (skipped)", data.skipped()));
    }
    let net = tch::no_grad(|| cfg.model.build(Device::Cpu))?;
    ensure!(net.net.null_class() == cfg.model.null_class(), "the built model's null class {} differs from [model]'s {}", net.net.null_class(), cfg.model.null_class());
    r.parameters = net.num_parameters();
    r.lines.push(format!("model: {} trainable parameters, sample shape {:?}, {} classes", r.parameters, cfg.model.sample_shape(), cfg.model.num_classes()));
    if let Some(v) = crate::data::vae::for_run(&cfg.vae, &cfg.data) {
        let (line, warn) = v.check(&cfg.data)?;
        r.lines.push(line);
        r.warnings.extend(warn);
    }
    if opts.forward {
        let t0 = std::time::Instant::now();
        let x1 = x.narrow(0, 0, 1);
        let t = Tensor::full([1], 0.5, (Kind::Float, Device::Cpu));
        let h = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| net.net.forward(&x1, &t, &h, &class.narrow(0, 0, 1)));
        ensure!(y.isfinite().all().int64_value(&[]) == 1, "the model's output is not finite");
        r.lines.push(format!("forward: output {:?} in {:.2} s on the CPU", y.size(), t0.elapsed().as_secs_f64()));
    }
    if let Some(t) = &cfg.teacher {
        match crate::run::checkpoint::CheckpointDir::new(crate::run::run_dir::RunDir::new(&t.run).checkpoints(), 1).latest() {
            Ok(Some(ck)) => r.lines.push(format!("teacher: {} (step {})", t.run.display(), ck.step)),
            _ => r.warnings.push(format!("teacher run {} has no checkpoint yet: train it first", t.run.display())),
        }
    }
    Ok(r)
}
