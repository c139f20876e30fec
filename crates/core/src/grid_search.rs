//! Optimised time grids for a trained model at a fixed number of steps, in the spirit of LD3
//! (Tong et al. 2024, arXiv 2405.15506) and "Align Your Steps" (Sabour et al. 2024, arXiv
//! 2404.14507): choose the interior times 1 = t_0 > t_1 > … > t_N = 0 that minimise the error of
//! the N-step sample to a many-step reference solution from the same noise.
//!
//! LD3 learns the times by gradient descent with an LPIPS-style loss; AYS minimises a KL bound
//! iteratively. Here, with N ≤ 10 free times, a derivative-free **coordinate search** is enough
//! and needs no gradient through the sampler: each sweep moves every interior time in turn to the
//! best point a golden-section search finds inside its neighbours' interval, keeping a move only
//! if the error drops. The error is the mean squared distance of the final samples (the
//! endpoint of the reference trajectory). Callers evaluate it on one noise batch and report it on
//! another (held out).
use tch::Tensor;

use crate::{sample, Interpolant, StepRule, VelocityField};

/// 1/φ, the golden-section ratio.
const INV_PHI: f64 = 0.618_033_988_749_895;

/// A searched grid with its error before and after the search (on the noise it was fitted on).
#[derive(Debug, Clone, PartialEq)]
pub struct SearchedGrid {
    pub times: Vec<f64>,
    pub start_error: f64,
    pub error: f64,
    /// Calls of the error function.
    pub evaluations: usize,
}

/// Minimises `error(grid)` over the interior points of `start` (strictly descending, its end
/// points stay) by `sweeps` coordinate sweeps of `probes` golden-section evaluations per point.
pub fn search_grid(start: &[f64], sweeps: usize, probes: usize, mut error: impl FnMut(&[f64]) -> f64) -> SearchedGrid {
    let mut times = start.to_vec();
    let start_error = error(&times);
    let mut best = start_error;
    let mut evaluations = 1;
    let n = times.len();
    for _ in 0..sweeps {
        for i in 1..n.saturating_sub(1) {
            // The interval between the neighbours, kept open by a small margin.
            let (hi, lo) = (times[i - 1], times[i + 1]);
            let margin = 1e-3 * (hi - lo);
            let (mut a, mut b) = (lo + margin, hi - margin);
            let mut at = |u: f64, times: &mut Vec<f64>| {
                let old = times[i];
                times[i] = u;
                let e = error(times);
                times[i] = old;
                e
            };
            let mut c = b - INV_PHI * (b - a);
            let mut d = a + INV_PHI * (b - a);
            let (mut fc, mut fd) = (at(c, &mut times), at(d, &mut times));
            evaluations += 2;
            let (mut arg, mut val) = if fc < fd { (c, fc) } else { (d, fd) };
            for _ in 2..probes {
                if fc < fd {
                    b = d;
                    (d, fd) = (c, fc);
                    c = b - INV_PHI * (b - a);
                    fc = at(c, &mut times);
                    if fc < val {
                        (arg, val) = (c, fc);
                    }
                } else {
                    a = c;
                    (c, fc) = (d, fd);
                    d = a + INV_PHI * (b - a);
                    fd = at(d, &mut times);
                    if fd < val {
                        (arg, val) = (d, fd);
                    }
                }
                evaluations += 1;
            }
            if val.is_finite() && val < best {
                times[i] = arg;
                best = val;
            }
        }
    }
    SearchedGrid { times, start_error, error: best, evaluations }
}

/// Mean squared distance between `rule`'s samples on `grid` from `noise` and `reference` (the
/// many-step solution from the same noise), under no_grad. A non-finite sample gives +∞.
pub fn grid_error(net: &dyn VelocityField, path: &dyn Interpolant, rule: StepRule, noise: &Tensor, class: &Tensor, reference: &Tensor, grid: &[f64]) -> f64 {
    let x = tch::no_grad(|| sample(net, path, noise.copy(), class, grid, rule));
    let e = f64::try_from((x - reference).square().mean(tch::Kind::Double)).unwrap_or(f64::INFINITY);
    if e.is_finite() {
        e
    } else {
        f64::INFINITY
    }
}
