//! The reflow-pair file: stage one of two-stage reflow (Liu et al., arXiv 2209.03003) integrates a
//! trained flow model from noise ε to x̂ = ODE(ε, c) and stores the couplings (ε, x̂, c) as
//! safetensors ([`generate_pairs`], `flowmap reflow-pairs`); stage two trains the `reflow`
//! objective on them (`reflow_pairs = "FILE"` in `[data]`, served with the stored noise by
//! [`crate::data::config::DataConfig::open`]).
use anyhow::{ensure, Context, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Tensor names inside a couplings file.
pub const NOISE_KEY: &str = "noise";
pub const SAMPLE_KEY: &str = "x";
pub const CLASS_KEY: &str = "class";

/// Stored couplings: `noise` and `x` (N, ...) Float, `class` (N,) Int64.
#[derive(Debug)]
pub struct Pairs {
    pub noise: Tensor,
    pub x: Tensor,
    pub class: Tensor,
}

/// Stage (a): draws `count` noise tensors of shape `item_shape` in batches of `batch_size`, labels
/// from `classes(n)` (e.g. uniform over K, or all null), and maps each batch through
/// `sample(noise, class) -> x̂` (any sampler: Euler over 128 steps with CFG is the usual choice,
/// methods.md §6). Runs under no_grad; returns the couplings on the CPU and writes them to `out`
/// (atomically, [`save_pairs`]) when given. Noise is drawn on `device` from the global generator.
pub fn generate_pairs(count: i64, batch_size: i64, item_shape: &[i64], device: Device, mut classes: impl FnMut(i64) -> Tensor, mut sample: impl FnMut(&Tensor, &Tensor) -> Tensor, out: Option<&Path>) -> Result<Pairs> {
    ensure!(count >= 1 && batch_size >= 1, "generate_pairs: count and batch_size must be positive");
    let (mut noises, mut xs, mut labels) = (vec![], vec![], vec![]);
    let mut done = 0;
    while done < count {
        let n = batch_size.min(count - done);
        let mut shape = vec![n];
        shape.extend_from_slice(item_shape);
        let noise = Tensor::randn(shape.as_slice(), (Kind::Float, device));
        let class = classes(n).to_device(device).to_kind(Kind::Int64);
        ensure!(class.size() == [n], "generate_pairs: classes({n}) must return shape ({n},), got {:?}", class.size());
        let x = tch::no_grad(|| sample(&noise, &class));
        ensure!(x.size() == noise.size(), "generate_pairs: the sampler returned {:?} for noise {:?}", x.size(), noise.size());
        noises.push(noise.to_device(Device::Cpu));
        xs.push(x.detach().to_kind(Kind::Float).to_device(Device::Cpu));
        labels.push(class.to_device(Device::Cpu));
        done += n;
    }
    let pairs = Pairs { noise: Tensor::cat(&noises, 0), x: Tensor::cat(&xs, 0), class: Tensor::cat(&labels, 0) };
    if let Some(path) = out {
        save_pairs(&pairs, path)?;
    }
    Ok(pairs)
}

/// Writes couplings as safetensors with the keys [`NOISE_KEY`], [`SAMPLE_KEY`], [`CLASS_KEY`],
/// atomically (a reader sees the old file or the whole new one).
pub fn save_pairs(pairs: &Pairs, path: &Path) -> Result<()> {
    let named = [(NOISE_KEY, &pairs.noise), (SAMPLE_KEY, &pairs.x), (CLASS_KEY, &pairs.class)];
    crate::run::atomic_file::write_atomic_to(path, |tmp| Tensor::write_safetensors(&named, tmp).with_context(|| format!("writing reflow pairs to {}", path.display())))
}

/// Reads couplings written by [`save_pairs`], checking names and shapes (errors name the file).
pub fn load_pairs(path: &Path) -> Result<Pairs> {
    ensure!(path.is_file(), "{}: no such file (make the reflow pairs first: `flowmap reflow-pairs --teacher RUN --count N --out {}`)", path.display(), path.display());
    let named = Tensor::read_safetensors(path).with_context(|| format!("reading reflow pairs from {}", path.display()))?;
    let take = |key: &str| -> Result<Tensor> { named.iter().find(|(k, _)| k == key).map(|(_, t)| t.shallow_clone()).with_context(|| format!("{}: no tensor named {key:?}", path.display())) };
    let pairs = Pairs { noise: take(NOISE_KEY)?, x: take(SAMPLE_KEY)?, class: take(CLASS_KEY)? };
    ensure!(pairs.noise.size() == pairs.x.size(), "{}: noise {:?} and x {:?} differ in shape", path.display(), pairs.noise.size(), pairs.x.size());
    ensure!(pairs.class.size() == [pairs.x.size()[0]] && pairs.class.kind() == Kind::Int64, "{}: class must be ({},) Int64", path.display(), pairs.x.size()[0]);
    Ok(pairs)
}
