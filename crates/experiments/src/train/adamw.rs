//! AdamW in Rust on tensors, with state that can be saved and restored exactly (tch's optimiser
//! state is opaque). Two kernels for the same update, chosen by `AdamWKernel`:
//! * `Plain`: per-parameter in-place tensor ops (PyTorch's `_single_tensor_adamw` formula);
//! * `Fused`: libtorch's multi-tensor `at::_fused_adamw_` through flowmap-sys (what
//!   `torch.optim.AdamW(fused=True)` runs; the default on CUDA). Equality of the two is tested in
//!   crates/sys/tests/glue.rs and here.
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// `[optimizer]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// peak learning rate
    pub lr: f64,
    /// (beta1, beta2); default (0.9, 0.999)
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// decoupled; default 0
    #[serde(default)]
    pub weight_decay: f64,
    /// default 1e-8
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// linear warm-up from 0 to lr; default 0
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub grad_clip: Option<f64>, // global-norm clipping; default none
    /// "auto" (fused on CUDA, plain on CPU), "plain", "fused"
    #[serde(default)]
    pub kernel: AdamWKernel,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}

impl AdamWConfig {
    /// Range checks (errors name the key). A negative lr or grad_clip would ascend the loss.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.lr.is_finite() && self.lr > 0.0, "optimizer.lr = {}: must be finite and > 0", self.lr);
        for (i, b) in self.betas.iter().enumerate() {
            ensure!((0.0..1.0).contains(b), "optimizer.betas[{i}] = {b}: must be in [0, 1)");
        }
        ensure!(self.weight_decay.is_finite() && self.weight_decay >= 0.0, "optimizer.weight_decay = {}: must be finite and >= 0", self.weight_decay);
        ensure!(self.lr * self.weight_decay < 1.0, "optimizer.lr * optimizer.weight_decay = {}: must be < 1 (each step multiplies the weights by 1 - lr*weight_decay)", self.lr * self.weight_decay);
        ensure!(self.eps.is_finite() && self.eps > 0.0, "optimizer.eps = {}: must be finite and > 0", self.eps);
        if let Some(c) = self.grad_clip {
            ensure!(c > 0.0, "optimizer.grad_clip = {c}: must be > 0 (inf = no clipping; leave it out for none)");
        }
        Ok(())
    }
}

/// Which implementation performs the update.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AdamWKernel {
    #[default]
    Auto,
    Plain,
    Fused,
}

/// AdamW over the trainable variables of a VarStore, in name order.
pub struct AdamW {
    cfg: AdamWConfig,
    names: Vec<String>,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// One float scalar per parameter (the fused kernel's layout); all equal to `step`.
    steps: Vec<Tensor>,
    step: u64,
    fused: bool,
}

impl AdamW {
    pub fn new(vs: &VarStore, cfg: AdamWConfig) -> Self {
        Self::over(&[("", vs)], cfg)
    }

    /// AdamW over the trainable variables of several stores (the model's, an objective's own):
    /// store `(prefix, vs)`'s variable `name` is `<prefix><name>` in the saved state.
    pub fn over(stores: &[(&str, &VarStore)], cfg: AdamWConfig) -> Self {
        let vars: BTreeMap<String, Tensor> = stores.iter().flat_map(|(prefix, vs)| vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).map(move |(n, t)| (format!("{prefix}{n}"), t))).collect();
        let device = stores.first().map(|(_, vs)| vs.device()).unwrap_or(Device::Cpu);
        let names: Vec<String> = vars.keys().cloned().collect();
        let params: Vec<Tensor> = vars.into_values().collect();
        let m = params.iter().map(|p| p.zeros_like().detach()).collect();
        let v = params.iter().map(|p| p.zeros_like().detach()).collect();
        let steps = params.iter().map(|p| Tensor::zeros([], (Kind::Float, p.device()))).collect();
        let fused = match cfg.kernel {
            AdamWKernel::Auto => device != Device::Cpu,
            AdamWKernel::Plain => false,
            AdamWKernel::Fused => true,
        };
        Self { cfg, names, params, m, v, steps, step: 0, fused }
    }

    /// Number of updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The learning rate of the next update (linear warm-up, then constant).
    pub fn lr(&self) -> f64 {
        let w = self.cfg.warmup_steps;
        if w > 0 && self.step < w {
            self.cfg.lr * (self.step + 1) as f64 / w as f64
        } else {
            self.cfg.lr
        }
    }

    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The gradient of every trainable parameter, in a fixed order (what ranks sum). A parameter the
    /// loss did not reach gets a defined zero gradient, so every rank hands over the same tensors.
    pub fn grads(&mut self) -> Vec<Tensor> {
        for p in &self.params {
            if !p.grad().defined() {
                (p.sum(p.kind()) * 0.0).backward();
            }
        }
        self.params.iter().map(|p| p.grad()).collect()
    }

    /// Global gradient norm as a 0-d tensor (no host read), after optional clipping in place.
    pub fn clip_and_norm(&mut self) -> Tensor {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return Tensor::zeros([], (Kind::Float, Device::Cpu));
        }
        let norm = Tensor::stack(&grads.iter().map(|g| g.square().sum(Kind::Float)).collect::<Vec<_>>(), 0).sum(Kind::Float).sqrt();
        if let Some(max) = self.cfg.grad_clip {
            let coef = (max / (&norm + 1e-6)).clamp_max(1.0);
            tch::no_grad(|| {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_(&coef);
                }
            });
        }
        norm
    }

    /// One AdamW update with the current gradients (parameters without a gradient get zeros).
    pub fn step(&mut self) -> Result<()> {
        let lr = self.lr();
        let (b1, b2) = (self.cfg.betas[0], self.cfg.betas[1]);
        let grads: Vec<Tensor> = self.params.iter().map(|p| if p.grad().defined() { p.grad() } else { p.zeros_like() }).collect();
        if self.fused {
            let hp = flowmap_sys::AdamWHyper { lr, beta1: b1, beta2: b2, weight_decay: self.cfg.weight_decay, eps: self.cfg.eps };
            flowmap_sys::fused_adamw(&self.params, &grads, &self.m, &self.v, &self.steps, hp)?;
        } else {
            let t = (self.step + 1) as f64;
            let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
            tch::no_grad(|| {
                for (i, g) in grads.iter().enumerate() {
                    let mut p = self.params[i].shallow_clone();
                    let _ = p.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                    let _ = self.m[i].g_mul_scalar_(b1).g_add_(&(g * (1.0 - b1)));
                    let _ = self.v[i].g_mul_scalar_(b2).g_add_(&(g * g * (1.0 - b2)));
                    let denom = (&self.v[i] / bc2).sqrt() + self.cfg.eps;
                    let _ = p.g_sub_(&((&self.m[i] / bc1) / denom * lr));
                    let _ = self.steps[i].g_add_scalar_(1.0);
                }
            });
        }
        self.step += 1;
        Ok(())
    }

    /// The state as named tensors: `m.<param>`, `v.<param>` (and the step count separately).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("m.{n}"), self.m[i].shallow_clone()));
            out.push((format!("v.{n}"), self.v[i].shallow_clone()));
        }
        out
    }

    /// Restores moments and the step count; every parameter's moments must be present with the
    /// right shape.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, n) in self.names.iter().enumerate() {
            for (kind, dst) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{n}");
                let Some(src) = tensors.get(&key) else { bail!("optimizer state has no `{key}` (the checkpoint was written for another model?)") };
                if src.size() != dst.size() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter has {:?}", src.size(), dst.size());
                }
                tch::no_grad(|| dst.copy_(src));
            }
            let _ = self.steps[i].fill_(step as f64);
        }
        self.step = step;
        Ok(())
    }
}
