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
