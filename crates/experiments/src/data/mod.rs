//! Data: the `[data]` section ([`config`]) and the sources that serve batches ([`source`]), MNIST's
//! IDX files, image folders, cached VAE latents and the VAE itself, the reflow-pair file
//! ([`reflow_pairs`]), the batch order ([`loader`]) and where downloaded and derived files are kept
//! ([`cache`]).
pub mod cache;
pub mod config;
pub mod idx;
pub mod image_folder;
pub mod latents;
pub mod loader;
pub mod reflow_pairs;
pub mod source;
pub mod vae;
