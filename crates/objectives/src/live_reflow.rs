//! Live reflow, a baseline of the Shortcut paper (Frans et al., arXiv 2410.12557, Table 1;
//! shortcut-models `baselines/targets_livereflow.py`). A `reflow_fraction` of each batch trains on
//! couplings (ε, x_gen) produced on the fly by the current model (an Euler rollout of
//! `rollout_steps` steps), with h = 1; the other rows are flow matching. Loss: the plain mean of
//! (F − target)² over all rows. Time: the code runs from noise at t_s = 0 to data at t_s = 1 and
//! integrates x += v/8; here t = 1 − t_s, F = −s, and the rollout walks t from 1 down to 0.
//!
//! The code's settings, each an option here: the sigma_min = 10⁻⁵ path for x_t and the flow rows'
//! velocity (`path`, `targets_livereflow.py` L20–21, L51); reflow rows targeting x − x_0 without
//! the (1 − sigma_min) factor of the path's velocity (`reflow_target = "endpoint_difference"`, L45);
//! the rollout guided with the rows' labels at `cfg_scale` (`rollout_cfg_scale`, L32–42; the
//! ImageNet README command sets 1.5, CelebA-HQ's 0 rolls out unconditionally).
use crate::flow_matching::flow_matching_error;
use crate::label_dropout::LabelDropout;
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use flowmap_core::{Guided, Interpolant, InterpolantConfig, NoParams, Prediction, RuleName, TimeSampler, TimeSamplerConfig, VelocityField};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// shortcut-models `bootstrap_every = 8`: one row in eight is a reflow row.
pub const LIVE_REFLOW_FRACTION: f64 = 0.125;
/// `targets_livereflow.py`: `for _ in range(8)`.
pub const LIVE_REFLOW_ROLLOUT_STEPS: i64 = 8;

/// What the reflow rows regress on, for the coupling (ε, x_gen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReflowTarget {
    /// The path's velocity at the coupling, as the flow rows: (1 − sigma_min)·ε − x_gen on the
    /// sigma_min path (ε − x_gen on the plain one).
    #[default]
    PathVelocity,
    /// ε − x_gen whatever the path (the code's `v_reflow = x - x_0_reflow`, `targets_livereflow.py`
    /// L45, while its flow rows carry the factor, L21).
    EndpointDifference,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LiveReflowConfig {
    /// default linear; code: linear_sigma_min (1e-5)
    pub path: InterpolantConfig,
    /// for both kinds of rows; default uniform (code: discrete_uniform, 128 bins)
    pub times: TimeSamplerConfig,
    /// share of rows with generated couplings; default 0.125 (code)
    pub reflow_fraction: f64,
    /// Euler steps of the rollout; default 8 (code)
    pub rollout_steps: i64,
    pub rollout_cfg_scale: Option<f64>, // CFG scale of the rollout with the rows' labels; default none = unconditional rollout (code with cfg_scale 0)
    /// h on flow rows and inside the rollout; default 0 (code: 1/128)
    pub flow_h: f64,
    /// h on reflow rows; default 1 (code: level 0)
    pub reflow_h: f64,
    /// on flow rows only (reflow rows keep labels, as in the code); default 0.1
    pub label_dropout: f64,
    /// reflow rows' target: path_velocity (default) | endpoint_difference (code, L45)
    pub reflow_target: ReflowTarget,
}

impl Default for LiveReflowConfig {
    fn default() -> Self {
        Self {
            path: InterpolantConfig::Linear(NoParams {}),
            times: TimeSamplerConfig::default(),
            reflow_fraction: LIVE_REFLOW_FRACTION,
            rollout_steps: LIVE_REFLOW_ROLLOUT_STEPS,
            rollout_cfg_scale: None,
            flow_h: 0.0,
            reflow_h: 1.0,
            label_dropout: 0.1,
            reflow_target: ReflowTarget::PathVelocity,
        }
    }
}

impl LiveReflowConfig {
    /// Jumps (reflow rows train h = `reflow_h`, flow rows h = `flow_h`).
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Jump, prediction: Prediction::AverageVelocity }
    }

    pub fn build(&self) -> anyhow::Result<LiveReflow> {
        self.path.validate()?;
        self.times.validate()?;
        anyhow::ensure!((0.0..=1.0).contains(&self.reflow_fraction), "reflow_fraction must be in [0, 1], got {}", self.reflow_fraction);
        anyhow::ensure!(self.rollout_steps >= 1, "rollout_steps must be >= 1, got {}", self.rollout_steps);
        if let Some(w) = self.rollout_cfg_scale {
            anyhow::ensure!(w.is_finite(), "rollout_cfg_scale must be finite, got {w}");
        }
        anyhow::ensure!((0.0..=1.0).contains(&self.flow_h) && (0.0..=1.0).contains(&self.reflow_h), "flow_h and reflow_h must be in [0, 1]");
        let dropout = LabelDropout::new(self.label_dropout);
        dropout.validate()?;
        Ok(LiveReflow {
            path: self.path.build(),
            times: self.times.build(),
            reflow_fraction: self.reflow_fraction,
            rollout_steps: self.rollout_steps,
            rollout_cfg_scale: self.rollout_cfg_scale,
            flow_h: self.flow_h,
            reflow_h: self.reflow_h,
            dropout,
            reflow_target: self.reflow_target,
        })
    }
}

#[derive(Debug)]
pub struct LiveReflow {
    pub path: Box<dyn Interpolant>,
    pub times: Box<dyn TimeSampler>,
    pub reflow_fraction: f64,
    pub rollout_steps: i64,
    pub rollout_cfg_scale: Option<f64>,
    pub flow_h: f64,
    pub reflow_h: f64,
    pub dropout: LabelDropout,
    pub reflow_target: ReflowTarget,
}

impl LiveReflow {
    /// Reflow rows in a batch of n: ⌊n·reflow_fraction⌋ (`batch_size // bootstrap_every`).
    pub fn reflow_rows(&self, n: i64) -> i64 {
        (n as f64 * self.reflow_fraction).floor() as i64
    }

    /// Euler rollout of `net` from noise `eps` at t = 1 to t = 0, no_grad: x ← x − (1/N)·F(x, t_i, flow_h, c).
    fn rollout(&self, net: &dyn VelocityField, eps: &Tensor, class: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let n = eps.size()[0];
            let rollout_class = match self.rollout_cfg_scale {
                Some(_) => class.shallow_clone(),
                None => class.full_like(net.null_class()),
            };
            let step = 1.0 / self.rollout_steps as f64;
            let mut x = eps.shallow_clone();
            for i in 0..self.rollout_steps {
                let t = Tensor::full([n], 1.0 - i as f64 * step, (eps.kind(), eps.device()));
                let h = t.full_like(self.flow_h);
                let u = match self.rollout_cfg_scale {
                    Some(scale) => Guided::new(net, scale).forward(&x, &t, &h, &rollout_class),
                    None => net.forward(&x, &t, &h, &rollout_class),
                };
                x = x - u * step;
            }
            x
        })
    }
}

impl Objective for LiveReflow {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let x = &batch.x;
        let (b, device) = (x.size()[0], x.device());
        let b_r = self.reflow_rows(b);
        let eps = x.randn_like();
        let t = self.times.sample(b, device).to_kind(x.kind());
        let net = nets.online;

        // Flow rows: b_r..b, with label dropout.
        let flow_class = batch.class.narrow(0, b_r, b - b_r);
        let (flow_class, _) = self.dropout.apply(&flow_class, net.null_class());
        let flow_err = flow_matching_error(net, self.path.as_ref(), &x.narrow(0, b_r, b - b_r), &eps.narrow(0, b_r, b - b_r), &t.narrow(0, b_r, b - b_r), self.flow_h, &flow_class);
        if b_r == 0 {
            let value = flow_err.mean(None);
            return Loss { metrics: vec![("flow_loss", value.detach())], value };
        }

        // Reflow rows: 0..b_r; their data images are replaced by the rollout's samples.
        let eps_r = eps.narrow(0, 0, b_r);
        let class_r = batch.class.narrow(0, 0, b_r);
        let x_gen = self.rollout(net, &eps_r, &class_r);
        let t_r = t.narrow(0, 0, b_r);
        let reflow_err = match self.reflow_target {
            ReflowTarget::PathVelocity => flow_matching_error(net, self.path.as_ref(), &x_gen, &eps_r, &t_r, self.reflow_h, &class_r),
            ReflowTarget::EndpointDifference => {
                let x_t = self.path.interpolate(&x_gen, &eps_r, &t_r);
                let out = net.forward(&x_t, &t_r, &t_r.full_like(self.reflow_h), &class_r);
                (out - (&eps_r - &x_gen)).square()
            }
        };

        // The plain mean over all rows, as the code's mean over the merged batch.
        let value = Tensor::cat(&[&reflow_err, &flow_err], 0).mean(None);
        let mut metrics = vec![("reflow_loss", reflow_err.mean(None).detach())];
        if b_r < b {
            metrics.push(("flow_loss", flow_err.mean(None).detach()));
        }
        Loss { value, metrics }
    }
}
