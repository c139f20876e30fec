//! Every objective, by name: the `kind` of each [`ObjectiveConfig`] variant, and one list of
//! configured variants (each method's official settings and its notable options) that tests and
//! benchmarks iterate, so a new objective is added to all of them at once.
use crate::*;

impl ObjectiveConfig {
    /// Every `kind` an `[objective]` table can name (one per variant of [`ObjectiveConfig`]).
    pub const KINDS: [&'static str; 10] = ["flow_matching", "ddpm", "consistency_training", "consistency_distillation", "progressive_distillation", "reflow", "live_reflow", "shortcut", "mean_flow", "amed"];

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
}

/// Every objective kind with its official settings and notable options (guided teachers and
/// rollouts, both Shortcut settings, every MeanFlow tangent and JVP mode).
pub fn every_objective() -> Vec<Variant> {
    use ObjectiveConfig as O;
    let v = |name, config, step| Variant { name, config, step, learned_variance: false };
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
        v("mean_flow_graph_free", O::MeanFlow(MeanFlowConfig { jvp_mode: JvpMode::GraphFree, ..Default::default() }), 0),
        v("mean_flow_model_tangent_sg", O::MeanFlow(MeanFlowConfig::model_tangent_stop_gradient()), 0),
        v("mean_flow_model_tangent_full", O::MeanFlow(MeanFlowConfig::model_tangent_full()), 0),
        v("amed", O::Amed(AmedConfig { steps: vec![1, 2], teacher_substeps: 1, ..Default::default() }), 0),
    ]
}
