//! Training-time samplers (methods.md §2.2, §9, §11.2, §12.3).
//!
//! **Randomness.** Every sampler draws from libtorch's global generator of the target device
//! (`Tensor::rand`, `randn`, `randint`). Seed it with `tch::manual_seed(seed)` (which seeds the CPU
//! and all CUDA generators); the same seed and the same sequence of calls give the same draws.
//! Deterministic parts (MeanFlow's equal-time rows, Shortcut's level layout) follow the official
//! code's row order exactly.
//!
//! All samplers return Float (f32) tensors on `device`; cast with `to_kind` where float64 is needed.
//! No sampler reads a tensor back to the host.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::NoParams;

/// Training times in [0, 1].
pub trait TimeSampler: std::fmt::Debug + Send {
    /// n times, shape (n,), Float, on `device`.
    fn sample(&self, n: i64, device: Device) -> Tensor;
}

/// A time t and a jump target r ≤ t, both (n,) Float.
#[derive(Debug)]
pub struct TimePair {
    pub t: Tensor,
    pub r: Tensor,
}

impl TimePair {
    /// The jump length h = t − r, (n,).
    pub fn h(&self) -> Tensor {
        &self.t - &self.r
    }
}

/// Training pairs (t, r) with 0 ≤ r ≤ t ≤ 1.
pub trait PairSampler: std::fmt::Debug + Send {
    /// n pairs on `device`.
    fn sample(&self, n: i64, device: Device) -> TimePair;
    /// n pairs at training step `step`. Curricula ([`ConsistencyCurriculum`]) depend on it; the
    /// other samplers ignore it. Objectives should call this one.
    fn sample_at_step(&self, n: i64, step: u64, device: Device) -> TimePair {
        let _ = step;
        self.sample(n, device)
    }
}

/// t ~ U[0, 1).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Uniform;

impl TimeSampler for Uniform {
    fn sample(&self, n: i64, device: Device) -> Tensor {
        Tensor::rand([n], (Kind::Float, device))
    }
}

/// t = sigmoid(mean + std·z), z ~ N(0, 1). MeanFlow ImageNet: mean = −0.4, std = 1.0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitNormal {
    pub mean: f64,
    pub std: f64,
}

impl TimeSampler for LogitNormal {
    fn sample(&self, n: i64, device: Device) -> Tensor {
        (Tensor::randn([n], (Kind::Float, device)) * self.std + self.mean).sigmoid()
    }
}

/// t = 1 − j/bins with j ~ U{0, …, bins − 1}, so t ∈ {1/bins, …, 1} (Shortcut code's flow rows,
/// bins = 128; methods.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiscreteUniform {
    pub bins: i64,
}

impl TimeSampler for DiscreteUniform {
    fn sample(&self, n: i64, device: Device) -> Tensor {
        let j = Tensor::randint(self.bins, [n], (Kind::Int64, device));
        1.0 - j.to_kind(Kind::Float) / self.bins as f64
    }
}

/// DDPM's integer schedule: n ~ U{0, …, steps − 1}, returned as t_n = (n + 1)/steps
/// (methods.md §5; recover n with `DdpmSchedule::step_of_t`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpmSteps {
    pub steps: i64,
}

impl TimeSampler for DdpmSteps {
    fn sample(&self, n: i64, device: Device) -> Tensor {
        let step = Tensor::randint(self.steps, [n], (Kind::Int64, device));
        (step.to_kind(Kind::Float) + 1.0) / self.steps as f64
    }
}

/// MeanFlow pairs (methods.md §12.3): two draws from `times`, t = max, r = min; the **first**
/// ⌊equal_fraction·n⌋ rows get r = t (deterministically, as in the official JAX code, where
/// `data_proportion` = 0.75 is this fraction; py-meanflow's `ratio` is 1 − equal_fraction).
#[derive(Debug)]
pub struct MeanFlowPairs {
    pub times: Box<dyn TimeSampler>,
    pub equal_fraction: f64,
}

impl MeanFlowPairs {
    /// The number of rows with r = t in a batch of n: ⌊equal_fraction·n⌋ (Python's `int()`).
    pub fn equal_rows(&self, n: i64) -> i64 {
        (n as f64 * self.equal_fraction).floor() as i64
    }
}

impl PairSampler for MeanFlowPairs {
    fn sample(&self, n: i64, device: Device) -> TimePair {
        let a = self.times.sample(n, device);
        let b = self.times.sample(n, device);
        let t = a.maximum(&b);
        let r = a.minimum(&b);
        let equal = Tensor::arange(n, (Kind::Int64, device)).lt(self.equal_rows(n));
        let r = t.where_self(&equal, &r);
        TimePair { t, r }
    }
}

/// Shortcut's dyadic step sizes (methods.md §11.2): levels k = max_level, max_level − 1, …, 0,
/// each repeated ⌊n/(max_level + 1)⌋ times in that row order, the remainder at k = 0; h = 2^−k and
/// t = j·h with j ~ U{1, …, 2^k}, so r = t − h ∈ {0, h, …, 1 − h}.
///
/// Shortcut's bootstrap rows use max_level = 6 (their half steps reach 2^−7). The code's row order
/// matters: its CFG bootstrap rows are the first ⌊n/7⌋, those at the finest level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DyadicSteps {
    pub max_level: u32,
}

impl DyadicSteps {
    /// Levels k per row, (n,) Int64. Panics if n < max_level + 1: every level would collapse to
    /// k = 0 (shortcut-models issue #11).
    pub fn levels(&self, n: i64, device: Device) -> Tensor {
        let count = self.max_level as i64 + 1;
        let per = n / count;
        assert!(per >= 1, "dyadic step sampler needs at least {count} rows (one per level), got {n} (shortcut-models issue #11)");
        let q = Tensor::arange(n, (Kind::Int64, device)).floor_divide_scalar(per);
        let level = (-&q) + self.max_level as i64;
        level.where_self(&q.lt(count), &level.zeros_like())
    }
}

impl PairSampler for DyadicSteps {
    fn sample(&self, n: i64, device: Device) -> TimePair {
        let level = self.levels(n, device).to_kind(Kind::Double);
        let sections = level.exp2(); // 2^k, exact for integer k
        let u = Tensor::rand([n], (Kind::Double, device));
        let j = (u * &sections).floor() + 1.0;
        let t = (&j / &sections).to_kind(Kind::Float);
        let r = ((j - 1.0) / sections).to_kind(Kind::Float);
        TimePair { t, r }
    }
}

/// How the points of a consistency-training grid are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GridSpacing {
    /// t_i = i/(points − 1), i = 0..points−1 (Shortcut code, \[seed\] 10633).
    Uniform(NoParams),
    /// Karras et al. noise levels sigma_i = (sigma_min^(1/rho) + i/(points−1)·(sigma_max^(1/rho) −
    /// sigma_min^(1/rho)))^rho in EDM units, mapped to t = sigma/(1 + sigma) (methods.md §1.3, EDM row).
    Karras(KarrasSpacing),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KarrasSpacing {
    pub sigma_min: f64, // EDM noise level of the first point; default 0.002
    pub sigma_max: f64, // EDM noise level of the last point; default 80
    /// default 7
    pub rho: f64,
}
impl Default for KarrasSpacing {
    fn default() -> Self {
        Self { sigma_min: 0.002, sigma_max: 80.0, rho: 7.0 }
    }
}

impl GridSpacing {
    /// Times of grid indices `i` (any shape, Int64) on a grid of `points` points, as Double.
    fn time_of(&self, i: &Tensor, points: i64) -> Tensor {
        let frac = i.to_kind(Kind::Double) / (points - 1) as f64;
        match *self {
            Self::Uniform(_) => frac,
            Self::Karras(k) => {
                let lo = k.sigma_min.powf(1.0 / k.rho);
                let hi = k.sigma_max.powf(1.0 / k.rho);
                let sigma = (frac * (hi - lo) + lo).pow_tensor_scalar(k.rho);
                &sigma / (&sigma + 1.0)
            }
        }
    }

    /// All times of a `points`-point grid, ascending, on the host.
    pub fn times(&self, points: i64) -> Vec<f64> {
        let i = Tensor::arange(points, (Kind::Int64, Device::Cpu));
        Vec::<f64>::try_from(self.time_of(&i, points)).expect("CPU Double tensor to Vec<f64>")
    }
}

/// Adjacent points of a fixed `points`-point grid: i ~ U{0, …, points − 2}, r = t_i, t = t_{i+1}
/// (methods.md §9.1). The grid runs from t = 0 (uniform) or t_min > 0 (Karras) to t = 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConsistencyGrid {
    pub points: i64,
    pub spacing: GridSpacing,
}

impl PairSampler for ConsistencyGrid {
    fn sample(&self, n: i64, device: Device) -> TimePair {
        assert!(self.points >= 2, "a consistency grid needs at least 2 points, got {}", self.points);
        let i = Tensor::randint(self.points - 1, [n], (Kind::Int64, device));
        let r = self.spacing.time_of(&i, self.points).to_kind(Kind::Float);
        let t = self.spacing.time_of(&(&i + 1), self.points).to_kind(Kind::Float);
        TimePair { t, r }
    }
}

/// How the number of grid points grows during consistency training.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CtSchedule {
    /// A fixed number of points.
    Fixed(FixedPoints),
    /// Shortcut code (`targets_consistency_training.py`, methods.md §9.2): stage
    /// k = min(⌊step/(total_steps/stages)⌋, stages − 1) uses 2^k intervals (2^k + 1 points).
    /// With stages = 7 (log2 of 128 denoise steps) the grid goes 1, 2, 4, …, 64 intervals.
    Doubling(DoublingSchedule),
    /// OpenAI `scale_mode = progressive` (consistency_models `create_ema_and_scales_fn`):
    /// N(k) = max(⌈√(k/K·((s₁ + 1)² − s₀²) + s₀²) − 1⌉, 1) + 1 points.
    Progressive(ProgressiveSchedule),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FixedPoints {
    pub points: i64, // grid points, >= 2
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DoublingSchedule {
    /// number of doublings; Shortcut code: 7
    pub stages: u32,
    pub total_steps: u64, // training steps the curriculum spans
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressiveSchedule {
    pub start_scales: i64, // s₀; OpenAI CT ImageNet-64: 2
    /// s₁; OpenAI CT ImageNet-64: 200
    pub end_scales: i64,
    /// K
    pub total_steps: u64,
}

impl CtSchedule {
    /// Number of grid points at training step `step`.
    pub fn points(&self, step: u64) -> i64 {
        match *self {
            Self::Fixed(f) => f.points,
            Self::Doubling(d) => {
                let stage_len = d.total_steps as f64 / d.stages as f64;
                let k = ((step as f64 / stage_len).floor() as u32).min(d.stages.saturating_sub(1));
                (1i64 << k) + 1
            }
            Self::Progressive(p) => {
                let frac = step as f64 / p.total_steps as f64;
                let s0 = p.start_scales as f64;
                let s1 = p.end_scales as f64;
                let scales = ((frac * ((s1 + 1.0).powi(2) - s0 * s0) + s0 * s0).sqrt() - 1.0).ceil();
                (scales as i64).max(1) + 1
            }
        }
    }

    /// OpenAI's adaptive target EMA at `step`: mu = exp(−c/(N − 1)) with c = −ln(start_ema)·s₀,
    /// N = `points(step)`, and s₀ = start_scales for `Progressive`, `points(0)` − 1 otherwise.
    pub fn adaptive_ema(&self, step: u64, start_ema: f64) -> f64 {
        let s0 = match *self {
            Self::Progressive(p) => p.start_scales as f64,
            _ => (self.points(0) - 1) as f64,
        };
        let c = -start_ema.ln() * s0;
        (-c / (self.points(step) - 1) as f64).exp()
    }
}

/// The consistency-training discretisation curriculum: a [`ConsistencyGrid`] whose number of points
/// follows `schedule`. `sample` (without a step) uses the final, finest grid; objectives call
/// `sample_at_step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConsistencyCurriculum {
    pub spacing: GridSpacing,
    pub schedule: CtSchedule,
}

impl ConsistencyCurriculum {
    /// The grid in use at `step`.
    pub fn grid_at(&self, step: u64) -> ConsistencyGrid {
        ConsistencyGrid { points: self.schedule.points(step), spacing: self.spacing }
    }
}

impl PairSampler for ConsistencyCurriculum {
    fn sample(&self, n: i64, device: Device) -> TimePair {
        self.grid_at(u64::MAX).sample(n, device)
    }
    fn sample_at_step(&self, n: i64, step: u64, device: Device) -> TimePair {
        self.grid_at(step).sample(n, device)
    }
}

// ---------------------------------------------------------------------------------------------
// Config

/// Which time sampler to build; TOML `kind = "..."`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TimeSamplerConfig {
    Uniform(NoParams),
    LogitNormal(LogitNormalConfig),
    DiscreteUniform(DiscreteUniformConfig),
    DdpmSteps(DdpmStepsConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogitNormalConfig {
    pub mean: f64, // default -0.4 (MeanFlow ImageNet)
    /// default 1.0 (MeanFlow ImageNet)
    pub std: f64,
}
impl Default for LogitNormalConfig {
    fn default() -> Self {
        Self { mean: -0.4, std: 1.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscreteUniformConfig {
    pub bins: i64, // default 128 (Shortcut `denoise_timesteps`)
}
impl Default for DiscreteUniformConfig {
    fn default() -> Self {
        Self { bins: 128 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DdpmStepsConfig {
    pub steps: i64, // default 1000
}
impl Default for DdpmStepsConfig {
    fn default() -> Self {
        Self { steps: 1000 }
    }
}

impl Default for TimeSamplerConfig {
    fn default() -> Self {
        Self::Uniform(NoParams {})
    }
}

impl TimeSamplerConfig {
    /// Checks value ranges.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::Uniform(_) => {}
            Self::LogitNormal(c) => anyhow::ensure!(c.mean.is_finite() && c.std.is_finite() && c.std > 0.0, "logit-normal needs a finite mean and a finite std > 0, got mean {} and std {}", c.mean, c.std),
            Self::DiscreteUniform(c) => anyhow::ensure!(c.bins >= 1, "bins must be >= 1, got {}", c.bins),
            Self::DdpmSteps(c) => anyhow::ensure!(c.steps >= 1, "steps must be >= 1, got {}", c.steps),
        }
        Ok(())
    }

    /// Builds the sampler. Panics on out-of-range values (see [`Self::validate`]).
    pub fn build(&self) -> Box<dyn TimeSampler> {
        if let Err(e) = self.validate() {
            panic!("invalid time sampler config: {e}");
        }
        match *self {
            Self::Uniform(_) => Box::new(Uniform),
            Self::LogitNormal(c) => Box::new(LogitNormal { mean: c.mean, std: c.std }),
            Self::DiscreteUniform(c) => Box::new(DiscreteUniform { bins: c.bins }),
            Self::DdpmSteps(c) => Box::new(DdpmSteps { steps: c.steps }),
        }
    }
}

/// Which pair sampler to build; TOML `kind = "..."`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PairSamplerConfig {
    MeanFlow(MeanFlowPairsConfig),
    Dyadic(DyadicConfig),
    Consistency(ConsistencyConfig),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeanFlowPairsConfig {
    /// share of rows with r = t; default 0.75 (MeanFlow `data_proportion`)
    pub equal_fraction: f64,
    pub times: TimeSamplerConfig, // each of the two draws; default logit-normal(-0.4, 1.0)
}
impl Default for MeanFlowPairsConfig {
    fn default() -> Self {
        Self { equal_fraction: 0.75, times: TimeSamplerConfig::LogitNormal(LogitNormalConfig::default()) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DyadicConfig {
    pub max_level: u32, // finest level k of h = 2^-k; Shortcut bootstrap rows: 6
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyConfig {
    pub spacing: GridSpacing,
    pub schedule: CtSchedule,
}

impl PairSamplerConfig {
    /// Checks value ranges.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::MeanFlow(c) => {
                anyhow::ensure!((0.0..=1.0).contains(&c.equal_fraction), "equal_fraction must be in [0, 1], got {}", c.equal_fraction);
                c.times.validate()?;
            }
            Self::Dyadic(c) => anyhow::ensure!(c.max_level <= 30, "max_level must be <= 30, got {}", c.max_level),
            Self::Consistency(c) => {
                match c.schedule {
                    CtSchedule::Fixed(f) => anyhow::ensure!(f.points >= 2, "points must be >= 2, got {}", f.points),
                    CtSchedule::Doubling(d) => {
                        anyhow::ensure!((1..=30).contains(&d.stages), "stages must be in 1..=30, got {}", d.stages);
                        anyhow::ensure!(d.total_steps >= 1, "total_steps must be >= 1");
                    }
                    CtSchedule::Progressive(p) => {
                        anyhow::ensure!(1 <= p.start_scales && p.start_scales <= p.end_scales, "need 1 <= start_scales <= end_scales, got {} and {}", p.start_scales, p.end_scales);
                        anyhow::ensure!(p.total_steps >= 1, "total_steps must be >= 1");
                    }
                }
                if let GridSpacing::Karras(k) = c.spacing {
                    anyhow::ensure!(0.0 < k.sigma_min && k.sigma_min < k.sigma_max && k.sigma_max.is_finite() && k.rho > 0.0 && k.rho.is_finite(), "need 0 < sigma_min < sigma_max < inf and 0 < rho < inf");
                }
            }
        }
        Ok(())
    }

    /// Builds the sampler. Panics on out-of-range values (see [`Self::validate`]).
    pub fn build(&self) -> Box<dyn PairSampler> {
        if let Err(e) = self.validate() {
            panic!("invalid pair sampler config: {e}");
        }
        match self {
            Self::MeanFlow(c) => Box::new(MeanFlowPairs { times: c.times.build(), equal_fraction: c.equal_fraction }),
            Self::Dyadic(c) => Box::new(DyadicSteps { max_level: c.max_level }),
            Self::Consistency(c) => Box::new(ConsistencyCurriculum { spacing: c.spacing, schedule: c.schedule }),
        }
    }
}
