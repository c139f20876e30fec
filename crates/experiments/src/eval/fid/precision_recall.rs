//! Improved precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991), as the ADM
//! evaluator computes them on pool3 features: each set's manifold is the union of balls around its
//! points with radius the distance to the k-th nearest other point of the same set (k = 3);
//! precision is the share of samples inside the reference manifold, recall the share of
//! reference points inside the sample manifold.
//!
//! Distances are squared Euclidean in Float64, in row blocks (50k × 50k never exists at once).
//! The ADM evaluator computes them in float16 (float32 where float16 overflows), so on 10k–50k
//! sets its numbers can differ from these by a point lying within float16 rounding of a radius.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The neighbourhood size of the ADM evaluator and the paper.
pub const DEFAULT_K: usize = 3;
/// Distance entries per block (Float64: 256 MB).
const BLOCK_ENTRIES: i64 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrecisionRecall {
    pub precision: f64,
    pub recall: f64,
    /// neighbourhood size
    pub k: usize,
}

/// ‖aᵢ − bⱼ‖² for all pairs, (A, B) Float64, clamped at 0.
fn squared_distances(a: &Tensor, b: &Tensor) -> Tensor {
    let na = a.square().sum_dim_intlist(1, true, Kind::Double); // (A, 1)
    let nb = b.square().sum_dim_intlist(1, true, Kind::Double).tr(); // (1, B)
    (na - a.matmul(&b.tr()) * 2.0 + nb).clamp_min(0.0)
}

/// Rows per block when each row meets `cols` others.
fn block_rows(cols: i64) -> i64 {
    (BLOCK_ENTRIES / cols.max(1)).max(1)
}

/// Squared radius of each point's ball: the (k + 1)-th smallest squared distance in its own set
/// (the first is the point itself), (N,).
pub fn manifold_radii(features: &Tensor, k: usize) -> Result<Tensor> {
    let n = features.size()[0];
    ensure!(n as usize > k, "a k = {k} manifold needs more than {k} points, got {n}");
    let step = block_rows(n);
    let mut radii = Vec::new();
    let mut start = 0;
    while start < n {
        let len = step.min(n - start);
        let d = squared_distances(&features.narrow(0, start, len), features);
        radii.push(d.kthvalue(k as i64 + 1, 1, false).0);
        start += len;
    }
    Ok(Tensor::cat(&radii, 0))
}

/// Share of the rows of `points` that lie in some ball (centres `centres`, squared radii `radii`).
fn share_inside(points: &Tensor, centres: &Tensor, radii: &Tensor) -> f64 {
    let n = points.size()[0];
    let step = block_rows(centres.size()[0]);
    let (mut inside, mut start) = (0i64, 0);
    let radii = radii.unsqueeze(0); // (1, C)
    while start < n {
        let len = step.min(n - start);
        let d = squared_distances(&points.narrow(0, start, len), centres); // (len, C)
        inside += d.le_tensor(&radii).any_dim(1, false).sum(Kind::Int64).int64_value(&[]);
        start += len;
    }
    inside as f64 / n as f64
}

/// Precision and recall of `samples` (N₁, D) against `reference` (N₂, D), any float kind, computed
/// in Float64 on `device`.
pub fn precision_recall(reference: &Tensor, samples: &Tensor, k: usize, device: Device) -> Result<PrecisionRecall> {
    let (r, s) = (reference.size(), samples.size());
    ensure!(r.len() == 2 && s.len() == 2 && r[1] == s[1], "precision/recall needs (N, D) features of equal width, got {r:?} and {s:?}");
    ensure!(k >= 1, "precision/recall needs k >= 1");
    let _guard = tch::no_grad_guard();
    let (reference, samples) = (reference.to_device(device).to_kind(Kind::Double), samples.to_device(device).to_kind(Kind::Double));
    let ref_radii = manifold_radii(&reference, k)?;
    let sample_radii = manifold_radii(&samples, k)?;
    Ok(PrecisionRecall { precision: share_inside(&samples, &reference, &ref_radii), recall: share_inside(&reference, &samples, &sample_radii), k })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_give_the_whole_matrix_result_and_disjoint_sets_score_zero() {
        tch::manual_seed(1);
        let opts = (Kind::Double, Device::Cpu);
        let a = Tensor::randn([40, 5], opts);
        let b = Tensor::randn([30, 5], opts) + 0.3;
        let full = squared_distances(&a, &a).kthvalue(4, 1, false).0;
        let blocked = manifold_radii(&a, 3).unwrap();
        assert_eq!((full - blocked).abs().max().double_value(&[]), 0.0);
        // by hand: sample j is in if some reference ball holds it
        let rr = manifold_radii(&a, 3).unwrap();
        let by_hand = squared_distances(&b, &a).le_tensor(&rr.unsqueeze(0)).any_dim(1, false).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let pr = precision_recall(&a, &b, 3, Device::Cpu).unwrap();
        assert_eq!(pr.precision, by_hand);
        assert!(pr.precision > 0.3 && pr.recall > 0.3, "{pr:?}");
        let far = precision_recall(&a, &(b + 100.0), 3, Device::Cpu).unwrap();
        assert_eq!((far.precision, far.recall), (0.0, 0.0));
    }
}
