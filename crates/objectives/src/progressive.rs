//! Progressive distillation (Salimans and Ho, arXiv 2202.00512), in the Shortcut code's form
//! (shortcut-models `baselines/targets_progressive.py`, methods.md §8). Stage s of `stages` trains
//! one jump of h = 2^−k, k = stages − 1 − s, from two frozen-teacher jumps of h/2:
//! loss mean(F(x_t, t, h, c) − sg[(u₁ + u₂)/2])², u₁ = F_φ(x_t, t, h/2), u₂ = F_φ(x_t − (h/2)·u₁, t − h/2, h/2).
//! Time: the code's t_s = j/2^k (noise at 0) becomes t = 1 − t_s ∈ {h, …, 1}; its x + (h/2)·v is x − (h/2)·u.
//!
//! The teacher after a stage boundary (`refresh_from`): the code (`train.py` L309–312) copies the
//! whole train state into the teacher and its targets call the teacher's EMA weights
//! (`targets_progressive.py` L28, `bootstrap_ema = 1` by default, `train.py` L64), so from stage 1 on
//! its teacher is the student's EMA at the refresh (`refresh_from = "ema"`); Salimans and Ho's
//! Algorithm 2 makes the student's own weights the next teacher (`refresh_from = "online"`, default).
use crate::label_dropout::LabelDropout;
use crate::{Batch, DefaultSampler, Loss, Nets, Objective, TargetNet};
use flowmap_core::{Guided, Interpolant, InterpolantConfig, NoParams, Prediction, RuleName, VelocityField};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// log2 of the code's 128 `denoise_timesteps`: seven stages, h = 1/64 … 1.
pub const PD_STAGES: u32 = 7;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressiveConfig {
    /// default linear; Shortcut code: linear_sigma_min (1e-5)
    #[serde(default = "linear")]
    pub path: InterpolantConfig,
    /// stage s trains h = 2^-(stages-1-s) from teacher steps of half that; default 7 (code)
    #[serde(default = "pd_stages")]
    pub stages: u32,
    /// training steps per stage (code: max_steps / 7); required
    pub steps_per_stage: u64,
    #[serde(default)]
    pub teacher_cfg_scale: Option<f64>, // CFG scale of the teacher in stage 0 only (code `bootstrap_cfg`, 1.5); default none
    /// clamp of the intermediate point x_t − (h/2)·u₁ (code: 4); default none
    #[serde(default)]
    pub clip: Option<f64>,
    /// same dropped label for student and teacher; default 0.1 (the code drops none)
    #[serde(default = "default_dropout")]
    pub label_dropout: f64,
    /// student weights copied into the teacher at each stage boundary; default online (Salimans
    /// and Ho); code: ema (`train.py` L309–312 with `targets_progressive.py` L28, `bootstrap_ema = 1`)
    #[serde(default = "online")]
    pub refresh_from: TargetNet,
}

fn linear() -> InterpolantConfig {
    InterpolantConfig::Linear(NoParams {})
}
fn pd_stages() -> u32 {
    PD_STAGES
}
fn default_dropout() -> f64 {
    0.1
}
fn online() -> TargetNet {
    TargetNet::Online
}

impl ProgressiveConfig {
    /// Jumps of the step size each stage trains (h = 2^−k).
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Jump, prediction: Prediction::AverageVelocity }
    }

    pub fn new(steps_per_stage: u64) -> Self {
        Self { path: linear(), stages: PD_STAGES, steps_per_stage, teacher_cfg_scale: None, clip: None, label_dropout: 0.1, refresh_from: TargetNet::Online }
    }

    pub fn build(&self) -> anyhow::Result<ProgressiveDistillation> {
        self.path.validate()?;
        anyhow::ensure!((1..=30).contains(&self.stages), "stages must be in 1..=30, got {}", self.stages);
        anyhow::ensure!(self.steps_per_stage >= 1, "steps_per_stage must be >= 1");
        if let Some(w) = self.teacher_cfg_scale {
            anyhow::ensure!(w.is_finite(), "teacher_cfg_scale must be finite, got {w}");
        }
        if let Some(c) = self.clip {
            anyhow::ensure!(c > 0.0, "clip must be > 0, got {c}");
        }
        let dropout = LabelDropout::new(self.label_dropout);
        dropout.validate()?;
        Ok(ProgressiveDistillation { path: self.path.build(), stages: self.stages, steps_per_stage: self.steps_per_stage, teacher_cfg_scale: self.teacher_cfg_scale, clip: self.clip, dropout, refresh_from: self.refresh_from })
    }
}

#[derive(Debug)]
pub struct ProgressiveDistillation {
    pub path: Box<dyn Interpolant>,
    pub stages: u32,
    pub steps_per_stage: u64,
    pub teacher_cfg_scale: Option<f64>,
    pub clip: Option<f64>,
    pub dropout: LabelDropout,
    pub refresh_from: TargetNet,
}

impl ProgressiveDistillation {
    /// Stage at `step` (0-based), saturating at the last one.
    pub fn stage(&self, step: u64) -> u32 {
        ((step / self.steps_per_stage) as u32).min(self.stages - 1)
    }

    /// The student's level k (h = 2^−k) at `step`.
    pub fn level(&self, step: u64) -> u32 {
        self.stages - 1 - self.stage(step)
    }

    fn teacher_forward(&self, teacher: &dyn VelocityField, x: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, stage: u32) -> Tensor {
        match self.teacher_cfg_scale {
            Some(scale) if stage == 0 => Guided::new(teacher, scale).forward(x, t, h, class),
            _ => teacher.forward(x, t, h, class),
        }
    }
}

impl Objective for ProgressiveDistillation {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss {
        let teacher = nets.teacher.expect("progressive distillation needs a teacher (Nets::teacher)");
        let x = &batch.x;
        let (b, device, kind) = (x.size()[0], x.device(), x.kind());
        let stage = self.stage(step);
        let sections = 1i64 << self.level(step); // 2^k
        let h_val = 1.0 / sections as f64;
        // t = j·h, j ~ U{1, …, 2^k}.
        let j = Tensor::randint(sections, [b], (Kind::Int64, device)) + 1;
        let t = (j.to_kind(Kind::Double) * h_val).to_kind(kind);
        let eps = x.randn_like();
        let (class, _) = self.dropout.apply(&batch.class, nets.online.null_class());
        let x_t = self.path.interpolate(x, &eps, &t);
        let h = t.full_like(h_val);
        let half = t.full_like(h_val / 2.0);

        let target = tch::no_grad(|| {
            let u1 = self.teacher_forward(teacher, &x_t, &t, &half, &class, stage);
            let mut x_mid = &x_t - &u1 * (h_val / 2.0);
            if let Some(c) = self.clip {
                x_mid = x_mid.clamp(-c, c);
            }
            let u2 = self.teacher_forward(teacher, &x_mid, &(&t - h_val / 2.0), &half, &class, stage);
            (u1 + u2) / 2.0
        });
        let out = nets.online.forward(&x_t, &t, &h, &class);
        let value = (out - target).square().mean(None);
        Loss { metrics: vec![("pd_loss", value.detach()), ("pd_level", Tensor::from(self.level(step) as f32))], value }
    }

    fn needs_teacher(&self) -> bool {
        true
    }

    /// Copy the student into the teacher before the first step of every stage after the first
    /// (the code refreshes after loop index i with i % (max_steps // 7) == 0, `train.py` L311; its
    /// loop index starts at 2 while the step its targets read is 0 after loading, L174, L185 and
    /// L278, so its refresh comes one or two updates before its own stage boundary
    /// ⌈k·max_steps/7⌉; not reproduced here).
    fn refresh_teacher_at(&self, step: u64) -> bool {
        step > 0 && step.is_multiple_of(self.steps_per_stage) && step / self.steps_per_stage < self.stages as u64
    }

    fn teacher_refresh_source(&self) -> TargetNet {
        self.refresh_from
    }
}
