//! The `flowmap` command line (clap definitions). The binary (src/bin/flowmap.rs) only dispatches;
//! the definitions live here so tests can parse every command the documentation shows
//! (`Cli::try_parse_from`, tests/docs_commands.rs).
pub mod doctor;
pub mod dry_run;
pub mod import_checkpoint;
pub mod launch;
pub mod migrate_config;
pub mod reflow_pairs;

use crate::data::image_folder::Layout;
use crate::data::latents::LatentDtype;
use crate::eval::sampling::Weights;
use crate::run::device::DeviceChoice;
use crate::train::Resume;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// A sampling rule by its config name (`euler`, `dpm_solver_pp_2m`, …).
fn parse_rule(s: &str) -> Result<flowmap_core::RuleName, String> {
    let names: Vec<&str> = flowmap_core::RuleName::ALL.iter().map(|r| r.name()).collect();
    flowmap_core::RuleName::ALL.iter().copied().find(|r| r.name() == s).ok_or_else(|| format!("unknown rule {s:?}; one of {}", names.join(", ")))
}

#[derive(Parser)]
#[command(name = "flowmap", version, about = "Few-step and one-step generative models on libtorch")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train from a TOML experiment file.
    Train {
        config: PathBuf,
        /// Override a key: --set objective.times.equal_fraction=0.5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// auto: continue from the newest complete checkpoint; never: refuse an existing run.
        #[arg(long, value_enum, default_value = "auto")]
        resume: Resume,
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
        /// Resume even though the config differs from the run's config.toml in keys that change
        /// training (the old file is kept and the change recorded in config_changes.jsonl).
        #[arg(long)]
        allow_config_change: bool,
    },
    /// Encode an image folder once into SD-VAE latent shards (posterior mean and std); resumes.
    Latents {
        /// Image folder (ImageNet train layout or a flat folder).
        #[arg(long)]
        source: PathBuf,
        #[arg(long, value_enum, default_value = "class-folders")]
        layout: Layout,
        /// Output folder (shards + manifest.json).
        #[arg(long)]
        out: PathBuf,
        /// VAE weights (diffusers diffusion_pytorch_model.safetensors); default $FLOWMAP_SD_VAE.
        #[arg(long)]
        vae: Option<PathBuf>,
        /// A TOML file of VaeConfig fields (default: sd-vae-ft-mse).
        #[arg(long)]
        vae_arch: Option<PathBuf>,
        /// Crop size in pixels: a multiple of the VAE's downsampling factor (8 for sd-vae-ft-mse).
        #[arg(long, default_value_t = 256)]
        image_size: u32,
        /// Storage precision of mean and std.
        #[arg(long, value_enum, default_value = "f16")]
        dtype: LatentDtype,
        /// Do not also encode the horizontally flipped images.
        #[arg(long)]
        no_flip: bool,
        /// Source images per shard (>= 1).
        #[arg(long, default_value_t = 10000)]
        shard_size: usize,
        /// Images per VAE forward (>= 1).
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Decode threads (>= 1; default: all cores).
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// Stop after this many new shards (the next call resumes).
        #[arg(long)]
        max_shards: Option<usize>,
    },
    /// Sample images from a run at several step counts (PNG grids + safetensors).
    Sample {
        #[arg(long)]
        run: PathBuf,
        /// Step counts (each >= 1).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        steps: Vec<usize>,
        /// Images per step count (>= 1).
        #[arg(long, default_value_t = 64)]
        num: i64,
        #[arg(long, value_enum, default_value = "ema")]
        weights: Weights,
        /// Classifier-free guidance scale (finite; default: the run's `sampling.cfg_scale`).
        #[arg(long, allow_negative_numbers = true)]
        cfg_scale: Option<f64>,
        /// Class of every image, 0..K−1 (conditional runs; default: cycle through the classes).
        #[arg(long)]
        class: Option<i64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Walk the optimised grid `<run>/grids/<NAME>.toml` (`flowmap optimize-grid`) instead of
        /// the run's `[sampling]` grid (sets sampling.optimized_grid).
        #[arg(long, value_name = "NAME")]
        grid: Option<String>,
    },
    /// N samples per step count as an ADM sample batch (`samples_NxHxWx3.npz`: arr_0 uint8 NHWC,
    /// arr_1 labels), written in shards (resumable; sharded over ranks under `flowmap launch`).
    ExportSamples {
        #[arg(long)]
        run: PathBuf,
        /// Step counts (each >= 1; one batch each).
        #[arg(long, value_delimiter = ',', required = true)]
        steps: Vec<usize>,
        /// Samples per step count (>= 1; 50000 for FID-50k).
        #[arg(long)]
        num: usize,
        #[arg(long, value_enum, default_value = "ema")]
        weights: Weights,
        /// Classifier-free guidance scale (finite; default: the run's `sampling.cfg_scale`).
        #[arg(long, allow_negative_numbers = true)]
        cfg_scale: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images per shard file (the unit of resuming and of sharding over ranks).
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// Images per sampler call.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Output folder (default: `<run>/samples/npz`); one `steps{N}/` folder per step count.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The ADM evaluator's suite (Inception Score, FID, sFID, precision, recall) of a sample batch
    /// `.npz` against a reference batch (images in arr_0 and/or mu, sigma, mu_s, sigma_s).
    Evaluate {
        /// Sample batch: arr_0 uint8 (N, H, W, 3).
        samples: PathBuf,
        /// Reference batch, e.g. VIRTUAL_imagenet256_labeled.npz.
        #[arg(long = "ref")]
        reference: PathBuf,
        /// The Inception classifier matrix for Inception Score: an .npz with `weight` (1008, 2048)
        /// (not in any package registry; `python/inception_logits.py` extracts it from a
        /// pytorch-fid or torch-fidelity weights file).
        #[arg(long)]
        inception_logits: Option<PathBuf>,
        /// Pre-processing: tf (the ADM evaluator's TF1 resize, default) or pytorch_fid.
        #[arg(long, default_value = "tf")]
        preprocess: String,
        /// Neighbourhood size of precision/recall.
        #[arg(long, default_value_t = 3)]
        k: usize,
        /// Inception Score splits: a count (10) or `size:5000` (the ADM evaluator's split size).
        #[arg(long, default_value = "10")]
        is_splits: String,
        /// Images per Inception batch (also the unit of sharding over ranks).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// Also write the numbers as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A facebookresearch/DiT or SiT PyTorch checkpoint as a flowmap run folder (model.toml +
    /// checkpoints/step_00000000 with model and ema), for `[teacher] run = OUT` and evaluation.
    ImportCheckpoint {
        /// `.pt`/`.pth` (read with the venv's torch) or `.safetensors`.
        checkpoint: PathBuf,
        #[arg(long, value_enum, default_value = "dit")]
        source: crate::cli::import_checkpoint::Source,
        /// Which weights of a training checkpoint: auto (ema, else model), ema, model, none (a bare state dict).
        #[arg(long, default_value = "auto")]
        key: String,
        /// Let torch.load unpickle Python objects (training checkpoints' `args`): runs code from the file, trusted files only.
        #[arg(long)]
        allow_pickle: bool,
        /// Attention heads (default: the DiT preset of the checkpoint's width).
        #[arg(long)]
        num_heads: Option<i64>,
        /// Output folder (a new run folder).
        #[arg(long)]
        out: PathBuf,
    },
    /// Two-stage reflow, stage one: (noise, sample) couplings from a trained run, for data.reflow_pairs.
    ReflowPairs {
        /// The trained (teacher) run.
        #[arg(long)]
        teacher: PathBuf,
        /// Couplings to generate (>= 1).
        #[arg(long)]
        count: i64,
        /// Sampling steps of the teacher's `[sampling]` rule (>= 1).
        #[arg(long, default_value_t = 128)]
        steps: usize,
        #[arg(long, value_enum, default_value = "ema")]
        weights: Weights,
        /// Couplings per sampler call (>= 1).
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
        /// Step counts, each >= 1 (default: `[eval].steps` or `[sampling].steps` of the run).
        #[arg(long, value_delimiter = ',')]
        steps: Vec<usize>,
        /// Generated images per step count, >= 2 (default: `[eval].num_samples`, else 1000).
        #[arg(long)]
        num_samples: Option<usize>,
        #[arg(long, value_enum, default_value = "ema")]
        weights: Weights,
        /// Use the TF / ADM convention instead of pytorch-fid's.
        #[arg(long)]
        tf: bool,
        /// Reference statistics from a published .npz (mu, sigma) instead of a data split.
        #[arg(long)]
        ref_npz: Option<PathBuf>,
        /// Reference images: the first N of the split, N >= 2 (default: `[eval].reference` or the whole split).
        #[arg(long)]
        ref_images: Option<usize>,
        /// Evaluation seeds (each its own noise, one row each; default: eval.seeds or 1).
        #[arg(long)]
        seeds: Option<u64>,
        /// Walk the optimised grid `<run>/grids/<NAME>.toml` (sets sampling.optimized_grid).
        #[arg(long, value_name = "NAME")]
        grid: Option<String>,
    },
    /// Search a time grid for a trained run at fixed step counts (minimising the distance of the
    /// samples to a many-step reference solution on held-out noise) and save it as
    /// `<run>/grids/<NAME>.toml`, for `[sampling] optimized_grid = "NAME"` or `--grid NAME`.
    #[command(name = "optimize-grid")]
    OptimizeGrid {
        #[arg(long)]
        run: PathBuf,
        /// The grid's name (a file stem).
        #[arg(long)]
        name: String,
        /// Step counts, one grid each (1..=64).
        #[arg(long, value_delimiter = ',', required = true)]
        steps: Vec<usize>,
        /// The rule the grid is for (default: the run's sampling rule): euler, heun, dpm_solver_pp_2m, …
        #[arg(long, value_parser = parse_rule)]
        rule: Option<flowmap_core::RuleName>,
        /// Noise samples of the fit (as many again are held out).
        #[arg(long, default_value_t = 256)]
        samples: i64,
        /// Uniform steps of the reference solution.
        #[arg(long, default_value_t = 128)]
        reference_steps: usize,
        /// Coordinate sweeps over the grid's interior times.
        #[arg(long, default_value_t = 3)]
        sweeps: usize,
        /// Golden-section evaluations per time and sweep (>= 2).
        #[arg(long, default_value_t = 8)]
        probes: usize,
        #[arg(long, value_enum, default_value = "ema")]
        weights: Weights,
    },
    /// The demo's 2-D part: flow matching, Shortcut, MeanFlow and consistency training on 2-D
    /// distributions (MLP), sampled at 1-16 steps; scatter figures and a sliced-W1 table.
    #[command(name = "demo-2d")]
    Demo2d {
        /// Output folder (table.md, scores.csv, one PNG per distribution).
        #[arg(long, default_value = "runs/demo/2d")]
        out: PathBuf,
        /// Training seeds per (distribution, method).
        #[arg(long, default_value_t = 3)]
        seeds: u64,
        /// Training steps per model.
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Distributions (default: all three).
        #[arg(long, value_delimiter = ',')]
        toy: Vec<crate::demo::toy_data::Toy>,
    },
    /// Start N local ranks of a data-parallel job (for machines without torchrun):
    /// `flowmap launch --nproc 2 -- train CONFIG`. torchrun (`torchrun --no-python
    /// --nproc-per-node=2 flowmap train CONFIG`) and Slurm (`srun flowmap train CONFIG`) work too.
    Launch {
        /// Ranks to start on this machine.
        #[arg(long)]
        nproc: usize,
        /// Port of rank 0's store (default: a free port).
        #[arg(long)]
        master_port: Option<u16>,
        /// The flowmap command every rank runs, after `--`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// FID against steps for one or several runs, and their loss curves (PNG + SVG).
    Plot {
        #[arg(long = "run", required = true)]
        runs: Vec<PathBuf>,
        /// Output folder (default: the first run's plots/).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Rewrite experiment files (or a run's config.toml) written in an older form, keeping each
    /// original as FILE.bak; prints what changed.
    MigrateConfig {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Train (or reuse) one run per objective of a table spec, evaluate, write table + plot.
    Table {
        spec: PathBuf,
        /// Train this many rows at a time, each in a child process with cores/JOBS threads
        /// (faster for small models on a CPU); evaluation stays one row at a time
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
        jobs: u64,
    },
    /// Print torch/CUDA facts, cache locations and which data sets and weights are verified.
    Doctor,
    /// One section of the GPU acceptance run (`scripts/gpu_check.sh` runs them all beside the
    /// PyTorch reference and writes report.json / report.md); writes the section's JSON to --out.
    GpuCheck {
        #[arg(value_enum)]
        section: crate::gpu_check::Section,
        /// The section's JSON file (rewritten after every measurement).
        #[arg(long)]
        out: PathBuf,
        /// Folder for weights, inputs and runs.
        #[arg(long)]
        work: PathBuf,
        /// Tiny models, few iterations: every code path in seconds (CI runs it on the CPU).
        #[arg(long)]
        quick: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// Inception TorchScript file to time (bench); real or random weights.
        #[arg(long)]
        inception: Option<PathBuf>,
        /// Wall-clock cap of each MNIST training run in seconds (mnist; default 75, quick 30).
        #[arg(long)]
        train_seconds: Option<f64>,
    },
}
