//! flowmap-experiments: data, configs, the training loop, evaluation and the `flowmap` command.
pub mod adamw;
pub mod cache;
pub mod checkpoint;
pub mod data;
pub mod doctor;
pub mod fid;
pub mod image_grid;
pub mod loader;
pub mod metrics;
pub mod overrides;
pub mod plot;
pub mod progress;
pub mod rng;
pub mod run_dir;
pub mod tensorboard;
