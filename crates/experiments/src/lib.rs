//! flowmap-experiments: everything between a TOML file and a FID table, in the order a run goes:
//!
//! * [`config`]: the experiment file, its sections, `--set` overrides, validation, config changes on resume, migration of older files;
//! * [`run`]: the run directory, checkpoints, seeding, atomic writes and locks, devices, the networks of a run, the ranks of a data-parallel job;
//! * [`data`]: the `[data]` table and the sources it opens, the batch order, caches, VAE latents, the reflow-pair file;
//! * [`train`]: the trainer (loop, saved state, cadences), AdamW, metrics, TensorBoard, progress;
//! * [`eval`]: sampling, FID/KID, the evaluator, sample export, image grids;
//! * [`report`]: tables over runs and plots;
//! * [`demo`]: the 2-D part of `make demo` (one-step against many-step samplers on toy distributions);
//! * [`cli`]: the `flowmap` command line and the commands that are only glue (doctor, dry run, reflow pairs, migrate-config);
//! * [`gpu_check`]: `flowmap gpu-check`, the flowmap half of the GPU acceptance run (`scripts/gpu_check.sh`).
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod gpu_check;
pub mod report;
pub mod run;
pub mod train;
