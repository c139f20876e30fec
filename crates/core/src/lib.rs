//! flowmap-core: the conventions and the math shared by every method.
//!
//! **One time convention everywhere: t = 0 is data, t = 1 is noise**, and
//! x_t = alpha(t)·x + sigma(t)·eps. Networks receive (x_t, t, h = t − r, class), where r <= t is
//! the time a step jumps to. Samplers walk a grid from t = 1 down to t = 0.
//!
//! * [`interpolant`]: paths and conversions between velocity, clean sample, noise and score;
//! * [`time`]: training-time and (t, r) pair samplers;
//! * [`sampling`]: the sampler over a time grid (one-step rules and multistep solvers);
//! * [`amed`]: the AMED-Solver's learned step predictor and its sampler;
//! * [`grid_search`]: time grids optimised for a trained model at a fixed number of steps;
//! * [`grids`]: sampling time grids (uniform in t, in log-SNR, EDM's rho schedule);
//! * [`guidance`]: classifier-free guidance as a wrapper; [`ema`]: the parameter EMA;
//! * [`gaussian`]: exact fields for Gaussian data (tests);
//! * [`net`]: the network trait; [`nfe`]: a wrapper that counts network evaluations.
pub mod amed;
pub mod config;
pub mod ema;
pub mod gaussian;
pub mod grid_search;
pub mod grids;
pub mod guidance;
pub mod interpolant;
pub mod net;
pub mod nfe;
pub mod sampling;
pub mod time;

pub use amed::{amed_sample, amed_step, AmedPredictor};
pub use config::NoParams;
pub use ema::Ema;
pub use gaussian::{ExactAverageVelocity, ExactEps, ExactTrigFlowJump, ExactVelocity, GaussianData};
pub use grid_search::{grid_error, search_grid, SearchedGrid};
pub use grids::{edm_grid, logsnr_grid, GridKind};
pub use guidance::Guided;
pub use interpolant::{DdpmConfig, DdpmSchedule, Interpolant, InterpolantConfig, Linear, SigmaMinConfig, TrigFlow, TrigFlowConfig, VpCosine, VpCosineConfig, VpLinearBeta};
pub use net::{per_sample, GuidanceInput, VelocityField};
pub use nfe::NfeCounter;
pub use sampling::{check_grid, dpm_solver_pp, sample, uniform_grid, unipc, Diffusion, DiffusionScale, Prediction, Reads, RuleName, StepRule, TimeGrid};
pub use time::{ConsistencyCurriculum, ConsistencyGrid, CtSchedule, DdpmSteps, DiscreteUniform, DyadicSteps, GridSpacing, LogitNormal, MeanFlowPairs, PairSampler, PairSamplerConfig, TimePair, TimeSampler, TimeSamplerConfig, Uniform};
