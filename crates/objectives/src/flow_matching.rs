//! Flow matching / rectified flow (Lipman et al., arXiv 2210.02747; Liu et al., arXiv 2209.03003).
//! Loss: mean over pixels and batch of (F(x_t, t, h_flow, c) − (α̇·x + σ̇·ε))², x_t = α·x + σ·ε.
//! Time: t = 0 data, t = 1 noise. Lipman and the `flow_matching` library put data at t = 1 and
//! integrate towards it: t = 1 − t_lib, F = −v_lib. The Shortcut code (noise at t_s = 0) converts the
//! same way and feeds h = 1/128 (`flow_h`), where flowmap feeds h = 0 (methods.md §4).
use crate::label_dropout::LabelDropout;
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use flowmap_core::{Interpolant, InterpolantConfig, NoParams, Prediction, RuleName, TimeSampler, TimeSamplerConfig, VelocityField};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowMatchingConfig {
    /// default linear (alpha = 1 − t, sigma = t)
    pub path: InterpolantConfig,
    /// default uniform; Shortcut code: discrete_uniform, bins = 128
    pub times: TimeSamplerConfig,
    /// h fed to the network; default 0 (Shortcut code: 1/128)
    pub flow_h: f64,
    /// probability of the null class per row; default 0.1
    pub label_dropout: f64,
}

impl Default for FlowMatchingConfig {
    fn default() -> Self {
        Self { path: InterpolantConfig::Linear(NoParams {}), times: TimeSamplerConfig::default(), flow_h: 0.0, label_dropout: 0.1 }
    }
}

impl FlowMatchingConfig {
    /// Euler on the path it trains on; the network predicts the velocity at h = `flow_h` (0 by default).
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Euler, prediction: Prediction::Velocity }
    }

    pub fn build(&self) -> anyhow::Result<FlowMatching> {
        self.path.validate()?;
        self.times.validate()?;
        anyhow::ensure!((0.0..=1.0).contains(&self.flow_h), "flow_h must be in [0, 1], got {}", self.flow_h);
        let dropout = LabelDropout::new(self.label_dropout);
        dropout.validate()?;
        Ok(FlowMatching { path: self.path.build(), times: self.times.build(), flow_h: self.flow_h, dropout })
    }
}

/// Flow matching on independent (x, ε) pairs, or on the coupled pairs of a [`Batch`] that carries
/// `noise` (reflow).
#[derive(Debug)]
pub struct FlowMatching {
    pub path: Box<dyn Interpolant>,
    pub times: Box<dyn TimeSampler>,
    pub flow_h: f64,
    pub dropout: LabelDropout,
}

/// Squared error of the network against the conditional velocity on rows (x, ε, t, class), (B, ...),
/// elementwise; the caller reduces. h = `flow_h` for every row.
pub fn flow_matching_error(net: &dyn VelocityField, path: &dyn Interpolant, x: &Tensor, eps: &Tensor, t: &Tensor, flow_h: f64, class: &Tensor) -> Tensor {
    let x_t = path.interpolate(x, eps, t);
    let v = path.velocity(x, eps, t);
    let out = net.forward(&x_t, t, &t.full_like(flow_h), class);
    (out - v).square()
}

impl FlowMatching {
    /// The loss on data `x` with noise `eps` (drawn by the caller, or a stored reflow coupling).
    pub fn loss_on(&self, net: &dyn VelocityField, x: &Tensor, eps: &Tensor, class: &Tensor) -> Loss {
        let t = self.times.sample(x.size()[0], x.device()).to_kind(x.kind());
        let (class, _) = self.dropout.apply(class, net.null_class());
        let value = flow_matching_error(net, self.path.as_ref(), x, eps, &t, self.flow_h, &class).mean(None);
        Loss { metrics: vec![("flow_loss", value.detach())], value }
    }
}

impl Objective for FlowMatching {
    /// Uses `batch.noise` as ε when present (then this is reflow's second stage), fresh noise otherwise.
    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let eps = match &batch.noise {
            Some(noise) => noise.shallow_clone(),
            None => batch.x.randn_like(),
        };
        self.loss_on(nets.online, &batch.x, &eps, &batch.class)
    }
}
