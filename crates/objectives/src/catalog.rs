//! Every objective, by name: the `kind` of each [`ObjectiveConfig`] variant, and one list of
//! configured variants (each method's official settings and its notable options) that tests and
//! benchmarks iterate, so a new objective is added to all of them at once.
use crate::*;

impl ObjectiveConfig {
    /// Every `kind` an `[objective]` table can name (one per variant of [`ObjectiveConfig`]).
    pub const KINDS: [&'static str; 15] = [
        "flow_matching",
        "ddpm",
        "consistency_training",
        "consistency_distillation",
        "progressive_distillation",
        "reflow",
        "live_reflow",
        "shortcut",
        "mean_flow",
        "improved_mean_flow",
        "alpha_flow",
        "split_mean_flow",
        "scm_training",
        "scm_distillation",
        "amed",
    ];

    /// The `kind` of this config, as TOML writes it. A new variant must be named here and in
    /// [`Self::KINDS`] (the match is exhaustive; `tests/config.rs` checks the list covers KINDS).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::FlowMatching(_) => "flow_matching",
            Self::Ddpm(_) => "ddpm",
            Self::ConsistencyTraining(_) => "consistency_training",
            Self::ConsistencyDistillation(_) => "consistency_distillation",
            Self::ProgressiveDistillation(_) => "progressive_distillation",
            Self::Reflow(_) => "reflow",
            Self::LiveReflow(_) => "live_reflow",
            Self::Shortcut(_) => "shortcut",
            Self::MeanFlow(_) => "mean_flow",
            Self::ImprovedMeanFlow(_) => "improved_mean_flow",
            Self::AlphaFlow(_) => "alpha_flow",
            Self::SplitMeanFlow(_) => "split_mean_flow",
            Self::ScmTraining(_) => "scm_training",
            Self::ScmDistillation(_) => "scm_distillation",
            Self::Amed(_) => "amed",
        }
    }
}

/// One configured objective of [`every_objective`].
#[derive(Debug, Clone)]
pub struct Variant {
    /// Unique, for test and benchmark output.
    pub name: &'static str,
    pub config: ObjectiveConfig,
    /// A training step to evaluate the loss at (curricula: consistency training's late stage).
    pub step: u64,
    /// The network must predict a variance too (DDPM with learned variance: 2× output channels).
    pub learned_variance: bool,
    /// The network must take a guidance scale and interval as inputs (improved MeanFlow's
    /// official setting; DiT `guidance_conditioning`).
    pub guidance_input: bool,
}

/// Every objective kind with its official settings and notable options (guided teachers and
/// rollouts, both Shortcut settings, every MeanFlow tangent and JVP mode).
pub fn every_objective() -> Vec<Variant> {
    use ObjectiveConfig as O;
    let v = |name, config, step| Variant { name, config, step, learned_variance: false, guidance_input: false };
    vec![
        v("flow_matching", O::FlowMatching(FlowMatchingConfig::default()), 0),
        v("ddpm", O::Ddpm(DdpmObjectiveConfig::default()), 0),
        Variant { learned_variance: true, ..v("ddpm_learned_variance", O::Ddpm(DdpmObjectiveConfig { variance: DdpmVariance::Learned, ..Default::default() }), 0) },
        v("consistency_training", O::ConsistencyTraining(ConsistencyTrainingConfig::shortcut_code(700)), 650),
        v("consistency_distillation", O::ConsistencyDistillation(ConsistencyDistillationConfig::default()), 0),
        v("progressive_distillation", O::ProgressiveDistillation(ProgressiveConfig { teacher_cfg_scale: Some(1.5), ..ProgressiveConfig::new(100) }), 0),
        v("reflow", O::Reflow(ReflowConfig::default()), 0),
        v("live_reflow", O::LiveReflow(LiveReflowConfig { rollout_cfg_scale: Some(1.5), ..Default::default() }), 0),
        v("shortcut_paper", O::Shortcut(ShortcutConfig::paper()), 0),
        v("shortcut_official_code", O::Shortcut(ShortcutConfig::official_code()), 0),
        v("mean_flow", O::MeanFlow(MeanFlowConfig::default()), 0),
        v("mean_flow_guided", O::MeanFlow(MeanFlowConfig { guidance: Some(MeanFlowGuidance::default()), ..Default::default() }), 0),
        v("mean_flow_graph_free", O::MeanFlow(MeanFlowConfig { jvp_mode: JvpMode::GraphFree, ..Default::default() }), 20_000),
        v("mean_flow_finite_difference", O::MeanFlow(MeanFlowConfig { jvp_mode: JvpMode::FiniteDifference, ..Default::default() }), 0),
        v("mean_flow_model_tangent_sg", O::MeanFlow(MeanFlowConfig::model_tangent_stop_gradient()), 0),
        v("mean_flow_model_tangent_full", O::MeanFlow(MeanFlowConfig::model_tangent_full()), 0),
        v("improved_mean_flow", O::ImprovedMeanFlow(ImprovedMeanFlowConfig::default()), 0),
        Variant { guidance_input: true, ..v("improved_mean_flow_guided", O::ImprovedMeanFlow(ImprovedMeanFlowConfig::official()), 0) },
        v("improved_mean_flow_finite_difference", O::ImprovedMeanFlow(ImprovedMeanFlowConfig { jvp_mode: JvpMode::FiniteDifference, ..Default::default() }), 0),
        v("alpha_flow_trajectory_fm", O::AlphaFlow(AlphaFlowConfig::default()), 0),
        v("alpha_flow_mid_curriculum", O::AlphaFlow(AlphaFlowConfig { guidance: Some(MeanFlowGuidance::default()), label_dropout: 0.1, target_clip: Some(4.0), ..Default::default() }), 200_000),
        v("alpha_flow_mean_flow_end", O::AlphaFlow(AlphaFlowConfig::default()), 400_000),
        v("alpha_flow_end_finite_difference", O::AlphaFlow(AlphaFlowConfig { jvp_mode: JvpMode::FiniteDifference, ..Default::default() }), 400_000),
        v("split_mean_flow", O::SplitMeanFlow(SplitMeanFlowConfig::default()), 0),
        v("scm_training", O::ScmTraining(ScmConfig::default()), 20_000),
        v("scm_training_graph_free", O::ScmTraining(ScmConfig { jvp_mode: JvpMode::GraphFree, ..Default::default() }), 20_000),
        v("scm_training_finite_difference", O::ScmTraining(ScmConfig { jvp_mode: JvpMode::FiniteDifference, ..Default::default() }), 20_000),
        v("scm_distillation", O::ScmDistillation(ScmConfig::default()), 20_000),
        v(
            "scm_distillation_guided_eps_teacher",
            O::ScmDistillation(ScmConfig { teacher_prediction: Some(TeacherPrediction::Eps), teacher_path: Some(InterpolantConfig::VpCosine(Default::default())), teacher_cfg_scale: Some(1.5), ..Default::default() }),
            20_000,
        ),
        v("amed", O::Amed(AmedConfig { steps: vec![1, 2], teacher_substeps: 1, ..Default::default() }), 0),
    ]
}
