//! The grid search: finds a known optimum, keeps the end points and the order, never returns a
//! worse grid than its start, and lowers Euler's error on Gaussian data with the exact velocity.
use flowmap_core::{grid_error, sample, search_grid, uniform_grid, ExactVelocity, GaussianData, Linear, StepRule};
use tch::{Device, Kind, Tensor};

#[test]
fn finds_a_known_optimum_and_keeps_the_grid_valid() {
    let target = [1.0, 0.7, 0.3, 0.05, 0.0];
    let found = search_grid(&uniform_grid(4), 4, 12, |g| g.iter().zip(target).map(|(a, b)| (a - b).powi(2)).sum());
    assert_eq!((found.times[0], found.times[4]), (1.0, 0.0));
    assert!(found.times.windows(2).all(|w| w[0] > w[1]), "{:?}", found.times);
    for (a, b) in found.times.iter().zip(target) {
        assert!((a - b).abs() < 0.01, "{:?} vs {target:?}", found.times);
    }
    assert!(found.error < 1e-3 && found.start_error > 0.01, "{found:?}");
    // A start that is already optimal stays.
    let flat = search_grid(&target, 2, 6, |g| g.iter().zip(target).map(|(a, b)| (a - b).powi(2)).sum());
    assert_eq!(flat.times, target.to_vec());
    // One step has nothing to move.
    assert_eq!(search_grid(&[1.0, 0.0], 3, 8, |_| 1.0).times, vec![1.0, 0.0]);
}

#[test]
fn lowers_euler_error_on_gaussian_data_with_the_exact_velocity() {
    let data = GaussianData { mu: Tensor::from_slice(&[2.0f64, -1.0]), s: 0.1 };
    let path = Linear::new();
    let net = ExactVelocity { data: &data, path: &path };
    let noise = Tensor::from_slice(&[0.3f64, -1.2, 1.1, 0.4, -0.7, 0.9, 1.5, -0.2]).reshape([4, 2]);
    let class = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
    let reference = sample(&net, &path, noise.copy(), &class, &uniform_grid(512), StepRule::Heun);
    let found = search_grid(&uniform_grid(3), 3, 10, |g| grid_error(&net, &path, StepRule::Euler, &noise, &class, &reference, g));
    assert!(found.error < 0.5 * found.start_error, "{found:?}");
    assert_eq!(found.error, grid_error(&net, &path, StepRule::Euler, &noise, &class, &reference, &found.times));
}
