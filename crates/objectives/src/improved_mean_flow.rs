//! Improved MeanFlow, iMF (Geng et al., arXiv 2512.02012; official JAX code Lyy-iiis/imeanflow
//! @bf60cd7, `imf.py` `iMeanFlow.forward`, `guidance_fn`, `sample_cfg_scale`, `sample_cfg_interval`,
//! `models/imfDiT.py`; methods.md §14).
//!
//! The loss is a v-loss on the code's "compound function" V: with (u, du/dt) the JVP of
//! (z, t, h) ↦ F(z, t, h | ω, t_min, t_max, c) along the **model's own** velocity v̂_c (not ε − x),
//!
//! ```text
//! V      = u + h·sg[du/dt]                       (so V → v as the model becomes a flow map)
//! L_u    = Σ_pixels (V − sg[v_g])²               adaptive weighting p = 1, c = 0.01 (`adp_wt_fn`)
//! L_v    = Σ_pixels (v̂ − sg[v_g])²               the auxiliary v term, same weighting
//! loss   = mean_i (L_u + L_v)
//! ```
//!
//! Guidance as a network input (`guidance`, official default): each row draws a CFG scale ω from
//! the power law of `sample_cfg_scale` (β = 1: ω = (1 + ω_max)^U, U ~ U[0, 1], ω_max = 7) and an
//! interval t_min ~ U[0, 0.5], t_max ~ U[0.5, 1] (r = t rows: [0, 1]); the network is conditioned
//! on (1 − 1/ω, t_min, t_max) (DiT option `guidance_conditioning`). With v̂(·|ω, y) the network at
//! h = 0 and interval [0, 1], all under no_grad:
//!
//! ```text
//! v_g(r = t rows) = v + (1 − 1/ω)·(v̂(ω | y) − v̂(1 | ∅))
//! v_g(other rows) = v + (1 − 1/ω')·(v̂(ω' | y) − v̂(1 | ∅)),   ω' = ω on [t_min, t_max], 1 outside
//! tangent v̂_c    = v̂(ω' | y)
//! ```
//!
//! The fixed point of the v term is v̂(ω) = ω·v_c + (1 − ω)·v_∅ [derived: solve
//! v̂ = v_c + (1 − 1/ω)(v̂ − v_∅)]: the network learns CFG at every ω and is sampled with one pass,
//! the scale and interval as inputs (`sampling.cfg_scale`, `sampling.cfg_interval`; official B/2
//! eval: ω = 7.5 on [0.4, 0.65] in `train_config.yml`, 8.0 in `eval_config.yml`). Without
//! `guidance` (the default here) ω ≡ 1, v_g = v, and any network works.
//!
//! Times: logit-normal(−0.4, 1.0) pairs, t = max, r = min, the first 50 % of rows r = t
//! (`data_proportion = 0.5`). Labels: the first ⌊Binomial⌋ rows dropped with p = 0.1 (`cond_drop`),
//! dropped rows get v_g = v (the tangent stays v̂(ω' | y), as in the code).
//!
//! Where flowmap differs from the official code (and why):
//! * **The v head.** imfDiT has a second head (the last `aux_head_depth = 8` blocks duplicated) that
//!   outputs v̂ at every h; here v̂ is the same network at h = 0 — flowmap's convention
//!   u(x, t, 0) = v — so L_v costs one extra forward at h = 0 rather than a second head, and on
//!   r = t rows L_u and L_v coincide. No extra parameters, no "v head dropped at eval".
//! * **Conditioning.** imfDiT prepends in-context tokens (class ×8, ω ×4, t_min ×2, t_max ×2, h ×4),
//!   uses RoPE, and does not embed t at all (only h); flowmap's DiT adds the three guidance
//!   embeddings to its adaLN vector beside t, h and the class.
//! * **Time convention.** The code differentiates u(z, t, r) along (v̂_c, 1, 0); here
//!   F(z, t, h = t − r) along (v̂_c, 1, 1) — the same derivative.
//! * Paper vs code: the equations here follow the code (the PDF was not read for this port); the
//!   code's tangent `v_c` is the interval-masked, ω-conditioned prediction for the row's own label
//!   (before dropout), its unconditional pass uses ω = 1, and its r = t rows ignore the interval
//!   when forming v_g — all kept.
use crate::jvp::fp32_scope;
use crate::jvp::{validate_fd_step, JvpMode};
use crate::label_dropout::{null_classes, DropRows, LabelDropout};
use crate::mean_flow::FlowMapDraw;
use crate::weighting::{sum_per_sample, AdaptiveWeighting};
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use flowmap_core::time::MeanFlowPairsConfig;
use flowmap_core::{per_sample, GuidanceInput, Interpolant, InterpolantConfig, NoParams, PairSampler, PairSamplerConfig, Prediction, RuleName, VelocityField};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The CFG scale and interval drawn per training row (`sample_cfg_scale`, `sample_cfg_interval`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImfGuidance {
    /// ω ∈ [1, 1 + scale_max]; default 7 (`s_max = 7.0`)
    pub scale_max: f64,
    /// β of the power law (`cfg_beta`): ω = (1 + (1 + ω_max)^(1−β)·U − U)^(1/(1−β)), β = 1 the
    /// log-uniform limit ω = (1 + ω_max)^U; default 1
    pub scale_beta: f64,
    /// t_min ~ U[t_min_range]; default [0, 0.5]
    pub t_min_range: [f64; 2],
    /// t_max ~ U[t_max_range]; default [0.5, 1]
    pub t_max_range: [f64; 2],
}

impl Default for ImfGuidance {
    fn default() -> Self {
        Self { scale_max: 7.0, scale_beta: 1.0, t_min_range: [0.0, 0.5], t_max_range: [0.5, 1.0] }
    }
}

impl ImfGuidance {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.scale_max.is_finite() && self.scale_max >= 0.0, "objective.guidance.scale_max = {}: must be finite and >= 0", self.scale_max);
        anyhow::ensure!(self.scale_beta.is_finite(), "objective.guidance.scale_beta = {}: must be finite", self.scale_beta);
        for (key, [lo, hi]) in [("t_min_range", self.t_min_range), ("t_max_range", self.t_max_range)] {
            anyhow::ensure!(0.0 <= lo && lo <= hi && hi <= 1.0, "objective.guidance.{key} = [{lo}, {hi}]: need 0 <= lo <= hi <= 1");
        }
        Ok(())
    }

    /// ω (n,) from the power law: β = 1: exp(U·ln(1 + ω_max)); otherwise the inverse CDF
    /// exp(ln(1 + U·expm1((1 − β)·ln(1 + ω_max)))/(1 − β)) (`sample_cfg_scale`).
    fn sample_scale(&self, like: &Tensor) -> Tensor {
        let u = like.rand_like();
        let l = self.scale_max.ln_1p();
        if self.scale_beta == 1.0 {
            (u * l).exp()
        } else {
            let b = 1.0 - self.scale_beta;
            ((u * (b * l).exp_m1()).log1p() / b).exp()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImprovedMeanFlowConfig {
    /// default linear
    pub path: InterpolantConfig,
    /// equal_fraction (0.5, `data_proportion`), times (logit-normal −0.4, 1.0)
    pub times: MeanFlowPairsConfig,
    /// one_pass | graph_free | finite_difference; default one_pass
    pub jvp_mode: JvpMode,
    /// finite_difference only: the central-difference step; default by dtype
    pub jvp_fd_step: Option<f64>,
    /// power (1.0, `norm_p`), c (0.01, `norm_eps`)
    pub weighting: AdaptiveWeighting,
    /// the auxiliary v term L_v; default true (official)
    pub v_loss: bool,
    /// guidance as a network input (needs model.guidance_conditioning); default none (ω ≡ 1)
    pub guidance: Option<ImfGuidance>,
    /// default 0.1
    pub label_dropout: f64,
    /// random | leading; default leading (official `cond_drop`)
    pub label_dropout_rows: DropRows,
}

impl Default for ImprovedMeanFlowConfig {
    fn default() -> Self {
        Self {
            path: InterpolantConfig::Linear(NoParams {}),
            times: MeanFlowPairsConfig { equal_fraction: 0.5, ..Default::default() },
            jvp_mode: JvpMode::OnePass,
            jvp_fd_step: None,
            weighting: AdaptiveWeighting::default(),
            v_loss: true,
            guidance: None,
            label_dropout: 0.1,
            label_dropout_rows: DropRows::Leading,
        }
    }
}

impl ImprovedMeanFlowConfig {
    /// The official setting: guidance scale and interval as network inputs.
    pub fn official() -> Self {
        Self { guidance: Some(ImfGuidance::default()), ..Self::default() }
    }

    /// Jumps with the average velocity (`sample_one_step`); the scale and interval are passed to
    /// the network by the guidance wrapper (`sampling.cfg_scale`, `sampling.cfg_interval`).
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path", rule: RuleName::Jump, prediction: Prediction::AverageVelocity }
    }

    pub fn build(&self) -> anyhow::Result<ImprovedMeanFlow> {
        self.path.validate()?;
        let pairs = PairSamplerConfig::MeanFlow(self.times.clone());
        pairs.validate()?;
        self.weighting.validate()?;
        validate_fd_step(self.jvp_fd_step, "objective.jvp_fd_step")?;
        if let Some(g) = &self.guidance {
            g.validate()?;
        }
        let dropout = LabelDropout { p: self.label_dropout, rows: self.label_dropout_rows };
        dropout.validate()?;
        Ok(ImprovedMeanFlow { path: self.path.build(), pairs: pairs.build(), jvp_mode: self.jvp_mode, jvp_fd_step: self.jvp_fd_step, weighting: self.weighting, v_loss: self.v_loss, guidance: self.guidance, dropout })
    }
}

#[derive(Debug)]
pub struct ImprovedMeanFlow {
    pub path: Box<dyn Interpolant>,
    pub pairs: Box<dyn PairSampler>,
    pub jvp_mode: JvpMode,
    pub jvp_fd_step: Option<f64>,
    pub weighting: AdaptiveWeighting,
    pub v_loss: bool,
    pub guidance: Option<ImfGuidance>,
    pub dropout: LabelDropout,
}

/// F(x, t, h | g, class): with a guidance input when `g` is given (the network must take one).
fn field(net: &dyn VelocityField, x: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, g: Option<&GuidanceInput>) -> Tensor {
    match g {
        Some(g) => net.forward_guidance(x, t, h, class, g).expect("improved_mean_flow with objective.guidance needs a network that takes guidance (model.guidance_conditioning = true)"),
        None => net.forward(x, t, h, class),
    }
}

impl Objective for ImprovedMeanFlow {
    fn reported_metric(&self) -> Option<&'static str> {
        Some("imf_loss_u_unweighted")
    }

    fn needs_guidance_input(&self) -> bool {
        self.guidance.is_some()
    }

    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let net = nets.online;
        let x = &batch.x;
        let FlowMapDraw { t, h, x_t, v } = FlowMapDraw::new(self.path.as_ref(), self.pairs.as_ref(), x);
        let (b, device) = (x.size()[0], x.device());
        let zeros = t.zeros_like();

        // Scale, interval, v_g and the tangent v̂_c (no_grad: extra forwards at h = 0).
        let (g, v_g, tangent) = match &self.guidance {
            None => {
                let v_c = tch::no_grad(|| net.forward(&x_t, &t, &zeros, &batch.class));
                (None, v.shallow_clone(), v_c)
            }
            Some(cfg) => {
                let fm = h.eq(0.0);
                let [a, bnd] = cfg.t_min_range;
                let t_min = (t.rand_like() * (bnd - a) + a).where_self(&fm.logical_not(), &zeros);
                let [c, d] = cfg.t_max_range;
                let t_max = (t.rand_like() * (d - c) + c).where_self(&fm.logical_not(), &t.ones_like());
                let omega = cfg.sample_scale(&t);
                let (v_g, v_c) = tch::no_grad(|| {
                    let full = GuidanceInput { scale: omega.shallow_clone(), t_min: zeros.shallow_clone(), t_max: t.ones_like() };
                    let plain = GuidanceInput::constant(&t, 1.0, 0.0, 1.0);
                    let null = null_classes(b, net.null_class(), device);
                    let both = field(net, &Tensor::cat(&[&x_t, &x_t], 0), &Tensor::cat(&[&t, &t], 0), &Tensor::cat(&[&zeros, &zeros], 0), &Tensor::cat(&[&batch.class, &null], 0), Some(&GuidanceInput::cat(&full, &plain)));
                    let halves = both.chunk(2, 0);
                    let (v_c_full, v_u) = (&halves[0], &halves[1]);
                    let v_g_fm = &v + per_sample(&(-omega.reciprocal() + 1.0), &v) * (v_c_full - v_u);
                    let inside = t.ge_tensor(&t_min).logical_and(&t.le_tensor(&t_max));
                    let w = omega.where_self(&inside, &t.ones_like());
                    let masked = GuidanceInput { scale: w.shallow_clone(), t_min: zeros.shallow_clone(), t_max: t.ones_like() };
                    let v_c = field(net, &x_t, &t, &zeros, &batch.class, Some(&masked));
                    let v_g = &v + per_sample(&(-w.reciprocal() + 1.0), &v) * (&v_c - v_u);
                    (v_g_fm.where_self(&per_sample(&fm, &v), &v_g), v_c)
                });
                (Some(GuidanceInput { scale: omega, t_min, t_max }), v_g, v_c)
            }
        };
        let (class, dropped) = self.dropout.apply(&batch.class, net.null_class());
        let v_g = match &dropped {
            Some(mask) => v.where_self(&per_sample(mask, &v), &v_g),
            None => v_g,
        }
        .detach();

        let f = |p: &[Tensor]| Ok(field(net, &p[0], &p[1], &p[2], &class, g.as_ref()));
        let primals = [x_t.shallow_clone(), t.shallow_clone(), h.shallow_clone()];
        let tangents = [tangent, t.ones_like(), t.ones_like()];
        let (u, du_dt) = {
            let _fp32 = fp32_scope(device);
            self.jvp_mode.primal_and_jvp(f, &primals, &tangents, self.jvp_fd_step).expect("improved_mean_flow: jvp")
        };
        // The compound function V = u + h·sg[du/dt] (official: no clip on h).
        let big_v = &u + per_sample(&h, &du_dt) * du_dt.detach();
        let per_row_u = sum_per_sample(&(&big_v - &v_g).square()); // (B,)
        let mut value = self.weighting.weighted_mean(&per_row_u);
        let mut metrics = vec![("imf_loss_u_unweighted", per_row_u.mean(None).detach())];
        if self.v_loss {
            let v_hat = field(net, &x_t, &t, &zeros, &class, g.as_ref());
            let per_row_v = sum_per_sample(&(v_hat - &v_g).square()); // (B,)
            value = value + self.weighting.weighted_mean(&per_row_v);
            metrics.push(("imf_loss_v_unweighted", per_row_v.mean(None).detach()));
        }
        metrics.push(("imf_loss", value.detach()));
        Loss { value, metrics }
    }
}
