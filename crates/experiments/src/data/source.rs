//! `[data]` table: which data set a run trains on, held in memory as (x, class) tensors.
use super::idx::{read_pair, split_files, LabelledImages, Split};
use crate::cache;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Data sets available from the package registries (see data/SHA256SUMS).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataSet {
    Mnist,
    FashionMnist,
}

/// `[data]`: data set, split, and whether labels condition the model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub dataset: DataSet,           // "mnist" | "fashion_mnist"
    #[serde(default = "default_split")]
    pub split: SplitName,           // "train" (default) | "test"
    #[serde(default)]
    pub conditional: bool,          // class-conditional (labels 0..9) or unconditional (all null)
    #[serde(default)]
    pub limit: Option<usize>,       // use only the first `limit` images (smoke tests)
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    Train,
    Test,
}

fn default_split() -> SplitName {
    SplitName::Train
}

impl DataSet {
    pub const NUM_CLASSES: i64 = 10;
    /// (channels, height, width) of one image.
    pub fn shape(self) -> [i64; 3] {
        [1, super::idx::PADDED, super::idx::PADDED]
    }
    pub fn name(self) -> &'static str {
        match self {
            DataSet::Mnist => "mnist",
            DataSet::FashionMnist => "fashion_mnist",
        }
    }
    /// The verified IDX files of a split, loaded as (N, 1, 32, 32) in [-1, 1] plus labels.
    pub fn load(self, split: SplitName) -> Result<LabelledImages> {
        let (dir, prefix, gz) = match self {
            DataSet::Mnist => (cache::mnist_dir(), "mnist/", false),
            DataSet::FashionMnist => (cache::fashion_mnist_dir(), "fashion-mnist/", true),
        };
        cache::require(prefix)?;
        let split = match split {
            SplitName::Train => Split::Train,
            SplitName::Test => Split::Test,
        };
        let (images, labels) = split_files(&dir, split, gz);
        read_pair(&images, &labels)
    }
}

impl DataConfig {
    /// Number of classes the model must embed (0 when unconditional).
    pub fn num_classes(&self) -> i64 {
        if self.conditional {
            DataSet::NUM_CLASSES
        } else {
            0
        }
    }

    /// The training tensors: x (N, 1, 32, 32) and class (N,), where unconditional data gets the
    /// null class `null_class` on every row.
    pub fn load(&self, null_class: i64) -> Result<LabelledImages> {
        let mut d = self.dataset.load(self.split)?;
        if let Some(n) = self.limit {
            let total = d.images.size()[0] as usize;
            if n == 0 || n > total {
                bail!("data.limit = {n} must be between 1 and {total} (the size of {} {:?})", self.dataset.name(), self.split);
            }
            d.images = d.images.narrow(0, 0, n as i64);
            d.labels = d.labels.narrow(0, 0, n as i64);
        }
        if !self.conditional {
            d.labels = Tensor::full([d.labels.size()[0]], null_class, (Kind::Int64, d.labels.device()));
        }
        Ok(d)
    }
}
