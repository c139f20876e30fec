//! `make demo`'s first part (the second is `flowmap table experiments/demo_mnist.toml`): one-step
//! against many-step generation on 2-D distributions, in about a minute on two CPU cores.
//! [`toy_data`] holds the distributions and the metric, [`toy`] the runs and the table, and
//! [`toy_plot`] the scatter figures.
pub mod toy;
pub mod toy_data;
pub mod toy_plot;

use anyhow::Result;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use toy::{ToyScore, ToySettings};
use toy_data::Toy;

/// What [`run_2d`] wrote.
pub struct TwoDReport {
    pub markdown: String,
    pub table: PathBuf,
    pub csv: PathBuf,
    pub figures: Vec<PathBuf>,
    pub scores: Vec<ToyScore>,
}

/// Trains every method on every distribution in `toys`, and writes `table.md`, `scores.csv` and
/// one figure per distribution into `out_dir`.
pub fn run_2d(toys: &[Toy], settings: &ToySettings, out_dir: &Path) -> Result<TwoDReport> {
    let start = std::time::Instant::now();
    let (scores, samples) = toy::run(toys, settings, |line| tracing::info!("2-D demo: {line}"))?;
    let mut figures = Vec::new();
    for &toy in toys {
        tch::manual_seed(-1 - toy as i64);
        let held_out = toy.sample(settings.eval_points);
        figures.push(toy_plot::scatter_grid(toy, &samples, &held_out, out_dir)?);
    }
    let mut markdown = toy::markdown(&scores, toys, settings);
    let _ = writeln!(markdown, "Wall time {:.0} s.", start.elapsed().as_secs_f64());
    let table = out_dir.join("table.md");
    crate::run::atomic_file::write_atomic(&table, markdown.as_bytes())?;
    let mut csv = String::from("toy,method,seed,steps,sliced_w1\n");
    for s in &scores {
        let _ = writeln!(csv, "{},{},{},{},{}", s.toy.name(), s.method, s.seed, s.steps, s.sliced_w1);
    }
    let csv_path = out_dir.join("scores.csv");
    crate::run::atomic_file::write_atomic(&csv_path, csv.as_bytes())?;
    Ok(TwoDReport { markdown, table, csv: csv_path, figures, scores })
}
