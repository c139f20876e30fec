//! `[model]`: which network a run trains, and a built network with its variables.
use anyhow::{ensure, Context, Result};
use flowmap_core::VelocityField;
use flowmap_models::{DitConfig, MlpConfig};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

/// The network, selected by `kind`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    Dit(DitConfig),
    Mlp(MlpConfig),
}

impl ModelConfig {
    /// Classes the model embeds (0 = unconditional, only the null row).
    pub fn num_classes(&self) -> i64 {
        match self {
            Self::Dit(c) => c.num_classes,
            Self::Mlp(c) => c.num_classes,
        }
    }

    /// Whether the network takes a guidance scale and interval as inputs (DiT
    /// `guidance_conditioning`, improved MeanFlow).
    pub fn takes_guidance(&self) -> bool {
        match self {
            Self::Dit(c) => c.guidance_conditioning,
            Self::Mlp(_) => false,
        }
    }

    /// The class index that means "no class" (unconditional rows, guidance's null half): the
    /// extra embedding row after the real classes, as the built network's `null_class()`.
    pub fn null_class(&self) -> i64 {
        self.num_classes()
    }

    /// Range checks of the architecture (before anything is built).
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Dit(c) => c.validate(),
            Self::Mlp(c) => c.validate(),
        }
        .context("[model]")
    }

    /// Shape of one sample the network takes, e.g. `[1, 32, 32]` or `[2]`.
    pub fn sample_shape(&self) -> Vec<i64> {
        match self {
            Self::Dit(c) => vec![c.in_channels, c.input_size, c.input_size],
            Self::Mlp(c) => vec![c.dim],
        }
    }

    /// Builds the network on a fresh VarStore on `device`.
    pub fn build(&self, device: Device) -> Result<Net> {
        let vs = nn::VarStore::new(device);
        let net: Box<dyn VelocityField> = match self {
            Self::Dit(c) => Box::new(c.init(vs.root())?),
            Self::Mlp(c) => Box::new(c.init(vs.root())?),
        };
        Ok(Net { vs, net })
    }
}

/// A network and the VarStore that owns its variables.
pub struct Net {
    pub vs: nn::VarStore,
    pub net: Box<dyn VelocityField>,
}

impl Net {
    pub fn num_parameters(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// Named variables (sorted), for checkpoints.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        named_vars(&self.vs)
    }

    /// Copies named tensors into the variables (see [`load_vars`]).
    pub fn load_named(&mut self, tensors: &std::collections::BTreeMap<String, Tensor>, what: &str) -> Result<()> {
        load_vars(&self.vs, tensors, what)
    }
}

/// The variables of a store as (name, tensor), sorted by name.
pub fn named_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Copies named tensors into a store's variables: every variable must be present with its shape
/// and no tensor may be left over (a checkpoint of another model). `what` names the source.
pub fn load_vars(vs: &nn::VarStore, tensors: &std::collections::BTreeMap<String, Tensor>, what: &str) -> Result<()> {
    let vars = vs.variables();
    for (name, var) in &vars {
        let Some(src) = tensors.get(name) else { anyhow::bail!("{what}: no tensor `{name}` (checkpoint of another model?)") };
        ensure!(src.size() == var.size(), "{what}: `{name}` has shape {:?}, the model has {:?}", src.size(), var.size());
        tch::no_grad(|| var.shallow_clone().copy_(src));
    }
    let extra: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
    ensure!(extra.is_empty(), "{what}: unexpected tensors {extra:?} (checkpoint of another model?)");
    Ok(())
}

/// Loads a trained run's weights into a freshly built network of `model` (errors if they differ).
pub fn load_run_weights(run: &std::path::Path, model: &ModelConfig, weights: crate::eval::sampling::Weights, device: Device) -> Result<Net> {
    let ck = crate::run::checkpoint::CheckpointDir::new(crate::run::run_dir::RunDir::new(run).checkpoints(), 1).latest()?.with_context(|| format!("{} has no complete checkpoint", run.display()))?;
    let mut net = model.build(device)?;
    let part = crate::run::state::Part::of_weights(weights);
    net.load_named(&ck.tensors(part.name())?, &format!("{}/{}.safetensors ({} weights)", ck.dir.display(), part.name(), weights.name()))?;
    Ok(net)
}
