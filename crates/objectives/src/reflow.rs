//! Two-stage reflow (Liu et al., arXiv 2209.03003). Stage (a): integrate a trained flow model from
//! noise ε to x̂ = ODE(ε, c) and store the couplings (ε, x̂, c) as safetensors ([`generate_pairs`]).
//! Stage (b), [`Reflow`]: flow matching on the stored couplings, loss mean(F(x_t, t, h, c) − (ε − x̂))²
//! with x_t = (1 − t)·x̂ + t·ε. Time: the paper puts noise at t = 0 (X_t = t·X₁ + (1 − t)·X₀); here
//! t = 1 − t_rf and F = −v_rf. The data layer hands the stored ε in as `Batch::noise`.
use crate::flow_matching::{FlowMatching, FlowMatchingConfig};
use crate::{Batch, Loss, Nets, Objective};
use anyhow::{ensure, Context, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Tensor names inside a couplings file.
pub const NOISE_KEY: &str = "noise";
pub const SAMPLE_KEY: &str = "x";
pub const CLASS_KEY: &str = "class";

/// Stage (b) has exactly flow matching's hyperparameters (path, times, flow_h, label_dropout); only
/// the source of ε differs.
pub type ReflowConfig = FlowMatchingConfig;

impl Reflow {
    pub fn from_config(cfg: &ReflowConfig) -> Result<Self> {
        Ok(Reflow { flow: cfg.build()? })
    }
}

/// Flow matching on stored couplings; panics if a batch has no `noise`.
#[derive(Debug)]
pub struct Reflow {
    pub flow: FlowMatching,
}

impl Objective for Reflow {
    fn loss(&self, nets: Nets<'_>, batch: &Batch, _step: u64) -> Loss {
        let noise = batch.noise.as_ref().expect("reflow: the batch must carry the stored noise (Batch::noise); load the couplings with reflow::load_pairs");
        assert_eq!(noise.size(), batch.x.size(), "reflow: noise and sample shapes differ");
        self.flow.loss_on(nets.online, &batch.x, noise, &batch.class)
    }
    fn needs_coupled_data(&self) -> bool {
        true
    }
}

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
/// as safetensors when given. Noise is drawn on `device` from the global generator.
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

/// Writes couplings as safetensors with the keys [`NOISE_KEY`], [`SAMPLE_KEY`], [`CLASS_KEY`].
pub fn save_pairs(pairs: &Pairs, path: &Path) -> Result<()> {
    let named = [(NOISE_KEY, &pairs.noise), (SAMPLE_KEY, &pairs.x), (CLASS_KEY, &pairs.class)];
    Tensor::write_safetensors(&named, path).with_context(|| format!("writing reflow pairs to {}", path.display()))
}

/// Reads couplings written by [`save_pairs`], checking names and shapes.
pub fn load_pairs(path: &Path) -> Result<Pairs> {
    let named = Tensor::read_safetensors(path).with_context(|| format!("reading reflow pairs from {}", path.display()))?;
    let take = |key: &str| -> Result<Tensor> { named.iter().find(|(k, _)| k == key).map(|(_, t)| t.shallow_clone()).with_context(|| format!("{}: no tensor named {key:?}", path.display())) };
    let pairs = Pairs { noise: take(NOISE_KEY)?, x: take(SAMPLE_KEY)?, class: take(CLASS_KEY)? };
    ensure!(pairs.noise.size() == pairs.x.size(), "{}: noise {:?} and x {:?} differ in shape", path.display(), pairs.noise.size(), pairs.x.size());
    ensure!(pairs.class.size() == [pairs.x.size()[0]] && pairs.class.kind() == Kind::Int64, "{}: class must be ({},) Int64", path.display(), pairs.x.size()[0]);
    Ok(pairs)
}
