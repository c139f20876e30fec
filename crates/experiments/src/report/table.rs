//! `flowmap table SPEC.toml`: one run per objective, trained (or reused), evaluated at the same
//! step counts, summarised as a Markdown + CSV table and a FID-vs-steps plot. The machine behind
//! the demo and, at paper scale, behind Table 1.
//!
//! Few-step samplers on the same axis as one-step models (issue 17): `[table] nfe = [...]`
//! replaces `steps` with network-evaluation budgets; each row samples nfe / (its rule's NFE per
//! step × 2 with guidance) steps where that divides (other cells stay empty), and the measured NFE
//! of every evaluated cell must equal the budget. A row with `run = "<label>"` samples an earlier
//! row's trained run with its own `[sampling]` (Heun, DPM-Solver++, UniPC on one flow-matching
//! run) instead of training; its FID rows go to its own folder. `optimize_grid = "<name>"`
//! searches `<run>/grids/<name>.toml` for the row's step counts when missing (`flowmap
//! optimize-grid` with its defaults) and samples on it.
use crate::eval::evaluator::{self, EvalConfig};
use crate::eval::fid::{read_fid_csv, FidRow};
use crate::eval::sampling::Weights;
use crate::report::table_jobs::{self, RowJob};
use crate::run::run_dir::RunDir;
use crate::train::{self, Outcome, Resume, TrainOptions};
use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

impl TableHeader {
    /// The folder of the rows' runs: `runs_dir`, else `out_dir`.
    pub fn runs_dir(&self) -> &Path {
        self.runs_dir.as_deref().unwrap_or(&self.out_dir)
    }
}

/// The spec file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub table: TableHeader,
    pub eval: EvalConfig,
    pub rows: Vec<TableRow>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableHeader {
    /// title of the table
    pub name: String,
    /// table and plots go to out_dir, and runs to out_dir/<row label slug> unless `runs_dir` is set
    pub out_dir: PathBuf,
    /// where the rows' runs live instead of out_dir (e.g. another table's out_dir, to sample its
    /// finished runs: a row with the same label, config and overrides reuses the run and its FID rows)
    #[serde(default)]
    pub runs_dir: Option<PathBuf>,
    /// sampling step counts evaluated for every row (or give `nfe`)
    #[serde(default)]
    pub steps: Vec<usize>,
    /// network evaluations per sample evaluated for every row, instead of `steps`: columns are
    /// NFE, each row samples the step count its rule spends them in
    #[serde(default)]
    pub nfe: Vec<usize>,
    /// --set overrides applied to every row (before the row's own)
    #[serde(default)]
    pub set: Vec<String>,
    /// ema (default) | online
    #[serde(default)]
    pub weights: Weights,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRow {
    /// row name, e.g. "MeanFlow (official)"
    pub label: String,
    /// experiment file, relative to the spec file's folder or absolute
    pub config: PathBuf,
    /// this row's overrides
    #[serde(default)]
    pub set: Vec<String>,
    /// the label of an earlier row whose trained run this row samples (with this row's
    /// `[sampling]`) instead of training one
    #[serde(default)]
    pub run: Option<String>,
    /// sample on the optimised grid `<run>/grids/<name>.toml`, searched for this row's rule and
    /// step counts when the file is missing
    #[serde(default)]
    pub optimize_grid: Option<String>,
    /// noise samples of that search (and as many held out); default 256
    #[serde(default)]
    pub grid_samples: Option<i64>,
    /// uniform steps of its reference solution; default 128
    #[serde(default)]
    pub grid_reference_steps: Option<usize>,
}

/// What `run_table` produced.
#[derive(Debug, Clone)]
pub struct TableReport {
    pub markdown: String,
    pub markdown_path: PathBuf,
    pub csv_path: PathBuf,
    pub plot_png: PathBuf,
    pub rows: Vec<(String, Vec<FidRow>)>,
}

fn slug(label: &str) -> String {
    let s: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-")
}

/// Reads and checks a spec: its tables, and every row's config with the spec's and the row's
/// `set` overrides applied (a bad override or a missing row file is an error naming the row).
pub fn read_spec(path: &Path) -> Result<TableSpec> {
    let (spec, _): (TableSpec, _) = crate::config::overrides::load(path, &[])?;
    ensure!(!spec.rows.is_empty(), "{}: no [[rows]]", path.display());
    ensure!(spec.table.steps.is_empty() != spec.table.nfe.is_empty(), "{}: give exactly one of table.steps (step counts) and table.nfe (network evaluations per sample)", path.display());
    ensure!(spec.table.steps.iter().chain(&spec.table.nfe).all(|&n| n >= 1), "{}: table.steps / table.nfe must be >= 1", path.display());
    for (i, row) in spec.rows.iter().enumerate() {
        let (cfg, _, _) = row_config(path, &spec, row).with_context(|| format!("{}", path.display()))?;
        if let Some(source) = &row.run {
            ensure!(spec.rows[..i].iter().any(|r| &r.label == source && r.run.is_none()), "{}: row {:?} has run = {source:?}, which is not the label of an earlier row that trains its own run", path.display(), row.label);
        }
        if let Some(name) = &row.optimize_grid {
            crate::eval::optimized_grid::check_name(name, &format!("row {:?}: optimize_grid", row.label))?;
        }
        ensure!(!row_steps(&spec.table, &cfg).is_empty(), "{}: row {:?} samples none of table.nfe = {:?} (its rule costs {} evaluations per step)", path.display(), row.label, spec.table.nfe, nfe_per_step(&cfg));
    }
    Ok(spec)
}

/// Network evaluations per sample and step of a row's sampler (guidance doubles them).
fn nfe_per_step(cfg: &crate::config::ExperimentConfig) -> usize {
    let guided = if cfg.sampling.cfg_scale != 1.0 { 2 } else { 1 };
    cfg.sampler().map(|s| s.rule.nfe_per_step()).unwrap_or(1) * guided
}

/// (column, step count) pairs a row evaluates: every `steps`, or each NFE budget its rule can
/// spend in whole steps.
fn row_steps(table: &TableHeader, cfg: &crate::config::ExperimentConfig) -> Vec<(usize, usize)> {
    if table.nfe.is_empty() {
        return table.steps.iter().map(|&s| (s, s)).collect();
    }
    let per = nfe_per_step(cfg);
    table.nfe.iter().filter(|&&n| n % per == 0).map(|&n| (n, n / per)).collect()
}

/// A row's experiment file (resolved against the spec's folder), its overrides (the spec's, then
/// the row's) and its run directory.
fn row_job(spec_path: &Path, spec: &TableSpec, row: &TableRow) -> RowJob {
    let base = spec_path.parent().unwrap_or(Path::new("."));
    let config = if row.config.is_absolute() { row.config.clone() } else { base.join(&row.config) };
    let mut sets = spec.table.set.clone();
    sets.extend(row.set.iter().cloned());
    let name = slug(&row.label);
    RowJob { label: row.label.clone(), config, sets, run_dir: spec.table.runs_dir().join(&name), log: spec.table.out_dir.join("logs").join(format!("{name}.log")) }
}

fn row_config(spec_path: &Path, spec: &TableSpec, row: &TableRow) -> Result<(crate::config::ExperimentConfig, toml::Table, PathBuf)> {
    let job = row_job(spec_path, spec, row);
    let (cfg, table) = crate::config::load_config(&job.config, &job.sets).with_context(|| format!("row {:?}", row.label))?;
    Ok((cfg, table, job.run_dir))
}

/// Trains every row (continuing unfinished runs), evaluates missing (step count) cells, and
/// writes `table.md`, `table.csv`, `fid_vs_steps.{png,svg}` and `loss.{png,svg}` in out_dir.
/// `jobs` > 1 trains that many rows at a time in child processes first ([`table_jobs`]).
/// `stop` (set by SIGTERM/SIGINT) checkpoints the run(s) in progress at the next step boundary and
/// returns an error saying so; the next call continues them.
pub fn run_table(spec_path: &Path, stop: Arc<AtomicBool>, jobs: usize) -> Result<TableReport> {
    let spec = read_spec(spec_path)?;
    let configs: Vec<_> = spec.rows.iter().map(|r| row_config(spec_path, &spec, r)).collect::<Result<_>>()?;
    std::fs::create_dir_all(&spec.table.out_dir).with_context(|| format!("creating {}", spec.table.out_dir.display()))?;
    // --jobs: rows that train from scratch go to child processes first; rows that sample another
    // row's run, or train from a teacher (perhaps a run of this table), stay in order below.
    let mut trained_apart = vec![0.0; spec.rows.len()];
    if jobs > 1 {
        let apart: Vec<usize> = (0..spec.rows.len()).filter(|&i| spec.rows[i].run.is_none() && configs[i].0.teacher.is_none()).collect();
        let rows: Vec<RowJob> = apart.iter().map(|&i| row_job(spec_path, &spec, &spec.rows[i])).collect();
        for (&i, s) in apart.iter().zip(table_jobs::train_rows(&rows, jobs, &stop)?) {
            trained_apart[i] = s;
        }
    }
    let mut results = Vec::new();
    let mut timings = Vec::new();
    for (i, (row, (cfg, table, dir))) in spec.rows.iter().zip(&configs).enumerate() {
        let t0 = Instant::now();
        // The run whose weights this row samples: its own, or an earlier row's.
        let weights_dir = match &row.run {
            Some(source) => spec.table.runs_dir().join(slug(source)),
            None => dir.clone(),
        };
        let train_step = match &row.run {
            Some(source) => {
                tracing::info!("== {}: sampling the run of {source:?} ({})", row.label, weights_dir.display());
                crate::run::checkpoint::CheckpointDir::new(RunDir::new(&weights_dir).checkpoints(), 1).latest()?.with_context(|| format!("row {:?}: {} has no complete checkpoint", row.label, weights_dir.display()))?.step
            }
            None => {
                tracing::info!("== {}: training {} ({} steps)", row.label, dir.display(), cfg.run.steps);
                let opts = TrainOptions { run_dir: Some(dir.clone()), resume: Resume::Auto, stop: Arc::clone(&stop), ..Default::default() };
                let summary = train::train(cfg, table, &opts)?;
                ensure!(summary.outcome == Outcome::Finished, "{}: stopped at step {} (checkpoint written); run the same `flowmap table` command again to continue", row.label, summary.step);
                summary.step
            }
        };
        let columns = row_steps(&spec.table, cfg);
        let row_step_counts: Vec<usize> = columns.iter().map(|&(_, s)| s).collect();
        let mut cfg = cfg.clone();
        if let Some(name) = &row.optimize_grid {
            cfg.sampling.optimized_grid = Some(name.clone());
            let file = crate::eval::optimized_grid::grid_file(&weights_dir, name);
            if !file.exists() {
                tracing::info!("== {}: searching the grid {} for steps {row_step_counts:?}", row.label, file.display());
                let mut search_cfg = cfg.clone();
                search_cfg.sampling.optimized_grid = None;
                let mut req = crate::eval::optimized_grid::GridSearchRequest { weights: spec.table.weights, ..crate::eval::optimized_grid::GridSearchRequest::new(name, row_step_counts.clone()) };
                req.samples = row.grid_samples.unwrap_or(req.samples);
                req.reference_steps = row.grid_reference_steps.unwrap_or(req.reference_steps);
                crate::eval::optimized_grid::optimize_run_grid(&weights_dir, &search_cfg, &req, cfg.run.device.device()?).with_context(|| format!("row {:?}: optimize_grid = {name:?}", row.label))?;
            }
        }
        let cfg = &cfg;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Rows trained in child processes report the child's wall time (concurrent with others).
        let train_s = t0.elapsed().as_secs_f64() + trained_apart[i];
        let t1 = Instant::now();
        let have: Vec<FidRow> = if RunDir::new(dir).fid_csv().exists() { read_fid_csv(&RunDir::new(dir).fid_csv())? } else { vec![] };
        let matches = |r: &FidRow, s: usize| {
            r.train_step == train_step
                && r.steps == s
                && r.num_samples == spec.eval.num_samples
                && r.weights == spec.table.weights.name()
                && r.preprocess == spec.eval.preprocess.name()
                && r.cfg_scale == cfg.sampling.cfg_scale
                && r.eval_seed < spec.eval.seeds
        };
        // A step count is missing unless every evaluation seed has its row.
        let missing: Vec<usize> = row_step_counts.iter().copied().filter(|&s| (0..spec.eval.seeds).any(|seed| !have.iter().any(|r| matches(r, s) && r.eval_seed == seed))).collect();
        let mut rows: Vec<FidRow> = have.iter().filter(|r| row_step_counts.iter().any(|&s| matches(r, s))).cloned().collect();
        if !missing.is_empty() {
            tracing::info!("== {}: FID at steps {missing:?} ({} samples each)", row.label, spec.eval.num_samples);
            rows.extend(evaluator::evaluate_run_into(&weights_dir, dir, &cfg.eval_inputs()?, &spec.eval, spec.table.weights, &missing, cfg.run.device.device()?)?);
        }
        rows.sort_by_key(|r| (r.steps, r.eval_seed));
        rows.dedup_by_key(|r| (r.steps, r.eval_seed));
        if !spec.table.nfe.is_empty() {
            // The columns are budgets: each cell's counted NFE must be the one it stands for.
            for r in &rows {
                let planned = columns.iter().find(|&&(_, s)| s == r.steps).map(|&(n, _)| n as f64);
                ensure!(r.nfe == planned, "row {:?}: {} steps counted {:?} network evaluations per sample, the table column is NFE {:?}", row.label, r.steps, r.nfe, planned);
            }
        }
        timings.push((train_s, t1.elapsed().as_secs_f64()));
        results.push((row.label.clone(), rows));
    }
    let out = &spec.table.out_dir;
    let markdown_path = out.join("table.md");
    // Under a data-parallel launch rank 0 holds the scores and writes the report; the other ranks
    // helped to train and to sample.
    if !crate::run::world::World::global(tch::Device::Cpu)?.is_main() {
        return Ok(TableReport { markdown: String::new(), markdown_path, csv_path: out.join("table.csv"), plot_png: out.join("fid_vs_steps.png"), rows: results });
    }
    let markdown = render_markdown(&spec, &results, &timings, jobs);
    crate::run::atomic_file::write_atomic(&markdown_path, markdown.as_bytes())?;
    let csv_path = out.join("table.csv");
    crate::run::atomic_file::write_atomic(&csv_path, render_csv(&results).as_bytes())?;
    let plot = crate::report::plot::fid_vs_sampling_steps(&results, &out.join("fid_vs_steps"))?;
    let plot = match spec.table.nfe.is_empty() {
        true => plot,
        false => crate::report::plot::fid_vs_nfe(&results, &out.join("fid_vs_nfe"))?,
    };
    let loss_runs: Vec<(String, PathBuf)> = spec.rows.iter().zip(&configs).filter(|(r, _)| r.run.is_none()).map(|(r, (_, _, dir))| (r.label.clone(), RunDir::new(dir).metrics())).collect();
    crate::report::plot::loss_curves(&loss_runs, "loss", &out.join("loss"))?;
    Ok(TableReport { markdown, markdown_path, csv_path, plot_png: plot.png, rows: results })
}

fn render_markdown(spec: &TableSpec, results: &[(String, Vec<FidRow>)], timings: &[(f64, f64)], jobs: usize) -> String {
    let mut s = String::new();
    let first = results.iter().flat_map(|(_, r)| r.first()).next();
    let (n, reference, pre) = first.map(|r| (r.num_samples, r.ref_stats.clone(), r.preprocess.clone())).unwrap_or_default();
    let _ = writeln!(s, "## {}\n", spec.table.name);
    let _ = writeln!(
        s,
        "FID (lower is better) against `{reference}` from {n} generated images per cell ({pre} convention, {} weights){}. Small-sample FID is biased upwards; compare within this table only. KID ×10³ in parentheses (unbiased).\n",
        spec.table.weights.name(),
        if spec.eval.seeds > 1 { format!(", mean ± std over {} evaluation seeds (each its own noise)", spec.eval.seeds) } else { String::new() }
    );
    if jobs > 1 {
        let _ = writeln!(s, "Rows were trained {jobs} at a time (`--jobs {jobs}`): `train s` is each row's wall time while sharing the machine.\n");
    }
    let by_nfe = !spec.table.nfe.is_empty();
    let columns = if by_nfe { &spec.table.nfe } else { &spec.table.steps };
    let _ = write!(s, "| objective |");
    for st in columns {
        let _ = match by_nfe {
            true => write!(s, " NFE {st} |"),
            false => write!(s, " {st} step{} |", if *st == 1 { "" } else { "s" }),
        };
    }
    let _ = writeln!(s, " train s | eval s |");
    let _ = writeln!(s, "|---|{}---|---|", "---|".repeat(columns.len()));
    for ((label, rows), (ts, es)) in results.iter().zip(timings) {
        // The measured NFE beside the label when it is not one evaluation per step (Heun, CFG).
        let note = crate::report::plot::nfe_note(&rows.iter().map(|r| (r.steps, r.nfe)).collect::<Vec<_>>()).map(|n| format!(" ({n})")).unwrap_or_default();
        let _ = write!(s, "| {label}{note} |");
        for st in columns {
            let cell: Vec<&FidRow> = rows.iter().filter(|r| if by_nfe { r.nfe == Some(*st as f64) } else { r.steps == *st }).collect();
            let fid = mean_std(&cell.iter().map(|r| r.fid).collect::<Vec<_>>());
            let kid = mean_std(&cell.iter().filter_map(|r| r.kid.map(|k| k * 1e3)).collect::<Vec<_>>());
            let _ = write!(s, " {} |", fid.map(|f| format!("{}{}", show(f), kid.map(|k| format!(" ({})", show(k))).unwrap_or_default())).unwrap_or_else(|| "–".into()));
        }
        let _ = writeln!(s, " {ts:.0} | {es:.0} |");
    }
    s
}

/// Mean and sample standard deviation (None for no values; std 0 for one).
fn mean_std(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    Some((mean, var.sqrt()))
}

/// "12.3" for one value, "12.3 ± 0.4" for a spread.
fn show((mean, std): (f64, f64)) -> String {
    if std > 0.0 {
        format!("{mean:.1} ± {std:.1}")
    } else {
        format!("{mean:.1}")
    }
}

fn render_csv(results: &[(String, Vec<FidRow>)]) -> String {
    // `nfe` (measured; empty for rows of legacy fid.csv files) and `eval_seed` come last, after
    // the original columns.
    let mut s = String::from("objective,steps,fid,kid,num_samples,ref_stats,preprocess,train_step,nfe,eval_seed\n");
    for (label, rows) in results {
        for r in rows {
            let _ = writeln!(
                s,
                "\"{}\",{},{},{},{},{},{},{},{},{}",
                label.replace('"', "\"\""),
                r.steps,
                r.fid,
                r.kid.map(|k| k.to_string()).unwrap_or_default(),
                r.num_samples,
                r.ref_stats,
                r.preprocess,
                r.train_step,
                r.nfe.map(|n| n.to_string()).unwrap_or_default(),
                r.eval_seed
            );
        }
    }
    s
}

/// `flowmap plot`: FID-vs-steps over several runs plus each run's loss curve.
pub fn plot_runs(runs: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = Vec::new();
    let with_fid: Vec<PathBuf> = runs.iter().filter(|r| RunDir::new(r).fid_csv().exists()).cloned().collect();
    if !with_fid.is_empty() {
        let p = crate::report::plot::fid_vs_sampling_steps_from_runs(&with_fid, &out.join("fid_vs_steps"))?;
        files.extend([p.png, p.svg]);
        // The same runs on the axis of counted network evaluations (rows that recorded them).
        let mut counted = Vec::new();
        for r in &with_fid {
            if read_fid_csv(&RunDir::new(r).fid_csv())?.iter().any(|x| x.nfe.is_some()) {
                counted.push(r.clone());
            }
        }
        if !counted.is_empty() {
            let p = crate::report::plot::fid_vs_nfe_from_runs(&counted, &out.join("fid_vs_nfe"))?;
            files.extend([p.png, p.svg]);
        }
    }
    // Runs evaluated while training (`eval.every`): FID against the training step, one line per step count.
    for r in &with_fid {
        let rows = read_fid_csv(&RunDir::new(r).fid_csv())?;
        let mut train_steps: Vec<u64> = rows.iter().map(|x| x.train_step).collect();
        train_steps.dedup();
        if train_steps.len() > 1 {
            let name = r.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
            let p = crate::report::plot::fid_vs_step(&rows, &out.join(format!("{name}_fid_vs_train_step")))?;
            files.extend([p.png, p.svg]);
        }
    }
    let loss: Vec<(String, PathBuf)> = runs.iter().map(|r| (r.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), RunDir::new(r).metrics())).filter(|(_, m)| m.exists()).collect();
    ensure!(!loss.is_empty() || !with_fid.is_empty(), "none of {runs:?} has metrics.jsonl or fid.csv");
    if !loss.is_empty() {
        let p = crate::report::plot::loss_curves(&loss, "loss", &out.join("loss"))?;
        files.extend([p.png, p.svg]);
    }
    Ok(files)
}
