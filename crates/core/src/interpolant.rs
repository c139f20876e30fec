//! Interpolants x_t = alpha(t)·x + sigma(t)·eps between data (t = 0) and noise (t = 1)
//! (methods.md §2.1), and the conversions between what a network may predict: velocity, clean
//! sample, noise or score (methods.md §1.3).
//!
//! Every method takes `t` of shape (B,) (any float kind) and returns (B,) of the same kind, or a
//! tensor shaped like its (B, ...) data argument.
use serde::{Deserialize, Serialize};
use std::f64::consts::FRAC_PI_2;
use tch::{Device, Kind, Tensor};

use crate::{per_sample, NoParams};

/// Shortcut code's path offset: x_t = (1 − (1 − 10⁻⁵)·t_s)·noise + t_s·data
/// (shortcut-models `targets_shortcut.py`; methods.md §1.3).
pub const SHORTCUT_SIGMA_MIN: f64 = 1e-5;
/// Improved-DDPM cosine schedule offset s (Nichol and Dhariwal, arXiv 2102.09672, eq. 17).
pub const COSINE_OFFSET: f64 = 0.008;
/// sCM's data standard deviation sigma_d (Lu and Song, arXiv 2410.11081).
pub const TRIGFLOW_SIGMA_D: f64 = 0.5;

/// A path x_t = alpha(t)·x + sigma(t)·eps between data (t = 0) and noise (t = 1).
pub trait Interpolant: std::fmt::Debug + Send {
    /// alpha(t), (B,) -> (B,).
    fn alpha(&self, t: &Tensor) -> Tensor;
    /// sigma(t), (B,) -> (B,).
    fn sigma(&self, t: &Tensor) -> Tensor;
    /// d alpha / dt, (B,) -> (B,).
    fn d_alpha(&self, t: &Tensor) -> Tensor;
    /// d sigma / dt, (B,) -> (B,).
    fn d_sigma(&self, t: &Tensor) -> Tensor;

    /// x_t for data `x` and noise `eps`, both (B, ...).
    fn interpolate(&self, x: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        per_sample(&self.alpha(t), x) * x + per_sample(&self.sigma(t), x) * eps
    }

    /// Conditional velocity dx_t/dt = d_alpha·x + d_sigma·eps, (B, ...).
    fn velocity(&self, x: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        per_sample(&self.d_alpha(t), x) * x + per_sample(&self.d_sigma(t), x) * eps
    }

    /// Clean sample from a noise prediction: x̂ = (x_t − sigma·ε̂)/alpha. Undefined where alpha = 0.
    fn x_from_eps(&self, x_t: &Tensor, eps_hat: &Tensor, t: &Tensor) -> Tensor {
        (x_t - per_sample(&self.sigma(t), x_t) * eps_hat) / per_sample(&self.alpha(t), x_t)
    }

    /// Noise from a clean-sample prediction: ε̂ = (x_t − alpha·x̂)/sigma. Undefined where sigma = 0.
    fn eps_from_x(&self, x_t: &Tensor, x_hat: &Tensor, t: &Tensor) -> Tensor {
        (x_t - per_sample(&self.alpha(t), x_t) * x_hat) / per_sample(&self.sigma(t), x_t)
    }

    /// Velocity from a noise prediction: v̂ = d_alpha·x̂ + d_sigma·ε̂ with x̂ from `x_from_eps`.
    fn velocity_from_eps(&self, x_t: &Tensor, eps_hat: &Tensor, t: &Tensor) -> Tensor {
        let x_hat = self.x_from_eps(x_t, eps_hat, t);
        self.velocity(&x_hat, eps_hat, t)
    }

    /// Velocity from a clean-sample prediction: v̂ = d_alpha·x̂ + d_sigma·ε̂ with ε̂ from `eps_from_x`.
    fn velocity_from_x(&self, x_t: &Tensor, x_hat: &Tensor, t: &Tensor) -> Tensor {
        let eps_hat = self.eps_from_x(x_t, x_hat, t);
        self.velocity(x_hat, &eps_hat, t)
    }

    /// Clean sample from a velocity: x̂ = (d_sigma·x_t − sigma·v̂)/(alpha·d_sigma − sigma·d_alpha).
    /// For the linear path this is x_t − t·v̂.
    fn x_from_velocity(&self, x_t: &Tensor, v: &Tensor, t: &Tensor) -> Tensor {
        let (alpha, sigma) = (self.alpha(t), self.sigma(t));
        let (d_alpha, d_sigma) = (self.d_alpha(t), self.d_sigma(t));
        let det = &alpha * &d_sigma - &sigma * &d_alpha;
        (per_sample(&d_sigma, x_t) * x_t - per_sample(&sigma, x_t) * v) / per_sample(&det, x_t)
    }

    /// Noise from a velocity: ε̂ = (alpha·v̂ − d_alpha·x_t)/(alpha·d_sigma − sigma·d_alpha).
    /// For the linear path this is x_t + (1 − t)·v̂.
    fn eps_from_velocity(&self, x_t: &Tensor, v: &Tensor, t: &Tensor) -> Tensor {
        let (alpha, sigma) = (self.alpha(t), self.sigma(t));
        let (d_alpha, d_sigma) = (self.d_alpha(t), self.d_sigma(t));
        let det = &alpha * &d_sigma - &sigma * &d_alpha;
        (per_sample(&alpha, x_t) * v - per_sample(&d_alpha, x_t) * x_t) / per_sample(&det, x_t)
    }

    /// Score ∇log p_t(x_t) from a noise prediction: s = −ε̂/sigma (Tweedie). Undefined at sigma = 0.
    fn score_from_eps(&self, eps_hat: &Tensor, t: &Tensor) -> Tensor {
        -(eps_hat / per_sample(&self.sigma(t), eps_hat))
    }

    /// Noise from a score: ε̂ = −sigma·s.
    fn eps_from_score(&self, score: &Tensor, t: &Tensor) -> Tensor {
        -(per_sample(&self.sigma(t), score) * score)
    }

    /// Score from a velocity, through ε̂. For the linear path s = −(x_t + (1 − t)·v̂)/t.
    fn score_from_velocity(&self, x_t: &Tensor, v: &Tensor, t: &Tensor) -> Tensor {
        self.score_from_eps(&self.eps_from_velocity(x_t, v, t), t)
    }

    /// Velocity from a score, through ε̂.
    fn velocity_from_score(&self, x_t: &Tensor, score: &Tensor, t: &Tensor) -> Tensor {
        self.velocity_from_eps(x_t, &self.eps_from_score(score, t), t)
    }
}

/// Linear path (rectified flow, conditional OT): alpha = 1 − t, sigma = sigma_min + (1 − sigma_min)·t.
/// sigma_min = 0 is the plain path (v = eps − x); sigma_min = [`SHORTCUT_SIGMA_MIN`] is the Shortcut
/// code's path (v = (1 − sigma_min)·eps − x).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Linear {
    pub sigma_min: f64,
}

impl Linear {
    /// alpha = 1 − t, sigma = t.
    pub fn new() -> Self {
        Self { sigma_min: 0.0 }
    }
    /// The Shortcut code's path, sigma_min = 10⁻⁵.
    pub fn shortcut() -> Self {
        Self { sigma_min: SHORTCUT_SIGMA_MIN }
    }
}

impl Default for Linear {
    fn default() -> Self {
        Self::new()
    }
}

impl Interpolant for Linear {
    fn alpha(&self, t: &Tensor) -> Tensor {
        1.0 - t
    }
    fn sigma(&self, t: &Tensor) -> Tensor {
        t * (1.0 - self.sigma_min) + self.sigma_min
    }
    fn d_alpha(&self, t: &Tensor) -> Tensor {
        t.full_like(-1.0)
    }
    fn d_sigma(&self, t: &Tensor) -> Tensor {
        t.full_like(1.0 - self.sigma_min)
    }
}

/// Variance-preserving cosine path (improved DDPM): with θ(t) = (t + s)/(1 + s)·π/2,
/// alpha = cos θ(t)/cos θ(0) and sigma = √(1 − alpha²), so alpha(0) = 1, alpha(1) = 0, sigma(1) = 1.
/// d_sigma is infinite at t = 0 when s > 0 (sigma ~ √t there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VpCosine {
    /// s in the formula above; [`COSINE_OFFSET`] = 0.008 in improved DDPM, 0 gives cos/sin.
    pub offset: f64,
}

impl VpCosine {
    fn rate(&self) -> f64 {
        FRAC_PI_2 / (1.0 + self.offset)
    }
    fn theta(&self, t: &Tensor) -> Tensor {
        (t + self.offset) * self.rate()
    }
    fn theta0(&self) -> f64 {
        self.offset * self.rate()
    }
}

impl Interpolant for VpCosine {
    fn alpha(&self, t: &Tensor) -> Tensor {
        self.theta(t).cos() / self.theta0().cos()
    }
    fn sigma(&self, t: &Tensor) -> Tensor {
        // 1 − cos²θ/cos²θ₀ = sin(θ − θ₀)·sin(θ + θ₀)/cos²θ₀: no cancellation near t = 0.
        let theta = self.theta(t);
        let theta0 = self.theta0();
        let prod = (&theta - theta0).sin() * (&theta + theta0).sin();
        prod.clamp_min(0.0).sqrt() / theta0.cos()
    }
    fn d_alpha(&self, t: &Tensor) -> Tensor {
        -(self.theta(t).sin() * (self.rate() / self.theta0().cos()))
    }
    fn d_sigma(&self, t: &Tensor) -> Tensor {
        let theta = self.theta(t);
        if self.offset == 0.0 {
            // sigma = sin θ exactly; avoids 0/0 at t = 0.
            return theta.cos() * self.rate();
        }
        // d/dt [sin(θ − θ₀)·sin(θ + θ₀)] = θ'·sin 2θ, and sigma = √(that)/cos θ₀.
        let c0 = self.theta0().cos();
        (&theta * 2.0).sin() * (self.rate() / (2.0 * c0 * c0)) / self.sigma(t)
    }
}

/// TrigFlow (sCM): alpha = cos(π t/2), sigma = sigma_d·sin(π t/2), i.e. sCM's
/// x_τ = cos τ·x + sin τ·z with τ = π t/2 and z = sigma_d·eps ~ N(0, sigma_d² I).
/// With sigma_d = 1 it equals [`VpCosine`] with offset 0. sigma(1) = sigma_d.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrigFlow {
    pub sigma_d: f64,
}

impl Interpolant for TrigFlow {
    fn alpha(&self, t: &Tensor) -> Tensor {
        (t * FRAC_PI_2).cos()
    }
    fn sigma(&self, t: &Tensor) -> Tensor {
        (t * FRAC_PI_2).sin() * self.sigma_d
    }
    fn d_alpha(&self, t: &Tensor) -> Tensor {
        (t * FRAC_PI_2).sin() * (-FRAC_PI_2)
    }
    fn d_sigma(&self, t: &Tensor) -> Tensor {
        (t * FRAC_PI_2).cos() * (FRAC_PI_2 * self.sigma_d)
    }
}

/// Variance-preserving path with linear beta, the continuous form of DDPM's schedule.
///
/// DDPM uses `steps` = 1000 steps with beta_n linear from `beta_start` = 10⁻⁴ to `beta_end` = 0.02.
/// In continuous time beta(t) = steps·(beta_start + t·(beta_end − beta_start)), i.e.
/// beta_min = 0.1 and beta_max = 20 as in the VP SDE of Song et al. (arXiv 2011.13456), and
/// alpha = exp(−½∫₀ᵗ beta), sigma = √(1 − alpha²). It agrees with the discrete ā_n at
/// t_n = (n + 1)/steps up to O(beta²) per step (log(1 − beta) ≈ −beta); use [`DdpmSchedule`]
/// for the exact discrete values. sigma(1) = √(1 − e^(−10.05)) ≈ 1 − 2·10⁻⁵.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VpLinearBeta {
    pub steps: f64,
    pub beta_start: f64,
    pub beta_end: f64,
}

impl VpLinearBeta {
    /// beta(t), (B,).
    pub fn beta(&self, t: &Tensor) -> Tensor {
        (t * (self.beta_end - self.beta_start) + self.beta_start) * self.steps
    }
    /// ∫₀ᵗ beta, (B,).
    fn integral(&self, t: &Tensor) -> Tensor {
        (t * self.beta_start + t.square() * (0.5 * (self.beta_end - self.beta_start))) * self.steps
    }
}

impl From<DdpmConfig> for VpLinearBeta {
    fn from(c: DdpmConfig) -> Self {
        Self { steps: c.steps as f64, beta_start: c.beta_start, beta_end: c.beta_end }
    }
}

impl Interpolant for VpLinearBeta {
    fn alpha(&self, t: &Tensor) -> Tensor {
        (self.integral(t) * -0.5).exp()
    }
    fn sigma(&self, t: &Tensor) -> Tensor {
        // 1 − alpha² = −expm1(−∫beta): accurate near t = 0.
        (-(-self.integral(t)).expm1()).sqrt()
    }
    fn d_alpha(&self, t: &Tensor) -> Tensor {
        self.beta(t) * self.alpha(t) * -0.5
    }
    fn d_sigma(&self, t: &Tensor) -> Tensor {
        // sigma·sigma' = −alpha·alpha' = ½·beta·alpha².
        self.beta(t) * (-self.integral(t)).exp() * 0.5 / self.sigma(t)
    }
}

/// The discrete DDPM schedule (ADM "linear", as used by DiT): `steps` steps, beta_n linear from
/// `beta_start` to `beta_end` (n = 0..steps−1, numpy `linspace` in float64),
/// ā_n = Π_{i≤n}(1 − beta_i), and step n sits at t_n = (n + 1)/steps (methods.md §1.3, §5).
///
/// As an [`Interpolant`] it is exact at the grid times: log ā is interpolated linearly in t between
/// the nodes t = m/steps (m = 0..steps, with log ā = 0 at t = 0), so alpha(t_n) = √ā_n,
/// sigma = √(1 − alpha²), and d_alpha, d_sigma are the piecewise derivatives (one-sided at nodes).
/// The table is rebuilt on `t`'s device on every call (a few small kernels, no host transfer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpmSchedule {
    pub steps: i64,
    pub beta_start: f64,
    pub beta_end: f64,
}

impl Default for DdpmSchedule {
    /// DDPM/ADM/DiT: 1000 steps, beta from 10⁻⁴ to 0.02.
    fn default() -> Self {
        Self { steps: 1000, beta_start: 1e-4, beta_end: 0.02 }
    }
}

impl From<DdpmConfig> for DdpmSchedule {
    fn from(c: DdpmConfig) -> Self {
        Self { steps: c.steps, beta_start: c.beta_start, beta_end: c.beta_end }
    }
}

impl DdpmSchedule {
    /// beta_n for n = 0..steps−1, float64 on the host (numpy `linspace` formula).
    pub fn betas_vec(&self) -> Vec<f64> {
        let n = self.steps;
        let step = if n > 1 { (self.beta_end - self.beta_start) / (n - 1) as f64 } else { 0.0 };
        (0..n).map(|i| self.beta_start + i as f64 * step).collect()
    }

    /// ā_n for n = 0..steps−1, float64 on the host.
    pub fn alphas_cumprod_vec(&self) -> Vec<f64> {
        let mut acc = 1.0;
        self.betas_vec()
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }

    /// beta_n as a (steps,) Double tensor built on `device` (no host transfer).
    pub fn betas(&self, device: Device) -> Tensor {
        Tensor::linspace(self.beta_start, self.beta_end, self.steps, (Kind::Double, device))
    }

    /// ā_n as a (steps,) Double tensor built on `device` (no host transfer).
    pub fn alphas_cumprod(&self, device: Device) -> Tensor {
        self.betas(device).neg().log1p().cumsum(0, Kind::Double).exp()
    }

    /// t_n = (n + 1)/steps for integer steps `n` (B,) Int64; returns (B,) Float.
    pub fn t_of_step(&self, n: &Tensor) -> Tensor {
        (n.to_kind(Kind::Float) + 1.0) / self.steps as f64
    }

    /// The integer step n = round(t·steps) − 1 for grid times `t` (B,); returns (B,) Int64.
    pub fn step_of_t(&self, t: &Tensor) -> Tensor {
        ((t.to_kind(Kind::Double) * self.steps as f64).round() - 1.0).to_kind(Kind::Int64)
    }

    /// (log ā at t, d log ā/dt), both (B,) Double, by linear interpolation between the nodes m/steps.
    fn log_alpha_bar(&self, t: &Tensor) -> (Tensor, Tensor) {
        let n = self.steps;
        let t64 = t.to_kind(Kind::Double);
        // Node m = 0 is t = 0 (ā = 1); node m ≥ 1 is step m − 1.
        let nodes = Tensor::cat(&[Tensor::zeros([1], (Kind::Double, t.device())), self.betas(t.device()).neg().log1p().cumsum(0, Kind::Double)], 0);
        let pos = &t64 * n as f64;
        let m = pos.floor().clamp(0.0, (n - 1) as f64);
        let frac = &pos - &m;
        let m = m.to_kind(Kind::Int64);
        let lo = nodes.index_select(0, &m);
        let hi = nodes.index_select(0, &(&m + 1));
        let slope = (&hi - &lo) * n as f64;
        (&lo + (hi - &lo) * frac, slope)
    }
}

impl Interpolant for DdpmSchedule {
    fn alpha(&self, t: &Tensor) -> Tensor {
        (self.log_alpha_bar(t).0 * 0.5).exp().to_kind(t.kind())
    }
    fn sigma(&self, t: &Tensor) -> Tensor {
        (-self.log_alpha_bar(t).0.expm1()).sqrt().to_kind(t.kind())
    }
    fn d_alpha(&self, t: &Tensor) -> Tensor {
        let (log_ab, slope) = self.log_alpha_bar(t);
        ((log_ab * 0.5).exp() * slope * 0.5).to_kind(t.kind())
    }
    fn d_sigma(&self, t: &Tensor) -> Tensor {
        // sigma² = 1 − e^L, so sigma' = −½·L'·e^L/sigma.
        let (log_ab, slope) = self.log_alpha_bar(t);
        let sigma = (-log_ab.expm1()).sqrt();
        (log_ab.exp() * slope * -0.5 / sigma).to_kind(t.kind())
    }
}

// ---------------------------------------------------------------------------------------------
// Config

/// Which path to build; TOML `[...interpolant] kind = "..."`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InterpolantConfig {
    /// alpha = 1 − t, sigma = t.
    Linear(NoParams),
    /// The Shortcut code's path: sigma = sigma_min + (1 − sigma_min)·t.
    LinearSigmaMin(SigmaMinConfig),
    /// Variance-preserving cosine (improved DDPM).
    VpCosine(VpCosineConfig),
    /// Variance-preserving, continuous linear beta (continuous DDPM).
    VpLinearBeta(DdpmConfig),
    /// The discrete DDPM schedule, exact at t_n = (n + 1)/steps.
    DdpmLinearBeta(DdpmConfig),
    /// TrigFlow (sCM): cos/sin.
    TrigFlow(TrigFlowConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SigmaMinConfig {
    pub sigma_min: f64, // sigma(0); default 1e-5 (Shortcut code)
}
impl Default for SigmaMinConfig {
    fn default() -> Self {
        Self { sigma_min: SHORTCUT_SIGMA_MIN }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VpCosineConfig {
    pub offset: f64, // s in θ(t) = (t + s)/(1 + s)·π/2; default 0.008 (improved DDPM)
}
impl Default for VpCosineConfig {
    fn default() -> Self {
        Self { offset: COSINE_OFFSET }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DdpmConfig {
    /// number of discrete steps; default 1000
    pub steps: i64,
    pub beta_start: f64, // beta of the first step; default 1e-4
    /// beta of the last step; default 0.02
    pub beta_end: f64,
}
impl Default for DdpmConfig {
    fn default() -> Self {
        Self { steps: 1000, beta_start: 1e-4, beta_end: 0.02 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrigFlowConfig {
    pub sigma_d: f64, // noise std relative to eps, sigma(1); default 0.5 (sCM)
}
impl Default for TrigFlowConfig {
    fn default() -> Self {
        Self { sigma_d: TRIGFLOW_SIGMA_D }
    }
}

impl InterpolantConfig {
    /// Checks value ranges.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::Linear(_) => {}
            Self::LinearSigmaMin(c) => {
                anyhow::ensure!((0.0..1.0).contains(&c.sigma_min), "sigma_min must be in [0, 1), got {}", c.sigma_min)
            }
            Self::VpCosine(c) => anyhow::ensure!(c.offset.is_finite() && c.offset >= 0.0, "cosine offset must be finite and >= 0, got {}", c.offset),
            Self::VpLinearBeta(c) | Self::DdpmLinearBeta(c) => {
                anyhow::ensure!(c.steps >= 1, "steps must be >= 1, got {}", c.steps);
                anyhow::ensure!(0.0 < c.beta_start && c.beta_start <= c.beta_end && c.beta_end < 1.0, "need 0 < beta_start <= beta_end < 1, got {} and {}", c.beta_start, c.beta_end);
            }
            Self::TrigFlow(c) => anyhow::ensure!(c.sigma_d.is_finite() && c.sigma_d > 0.0, "sigma_d must be finite and > 0, got {}", c.sigma_d),
        }
        Ok(())
    }

    /// Builds the path. Panics on out-of-range values (see [`Self::validate`]).
    pub fn build(&self) -> Box<dyn Interpolant> {
        if let Err(e) = self.validate() {
            panic!("invalid interpolant config: {e}");
        }
        match *self {
            Self::Linear(_) => Box::new(Linear::new()),
            Self::LinearSigmaMin(c) => Box::new(Linear { sigma_min: c.sigma_min }),
            Self::VpCosine(c) => Box::new(VpCosine { offset: c.offset }),
            Self::VpLinearBeta(c) => Box::new(VpLinearBeta::from(c)),
            Self::DdpmLinearBeta(c) => Box::new(DdpmSchedule::from(c)),
            Self::TrigFlow(c) => Box::new(TrigFlow { sigma_d: c.sigma_d }),
        }
    }
}
