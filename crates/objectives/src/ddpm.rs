//! DDPM with ε-prediction (Ho et al., arXiv 2006.11239); learned variance as in improved DDPM
//! (Nichol and Dhariwal, arXiv 2102.09672) and DiT (`learn_sigma`, arXiv 2212.09748).
//! Loss: mean(ε̂ − ε)² over pixels and batch, plus L_vlb (KL to the posterior, in bits) for the
//! variance channels when they are learned. Time: DDPM's integer step n ∈ {0, …, 999}
//! (n = 0 least noisy) is fed as t_n = (n + 1)/1000 (methods.md §1.3); DiT's embedding of n itself is
//! the model option `t_scale = 1000`. The network output is read as ε̂ (and the variance channels).
use crate::label_dropout::LabelDropout;
use crate::weighting::mean_per_sample;
use crate::{Batch, DefaultSampler, Loss, Nets, Objective};
use flowmap_core::{per_sample, DdpmConfig, DdpmSchedule, InterpolantConfig, Prediction, RuleName};
use serde::{Deserialize, Serialize};
use std::f64::consts::{LN_2, PI};
use tch::{Device, Kind, Tensor};

/// Half a quantisation bin of 8-bit data in [−1, 1] (improved DDPM `discretized_gaussian_log_likelihood`).
const HALF_BIN: f64 = 1.0 / 255.0;
/// Data values beyond ±0.999 take the open-ended edge bins (same source).
const EDGE: f64 = 0.999;
/// Floor inside logs of probabilities (same source).
const LOG_FLOOR: f64 = 1e-12;

/// What the network's extra output channels mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DdpmVariance {
    /// C output channels (ε̂ only); the loss is L_simple. Samplers use a fixed variance.
    #[default]
    Fixed,
    /// 2C output channels [ε̂, v] (DiT `learn_sigma`); log Σ = frac·log β_n + (1 − frac)·log β̃_n
    /// with frac = (v + 1)/2, trained by L_vlb with ε̂ frozen (improved DDPM's hybrid loss, λ = 1 as
    /// in DiT's `training_losses` with `LossType.MSE`).
    Learned,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DdpmObjectiveConfig {
    /// steps (1000), beta_start (1e-4), beta_end (0.02): ADM "linear"
    pub schedule: DdpmConfig,
    pub variance: DdpmVariance, // fixed | learned; default fixed (flowmap default, methods.md §5)
    /// probability of the null class per row; default 0.1 (DiT)
    pub label_dropout: f64,
}

impl Default for DdpmObjectiveConfig {
    fn default() -> Self {
        Self { schedule: DdpmConfig::default(), variance: DdpmVariance::Fixed, label_dropout: 0.1 }
    }
}

impl DdpmObjectiveConfig {
    /// Deterministic DDIM on the discrete schedule it trains on; the network predicts eps.
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: InterpolantConfig::DdpmLinearBeta(self.schedule), path_key: "objective.schedule", rule: RuleName::Ddim, prediction: Prediction::Eps }
    }

    pub fn build(&self) -> anyhow::Result<Ddpm> {
        let s = &self.schedule;
        anyhow::ensure!(s.steps >= 2, "ddpm: steps must be >= 2, got {}", s.steps);
        anyhow::ensure!(0.0 < s.beta_start && s.beta_start <= s.beta_end && s.beta_end < 1.0, "ddpm: need 0 < beta_start <= beta_end < 1");
        let dropout = LabelDropout::new(self.label_dropout);
        dropout.validate()?;
        Ok(Ddpm { schedule: DdpmSchedule::from(*s), variance: self.variance, dropout })
    }
}

/// DDPM noise prediction. See the module docs.
#[derive(Debug)]
pub struct Ddpm {
    pub schedule: DdpmSchedule,
    pub variance: DdpmVariance,
    pub dropout: LabelDropout,
}

/// Per-step coefficients gathered at the batch's steps, each (B,) Double.
struct StepCoefs {
    alpha_bar: Tensor,
    log_beta: Tensor,
    post_log_var: Tensor, // log β̃_n, with β̃_0 replaced by β̃_1 (improved DDPM "clipped")
    /// posterior mean = post_coef_x·x + post_coef_xt·x_n
    post_coef_x: Tensor,
    post_coef_xt: Tensor,
}

impl Ddpm {
    fn coefs(&self, n: &Tensor, device: Device) -> StepCoefs {
        let f64d = (Kind::Double, device);
        let betas = self.schedule.betas(device); // (N,)
        let ab = self.schedule.alphas_cumprod(device); // (N,)
        let ab_prev = Tensor::cat(&[Tensor::ones([1], f64d), ab.narrow(0, 0, self.schedule.steps - 1)], 0);
        let post_var = &betas * (-&ab_prev + 1.0) / (-&ab + 1.0);
        let post_var_clipped = Tensor::cat(&[post_var.narrow(0, 1, 1), post_var.narrow(0, 1, self.schedule.steps - 1)], 0);
        let coef_x = &betas * ab_prev.sqrt() / (-&ab + 1.0);
        let coef_xt = (-&ab_prev + 1.0) * (-&betas + 1.0).sqrt() / (-&ab + 1.0);
        let at = |v: &Tensor| v.index_select(0, n);
        StepCoefs { alpha_bar: at(&ab), log_beta: at(&betas.log()), post_log_var: at(&post_var_clipped.log()), post_coef_x: at(&coef_x), post_coef_xt: at(&coef_xt) }
    }

    /// The per-sample variational term (bits per dimension), (B,): KL(q(x_{n−1}|x_n, x) ‖ p(x_{n−1}|x_n))
    /// for n > 0 and the discretised decoder NLL for n = 0. ε̂ enters detached (improved DDPM).
    fn vlb_per_sample(&self, x: &Tensor, x_n: &Tensor, eps_hat: &Tensor, var_v: &Tensor, n: &Tensor) -> Tensor {
        let kind = x.kind();
        let c = self.coefs(n, x.device());
        let ps = |s: &Tensor| per_sample(&s.to_kind(kind), x);
        let eps_hat = eps_hat.detach();
        let x_hat = (x_n - ps(&(-&c.alpha_bar + 1.0).sqrt()) * eps_hat) / ps(&c.alpha_bar.sqrt());
        let model_mean = ps(&c.post_coef_x) * &x_hat + ps(&c.post_coef_xt) * x_n;
        let frac = (var_v + 1.0) / 2.0;
        let model_log_var = &frac * ps(&c.log_beta) + (-&frac + 1.0) * ps(&c.post_log_var);
        let true_mean = ps(&c.post_coef_x) * x + ps(&c.post_coef_xt) * x_n;
        let true_log_var = ps(&c.post_log_var);
        let kl = normal_kl(&true_mean, &true_log_var, &model_mean, &model_log_var);
        let kl = mean_per_sample(&kl) / LN_2;
        let nll = -discretized_gaussian_log_likelihood(x, &model_mean, &(&model_log_var * 0.5));
        let nll = mean_per_sample(&nll) / LN_2;
        nll.where_self(&n.eq(0), &kl)
    }
}

/// KL(N(m1, e^lv1) ‖ N(m2, e^lv2)) elementwise (improved DDPM `normal_kl`).
fn normal_kl(m1: &Tensor, lv1: &Tensor, m2: &Tensor, lv2: &Tensor) -> Tensor {
    ((lv2 - lv1) + (lv1 - lv2).exp() + (m1 - m2).square() * (-lv2).exp() - 1.0) * 0.5
}

/// Standard normal CDF, tanh approximation (improved DDPM `approx_standard_normal_cdf`).
fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    ((x + x.pow_tensor_scalar(3.0) * 0.044715) * (2.0 / PI).sqrt()).tanh() * 0.5 + 0.5
}

/// log-likelihood of data `x` in [−1, 1] quantised to 8 bits under N(means, e^(2·log_scales)),
/// elementwise (improved DDPM `discretized_gaussian_log_likelihood`).
fn discretized_gaussian_log_likelihood(x: &Tensor, means: &Tensor, log_scales: &Tensor) -> Tensor {
    let centered = x - means;
    let inv_std = (-log_scales).exp();
    let cdf_plus = approx_standard_normal_cdf(&(&inv_std * (&centered + HALF_BIN)));
    let cdf_min = approx_standard_normal_cdf(&(&inv_std * (&centered - HALF_BIN)));
    let log_cdf_plus = cdf_plus.clamp_min(LOG_FLOOR).log();
    let log_one_minus_cdf_min = (-&cdf_min + 1.0).clamp_min(LOG_FLOOR).log();
    let log_delta = (&cdf_plus - &cdf_min).clamp_min(LOG_FLOOR).log();
    let upper = log_one_minus_cdf_min.where_self(&x.gt(EDGE), &log_delta);
    log_cdf_plus.where_self(&x.lt(-EDGE), &upper)
}

impl Objective for Ddpm {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let x = &batch.x;
        let (b, device, kind) = (x.size()[0], x.device(), x.kind());
        let n = Tensor::randint(self.schedule.steps, [b], (Kind::Int64, device)); // (B,)
        let eps = x.randn_like();
        let ab = self.schedule.alphas_cumprod(device).index_select(0, &n).to_kind(kind); // (B,)
        let x_n = per_sample(&ab.sqrt(), x) * x + per_sample(&(-&ab + 1.0).sqrt(), x) * &eps;
        let t = self.schedule.t_of_step(&n).to_kind(kind);
        let (class, _) = self.dropout.apply(&batch.class, nets.online.null_class());
        let out = nets.online.forward(&x_n, &t, &t.zeros_like(), &class);
        match self.variance {
            DdpmVariance::Fixed => {
                assert_eq!(out.size(), x.size(), "ddpm (fixed variance): the network must output C channels");
                let mse = (&out - &eps).square().mean(None);
                Loss { metrics: vec![("mse", mse.detach())], value: mse }
            }
            DdpmVariance::Learned => {
                let c = x.size()[1];
                assert_eq!(out.size()[1], 2 * c, "ddpm (learned variance): the network must output 2C channels");
                let parts = out.split(c, 1);
                let (eps_hat, var_v) = (&parts[0], &parts[1]);
                let mse = (eps_hat - &eps).square().mean(None);
                let vlb = self.vlb_per_sample(x, &x_n, eps_hat, var_v, &n).mean(None);
                let value = &mse + &vlb;
                Loss { metrics: vec![("mse", mse.detach()), ("vlb", vlb.detach())], value }
            }
        }
    }
}
