//! flowmap-core: the conventions and the math shared by every method.
//!
//! **One time convention everywhere: t = 0 is data, t = 1 is noise**, and
//! x_t = alpha(t)·x + sigma(t)·eps. Networks receive (x_t, t, h = t − r, class), where r <= t is
//! the time a step jumps to. Samplers walk a grid from t = 1 down to t = 0.
pub mod config;
pub mod interpolant;
pub mod net;
pub mod time;

pub use config::NoParams;
pub use interpolant::{
    DdpmConfig, DdpmSchedule, Interpolant, InterpolantConfig, Linear, SigmaMinConfig, TrigFlow, TrigFlowConfig,
    VpCosine, VpCosineConfig, VpLinearBeta,
};
pub use net::{per_sample, VelocityField};
pub use time::{
    ConsistencyCurriculum, ConsistencyGrid, CtSchedule, DdpmSteps, DiscreteUniform, DyadicSteps, GridSpacing,
    LogitNormal, MeanFlowPairs, PairSampler, PairSamplerConfig, TimePair, TimeSampler, TimeSamplerConfig, Uniform,
};
