//! Helpers shared by the model tests.
#![allow(dead_code)] // each test binary uses a subset

use flowmap_models::{DitConfig, HEmbedding};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Kind, Tensor};

/// libtorch allows one forward-AD level at a time and `forward_ad_active()` is process-wide, so
/// tests that enter a level, or that must see it inactive, take this lock.
static FORWARD_AD: Mutex<()> = Mutex::new(());

pub fn forward_ad_lock() -> MutexGuard<'static, ()> {
    FORWARD_AD.lock().unwrap_or_else(|e| e.into_inner())
}

/// A DiT small enough for float64 finite differences: 2 blocks, D = 64, 4 heads, 3×8×8 input, 10 classes.
pub fn tiny_config() -> DitConfig {
    DitConfig { in_channels: 3, input_size: 8, num_classes: 10, h_embedding: HEmbedding::Continuous, ..DitConfig::arch(2, 64, 4, 2) }
}

/// Replaces every all-zero trainable variable (adaLN modulation, final layer, biases) with
/// N(0, std²) values, so the output and its derivatives are no longer trivially zero.
pub fn randomise_zeros(vs: &nn::VarStore, std: f64) {
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            if v.abs().max().double_value(&[]) == 0.0 {
                let r = Tensor::randn(v.size(), (v.kind(), v.device())) * std;
                v.copy_(&r);
            }
        }
    });
}

/// (x_t, t, h, class) for `cfg` with batch `b`, in dtype `kind`; h = t/2.
pub fn inputs(cfg: &DitConfig, b: i64, kind: Kind) -> (Tensor, Tensor, Tensor, Tensor) {
    let x = Tensor::randn([b, cfg.in_channels, cfg.input_size, cfg.input_size], (kind, tch::Device::Cpu));
    let t = Tensor::rand([b], (kind, tch::Device::Cpu)) * 0.7 + 0.2;
    let h = &t * 0.5;
    let class = Tensor::randint(cfg.num_classes + 1, [b], (Kind::Int64, tch::Device::Cpu));
    (x, t, h, class)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
