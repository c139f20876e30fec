//! flowmap-objectives: training objectives, one file per method, and the forward-mode `jvp` they share.
pub mod jvp;
pub use jvp::{jvp, jvp_graph_free};
