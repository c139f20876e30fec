//! Two-stage reflow (Liu et al., arXiv 2209.03003). Stage (a): integrate a trained flow model from
//! noise ε to x̂ = ODE(ε, c) and store the couplings (ε, x̂, c); the file format is data, not loss
//! (flowmap-experiments' `data::reflow_pairs`, `flowmap reflow-pairs`). Stage (b), [`Reflow`]: flow
//! matching on the stored couplings, loss mean(F(x_t, t, h, c) − (ε − x̂))² with x_t = (1 − t)·x̂ + t·ε.
//! Time: the paper puts noise at t = 0 (X_t = t·X₁ + (1 − t)·X₀); here t = 1 − t_rf and F = −v_rf.
//! The data layer hands the stored ε in as `Batch::noise`.
use crate::flow_matching::{FlowMatching, FlowMatchingConfig};
use crate::{Batch, Loss, Nets, Objective};
use anyhow::Result;

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
        let noise = batch.noise.as_ref().expect("reflow: the batch must carry the stored noise (Batch::noise); set data.reflow_pairs to a file made by `flowmap reflow-pairs`");
        assert_eq!(noise.size(), batch.x.size(), "reflow: noise and sample shapes differ");
        self.flow.loss_on(nets.online, &batch.x, noise, &batch.class)
    }
    fn needs_coupled_data(&self) -> bool {
        true
    }
}
