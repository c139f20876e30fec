//! Classifier-free guidance as a wrapper around any network (methods.md §3):
//! F_w = F(·, ∅) + w·(F(·, c) − F(·, ∅)), where w = 1 is unguided.
use tch::Tensor;

use crate::{per_sample, VelocityField};

/// `net` guided with `scale` w. The conditional and unconditional halves go through the network
/// as one batch of 2B. With `interval = Some((lo, hi))`, rows whose t lies outside [lo, hi] get the
/// plain conditional output (guidance interval, Kynkäänniemi et al., arXiv 2404.07724); the
/// selection is a tensor `where`, so it adds no host synchronisation.
///
/// w = 1 skips the unconditional half and returns the conditional output
/// exactly (one B-row forward).
///
/// A network that [takes guidance as an input](VelocityField::takes_guidance) (improved MeanFlow)
/// is instead called once on B rows with ω = `scale` and the interval (`interval`, default [0, 1])
/// as inputs: its guidance was learned in training, so no unconditional pass runs.
pub struct Guided<'a> {
    pub net: &'a dyn VelocityField,
    pub scale: f64,
    pub interval: Option<(f64, f64)>,
}

impl<'a> Guided<'a> {
    /// Guidance on every t.
    pub fn new(net: &'a dyn VelocityField, scale: f64) -> Self {
        Self { net, scale, interval: None }
    }
}

impl VelocityField for Guided<'_> {
    /// x_t (B, ...), t and h (B,), class (B,) Int64 → (B, ...).
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        if self.net.takes_guidance() {
            let (lo, hi) = self.interval.unwrap_or((0.0, 1.0));
            let g = crate::GuidanceInput::constant(t, self.scale, lo, hi);
            return self.net.forward_guidance(x_t, t, h, class, &g).expect("a network that takes guidance returns forward_guidance");
        }
        if self.scale == 1.0 {
            return self.net.forward(x_t, t, h, class);
        }
        let null = class.full_like(self.net.null_class());
        let both = self.net.forward(&Tensor::cat(&[x_t, x_t], 0), &Tensor::cat(&[t, t], 0), &Tensor::cat(&[h, h], 0), &Tensor::cat(&[class, &null], 0)); // (2B, ...)
        let halves = both.chunk(2, 0);
        let (cond, uncond) = (&halves[0], &halves[1]);
        let guided = uncond + (cond - uncond) * self.scale;
        match self.interval {
            None => guided,
            Some((lo, hi)) => {
                let inside = t.ge(lo).logical_and(&t.le(hi));
                guided.where_self(&per_sample(&inside, x_t), cond)
            }
        }
    }

    fn null_class(&self) -> i64 {
        self.net.null_class()
    }
}
