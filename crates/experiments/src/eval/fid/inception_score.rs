//! Inception Score (Salimans et al. 2016, arXiv:1606.03498): exp E_x KL(p(y|x) ‖ p(y)), averaged
//! over splits of the samples, from the 1008-way logits of the FID Inception graph (see
//! [`super::inception_net::LogitsHead`]).
//!
//! Splits are contiguous and in sample order. The ADM evaluator cuts splits of 5,000 samples
//! (`compute_inception_score(split_size=5000)`: 10 splits of a 50k batch, the last one shorter when
//! N is not a multiple); torch-fidelity cuts 10 splits at i·N/10 (after a shuffle it can turn
//! off). Both are [`IsSplits`]; at N = 50,000 they give the same splits.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How the samples are cut into splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsSplits {
    /// k splits, split i = rows i·N/k … (i + 1)·N/k (torch-fidelity with `samples_shuffle=False`)
    Count(usize),
    /// consecutive splits of this many rows, the last one what is left (the ADM evaluator: 5000)
    Size(usize),
}

/// The ADM evaluator's split size.
pub const ADM_SPLIT_SIZE: usize = 5000;

impl Default for IsSplits {
    /// 10 splits (the usual protocol; the ADM evaluator's at 50k samples).
    fn default() -> Self {
        IsSplits::Count(10)
    }
}

impl std::str::FromStr for IsSplits {
    type Err = anyhow::Error;
    /// `10` (a count) or `size:5000` (a split size).
    fn from_str(s: &str) -> Result<Self> {
        let parsed = match s.strip_prefix("size:") {
            Some(size) => size.trim().parse().map(IsSplits::Size),
            None => s.trim().parse().map(IsSplits::Count),
        };
        match parsed {
            Ok(IsSplits::Count(0) | IsSplits::Size(0)) | Err(_) => anyhow::bail!("Inception Score splits `{s}`: expected a count >= 1 (e.g. 10) or `size:N` with N >= 1 (the ADM evaluator's is size:5000)"),
            Ok(v) => Ok(v),
        }
    }
}

impl IsSplits {
    /// Row ranges of the splits of `n` rows.
    fn ranges(self, n: usize) -> Vec<std::ops::Range<usize>> {
        match self {
            IsSplits::Count(k) => (0..k).map(|i| i * n / k..(i + 1) * n / k).collect(),
            IsSplits::Size(s) => (0..n).step_by(s.max(1)).map(|start| start..(start + s).min(n)).collect(),
        }
    }
}

/// Mean and (population) standard deviation of the per-split scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InceptionScore {
    pub mean: f64,
    pub std: f64,
    pub splits: usize,
}

/// Inception Score of (N, C) logits (any float kind; computed in Float64).
pub fn inception_score(logits: &Tensor, splits: IsSplits) -> Result<InceptionScore> {
    let s = logits.size();
    ensure!(s.len() == 2 && s[1] >= 2, "Inception Score needs (N, classes) logits, got {s:?}");
    let n = s[0] as usize;
    let ranges = splits.ranges(n);
    ensure!(!ranges.is_empty() && ranges.iter().all(|r| !r.is_empty()), "Inception Score with {splits:?} needs at least one sample per split, got {n} samples");
    let logits = logits.to_kind(Kind::Double);
    let log_p = logits.log_softmax(1, Kind::Double); // (N, C)
    let p = log_p.exp();
    let scores: Vec<f64> = ranges
        .iter()
        .map(|r| {
            let (lp, pp) = (log_p.narrow(0, r.start as i64, r.len() as i64), p.narrow(0, r.start as i64, r.len() as i64));
            let log_q = pp.mean_dim(0, true, Kind::Double).log(); // (1, C): log p(y)
            let kl = (&pp * (&lp - log_q)).sum_dim_intlist(1, false, Kind::Double); // (n,)
            kl.mean(Kind::Double).exp().double_value(&[])
        })
        .collect();
    let k = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / k;
    let std = (scores.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / k).sqrt();
    Ok(InceptionScore { mean, std, splits: scores.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn one_confident_class_per_split_member_gives_the_class_count() {
        // Each row is certain of its own class and the classes are spread evenly over 4 of them:
        // KL = log 4 for every row, so IS = 4 exactly; a constant prediction gives 1.
        let class = Tensor::arange(8, (Kind::Int64, Device::Cpu)).remainder(4);
        let logits = class.one_hot(6).to_kind(Kind::Double) * 200.0;
        let is = inception_score(&logits, IsSplits::Count(2)).unwrap();
        assert!((is.mean - 4.0).abs() < 1e-9 && is.std < 1e-9 && is.splits == 2, "{is:?}");
        let flat = inception_score(&Tensor::ones([8, 6], (Kind::Double, Device::Cpu)), IsSplits::Size(3)).unwrap();
        assert!((flat.mean - 1.0).abs() < 1e-12 && flat.splits == 3, "{flat:?}");
        assert_eq!(IsSplits::Size(5000).ranges(12_000), vec![0..5000, 5000..10_000, 10_000..12_000]);
        assert_eq!(IsSplits::Count(10).ranges(50_000), IsSplits::Size(ADM_SPLIT_SIZE).ranges(50_000));
    }
}
