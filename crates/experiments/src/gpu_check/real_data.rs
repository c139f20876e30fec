//! `flowmap gpu-check mnist`: the demo's three objectives (flow matching, Shortcut with the
//! paper's settings, MeanFlow's official objective; `experiments/mnist_*.toml`, compiled in) on
//! unconditional MNIST with a larger DiT than the CPU demo, each trained for a fixed number of
//! steps or until a wall-clock cap, then FID (and KID) of the EMA weights at 1, 2, 4 and 16
//! sampling steps from 5,000 samples against the 10,000 MNIST test images. Writes the table
//! (`table.md`, `table.csv`) and the FID-vs-steps plot (`fid_vs_steps.{png,svg}`) beside the runs.
use super::{GpuCheckOptions, JsonReport};
use crate::eval::evaluator::{evaluate_run, EvalConfig, ReferenceConfig};
use crate::eval::fid::{FidRow, Preprocess};
use crate::eval::sampling::Weights;
use crate::train::{self, Outcome, TrainOptions};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

/// (name, label, the experiment file it starts from).
const ROWS: [(&str, &str, &str); 3] = [
    ("flow_matching", "Flow matching (Euler)", include_str!("../../../../experiments/mnist_flow_matching.toml")),
    ("shortcut", "Shortcut (paper)", include_str!("../../../../experiments/mnist_shortcut.toml")),
    ("mean_flow", "MeanFlow (official)", include_str!("../../../../experiments/mnist_mean_flow.toml")),
];
/// Sampling step counts evaluated on a GPU.
pub const EVAL_STEPS: [usize; 4] = [1, 2, 4, 16];
/// Step counts of the quick run: every FID costs two eigendecompositions of 2048² matrices
/// (seconds on a CPU), and the code path is the same for any list.
pub const QUICK_EVAL_STEPS: [usize; 1] = [1];

/// Sizes of the real-data run.
#[derive(Debug, Clone)]
pub struct MnistScale {
    /// `--set` overrides of every row's experiment file.
    pub overrides: Vec<String>,
    pub train_seconds: f64,
    pub num_samples: usize,
    pub reference_images: usize,
    pub eval_batch: usize,
    /// Sampling step counts evaluated.
    pub eval_steps: Vec<usize>,
}

impl MnistScale {
    /// GPU: DiT depth 8, width 256, patch 2 (256 tokens, 9.9M parameters), bf16, batch 256, up to
    /// 2,000 steps (8.5 epochs) or 75 s per objective; FID from 5,000 samples per step count.
    pub fn full(device: Device, train_seconds: Option<f64>) -> Self {
        let mut overrides = common(device);
        overrides.extend(["run.steps=2000", "run.batch_size=256", "model.depth=8", "model.hidden_size=256", "model.num_heads=4", "model.patch_size=2", "optimizer.lr=5e-4"].map(String::from));
        MnistScale { overrides, train_seconds: train_seconds.unwrap_or(75.0), num_samples: 5000, reference_images: 10_000, eval_batch: 500, eval_steps: EVAL_STEPS.to_vec() }
    }

    /// A 1-block DiT, 2 steps, FID at 1 step from 4 samples against 8 test images: the code path
    /// in seconds.
    pub fn quick(device: Device, train_seconds: Option<f64>) -> Self {
        let mut overrides = common(device);
        overrides.extend(["run.steps=2", "run.batch_size=32", "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=8"].map(String::from));
        MnistScale { overrides, train_seconds: train_seconds.unwrap_or(30.0), num_samples: 4, reference_images: 8, eval_batch: 4, eval_steps: QUICK_EVAL_STEPS.to_vec() }
    }
}

fn common(device: Device) -> Vec<String> {
    let dev = if device.is_cuda() { "cuda" } else { "cpu" };
    vec![format!("run.device=\"{dev}\""), "run.log_every=100".into(), "run.sample_every=0".into(), "run.checkpoint_every=0".into(), "model.precision=\"bf16\"".into(), "sampling.steps=[1, 2, 4, 16]".into(), "sampling.grid_images=16".into()]
}

/// One trained and evaluated objective.
#[derive(Debug, Clone)]
pub struct RowResult {
    pub name: String,
    pub label: String,
    pub train_steps: u64,
    pub stopped_by_time_cap: bool,
    pub train_seconds: f64,
    pub last_loss: Option<f64>,
    pub eval_seconds: f64,
    pub fid: Vec<FidRow>,
    pub error: Option<String>,
}

fn train_and_evaluate(name: &str, label: &str, toml_text: &str, scale: &MnistScale, eval: &EvalConfig, root: &Path, device: Device) -> RowResult {
    let mut row = RowResult { name: name.into(), label: label.into(), train_steps: 0, stopped_by_time_cap: false, train_seconds: 0.0, last_loss: None, eval_seconds: 0.0, fid: vec![], error: None };
    let outcome = (|| -> Result<()> {
        let file = root.join(format!("{name}.toml"));
        std::fs::write(&file, toml_text).with_context(|| format!("writing {}", file.display()))?;
        let (cfg, table) = crate::config::load_config(&file, &scale.overrides)?;
        let stop = Arc::new(AtomicBool::new(false));
        let cap = scale.train_seconds;
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs_f64(cap));
            flag.store(true, Ordering::SeqCst);
        });
        let run_dir = root.join(name);
        let opts = TrainOptions { run_dir: Some(run_dir.clone()), stop: Arc::clone(&stop), ..Default::default() };
        let t0 = Instant::now();
        let summary = train::train(&cfg, &table, &opts)?;
        row.train_seconds = t0.elapsed().as_secs_f64();
        row.train_steps = summary.step;
        row.stopped_by_time_cap = summary.outcome == Outcome::Interrupted;
        row.last_loss = summary.last_loss;
        let t1 = Instant::now();
        row.fid = evaluate_run(&run_dir, &cfg.eval_inputs()?, eval, Weights::Ema, &scale.eval_steps, device)?;
        row.eval_seconds = t1.elapsed().as_secs_f64();
        Ok(())
    })();
    if let Err(e) = outcome {
        row.error = Some(format!("{e:#}"));
    }
    row
}

fn row_json(r: &RowResult, batch: i64) -> Value {
    let fid: serde_json::Map<String, Value> = r.fid.iter().map(|f| (f.steps.to_string(), json!(f.fid))).collect();
    let kid: serde_json::Map<String, Value> = r.fid.iter().map(|f| (f.steps.to_string(), json!(f.kid))).collect();
    json!({
        "objective": r.name,
        "label": r.label,
        "train_steps": r.train_steps,
        "stopped_by_time_cap": r.stopped_by_time_cap,
        "train_seconds": r.train_seconds,
        "img_per_s": if r.train_seconds > 0.0 { json!(r.train_steps as f64 * batch as f64 / r.train_seconds) } else { Value::Null },
        "last_loss": r.last_loss,
        "eval_seconds": r.eval_seconds,
        "fid": fid,
        "kid": kid,
        "num_samples": r.fid.first().map(|f| f.num_samples),
        "ref_stats": r.fid.first().map(|f| f.ref_stats.clone()),
        "error": r.error,
    })
}

/// The Markdown table: one row per objective, FID (KID×10³) per step count, steps and seconds.
pub fn render_table(rows: &[RowResult], scale: &MnistScale, batch: i64) -> String {
    let mut s = String::new();
    let reference = rows.iter().flat_map(|r| r.fid.first()).next().map(|f| f.ref_stats.clone()).unwrap_or_else(|| "MNIST test".into());
    let _ = writeln!(
        s,
        "FID of the EMA weights (KID×10³ in parentheses) from {} samples per cell against {reference}, pytorch-fid convention; batch {batch}, each objective trained to its step limit or {:.0} s.\n",
        scale.num_samples, scale.train_seconds
    );
    let _ = write!(s, "| objective |");
    for &st in &scale.eval_steps {
        let _ = write!(s, " {st} step{} |", if st == 1 { "" } else { "s" });
    }
    let _ = writeln!(s, " steps trained | train s | img/s | eval s |");
    let _ = writeln!(s, "|---|{}---|---|---|---|", "---|".repeat(scale.eval_steps.len()));
    for r in rows {
        let _ = write!(s, "| {} |", r.label);
        for &st in &scale.eval_steps {
            match r.fid.iter().find(|f| f.steps == st) {
                Some(f) => {
                    let _ = write!(s, " {:.2}{} |", f.fid, f.kid.map(|k| format!(" ({:.1})", k * 1e3)).unwrap_or_default());
                }
                None => {
                    let _ = write!(s, " – |");
                }
            }
        }
        let rate = if r.train_seconds > 0.0 { r.train_steps as f64 * batch as f64 / r.train_seconds } else { 0.0 };
        let capped = if r.stopped_by_time_cap { " (time cap)" } else { "" };
        let _ = writeln!(s, " {}{capped} | {:.0} | {rate:.0} | {:.0} |", r.train_steps, r.train_seconds, r.eval_seconds);
    }
    for r in rows.iter().filter(|r| r.error.is_some()) {
        let _ = writeln!(s, "\n{}: **failed**: {}", r.label, r.error.as_deref().unwrap_or(""));
    }
    s
}

fn render_csv(rows: &[RowResult]) -> String {
    let mut s = String::from("objective,steps,fid,kid,num_samples,ref_stats,train_step,nfe\n");
    for r in rows {
        for f in &r.fid {
            let _ = writeln!(s, "{},{},{},{},{},\"{}\",{},{}", r.name, f.steps, f.fid, f.kid.map(|k| k.to_string()).unwrap_or_default(), f.num_samples, f.ref_stats, f.train_step, f.nfe.map(|n| n.to_string()).unwrap_or_default());
        }
    }
    s
}

pub fn run(opts: &GpuCheckOptions, report: &mut JsonReport) -> Result<()> {
    let device = opts.device;
    let scale = if opts.quick { MnistScale::quick(device, opts.train_seconds) } else { MnistScale::full(device, opts.train_seconds) };
    let root: PathBuf = opts.work.join("mnist");
    // A previous check's runs would be resumed (and already be finished): start from nothing.
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    std::fs::create_dir_all(&root)?;
    let eval = EvalConfig {
        num_samples: scale.num_samples,
        steps: None,
        reference: ReferenceConfig { split: Some(crate::data::config::SplitName::Test), num_images: Some(scale.reference_images), ..Default::default() },
        preprocess: Preprocess::PytorchFid,
        kid: true,
        batch: scale.eval_batch,
        every: 0,
        seeds: 1,
    };
    let batch: i64 = scale.overrides.iter().find_map(|o| o.strip_prefix("run.batch_size=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    report.set(
        "settings",
        json!({ "overrides": scale.overrides, "train_seconds_cap": scale.train_seconds, "num_samples": scale.num_samples, "reference_images": scale.reference_images, "eval_steps": scale.eval_steps, "batch": batch, "weights": "ema" }),
    )?;
    let mut rows = Vec::new();
    for (name, label, text) in ROWS {
        tracing::info!("== MNIST {label}: training (cap {:.0} s), then FID at {:?}", scale.train_seconds, scale.eval_steps);
        let r = train_and_evaluate(name, label, text, &scale, &eval, &root, device);
        if let Some(e) = &r.error {
            tracing::error!("{label}: {e}");
        }
        rows.push(r);
        report.set("rows", json!(rows.iter().map(|r| row_json(r, batch)).collect::<Vec<_>>()))?;
    }
    let table = render_table(&rows, &scale, batch);
    let md = root.join("table.md");
    std::fs::write(&md, &table)?;
    std::fs::write(root.join("table.csv"), render_csv(&rows))?;
    report.set("table_md", json!(table))?;
    report.set("table_md_path", json!(md.display().to_string()))?;
    let results: Vec<(String, Vec<FidRow>)> = rows.iter().filter(|r| !r.fid.is_empty()).map(|r| (r.label.clone(), r.fid.clone())).collect();
    if !results.is_empty() {
        let plot = crate::report::plot::fid_vs_sampling_steps(&results, &root.join("fid_vs_steps"))?;
        report.set("plot_png", json!(plot.png.display().to_string()))?;
        report.set("plot_svg", json!(plot.svg.display().to_string()))?;
    }
    Ok(())
}
