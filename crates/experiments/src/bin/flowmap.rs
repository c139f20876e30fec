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
    /// FID (and KID) of a run at several step counts; appends to <run>/fid.csv.
    Fid {
        #[arg(long)]
        run: PathBuf,
        /// Step counts (default: [eval].steps or [sampling].steps of the run).
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
        Command::Train { config, set, resume, run_dir, max_steps } => {
            let (cfg, table) = train::load_config(&config, &set)?;
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
            let mut ev = cfg.eval.clone().unwrap_or(eval::EvalConfig { num_samples: 1000, steps: None, reference: Default::default(), preprocess: Default::default(), kid: true, batch: 100 });
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
        Command::Doctor => print!("{}", flowmap_experiments::doctor::report()?),
    }
    Ok(())
}

fn read_run_config(run: &std::path::Path) -> Result<train::ExperimentConfig> {
    let table = run_dir::read_config(run)?;
    flowmap_experiments::overrides::deserialize(&table, &run.join("config.toml").display().to_string())
}
