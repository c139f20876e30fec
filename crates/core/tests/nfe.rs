//! The NFE counter: transparent, and it counts what each rule and guidance really evaluate.
use flowmap_core::{sample, uniform_grid, Diffusion, DiffusionScale, Guided, Linear, NfeCounter, Prediction, RuleName, StepRule, VelocityField};
use tch::{Device, Kind, Tensor};

/// F(x_t, t, h, c) = x_t·(c + 1)/4 + t − h, per sample (depends on every input, so a wrong
/// argument changes the result).
fn net() -> impl VelocityField {
    (|x: &Tensor, t: &Tensor, h: &Tensor, c: &Tensor| x * (c.to_kind(Kind::Double) + 1.0).reshape([-1, 1]) * 0.25 + (t - h).reshape([-1, 1]), 3i64)
}

fn inputs(b: i64) -> (Tensor, Tensor) {
    let noise = Tensor::arange(b * 2, (Kind::Double, Device::Cpu)).reshape([b, 2]) / 7.0 - 0.5;
    let class = Tensor::arange(b, (Kind::Int64, Device::Cpu)).remainder(3);
    (noise, class)
}

/// (samples, nfe per sample, forward calls) of `steps` uniform steps of `rule` with guidance `scale`.
fn run(rule: StepRule, steps: usize, scale: f64) -> (Tensor, f64, u64) {
    let b = 5;
    let base = net();
    let counter = NfeCounter::new(&base);
    let (noise, class) = inputs(b);
    let x = sample(&Guided::new(&counter, scale), &Linear::new(), noise, &class, &uniform_grid(steps), rule);
    (x, counter.nfe(b), counter.calls())
}

#[test]
fn the_counter_does_not_change_the_samples() {
    let base = net();
    let (noise, class) = inputs(5);
    for rule in [StepRule::Euler, StepRule::Heun, StepRule::Jump] {
        let plain = sample(&Guided::new(&base, 1.5), &Linear::new(), noise.copy(), &class, &uniform_grid(3), rule);
        let (counted, _, _) = run(rule, 3, 1.5);
        assert_eq!(f64::try_from((plain - counted).abs().max()).unwrap(), 0.0, "{rule:?}");
    }
}

#[test]
fn one_evaluation_rules_cost_one_per_step() {
    for rule in [StepRule::Euler, StepRule::Jump, StepRule::Renoise, StepRule::TrigFlow, StepRule::Sde { diffusion: Diffusion::Constant(DiffusionScale { scale: 0.0 }) }] {
        for steps in [1, 2, 5] {
            let (_, nfe, calls) = run(rule, steps, 1.0);
            assert_eq!((nfe, calls), (steps as f64, steps as u64), "{rule:?} with {steps} steps");
        }
    }
}

#[test]
fn heun_costs_two_per_step_including_the_last() {
    for steps in [1, 3, 4] {
        let (_, nfe, calls) = run(StepRule::Heun, steps, 1.0);
        assert_eq!((nfe, calls), (2.0 * steps as f64, 2 * steps as u64), "{steps} steps");
    }
}

#[test]
fn guidance_counts_two_evaluations_per_step_in_one_call() {
    // cond + uncond go through the network as one call of 2B rows: calls stay at one per step,
    // evaluations per sample double.
    let (_, nfe, calls) = run(StepRule::Euler, 4, 2.0);
    assert_eq!((nfe, calls), (8.0, 4));
    let (_, nfe, calls) = run(StepRule::Heun, 3, 2.0);
    assert_eq!((nfe, calls), (12.0, 6));
    // w = 1 skips the unconditional half.
    let (_, nfe, _) = run(StepRule::Euler, 4, 1.0);
    assert_eq!(nfe, 4.0);
}

#[test]
fn reset_starts_from_zero() {
    let base = net();
    let counter = NfeCounter::new(&base);
    let (noise, class) = inputs(2);
    let _ = sample(&counter, &Linear::new(), noise, &class, &uniform_grid(2), StepRule::Euler);
    assert_eq!((counter.calls(), counter.rows()), (2, 4));
    counter.reset();
    assert_eq!((counter.calls(), counter.rows(), counter.nfe(2)), (0, 0, 0.0));
    assert_eq!(counter.null_class(), 3);
}

#[test]
fn rule_names_round_trip_and_the_sde_needs_a_diffusion() {
    let d = Diffusion::Sigma(DiffusionScale { scale: 1.0 });
    for name in RuleName::ALL {
        let rule = name.step_rule(Some(d)).unwrap();
        assert_eq!(rule.name(), name);
        let parsed: RuleName = toml::from_str::<toml::Table>(&format!("r = \"{}\"", name.name())).unwrap()["r"].clone().try_into().unwrap();
        assert_eq!(parsed, name);
    }
    let e = RuleName::Sde.step_rule(None).unwrap_err().to_string();
    assert!(e.contains("diffusion"), "{e}");
}

#[test]
fn predictions_accept_the_rules_that_read_them() {
    assert!(Prediction::Eps.accepts(RuleName::Ddim) && !Prediction::Eps.accepts(RuleName::Euler));
    assert!(Prediction::Velocity.accepts(RuleName::Heun) && !Prediction::Velocity.accepts(RuleName::Jump) && !Prediction::Velocity.accepts(RuleName::Ddim));
    assert!(Prediction::AverageVelocity.accepts(RuleName::Euler) && Prediction::AverageVelocity.accepts(RuleName::Jump));
    assert_eq!(Prediction::JumpToData.rules(), &[RuleName::Renoise]);
    assert_eq!(Prediction::TrigFlowJump.rules(), &[RuleName::TrigFlow]);
    // Every rule is accepted by some prediction.
    for r in RuleName::ALL {
        assert!([Prediction::Eps, Prediction::Velocity, Prediction::AverageVelocity, Prediction::JumpToData, Prediction::TrigFlowJump].iter().any(|p| p.accepts(r)), "{r:?}");
    }
}

#[test]
fn amed_costs_two_per_step_and_is_counted() {
    use flowmap_core::{amed_sample, AmedPredictor};
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let predictor = AmedPredictor::new(&vs.root());
    let base = (|x: &Tensor, t: &Tensor, _h: &Tensor, _c: &Tensor| x * 0.5 + t.reshape([-1, 1]), 3i64);
    let b = 5;
    let noise = Tensor::randn([b, 2], (Kind::Float, Device::Cpu));
    let class = Tensor::zeros([b], (Kind::Int64, Device::Cpu));
    for steps in [1, 2, 5] {
        let counter = NfeCounter::new(&base);
        let x = amed_sample(&counter, &predictor, noise.copy(), &class, &uniform_grid(steps));
        assert_eq!((counter.nfe(b), counter.calls()), (2.0 * steps as f64, 2 * steps as u64), "{steps} steps");
        assert_eq!(StepRule::Amed.nfe_per_step() * steps, counter.calls() as usize);
        assert_eq!(x.size(), [b, 2]);
        // Guided: one call of 2B rows per evaluation, two evaluations per sample and call.
        let counter = NfeCounter::new(&base);
        let _ = amed_sample(&Guided::new(&counter, 1.5), &predictor, noise.copy(), &class, &uniform_grid(steps));
        assert_eq!((counter.nfe(b), counter.calls()), (4.0 * steps as f64, 2 * steps as u64), "{steps} guided steps");
    }
}

#[test]
fn a_non_uniform_grid_costs_what_its_steps_cost() {
    // An optimised grid is only a list of times: its NFE is steps × the rule's cost per step.
    let grid = [1.0, 0.83, 0.41, 0.07, 0.0];
    for rule in [StepRule::Euler, StepRule::Heun, StepRule::DpmSolverPp2M { reads: flowmap_core::Reads::Velocity }, StepRule::UniPc { reads: flowmap_core::Reads::Velocity }] {
        let base = net();
        let counter = NfeCounter::new(&base);
        let (noise, class) = inputs(4);
        let _ = sample(&counter, &Linear::new(), noise, &class, &grid, rule);
        assert_eq!(counter.nfe(4), (rule.nfe_per_step() * 4) as f64, "{rule:?}");
    }
}

#[test]
fn sample_refuses_the_amed_rule_without_its_predictor() {
    let base = net();
    let (noise, class) = inputs(2);
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sample(&base, &Linear::new(), noise, &class, &uniform_grid(2), StepRule::Amed))).unwrap_err();
    let msg = e.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| e.downcast_ref::<String>().cloned()).unwrap_or_default();
    assert!(msg.contains("amed_sample"), "{msg}");
}
