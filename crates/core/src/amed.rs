//! AMED-Solver (Zhou et al. 2024, "Fast ODE-based sampling for diffusion models in around 5 steps",
//! arXiv 2312.00094; official code zju-pi/diff-sampler `amed-solver-main`): a small network
//! predicts, for each step t → r of a frozen velocity model, where inside the step to evaluate the
//! velocity (the mean-value theorem: x_r = x_t − (t − r)·v(x_s, s) for some s in between) and a
//! scale of the resulting direction. One step costs two network evaluations:
//!   v_t = F(x_t, t, 0);  s = t − rf·(t − r);  x_s = x_t − (t − s)·v_t;
//!   x_r = x_t − c_dir·(t − r)·F(x_s, s, 0).
//! Time runs from noise (t = 1) to data (t = 0) as everywhere in flowmap; the official code walks
//! EDM's sigma downwards, so only the interpolation of s and the inputs differ (below).
//!
//! Deviations from the official code, each for a reason:
//! * **What the predictor sees.** The official predictor reads the U-Net bottleneck (its channel
//!   mean, 8×8) captured by a forward hook during the step's first evaluation. flowmap's
//!   [`VelocityField`] exposes no inner features, so the predictor reads a summary of the state
//!   that costs no extra evaluation: x_t and the velocity v_t just computed, each flattened and
//!   average-pooled to [`AMED_POOL`] bins, plus their root-mean-square. Like the bottleneck it is
//!   a per-sample description of the current point; its encoder (two linear layers) is the
//!   official one with that input.
//! * **The time embedding** of t and r: cos/sin at frequencies π·2^k, k < [`AMED_TIME_FEATURES`]/2
//!   (t lies in [0, 1]; the official positional embedding is made for EDM's sigma in
//!   [0.002, 80]), then the official Linear + SiLU shared by both times.
//! * **The intermediate time** is the arithmetic s = t − rf·(t − r), not the official geometric
//!   s = t^(1−rf)·r^rf: flowmap's grids end at r = 0, where the geometric mean is 0 for every rf.
//! * **No analytical first step (AFS)**: on flow-matching paths v(x, 1) = x − E[data] is not the
//!   x/sigma the official AFS assumes, so every step costs two evaluations (NFE = 2·steps).
//! * **Initialisation**: the two output heads start at zero, so an untrained predictor is the
//!   midpoint rule (rf = 1/2, c_dir = 1); the official heads start random (Kaiming).
//! * Outputs as the official defaults (`train.py`: `scale_dir = 0.01`, `scale_time = 0`):
//!   rf ∈ (0, 1) (sigmoid) and c_dir ∈ (0.99, 1.01); no scale of the time at s.
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::{per_sample, VelocityField};

/// Bins each of x_t and v_t is average-pooled to (the official bottleneck summary is 8×8 = 64
/// values; 16 per tensor keeps the 2-D toy and MNIST on one architecture).
pub const AMED_POOL: i64 = 16;
/// Fourier features of each of t and r (the official `noise_channels = 8`).
pub const AMED_TIME_FEATURES: i64 = 8;
/// Hidden width of the feature encoder (official `hidden_dim = 128`).
pub const AMED_HIDDEN: i64 = 128;
/// Width of the encoded features (official `bottleneck_output_dim = 4`).
pub const AMED_ENCODED: i64 = 4;
/// c_dir ∈ [1 − 0.01, 1 + 0.01]: the official `train.py` default `--scale_dir 0.01`.
const SCALE_DIR_MIN: f64 = 0.99;
const SCALE_DIR_SPAN: f64 = 0.02;

/// The step predictor's parameters (created under one `nn::Path`, so a run saves them with its
/// objective's parameters and a sampler loads them by name).
#[derive(Debug)]
pub struct AmedPredictor {
    map_time: nn::Linear,
    enc0: nn::Linear,
    enc1: nn::Linear,
    fc_r: nn::Linear,
    fc_scale_dir: nn::Linear,
}

/// What the predictor says for one step, each (B,) Float.
#[derive(Debug)]
pub struct AmedChoice {
    /// The intermediate time s ∈ (r, t).
    pub s: Tensor,
    /// c_dir, the factor on the step's direction.
    pub scale_dir: Tensor,
}

impl AmedPredictor {
    /// Creates the parameters under `p` (names: `map_time`, `enc0`, `enc1`, `fc_r`,
    /// `fc_scale_dir`).
    pub fn new(p: &nn::Path) -> Self {
        let features = 2 * AMED_POOL + 2;
        let heads = 2 * AMED_TIME_FEATURES + AMED_ENCODED;
        let lin = |name: &str, i: i64, o: i64| nn::linear(p / name, i, o, Default::default());
        // Zero heads: training starts from the midpoint rule (rf = 1/2, c_dir = 1).
        let head = |name: &str| nn::linear(p / name, heads, 1, nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true });
        Self { map_time: lin("map_time", AMED_TIME_FEATURES, AMED_TIME_FEATURES), enc0: lin("enc0", features, AMED_HIDDEN), enc1: lin("enc1", AMED_HIDDEN, AMED_ENCODED), fc_r: head("fc_r"), fc_scale_dir: head("fc_scale_dir") }
    }

    /// (B, AMED_TIME_FEATURES) embedding of the time `t` for `b` rows.
    fn embed_time(&self, t: f64, b: i64, device: tch::Device) -> Tensor {
        let half = AMED_TIME_FEATURES / 2;
        let freqs = (Tensor::arange(half, (Kind::Float, device)) * std::f64::consts::LN_2).exp() * std::f64::consts::PI;
        let arg = freqs * t;
        let emb = Tensor::cat(&[arg.cos(), arg.sin()], 0).unsqueeze(0);
        self.map_time.forward(&emb).silu().expand([b, AMED_TIME_FEATURES], false)
    }

    /// The choice for a step t → r from the state `x_t` (B, ...) and its velocity `v` (same shape).
    pub fn predict(&self, x_t: &Tensor, v: &Tensor, t: f64, r: f64) -> AmedChoice {
        let b = x_t.size()[0];
        let device = x_t.device();
        let summary = |z: &Tensor| {
            let flat = z.to_kind(Kind::Float).reshape([b, -1]); // (B, N)
            let pooled = flat.unsqueeze(1).adaptive_avg_pool1d([AMED_POOL]).squeeze_dim(1); // (B, P)
            let rms = flat.square().mean_dim(1, true, Kind::Float).sqrt(); // (B, 1)
            (pooled, rms)
        };
        let (px, rx) = summary(x_t);
        let (pv, rv) = summary(v);
        let features = Tensor::cat(&[px, pv, rx, rv], 1); // (B, 2P + 2)
        let encoded = self.enc1.forward(&self.enc0.forward(&features).silu()); // (B, 4)
        let input = Tensor::cat(&[encoded, self.embed_time(t, b, device), self.embed_time(r, b, device)], 1);
        let rf = self.fc_r.forward(&input).sigmoid().squeeze_dim(1); // (B,)
        let scale_dir = self.fc_scale_dir.forward(&input).sigmoid().squeeze_dim(1) * SCALE_DIR_SPAN + SCALE_DIR_MIN;
        AmedChoice { s: rf * (r - t) + t, scale_dir }
    }
}

/// One AMED step t → r of `net` (read as a velocity at h = 0) from `x` (B, ...): two network
/// calls. Differentiable in the predictor's parameters (training calls it outside no_grad).
pub fn amed_step(net: &dyn VelocityField, predictor: &AmedPredictor, x: &Tensor, t: f64, r: f64, class: &Tensor) -> Tensor {
    let b = x.size()[0];
    let kind = if x.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let zero = Tensor::zeros([b], (kind, x.device()));
    let v = net.forward(x, &Tensor::full([b], t, (kind, x.device())), &zero, class);
    let choice = predictor.predict(x, &v, t, r);
    let s = choice.s.to_kind(kind);
    let x_s = x - per_sample(&(-&s + t), x) * &v;
    let v_s = net.forward(&x_s, &s, &zero, class);
    x - per_sample(&choice.scale_dir.to_kind(kind), x) * v_s * (t - r)
}

/// Samples from `noise` (B, ...) along `grid` (strictly descending, 1 → 0) with one AMED step
/// per interval, under no_grad: NFE = 2·(grid.len() − 1).
pub fn amed_sample(net: &dyn VelocityField, predictor: &AmedPredictor, noise: Tensor, class: &Tensor, grid: &[f64]) -> Tensor {
    if let Err(e) = crate::check_grid(grid) {
        panic!("{e}");
    }
    tch::no_grad(|| {
        let mut x = noise;
        for w in grid.windows(2) {
            x = amed_step(net, predictor, &x, w[0], w[1], class);
        }
        x
    })
}
