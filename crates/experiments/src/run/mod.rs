//! A run on disk and in the process: its directory, checkpoints, random streams, crash-safe file
//! writes and locks, the device it runs on, the networks it builds or loads, and the processes of a
//! data-parallel job (`world.rs`).
pub mod atomic_file;
pub mod checkpoint;
pub mod device;
pub mod file_lock;
pub mod model;
pub mod rng;
pub mod run_dir;
pub mod state;
pub mod world;
