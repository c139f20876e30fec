//! The network interface every objective trains and every sampler walks.
use tch::Tensor;

/// A network F(x_t, t, h, class).
///
/// * `x_t`: (B, C, H, W) or (B, D) float; `t`, `h`: (B,) float with 0 <= h <= t <= 1;
///   `class`: (B,) Int64, where `null_class()` means "no label".
/// * Returns a tensor shaped like `x_t`: the average velocity over [t − h, t]; h = 0 gives the
///   instantaneous velocity dx_t/dt. An objective may read the output otherwise (DDPM reads eps);
///   its docs say so.
pub trait VelocityField {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor;
    /// The class index that means "unconditional" (K for K classes; 0 for an unconditional model).
    fn null_class(&self) -> i64;
    /// Whether the network takes a guidance scale and interval as inputs ([`Self::forward_guidance`];
    /// improved MeanFlow's conditioning). False by default.
    fn takes_guidance(&self) -> bool {
        false
    }
    /// The field conditioned on a guidance scale ω and interval ([`GuidanceInput`]), for networks
    /// that [take guidance](Self::takes_guidance); `None` for the others.
    fn forward_guidance(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, guidance: &GuidanceInput) -> Option<Tensor> {
        let _ = (x_t, t, h, class, guidance);
        None
    }
}

/// Guidance as a network input (improved MeanFlow, arXiv 2512.02012, `imfDiT.py`): the CFG scale
/// ω ≥ 1 and the interval [t_min, t_max] the guided field applies guidance on, each (B,) float.
#[derive(Debug)]
pub struct GuidanceInput {
    pub scale: Tensor,
    pub t_min: Tensor,
    pub t_max: Tensor,
}

impl GuidanceInput {
    /// The same (ω, t_min, t_max) for every row of `like` (B,).
    pub fn constant(like: &Tensor, scale: f64, t_min: f64, t_max: f64) -> Self {
        Self { scale: like.full_like(scale), t_min: like.full_like(t_min), t_max: like.full_like(t_max) }
    }
    /// Rows `a` then `b` (the 2B batch of a conditional and an unconditional pass).
    pub fn cat(a: &Self, b: &Self) -> Self {
        Self { scale: Tensor::cat(&[&a.scale, &b.scale], 0), t_min: Tensor::cat(&[&a.t_min, &b.t_min], 0), t_max: Tensor::cat(&[&a.t_max, &b.t_max], 0) }
    }
}

impl<F: Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Tensor> VelocityField for (F, i64) {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        (self.0)(x_t, t, h, class)
    }
    fn null_class(&self) -> i64 {
        self.1
    }
}

/// A per-sample scalar `s` of shape (B,) reshaped to broadcast against `like` (B, ...).
pub fn per_sample(s: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
    s.reshape(shape.as_slice())
}
