//! flowmap-experiments: data, configs, the training loop and the `flowmap` command.
pub mod cache;
pub mod data;
pub mod doctor;
