//! sCM: continuous-time consistency models in TrigFlow (Lu and Song, "Simplifying, Stabilizing and
//! Scaling Continuous-Time Consistency Models", arXiv 2410.11081), consistency training (sCT,
//! `kind = "scm_training"`) and distillation from a frozen teacher (sCD, `"scm_distillation"`).
//!
//! **Sources.** The paper's TrigFlow parameterisation (x_τ = cos τ·x + sin τ·z, z ~ N(0, σ_d²I),
//! f_θ(x_τ, τ) = cos τ·x_τ − sin τ·σ_d·F_θ(x_τ/σ_d, c_noise(τ)), c_noise(τ) = τ), its continuous
//! consistency gradient with the "JVP rearrangement", tangent normalisation, tangent warm-up and
//! adaptive weighting (its training algorithm), and its 2-step sampler with τ_mid = 1.1. No
//! official OpenAI code exists; the code read is NVIDIA FastGen (NVlabs/FastGen @f7d8456
//! `fastgen/methods/consistency_model/sCM.py`: `_compute_scm_loss`, `_jvp`, `_scm_pred_to_loss`,
//! `TrigFlowPrecond`; defaults in `fastgen/configs/methods/config_scm.py` @63ec082), and the
//! paper's algorithm as methods.md §13 and FastGen transcribe it: the PDF itself was not readable
//! from this session, so no equation numbers are cited and the points marked [unverified] rest on
//! the code. None of FastGen's code is copied.
//!
//! **Loss** (τ is TrigFlow time in radians; flowmap's t = 2τ/π, so the `trig_flow` path has
//! alpha = cos τ, sigma = σ_d·sin τ and data at t = 0):
//!
//! ```text
//! τ = arctan(e^n/σ_d),  n ~ N(p_mean, p_std²)         (log-normal proposal on σ = σ_d·tan τ)
//! x_τ = cos τ·x + sin τ·σ_d·ε,   dx/dτ = cos τ·σ_d·ε − sin τ·x   (sCT)
//!                                dx/dτ = teacher's TrigFlow velocity at x_τ  (sCD)
//! F, J = F_θ(x_τ/σ_d, τ) and cos τ·sin τ·dF_θ⁻/dτ        (one JVP, tangent cos τ·sin τ·(dx/dτ/σ_d, 1))
//! g = −cos²τ·(σ_d·F⁻ − dx/dτ) − r·(cos τ·sin τ·x_τ + σ_d·J),  r = min(1, step/H)  (tangent warm-up)
//! g ← g/(‖g‖ + c)                                        (tangent normalisation, c = 0.1)
//! L = mean_b[ prior(τ)·e^{−u_φ(τ)}·mean_D(F − sg F − g)² + u_φ(τ) ]
//! ```
//!
//! with θ⁻ = sg θ (not an EMA, as the paper), u_φ = −w_φ the learned log-variance (the paper's
//! e^{w}/D·‖·‖² − w written as EDM2's logvar), prior(τ) = 1/(σ_d·tan τ) (FastGen), and
//! mean_D(F − sg F − g)² = ‖g‖²/D in value: the loss is gradient-equivalent, its value is the
//! normalised tangent's mean square (≈ 1/D), so the progress line shows the raw tangent's mean
//! square `scm_tangent_sq` instead (tests/closed_form.rs derives its irreducible value for Gaussian
//! data: cos²τ·s⁴σ_d²/V² per element, V = cos²τ·s² + σ_d²·sin²τ; 0 for sCD). In flowmap the network is F(x_τ/σ_d, t, h = t, c): time enters
//! through flowmap's t = 2τ/π (a fixed rescaling of the paper's identity c_noise(τ) = τ, as the DiT
//! embeds t) and h = t marks the jump to data as for the other consistency models, so the JVP
//! tangent of both t and h is cos τ·sin τ·2/π.
//!
//! **Learned weighting** u_φ(τ): a linear layer on `weighting_features` fixed Fourier features
//! sin/cos(ω_k·τ) (ω_k geometric in [1, 64]), zero-initialised (u = 0 at step 0), owned by the
//! objective through [`Objective::init_params`] (the trainer optimises and checkpoints it). The
//! paper and EDM2/FastGen put this head on the network's own noise embedding; here it is separate
//! so that any backbone works.
//!
//! **sCD teacher conversion.** The teacher is a frozen run on `teacher_path` predicting
//! `teacher_prediction` (velocity for flow matching, eps for DDPM). At x_τ it is called at the time
//! u of equal signal-to-noise ratio, alpha_P(u)/sigma_P(u) = cos τ/(σ_d·sin τ) (bisection on u; for
//! the linear path u = σ_d·sin τ/(cos τ + σ_d·sin τ)), on the rescaled point
//! y = k·x_τ, k = √(alpha_P² + sigma_P²)/√(cos²τ + σ_d²·sin²τ) (FastGen's `TrigFlowPrecond` does the
//! same SNR matching). Its prediction gives (x̂, ε̂) through the teacher path's conversions, and the
//! TrigFlow velocity is dx/dτ = −sin τ·x̂ + cos τ·σ_d·ε̂. Guidance (`teacher_cfg_scale`) is applied
//! to the teacher's output before the (affine) conversion, which is the same as FastGen's guidance
//! on the converted velocity.
//!
//! **Paper vs FastGen, and flowmap's choices** (each an option where it matters):
//! * tangent norm: the paper divides by ‖g‖ + c (`tangent_norm = "l2"`, default); FastGen's default
//!   `g_norm_spatial_invariance` divides by RMS(g) + c (`"rms"`). `"none"` disables it (tests).
//! * FastGen divides the squared error by D twice (`mean` and `divide_x_0_spatial_dim`); flowmap
//!   divides once (the paper's 1/D·‖·‖²). With the learned weighting the constant is absorbed by u.
//! * prior weighting 1/(σ_d·tan τ): FastGen `prior_weighting_enabled = True`; whether the paper's
//!   algorithm has it is [unverified]; `prior_weighting`, default true (at the optimum of u it
//!   cancels, so it changes only the transient).
//! * FastGen's finite-difference JVP perturbs (x, τ) along the conditional path with a relative
//!   step 1e-3·τ; flowmap's `jvp_mode = "finite_difference"` uses the shared central difference
//!   along the same tangent (step `jvp_fd_step`).
//! * Defaults: σ_d = 0.5, p_mean = −1.0, p_std = 1.4 (FastGen's CIFAR-10 config, citing the
//!   paper's appendix), c = 0.1, H = 10000 (FastGen `tangent_warmup_steps`), τ_mid = 1.1 (the paper's
//!   2-step sampler as methods.md and the issue state it [unverified in the PDF]), label
//!   dropout 0 (sCM samples without guidance; set it > 0 to train an unconditional branch).
//! * The paper initialises sCD's student from the teacher: set `[teacher] init_student = true`
//!   (the student's outputs then start in the teacher's parameterisation, not TrigFlow's, which is
//!   why this is not the default here).
use crate::jvp::{fp32_scope, validate_fd_step, JvpMode};
use crate::label_dropout::LabelDropout;
use crate::weighting::mean_per_sample;
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use anyhow::ensure;
use flowmap_core::{per_sample, Guided, Interpolant, InterpolantConfig, NoParams, Prediction, RuleName, TrigFlow, TrigFlowConfig, VelocityField};
use serde::{Deserialize, Serialize};
use std::f64::consts::FRAC_PI_2;
use tch::{Kind, Tensor};

/// sCM's intermediate time of its 2-step sampler, TrigFlow radians (paper: τ_mid = 1.1).
pub const SCM_MID_TAU: f64 = 1.1;

/// How the tangent g is normalised before the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TangentNorm {
    /// g/(‖g‖ + c), the paper's.
    #[default]
    L2,
    /// g/(RMS(g) + c), FastGen's `g_norm_spatial_invariance`.
    Rms,
    /// No normalisation.
    None,
}

/// What the sCD teacher's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherPrediction {
    /// The velocity dx/dt of `teacher_path` at h = `teacher_h` (a flow-matching run).
    #[default]
    Velocity,
    /// eps (a DDPM run).
    Eps,
}

/// `[objective]` of `kind = "scm_training"` and `"scm_distillation"` (the `teacher_*` keys are
/// the distillation's only).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScmConfig {
    /// the data's standard deviation σ_d (TrigFlow's noise is σ_d·ε); default 0.5
    pub sigma_d: f64,
    /// mean of log σ = log(σ_d·tan τ); default −1.0
    pub p_mean: f64,
    /// std of log σ; default 1.4
    pub p_std: f64,
    /// H: the tangent's second term is scaled by min(1, step/H); 0 = no warm-up; default 10000
    pub tangent_warmup_steps: u64,
    /// l2 | rms | none; default l2 (paper)
    pub tangent_norm: TangentNorm,
    /// c in g/(‖g‖ + c); default 0.1
    pub tangent_norm_c: f64,
    /// learn the weighting u_φ(τ) (objective parameters); default true
    pub adaptive_weighting: bool,
    /// Fourier features of u_φ (even); default 32
    pub weighting_features: i64,
    /// multiply by 1/(σ_d·tan τ) (FastGen); default true
    pub prior_weighting: bool,
    /// one_pass | graph_free | finite_difference; default one_pass
    pub jvp_mode: JvpMode,
    /// finite_difference only: the central-difference step; default by dtype (1e-4 f64, 5e-3 f32)
    pub jvp_fd_step: Option<f64>,
    /// default 0 (sCM samples unguided)
    pub label_dropout: f64,
    /// τ of the 2-step sampler's intermediate point (radians, in (0, π/2)); default 1.1 (paper)
    pub mid_tau: f64,
    /// scm_distillation: the teacher's path; default linear
    pub teacher_path: Option<InterpolantConfig>,
    /// scm_distillation: velocity | eps; default velocity
    pub teacher_prediction: Option<TeacherPrediction>,
    /// scm_distillation: h fed to the teacher; default 0
    pub teacher_h: Option<f64>,
    /// scm_distillation: classifier-free guidance of the teacher; default none
    pub teacher_cfg_scale: Option<f64>,
}

impl Default for ScmConfig {
    fn default() -> Self {
        Self {
            sigma_d: flowmap_core::interpolant::TRIGFLOW_SIGMA_D,
            p_mean: -1.0,
            p_std: 1.4,
            tangent_warmup_steps: 10_000,
            tangent_norm: TangentNorm::L2,
            tangent_norm_c: 0.1,
            adaptive_weighting: true,
            weighting_features: 32,
            prior_weighting: true,
            jvp_mode: JvpMode::OnePass,
            jvp_fd_step: None,
            label_dropout: 0.0,
            mid_tau: SCM_MID_TAU,
            teacher_path: None,
            teacher_prediction: None,
            teacher_h: None,
            teacher_cfg_scale: None,
        }
    }
}

impl ScmConfig {
    /// The path the model trains and samples on: TrigFlow with this σ_d.
    pub fn path(&self) -> InterpolantConfig {
        InterpolantConfig::TrigFlow(TrigFlowConfig { sigma_d: self.sigma_d })
    }

    /// TrigFlow consistency sampling (the `trig_flow` rule) on the TrigFlow path.
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path(), path_key: "objective.sigma_d (the trig_flow path)", rule: RuleName::TrigFlow, prediction: Prediction::TrigFlowJump }
    }

    /// The 2-step grid through the paper's τ_mid: [1, 2·mid_tau/π, 0] in flowmap time.
    pub fn default_time_grid(&self) -> Vec<f64> {
        vec![1.0, self.mid_tau / FRAC_PI_2, 0.0]
    }

    /// Validates and builds; `distillation` selects sCD (the `teacher_*` keys are allowed only
    /// there). Errors name the key.
    pub fn build(&self, distillation: bool) -> anyhow::Result<Scm> {
        let kind = if distillation { "scm_distillation" } else { "scm_training" };
        ensure!(self.sigma_d.is_finite() && self.sigma_d > 0.0, "objective.sigma_d = {}: must be finite and > 0", self.sigma_d);
        ensure!(self.p_mean.is_finite(), "objective.p_mean = {}: must be finite", self.p_mean);
        ensure!(self.p_std.is_finite() && self.p_std >= 0.0, "objective.p_std = {}: must be finite and >= 0", self.p_std);
        ensure!(self.tangent_norm_c.is_finite() && (self.tangent_norm_c > 0.0 || self.tangent_norm == TangentNorm::None), "objective.tangent_norm_c = {}: must be finite and > 0", self.tangent_norm_c);
        ensure!(!self.adaptive_weighting || (self.weighting_features >= 2 && self.weighting_features % 2 == 0), "objective.weighting_features = {}: must be even and >= 2", self.weighting_features);
        ensure!(self.mid_tau > 0.0 && self.mid_tau < FRAC_PI_2, "objective.mid_tau = {}: must be in (0, π/2) (TrigFlow radians; the paper's 1.1)", self.mid_tau);
        validate_fd_step(self.jvp_fd_step, "objective.jvp_fd_step")?;
        let dropout = LabelDropout::new(self.label_dropout);
        dropout.validate()?;
        let teacher = if distillation {
            let path = self.teacher_path.clone().unwrap_or(InterpolantConfig::Linear(NoParams {}));
            path.validate().map_err(|e| anyhow::anyhow!("objective.teacher_path: {e:#}"))?;
            let h = self.teacher_h.unwrap_or(0.0);
            ensure!((0.0..=1.0).contains(&h), "objective.teacher_h = {h}: must be in [0, 1]");
            if let Some(w) = self.teacher_cfg_scale {
                ensure!(w.is_finite(), "objective.teacher_cfg_scale = {w}: must be finite");
            }
            Some(ScmTeacher { path: path.build(), prediction: self.teacher_prediction.unwrap_or_default(), h, cfg_scale: self.teacher_cfg_scale })
        } else {
            for (key, set) in [("teacher_path", self.teacher_path.is_some()), ("teacher_prediction", self.teacher_prediction.is_some()), ("teacher_h", self.teacher_h.is_some()), ("teacher_cfg_scale", self.teacher_cfg_scale.is_some())] {
                ensure!(!set, "objective.{key} is a key of kind = \"scm_distillation\", not of kind = \"{kind}\"");
            }
            None
        };
        Ok(Scm { cfg: self.clone(), path: TrigFlow { sigma_d: self.sigma_d }, teacher, dropout, weighting: None })
    }
}

/// The sCD teacher and how to read it.
#[derive(Debug)]
pub struct ScmTeacher {
    pub path: Box<dyn Interpolant>,
    pub prediction: TeacherPrediction,
    pub h: f64,
    pub cfg_scale: Option<f64>,
}

/// The learned log-variance u_φ(τ) = weight·features(τ) + bias.
#[derive(Debug)]
struct LogVariance {
    weight: Tensor, // (F,)
    bias: Tensor,   // ()
}

#[derive(Debug)]
pub struct Scm {
    pub cfg: ScmConfig,
    pub path: TrigFlow,
    /// Some for sCD.
    pub teacher: Option<ScmTeacher>,
    pub dropout: LabelDropout,
    weighting: Option<LogVariance>,
}

/// Fourier features sin/cos(ω_k·τ), ω_k = 64^(k/(K−1)), k < K = features/2: (B,) → (B, features).
pub fn weighting_features(tau: &Tensor, features: i64) -> Tensor {
    let k = features / 2;
    let (kind, device) = (tau.kind(), tau.device());
    let steps = Tensor::arange(k, (kind, device)) / ((k - 1).max(1) as f64);
    let omega = (steps * 64f64.ln()).exp(); // (K,)
    let arg = tau.unsqueeze(1) * omega.unsqueeze(0); // (B, K)
    Tensor::cat(&[arg.sin(), arg.cos()], 1)
}

/// τ = arctan(e^n/σ_d), n ~ N(p_mean, p_std²), as flowmap time t = 2τ/π, (B,) Double. Uses the
/// global generator.
pub fn sample_times(b: i64, p_mean: f64, p_std: f64, sigma_d: f64, device: tch::Device) -> Tensor {
    let n = Tensor::randn([b], (Kind::Double, device)) * p_std + p_mean;
    (n.exp() / sigma_d).atan() / FRAC_PI_2
}

impl ScmTeacher {
    /// The teacher's time of equal signal-to-noise ratio to TrigFlow τ: alpha_P/sigma_P =
    /// cos τ/(σ_d·sin τ), by 60 bisections in float64 (alpha_P/sigma_P decreases in u).
    pub fn matched_time(&self, tau: &Tensor, sigma_d: f64) -> Tensor {
        let tau = tau.to_kind(Kind::Double);
        let target = tau.cos().log() - (tau.sin() * sigma_d).log();
        let mut lo = tau.zeros_like();
        let mut hi = tau.ones_like();
        for _ in 0..60 {
            let mid = (&lo + &hi) * 0.5;
            let lambda = self.path.alpha(&mid).log() - self.path.sigma(&mid).log();
            let cleaner = lambda.gt_tensor(&target); // mid has more signal than wanted: go noisier
            lo = mid.where_self(&cleaner, &lo);
            hi = hi.where_self(&cleaner, &mid);
        }
        (lo + hi) * 0.5
    }

    /// dx/dτ at the TrigFlow point `x_tau` (B, ...) and time τ (B,), under no_grad.
    pub fn trigflow_velocity(&self, net: &dyn VelocityField, x_tau: &Tensor, tau: &Tensor, sigma_d: f64, class: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let kind = x_tau.kind();
            let u = self.matched_time(tau, sigma_d);
            let tau64 = tau.to_kind(Kind::Double);
            let (a, s) = (self.path.alpha(&u), self.path.sigma(&u));
            let k = ((a.square() + s.square()) / (tau64.cos().square() + (tau64.sin() * sigma_d).square())).sqrt();
            let u = u.to_kind(kind);
            let y = x_tau * per_sample(&k.to_kind(kind), x_tau);
            let h = u.full_like(self.h);
            let out = match self.cfg_scale {
                Some(w) => Guided::new(net, w).forward(&y, &u, &h, class),
                None => net.forward(&y, &u, &h, class),
            };
            let (x_hat, eps_hat) = match self.prediction {
                TeacherPrediction::Velocity => (self.path.x_from_velocity(&y, &out, &u), self.path.eps_from_velocity(&y, &out, &u)),
                TeacherPrediction::Eps => (self.path.x_from_eps(&y, &out, &u), out),
            };
            let tau = tau.to_kind(kind);
            per_sample(&(tau.cos() * sigma_d), &eps_hat) * eps_hat - per_sample(&tau.sin(), &x_hat) * x_hat
        })
    }
}

impl Scm {
    /// r = min(1, step/H) (1 without warm-up).
    pub fn warmup(&self, step: u64) -> f64 {
        match self.cfg.tangent_warmup_steps {
            0 => 1.0,
            h => (step as f64 / h as f64).min(1.0),
        }
    }

    /// u_φ(τ), (B,); zeros without adaptive weighting.
    fn log_variance(&self, tau: &Tensor) -> Tensor {
        match &self.weighting {
            Some(w) => weighting_features(tau, self.cfg.weighting_features).matmul(&w.weight.to_kind(tau.kind())) + w.bias.to_kind(tau.kind()),
            None => tau.zeros_like(),
        }
    }
}

impl Objective for Scm {
    /// The raw tangent's mean square: the normalised loss is ≈ 1/D whatever the model.
    fn reported_metric(&self) -> Option<&'static str> {
        Some("scm_tangent_sq")
    }

    fn needs_teacher(&self) -> bool {
        self.teacher.is_some()
    }

    fn init_params(&mut self, root: &tch::nn::Path) -> anyhow::Result<()> {
        if self.cfg.adaptive_weighting {
            let w = root / "weighting";
            self.weighting = Some(LogVariance { weight: w.zeros("weight", &[self.cfg.weighting_features]), bias: w.zeros("bias", &[]) });
        }
        Ok(())
    }

    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss {
        let net = nets.online;
        let sd = self.cfg.sigma_d;
        let x = &batch.x;
        let (b, device, kind) = (x.size()[0], x.device(), x.kind());
        let t = sample_times(b, self.cfg.p_mean, self.cfg.p_std, sd, device).to_kind(kind);
        let tau = &t * FRAC_PI_2;
        let (cos, sin) = (per_sample(&tau.cos(), x), per_sample(&tau.sin(), x));
        let eps = x.randn_like();
        let x_t = &cos * x + &sin * &eps * sd;
        let (class, _) = self.dropout.apply(&batch.class, net.null_class());
        let dxdt = match (&self.teacher, nets.teacher) {
            (None, _) => &cos * &eps * sd - &sin * x,
            (Some(teacher), Some(teacher_net)) => teacher.trigflow_velocity(teacher_net, &x_t, &tau, sd, &class),
            (Some(_), None) => panic!("scm_distillation needs a teacher (Nets::teacher)"),
        };

        // F and cos τ·sin τ·dF⁻/dτ in one JVP; (t, h = t) move at dt/dτ = 2/π.
        let cs = tau.cos() * tau.sin(); // (B,)
        let f = |p: &[Tensor]| Ok(net.forward(&p[0], &p[1], &p[2], &class));
        let primals = [&x_t / sd, t.shallow_clone(), t.shallow_clone()];
        let dt = &cs / FRAC_PI_2;
        let tangents = [per_sample(&cs, &dxdt) * &dxdt / sd, dt.shallow_clone(), dt];
        let (out, jvp) = {
            let _fp32 = fp32_scope(device);
            self.cfg.jvp_mode.primal_and_jvp(f, &primals, &tangents, self.cfg.jvp_fd_step).expect("scm: jvp")
        };
        let (f_minus, jvp) = (out.detach(), jvp.detach());

        let r = self.warmup(step);
        let g = -(&cos * &cos) * (&f_minus * sd - &dxdt) - (&cos * &sin * &x_t + jvp * sd) * r;
        // Logged: the raw tangent's mean square (sCT: falls to its irreducible value, closed form in
        // tests/closed_form.rs; sCD: to 0). The optimised value is ≈ 1/D under normalisation.
        let tangent_sq = mean_per_sample(&g.square()).mean(None).detach();
        let g = match self.cfg.tangent_norm {
            TangentNorm::None => g,
            norm => {
                let mut n = g.flatten(1, -1).norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
                if norm == TangentNorm::Rms {
                    n = n / ((g.numel() as i64 / b) as f64).sqrt();
                }
                &g / per_sample(&(n + self.cfg.tangent_norm_c), &g)
            }
        };
        let g = g.detach();
        let per_row = mean_per_sample(&(&out - &f_minus - &g).square()); // (B,)
        let logvar = self.log_variance(&tau);
        let prior = if self.cfg.prior_weighting { (tau.tan() * sd).reciprocal() } else { tau.ones_like() };
        let weighted = prior * (-&logvar).exp() * &per_row + &logvar;
        let value = weighted.mean(None);
        let metrics = vec![("scm_tangent_sq", tangent_sq), ("scm_loss_unweighted", per_row.mean(None).detach()), ("scm_loss", value.detach()), ("scm_logvar", logvar.mean(None).detach()), ("tangent_warmup", Tensor::from(r))];
        Loss { value, metrics }
    }
}
