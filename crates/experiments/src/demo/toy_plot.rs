//! The 2-D part's figure: one PNG per distribution, a row per method and a column per step count,
//! samples in colour over held-out data in grey.
use super::toy::ToySamples;
use super::toy_data::Toy;
use crate::report::plot::{register_font, COLORS, FONT};
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Pixels of one panel.
const PANEL: u32 = 190;
/// Half-width of the square every panel shows (the data lie within about ±2.5).
const EXTENT: f64 = 3.2;

fn points(x: &Tensor) -> Vec<(f64, f64)> {
    let v: Vec<f32> = Vec::try_from(x.to_kind(tch::Kind::Float).contiguous().view([-1])).unwrap_or_default();
    v.chunks(2).map(|p| (p[0] as f64, p[1] as f64)).filter(|(a, b)| a.is_finite() && b.is_finite()).collect()
}

/// Draws `<out_dir>/<toy>.png` from the samples of `toy` (every method in `samples`).
pub fn scatter_grid(toy: Toy, samples: &[ToySamples], data: &Tensor, out_dir: &Path) -> Result<PathBuf> {
    register_font()?;
    let rows: Vec<&ToySamples> = samples.iter().filter(|s| s.toy == toy).collect();
    let cols: Vec<usize> = rows.first().map(|r| r.by_steps.iter().map(|(s, _)| *s).collect()).unwrap_or_default();
    anyhow::ensure!(!rows.is_empty() && !cols.is_empty(), "no samples of {} to draw", toy.name());
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join(format!("{}.png", toy.name()));
    let (label_w, title_h) = (150u32, 30u32);
    let size = (label_w + PANEL * cols.len() as u32, title_h + PANEL * rows.len() as u32);
    let data = points(data);
    {
        let root = BitMapBackend::new(&path, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let style = TextStyle::from((FONT, 16).into_font()).color(&BLACK);
        for (c, steps) in cols.iter().enumerate() {
            let text = format!("{steps} step{}", if *steps == 1 { "" } else { "s" });
            root.draw_text(&text, &style, ((label_w + PANEL * c as u32 + PANEL / 2 - 30) as i32, 8)).map_err(|e| anyhow!("{e}"))?;
        }
        for (r, row) in rows.iter().enumerate() {
            let y0 = title_h + PANEL * r as u32;
            root.draw_text(&row.method, &style, (6, (y0 + PANEL / 2 - 8) as i32)).map_err(|e| anyhow!("{e}"))?;
            let colour = COLORS[r % COLORS.len()];
            for (c, (_, x)) in row.by_steps.iter().enumerate() {
                let x0 = label_w + PANEL * c as u32;
                let panel = root.clone().shrink((x0, y0), (PANEL, PANEL));
                let mut chart = ChartBuilder::on(&panel).margin(4).build_cartesian_2d(-EXTENT..EXTENT, -EXTENT..EXTENT).map_err(|e| anyhow!("{e}"))?;
                chart.configure_mesh().disable_mesh().disable_x_axis().disable_y_axis().draw().map_err(|e| anyhow!("{e}"))?;
                chart.plotting_area().fill(&RGBColor(250, 250, 250)).map_err(|e| anyhow!("{e}"))?;
                chart.draw_series(data.iter().map(|&p| Pixel::new(p, RGBColor(190, 190, 190)))).map_err(|e| anyhow!("{e}"))?;
                chart.draw_series(points(x).into_iter().map(|p| Circle::new(p, 1, colour.filled()))).map_err(|e| anyhow!("{e}"))?;
            }
        }
        root.present().map_err(|e| anyhow!("{e}")).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}
