//! What a run saves: one registry of the named parts of a checkpoint, which saving, resuming and
//! loading a run's weights for sampling all read, and the counters of `trainer_state.json`.
//!
//! Each [`Part`] is one `<name>.safetensors` file of a checkpoint directory. The trainer lists the
//! parts its run has (a teacher only when the objective changes it, the objective's parameters
//! only when it owns some); saving writes exactly that list and resuming reads exactly that list.
use crate::data::loader::DataPosition;
use crate::eval::sampling::Weights;
use serde::{Deserialize, Serialize};

/// A named part of a checkpoint, stored as `<name>.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The trained weights θ.
    Model,
    /// The EMA shadow θ̄ of the trained weights.
    Ema,
    /// AdamW's moments, `m.<param>` and `v.<param>` (the step count is in `trainer_state.json`).
    Optim,
    /// The teacher's weights, for objectives that train with one (progressive distillation
    /// refreshes it from the student, so the run's copy is the one to resume with).
    Teacher,
    /// The objective's own trainable parameters (a learned loss weighting, for example).
    Objective,
}

impl Part {
    /// Every part a checkpoint can hold, in the order they are written.
    pub const ALL: [Part; 5] = [Part::Model, Part::Ema, Part::Optim, Part::Teacher, Part::Objective];

    /// The file stem: `<name>.safetensors`.
    pub fn name(self) -> &'static str {
        match self {
            Part::Model => "model",
            Part::Ema => "ema",
            Part::Optim => "optim",
            Part::Teacher => "teacher",
            Part::Objective => "objective",
        }
    }

    /// The part that holds the weights sampling uses.
    pub fn of_weights(weights: Weights) -> Part {
        match weights {
            Weights::Ema => Part::Ema,
            Weights::Online => Part::Model,
        }
    }
}

/// The counters of `trainer_state.json`: with the parts above, everything an exact resume needs
/// (the random streams are pure functions of (seed, step), so no generator state is saved).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done (skipped non-finite steps included).
    pub step: u64,
    /// Position in the data order (epoch and cursor).
    pub data: DataPosition,
    pub ema_updates: u64,
    pub skipped_steps: u64,
    pub consecutive_skips: u64,
    /// `run.seed`; a resume with another seed is refused.
    pub seed: u64,
    /// Seconds spent training (evaluation and checkpoint pauses included), over every call.
    pub train_time_s: f64,
    pub flowmap_version: String,
    /// Ranks of the job that wrote the checkpoint (1 before data-parallel training existed).
    #[serde(default = "one")]
    pub world_size: usize,
    /// `run.micro_batches` of the job that wrote the checkpoint.
    #[serde(default = "one_i64")]
    pub micro_batches: i64,
}

fn one() -> usize {
    1
}
fn one_i64() -> i64 {
    1
}
