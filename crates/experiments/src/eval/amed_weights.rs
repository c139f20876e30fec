//! The AMED step predictor of a run (`objective.kind = "amed"`), as the `amed` sampling rule uses
//! it: loaded from the newest complete checkpoint's `objective.safetensors` (the objective's own
//! parameters, under `amed.`), or copied from a training run's live parameters for its sample
//! grids.
use anyhow::{Context, Result};
use flowmap_core::AmedPredictor;
use flowmap_objectives::amed::AMED_PARAMS;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::rc::Rc;
use tch::{nn, Device, Tensor};

/// A loaded predictor with its own variables (shared by clones of a `Sampler`).
#[derive(Clone)]
pub struct AmedWeights {
    _vs: Rc<nn::VarStore>,
    predictor: Rc<AmedPredictor>,
}

impl AmedWeights {
    /// The predictor from named tensors (`amed.enc0.weight`, …; other names are ignored, so the
    /// objective's whole parameter list can be passed). `what` names the source in errors.
    pub fn from_named(tensors: &BTreeMap<String, Tensor>, device: Device, what: &str) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let predictor = AmedPredictor::new(&(vs.root() / AMED_PARAMS));
        let mine: BTreeMap<String, Tensor> = tensors.iter().filter(|(k, _)| k.starts_with(&format!("{AMED_PARAMS}."))).map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        anyhow::ensure!(!mine.is_empty(), "{what}: no AMED predictor parameters (`{AMED_PARAMS}.*`); is this a run of objective.kind = \"amed\"?");
        crate::run::model::load_vars(&vs, &mine, what)?;
        vs.freeze();
        Ok(Self { _vs: Rc::new(vs), predictor: Rc::new(predictor) })
    }

    /// The predictor saved in the newest complete checkpoint of `run`.
    pub fn load(run: &Path, device: Device) -> Result<Self> {
        let ck = crate::run::checkpoint::CheckpointDir::new(crate::run::run_dir::RunDir::new(run).checkpoints(), 1)
            .latest()?
            .with_context(|| format!("{} has no complete checkpoint with an AMED predictor (train it with `flowmap train` and objective.kind = \"amed\")", run.display()))?;
        let part = crate::run::state::Part::Objective.name();
        let file = ck.dir.join(format!("{part}.safetensors"));
        anyhow::ensure!(file.exists(), "{}: missing; sampling.rule = \"amed\" needs the predictor a run of objective.kind = \"amed\" saves there", file.display());
        Self::from_named(&ck.tensors(part)?, device, &file.display().to_string())
    }

    pub fn predictor(&self) -> &AmedPredictor {
        &self.predictor
    }
}

impl PartialEq for AmedWeights {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.predictor, &other.predictor)
    }
}

impl fmt::Debug for AmedWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AmedWeights")
    }
}
