//! `[vae]`: the Stable Diffusion VAE a latent-space run decodes with (sampling grids, FID) and
//! whose weights must match the ones its latents were encoded with.
//!
//! ```toml
//! [vae]
//! weights = "${FLOWMAP_SD_VAE}"   # diffusers' diffusion_pytorch_model.safetensors; default $FLOWMAP_SD_VAE
//! [vae.arch]                      # optional: flowmap_models::vae::VaeConfig fields; default sd-vae-ft-mse
//! block_out_channels = [8, 8, 8, 8]
//! ```
use crate::data::config::{expand_env, DataConfig};
use crate::data::latents::{LatentReader, VaeIdentity};
use anyhow::{ensure, Context, Result};
use flowmap_models::vae::{Vae, VaeConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::Device;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaeSection {
    /// the weights file, ${VAR} expanded; default $FLOWMAP_SD_VAE
    #[serde(default)]
    pub weights: Option<String>,
    /// default sd-vae-ft-mse (scaling_factor 0.18215)
    #[serde(default)]
    pub arch: VaeConfig,
}

impl VaeSection {
    pub fn weights_path(&self) -> Result<PathBuf> {
        match &self.weights {
            Some(w) => Ok(PathBuf::from(expand_env(w).context("vae.weights")?)),
            None => std::env::var_os("FLOWMAP_SD_VAE").map(PathBuf::from).context("vae.weights is not set and neither is the environment variable FLOWMAP_SD_VAE"),
        }
    }

    pub fn load(&self, device: Device) -> Result<Vae> {
        let path = self.weights_path()?;
        ensure!(path.is_file(), "VAE weights {} not found (download diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-mse and point vae.weights or FLOWMAP_SD_VAE at it)", path.display());
        Vae::load(&path, &self.arch, device)
    }

    /// Path and sha256 of the weights, and the latent scale.
    pub fn identity(&self) -> Result<VaeIdentity> {
        let path = self.weights_path()?;
        Ok(VaeIdentity { weights: path.display().to_string(), sha256: crate::data::cache::sha256_file(&path)?, scale: self.arch.scaling_factor })
    }

    /// Dry-run checks: the weights load into the architecture, and for latents data they are the
    /// weights (and scale, and latent shape) the latents were made with.
    pub fn check(&self, data: &DataConfig) -> Result<(String, Vec<String>)> {
        let vae = self.load(Device::Cpu)?;
        let id = self.identity()?;
        let mut warnings = vec![];
        if let Some(latents) = data.latents() {
            let m = LatentReader::open(&latents.resolved_path()?, false, false, 0, None)?.manifest;
            ensure!(m.vae.sha256 == id.sha256, "vae.weights {} (sha256 {}) are not the weights the latents were encoded with ({}, sha256 {})", id.weights, id.sha256, m.vae.weights, m.vae.sha256);
            ensure!((m.vae.scale - id.scale).abs() < 1e-12, "the latents were made for scale {}, vae.arch.scaling_factor is {}", m.vae.scale, id.scale);
            let s = m.image_size as i64;
            ensure!(vae.config().latent_shape(s, s).to_vec() == m.latent_shape, "the VAE makes latents {:?} of {s}² images, the manifest says {:?}", vae.config().latent_shape(s, s), m.latent_shape);
        } else {
            warnings.push("[vae] given but the data are not latents: it is only used to decode".into());
        }
        Ok((format!("vae: {} loads (sha256 {}…, scale {}, f = {})", id.weights, &id.sha256[..12], id.scale, vae.config().downsample_factor()), warnings))
    }
}

/// The section a run uses: `[vae]`, or the default (sd-vae-ft-mse from $FLOWMAP_SD_VAE) when the
/// data are latents.
/// Generated samples as pixels: decoded with the run's VAE for a latent run (`vae` = Some), as
/// they are otherwise. Grids, `sample` and FID all go through this.
pub fn to_pixels(vae: Option<&Vae>, x: tch::Tensor) -> tch::Tensor {
    match vae {
        Some(v) => flowmap_models::vae::decode_for_fid(v, &x),
        None => x,
    }
}

pub fn for_run(vae: &Option<VaeSection>, data: &DataConfig) -> Option<VaeSection> {
    match vae {
        Some(v) => Some(v.clone()),
        None => data.latents().map(|_| VaeSection::default()),
    }
}
