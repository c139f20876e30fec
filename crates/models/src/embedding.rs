//! Scalar-to-vector embeddings shared by the DiT and the small MLP: the sinusoidal timestep
//! features of DiT `models.py` (`TimestepEmbedder.timestep_embedding`) and the Shortcut code's
//! integer step-size level.
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Sinusoidal features per timestep embedder (DiT `frequency_embedding_size = 256`).
pub const TIMESTEP_FREQUENCIES: i64 = 256;
/// Longest period of the sinusoid (DiT `max_period = 10000`).
pub const MAX_PERIOD: f64 = 10_000.0;
/// The Shortcut code's finest level, log2 of `denoise_timesteps = 128` (methods.md §11); flow
/// matching rows (h = 0 here) get this level, as the code does.
pub const SHORTCUT_MAX_LEVEL: f64 = 7.0;

/// How the step size h = t − r enters a network. A plain string enum: `h_embedding = "log2_level"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HEmbedding {
    /// h itself (times the model's `t_scale`), like t (MeanFlow's second embedder).
    Continuous,
    /// The integer level −log2 h, clamped to [0, 7]; h = 0 gives 7 (Shortcut `model.py`, whose
    /// argument `dt` holds this level).
    Log2Level,
    /// h is ignored and no embedder is built (DiT; Shortcut's `ignore_dt` for naive/PD/CT/CD).
    None,
}

impl HEmbedding {
    /// The scalar fed to the h embedder, (B,) -> (B,); `None` for `HEmbedding::None`.
    pub fn input(self, h: &Tensor, t_scale: f64) -> Option<Tensor> {
        match self {
            HEmbedding::Continuous => Some(h * t_scale),
            HEmbedding::Log2Level => Some(log2_level(h)),
            HEmbedding::None => None,
        }
    }
}

/// [cos(s·f), sin(s·f)] with f_i = exp(−ln(max_period)·i/half), i < half = dim/2; cos first as in
/// DiT. `s` (B,) float, any dtype; returns (B, dim) in that dtype. `dim` must be even.
pub fn timestep_embedding(s: &Tensor, dim: i64, max_period: f64) -> Tensor {
    assert!(dim % 2 == 0, "timestep_embedding: dim {dim} must be even");
    let half = dim / 2;
    let freqs = (Tensor::arange(half, (s.kind(), s.device())) * (-max_period.ln() / half as f64)).exp(); // (half,)
    let args = s.unsqueeze(1) * freqs.unsqueeze(0); // (B, half)
    Tensor::cat(&[args.cos(), args.sin()], 1) // (B, dim)
}

/// The Shortcut level −log2 h rounded to an integer in [0, SHORTCUT_MAX_LEVEL], as a float (B,).
/// The clamp from below keeps h = 0 finite (level 7) and every op here has a zero forward
/// derivative almost everywhere, so tangents of h vanish instead of turning into NaN.
pub fn log2_level(h: &Tensor) -> Tensor {
    let floor = 2f64.powf(-SHORTCUT_MAX_LEVEL);
    h.clamp_min(floor).log2().neg().round().clamp(0.0, SHORTCUT_MAX_LEVEL) // (B,)
}

/// Stand-in for "no parameters" that still rejects unknown keys in an internally tagged enum
/// (style.md §5 rule 4).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}
