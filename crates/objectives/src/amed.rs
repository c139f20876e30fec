//! AMED (Zhou et al. 2024, arXiv 2312.00094; zju-pi/diff-sampler `amed-solver-main/training/`):
//! trains the step predictor of [`flowmap_core::amed`] post hoc on a frozen flow-matching teacher.
//! Loss: Σ_n mean((AMED step t_n → t_{n+1} from x_n) − x^tea_{n+1})², over each configured step
//! count, where x^tea is the teacher's trajectory from the same noise with `teacher_substeps`
//! extra Heun steps inside every student step (official `M`, teacher `heun`) and x_n is the
//! student's own previous output (detached, as sampling will see it).
//! Time: t = 1 noise → 0 data (the official code walks EDM's sigma down; see core's `amed.rs`).
//! Deviations: the official loop takes one optimizer step per student step and trains one step
//! count per predictor; here one loss sums every step of every count in `steps` (one predictor
//! for all of them, the step pair (t, r) is its input), and each batch draws fresh noise (the
//! data batch only gives the shape and the labels, as in the official code, which uses no data).
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use flowmap_core::{amed_step, sample, AmedPredictor, GridKind, Interpolant, InterpolantConfig, NoParams, Prediction, RuleName, StepRule};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Extra teacher steps per student step: the official `train.py` default `--M 1` (teacher
/// `heun`); flowmap's teacher is Heun on a uniform subdivision of each student step.
pub const AMED_TEACHER_SUBSTEPS: usize = 1;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmedConfig {
    /// the path the teacher was trained on; default linear
    #[serde(default = "linear")]
    pub path: InterpolantConfig,
    /// student step counts trained together (NFE = 2·steps each); default [1, 2, 4]
    #[serde(default = "default_steps")]
    pub steps: Vec<usize>,
    /// the student's grid for each step count (as `[sampling] grid`); default uniform
    #[serde(default)]
    pub grid: GridKind,
    /// extra Heun teacher steps inside each student step (official `M`); default 1
    #[serde(default = "default_substeps")]
    pub teacher_substeps: usize,
}

fn linear() -> InterpolantConfig {
    InterpolantConfig::Linear(NoParams {})
}
fn default_steps() -> Vec<usize> {
    vec![1, 2, 4]
}
fn default_substeps() -> usize {
    AMED_TEACHER_SUBSTEPS
}

impl Default for AmedConfig {
    fn default() -> Self {
        Self { path: linear(), steps: default_steps(), grid: GridKind::Uniform, teacher_substeps: AMED_TEACHER_SUBSTEPS }
    }
}

impl AmedConfig {
    /// The `amed` rule on the teacher's path; the run's network is the frozen velocity teacher
    /// (copied by `[teacher] init_student = true`), so the velocity rules read it too.
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Amed, prediction: Prediction::Velocity }
    }

    pub fn build(&self) -> anyhow::Result<Amed> {
        self.path.validate()?;
        anyhow::ensure!(!self.steps.is_empty() && self.steps.iter().all(|&s| (1..=32).contains(&s)), "objective.steps = {:?}: must be a non-empty list of step counts in 1..=32", self.steps);
        anyhow::ensure!(self.teacher_substeps <= 64, "objective.teacher_substeps = {}: must be <= 64", self.teacher_substeps);
        self.grid.validate().map_err(|e| anyhow::anyhow!("objective.grid: {e}"))?;
        Ok(Amed { path: self.path.build(), steps: self.steps.clone(), grid: self.grid, teacher_substeps: self.teacher_substeps, predictor: None })
    }
}

#[derive(Debug)]
pub struct Amed {
    pub path: Box<dyn Interpolant>,
    pub steps: Vec<usize>,
    pub grid: GridKind,
    pub teacher_substeps: usize,
    /// Created by [`Objective::init_params`].
    pub predictor: Option<AmedPredictor>,
}

impl Amed {
    /// The trained predictor (after `init_params`).
    pub fn predictor(&self) -> Option<&AmedPredictor> {
        self.predictor.as_ref()
    }
}

impl Objective for Amed {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let teacher = nets.teacher.expect("amed needs a teacher (Nets::teacher)");
        let predictor = self.predictor.as_ref().expect("amed: init_params creates the predictor before the first loss");
        let eps = batch.x.randn_like();
        let class = &batch.class;
        let mut total = Tensor::zeros([], (tch::Kind::Float, eps.device()));
        let mut terms = 0usize;
        for &k in &self.steps {
            let grid = self.grid.times(self.path.as_ref(), k);
            // The teacher's states at the student's grid times (no_grad: the teacher is frozen).
            let targets: Vec<Tensor> = tch::no_grad(|| {
                let mut x = eps.copy();
                grid.windows(2)
                    .map(|w| {
                        let m = self.teacher_substeps + 1;
                        let sub: Vec<f64> = (0..=m).map(|j| if j == m { w[1] } else { w[0] + (w[1] - w[0]) * j as f64 / m as f64 }).collect();
                        x = sample(teacher, self.path.as_ref(), x.shallow_clone(), class, &sub, StepRule::Heun);
                        x.copy()
                    })
                    .collect()
            });
            let mut x = eps.shallow_clone();
            for (w, target) in grid.windows(2).zip(&targets) {
                let next = amed_step(teacher, predictor, &x, w[0], w[1], class);
                total = total + (&next - target).square().mean(tch::Kind::Float);
                terms += 1;
                x = next.detach();
            }
        }
        let value = total / terms.max(1) as f64;
        Loss { metrics: vec![("amed_loss", value.detach())], value }
    }

    fn needs_teacher(&self) -> bool {
        true
    }

    fn trains_model(&self) -> bool {
        false
    }

    fn init_params(&mut self, root: &tch::nn::Path) -> anyhow::Result<()> {
        self.predictor = Some(AmedPredictor::new(&(root / AMED_PARAMS)));
        Ok(())
    }
}

/// The folder of the predictor's parameters under the objective's root (`amed.enc0.weight`, …).
pub const AMED_PARAMS: &str = "amed";
