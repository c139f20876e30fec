//! Samplers: one function, [`sample`], that walks a descending time grid 1 = t_0 > … > t_N = 0
//! (methods.md §1.1) with any [`VelocityField`] and a [`StepRule`].
//!
//! **No per-step host synchronisation.** The grid is a host `&[f64]`; the path coefficients alpha,
//! sigma and their derivatives are evaluated once for the whole grid on a CPU float64 tensor before
//! the loop; per-step times are made with `Tensor::full` on the noise's device; step coefficients
//! are host `f64` scalars. Nothing inside the loop calls `double_value`, `int64_value`, `Vec::try_from`
//! or any other device-to-host read, and no branch depends on tensor contents, so a CUDA sampler
//! queues kernels without waiting. Stochastic rules draw from the global generator
//! (`randn_like`); seed it with `tch::manual_seed`.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{Interpolant, VelocityField};

/// How one step from t to r = t − h uses the network F(x_t, t, h, class).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepRule {
    /// F read as velocity (h = 0): x_r = x_t − h·F(x_t, t, 0). One NFE per step.
    Euler,
    /// F read as velocity: Euler predictor, trapezoidal corrector with F(x̃_r, r, 0) (the corrector
    /// is applied on every step, the last one included). Two NFEs per step.
    Heun,
    /// F read as average velocity over the step: x_r = x_t − h·F(x_t, t, h). The Shortcut sampler
    /// (methods.md §11.5, uniform grid) and the MeanFlow sampler (§12.5; one step: grid [1, 0]).
    Jump,
    /// F read as eps (h = 0), deterministic DDIM: x̂ = (x_t − sigma(t)·ε̂)/alpha(t),
    /// x_r = alpha(r)·x̂ + sigma(r)·ε̂. Needs alpha > 0 on the grid (e.g. the discrete DDPM path,
    /// whose alpha(1) = √ā_999).
    Ddim,
    /// F read as eps (h = 0), ancestral sampling from q(x_r | x_t, x̂) (methods.md §5). Written for
    /// any path (Kingma et al., VDM): with alpha_{t|r} = alpha_t/alpha_r and
    /// sigma²_{t|r} = sigma_t² − alpha²_{t|r}·sigma_r², the mean is
    /// (alpha_{t|r}·sigma_r²/sigma_t²)·x_t + (alpha_r·sigma²_{t|r}/sigma_t²)·x̂ and the variance
    /// sigma²_{t|r}·sigma_r²/sigma_t². On a VP path this is DDPM's respaced step with
    /// beta' = 1 − ā_t/ā_r and beta~ = beta'·(1 − ā_r)/(1 − ā_t). Needs alpha > 0 on the grid.
    DdpmAncestral,
    /// F read as velocity: Euler–Maruyama on the reverse SDE with the same marginals as the ODE,
    /// dx = [v − ½g(t)²·s(x, t)] dt + g(t) dW̄ with the score s from v by the path's conversion
    /// (linear path: s = −(x_t + (1 − t)·v)/t). Per step: x_r = x_t − h·v + h·½g²·s + g·√h·z; the
    /// last step (r = 0) adds no noise (it returns the mean, as SiT's `last_step = "Mean"`).
    Sde { diffusion: Diffusion },
    /// Consistency multistep sampling (methods.md §9.4): x̂ = x_t − t·F(x_t, t, t) (the jump to
    /// data), then x_r = alpha(r)·x̂ + sigma(r)·z with fresh z; the last step returns x̂.
    Renoise,
}

/// A [`StepRule`] by name, as configs write it (`rule = "heun"`); [`RuleName::step_rule`] adds the
/// diffusion coefficient the SDE rule needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleName {
    Euler,
    Heun,
    Jump,
    Ddim,
    DdpmAncestral,
    Sde,
    Renoise,
}

impl RuleName {
    /// Every rule, in declaration order.
    pub const ALL: [RuleName; 7] = [Self::Euler, Self::Heun, Self::Jump, Self::Ddim, Self::DdpmAncestral, Self::Sde, Self::Renoise];

    /// The name configs use (`"ddpm_ancestral"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::Heun => "heun",
            Self::Jump => "jump",
            Self::Ddim => "ddim",
            Self::DdpmAncestral => "ddpm_ancestral",
            Self::Sde => "sde",
            Self::Renoise => "renoise",
        }
    }

    /// The rule; `diffusion` is g(t) of the SDE rule (required there, ignored by the others).
    pub fn step_rule(self, diffusion: Option<Diffusion>) -> anyhow::Result<StepRule> {
        Ok(match self {
            Self::Euler => StepRule::Euler,
            Self::Heun => StepRule::Heun,
            Self::Jump => StepRule::Jump,
            Self::Ddim => StepRule::Ddim,
            Self::DdpmAncestral => StepRule::DdpmAncestral,
            Self::Sde => StepRule::Sde { diffusion: diffusion.ok_or_else(|| anyhow::anyhow!("the sde rule needs a diffusion coefficient g(t)"))? },
            Self::Renoise => StepRule::Renoise,
        })
    }
}

impl StepRule {
    /// The rule's config name.
    pub fn name(&self) -> RuleName {
        match self {
            Self::Euler => RuleName::Euler,
            Self::Heun => RuleName::Heun,
            Self::Jump => RuleName::Jump,
            Self::Ddim => RuleName::Ddim,
            Self::DdpmAncestral => RuleName::DdpmAncestral,
            Self::Sde { .. } => RuleName::Sde,
            Self::Renoise => RuleName::Renoise,
        }
    }
}

/// What a trained network's output means (which (t, h) it was trained on and how to read it);
/// it decides which step rules can sample from it (see [`Prediction::rules`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// eps at h = 0 (DDPM).
    Eps,
    /// The instantaneous velocity dx_t/dt, h = 0 (flow matching, reflow).
    Velocity,
    /// The average velocity over [t − h, t] for steps h > 0, and the velocity at h = 0 (Shortcut,
    /// MeanFlow, progressive distillation, live reflow).
    AverageVelocity,
    /// The jump to data only, F(x_t, t, h = t) with x̂ = x_t − t·F (consistency models).
    JumpToData,
}

impl Prediction {
    /// The step rules that read this output as they assume (StepRule's docs): eps rules need eps,
    /// velocity rules (h = 0) a velocity, `jump` an average velocity over any step, `renoise` the
    /// jump to data F(x_t, t, t).
    pub fn rules(self) -> &'static [RuleName] {
        use RuleName::*;
        match self {
            Self::Eps => &[Ddim, DdpmAncestral],
            Self::Velocity => &[Euler, Heun, Sde],
            Self::AverageVelocity => &[Jump, Euler, Heun, Sde, Renoise],
            Self::JumpToData => &[Renoise],
        }
    }

    /// Whether `rule` can sample from a network trained for this output.
    pub fn accepts(self, rule: RuleName) -> bool {
        self.rules().contains(&rule)
    }

    /// A short description for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Eps => "eps (h = 0)",
            Self::Velocity => "the velocity at h = 0 only",
            Self::AverageVelocity => "the average velocity over a step (h >= 0)",
            Self::JumpToData => "the jump to data F(x_t, t, t) only",
        }
    }
}

/// The diffusion coefficient g(t) of [`StepRule::Sde`]. g = 0 recovers Euler on the ODE.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Diffusion {
    /// g(t) = scale.
    Constant(DiffusionScale),
    /// g(t) = scale·sigma(t) (SiT's `"sigma"` form), so the noise vanishes near the data.
    Sigma(DiffusionScale),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionScale {
    pub scale: f64,
}

impl Diffusion {
    /// g at a time whose sigma is `sigma_t`.
    pub fn g(&self, sigma_t: f64) -> f64 {
        match *self {
            Self::Constant(c) => c.scale,
            Self::Sigma(c) => c.scale * sigma_t,
        }
    }
}

/// N uniform steps: t_i = 1 − i/N, i = 0..N, ending exactly at 0.
pub fn uniform_grid(steps: usize) -> Vec<f64> {
    assert!(steps >= 1, "a grid needs at least one step");
    (0..=steps).map(|i| if i == steps { 0.0 } else { 1.0 - i as f64 / steps as f64 }).collect()
}

/// Checks that `grid` is strictly descending inside [0, 1] with at least two points.
pub fn check_grid(grid: &[f64]) -> anyhow::Result<()> {
    anyhow::ensure!(grid.len() >= 2, "a time grid needs at least 2 points, got {}", grid.len());
    anyhow::ensure!(grid.iter().all(|t| (0.0..=1.0).contains(t)), "grid times must lie in [0, 1]: {grid:?}");
    anyhow::ensure!(grid.windows(2).all(|w| w[0] > w[1]), "grid must be strictly descending (t = 1 → 0): {grid:?}");
    Ok(())
}

/// A time grid as configured; TOML `kind = "uniform"` with `steps`, or `kind = "list"` with `times`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TimeGrid {
    Uniform(UniformGrid),
    List(GridList),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UniformGrid {
    pub steps: usize, // number of steps (NFE for one-evaluation rules)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GridList {
    pub times: Vec<f64>, // strictly descending, e.g. [1.0, 0.5, 0.0]
}

impl TimeGrid {
    /// The grid times, descending.
    pub fn times(&self) -> Vec<f64> {
        match self {
            Self::Uniform(u) => uniform_grid(u.steps),
            Self::List(l) => l.times.clone(),
        }
    }
    /// Checks the grid (see [`check_grid`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Self::Uniform(u) = self {
            anyhow::ensure!(u.steps >= 1, "steps must be >= 1");
        }
        check_grid(&self.times())
    }
}

/// alpha, sigma and their derivatives on the whole grid, on the host.
struct GridCoefficients {
    alpha: Vec<f64>,
    sigma: Vec<f64>,
    d_alpha: Vec<f64>,
    d_sigma: Vec<f64>,
}

impl GridCoefficients {
    fn new(path: &dyn Interpolant, grid: &[f64]) -> Self {
        // CPU float64: reading these back is a host copy, not a device synchronisation.
        let t = Tensor::from_slice(grid);
        let host = |v: Tensor| Vec::<f64>::try_from(v.to_kind(Kind::Double)).expect("CPU Double tensor to Vec<f64>");
        Self { alpha: host(path.alpha(&t)), sigma: host(path.sigma(&t)), d_alpha: host(path.d_alpha(&t)), d_sigma: host(path.d_sigma(&t)) }
    }
}

/// Walks `grid` (strictly descending, normally 1.0 → 0.0) from `noise` (B, ...) under no_grad and
/// returns the sample at the last grid time, shaped like `noise`. `class` (B,) Int64 goes to every
/// call unchanged (wrap `net` in [`crate::Guided`] for classifier-free guidance). Times and h are
/// passed as (B,) tensors of kind Double if `noise` is Double, Float otherwise.
///
/// Never reads a device tensor back to the host (see the module docs).
pub fn sample(net: &dyn VelocityField, path: &dyn Interpolant, noise: Tensor, class: &Tensor, grid: &[f64], rule: StepRule) -> Tensor {
    if let Err(e) = check_grid(grid) {
        panic!("{e}");
    }
    let c = GridCoefficients::new(path, grid);
    let b = noise.size()[0];
    let kind = if noise.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let device: Device = noise.device();
    let time = |v: f64| Tensor::full([b], v, (kind, device));
    tch::no_grad(move || {
        let mut x = noise;
        for i in 0..grid.len() - 1 {
            let (t, r) = (grid[i], grid[i + 1]);
            let h = t - r;
            let j = i + 1; // index of r
            let t_b = time(t);
            x = match rule {
                StepRule::Euler => {
                    let v = net.forward(&x, &t_b, &time(0.0), class);
                    &x - v * h
                }
                StepRule::Heun => {
                    let zero = time(0.0);
                    let v = net.forward(&x, &t_b, &zero, class);
                    let x_euler = &x - &v * h;
                    let v_r = net.forward(&x_euler, &time(r), &zero, class);
                    &x - (v + v_r) * (0.5 * h)
                }
                StepRule::Jump => {
                    let u = net.forward(&x, &t_b, &time(h), class);
                    &x - u * h
                }
                StepRule::Ddim => {
                    let eps_hat = net.forward(&x, &t_b, &time(0.0), class);
                    let x_hat = (&x - &eps_hat * c.sigma[i]) / c.alpha[i];
                    x_hat * c.alpha[j] + eps_hat * c.sigma[j]
                }
                StepRule::DdpmAncestral => {
                    let eps_hat = net.forward(&x, &t_b, &time(0.0), class);
                    let x_hat = (&x - &eps_hat * c.sigma[i]) / c.alpha[i];
                    let (a_t, s_t, a_r, s_r) = (c.alpha[i], c.sigma[i], c.alpha[j], c.sigma[j]);
                    let a_tr = a_t / a_r;
                    let var_tr = s_t * s_t - a_tr * a_tr * s_r * s_r;
                    let mean = &x * (a_tr * s_r * s_r / (s_t * s_t)) + x_hat * (a_r * var_tr / (s_t * s_t));
                    let std = (var_tr * s_r * s_r / (s_t * s_t)).max(0.0).sqrt();
                    if std > 0.0 {
                        mean + x.randn_like() * std
                    } else {
                        mean
                    }
                }
                StepRule::Sde { diffusion } => {
                    let v = net.forward(&x, &t_b, &time(0.0), class);
                    let (a, s, da, ds) = (c.alpha[i], c.sigma[i], c.d_alpha[i], c.d_sigma[i]);
                    // score = −ε̂/sigma with ε̂ = (alpha·v − d_alpha·x_t)/(alpha·d_sigma − sigma·d_alpha).
                    let eps_hat = (&v * a - &x * da) / (a * ds - s * da);
                    let g = diffusion.g(s);
                    // x_t − h·v + h·½g²·score, score = −ε̂/sigma.
                    let drift = &x - v * h - eps_hat * (0.5 * g * g * h / s);
                    if r > 0.0 && g > 0.0 {
                        drift + x.randn_like() * (g * h.sqrt())
                    } else {
                        drift
                    }
                }
                StepRule::Renoise => {
                    let u = net.forward(&x, &t_b, &t_b, class);
                    let x_hat = &x - u * t;
                    if r > 0.0 {
                        &x_hat * c.alpha[j] + x_hat.randn_like() * c.sigma[j]
                    } else {
                        x_hat
                    }
                }
            };
        }
        x
    })
}
