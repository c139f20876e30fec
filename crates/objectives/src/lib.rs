//! flowmap-objectives: training objectives, one file per method, and the forward-mode `jvp` they
//! share. Every objective implements [`Objective`]: it draws its own noise, times and label
//! dropout from tch's global generator (which the training loop reseeds every step), builds its
//! targets and returns a scalar loss.
use flowmap_core::VelocityField;
use tch::Tensor;

pub mod jvp;
pub use jvp::{jvp, jvp_graph_free};

/// A training batch: `x` (B, C, H, W) or (B, D) data in the model's space; `class` (B,) Int64.
/// Unconditional data sets use the model's null class for every row.
#[derive(Debug)]
pub struct Batch {
    pub x: Tensor,
    pub class: Tensor,
}

/// What an objective may call: the trained net, its EMA copy, and an optional frozen teacher.
#[derive(Clone, Copy)]
pub struct Nets<'a> {
    pub online: &'a dyn VelocityField,
    pub ema: &'a dyn VelocityField,
    pub teacher: Option<&'a dyn VelocityField>,
}

/// The scalar to back-propagate plus detached per-term values for logging (tensors, so logging
/// does not force a CPU–GPU sync every step).
pub struct Loss {
    pub value: Tensor,
    pub metrics: Vec<(&'static str, Tensor)>,
}

/// A training objective.
pub trait Objective: Send {
    /// Draws noise, times and label dropout; builds targets; returns the loss.
    /// `step` drives curricula (consistency-training resolution, progressive-distillation stages).
    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss;
    /// Whether `loss` uses `nets.teacher` (the loop then requires one).
    fn needs_teacher(&self) -> bool {
        false
    }
}
