//! Options that reproduce the Shortcut code's Table-1 baselines (issue 18) next to flowmap's own
//! behaviour: consistency training's curriculum counting updates from 1, live reflow's reflow-row
//! target without the path's (1 − sigma_min) factor, progressive distillation's refresh source.
use flowmap_core::{InterpolantConfig, SigmaMinConfig, VelocityField};
use flowmap_objectives::*;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

// The global generator is process-wide: tests that reseed it must not overlap.
static SEED: Mutex<()> = Mutex::new(());
fn lock() -> std::sync::MutexGuard<'static, ()> {
    SEED.lock().unwrap_or_else(|e| e.into_inner())
}

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

fn metric(loss: &Loss, name: &str) -> f64 {
    loss.metrics.iter().find(|(k, _)| *k == name).unwrap_or_else(|| panic!("no metric {name}")).1.double_value(&[])
}

/// The loss of `objective` at `step` on a fixed batch, with the generator seeded to `seed`.
fn loss_at(objective: &dyn Objective, net: &dyn VelocityField, batch: &Batch, step: u64, seed: i64) -> Loss {
    tch::manual_seed(seed);
    objective.loss(Nets { online: net, ema: net, teacher: Some(net) }, batch, step)
}

fn batch(n: i64, d: i64) -> Batch {
    tch::manual_seed(0);
    Batch::new(Tensor::randn([n, d], F64), Tensor::zeros([n], (Kind::Int64, Device::Cpu)))
}

#[test]
fn consistency_training_counting_from_one_moves_the_curriculum_one_update_earlier() {
    let _g = lock();
    let toml = |from: u64| format!("kind = \"consistency_training\"\ncount_steps_from = {from}\n[grid.spacing]\nkind = \"uniform\"\n[grid.schedule]\nkind = \"doubling\"\nstages = 3\ntotal_steps = 30\n");
    let build = |from| toml::from_str::<ObjectiveConfig>(&toml(from)).unwrap().build().unwrap();
    let (zero, one) = (build(0), build(1));
    // A net that predicts F = 0: x̂ = x_r and the target (x_t − x_r)/t depends on the grid's gap.
    let net = (|x: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor| x.zeros_like(), 0i64);
    let b = batch(256, 4);
    let l = |o: &dyn Objective, step| loss_at(o, &net, &b, step, 7).value.double_value(&[]);
    // Stage boundaries at 10 and 20: counted from 1, step 9 already trains stage 1 (step 10 counted from 0).
    for step in [0, 9, 19, 25] {
        assert_eq!(l(one.as_ref(), step), l(zero.as_ref(), step + 1), "step {step}");
    }
    assert_ne!(l(one.as_ref(), 9), l(zero.as_ref(), 9), "step 9: the two countings train different stages");
    assert_ne!(l(one.as_ref(), 19), l(zero.as_ref(), 19));
    assert_eq!(l(one.as_ref(), 5), l(zero.as_ref(), 5), "inside a stage both train the same grid");
    // Only 0 and 1 mean something; other values are refused naming the key.
    let e = format!("{:#}", toml::from_str::<ObjectiveConfig>(&toml(2)).unwrap().build().err().unwrap());
    assert!(e.contains("count_steps_from"), "{e}");
    // The code's settings: sigma_min path, steps from 1.
    let code = ConsistencyTrainingConfig::shortcut_code(700);
    assert_eq!((code.path, code.count_steps_from), (InterpolantConfig::LinearSigmaMin(SigmaMinConfig { sigma_min: 1e-5 }), 1));
}

#[test]
fn live_reflow_endpoint_difference_drops_the_sigma_min_factor_on_reflow_rows_only() {
    let _g = lock();
    // A large sigma_min makes the factor visible; a net that predicts 0 rolls ε out to x_gen = ε,
    // so the code's target ε − x_gen is 0 and the path's velocity (1 − σ)ε − x_gen is −σ·ε.
    let sigma = 0.5;
    let cfg = |target| LiveReflowConfig { path: InterpolantConfig::LinearSigmaMin(SigmaMinConfig { sigma_min: sigma }), reflow_fraction: 0.5, reflow_target: target, ..Default::default() };
    let net = (|x: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor| x.zeros_like(), 0i64);
    let b = batch(512, 16);
    let path = loss_at(&cfg(ReflowTarget::PathVelocity).build().unwrap(), &net, &b, 0, 3);
    let code = loss_at(&cfg(ReflowTarget::EndpointDifference).build().unwrap(), &net, &b, 0, 3);
    assert_eq!(metric(&code, "reflow_loss"), 0.0, "endpoint difference: ε − x_gen = 0");
    let expected = sigma * sigma; // E[(σ·ε)²] per element
    let measured = metric(&path, "reflow_loss");
    assert!((measured - expected).abs() < 0.05 * expected, "path velocity: reflow loss {measured}, expected σ² = {expected}");
    assert_eq!(metric(&path, "flow_loss"), metric(&code, "flow_loss"), "flow rows are the same under both options");
    // On the plain path the two targets coincide.
    let plain = |target| LiveReflowConfig { reflow_target: target, reflow_fraction: 0.5, ..Default::default() }.build().unwrap();
    let (a, c) = (loss_at(&plain(ReflowTarget::PathVelocity), &net, &b, 0, 3), loss_at(&plain(ReflowTarget::EndpointDifference), &net, &b, 0, 3));
    assert_eq!(a.value.double_value(&[]), c.value.double_value(&[]));
    // TOML spelling.
    let t: ObjectiveConfig = toml::from_str("kind = \"live_reflow\"\nreflow_target = \"endpoint_difference\"").unwrap();
    assert!(matches!(t, ObjectiveConfig::LiveReflow(LiveReflowConfig { reflow_target: ReflowTarget::EndpointDifference, .. })));
    assert!(toml::from_str::<ObjectiveConfig>("kind = \"live_reflow\"\nreflow_target = \"x_minus_x0\"").is_err());
}

#[test]
fn progressive_refresh_source_defaults_to_online_and_the_code_option_is_ema() {
    let pd = |extra: &str| toml::from_str::<ObjectiveConfig>(&format!("kind = \"progressive_distillation\"\nsteps_per_stage = 10\n{extra}")).unwrap().build().unwrap();
    assert_eq!(pd("").teacher_refresh_source(), TargetNet::Online);
    assert_eq!(pd("refresh_from = \"ema\"").teacher_refresh_source(), TargetNet::Ema);
    assert_eq!(pd("refresh_from = \"online\"").teacher_refresh_source(), TargetNet::Online);
    let e = toml::from_str::<ObjectiveConfig>("kind = \"progressive_distillation\"\nsteps_per_stage = 10\nrefresh_from = \"teacher\"").unwrap_err().to_string();
    assert!(e.contains("refresh_from") || e.contains("teacher"), "{e}");
}
