//! Adaptive loss weighting (MeanFlow, arXiv 2505.13447, §4.3; official `meanflow.py`):
//! loss = mean_i L_i / sg[(L_i + c)^p], with L_i the per-sample **sum** of squared errors.
//! p = 0 is the plain mean; p = 1 makes every sample's gradient unit-scale (a robust, log-like loss).
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// MeanFlow's ImageNet setting (`configs/default.py`: `norm_p = 1.0`, `norm_eps = 0.01`).
pub const MEANFLOW_POWER: f64 = 1.0;
pub const MEANFLOW_C: f64 = 0.01;

/// Weights w_i = 1/sg[(L_i + c)^p].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveWeighting {
    pub power: f64, // p; default 1.0 (MeanFlow ImageNet; py-meanflow CIFAR uses 0.75); 0 = plain mean
    /// added to L_i before the power; default 0.01
    pub c: f64,
}

impl Default for AdaptiveWeighting {
    fn default() -> Self {
        Self { power: MEANFLOW_POWER, c: MEANFLOW_C }
    }
}

impl AdaptiveWeighting {
    /// No weighting: the plain mean of L_i.
    pub fn none() -> Self {
        Self { power: 0.0, c: MEANFLOW_C }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.power.is_finite() && self.power >= 0.0, "weighting.power must be finite and >= 0, got {}", self.power);
        anyhow::ensure!(self.c > 0.0 || self.power == 0.0, "weighting.c must be > 0 when power > 0, got {}", self.c);
        Ok(())
    }

    /// Scalar mean_i L_i / sg[(L_i + c)^p] from per-sample losses `per_sample` (B,).
    pub fn weighted_mean(&self, per_sample: &Tensor) -> Tensor {
        if self.power == 0.0 {
            return per_sample.mean(None);
        }
        let w = (per_sample.detach() + self.c).pow_tensor_scalar(self.power).reciprocal(); // (B,)
        (per_sample * w).mean(None)
    }
}

/// Per-sample sum of squares over every dimension but the first: (B, ...) -> (B,).
pub fn sum_per_sample(sq: &Tensor) -> Tensor {
    sq.flatten(1, -1).sum_dim_intlist(1, false, None)
}

/// Per-sample mean over every dimension but the first: (B, ...) -> (B,).
pub fn mean_per_sample(sq: &Tensor) -> Tensor {
    sq.flatten(1, -1).mean_dim(1, false, None)
}
