//! Every objective on the small MLP and on a tiny DiT (depth 1, width 32, 2×8×8 input, patch 2),
//! MeanFlow's second-order objective included (reverse-over-forward through math attention):
//! finite loss, gradients reach every trainable parameter of the online net and none of the
//! EMA/teacher nets, and the same seed gives the identical loss.
use flowmap::models::{DitConfig, MlpConfig, Variance};
use flowmap::objectives::*;
use flowmap::VelocityField;
use std::sync::Mutex;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

// Forward-AD levels are process-global: tests that enter one must not overlap.
static LEVEL: Mutex<()> = Mutex::new(());
fn lock() -> std::sync::MutexGuard<'static, ()> {
    LEVEL.lock().unwrap_or_else(|e| e.into_inner())
}

const CLASSES: i64 = 3;
const B: i64 = 64; // official_code Shortcut needs >= 56 (8 bootstrap rows for 7 levels)

/// Moves every weight off its (partly zero) initialisation so that all gradients can be non-zero.
fn perturb(vs: &VarStore, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            let noise = v.randn_like() * 0.1;
            let _ = v.g_add_(&noise);
        }
    });
}

struct Three {
    online: (VarStore, Box<dyn VelocityField>),
    ema: (VarStore, Box<dyn VelocityField>),
    teacher: (VarStore, Box<dyn VelocityField>),
}

fn three(make: &dyn Fn(nn::Path) -> Box<dyn VelocityField>) -> Three {
    let one = |seed| {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let net = make(vs.root());
        perturb(&vs, seed + 100);
        (vs, net)
    };
    Three { online: one(1), ema: one(2), teacher: one(3) }
}

fn batch(x_shape: &[i64]) -> Batch {
    let x = Tensor::randn(x_shape, (Kind::Float, Device::Cpu));
    let class = Tensor::randint(CLASSES + 1, [x_shape[0]], (Kind::Int64, Device::Cpu)); // some rows already null
    Batch::coupled(x.shallow_clone(), class, x.randn_like())
}

/// Every objective of `flowmap_objectives::every_objective()` whose network output matches these nets.
fn check_all(label: &str, nets: &Three, x_shape: &[i64], learned_variance: bool, guidance_input: bool) {
    for Variant { name, config: cfg, step, .. } in every_objective().into_iter().filter(|v| v.learned_variance == learned_variance && v.guidance_input == guidance_input) {
        let mut objective = cfg.build_for_batch(x_shape[0]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let own = VarStore::new(Device::Cpu);
        objective.init_params(&own.root()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let run = || {
            tch::manual_seed(42);
            let b = batch(x_shape);
            let n = Nets { online: nets.online.1.as_ref(), ema: nets.ema.1.as_ref(), teacher: Some(nets.teacher.1.as_ref()) };
            objective.loss(n, &b, step)
        };
        for vs in [&nets.online.0, &nets.ema.0, &nets.teacher.0] {
            for mut v in vs.trainable_variables() {
                v.zero_grad();
            }
        }
        let loss = run();
        let value = loss.value.double_value(&[]);
        assert!(value.is_finite() && value > 0.0, "{label}/{name}: loss {value}");
        for (k, m) in &loss.metrics {
            assert!(m.double_value(&[]).is_finite(), "{label}/{name}: metric {k}");
            assert!(!m.requires_grad(), "{label}/{name}: metric {k} keeps a graph");
        }
        loss.value.backward();
        if !objective.trains_model() {
            // AMED: the loss trains only the objective's own parameters (through the frozen nets).
            // Its output heads start at zero (the midpoint rule), so at the first step the
            // gradient reaches the heads, and through them the rest once they move.
            let heads: Vec<(String, Tensor)> = own.variables().into_iter().filter(|(n, _)| n.contains(".fc_")).collect();
            assert_eq!(heads.len(), 4, "{label}/{name}: {:?}", own.variables().keys());
            for (pname, v) in &heads {
                assert!(v.grad().defined() && v.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0, "{label}/{name}: no gradient reaches {pname}");
            }
            let again = run().value.double_value(&[]);
            assert_eq!(value.to_bits(), again.to_bits(), "{label}/{name}: same seed, different loss ({value} vs {again})");
            continue;
        }
        let vars: Vec<(String, Tensor)> = nets.online.0.variables().into_iter().filter(|(_, v)| v.requires_grad()).collect();
        let mut missing = vec![];
        for (pname, v) in &vars {
            let g = v.grad();
            if !g.defined() || g.abs().sum(Kind::Double).double_value(&[]) == 0.0 {
                missing.push(pname.clone());
            }
        }
        assert!(missing.is_empty(), "{label}/{name}: no gradient reaches {missing:?}");
        for vs in [&nets.ema.0, &nets.teacher.0] {
            for v in vs.trainable_variables() {
                let g = v.grad();
                assert!(!g.defined() || g.abs().sum(Kind::Double).double_value(&[]) == 0.0, "{label}/{name}: a gradient reached a target net");
            }
        }
        let again = run().value.double_value(&[]);
        assert_eq!(value.to_bits(), again.to_bits(), "{label}/{name}: same seed, different loss ({value} vs {again})");
        println!("{label:4} {name:30} loss {value:10.5}  {} parameter tensors reached", vars.len());
    }
}

#[test]
fn every_objective_on_the_mlp() {
    let _g = lock();
    let make = |p: nn::Path| -> Box<dyn VelocityField> {
        let cfg = MlpConfig { width: 64, depth: 2, num_classes: CLASSES, ..MlpConfig::new(2) };
        Box::new(cfg.init(p).unwrap())
    };
    check_all("mlp", &three(&make), &[B, 2], false, false);
}

fn tiny_dit(variance: Variance) -> DitConfig {
    DitConfig { in_channels: 2, input_size: 8, num_classes: CLASSES, variance, ..DitConfig::arch(1, 32, 2, 2) }
}

/// The objectives that condition the network on a guidance scale and interval (improved MeanFlow)
/// on a tiny DiT with `guidance_conditioning`: gradients reach the guidance embedders too.
#[test]
fn guidance_conditioned_objectives_on_a_tiny_dit() {
    let _g = lock();
    let make = |p: nn::Path| -> Box<dyn VelocityField> { Box::new(DitConfig { guidance_conditioning: true, ..tiny_dit(Variance::Fixed) }.init(p).unwrap()) };
    check_all("dit+g", &three(&make), &[B, 2, 8, 8], false, true);
}

#[test]
fn every_objective_on_a_tiny_dit() {
    let _g = lock();
    let make = |p: nn::Path| -> Box<dyn VelocityField> { Box::new(tiny_dit(Variance::Fixed).init(p).unwrap()) };
    check_all("dit", &three(&make), &[B, 2, 8, 8], false, false);
}

#[test]
fn ddpm_with_learned_variance_on_a_tiny_dit() {
    let _g = lock();
    let make = |p: nn::Path| -> Box<dyn VelocityField> { Box::new(tiny_dit(Variance::Learned).init(p).unwrap()) };
    check_all("dit", &three(&make), &[B, 2, 8, 8], true, false);
}
