//! flowmap-models: the DiT family conditioned on (t, h, class), and a small MLP with the same
//! interface for tests on flat data. Both implement `flowmap_core::VelocityField`.
//!
//! * [`Dit`] / [`DitConfig`]: adaLN-Zero DiT (methods.md §15), presets S, B, M, L, XL with patch 2,
//!   4, 8 (§16). Attention runs the fused SDPA kernel, or an explicit matmul + softmax while a
//!   forward-AD level is entered (fused kernels have no forward derivative).
//! * [`Mlp`] / [`MlpConfig`]: a few SiLU layers on (B, D) data.
//! * [`Precision`]: float32, TF32 or bf16 autocast on CUDA; float32 on the CPU.
//! * [`Vae`] / [`VaeConfig`]: Stable Diffusion's AutoencoderKL (kl-f8, sd-vae-ft-mse), loading
//!   diffusers' `diffusion_pytorch_model.safetensors`; frozen encoder/decoder for latent DiTs.
pub mod dit;
pub mod embedding;
pub mod mlp;
pub mod precision;
pub mod presets;
pub mod vae;

pub use dit::{attention, AttnPath, AttnScale, Dit, DitConfig, Variance};
pub use embedding::{HEmbedding, NoParams};
pub use mlp::{Mlp, MlpConfig, SinusoidalTime, TimeEmbedding};
pub use precision::Precision;
pub use presets::{preset_names, DitSpec};
pub use vae::{decode_for_fid, from_model_space, to_model_space, Vae, VaeConfig, SD_VAE_SCALE};
