//! Consistency training and consistency distillation (Song et al., arXiv 2303.01469), in the form of
//! the Shortcut code's baselines (`baselines/targets_consistency_{training,distillation}.py`,
//! methods.md §9–§10). f(x_t, t) = x_t − t·F(x_t, t, h = t) is the flow map to data; with r < t on a
//! grid, x̂ = sg f_θ̄(x̃_r, r) and loss mean(F(x_t, t, t, c) − (x_t − x̂)/t)² (CT with weight 1/t²).
//! x̃_r is the same (x, ε) at r (training) or one teacher Euler step from x_t (distillation).
//! Time: the code's t_s (noise at 0) with t2 = t_s + dt becomes t = 1 − t_s and r = t − dt; its
//! x_{t2} + (1 − t2)·v becomes x_r − r·F.
//!
//! Settings of the Shortcut code that its paper does not state, each an option here (the paper
//! configs under experiments/paper/ set them): the sigma_min = 10⁻⁵ path (`path`,
//! `targets_consistency_{training,distillation}.py` L26–27 / L21); consistency training's
//! curriculum reading the update count from 1 (`count_steps_from = 1`: `TrainStateEma.create`
//! starts `step` at 1, `utils/train_state.py` L35, and the targets read it before the update
//! increments it, `targets_consistency_training.py` L11, `train.py` L264).
use crate::label_dropout::LabelDropout;
use crate::{Batch, DefaultSampler, Loss, Nets, Objective, TargetNet};
use flowmap_core::time::{ConsistencyConfig, DoublingSchedule, FixedPoints};
use flowmap_core::{per_sample, CtSchedule, GridSpacing, Guided, Interpolant, InterpolantConfig, NoParams, PairSampler, PairSamplerConfig, Prediction, RuleName, SigmaMinConfig, VelocityField};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// shortcut-models `denoise_timesteps = 128`: CD's teacher step is 1/128 (a 129-point grid).
pub const CD_GRID_POINTS: i64 = 129;

fn linear() -> InterpolantConfig {
    InterpolantConfig::Linear(NoParams {})
}
fn default_dropout() -> f64 {
    0.1
}
fn cd_grid() -> ConsistencyConfig {
    ConsistencyConfig { spacing: GridSpacing::Uniform(NoParams {}), schedule: CtSchedule::Fixed(FixedPoints { points: CD_GRID_POINTS }) }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyTrainingConfig {
    /// default linear; Shortcut code: linear_sigma_min (1e-5)
    #[serde(default = "linear")]
    pub path: InterpolantConfig,
    /// spacing + curriculum; Shortcut code: uniform, doubling with stages = 7 over the run; required
    pub grid: ConsistencyConfig,
    /// net predicting x̂ from the less noisy point; default ema (both codes)
    #[serde(default)]
    pub target: TargetNet,
    /// default 0.1 (the Shortcut code drops none here)
    #[serde(default = "default_dropout")]
    pub label_dropout: f64,
    /// the curriculum reads step + count_steps_from (0 or 1); default 0; code: 1 (`utils/train_state.py` L35)
    #[serde(default)]
    pub count_steps_from: u64,
}

impl ConsistencyTrainingConfig {
    /// Multistep consistency sampling (methods.md §9.4); the network predicts the jump to data.
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Renoise, prediction: Prediction::JumpToData }
    }

    /// The Shortcut code's settings: the sigma_min = 10⁻⁵ path, a uniform grid with 2^k intervals in
    /// stage k of 7 over `total_steps`, steps counted from 1, EMA targets (label dropout stays 0.1).
    pub fn shortcut_code(total_steps: u64) -> Self {
        Self {
            path: InterpolantConfig::LinearSigmaMin(SigmaMinConfig::default()),
            grid: ConsistencyConfig { spacing: GridSpacing::Uniform(NoParams {}), schedule: CtSchedule::Doubling(DoublingSchedule { stages: 7, total_steps }) },
            target: TargetNet::Ema,
            label_dropout: 0.1,
            count_steps_from: 1,
        }
    }

    pub fn build(&self) -> anyhow::Result<ConsistencyTraining> {
        self.path.validate()?;
        let grid = PairSamplerConfig::Consistency(self.grid);
        grid.validate()?;
        let dropout = LabelDropout::new(self.label_dropout);
        dropout.validate()?;
        anyhow::ensure!(self.count_steps_from <= 1, "count_steps_from must be 0 (flowmap) or 1 (the Shortcut code), got {}", self.count_steps_from);
        Ok(ConsistencyTraining { path: self.path.build(), grid: grid.build(), target: self.target, dropout, count_steps_from: self.count_steps_from })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyDistillationConfig {
    /// default linear; Shortcut code: linear_sigma_min (1e-5)
    #[serde(default = "linear")]
    pub path: InterpolantConfig,
    /// default uniform, fixed 129 points: t ∈ {1/128, …, 1}, teacher step 1/128 (code)
    #[serde(default = "cd_grid")]
    pub grid: ConsistencyConfig,
    /// default ema (code `call_model_ema`)
    #[serde(default)]
    pub target: TargetNet,
    /// h fed to the (flow-matching) teacher; default 0 (code: 1/128)
    #[serde(default)]
    pub teacher_h: f64,
    #[serde(default)]
    pub teacher_cfg_scale: Option<f64>, // CFG on the teacher step; default none
    /// clamp of the teacher's intermediate point (code: 4); default none
    #[serde(default)]
    pub clip: Option<f64>,
    /// default 0.1 (the code drops none)
    #[serde(default = "default_dropout")]
    pub label_dropout: f64,
}

impl Default for ConsistencyDistillationConfig {
    fn default() -> Self {
        Self { path: linear(), grid: cd_grid(), target: TargetNet::Ema, teacher_h: 0.0, teacher_cfg_scale: None, clip: None, label_dropout: 0.1 }
    }
}

impl ConsistencyDistillationConfig {
    /// As consistency training: multistep consistency sampling of the jump to data.
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Renoise, prediction: Prediction::JumpToData }
    }

    pub fn build(&self) -> anyhow::Result<ConsistencyDistillation> {
        self.path.validate()?;
        let grid = PairSamplerConfig::Consistency(self.grid);
        grid.validate()?;
        anyhow::ensure!((0.0..=1.0).contains(&self.teacher_h), "teacher_h must be in [0, 1], got {}", self.teacher_h);
        if let Some(w) = self.teacher_cfg_scale {
            anyhow::ensure!(w.is_finite(), "teacher_cfg_scale must be finite, got {w}");
        }
        if let Some(c) = self.clip {
            anyhow::ensure!(c > 0.0, "clip must be > 0, got {c}");
        }
        let dropout = LabelDropout::new(self.label_dropout);
        dropout.validate()?;
        Ok(ConsistencyDistillation { path: self.path.build(), grid: grid.build(), target: self.target, teacher_h: self.teacher_h, teacher_cfg_scale: self.teacher_cfg_scale, clip: self.clip, dropout })
    }
}

#[derive(Debug)]
pub struct ConsistencyTraining {
    pub path: Box<dyn Interpolant>,
    pub grid: Box<dyn PairSampler>,
    pub target: TargetNet,
    pub dropout: LabelDropout,
    pub count_steps_from: u64,
}

impl ConsistencyTraining {
    /// The step the curriculum reads at training step `step` (0-based).
    pub fn curriculum_step(&self, step: u64) -> u64 {
        step + self.count_steps_from
    }
}

#[derive(Debug)]
pub struct ConsistencyDistillation {
    pub path: Box<dyn Interpolant>,
    pub grid: Box<dyn PairSampler>,
    pub target: TargetNet,
    pub teacher_h: f64,
    pub teacher_cfg_scale: Option<f64>,
    pub clip: Option<f64>,
    pub dropout: LabelDropout,
}

/// The shared tail: x̂ = sg[x_r − r·F_tgt(x_r, r, r)], target (x_t − x̂)/t, loss against F(x_t, t, t).
fn consistency_loss(online: &dyn VelocityField, target_net: &dyn VelocityField, x_t: &Tensor, t: &Tensor, x_r: &Tensor, r: &Tensor, class: &Tensor) -> Loss {
    let target = tch::no_grad(|| {
        let x_hat = x_r - per_sample(r, x_r) * target_net.forward(x_r, r, r, class);
        (x_t - x_hat) / per_sample(t, x_t)
    });
    let out = online.forward(x_t, t, t, class);
    let value = (out - target).square().mean(None);
    Loss { metrics: vec![("consistency_loss", value.detach())], value }
}

impl Objective for ConsistencyTraining {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss {
        let x = &batch.x;
        let pair = self.grid.sample_at_step(x.size()[0], self.curriculum_step(step), x.device());
        let (t, r) = (pair.t.to_kind(x.kind()), pair.r.to_kind(x.kind()));
        let eps = x.randn_like();
        let (class, _) = self.dropout.apply(&batch.class, nets.online.null_class());
        let x_t = self.path.interpolate(x, &eps, &t);
        let x_r = self.path.interpolate(x, &eps, &r);
        consistency_loss(nets.online, self.target.pick(nets), &x_t, &t, &x_r, &r, &class)
    }
}

impl Objective for ConsistencyDistillation {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss {
        let teacher = nets.teacher.expect("consistency distillation needs a teacher (Nets::teacher)");
        let x = &batch.x;
        let pair = self.grid.sample_at_step(x.size()[0], step, x.device());
        let (t, r) = (pair.t.to_kind(x.kind()), pair.r.to_kind(x.kind()));
        let eps = x.randn_like();
        let (class, _) = self.dropout.apply(&batch.class, nets.online.null_class());
        let x_t = self.path.interpolate(x, &eps, &t);
        let x_r = tch::no_grad(|| {
            let h = t.full_like(self.teacher_h);
            let v = match self.teacher_cfg_scale {
                Some(scale) => Guided::new(teacher, scale).forward(&x_t, &t, &h, &class),
                None => teacher.forward(&x_t, &t, &h, &class),
            };
            let x_r = &x_t - per_sample(&(&t - &r), &x_t) * v;
            match self.clip {
                Some(c) => x_r.clamp(-c, c),
                None => x_r,
            }
        });
        consistency_loss(nets.online, self.target.pick(nets), &x_t, &t, &x_r, &r, &class)
    }

    fn needs_teacher(&self) -> bool {
        true
    }
}
