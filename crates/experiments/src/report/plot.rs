//! Plots: FID against the number of sampling steps (log₂ axis; the legend notes the measured NFE
//! where it differs from the steps) for one or several runs, FID against training step, and loss
//! curves from `metrics.jsonl`, each as PNG and SVG (ecosystem.md §6).
//! The CSV / JSONL files stay the source of truth; plots are re-rendered from them.
//!
//! Text uses DejaVu Sans, embedded (assets/DejaVuSans.ttf, Bitstream Vera licence with public-domain
//! DejaVu changes; see assets/DejaVuSans-LICENSE.txt), so no system font is needed.
use crate::eval::fid::{read_fid_csv, FidRow};
use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
pub(crate) const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (900, 600);
/// Longest series drawn point by point; longer ones are averaged in bins (loss curves).
const MAX_POINTS: usize = 2000;
/// tab10 colours.
pub(crate) const COLORS: [RGBColor; 10] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(127, 127, 127), RGBColor(188, 189, 34), RGBColor(23, 190, 207)];

/// Registers the embedded font with plotters once per process.
pub(crate) fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    ensure!(ok, "the embedded DejaVu Sans font failed to load");
    Ok(())
}

/// The two files one plot is written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlotFiles {
    pub png: PathBuf,
    pub svg: PathBuf,
}

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// How the x axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XScale {
    Linear,
    /// log₂ spacing with ticks labelled 1, 2, 4, … (step counts); values must be positive.
    Log2,
}

/// Titles and axes of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: XScale,
    /// Draw a marker at every point (for short series such as FID per step count).
    pub markers: bool,
}

/// Draws `series` as lines with a legend into `<out_stem>.png` and `<out_stem>.svg`.
pub fn line_chart(chart: &LineChart, series: &[Series], out_stem: &Path) -> Result<PlotFiles> {
    register_font()?;
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            points: s.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite() && (chart.x_scale == XScale::Linear || *x > 0.0)).map(|&(x, y)| (if chart.x_scale == XScale::Log2 { x.log2() } else { x }, y)).collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    ensure!(!series.is_empty(), "nothing to plot for `{}`: no finite points", chart.title);
    if let Some(dir) = out_stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let files = PlotFiles { png: out_stem.with_extension("png"), svg: out_stem.with_extension("svg") };
    {
        let root = BitMapBackend::new(&files.png, SIZE).into_drawing_area();
        draw(&root, chart, &series).with_context(|| format!("drawing {}", files.png.display()))?;
        root.present().map_err(|e| anyhow!("{e}")).with_context(|| format!("writing {}", files.png.display()))?;
    }
    {
        let root = SVGBackend::new(&files.svg, SIZE).into_drawing_area();
        draw(&root, chart, &series).with_context(|| format!("drawing {}", files.svg.display()))?;
        root.present().map_err(|e| anyhow!("{e}")).with_context(|| format!("writing {}", files.svg.display()))?;
    }
    Ok(files)
}

/// (lo, hi) padded by 5% (or by 1 around a single value).
fn padded(values: impl Iterator<Item = f64>, pad_single: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        (lo - pad_single, hi + pad_single)
    } else {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    }
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &LineChart, series: &[Series]) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let (x0, x1) = padded(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), 1.0);
    let (y0, y1) = padded(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), 1.0);
    let mut ctx = ChartBuilder::on(root).caption(&chart.title, (FONT, 24)).margin(16).x_label_area_size(48).y_label_area_size(72).build_cartesian_2d(x0..x1, y0..y1).map_err(err)?;
    let log2_ticks = (x1.floor() - x0.ceil()) as usize + 1;
    let x_format = |v: &f64| match chart.x_scale {
        XScale::Linear => format_number(*v),
        XScale::Log2 if (v - v.round()).abs() < 1e-6 => format_number(2f64.powf(v.round())),
        XScale::Log2 => String::new(),
    };
    let mut mesh = ctx.configure_mesh();
    mesh.x_desc(chart.x_label.as_str()).y_desc(chart.y_label.as_str()).label_style((FONT, 15)).axis_desc_style((FONT, 17)).x_label_formatter(&x_format).y_label_formatter(&|v| format_number(*v)).light_line_style(RGBColor(235, 235, 235));
    if chart.x_scale == XScale::Log2 {
        mesh.x_labels(log2_ticks.max(2));
    }
    mesh.draw().map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let style = ShapeStyle::from(&color).stroke_width(2);
        ctx.draw_series(LineSeries::new(s.points.iter().copied(), style)).map_err(err)?.label(s.name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], ShapeStyle::from(&color).stroke_width(2)));
        if chart.markers {
            ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, ShapeStyle::from(&color).filled()))).map_err(err)?;
        }
    }
    ctx.configure_series_labels().label_font((FONT, 15)).background_style(WHITE.mix(0.85)).border_style(RGBColor(160, 160, 160)).position(SeriesLabelPosition::UpperRight).draw().map_err(err)?;
    Ok(())
}

/// Short tick labels: integers without a fraction, others with up to 4 significant digits and no
/// trailing zeros.
fn format_number(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if (v - v.round()).abs() < 1e-9 && v.abs() < 1e7 {
        return format!("{}", v.round() as i64);
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// How the measured NFE of `(steps, nfe)` points relates to the steps, when it differs:
/// "NFE = 2×steps" for a constant ratio, else the NFE values ("NFE 2, 5, 9"). None when every
/// known NFE equals its step count or none is known (rows of legacy `fid.csv` files).
pub fn nfe_note(points: &[(usize, Option<f64>)]) -> Option<String> {
    let known: Vec<(usize, f64)> = points.iter().filter_map(|&(s, n)| Some((s, n?))).collect();
    if known.iter().all(|&(s, n)| n == s as f64) {
        return None;
    }
    let ratio = known[0].1 / known[0].0 as f64;
    if known.iter().all(|&(s, n)| (n - ratio * s as f64).abs() < 1e-9 * n.max(1.0)) {
        Some(format!("NFE = {}×steps", format_number(ratio)))
    } else {
        Some(format!("NFE {}", known.iter().map(|&(_, n)| format_number(n)).collect::<Vec<_>>().join(", ")))
    }
}

/// One series per comparable setting of a run: rows at the run's latest `train_step`, grouped by
/// weights, CFG scale, reference statistics, convention and sample count; the group's fields that
/// vary are appended to the name, and so is the measured NFE when it is not one per step
/// ([`nfe_note`]). A repeated step count keeps its last row. Points are (steps, fid).
pub fn fid_vs_sampling_steps_series(run: &str, rows: &[FidRow]) -> Vec<Series> {
    type Key = (String, u64, String, String, usize);
    type Part = (bool, fn(&Key) -> String);
    type Points = BTreeMap<usize, (f64, Option<f64>, usize)>; // steps → (Σ fid, nfe, evaluation seeds)
    let mut groups: BTreeMap<Key, (u64, Points)> = BTreeMap::new();
    for r in rows {
        let key = (r.weights.clone(), r.cfg_scale.to_bits(), r.ref_stats.clone(), r.preprocess.clone(), r.num_samples);
        let entry = groups.entry(key).or_insert((r.train_step, BTreeMap::new()));
        if r.train_step > entry.0 {
            *entry = (r.train_step, BTreeMap::new());
        }
        if r.train_step == entry.0 {
            // Several evaluation seeds of one cell: the line goes through their mean.
            let cell = entry.1.entry(r.steps).or_insert((0.0, r.nfe, 0));
            (cell.0, cell.2) = (cell.0 + r.fid, cell.2 + 1);
        }
    }
    let keys: Vec<&Key> = groups.keys().collect();
    let varies = |f: fn(&Key) -> String| keys.iter().map(|k| f(k)).collect::<std::collections::BTreeSet<_>>().len() > 1;
    let parts: [Part; 5] = [
        (varies(|k| k.0.clone()), |k| k.0.clone()),
        (varies(|k| f64::from_bits(k.1).to_string()), |k| format!("cfg {}", f64::from_bits(k.1))),
        (varies(|k| k.2.clone()), |k| k.2.clone()),
        (varies(|k| k.3.clone()), |k| k.3.clone()),
        (varies(|k| k.4.to_string()), |k| format!("N={}", k.4)),
    ];
    groups
        .iter()
        .map(|(k, (_, points))| {
            let mut extra: Vec<String> = parts.iter().filter(|(v, _)| *v).map(|(_, f)| f(k)).collect();
            extra.extend(nfe_note(&points.iter().map(|(&steps, &(_, nfe, _))| (steps, nfe)).collect::<Vec<_>>()));
            let name = if extra.is_empty() { run.to_string() } else { format!("{run} ({})", extra.join(", ")) };
            Series { name, points: points.iter().map(|(&steps, &(sum, _, n))| (steps as f64, sum / n as f64)).collect() }
        })
        .collect()
}

/// FID against the number of sampling steps (log₂ x axis), one line per run (and per setting
/// within a run, see [`fid_vs_sampling_steps_series`]).
pub fn fid_vs_sampling_steps(runs: &[(String, Vec<FidRow>)], out_stem: &Path) -> Result<PlotFiles> {
    let series: Vec<Series> = runs.iter().flat_map(|(name, rows)| fid_vs_sampling_steps_series(name, rows)).collect();
    let sample = runs.iter().flat_map(|(_, r)| r.first()).next();
    let y_label = match sample {
        Some(r) => format!("FID ({} samples, {}, {})", r.num_samples, r.ref_stats, r.preprocess),
        None => "FID".into(),
    };
    let chart = LineChart { title: "FID vs number of sampling steps".into(), x_label: "sampling steps".into(), y_label, x_scale: XScale::Log2, markers: true };
    line_chart(&chart, &series, out_stem)
}

/// FID against the **measured** number of network evaluations per sample (log₂ x axis), one
/// line per run and setting: few-step solvers (Heun, AMED: 2 per step) and one-step models on
/// one axis. Rows without a counted NFE (legacy files) are left out.
pub fn fid_vs_nfe(runs: &[(String, Vec<FidRow>)], out_stem: &Path) -> Result<PlotFiles> {
    let series: Vec<Series> = runs
        .iter()
        .flat_map(|(name, rows)| {
            let counted: Vec<FidRow> = rows.iter().filter(|r| r.nfe.is_some()).cloned().collect();
            let nfe_of: BTreeMap<usize, f64> = counted.iter().filter_map(|r| Some((r.steps, r.nfe?))).collect();
            // The same grouping as the steps plot, then each point moved to its counted NFE.
            fid_vs_sampling_steps_series(name, &counted).into_iter().map(move |s| Series { name: s.name, points: s.points.iter().filter_map(|&(st, f)| Some((*nfe_of.get(&(st as usize))?, f))).collect() })
        })
        .collect();
    let sample = runs.iter().flat_map(|(_, r)| r.first()).next();
    let y_label = match sample {
        Some(r) => format!("FID ({} samples, {}, {})", r.num_samples, r.ref_stats, r.preprocess),
        None => "FID".into(),
    };
    let chart = LineChart { title: "FID vs network evaluations per sample".into(), x_label: "NFE (counted)".into(), y_label, x_scale: XScale::Log2, markers: true };
    line_chart(&chart, &series, out_stem)
}

/// Each run directory's `fid.csv`, named by the directory.
fn read_runs(run_dirs: &[PathBuf]) -> Result<Vec<(String, Vec<FidRow>)>> {
    run_dirs
        .iter()
        .map(|dir| {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("run").to_string();
            Ok((name, read_fid_csv(&dir.join("fid.csv"))?))
        })
        .collect()
}

/// [`fid_vs_sampling_steps`] for run directories: reads `<run>/fid.csv` and names each line by the
/// directory.
pub fn fid_vs_sampling_steps_from_runs(run_dirs: &[PathBuf], out_stem: &Path) -> Result<PlotFiles> {
    fid_vs_sampling_steps(&read_runs(run_dirs)?, out_stem)
}

/// [`fid_vs_nfe`] for run directories.
pub fn fid_vs_nfe_from_runs(run_dirs: &[PathBuf], out_stem: &Path) -> Result<PlotFiles> {
    fid_vs_nfe(&read_runs(run_dirs)?, out_stem)
}

/// FID against training step, one line per step count (and weights / CFG scale when they vary).
pub fn fid_vs_step(rows: &[FidRow], out_stem: &Path) -> Result<PlotFiles> {
    let mut groups: BTreeMap<(usize, String, u64), BTreeMap<u64, f64>> = BTreeMap::new();
    // One line per step count through evaluation seed 0 (the run's own noise).
    for r in rows.iter().filter(|r| r.eval_seed == 0) {
        groups.entry((r.steps, r.weights.clone(), r.cfg_scale.to_bits())).or_default().insert(r.train_step, r.fid);
    }
    let settings: std::collections::BTreeSet<_> = groups.keys().map(|k| (k.1.clone(), k.2)).collect();
    let series: Vec<Series> = groups
        .iter()
        .map(|((steps, w, cfg), pts)| {
            let steps = format!("{steps} step{}", if *steps == 1 { "" } else { "s" });
            let name = if settings.len() > 1 { format!("{steps} ({w}, cfg {})", f64::from_bits(*cfg)) } else { steps };
            Series { name, points: pts.iter().map(|(&s, &f)| (s as f64, f)).collect() }
        })
        .collect();
    let chart = LineChart { title: "FID during training".into(), x_label: "training step".into(), y_label: "FID".into(), x_scale: XScale::Linear, markers: true };
    line_chart(&chart, &series, out_stem)
}

/// (step, value) of `key` from a `metrics.jsonl` (one JSON object per line). Lines without a
/// numeric `step` and `key` are skipped; a malformed last line (a run killed mid-write) is skipped,
/// a malformed line elsewhere is an error.
pub fn read_metric(path: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut points = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() => {
                tracing::warn!(path = %path.display(), "skipping a truncated last line");
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1)),
        };
        if let (Some(step), Some(v)) = (value.get("step").and_then(|v| v.as_f64()), value.get(key).and_then(|v| v.as_f64())) {
            points.push((step, v));
        }
    }
    Ok(points)
}

/// Averages consecutive points in equal-count bins down to at most `max` points.
fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max);
    points
        .chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (c.iter().map(|p| p.0).sum::<f64>() / n, c.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

/// Curves of `key` (e.g. "loss") against step, one per (name, metrics.jsonl). Long runs are
/// bin-averaged to at most 2000 points per curve.
pub fn loss_curves(runs: &[(String, PathBuf)], key: &str, out_stem: &Path) -> Result<PlotFiles> {
    let series = runs.iter().map(|(name, path)| Ok(Series { name: name.clone(), points: downsample(&read_metric(path, key)?, MAX_POINTS) })).collect::<Result<Vec<_>>>()?;
    let chart = LineChart { title: format!("{key} during training"), x_label: "training step".into(), y_label: key.into(), x_scale: XScale::Linear, markers: false };
    line_chart(&chart, &series, out_stem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_keeps_means_and_bounds() {
        let pts: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, 1.0)).collect();
        let d = downsample(&pts, 2000);
        assert!(d.len() <= 2000);
        assert!(d.iter().all(|p| p.1 == 1.0));
        assert_eq!(d[0].0, 2.0); // mean of 0..5
    }

    #[test]
    fn number_format() {
        assert_eq!(format_number(64.0), "64");
        assert_eq!(format_number(0.125), "0.125");
        assert_eq!(format_number(12.5), "12.5");
        assert_eq!(format_number(0.8), "0.8");
        assert_eq!(format_number(1.8), "1.8");
    }
}
