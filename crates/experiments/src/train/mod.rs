//! Training: the [`trainer`] (one generic loop over any objective), the optimiser, and what a run
//! reports while it trains (metrics.jsonl, TensorBoard, progress).
pub mod adamw;
pub mod cadence;
pub mod metrics;
pub mod progress;
pub mod tensorboard;
pub mod trainer;

pub use trainer::{train, Outcome, Resume, Summary, TrainOptions};
