//! The FID Inception-v3 feature extractor (pool3, 2048-d) and the two pre-processing conventions
//! (methods.md §18.1–18.2).
//!
//! The TorchScript file has no resize and no normalisation inside: it takes (N, 3, 299, 299) float
//! already normalised and returns (N, 2048) (toolchain.md). Its weights run in
//! [`super::inception_net`], which gives pool3 and the ADM suite's other layers from one pass.
use crate::data::cache;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

use super::inception_net::{Activations, InceptionNet, LogitsHead};
use super::stats::FeatureStats;

/// Inception-v3 input side length.
pub const INCEPTION_SIZE: i64 = 299;
/// pool3 feature width.
pub const FEATURE_DIM: i64 = 2048;
/// Path of the weights inside the data dir (the key in data/SHA256SUMS).
const WEIGHTS_REL: &str = "inception/pt_inception-2015-12-05.pt";
/// Names a TorchScript Inception file to use instead of the verified download (for example the
/// float16-stored copy a GPU bundle restores); FID cache keys then use that file's sha256.
pub const INCEPTION_ENV: &str = "FLOWMAP_INCEPTION";
/// Images per Inception forward unless set otherwise.
const DEFAULT_BATCH: usize = 50;

/// How uint8 images become Inception input. Name the convention next to every reported number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    /// pytorch-fid: bilinear resize with half-pixel centres (align_corners = false), then
    /// u8/127.5 − 1.
    #[default]
    PytorchFid,
    /// TF-compatible (ADM evaluator, hence DiT / MeanFlow tables): TF1 `resize_bilinear`
    /// semantics (no half-pixel offset: src = dst·in/out), then u8/128 − 1.
    Tf,
}

impl Preprocess {
    /// The name used in `fid.csv` and cache keys.
    pub fn name(self) -> &'static str {
        match self {
            Preprocess::PytorchFid => "pytorch_fid",
            Preprocess::Tf => "tf",
        }
    }
}

impl std::fmt::Display for Preprocess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Preprocess {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pytorch_fid" | "pytorch-fid" | "pytorch" => Ok(Preprocess::PytorchFid),
            "tf" | "tensorflow" => Ok(Preprocess::Tf),
            other => bail!("unknown FID pre-processing `{other}` (expected `pytorch_fid` or `tf`)"),
        }
    }
}

/// Quantises generator output as saved samples are: clamp(127.5·x + 128, 0, 255) → uint8
/// (DiT `sample_ddp.py`; the cast truncates). Data read as u8/127.5 − 1 maps back to the same u8.
/// `images`: (B, C, H, W) float in [−1, 1]; returns (B, C, H, W) Uint8 on the same device.
pub fn quantize(images: &Tensor) -> Tensor {
    (images.to_kind(Kind::Float) * 127.5 + 128.0).clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

/// (out, len) interpolation matrix of TF1 `resize_bilinear` with align_corners = false and no
/// half-pixel centres: src = dst·len/out, lerp between floor(src) and min(floor(src) + 1, len − 1).
fn tf1_resize_matrix(len: i64, out: i64) -> Tensor {
    let scale = len as f64 / out as f64;
    let mut m = vec![0f32; (out * len) as usize];
    for i in 0..out {
        let src = i as f64 * scale;
        let lo = (src.floor() as i64).min(len - 1);
        let hi = (lo + 1).min(len - 1);
        let w = (src - lo as f64) as f32;
        m[(i * len + lo) as usize] += 1.0 - w;
        m[(i * len + hi) as usize] += w;
    }
    Tensor::from_slice(&m).reshape([out, len])
}

/// The FID Inception network on one device, with a fixed pre-processing convention.
pub struct Inception {
    net: InceptionNet,
    device: Device,
    preprocess: Preprocess,
    batch_size: usize,
    weights_sha256: String,
}

impl std::fmt::Debug for Inception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inception").field("device", &self.device).field("preprocess", &self.preprocess).field("batch_size", &self.batch_size).field("weights_sha256", &self.weights_sha256).finish()
    }
}

impl Inception {
    /// Loads the verified weights from the data cache (`cache::inception_weights()`); fails with
    /// the fix (`make setup`) when the file is missing or its checksum is wrong. `FLOWMAP_INCEPTION`
    /// ([`INCEPTION_ENV`]) names another file to load instead (see [`Self::load_from`]).
    pub fn load(device: Device, preprocess: Preprocess) -> Result<Self> {
        if let Some(path) = std::env::var_os(INCEPTION_ENV).filter(|p| !p.is_empty()) {
            let path = std::path::PathBuf::from(path);
            tracing::info!("Inception weights from {INCEPTION_ENV}={}", path.display());
            return Self::load_from(&path, device, preprocess).with_context(|| format!("{INCEPTION_ENV}={}", path.display()));
        }
        cache::require("inception/")?;
        let sha = cache::expected_files().into_iter().find(|(_, rel)| *rel == WEIGHTS_REL).map(|(sha, _)| sha.to_string()).context("data/SHA256SUMS lists no Inception weights")?;
        Self::load_with_checksum(&cache::inception_weights(), sha, device, preprocess)
    }

    /// Loads a TorchScript file from anywhere (its sha256 is computed for cache keys).
    pub fn load_from(path: &Path, device: Device, preprocess: Preprocess) -> Result<Self> {
        let sha = cache::sha256_file(path)?;
        Self::load_with_checksum(path, sha, device, preprocess)
    }

    fn load_with_checksum(path: &Path, weights_sha256: String, device: Device, preprocess: Preprocess) -> Result<Self> {
        let net = InceptionNet::load(path, device)?;
        Ok(Self { net, device, preprocess, batch_size: DEFAULT_BATCH, weights_sha256 })
    }

    /// Adds the 1008-way classifier matrix, so that [`Self::activations`] also returns logits
    /// (Inception Score).
    pub fn with_logits(mut self, head: &LogitsHead) -> Self {
        self.net = self.net.with_logits(head);
        self
    }

    /// Whether [`Self::activations`] returns logits.
    pub fn has_logits(&self) -> bool {
        self.net.has_logits()
    }

    /// Images per forward pass (default 50).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn preprocess(&self) -> Preprocess {
        self.preprocess
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// sha256 of the weights file (part of reference-statistics cache keys).
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// Network input from generator-convention images.
    /// `images`: (B, C, H, W) float in [−1, 1], C = 1 or 3, any device. Returns (B, 3, 299, 299)
    /// Float on the network's device: quantised to uint8, grayscale repeated to 3 channels,
    /// resized and normalised per the convention.
    pub fn prepare(&self, images: &Tensor) -> Result<Tensor> {
        let size = images.size();
        if size.len() != 4 || !(size[1] == 1 || size[1] == 3) {
            bail!("Inception input must be (B, C, H, W) with C = 1 or 3, got {size:?}");
        }
        let (h, w) = (size[2], size[3]);
        let mut x = quantize(&images.to_device(self.device)).to_kind(Kind::Float); // (B, C, H, W) in [0, 255]
        if size[1] == 1 {
            x = x.repeat([1, 3, 1, 1]);
        }
        let x = match self.preprocess {
            Preprocess::PytorchFid => {
                let x = if (h, w) == (INCEPTION_SIZE, INCEPTION_SIZE) { x } else { x.upsample_bilinear2d([INCEPTION_SIZE, INCEPTION_SIZE], false, None, None) };
                x / 127.5 - 1.0
            }
            Preprocess::Tf => {
                let rh = tf1_resize_matrix(h, INCEPTION_SIZE).to_device(self.device); // (299, H)
                let rw = tf1_resize_matrix(w, INCEPTION_SIZE).to_device(self.device); // (299, W)
                let x = rh.matmul(&x).matmul(&rw.tr()); // (B, 3, 299, 299)
                x / 128.0 - 1.0
            }
        };
        Ok(x)
    }

    /// pool3 features of images in [−1, 1]: (N, C, H, W) → (N, 2048) Float64 on the CPU, computed
    /// in batches of `batch_size` under no_grad.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let n = images.size()[0];
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let len = (self.batch_size as i64).min(n - start);
            out.push(self.forward(&images.narrow(0, start, len))?);
            start += len;
        }
        if out.is_empty() {
            return Ok(Tensor::zeros([0, FEATURE_DIM], (Kind::Double, Device::Cpu)));
        }
        Ok(Tensor::cat(&out, 0))
    }

    /// Adds the features of `images` to running statistics without keeping them.
    pub fn accumulate(&self, images: &Tensor, stats: &mut FeatureStats) -> Result<()> {
        let n = images.size()[0];
        let mut start = 0;
        while start < n {
            let len = (self.batch_size as i64).min(n - start);
            stats.update(&self.forward(&images.narrow(0, start, len))?)?;
            start += len;
        }
        Ok(())
    }

    /// pool3, `mixed_6/conv` and (with a classifier, [`Self::with_logits`]) the logits of images
    /// in [−1, 1] (N, C, H, W), in batches of `batch_size` under no_grad: every tensor Float64 on
    /// the CPU, rows in input order.
    pub fn activations(&self, images: &Tensor) -> Result<Activations> {
        let n = images.size()[0];
        let (mut pool, mut spatial, mut logits) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        while start < n {
            let len = (self.batch_size as i64).min(n - start);
            let a = self.forward_all(&images.narrow(0, start, len))?;
            pool.push(a.pool);
            spatial.push(a.spatial);
            logits.extend(a.logits);
            start += len;
        }
        let cat = |parts: Vec<Tensor>, dim: i64| if parts.is_empty() { Tensor::zeros([0, dim], (Kind::Double, Device::Cpu)) } else { Tensor::cat(&parts, 0) };
        Ok(Activations { pool: cat(pool, FEATURE_DIM), spatial: cat(spatial, super::inception_net::SPATIAL_DIM), logits: self.has_logits().then(|| cat(logits, super::inception_net::NUM_LOGITS)) })
    }

    /// One forward pass: (B, C, H, W) in [−1, 1] → (B, 2048) Float64 on the CPU.
    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.forward_all(images)?.pool)
    }

    /// One forward pass, every output Float64 on the CPU.
    fn forward_all(&self, images: &Tensor) -> Result<Activations> {
        let _guard = tch::no_grad_guard();
        let x = self.prepare(images)?;
        let b = x.size()[0];
        let a = self.net.forward(&x).context("Inception forward")?;
        if a.pool.size() != [b, FEATURE_DIM] {
            bail!("the Inception network returned {:?}, expected ({b}, {FEATURE_DIM})", a.pool.size());
        }
        let cpu = |t: Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
        Ok(Activations { pool: cpu(a.pool), spatial: cpu(a.spatial), logits: a.logits.map(cpu) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf1_matrix_rows_sum_to_one_and_start_at_pixel_zero() {
        let m = tf1_resize_matrix(32, INCEPTION_SIZE);
        let rows = m.sum_dim_intlist(1, false, Kind::Float);
        assert!((rows - 1.0).abs().max().double_value(&[]) < 1e-6);
        // no half-pixel offset: output 0 samples input 0 exactly
        assert_eq!(m.double_value(&[0, 0]), 1.0);
    }

    #[test]
    fn quantize_inverts_data_scaling() {
        let u = Tensor::arange(256, (Kind::Float, Device::Cpu));
        let x = &u / 127.5 - 1.0;
        let q = quantize(&x.view([1, 1, 16, 16])).to_kind(Kind::Float).view([-1]);
        assert_eq!((q - u).abs().max().double_value(&[]), 0.0);
    }
}
