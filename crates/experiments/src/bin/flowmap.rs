//! The `flowmap` command: thin wrappers over flowmap-experiments.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use flowmap_experiments::{eval, run_dir, sample, table, train};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "flowmap", version, about = "Few-step and one-step generative models on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ResumeArg {
    Auto,
    Never,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightsArg {
    Ema,
    Online,
}

impl From<WeightsArg> for flowmap_experiments::sampling::Weights {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::Ema => Self::Ema,
            WeightsArg::Online => Self::Online,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    ClassFolders,
    Flat,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a TOML experiment file.
    Train {
        config: PathBuf,
        /// Override a key: --set objective.equal_fraction=0.5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// auto: continue from the newest complete checkpoint; never: refuse an existing run.
        #[arg(long, value_enum, default_value = "auto")]
        resume: ResumeArg,
        /// Run directory (default: run.out_dir/run.name).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Stop (with a checkpoint) after this many steps of this invocation.
        #[arg(long)]
        max_steps: Option<u64>,
        /// Check the config, model, data (and latents checksums) and VAE weights; do not train.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: skip the one forward pass of the model (slow on the CPU for XL/2).
        #[arg(long, requires = "dry_run")]
        no_forward: bool,
    },
    /// Encode an image folder once into SD-VAE latent shards (posterior mean and std); resumes.
    Latents {
        /// Image folder (ImageNet train layout or a flat folder).
        #[arg(long)]
        source: PathBuf,
        #[arg(long, value_enum, default_value = "class-folders")]
        layout: LayoutArg,
        /// Output folder (shards + manifest.json).
        #[arg(long)]
        out: PathBuf,
        /// VAE weights (diffusers diffusion_pytorch_model.safetensors); default $FLOWMAP_SD_VAE.
        #[arg(long)]
        vae: Option<PathBuf>,
        /// A TOML file of VaeConfig fields (default: sd-vae-ft-mse).
        #[arg(long)]
        vae_arch: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        image_size: u32,
        /// Storage precision of mean and std.
        #[arg(long, value_enum, default_value = "f16")]
        dtype: DtypeArg,
        /// Do not also encode the horizontally flipped images.
        #[arg(long)]
        no_flip: bool,
        /// Source images per shard.
        #[arg(long, default_value_t = 10000)]
        shard_size: usize,
        /// Images per VAE forward.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Decode threads (default: all cores).
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// Stop after this many new shards (the next call resumes).
        #[arg(long)]
        max_shards: Option<usize>,
    },
    /// Sample images from a run at several step counts (PNG grids + safetensors).
    Sample {
        #[arg(long)]
        run: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        steps: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        num: i64,
        #[arg(long, value_enum, default_value = "ema")]
        weights: WeightsArg,
        #[arg(long)]
        cfg_scale: Option<f64>,
        #[arg(long)]
        class: Option<i64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Two-stage reflow, stage one: (noise, sample) couplings from a trained run, for data.reflow_pairs.
    ReflowPairs {
        /// The trained (teacher) run.
        #[arg(long)]
        teacher: PathBuf,
        #[arg(long)]
        count: i64,
        /// Sampling steps of the teacher's `[sampling]` rule.
        #[arg(long, default_value_t = 128)]
        steps: usize,
        #[arg(long, value_enum, default_value = "ema")]
        weights: WeightsArg,
        #[arg(long, default_value_t = 256)]
        batch: i64,
        /// Output file (default: `<teacher>/reflow_pairs.safetensors`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// FID (and KID) of a run at several step counts; appends to `<run>/fid.csv`.
    Fid {
        #[arg(long)]
        run: PathBuf,
        /// Step counts (default: `[eval].steps` or `[sampling].steps` of the run).
        #[arg(long, value_delimiter = ',')]
        steps: Vec<usize>,
        /// Generated images per step count (default: [eval].num_samples, else 1000).
        #[arg(long)]
        num_samples: Option<usize>,
        #[arg(long, value_enum, default_value = "ema")]
        weights: WeightsArg,
        /// Use the TF / ADM convention instead of pytorch-fid's.
        #[arg(long)]
        tf: bool,
        /// Reference statistics from a published .npz (mu, sigma) instead of a data split.
        #[arg(long)]
        ref_npz: Option<PathBuf>,
        /// Reference images: the first N of the split (default: [eval].reference or the whole split).
        #[arg(long)]
        ref_images: Option<usize>,
    },
    /// FID against steps for one or several runs, and their loss curves (PNG + SVG).
    Plot {
        #[arg(long = "run", required = true)]
        runs: Vec<PathBuf>,
        /// Output folder (default: the first run's plots/).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Train (or reuse) one run per objective of a table spec, evaluate, write table + plot.
    Table { spec: PathBuf },
    /// Print torch/CUDA facts, cache locations and which data sets and weights are verified.
    Doctor,
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&flag)).context("installing the signal handler")?;
    }
    Ok(flag)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())).with_writer(std::io::stderr).init();
    match Cli::parse().command {
        Command::Train { config, set, resume, run_dir, max_steps, dry_run, no_forward } => {
            let (cfg, table) = train::load_config(&config, &set)?;
            if dry_run {
                let report = flowmap_experiments::dry_run::dry_run(&cfg, flowmap_experiments::dry_run::DryRunOptions { forward: !no_forward })?;
                print!("{}", report.render());
                println!("{}: dry run passed", config.display());
                return Ok(());
            }
            let opts = train::TrainOptions {
                run_dir,
                resume: match resume {
                    ResumeArg::Auto => train::Resume::Auto,
                    ResumeArg::Never => train::Resume::Never,
                },
                stop: stop_flag()?,
                max_steps_this_call: max_steps,
                inject_nan_at: vec![],
            };
            let s = train::train(&cfg, &table, &opts)?;
            println!("{} at step {} ({:?}); run directory {}", cfg.run.name, s.step, s.outcome, s.run_dir.display());
        }
        Command::Sample { run, steps, num, weights, cfg_scale, class, seed, out } => {
            let cfg = read_run_config(&run)?;
            let req = sample::SampleRequest { steps, num, weights: weights.into(), cfg_scale, class, seed, out };
            let out = sample::sample_run(&run, &cfg, &req, cfg.run.device.device()?)?;
            println!("samples in {}", out.display());
        }
        Command::Fid { run, steps, num_samples, weights, tf, ref_npz, ref_images } => {
            let cfg = read_run_config(&run)?;
            let mut ev = cfg.eval.clone().unwrap_or(eval::EvalConfig { num_samples: 1000, steps: None, reference: Default::default(), preprocess: Default::default(), kid: true, batch: 100, every: 0 });
            if let Some(n) = num_samples {
                ev.num_samples = n;
            }
            if tf {
                ev.preprocess = flowmap_experiments::fid::Preprocess::Tf;
            }
            if ref_npz.is_some() {
                ev.reference.npz = ref_npz;
            }
            if ref_images.is_some() {
                ev.reference.num_images = ref_images;
            }
            let steps = if steps.is_empty() { ev.steps.clone().unwrap_or(cfg.sampling.steps.clone()) } else { steps };
            let rows = eval::evaluate_run(&run, &cfg, &ev, weights.into(), &steps, cfg.run.device.device()?)?;
            println!("steps,fid,kid");
            for r in rows {
                println!("{},{:.3},{}", r.nfe, r.fid, r.kid.map(|k| format!("{k:.5}")).unwrap_or_default());
            }
        }
        Command::ReflowPairs { teacher, count, steps, weights, batch, out } => {
            let cfg = read_run_config(&teacher)?;
            let out = out.unwrap_or_else(|| teacher.join("reflow_pairs.safetensors"));
            flowmap_experiments::reflow_pairs::make_pairs(&teacher, &cfg, weights.into(), count, steps, batch, &out, cfg.run.device.device()?)?;
            println!("{}", out.display());
        }
        Command::Plot { runs, out } => {
            let out = out.unwrap_or_else(|| run_dir::RunDir::new(&runs[0]).plots());
            for f in table::plot_runs(&runs, &out)? {
                println!("{}", f.display());
            }
        }
        Command::Table { spec } => {
            let report = table::run_table(&spec)?;
            println!("{}", report.markdown);
            println!("table: {}\nplot: {}", report.markdown_path.display(), report.plot_png.display());
        }
        Command::Latents { source, layout, out, vae, vae_arch, image_size, dtype, no_flip, shard_size, batch, workers, device, max_shards } => {
            use flowmap_experiments::data::{image_folder::Layout, latents};
            let arch: flowmap_models::vae::VaeConfig = match &vae_arch {
                Some(p) => flowmap_experiments::overrides::load(p, &[])?.0,
                None => Default::default(),
            };
            let section = flowmap_experiments::vae_section::VaeSection { weights: vae.map(|p| p.display().to_string()), arch };
            let device = match device {
                DeviceArg::Auto => tch::Device::cuda_if_available(),
                DeviceArg::Cpu => tch::Device::Cpu,
                DeviceArg::Cuda => tch::Device::Cuda(0),
            };
            let model = section.load(device)?;
            let shape = model.config().latent_shape(image_size as i64, image_size as i64).to_vec();
            let opts = latents::EncodeOptions {
                source,
                layout: match layout {
                    LayoutArg::ClassFolders => Layout::ClassFolders,
                    LayoutArg::Flat => Layout::Flat,
                },
                out,
                image_size,
                dtype: match dtype {
                    DtypeArg::F16 => latents::LatentDtype::F16,
                    DtypeArg::F32 => latents::LatentDtype::F32,
                },
                flip: !no_flip,
                shard_size,
                batch,
                workers: workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
                max_new_shards: max_shards,
            };
            let mut encode = |x: &tch::Tensor| -> Result<(tch::Tensor, tch::Tensor)> { Ok(model.encode_moments(&x.to_device(device))) };
            let r = latents::encode_folder(&opts, section.identity()?, shape, &mut encode)?;
            let per_s = r.encoded_images as f64 * if opts.flip { 2.0 } else { 1.0 } / r.seconds.max(1e-9);
            println!(
                "{}: {} latents in {} shards ({} encoded now, {} verified and skipped), {} unreadable files skipped; {} images encoded in {:.3} s ({per_s:.1} VAE encodes/s incl. flips, decoding included){}",
                opts.out.join(latents::MANIFEST).display(),
                r.manifest.num_rows(),
                r.manifest.shards.len(),
                r.encoded_shards,
                r.verified_shards,
                r.manifest.skipped.len(),
                r.encoded_images,
                r.seconds,
                if r.complete { "" } else { "; NOT complete: run the same command again to continue" }
            );
        }
        Command::Doctor => print!("{}", flowmap_experiments::doctor::report()?),
    }
    Ok(())
}

fn read_run_config(run: &std::path::Path) -> Result<train::ExperimentConfig> {
    let table = run_dir::read_config(run)?;
    flowmap_experiments::overrides::deserialize(&table, &run.join("config.toml").display().to_string())
}
