//! Data order: a permutation per (seed, epoch), batches taken in order, resumable at any
//! (epoch, cursor). The permutation comes from ChaCha8, so it is the same on every machine.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Position in the data stream (saved in trainer_state.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataPosition {
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub cursor: u64,
}

/// Yields index batches of a data set of `len` items; the last partial batch of an epoch is
/// dropped (every batch has the same size; `len / batch_size` batches per epoch).
#[derive(Debug, Clone)]
pub struct Order {
    len: usize,
    batch_size: usize,
    seed: u64,
    pos: DataPosition,
    perm: Vec<i64>,
}

impl Order {
    pub fn new(len: usize, batch_size: usize, seed: u64, pos: DataPosition) -> anyhow::Result<Self> {
        if batch_size == 0 || batch_size > len {
            anyhow::bail!("batch_size {batch_size} must be between 1 and the data set size {len}");
        }
        let perm = permutation(len, seed, pos.epoch);
        Ok(Self { len, batch_size, seed, pos, perm })
    }

    pub fn batches_per_epoch(&self) -> u64 {
        (self.len / self.batch_size) as u64
    }

    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// The next `n` batches, without moving (what a prefetching reader decodes ahead).
    pub fn peek(&self, n: usize) -> Vec<Vec<i64>> {
        let mut pos = self.pos;
        let mut perm: Option<Vec<i64>> = None;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if pos.cursor >= self.batches_per_epoch() {
                pos = DataPosition { epoch: pos.epoch + 1, cursor: 0 };
                perm = Some(permutation(self.len, self.seed, pos.epoch));
            }
            let p = perm.as_ref().unwrap_or(&self.perm);
            let start = pos.cursor as usize * self.batch_size;
            pos.cursor += 1;
            out.push(p[start..start + self.batch_size].to_vec());
        }
        out
    }

    /// The next batch of indices.
    pub fn next_batch(&mut self) -> Vec<i64> {
        if self.pos.cursor >= self.batches_per_epoch() {
            self.pos = DataPosition { epoch: self.pos.epoch + 1, cursor: 0 };
            self.perm = permutation(self.len, self.seed, self.pos.epoch);
        }
        let start = self.pos.cursor as usize * self.batch_size;
        self.pos.cursor += 1;
        self.perm[start..start + self.batch_size].to_vec()
    }
}

/// The permutation of epoch `epoch` for `seed`.
pub fn permutation(len: usize, seed: u64, epoch: u64) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(crate::run::rng::seed(seed, epoch, crate::run::rng::Stream::Data) as u64);
    let mut p: Vec<i64> = (0..len as i64).collect();
    p.shuffle(&mut rng);
    p
}
