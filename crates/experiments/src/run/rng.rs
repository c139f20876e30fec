//! Counter-based seeding: every random stream is a pure function of (base seed, step, stream), so
//! a resumed run draws exactly the numbers a straight run would, without saving generator state.
//! On CUDA, reseeding resets the Philox offset, so this holds there too (for the same GPU model).

/// Independent random streams; adding one never shifts another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Noise, times and label dropout drawn by the objective.
    Train = 1,
    /// Data order (epoch permutations).
    Data = 2,
    /// Model initialisation.
    Init = 3,
    /// Fixed noise and labels for sample grids.
    Grid = 4,
    /// Evaluation samples (FID).
    Eval = 5,
    /// Data augmentation (horizontal flips), a pure function of (seed, step) so a prefetching
    /// thread can draw it ahead of the loop.
    Augment = 6,
    /// The posterior sample of cached latents, x = (mean + std·eps)·scale.
    Latent = 7,
    /// The noise of exported sample i (`flowmap export-samples`), keyed by i.
    ExportNoise = 8,
    /// The class label of exported sample i, keyed by i.
    ExportLabel = 9,
    /// What a stochastic sampling rule draws while making exported samples from i on, keyed by i.
    ExportSampler = 10,
    /// The base seeds of evaluation seeds 1, 2, … (`[eval].seeds`; seed 0 is the run's own).
    EvalSeed = 11,
}

/// SplitMix64 finaliser: a bijective mix with good avalanche.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 63-bit seed for (base, step, stream).
pub fn seed(base: u64, step: u64, stream: Stream) -> i64 {
    (mix(mix(mix(base) ^ step) ^ stream as u64) >> 1) as i64
}

/// Reseeds tch's global generators (CPU and CUDA) for (base, step, stream).
pub fn reseed(base: u64, step: u64, stream: Stream) {
    let s = seed(base, step, stream);
    tch::manual_seed(s);
    if tch::Cuda::is_available() {
        tch::Cuda::manual_seed_all(s as u64);
    }
}

/// Bits of a draw key that hold the step; the micro-batch index sits above them.
const STEP_BITS: u32 = 40;

/// The key of the random draws of micro-batch `micro` of `step` (data augmentation, latent
/// samples, the objective's noise and times): the step itself for micro-batch 0, so a run of one
/// micro-batch draws what it always did. Keys depend on the micro-batch's place in the global
/// batch, never on which process computes it: W ranks equal one process accumulating W micro-batches.
pub fn draw_key(step: u64, micro: usize) -> u64 {
    debug_assert!(step < 1 << STEP_BITS);
    step | ((micro as u64) << STEP_BITS)
}

/// The step a [`draw_key`] belongs to.
pub fn key_step(key: u64) -> u64 {
    key & ((1 << STEP_BITS) - 1)
}
