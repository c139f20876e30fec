//! flowmap-objectives: training objectives, one file per method, and the forward-mode `jvp` they
//! share. Every objective implements [`Objective`]: it draws its own noise, times and label
//! dropout from tch's global generator (which the training loop reseeds every step), builds its
//! targets and returns a scalar loss. [`ObjectiveConfig`] selects one from TOML (`kind = "..."`).
use flowmap_core::{InterpolantConfig, Prediction, RuleName, VelocityField};
use serde::{Deserialize, Serialize};
use tch::Tensor;

pub mod alpha_flow;
pub mod amed;
pub mod catalog;
pub mod consistency;
pub mod ddpm;
pub mod flow_matching;
pub mod improved_mean_flow;
pub mod jvp;
pub mod label_dropout;
pub mod live_reflow;
pub mod mean_flow;
pub mod progressive;
pub mod reflow;
pub mod scm;
pub mod shortcut;
pub mod split_mean_flow;
pub mod weighting;

pub use alpha_flow::{AlphaCurve, AlphaFlow, AlphaFlowConfig, AlphaSchedule};
pub use amed::{Amed, AmedConfig};
pub use catalog::{every_objective, Variant};
pub use consistency::{ConsistencyDistillation, ConsistencyDistillationConfig, ConsistencyTraining, ConsistencyTrainingConfig};
pub use ddpm::{Ddpm, DdpmObjectiveConfig, DdpmVariance};
pub use flow_matching::{FlowMatching, FlowMatchingConfig};
pub use improved_mean_flow::{ImfGuidance, ImprovedMeanFlow, ImprovedMeanFlowConfig};
pub use jvp::{default_fd_step, jvp, jvp_finite_difference, jvp_graph_free, JvpMode};
pub use label_dropout::{DropRows, LabelDropout};
pub use live_reflow::{LiveReflow, LiveReflowConfig, ReflowTarget};
pub use mean_flow::{MeanFlow, MeanFlowConfig, MeanFlowGuidance, MeanFlowTangent};
pub use progressive::{ProgressiveConfig, ProgressiveDistillation};
pub use reflow::{Reflow, ReflowConfig};
pub use scm::{Scm, ScmConfig, ScmTeacher, TangentNorm, TeacherPrediction};
pub use shortcut::{Shortcut, ShortcutConfig, ShortcutPreset};
pub use split_mean_flow::{SplitMeanFlow, SplitMeanFlowConfig};
pub use weighting::AdaptiveWeighting;

/// A training batch: `x` (B, C, H, W) or (B, D) data in the model's space; `class` (B,) Int64.
/// Unconditional data sets use the model's null class for every row. `noise` (shaped like `x`)
/// is set only for coupled data (reflow's stored (ε, x̂) pairs); objectives draw ε otherwise.
#[derive(Debug)]
pub struct Batch {
    pub x: Tensor,
    pub class: Tensor,
    pub noise: Option<Tensor>,
}

impl Batch {
    /// A batch of independent data (no stored noise).
    pub fn new(x: Tensor, class: Tensor) -> Self {
        Self { x, class, noise: None }
    }
    /// A batch of coupled (noise, sample) pairs.
    pub fn coupled(x: Tensor, class: Tensor, noise: Tensor) -> Self {
        Self { x, class, noise: Some(noise) }
    }
}

/// What an objective may call: the trained net, its EMA copy, and an optional frozen teacher.
#[derive(Clone, Copy)]
pub struct Nets<'a> {
    pub online: &'a dyn VelocityField,
    pub ema: &'a dyn VelocityField,
    pub teacher: Option<&'a dyn VelocityField>,
}

/// The scalar to back-propagate plus detached per-term values for logging (tensors, so logging
/// does not force a CPU–GPU sync every step).
pub struct Loss {
    pub value: Tensor,
    pub metrics: Vec<(&'static str, Tensor)>,
}

/// A training objective.
pub trait Objective: Send {
    /// Draws noise, times and label dropout; builds targets; returns the loss.
    /// `step` drives curricula (consistency-training resolution, progressive-distillation stages).
    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss;
    /// The metric of [`Loss::metrics`] that progress lines and `metrics.jsonl`'s `loss` show,
    /// when the optimised value itself says little (MeanFlow's adaptively weighted loss is about 1
    /// at every step by construction); `None` shows [`Loss::value`].
    fn reported_metric(&self) -> Option<&'static str> {
        None
    }
    /// Whether `loss` uses `nets.teacher` (the loop then requires one).
    fn needs_teacher(&self) -> bool {
        false
    }
    /// Whether `loss` calls the network with a guidance scale and interval as inputs
    /// ([`VelocityField::forward_guidance`]; improved MeanFlow with `guidance`): the model must
    /// take them (`model.guidance_conditioning = true`).
    fn needs_guidance_input(&self) -> bool {
        false
    }
    /// Whether the loss trains the run's network. `false` for objectives that learn only their
    /// own parameters around a frozen network (AMED's step predictor): the trainer then freezes
    /// the model, so neither the optimizer (weight decay included) nor the EMA changes it.
    fn trains_model(&self) -> bool {
        true
    }
    /// Whether every batch must carry stored (noise, sample) couplings (`Batch::noise`): two-stage
    /// reflow trains on pairs made by `flowmap reflow-pairs`.
    fn needs_coupled_data(&self) -> bool {
        false
    }
    /// Whether the loop must copy the student's weights into the teacher **before** computing the
    /// loss at `step` (progressive distillation's stage boundaries).
    fn refresh_teacher_at(&self, step: u64) -> bool {
        let _ = step;
        false
    }
    /// Which of the student's weights a refresh ([`Self::refresh_teacher_at`]) copies into the
    /// teacher: the online weights (default) or their EMA (the Shortcut code's progressive
    /// distillation, whose targets call the refreshed teacher's EMA).
    fn teacher_refresh_source(&self) -> TargetNet {
        TargetNet::Online
    }
    /// Rejects batch sizes that silently change the method (Shortcut: fewer bootstrap rows than
    /// levels, shortcut-models issue #11). The loop calls it once with its per-step batch size
    /// (per micro-batch when it accumulates).
    fn check_batch_size(&self, batch_size: i64) -> anyhow::Result<()> {
        anyhow::ensure!(batch_size >= 1, "batch size must be positive, got {batch_size}");
        Ok(())
    }
    /// Creates the objective's own trainable parameters under `root` (a learned loss weighting,
    /// for example), once, before training starts. The trainer optimises them with the model's
    /// optimizer, saves them in every checkpoint (`objective.safetensors`) and restores them on
    /// resume; `loss` uses them. The default owns none.
    fn init_params(&mut self, root: &tch::nn::Path) -> anyhow::Result<()> {
        let _ = root;
        Ok(())
    }
}

/// How an objective's trained network is meant to be sampled: the path it trains on (a sampler
/// must walk the same one), the rule its paper samples with, and what the output means (which
/// decides the other rules that may read it, [`Prediction::rules`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultSampler {
    pub path: InterpolantConfig,
    /// The `[objective]` key that sets `path`, for error messages ("objective.path").
    pub path_key: &'static str,
    pub rule: RuleName,
    pub prediction: Prediction,
}

/// Which network evaluates a self-generated target (always under no_grad).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetNet {
    /// The EMA copy θ̄ (consistency models; Shortcut code `bootstrap_ema = 1`).
    #[default]
    Ema,
    /// The current weights θ with a stop-gradient.
    Online,
}

impl TargetNet {
    /// The TOML spelling ("ema", "online").
    pub fn name(self) -> &'static str {
        match self {
            TargetNet::Ema => "ema",
            TargetNet::Online => "online",
        }
    }

    pub fn pick<'a>(self, nets: Nets<'a>) -> &'a dyn VelocityField {
        match self {
            TargetNet::Ema => nets.ema,
            TargetNet::Online => nets.online,
        }
    }
}

/// Every objective, selected in TOML by `kind`; each variant's table holds that method's
/// hyperparameters (defaults in the config structs' field comments).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ObjectiveConfig {
    FlowMatching(FlowMatchingConfig),
    Ddpm(DdpmObjectiveConfig),
    ConsistencyTraining(ConsistencyTrainingConfig),
    ConsistencyDistillation(ConsistencyDistillationConfig),
    ProgressiveDistillation(ProgressiveConfig),
    Reflow(ReflowConfig),
    LiveReflow(LiveReflowConfig),
    Shortcut(ShortcutConfig),
    MeanFlow(MeanFlowConfig),
    ImprovedMeanFlow(ImprovedMeanFlowConfig),
    AlphaFlow(AlphaFlowConfig),
    SplitMeanFlow(SplitMeanFlowConfig),
    ScmTraining(ScmConfig),
    ScmDistillation(ScmConfig),
    Amed(AmedConfig),
}

impl ObjectiveConfig {
    /// Validates and builds the objective.
    pub fn build(&self) -> anyhow::Result<Box<dyn Objective>> {
        Ok(match self {
            Self::FlowMatching(c) => Box::new(c.build()?),
            Self::Ddpm(c) => Box::new(c.build()?),
            Self::ConsistencyTraining(c) => Box::new(c.build()?),
            Self::ConsistencyDistillation(c) => Box::new(c.build()?),
            Self::ProgressiveDistillation(c) => Box::new(c.build()?),
            Self::Reflow(c) => Box::new(Reflow::from_config(c)?),
            Self::LiveReflow(c) => Box::new(c.build()?),
            Self::Shortcut(c) => Box::new(c.build()?),
            Self::MeanFlow(c) => Box::new(c.build()?),
            Self::ImprovedMeanFlow(c) => Box::new(c.build()?),
            Self::AlphaFlow(c) => Box::new(c.build()?),
            Self::SplitMeanFlow(c) => Box::new(c.build()?),
            Self::ScmTraining(c) => Box::new(c.build(false)?),
            Self::ScmDistillation(c) => Box::new(c.build(true)?),
            Self::Amed(c) => Box::new(c.build()?),
        })
    }

    /// The path, rule and output meaning the objective trains for (each objective's file says
    /// which).
    pub fn default_sampler(&self) -> DefaultSampler {
        match self {
            Self::FlowMatching(c) | Self::Reflow(c) => c.default_sampler(),
            Self::Ddpm(c) => c.default_sampler(),
            Self::ConsistencyTraining(c) => c.default_sampler(),
            Self::ConsistencyDistillation(c) => c.default_sampler(),
            Self::ProgressiveDistillation(c) => c.default_sampler(),
            Self::LiveReflow(c) => c.default_sampler(),
            Self::Shortcut(c) => c.default_sampler(),
            Self::MeanFlow(c) => c.default_sampler(),
            Self::ImprovedMeanFlow(c) => c.default_sampler(),
            Self::AlphaFlow(c) => c.default_sampler(),
            Self::SplitMeanFlow(c) => c.default_sampler(),
            Self::ScmTraining(c) | Self::ScmDistillation(c) => c.default_sampler(),
            Self::Amed(c) => c.default_sampler(),
        }
    }

    /// An explicit time grid the objective's paper samples with at its number of steps (sCM's
    /// 2-step grid through τ_mid = 1.1), used where `[sampling].time_grid` is not set; `None`
    /// for uniform grids.
    pub fn default_time_grid(&self) -> Option<Vec<f64>> {
        match self {
            Self::ScmTraining(c) | Self::ScmDistillation(c) => Some(c.default_time_grid()),
            _ => None,
        }
    }

    /// [`Self::build`] plus the objective's batch-size check (Shortcut's rows per level).
    pub fn build_for_batch(&self, batch_size: i64) -> anyhow::Result<Box<dyn Objective>> {
        let objective = self.build()?;
        objective.check_batch_size(batch_size)?;
        Ok(objective)
    }
}
