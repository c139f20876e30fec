//! `flowmap gpu-check SECTION`: the flowmap half of the GPU acceptance run
//! (`scripts/gpu_check.sh`, README "GPU check"). Each section writes one JSON file, rewritten after
//! every measurement so that a section killed by its time limit still leaves what it measured; the
//! script runs the PyTorch reference (`python/flowmap_ref`) beside it and merges both into
//! `report.json` and `report.md`.
//!
//! * [`throughput`] (`bench`): DiT-B/2 training steps (flow matching, MeanFlow with its JVP,
//!   Shortcut) with img/s and peak CUDA memory, forward latency and throughput, 1- and 128-step
//!   sampling, Inception feature and SD-VAE decode throughput;
//! * [`parity`] (`parity`): the same DiT (and VAE decoder) weights, inputs and outputs written for
//!   the PyTorch reference, which must reproduce them (so the side-by-side compares one network);
//! * [`checks`] (`checks`): GPU correctness: bf16 against f32, fused AdamW against the plain
//!   update, the JVP against finite differences in float64, host synchronisations of the sampler;
//! * [`real_data`] (`mnist`): the demo's three objectives on MNIST with a larger DiT, FID at
//!   1, 2, 4 and 16 steps, the table and the FID-vs-steps plot.
//!
//! `--quick` runs every code path with tiny models on whatever device is there (CI runs it on the
//! CPU); the full sizes are for one H100/H200 and fit the script's 8-minute budget.
pub mod checks;
pub mod measure;
pub mod parity;
pub mod real_data;
pub mod throughput;

use anyhow::{Context, Result};
use flowmap_models::{DitConfig, Precision, VaeConfig};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use tch::Device;

/// Which part of the GPU check a `flowmap gpu-check` call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Throughput and memory (module `throughput`).
    Bench,
    /// Weights and outputs for the PyTorch reference (module `parity`).
    Parity,
    /// GPU correctness checks (module `checks`).
    Checks,
    /// Real-data training and FID on MNIST (module `real_data`).
    Mnist,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Bench => "bench",
            Section::Parity => "parity",
            Section::Checks => "checks",
            Section::Mnist => "mnist",
        }
    }
}

/// What every section is given.
#[derive(Debug, Clone)]
pub struct GpuCheckOptions {
    /// Tiny models and few iterations: the same code paths in seconds (CI, on the CPU).
    pub quick: bool,
    pub device: Device,
    /// Folder for weights, inputs, runs; the script deletes what it does not report.
    pub work: PathBuf,
    /// The Inception TorchScript file to time (real or random weights); none skips that row.
    pub inception: Option<PathBuf>,
    /// Wall-clock cap of each MNIST training run (default: 75 s, quick 30 s).
    pub train_seconds: Option<f64>,
}

/// The sizes a section runs at.
#[derive(Debug, Clone)]
pub struct Scale {
    /// The benchmarked DiT: B/2 on 4×32×32 latents, 1000 classes, bf16 (tiny in quick mode).
    pub dit: DitConfig,
    /// Images per training step and per throughput forward.
    pub batch: i64,
    /// Smallest batch tried after out-of-memory errors.
    pub min_batch: i64,
    /// (warm-up, timed) iterations of a training step or a batched forward.
    pub iters: (usize, usize),
    /// The same for the MeanFlow step (slower).
    pub jvp_iters: (usize, usize),
    /// (warm-up, timed) batch-1 forwards.
    pub latency_iters: (usize, usize),
    /// The long sampling run (128 steps).
    pub long_steps: usize,
    /// The VAE whose decoder is timed, and the decode batch.
    pub vae: VaeConfig,
    pub vae_batch: i64,
    /// Images per Inception forward, and how many forwards are timed.
    pub inception_batch: i64,
    pub inception_iters: (usize, usize),
}

impl Scale {
    /// DiT-B/2 at batch 256 in bf16, SD-VAE decode at 256², Inception at batch 250 (the sizes of
    /// tables.md's PyTorch baseline).
    pub fn full() -> Self {
        let dit = DitConfig { precision: Precision::Bf16, ..DitConfig::b2() };
        Scale {
            dit,
            batch: 256,
            min_batch: 32,
            iters: (3, 10),
            jvp_iters: (2, 5),
            latency_iters: (10, 50),
            long_steps: 128,
            vae: VaeConfig::sd_vae_ft_mse(),
            vae_batch: 32,
            inception_batch: 250,
            inception_iters: (2, 4), // TorchScript's profiling executor optimises on the first calls
        }
    }

    /// A 2-block DiT on 4×8×8 latents, the tiny VAE: every code path in seconds on 2 CPU cores.
    pub fn quick() -> Self {
        let dit = DitConfig { input_size: 8, num_classes: 10, precision: Precision::Bf16, ..DitConfig::arch(2, 64, 4, 2) };
        Scale {
            dit,
            batch: 32, // Shortcut's paper setting needs >= 28 rows (a quarter of them, one per level)
            min_batch: 32,
            iters: (1, 2),
            jvp_iters: (1, 2),
            latency_iters: (1, 3),
            long_steps: 128,
            vae: VaeConfig::tiny(),
            vae_batch: 2,
            inception_batch: 2,
            inception_iters: (0, 1),
        }
    }

    pub fn of(quick: bool) -> Self {
        if quick {
            Self::quick()
        } else {
            Self::full()
        }
    }

    /// The latent (C, H, W) the VAE decodes: the DiT's input.
    pub fn latent(&self) -> [i64; 3] {
        [self.dit.in_channels, self.dit.input_size, self.dit.input_size]
    }
}

/// Forward FLOPs of one image through a DiT (2 × multiply-adds of every matmul and convolution;
/// norms, activations and softmax are not counted): 46.0 GFLOPs for DiT-B/2 on 4×32×32, the DiT
/// paper's 23.01 GMACs (tables.md §6.1). A training step counts 3× (forward + backward).
pub fn dit_forward_flops(cfg: &DitConfig) -> f64 {
    let (d, m, p, t) = (cfg.hidden_size as f64, cfg.mlp_hidden() as f64, cfg.patch_size as f64, cfg.tokens() as f64);
    let (c_in, c_out) = (cfg.in_channels as f64, cfg.out_channels() as f64);
    let freq = flowmap_models::embedding::TIMESTEP_FREQUENCIES as f64;
    let embedders = if cfg.h_embedding == flowmap_models::HEmbedding::None { 1.0 } else { 2.0 };
    let patch = t * c_in * p * p * d;
    let cond = embedders * (freq * d + d * d);
    let block = t * (4.0 * d * d + 2.0 * d * m) + 2.0 * t * t * d + 6.0 * d * d; // qkv + proj + MLP, QKᵀ and AV, adaLN
    let last = 2.0 * d * d + t * d * p * p * c_out;
    2.0 * (patch + cond + cfg.depth as f64 * block + last)
}

/// Facts every section records: device, its name, libtorch and CUDA versions.
pub fn machine(device: Device) -> Value {
    let name = match device {
        Device::Cuda(i) => flowmap_sys::cuda_device_name(i as i64).ok(),
        _ => None,
    };
    json!({
        "device": device_name(device),
        "device_name": name,
        "libtorch": flowmap_sys::torch_version(),
        "libtorch_cuda": flowmap_sys::torch_cuda_version().ok().flatten(),
        "cuda_driver": flowmap_sys::cuda_driver_version().ok().flatten(),
        "cpu_threads": tch::get_num_threads(),
    })
}

/// "cpu" or "cuda:N".
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// A section's JSON object, written to its file after every change (atomically), so a section
/// killed by the script's time limit still leaves what it finished.
pub struct JsonReport {
    path: PathBuf,
    root: Map<String, Value>,
}

impl JsonReport {
    pub fn create(path: &Path, section: Section, opts: &GpuCheckOptions) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut r = Self { path: path.to_path_buf(), root: Map::new() };
        r.set("section", json!(section.name()))?;
        r.set("side", json!("flowmap"))?;
        r.set("quick", json!(opts.quick))?;
        r.set("machine", machine(opts.device))?;
        r.set("complete", json!(false))?;
        Ok(r)
    }

    /// Sets a top-level key and rewrites the file.
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        self.root.insert(key.to_string(), value);
        self.flush()
    }

    /// Sets `key` inside the top-level object `group` (created if missing) and rewrites the file.
    pub fn set_in(&mut self, group: &str, key: &str, value: Value) -> Result<()> {
        let entry = self.root.entry(group.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(key.to_string(), value);
        }
        self.flush()
    }

    fn flush(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&Value::Object(self.root.clone()))?;
        crate::run::atomic_file::write_atomic(&self.path, text.as_bytes())
    }
}

/// Runs one section and writes its JSON to `out`.
pub fn run(section: Section, opts: &GpuCheckOptions, out: &Path) -> Result<()> {
    std::fs::create_dir_all(&opts.work).with_context(|| format!("creating {}", opts.work.display()))?;
    let mut report = JsonReport::create(out, section, opts)?;
    let started = std::time::Instant::now();
    match section {
        Section::Bench => throughput::run(opts, &mut report)?,
        Section::Parity => parity::run(opts, &mut report)?,
        Section::Checks => checks::run(opts, &mut report)?,
        Section::Mnist => real_data::run(opts, &mut report)?,
    }
    report.set("seconds", json!(started.elapsed().as_secs_f64()))?;
    report.set("complete", json!(true))
}
