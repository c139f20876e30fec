//! Counting network evaluations (NFE) as a wrapper, so a sampler's cost is measured rather than
//! derived from its rule: Heun's corrector, a guidance wrapper's doubled batch and any future
//! multistep rule count what they really run.
use std::cell::Cell;
use tch::Tensor;

use crate::VelocityField;

/// `net` with a count of its forward calls and of the rows they evaluated. Reading the row count
/// of `x_t` is a host-side shape query: counting adds no device synchronisation.
///
/// Put it **inside** any guidance wrapper (`Guided::new(&counter, w)`): classifier-free guidance
/// sends the conditional and unconditional halves as one call of 2B rows, which [`Self::nfe`]
/// counts as 2 evaluations per sample.
pub struct NfeCounter<'a> {
    net: &'a dyn VelocityField,
    calls: Cell<u64>,
    rows: Cell<i64>,
}

impl<'a> NfeCounter<'a> {
    pub fn new(net: &'a dyn VelocityField) -> Self {
        Self { net, calls: Cell::new(0), rows: Cell::new(0) }
    }

    /// Forward calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.get()
    }

    /// Rows evaluated so far, summed over calls.
    pub fn rows(&self) -> i64 {
        self.rows.get()
    }

    /// Network evaluations per sample when `batch` samples were generated: rows / batch.
    pub fn nfe(&self, batch: i64) -> f64 {
        assert!(batch >= 1, "NFE per sample needs a batch of at least one sample, got {batch}");
        self.rows.get() as f64 / batch as f64
    }

    /// Starts counting again from zero.
    pub fn reset(&self) {
        self.calls.set(0);
        self.rows.set(0);
    }
}

impl VelocityField for NfeCounter<'_> {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        self.calls.set(self.calls.get() + 1);
        self.rows.set(self.rows.get() + x_t.size()[0]);
        self.net.forward(x_t, t, h, class)
    }

    fn null_class(&self) -> i64 {
        self.net.null_class()
    }

    fn takes_guidance(&self) -> bool {
        self.net.takes_guidance()
    }

    fn forward_guidance(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, guidance: &crate::GuidanceInput) -> Option<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.rows.set(self.rows.get() + x_t.size()[0]);
        self.net.forward_guidance(x_t, t, h, class, guidance)
    }
}
