//! flowmap: research on few-step and one-step generative models on libtorch.
//!
//! The root package re-exports the member crates. The time convention everywhere:
//! t = 0 is data, t = 1 is noise, x_t = alpha(t)·x + sigma(t)·eps.
pub use flowmap_core::*;
pub use flowmap_experiments as experiments;
pub use flowmap_models as models;
pub use flowmap_objectives as objectives;
pub use flowmap_sys as sys;
