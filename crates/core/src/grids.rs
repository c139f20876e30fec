//! Sampling time grids 1 = t_0 > … > t_N = 0 for a path: uniform in t, uniform in log-SNR, and
//! EDM's rho schedule (Karras et al. 2022, arXiv 2206.00364, eq. 5), selectable in `[sampling]`
//! as `grid = { kind = "uniform" }`, `{ kind = "logsnr" }` or `{ kind = "edm", rho = 7.0 }`.
//!
//! The log-SNR and EDM grids are made, as k-diffusion's `get_sigmas_exponential` and
//! `get_sigmas_karras`, in the VE noise level s(t) = sigma(t)/alpha(t) = e^(−λ): N levels from
//! s_max down to s_min (log-uniform, or uniform in s^(1/rho)), each mapped to the path's time by
//! inverting s(t) (bisection on the host; s is increasing in t), then the last step goes to t = 0
//! (denoise to zero). The first time is pinned at t_0 = 1, where the sampler's noise lives: the
//! level s_max is min(`sigma_max`, s(1)), so on paths with s(1) <= sigma_max (the discrete DDPM
//! path: s(1) ≈ 157 > 80, so not there) t_0 is already 1, and elsewhere (the linear path, s(1) =
//! ∞) the first step runs from t = 1 to the grid's second level. Defaults: EDM's
//! sigma_min = 0.002, sigma_max = 80. One step is always [1, 0].
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::sampling::uniform_grid;
use crate::Interpolant;

/// EDM's default lowest noise level.
pub const EDM_SIGMA_MIN: f64 = 0.002;
/// EDM's default highest noise level.
pub const EDM_SIGMA_MAX: f64 = 80.0;

/// Which grid a sampler walks for a given number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GridKind {
    /// t_i = 1 − i/N.
    #[default]
    Uniform,
    /// Uniform in λ = log(alpha/sigma) between the noise levels (see the module docs).
    Logsnr(NoiseRange),
    /// EDM: s_i = (s_max^(1/rho) + i/(N − 1)·(s_min^(1/rho) − s_max^(1/rho)))^rho.
    Edm(EdmGrid),
}

/// The VE noise levels s = sigma/alpha a grid spans.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoiseRange {
    #[serde(default = "sigma_min")]
    pub sigma_min: f64,
    #[serde(default = "sigma_max")]
    pub sigma_max: f64,
}

impl Default for NoiseRange {
    fn default() -> Self {
        Self { sigma_min: EDM_SIGMA_MIN, sigma_max: EDM_SIGMA_MAX }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdmGrid {
    #[serde(default = "rho")]
    pub rho: f64,
    #[serde(default = "sigma_min")]
    pub sigma_min: f64,
    #[serde(default = "sigma_max")]
    pub sigma_max: f64,
}

fn sigma_min() -> f64 {
    EDM_SIGMA_MIN
}
fn sigma_max() -> f64 {
    EDM_SIGMA_MAX
}
fn rho() -> f64 {
    7.0
}

impl GridKind {
    /// The config name ("uniform", "logsnr", "edm").
    pub fn name(&self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::Logsnr(_) => "logsnr",
            Self::Edm(_) => "edm",
        }
    }

    /// Checks the parameters; messages name the field (the caller adds the key's prefix).
    pub fn validate(&self) -> anyhow::Result<()> {
        let range = |lo: f64, hi: f64| -> anyhow::Result<()> {
            anyhow::ensure!(lo.is_finite() && lo > 0.0, "sigma_min = {lo}: must be finite and > 0");
            anyhow::ensure!(hi.is_finite() && hi > lo, "sigma_max = {hi}: must be finite and > sigma_min = {lo}");
            Ok(())
        };
        match *self {
            Self::Uniform => Ok(()),
            Self::Logsnr(r) => range(r.sigma_min, r.sigma_max),
            Self::Edm(e) => {
                anyhow::ensure!(e.rho.is_finite() && e.rho > 0.0, "rho = {}: must be finite and > 0 (EDM uses 7)", e.rho);
                range(e.sigma_min, e.sigma_max)
            }
        }
    }

    /// The grid of `steps` steps on `path`, descending from 1 to 0.
    pub fn times(&self, path: &dyn Interpolant, steps: usize) -> Vec<f64> {
        match *self {
            Self::Uniform => uniform_grid(steps),
            Self::Logsnr(r) => logsnr_grid(path, steps, r.sigma_min, r.sigma_max),
            Self::Edm(e) => edm_grid(path, steps, e.rho, e.sigma_min, e.sigma_max),
        }
    }
}

/// s(t) = sigma(t)/alpha(t) on the host (∞ where alpha = 0).
pub fn noise_level(path: &dyn Interpolant, t: f64) -> f64 {
    let t = Tensor::from_slice(&[t]);
    let alpha = f64::try_from(path.alpha(&t)).expect("CPU f64");
    if alpha <= 0.0 {
        return f64::INFINITY; // also alpha = −0.0 (1 − t at t = 1)
    }
    f64::try_from(path.sigma(&t)).expect("CPU f64") / alpha
}

/// The time t in [0, 1] with s(t) = `level`, by bisection (s increasing in t); 1 if s(1) <= level,
/// 0 if s(0) >= level.
pub fn time_at_level(path: &dyn Interpolant, level: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    if noise_level(path, hi) <= level {
        return 1.0;
    }
    if noise_level(path, lo) >= level {
        return 0.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if noise_level(path, mid) < level {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Maps N noise levels (descending) to the grid [1, t(s_1), …, t(s_{N−1}), 0] (s_0 is t = 1, see
/// the module docs), dropping repeated times that bisection cannot separate.
fn grid_from_levels(path: &dyn Interpolant, levels: &[f64]) -> Vec<f64> {
    let mut grid = vec![1.0];
    for &s in &levels[1..] {
        let t = time_at_level(path, s);
        if t < *grid.last().expect("non-empty") && t > 0.0 {
            grid.push(t);
        }
    }
    grid.push(0.0);
    grid
}

fn clip_range(path: &dyn Interpolant, sigma_min: f64, sigma_max: f64) -> (f64, f64) {
    let top = noise_level(path, 1.0);
    (sigma_min, if top.is_finite() { sigma_max.min(top) } else { sigma_max })
}

/// `steps` steps uniform in log-SNR: levels log-uniform from min(sigma_max, s(1)) to sigma_min,
/// then t = 0 (k-diffusion's `get_sigmas_exponential`).
pub fn logsnr_grid(path: &dyn Interpolant, steps: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    assert!(steps >= 1, "a grid needs at least one step");
    if steps == 1 {
        return vec![1.0, 0.0];
    }
    let (lo, hi) = clip_range(path, sigma_min, sigma_max);
    let n = steps - 1; // levels 0..=n
    let levels: Vec<f64> = (0..=n).map(|i| (hi.ln() + (lo.ln() - hi.ln()) * i as f64 / n as f64).exp()).collect();
    grid_from_levels(path, &levels)
}

/// `steps` steps of EDM's schedule with exponent `rho`: levels uniform in s^(1/rho) from
/// min(sigma_max, s(1)) to sigma_min, then t = 0 (k-diffusion's `get_sigmas_karras`).
pub fn edm_grid(path: &dyn Interpolant, steps: usize, rho: f64, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    assert!(steps >= 1, "a grid needs at least one step");
    if steps == 1 {
        return vec![1.0, 0.0];
    }
    let (lo, hi) = clip_range(path, sigma_min, sigma_max);
    let n = steps - 1;
    let (a, b) = (hi.powf(1.0 / rho), lo.powf(1.0 / rho));
    let levels: Vec<f64> = (0..=n).map(|i| (a + (b - a) * i as f64 / n as f64).powf(rho)).collect();
    grid_from_levels(path, &levels)
}
