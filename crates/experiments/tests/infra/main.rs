//! Training infrastructure: overrides, checkpoints, AdamW, data order, TensorBoard, PNG grids.
//! (One test binary: each binary links libtorch, which costs seconds on 2 cores.)
mod adamw;
mod checkpoint;
mod loader;
mod overrides;
mod tensorboard;
