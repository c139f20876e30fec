//! An exponential moving average of parameters, usable as a training target (Shortcut's
//! bootstrap targets, CT's θ̄) and for evaluation.
//!
//! shadow ← d_n·shadow + (1 − d_n)·online after the n-th update (n = 0, 1, …), with
//! d_n = decay, or with warm-up d_n = min(decay, (1 + n)/(10 + n)) (the TensorFlow
//! `ExponentialMovingAverage(num_updates=…)` rule), so early updates follow the online weights.
//! Variables that are not floating point (integer buffers) are copied.
use tch::{nn, Kind, Tensor};

/// The EMA state: a shadow [`nn::VarStore`] and the number of updates done.
///
/// For evaluation or as a training target, build the model a second time on the shadow store
/// (`Ema::with_shadow`), or copy the shadow into another store with [`Ema::copy_to`]. For
/// checkpoints, save `shadow()` (`VarStore::save`) and `updates()`; restore with
/// `shadow_mut().load(..)` and `set_updates(..)`.
#[derive(Debug)]
pub struct Ema {
    shadow: nn::VarStore,
    /// (name, shadow tensor) pairs, sorted by name: a fixed order for the update loop.
    pairs: Vec<(String, Tensor)>,
    decay: f64,
    warmup: bool,
    updates: u64,
}

impl Ema {
    /// A shadow store holding a copy of every variable of `online`, same names, devices and kinds,
    /// not trainable.
    pub fn new(online: &nn::VarStore, decay: f64, warmup: bool) -> Self {
        let shadow = nn::VarStore::new(online.device());
        tch::no_grad(|| {
            for (name, value) in online.variables() {
                let parts: Vec<&str> = name.split('.').collect();
                let (leaf, dirs) = parts.split_last().expect("variable names are not empty");
                let path = dirs.iter().fold(shadow.root(), |p, d| p.sub(*d));
                let _ = path.add(leaf, value.detach().copy(), false);
            }
        });
        Self::finish(shadow, decay, warmup)
    }

    /// Uses `shadow`, a store on which the same model was built (same variable names), as the EMA
    /// copy, and initialises it from `online`. Its variables are frozen.
    pub fn with_shadow(mut shadow: nn::VarStore, online: &nn::VarStore, decay: f64, warmup: bool) -> anyhow::Result<Self> {
        shadow.copy(online)?;
        let missing: Vec<String> = online.variables().into_keys().filter(|k| !shadow.variables().contains_key(k)).collect();
        anyhow::ensure!(missing.is_empty(), "shadow store lacks variables of the online store: {missing:?}");
        shadow.freeze();
        Ok(Self::finish(shadow, decay, warmup))
    }

    fn finish(shadow: nn::VarStore, decay: f64, warmup: bool) -> Self {
        assert!((0.0..=1.0).contains(&decay), "EMA decay must be in [0, 1], got {decay}");
        let mut pairs: Vec<(String, Tensor)> = shadow.variables().into_iter().collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Self { shadow, pairs, decay, warmup, updates: 0 }
    }

    /// The decay used by the update after `updates` updates.
    pub fn decay_at(&self, updates: u64) -> f64 {
        if self.warmup {
            self.decay.min((1.0 + updates as f64) / (10.0 + updates as f64))
        } else {
            self.decay
        }
    }

    /// One EMA step towards `online` (same variable names). No host synchronisation.
    pub fn update(&mut self, online: &nn::VarStore) {
        let d = self.decay_at(self.updates);
        let online_vars = online.variables();
        tch::no_grad(|| {
            for (name, s) in &mut self.pairs {
                let o = online_vars.get(name.as_str()).unwrap_or_else(|| panic!("online store lacks EMA variable {name}"));
                if is_float(s.kind()) {
                    // s + (1 − d)·(o − s) = d·s + (1 − d)·o
                    let _ = s.lerp_(o, 1.0 - d);
                } else {
                    s.copy_(o);
                }
            }
        });
        self.updates += 1;
    }

    /// Copies the shadow values into `target` (same variable names), e.g. an evaluation model.
    pub fn copy_to(&self, target: &mut nn::VarStore) -> anyhow::Result<()> {
        target.copy(&self.shadow)?;
        Ok(())
    }

    /// The shadow store.
    pub fn shadow(&self) -> &nn::VarStore {
        &self.shadow
    }

    /// The shadow store, mutable (e.g. to `load` a checkpoint into it).
    pub fn shadow_mut(&mut self) -> &mut nn::VarStore {
        &mut self.shadow
    }

    /// Number of updates done.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Restores the update counter (after loading a checkpoint).
    pub fn set_updates(&mut self, updates: u64) {
        self.updates = updates;
    }

    /// The configured decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Whether warm-up is on.
    pub fn warmup(&self) -> bool {
        self.warmup
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16)
}
