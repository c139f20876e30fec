//! Label dropout for classifier-free guidance (methods.md §3): a training row gets the null class
//! with probability p, so one network learns both F(·|c) and F(·|∅). The objective owns it because
//! MeanFlow changes the target of dropped rows (§12.4) and Shortcut keeps labels on bootstrap rows
//! (§11.3). Draws come from tch's global generator.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Which rows a dropout draw hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropRows {
    /// Each row independently with probability p (DiT, Shortcut).
    #[default]
    Random,
    /// The number of dropped rows is drawn as for `random`, but the dropped rows are the first
    /// ones of the batch (official MeanFlow `cond_drop`: `arange(bz) < num_drop`). Combined with
    /// MeanFlow's "first rows get r = t", dropout then falls mostly on r = t rows.
    Leading,
}

/// Label dropout with probability `p` on the rows chosen by `rows`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelDropout {
    pub p: f64,
    pub rows: DropRows,
}

impl LabelDropout {
    pub fn new(p: f64) -> Self {
        Self { p, rows: DropRows::Random }
    }

    /// Checks 0 <= p <= 1.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!((0.0..=1.0).contains(&self.p), "label_dropout must be in [0, 1], got {}", self.p);
        Ok(())
    }

    /// (n,) Bool mask of dropped rows, or `None` when p = 0 (then nothing is drawn).
    pub fn mask(&self, n: i64, device: Device) -> Option<Tensor> {
        if self.p <= 0.0 {
            return None;
        }
        let hit = Tensor::rand([n], (Kind::Float, device)).lt(self.p); // (n,) Bool
        Some(match self.rows {
            DropRows::Random => hit,
            // No host sync: the count stays a tensor.
            DropRows::Leading => Tensor::arange(n, (Kind::Int64, device)).lt_tensor(&hit.sum(Kind::Int64)),
        })
    }

    /// `class` (n,) Int64 with the dropped rows set to `null_class`, and the mask (None if p = 0).
    pub fn apply(&self, class: &Tensor, null_class: i64) -> (Tensor, Option<Tensor>) {
        match self.mask(class.size()[0], class.device()) {
            None => (class.shallow_clone(), None),
            Some(mask) => (replace_rows(class, &mask, null_class), Some(mask)),
        }
    }
}

/// `class` with the rows where `mask` is true set to `null_class`.
pub fn replace_rows(class: &Tensor, mask: &Tensor, null_class: i64) -> Tensor {
    class.masked_fill(mask, null_class)
}

/// A (n,) Int64 tensor of `null_class` on `device`.
pub fn null_classes(n: i64, null_class: i64, device: Device) -> Tensor {
    Tensor::full([n], null_class, (Kind::Int64, device))
}
