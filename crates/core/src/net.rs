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
