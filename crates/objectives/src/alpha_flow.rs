//! α-Flow (Zhang et al., arXiv 2510.20771, ICLR 2026; official PyTorch code snap-research/alphaflow
//! @b0fef77, `src/training/loss.py` `AlphaFlowLoss`, `infra/experiments/experiments-alphaflow.yaml`;
//! methods.md §14): one family from trajectory flow matching (α = 1) through Shortcut-like
//! consistency (0 < α < 1) to MeanFlow (α = 0), with α annealed over training steps.
//!
//! Each MeanFlow row (t > r, h = t − r) takes a step of δ = α·h from x_t along the (guided)
//! conditional velocity v_g and asks the network to agree with itself over the rest [r, t − δ]
//! (the paper's L_α as summarised by secondary sources — the PDF was not read for this port; code
//! `_compute_mean_velocity_d`, which this file follows), all under no_grad:
//!
//! ```text
//! α > 0:  u_tgt = (δ·v_g + (h − δ)·F(x_t − δ·v_g, t − δ, h − δ)) / h       (α = 1: u_tgt = v_g)
//! α = 0:  u_tgt = v_g − h·J·(v_g, 1, 1)                                    (MeanFlow, one JVP)
//! r = t rows (the first `fm_fraction`):  u_tgt = v_g                       (flow matching)
//! L_i = mean_pixels (F(x_t, t, h) − u_tgt)²
//! loss = mean_i  w_i·L_i / (sg[L_i] + eps),   w_i = α on rows with δ > 0, 1 otherwise
//! ```
//!
//! The curriculum (`get_ratio`): α = α₀ + (α₁ − α₀)·σ(γ·(step − mid)/(end − start)) between
//! `start_step` and `end_step` (sigmoid, the paper's choice; γ = 25), or linear; α below `clamp`
//! (0.005) snaps to 0 and above 1 − clamp to 1, so training starts as exact trajectory FM and ends
//! as exact MeanFlow. The loop passes `step`.
//!
//! Defaults are the official `alphaflow-sigmoid-latentspace-B-2` experiment: α from 1 to 0 over
//! steps [0, 400k], `ratio_fm = 0.5`, adaptive eps 1e-3 \[sec: read from the released loss config by
//! a third-party port; `configs/loss/alphaflow.yaml` was not reachable here\], no CFG, no label
//! dropout. The time distributions come from that same unreachable config: logit-normal(−0.4, 1.0)
//! for the r = t rows' t and for both draws of the (t = max, r = min) pairs is MeanFlow's choice,
//! \[unverified\] for α-Flow.
//!
//! Where paper and code differ (flowmap follows the code):
//! * **Weight.** The paper's L_α carries α⁻¹ (so its gradient tends to MeanFlow's as α → 0); the
//!   code multiplies the δ > 0 rows by α and divides every row by sg[L_i] + eps.
//! * **Per-pixel mean**, not MeanFlow's per-sample sum, under that adaptive weight.
//! * **Target clip.** The code clips u_tgt of δ > 0 rows to ±`clamp_utgt` (4.0 in the CFG XL/2
//!   configs); `target_clip`, default none (the B/2 experiment sets none).
//! * **CFG** (`cfg_params`: ω, κ, interval; official B/2-cfg ω = 1, κ = 0.5): v_g as MeanFlow's
//!   (methods.md §12.4) on rows with t_start < t < t_end (strict), from the online net at h = 0;
//!   labels are dropped (p = `label_dropout`) only on those rows, **before** the guided terms are
//!   computed, and dropped rows keep v_g (MeanFlow instead resets them to v).
//! * The code's logit-normal draws are rescaled by (1 − eps) to [0, 1 − eps] (`sample_logit_norm_time`,
//!   eps from the unreachable config); flowmap draws on [0, 1].
//! * Time convention: the code's net(x, sigma_next = r, sigma = t) is F(x, t, h = t − r) here; its
//!   JVP along (v_g, 0, 1) over (x, r, t) is J·(v_g, 1, 1) over (x, t, h).
use crate::jvp::fp32_scope;
use crate::jvp::{validate_fd_step, JvpMode};
use crate::label_dropout::{null_classes, replace_rows};
use crate::mean_flow::MeanFlowGuidance;
use crate::weighting::mean_per_sample;
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use flowmap_core::time::LogitNormalConfig;
use flowmap_core::{per_sample, Interpolant, InterpolantConfig, NoParams, Prediction, RuleName, TimeSampler, TimeSamplerConfig, VelocityField};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How α moves between `start_step` and `end_step` (`get_ratio`'s `scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaCurve {
    /// α₀ + (α₁ − α₀)·σ(γ·(step − mid)/(end − start)) (the paper's curriculum)
    #[default]
    Sigmoid,
    /// α₀ + (α₁ − α₀)·(step − start)/(end − start)
    Linear,
    /// α₀ at every step
    Constant,
}

/// The consistency step ratio α over training steps.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlphaSchedule {
    /// sigmoid | linear | constant; default sigmoid
    pub curve: AlphaCurve,
    /// α₀ before `start_step`; default 1 (trajectory flow matching)
    pub initial: f64,
    /// α₁ after `end_step`; default 0 (MeanFlow)
    pub end: f64,
    /// default 0
    pub start_step: u64,
    /// default 400_000 (B/2 experiment; XL/2-cfg anneals over 600k–1M)
    pub end_step: u64,
    /// γ of the sigmoid; default 25
    pub gamma: f64,
    /// α < clamp → 0, α > 1 − clamp → 1; default 0.005
    pub clamp: f64,
}

impl Default for AlphaSchedule {
    fn default() -> Self {
        Self { curve: AlphaCurve::Sigmoid, initial: 1.0, end: 0.0, start_step: 0, end_step: 400_000, gamma: 25.0, clamp: 0.005 }
    }
}

impl AlphaSchedule {
    /// A constant α (α = 0: MeanFlow's target with α-Flow's weighting; α = 1: trajectory FM).
    pub fn constant(alpha: f64) -> Self {
        Self { curve: AlphaCurve::Constant, initial: alpha, end: alpha, ..Self::default() }
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (key, v) in [("initial", self.initial), ("end", self.end)] {
            anyhow::ensure!((0.0..=1.0).contains(&v), "objective.alpha.{key} = {v}: α must be in [0, 1]");
        }
        anyhow::ensure!(self.curve == AlphaCurve::Constant || self.start_step < self.end_step, "objective.alpha: start_step ({}) must be < end_step ({})", self.start_step, self.end_step);
        anyhow::ensure!(self.gamma.is_finite() && self.gamma > 0.0, "objective.alpha.gamma = {}: must be finite and > 0", self.gamma);
        anyhow::ensure!((0.0..0.5).contains(&self.clamp), "objective.alpha.clamp = {}: must be in [0, 0.5)", self.clamp);
        Ok(())
    }

    /// α at `step`.
    pub fn at(&self, step: u64) -> f64 {
        let (a0, a1) = (self.initial, self.end);
        let alpha = match self.curve {
            AlphaCurve::Constant => a0,
            _ if step < self.start_step => a0,
            _ if step > self.end_step => a1,
            AlphaCurve::Linear => a0 + (a1 - a0) * (step - self.start_step) as f64 / (self.end_step - self.start_step) as f64,
            AlphaCurve::Sigmoid => {
                let span = (self.end_step - self.start_step) as f64;
                let progress = (step as f64 - (self.start_step as f64 + span / 2.0)) / span;
                a0 + (a1 - a0) / (1.0 + (-progress * self.gamma).exp())
            }
        };
        if alpha < self.clamp {
            0.0
        } else if alpha > 1.0 - self.clamp {
            1.0
        } else {
            alpha
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlphaFlowConfig {
    /// default linear
    pub path: InterpolantConfig,
    /// share of rows (the first ones) with r = t; default 0.5 (`ratio_fm`)
    pub fm_fraction: f64,
    /// t of the r = t rows and both draws of the other rows' (t, r); default logit-normal(−0.4, 1)
    pub times: TimeSamplerConfig,
    /// the curriculum (sigmoid 1 → 0 over [0, 400k], γ 25, clamp 0.005)
    pub alpha: AlphaSchedule,
    /// one_pass | graph_free | finite_difference (the α = 0 stage's JVP); default one_pass
    pub jvp_mode: JvpMode,
    /// finite_difference only: the central-difference step; default by dtype
    pub jvp_fd_step: Option<f64>,
    /// eps of the adaptive weight 1/(sg[L_i] + eps); default 1e-3
    pub adaptive_eps: f64,
    /// clip δ > 0 rows' u_tgt to ±this (`clamp_utgt`); default none
    pub target_clip: Option<f64>,
    /// CFG folded into v_g (ω, κ, t_start, t_end); default none
    pub guidance: Option<MeanFlowGuidance>,
    /// default 0 (B/2 without CFG; 0.1 with CFG)
    pub label_dropout: f64,
}

impl Default for AlphaFlowConfig {
    fn default() -> Self {
        Self {
            path: InterpolantConfig::Linear(NoParams {}),
            fm_fraction: 0.5,
            times: TimeSamplerConfig::LogitNormal(LogitNormalConfig::default()),
            alpha: AlphaSchedule::default(),
            jvp_mode: JvpMode::OnePass,
            jvp_fd_step: None,
            adaptive_eps: 1e-3,
            target_clip: None,
            guidance: None,
            label_dropout: 0.0,
        }
    }
}

impl AlphaFlowConfig {
    /// Jumps with the average velocity (the code's "trajectory sampling").
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Jump, prediction: Prediction::AverageVelocity }
    }

    pub fn build(&self) -> anyhow::Result<AlphaFlow> {
        self.path.validate()?;
        self.times.validate()?;
        self.alpha.validate()?;
        anyhow::ensure!((0.0..=1.0).contains(&self.fm_fraction), "objective.fm_fraction = {}: must be in [0, 1]", self.fm_fraction);
        anyhow::ensure!(self.adaptive_eps.is_finite() && self.adaptive_eps > 0.0, "objective.adaptive_eps = {}: must be finite and > 0", self.adaptive_eps);
        if let Some(c) = self.target_clip {
            anyhow::ensure!(c.is_finite() && c > 0.0, "objective.target_clip = {c}: must be finite and > 0");
        }
        anyhow::ensure!((0.0..=1.0).contains(&self.label_dropout), "objective.label_dropout = {}: must be in [0, 1]", self.label_dropout);
        validate_fd_step(self.jvp_fd_step, "objective.jvp_fd_step")?;
        if let Some(g) = self.guidance {
            anyhow::ensure!(g.omega.is_finite() && g.kappa.is_finite(), "objective.guidance: omega and kappa must be finite");
            anyhow::ensure!(0.0 <= g.t_start && g.t_start <= g.t_end && g.t_end <= 1.0, "objective.guidance: need 0 <= t_start <= t_end <= 1");
        }
        Ok(AlphaFlow { cfg: self.clone(), path: self.path.build(), times: self.times.build() })
    }
}

#[derive(Debug)]
pub struct AlphaFlow {
    pub cfg: AlphaFlowConfig,
    pub path: Box<dyn Interpolant>,
    pub times: Box<dyn TimeSampler>,
}

impl AlphaFlow {
    /// (t, r) for `n` rows: the first ⌊n·fm_fraction⌋ with r = t from one draw, the rest
    /// t = max, r = min of two draws (`sample_traj_params`, `minmax`).
    fn pairs(&self, n: i64, device: Device) -> (Tensor, Tensor) {
        let n_fm = (n as f64 * self.cfg.fm_fraction).floor() as i64;
        let t_fm = self.times.sample(n_fm, device);
        let (a, b) = (self.times.sample(n - n_fm, device), self.times.sample(n - n_fm, device));
        let t = Tensor::cat(&[&t_fm, &a.maximum(&b)], 0);
        let r = Tensor::cat(&[&t_fm, &a.minimum(&b)], 0);
        (t, r)
    }

    /// (class after dropout, v_g) under no_grad (`_compute_velocity_cfg`).
    fn guided_velocity(&self, net: &dyn VelocityField, x_t: &Tensor, t: &Tensor, v: &Tensor, class: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let g = self.cfg.guidance.unwrap_or(MeanFlowGuidance { omega: 1.0, kappa: 0.0, t_start: 0.0, t_end: 1.0 });
            let inside = t.gt(g.t_start).logical_and(&t.lt(g.t_end));
            let class = if self.cfg.label_dropout > 0.0 {
                let drop = t.rand_like().lt(self.cfg.label_dropout).logical_and(&inside);
                replace_rows(class, &drop, net.null_class())
            } else {
                class.shallow_clone()
            };
            if self.cfg.guidance.is_none() {
                return (class, v.shallow_clone());
            }
            let zeros = t.zeros_like();
            let mut guided = v * g.omega;
            if 1.0 - g.omega - g.kappa != 0.0 {
                guided = guided + net.forward(x_t, t, &zeros, &null_classes(t.size()[0], net.null_class(), t.device())) * (1.0 - g.omega - g.kappa);
            }
            if g.kappa != 0.0 {
                guided = guided + net.forward(x_t, t, &zeros, &class) * g.kappa;
            }
            (class, guided.where_self(&per_sample(&inside, v), v))
        })
    }
}

impl Objective for AlphaFlow {
    fn reported_metric(&self) -> Option<&'static str> {
        Some("af_loss_unweighted")
    }

    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss {
        let net = nets.online;
        let x = &batch.x;
        let (b, device, kind) = (x.size()[0], x.device(), x.kind());
        let alpha = self.cfg.alpha.at(step);
        let (t, r) = self.pairs(b, device);
        let (t, r) = (t.to_kind(kind), r.to_kind(kind));
        let h = &t - &r;
        let eps = x.randn_like();
        let x_t = self.path.interpolate(x, &eps, &t);
        let v = self.path.velocity(x, &eps, &t);
        let (class, v_g) = self.guided_velocity(net, &x_t, &t, &v, &batch.class);
        let consistency_rows = h.gt(0.0); // (B,) the rows with δ = α·h > 0 when α > 0

        let (pred, u_tgt, row_weight) = if alpha == 0.0 {
            // MeanFlow's target; r = t rows get v_g since h = 0 there.
            let f = |p: &[Tensor]| Ok(net.forward(&p[0], &p[1], &p[2], &class));
            let primals = [x_t.shallow_clone(), t.shallow_clone(), h.shallow_clone()];
            let tangents = [v_g.shallow_clone(), t.ones_like(), t.ones_like()];
            let (u, du_dt) = {
                let _fp32 = fp32_scope(device);
                self.cfg.jvp_mode.primal_and_jvp(f, &primals, &tangents, self.cfg.jvp_fd_step).expect("alpha_flow: jvp")
            };
            let u_tgt = (&v_g - per_sample(&h, &du_dt) * du_dt.detach()).detach();
            (u, u_tgt, t.ones_like())
        } else {
            let u_tgt = if alpha == 1.0 {
                v_g.shallow_clone()
            } else {
                tch::no_grad(|| {
                    let delta = &h * alpha;
                    let x_next = &x_t - per_sample(&delta, &v_g) * &v_g;
                    let u_next = net.forward(&x_next, &(&t - &delta), &(&h - &delta), &class);
                    let mut tgt = (per_sample(&delta, &v_g) * &v_g + per_sample(&(&h - &delta), &v_g) * u_next) / per_sample(&h.clamp_min(f64::MIN_POSITIVE), &v_g);
                    if let Some(c) = self.cfg.target_clip {
                        tgt = tgt.clamp(-c, c);
                    }
                    tgt.where_self(&per_sample(&consistency_rows, &v_g), &v_g)
                })
            };
            let w = t.ones_like().where_self(&consistency_rows.logical_not(), &t.full_like(alpha));
            (net.forward(&x_t, &t, &h, &class), u_tgt, w)
        };
        let per_row = mean_per_sample(&(&pred - &u_tgt).square()); // (B,)
        let value = (&row_weight * &per_row / (per_row.detach() + self.cfg.adaptive_eps)).mean(None);
        let metrics = vec![("af_loss_unweighted", per_row.mean(None).detach()), ("alpha", Tensor::from(alpha).to_kind(Kind::Float)), ("af_loss", value.detach())];
        Loss { value, metrics }
    }
}
