//! flowmap-experiments: data, configs, the training loop, evaluation and the `flowmap` command.
pub mod cache;
pub mod data;
pub mod doctor;
pub mod fid;
pub mod plot;
