//! MeanFlow (Geng et al., arXiv 2505.13447; official Gsunshine/meanflow `meanflow.py`) and the two
//! model-tangent objectives of \[seed\] kexue.fm/archives/10958 (methods.md §12).
//! Loss: ‖F(x_t, t, h) + h·[J·(w, 1, 1)] − v_g‖², J the Jacobian of (z, t, h) ↦ F(z, t, h, c); w = v_g
//! (official, with sg on the JVP term) or the model's own F(x_t, t, 0) (with or without sg); per-sample
//! sums, adaptive weighting. Time: the official code already puts data at t = 0 (z_t = (1 − t)x + t·e);
//! it differentiates over (z, t, r) with tangent (v, 1, 0), here over (z, t, h = t − r) with (v, 1, 1).
use crate::jvp::{fp32_scope, validate_fd_step, JvpMode};
use crate::label_dropout::{null_classes, DropRows, LabelDropout};
use crate::weighting::{sum_per_sample, AdaptiveWeighting};
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use flowmap_core::time::MeanFlowPairsConfig;
use flowmap_core::{per_sample, Interpolant, InterpolantConfig, NoParams, PairSampler, PairSamplerConfig, Prediction, RuleName, VelocityField};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The x-direction of the JVP tangent: what stands in for dx_t/dt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeanFlowTangent {
    /// The (guided) conditional velocity v_g = ε − x (official MeanFlow; the seed's third objective).
    #[default]
    Conditional,
    /// The model's own instantaneous velocity F(x_t, t, 0, c) (the seed's first and second objectives;
    /// one extra forward pass).
    Model,
}

/// Guidance folded into the training target (MeanFlow §4.2, `guidance_fn`, methods.md §12.4):
/// v_g = ω·v + (1 − ω − κ)·F(x_t, t, 0 | ∅) + κ·F(x_t, t, 0 | c) for t in [t_start, t_end], v_g = v
/// elsewhere and on label-dropped rows. Effective sampling scale ω/(1 − κ).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeanFlowGuidance {
    /// default 1.0 (official B/4 default)
    pub omega: f64,
    /// default 0.5 (official B/4 default); 0 skips the conditional pass
    pub kappa: f64,
    pub t_start: f64, // default 0
    /// default 1
    pub t_end: f64,
}

impl Default for MeanFlowGuidance {
    fn default() -> Self {
        Self { omega: 1.0, kappa: 0.5, t_start: 0.0, t_end: 1.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeanFlowConfig {
    /// default linear (the identity holds for any path: v = α̇x + σ̇ε)
    pub path: InterpolantConfig,
    /// equal_fraction (0.75, share with r = t), times (logit-normal −0.4, 1.0)
    pub times: MeanFlowPairsConfig,
    /// conditional | model; default conditional (official)
    pub tangent: MeanFlowTangent,
    /// sg on the JVP term; default true (official)
    pub stop_gradient: bool,
    /// one_pass | graph_free | finite_difference; default one_pass
    pub jvp_mode: JvpMode,
    /// finite_difference only: the central-difference step; default by dtype (1e-4 f64, 5e-3 f32)
    pub jvp_fd_step: Option<f64>,
    /// power (1.0), c (0.01)
    pub weighting: AdaptiveWeighting,
    pub guidance: Option<MeanFlowGuidance>, // default none (v_g = v)
    /// default 0.1
    pub label_dropout: f64,
    /// random | leading; default leading (official `cond_drop`)
    pub label_dropout_rows: DropRows,
}

impl Default for MeanFlowConfig {
    fn default() -> Self {
        Self {
            path: InterpolantConfig::Linear(NoParams {}),
            times: MeanFlowPairsConfig::default(),
            tangent: MeanFlowTangent::Conditional,
            stop_gradient: true,
            jvp_mode: JvpMode::OnePass,
            jvp_fd_step: None,
            weighting: AdaptiveWeighting::default(),
            guidance: None,
            label_dropout: 0.1,
            label_dropout_rows: DropRows::Leading,
        }
    }
}

impl MeanFlowConfig {
    /// The MeanFlow sampler: jumps with the average velocity (methods.md §12.5).
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Jump, prediction: Prediction::AverageVelocity }
    }

    /// The seed's first objective: model tangent, no stop-gradient (second-order gradient).
    pub fn model_tangent_full() -> Self {
        Self { tangent: MeanFlowTangent::Model, stop_gradient: false, ..Self::default() }
    }
    /// The seed's second objective: model tangent, stop-gradient on the JVP term.
    pub fn model_tangent_stop_gradient() -> Self {
        Self { tangent: MeanFlowTangent::Model, stop_gradient: true, ..Self::default() }
    }

    pub fn build(&self) -> anyhow::Result<MeanFlow> {
        self.path.validate()?;
        let pairs = PairSamplerConfig::MeanFlow(self.times.clone());
        pairs.validate()?;
        self.weighting.validate()?;
        anyhow::ensure!(self.stop_gradient || self.jvp_mode.differentiable(), "mean_flow: stop_gradient = false needs jvp_mode = \"one_pass\" (the gradient flows through the JVP), not \"{}\"", self.jvp_mode.name());
        validate_fd_step(self.jvp_fd_step, "objective.jvp_fd_step")?;
        if let Some(g) = self.guidance {
            anyhow::ensure!(g.omega.is_finite() && g.kappa.is_finite() && g.kappa < 1.0, "mean_flow: need finite omega and kappa < 1");
            anyhow::ensure!(0.0 <= g.t_start && g.t_start <= g.t_end && g.t_end <= 1.0, "mean_flow: need 0 <= t_start <= t_end <= 1");
        }
        let dropout = LabelDropout { p: self.label_dropout, rows: self.label_dropout_rows };
        dropout.validate()?;
        Ok(MeanFlow { path: self.path.build(), pairs: pairs.build(), tangent: self.tangent, stop_gradient: self.stop_gradient, jvp_mode: self.jvp_mode, jvp_fd_step: self.jvp_fd_step, weighting: self.weighting, guidance: self.guidance, dropout })
    }
}

#[derive(Debug)]
pub struct MeanFlow {
    pub path: Box<dyn Interpolant>,
    pub pairs: Box<dyn PairSampler>,
    pub tangent: MeanFlowTangent,
    pub stop_gradient: bool,
    pub jvp_mode: JvpMode,
    pub jvp_fd_step: Option<f64>,
    pub weighting: AdaptiveWeighting,
    pub guidance: Option<MeanFlowGuidance>,
    pub dropout: LabelDropout,
}

impl MeanFlow {
    /// v_g from v (no_grad; extra forwards at h = 0 with the online net, as the official code).
    fn guided_velocity(&self, net: &dyn VelocityField, x_t: &Tensor, t: &Tensor, v: &Tensor, class: &Tensor) -> Tensor {
        let Some(g) = self.guidance else { return v.shallow_clone() };
        tch::no_grad(|| {
            let zeros = t.zeros_like();
            let n = t.size()[0];
            let inside = t.ge(g.t_start).logical_and(&t.le(g.t_end));
            let omega = t.full_like(g.omega).where_self(&inside, &t.ones_like());
            let kappa = t.full_like(g.kappa).where_self(&inside, &t.zeros_like());
            let u_null = net.forward(x_t, t, &zeros, &null_classes(n, net.null_class(), t.device()));
            let mut v_g = per_sample(&omega, v) * v + per_sample(&(-&omega - &kappa + 1.0), v) * &u_null;
            if g.kappa != 0.0 {
                let u_cond = net.forward(x_t, t, &zeros, class);
                v_g = v_g + per_sample(&kappa, v) * u_cond;
            }
            v_g
        })
    }
}

/// What the flow-map objectives (MeanFlow, improved MeanFlow, SplitMeanFlow) draw first, in the
/// official code's order: times (t, r) from the pair sampler, then ε; t, h = t − r, x_t on the
/// path and the conditional velocity v.
pub(crate) struct FlowMapDraw {
    pub t: Tensor,
    pub h: Tensor,
    pub x_t: Tensor,
    pub v: Tensor,
}

impl FlowMapDraw {
    pub fn new(path: &dyn Interpolant, pairs: &dyn PairSampler, x: &Tensor) -> Self {
        let kind = x.kind();
        let pair = pairs.sample(x.size()[0], x.device());
        let (t, r) = (pair.t.to_kind(kind), pair.r.to_kind(kind));
        let h = &t - &r;
        let eps = x.randn_like();
        let x_t = path.interpolate(x, &eps, &t);
        let v = path.velocity(x, &eps, &t);
        Self { t, h, x_t, v }
    }
}

impl Objective for MeanFlow {
    fn reported_metric(&self) -> Option<&'static str> {
        Some("mf_loss_unweighted")
    }
    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let net = nets.online;
        let x = &batch.x;
        let FlowMapDraw { t, h, x_t, v } = FlowMapDraw::new(self.path.as_ref(), self.pairs.as_ref(), x);
        let device = x.device();

        // Guidance uses the true labels; dropped rows then get ∅ and the unguided v (`cond_drop`).
        let v_g = self.guided_velocity(net, &x_t, &t, &v, &batch.class);
        let (class, dropped) = self.dropout.apply(&batch.class, net.null_class());
        let v_g = match &dropped {
            Some(mask) => v.where_self(&per_sample(mask, &v), &v_g),
            None => v_g,
        };

        let w = match self.tangent {
            MeanFlowTangent::Conditional => v_g.shallow_clone(),
            MeanFlowTangent::Model if self.stop_gradient => tch::no_grad(|| net.forward(&x_t, &t, &t.zeros_like(), &class)),
            MeanFlowTangent::Model => net.forward(&x_t, &t, &t.zeros_like(), &class),
        };
        let f = |p: &[Tensor]| Ok(net.forward(&p[0], &p[1], &p[2], &class));
        let primals = [x_t.shallow_clone(), t.shallow_clone(), h.shallow_clone()];
        let tangents = [w, t.ones_like(), t.ones_like()];
        let (u, du_dt) = {
            let _fp32 = fp32_scope(device);
            self.jvp_mode.primal_and_jvp(f, &primals, &tangents, self.jvp_fd_step).expect("mean_flow: jvp")
        };

        let err = if self.stop_gradient {
            // u_tgt = sg[v_g − clip(h, 0, 1)·du/dt] (official).
            let u_tgt = (&v_g - per_sample(&h.clamp(0.0, 1.0), &du_dt) * du_dt.detach()).detach();
            &u - u_tgt
        } else {
            &u + per_sample(&h, &du_dt) * &du_dt - &v_g
        };
        let per_row = sum_per_sample(&err.square()); // (B,)
        let value = self.weighting.weighted_mean(&per_row);
        Loss { metrics: vec![("mf_loss_unweighted", per_row.mean(None).detach()), ("mf_loss", value.detach())], value }
    }
}
