//! SplitMeanFlow (Guo et al., ByteDance Seed, arXiv 2507.16884; methods.md §1.2 and §14): the
//! JVP-free flow-map objective. It trains the interval-splitting identity instead of MeanFlow's
//! differential one: for r < s < t,
//!
//! ```text
//! (t − r)·u(z_t, r, t) = (s − r)·u(z_s, r, s) + (t − s)·u(z_t, s, t),   z_s = z_t − (t − s)·u(z_t, s, t)
//! ```
//!
//! In flowmap's (t, h) coordinates, with λ ~ U[0, 1] and s = t − λ·h (the paper's
//! s = (1 − λ)·t + λ·r):
//!
//! ```text
//! u₂ = F(x_t, t, λh)          z_s = x_t − λh·u₂          u₁ = F(z_s, t − λh, (1 − λ)h)
//! L  = Σ_pixels (F(x_t, t, h) − sg[(1 − λ)·u₁ + λ·u₂])²   on rows with r < t
//! L  = Σ_pixels (F(x_t, t, 0) − v)²                        on the r = t rows (the boundary
//!                                                            condition u(z_t, t, t) = v, FM)
//! ```
//!
//! Why SplitMeanFlow rather than SoFlow (arXiv 2512.15657): its whole definition is one algebraic
//! identity of the flow map (the one methods.md §1.2 already states, of which Shortcut's
//! self-consistency is the h₁ = h₂ dyadic case) plus flow matching as the boundary condition; there
//! are no extra loss terms, schedules or network heads to reconstruct, so what is implemented is
//! what the paper defines, and its fixed point (the exact average velocity) is testable in closed
//! form (zero residual). SoFlow's official code could not be read from here, so its losses and
//! defaults could not be confirmed.
//!
//! Sources and what is \[unverified\]: SplitMeanFlow has **no official code release**. The identity
//! ("interval splitting consistency") and the JVP-free training it motivates were read
//! in the paper's abstract and in secondary summaries; the algorithm box itself (paper Algorithm 1)
//! could not be read here. So these are flowmap's choices, to check against the PDF: λ ~ U[0, 1];
//! a stop-gradient on the whole split target, evaluated by the online net (`target_net`); (t, r)
//! from MeanFlow's pairs (logit-normal(−0.4, 1), t = max, r = min) with half the rows r = t
//! (`times`); a plain mean of per-sample sums (`weighting`). The paper's results are on speech
//! synthesis; no image-generation settings were found.
use crate::label_dropout::{DropRows, LabelDropout};
use crate::mean_flow::FlowMapDraw;
use crate::weighting::{sum_per_sample, AdaptiveWeighting};
use crate::{Batch, DefaultSampler, Loss, Nets, Objective, TargetNet};
use flowmap_core::time::MeanFlowPairsConfig;
use flowmap_core::{per_sample, Interpolant, InterpolantConfig, NoParams, PairSampler, PairSamplerConfig, Prediction, RuleName};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitMeanFlowConfig {
    /// default linear
    pub path: InterpolantConfig,
    /// equal_fraction (0.5: the r = t flow-matching rows), times (logit-normal −0.4, 1.0)
    pub times: MeanFlowPairsConfig,
    /// which weights evaluate the split target under no_grad: online (default, the paper's
    /// stop-gradient) | ema
    pub target_net: TargetNet,
    /// power, c; default none (plain mean of per-sample sums)
    pub weighting: AdaptiveWeighting,
    /// default 0.1
    pub label_dropout: f64,
    /// random | leading; default random
    pub label_dropout_rows: DropRows,
}

impl Default for SplitMeanFlowConfig {
    fn default() -> Self {
        Self {
            path: InterpolantConfig::Linear(NoParams {}),
            times: MeanFlowPairsConfig { equal_fraction: 0.5, ..Default::default() },
            target_net: TargetNet::Online,
            weighting: AdaptiveWeighting::none(),
            label_dropout: 0.1,
            label_dropout_rows: DropRows::Random,
        }
    }
}

impl SplitMeanFlowConfig {
    /// Jumps with the average velocity.
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Jump, prediction: Prediction::AverageVelocity }
    }

    pub fn build(&self) -> anyhow::Result<SplitMeanFlow> {
        self.path.validate()?;
        let pairs = PairSamplerConfig::MeanFlow(self.times.clone());
        pairs.validate()?;
        self.weighting.validate()?;
        let dropout = LabelDropout { p: self.label_dropout, rows: self.label_dropout_rows };
        dropout.validate()?;
        Ok(SplitMeanFlow { path: self.path.build(), pairs: pairs.build(), target_net: self.target_net, weighting: self.weighting, dropout })
    }
}

#[derive(Debug)]
pub struct SplitMeanFlow {
    pub path: Box<dyn Interpolant>,
    pub pairs: Box<dyn PairSampler>,
    pub target_net: TargetNet,
    pub weighting: AdaptiveWeighting,
    pub dropout: LabelDropout,
}

impl Objective for SplitMeanFlow {
    fn reported_metric(&self) -> Option<&'static str> {
        Some("split_loss_unweighted")
    }

    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let net = nets.online;
        let x = &batch.x;
        let FlowMapDraw { t, h, x_t, v } = FlowMapDraw::new(self.path.as_ref(), self.pairs.as_ref(), x);
        let kind = x.kind();
        let (class, _) = self.dropout.apply(&batch.class, net.null_class());
        let lambda = t.rand_like();

        let split = h.gt(0.0); // (B,)
        let target = tch::no_grad(|| {
            let target_net = self.target_net.pick(nets);
            let h2 = &h * &lambda; // t − s
            let h1 = &h - &h2; // s − r
            let u2 = target_net.forward(&x_t, &t, &h2, &class);
            let z_s = &x_t - per_sample(&h2, &u2) * &u2;
            let u1 = target_net.forward(&z_s, &(&t - &h2), &h1, &class);
            let split_target = per_sample(&(-&lambda + 1.0), &u1) * u1 + per_sample(&lambda, &u2) * u2;
            split_target.where_self(&per_sample(&split, &v), &v)
        });
        let u = net.forward(&x_t, &t, &h, &class);
        let per_row = sum_per_sample(&(&u - target).square()); // (B,)
        let value = self.weighting.weighted_mean(&per_row);
        let fm_rows = split.logical_not().to_kind(kind);
        let split_rows = split.to_kind(kind);
        let mean_over = |rows: &tch::Tensor| (&per_row * rows).sum(kind) / rows.sum(kind).clamp_min(1.0);
        let metrics = vec![("split_loss_unweighted", per_row.mean(None).detach()), ("split_consistency_loss", mean_over(&split_rows).detach()), ("split_flow_loss", mean_over(&fm_rows).detach()), ("split_loss", value.detach())];
        Loss { value, metrics }
    }
}
