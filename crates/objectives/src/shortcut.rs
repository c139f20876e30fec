//! Shortcut models (Frans et al., arXiv 2410.12557; kvfrans/shortcut-models `targets_shortcut.py`).
//! Loss: plain mean over flow + bootstrap rows of (F(x_t, t, h, c) − target)²; flow rows target the
//! conditional velocity at h = flow_h, bootstrap rows target sg[(u₁ + u₂)/2] with
//! u₁ = F̄(x_t, t, h/2), u₂ = F̄(x_t − (h/2)·u₁, t − h/2, h/2) on dyadic h (methods.md §11).
//! Time: the code runs from noise at t_s = 0 to data at t_s = 1 with x_t = (1 − (1 − 10⁻⁵)t_s)·noise
//! + t_s·data; here t = 1 − t_s, F = −s, h = 2^−level, and x_t + (h/2)·v_b1 becomes x_t − (h/2)·u₁.
use crate::flow_matching::flow_matching_error;
use crate::label_dropout::{null_classes, LabelDropout};
use crate::{Batch, DefaultSampler, Loss, Nets, Objective, TargetNet};
use flowmap_core::time::{DiscreteUniformConfig, DyadicSteps};
use flowmap_core::{per_sample, Interpolant, InterpolantConfig, NoParams, PairSampler, Prediction, RuleName, SigmaMinConfig, TimeSampler, TimeSamplerConfig, VelocityField};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// `targets_shortcut.py`: `jnp.clip(x_t2, -4, 4)` and `jnp.clip(v_target, -4, 4)`.
pub const SHORTCUT_CLIP: f64 = 4.0;
/// log2 of `denoise_timesteps = 128`: h ∈ {2^−7, …, 1}.
pub const SHORTCUT_MAX_LEVEL: u32 = 7;
/// `train.py` `bootstrap_every = 8`.
pub const SHORTCUT_CODE_BOOTSTRAP_FRACTION: f64 = 0.125;
/// The paper's k = 1/4 of the batch (\[seed\] 10617: 3/4 flow, 1/4 bootstrap).
pub const SHORTCUT_PAPER_BOOTSTRAP_FRACTION: f64 = 0.25;
/// ImageNet README command: `cfg_scale 1.5` with `bootstrap_cfg 1`.
pub const SHORTCUT_CODE_CFG_SCALE: f64 = 1.5;

/// Which published setting the unspecified fields come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShortcutPreset {
    /// The paper's description: plain linear path, t ~ U[0, 1] and h = 0 on flow rows, 1/4 bootstrap
    /// rows, targets from the online weights, no clipping, no guidance in the targets.
    #[default]
    Paper,
    /// kvfrans/shortcut-models @6010043 with the README commands: sigma_min = 10⁻⁵, 128-bin times and
    /// h = 1/128 on flow rows, 1/8 bootstrap rows, EMA targets, clipping at ±4, CFG 1.5 on the finest
    /// bootstrap level, flow rows reusing the bootstrap images (issue #10).
    OfficialCode,
}

/// Resolved Shortcut settings. TOML: `preset = "paper" | "official_code"` (default paper) plus any
/// field below, which overrides the preset.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "ShortcutSpec")]
pub struct ShortcutConfig {
    /// paper: linear; code: linear_sigma_min (1e-5)
    pub path: InterpolantConfig,
    pub flow_times: TimeSamplerConfig, // t on flow rows; paper: uniform; code: discrete_uniform, 128 bins
    /// h on flow rows; paper: 0; code: 1/128
    pub flow_h: f64,
    /// share of rows with self-consistency targets; paper: 0.25; code: 0.125
    pub bootstrap_fraction: f64,
    /// h ∈ {2^-max_level, …, 1}; bootstrap rows use levels < max_level; both: 7
    pub max_level: u32,
    /// net evaluating u₁, u₂; paper: online; code: ema (`bootstrap_ema = 1`)
    pub target: TargetNet,
    /// clamp of x_t − (h/2)·u₁ and of the target; paper: inf (none); code: 4
    pub clip: f64,
    /// CFG of u₁, u₂ on the finest bootstrap level; paper: 1 (none); code: 1.5
    pub bootstrap_cfg_scale: f64,
    /// on flow rows only (bootstrap rows keep labels); both: 0.1
    pub label_dropout: f64,
    /// flow rows take the first B − B_b images, as the code (issue #10); paper: false; code: true
    pub reuse_bootstrap_images: bool,
}

impl ShortcutConfig {
    /// The Shortcut sampler: jumps of the grid's step (methods.md §11.5) on the preset's (or the given) path.
    pub fn default_sampler(&self) -> DefaultSampler {
        DefaultSampler { path: self.path.clone(), path_key: "objective.path (default: objective.preset's)", rule: RuleName::Jump, prediction: Prediction::AverageVelocity }
    }

    pub fn paper() -> Self {
        Self {
            path: InterpolantConfig::Linear(NoParams {}),
            flow_times: TimeSamplerConfig::Uniform(NoParams {}),
            flow_h: 0.0,
            bootstrap_fraction: SHORTCUT_PAPER_BOOTSTRAP_FRACTION,
            max_level: SHORTCUT_MAX_LEVEL,
            target: TargetNet::Online,
            clip: f64::INFINITY,
            bootstrap_cfg_scale: 1.0,
            label_dropout: 0.1,
            reuse_bootstrap_images: false,
        }
    }

    pub fn official_code() -> Self {
        Self {
            path: InterpolantConfig::LinearSigmaMin(SigmaMinConfig::default()),
            flow_times: TimeSamplerConfig::DiscreteUniform(DiscreteUniformConfig { bins: 1 << SHORTCUT_MAX_LEVEL }),
            flow_h: 1.0 / (1u32 << SHORTCUT_MAX_LEVEL) as f64,
            bootstrap_fraction: SHORTCUT_CODE_BOOTSTRAP_FRACTION,
            max_level: SHORTCUT_MAX_LEVEL,
            target: TargetNet::Ema,
            clip: SHORTCUT_CLIP,
            bootstrap_cfg_scale: SHORTCUT_CODE_CFG_SCALE,
            label_dropout: 0.1,
            reuse_bootstrap_images: true,
        }
    }

    pub fn preset(p: ShortcutPreset) -> Self {
        match p {
            ShortcutPreset::Paper => Self::paper(),
            ShortcutPreset::OfficialCode => Self::official_code(),
        }
    }

    /// Bootstrap rows in a batch of n: ⌊n·bootstrap_fraction⌋ (`batch_size // bootstrap_every`).
    pub fn bootstrap_rows(&self, n: i64) -> i64 {
        (n as f64 * self.bootstrap_fraction).floor() as i64
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.path.validate()?;
        self.flow_times.validate()?;
        anyhow::ensure!((0.0..=1.0).contains(&self.flow_h), "flow_h must be in [0, 1], got {}", self.flow_h);
        anyhow::ensure!((0.0..=1.0).contains(&self.bootstrap_fraction), "bootstrap_fraction must be in [0, 1], got {}", self.bootstrap_fraction);
        anyhow::ensure!((1..=20).contains(&self.max_level), "max_level must be in 1..=20, got {}", self.max_level);
        anyhow::ensure!(self.clip > 0.0, "clip must be > 0 (inf disables it), got {}", self.clip);
        anyhow::ensure!(self.bootstrap_cfg_scale.is_finite(), "bootstrap_cfg_scale must be finite");
        LabelDropout::new(self.label_dropout).validate()
    }

    pub fn build(&self) -> anyhow::Result<Shortcut> {
        self.validate()?;
        Ok(Shortcut { path: self.path.build(), flow_times: self.flow_times.build(), levels: DyadicSteps { max_level: self.max_level - 1 }, cfg: self.clone(), dropout: LabelDropout::new(self.label_dropout) })
    }
}

/// The TOML form: a preset plus overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShortcutSpec {
    #[serde(default)]
    pub preset: ShortcutPreset,
    pub path: Option<InterpolantConfig>,
    pub flow_times: Option<TimeSamplerConfig>,
    pub flow_h: Option<f64>,
    pub bootstrap_fraction: Option<f64>,
    pub max_level: Option<u32>,
    pub target: Option<TargetNet>,
    pub clip: Option<f64>,
    pub bootstrap_cfg_scale: Option<f64>,
    pub label_dropout: Option<f64>,
    pub reuse_bootstrap_images: Option<bool>,
}

impl TryFrom<ShortcutSpec> for ShortcutConfig {
    type Error = anyhow::Error;
    fn try_from(s: ShortcutSpec) -> anyhow::Result<Self> {
        let mut c = ShortcutConfig::preset(s.preset);
        if let Some(v) = s.path {
            c.path = v;
        }
        if let Some(v) = s.flow_times {
            c.flow_times = v;
        }
        c.flow_h = s.flow_h.unwrap_or(c.flow_h);
        c.bootstrap_fraction = s.bootstrap_fraction.unwrap_or(c.bootstrap_fraction);
        c.max_level = s.max_level.unwrap_or(c.max_level);
        c.target = s.target.unwrap_or(c.target);
        c.clip = s.clip.unwrap_or(c.clip);
        c.bootstrap_cfg_scale = s.bootstrap_cfg_scale.unwrap_or(c.bootstrap_cfg_scale);
        c.label_dropout = s.label_dropout.unwrap_or(c.label_dropout);
        c.reuse_bootstrap_images = s.reuse_bootstrap_images.unwrap_or(c.reuse_bootstrap_images);
        c.validate()?;
        Ok(c)
    }
}

#[derive(Debug)]
pub struct Shortcut {
    pub cfg: ShortcutConfig,
    pub path: Box<dyn Interpolant>,
    pub flow_times: Box<dyn TimeSampler>,
    pub levels: DyadicSteps,
    pub dropout: LabelDropout,
}

impl Shortcut {
    fn clip(&self, x: Tensor) -> Tensor {
        if self.cfg.clip.is_finite() {
            x.clamp(-self.cfg.clip, self.cfg.clip)
        } else {
            x
        }
    }

    /// u = F̄(x, t, h, c) on all rows, with CFG F̄(∅) + w·(F̄(c) − F̄(∅)) on the first `n_cfg` rows
    /// (the code's extra unconditional pass over those rows only).
    fn target_forward(&self, net: &dyn VelocityField, x: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, n_cfg: i64) -> Tensor {
        let u = net.forward(x, t, h, class);
        if n_cfg == 0 {
            return u;
        }
        let head = |v: &Tensor| v.narrow(0, 0, n_cfg);
        let u_null = net.forward(&head(x), &head(t), &head(h), &null_classes(n_cfg, net.null_class(), x.device()));
        let guided = &u_null + (head(&u) - &u_null) * self.cfg.bootstrap_cfg_scale;
        let n = x.size()[0];
        Tensor::cat(&[guided, u.narrow(0, n_cfg, n - n_cfg)], 0)
    }

    /// Self-consistency targets for rows (x_t, t, h); returns (target, h).
    fn bootstrap_targets(&self, net: &dyn VelocityField, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        let n = x_t.size()[0];
        // The code guides the first ⌊B_b/levels⌋ rows, i.e. the finest level (h = 2^-(max_level-1)).
        let n_cfg = if self.cfg.bootstrap_cfg_scale != 1.0 { n / self.cfg.max_level as i64 } else { 0 };
        tch::no_grad(|| {
            let half = h / 2.0;
            let u1 = self.target_forward(net, x_t, t, &half, class, n_cfg);
            let x_mid = self.clip(x_t - per_sample(&half, x_t) * &u1);
            let u2 = self.target_forward(net, &x_mid, &(t - &half), &half, class, n_cfg);
            self.clip((u1 + u2) / 2.0)
        })
    }
}

impl Objective for Shortcut {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let x = &batch.x;
        let (b, device, kind) = (x.size()[0], x.device(), x.kind());
        let b_b = self.cfg.bootstrap_rows(b);
        let b_f = b - b_b;
        let net = nets.online;
        let eps = x.randn_like();

        // Flow rows: disjoint images b_b..b, or the code's first b_f images.
        let flow_start = if self.cfg.reuse_bootstrap_images { 0 } else { b_b };
        let rows = |v: &Tensor| v.narrow(0, flow_start, b_f);
        let t_f = self.flow_times.sample(b_f, device).to_kind(kind);
        let (class_f, _) = self.dropout.apply(&rows(&batch.class), net.null_class());
        let eps_f = if self.cfg.reuse_bootstrap_images { eps.narrow(0, b_b, b_f) } else { rows(&eps) };
        let flow_err = flow_matching_error(net, self.path.as_ref(), &rows(x), &eps_f, &t_f, self.cfg.flow_h, &class_f);
        if b_b == 0 {
            let value = flow_err.mean(None);
            return Loss { metrics: vec![("flow_loss", value.detach())], value };
        }

        // Bootstrap rows 0..b_b: dyadic h (finest level first), t = j·h, true labels.
        let pair = self.levels.sample(b_b, device);
        let (t_b, h_b) = (pair.t.to_kind(kind), pair.h().to_kind(kind));
        let x_b = x.narrow(0, 0, b_b);
        let class_b = batch.class.narrow(0, 0, b_b);
        let x_t = self.path.interpolate(&x_b, &eps.narrow(0, 0, b_b), &t_b);
        let target = self.bootstrap_targets(self.cfg.target.pick(nets), &x_t, &t_b, &h_b, &class_b);
        let boot_err = (net.forward(&x_t, &t_b, &h_b, &class_b) - target).square();

        let value = Tensor::cat(&[&boot_err, &flow_err], 0).mean(None);
        let mut metrics = vec![("bootstrap_loss", boot_err.mean(None).detach())];
        if b_f > 0 {
            metrics.push(("flow_loss", flow_err.mean(None).detach()));
        }
        Loss { value, metrics }
    }

    /// The bootstrap rows must hold at least one row per level (shortcut-models issue #11: with
    /// B_b < levels every row collapses to h = 1).
    fn check_batch_size(&self, batch_size: i64) -> anyhow::Result<()> {
        let b_b = self.cfg.bootstrap_rows(batch_size);
        let levels = self.cfg.max_level as i64;
        anyhow::ensure!(
            b_b == 0 || b_b >= levels,
            "shortcut: batch {batch_size} × bootstrap_fraction {} = {b_b} bootstrap rows, fewer than the {levels} levels; every level would collapse to h = 1 (shortcut-models issue #11)",
            self.cfg.bootstrap_fraction
        );
        Ok(())
    }
}
