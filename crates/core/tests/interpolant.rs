//! Interpolants: derivatives against central finite differences, boundary values, conversions.
use flowmap_core::{DdpmSchedule, Interpolant, Linear, TrigFlow, VpCosine, VpLinearBeta};
use tch::{Device, Kind, Tensor};

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn paths() -> Vec<Box<dyn Interpolant>> {
    vec![
        Box::new(Linear::new()),
        Box::new(Linear::shortcut()),
        Box::new(VpCosine { offset: 0.008 }),
        Box::new(VpCosine { offset: 0.0 }),
        Box::new(VpLinearBeta { steps: 1000.0, beta_start: 1e-4, beta_end: 0.02 }),
        Box::new(DdpmSchedule::default()),
        Box::new(TrigFlow { sigma_d: 0.5 }),
    ]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn derivatives_match_central_differences() {
    single_thread();
    // Mid-interval points of the DDPM grid (log ā is piecewise linear between nodes m/1000).
    let times = [0.0505, 0.1235, 0.3005, 0.5005, 0.7315, 0.9005, 0.9605];
    let t = Tensor::from_slice(&times);
    let delta = 1e-6;
    let (tp, tm) = (&t + delta, &t - delta);
    for path in paths() {
        let checks: [(&str, Tensor, Tensor, Tensor); 2] = [("alpha", path.d_alpha(&t), path.alpha(&tp), path.alpha(&tm)), ("sigma", path.d_sigma(&t), path.sigma(&tp), path.sigma(&tm))];
        for (name, d, fp, fm) in checks {
            let fd = (fp - fm) / (2.0 * delta);
            // Central differences: truncation O(delta²·f''') plus rounding O(1e-16/delta) ≈ 1e-10.
            let err = f64s(&(&fd - &d).abs()).into_iter().zip(f64s(&d)).map(|(e, d)| e / (1.0 + d.abs())).fold(0.0, f64::max);
            assert!(err < 1e-7, "{path:?} d_{name}: relative error {err:e}");
        }
    }
}

#[test]
fn boundary_values() {
    single_thread();
    let t0 = Tensor::from_slice(&[0.0f64]);
    let t1 = Tensor::from_slice(&[1.0f64]);
    let x = Tensor::randn([3, 2, 4, 4], (Kind::Double, Device::Cpu));
    let eps = Tensor::randn([3, 2, 4, 4], (Kind::Double, Device::Cpu));
    let zeros3 = Tensor::zeros([3], (Kind::Double, Device::Cpu));
    for path in paths() {
        assert!((path.alpha(&t0).double_value(&[0]) - 1.0).abs() < 1e-15, "{path:?} alpha(0)");
        let sigma_min = if format!("{path:?}").contains("sigma_min: 1e-5") { 1e-5 } else { 0.0 };
        assert!((path.sigma(&t0).double_value(&[0]) - sigma_min).abs() < 1e-15, "{path:?} sigma(0)");
        let x_0 = path.interpolate(&x, &eps, &zeros3);
        let expected = &x + &eps * sigma_min;
        assert!(max_abs_diff(&x_0, &expected) < 1e-15, "{path:?} interpolate at t = 0");
    }
    // interpolate(x, eps, 0) == x exactly for the plain linear path.
    assert!(Linear::new().interpolate(&x, &eps, &zeros3).equal(&x));
    // sigma(1) = 1 and alpha(1) = 0 where the path reaches pure noise.
    for path in [Box::new(Linear::new()) as Box<dyn Interpolant>, Box::new(Linear::shortcut()), Box::new(VpCosine { offset: 0.008 })] {
        assert!((path.sigma(&t1).double_value(&[0]) - 1.0).abs() < 1e-15, "{path:?} sigma(1)");
        assert!(path.alpha(&t1).double_value(&[0]).abs() < 1e-15, "{path:?} alpha(1)");
    }
    assert!((TrigFlow { sigma_d: 0.5 }.sigma(&t1).double_value(&[0]) - 0.5).abs() < 1e-15);
    // Continuous VP: sigma(1)² = 1 − exp(−∫₀¹beta) = 1 − exp(−1000·(1e-4 + 0.5·(0.02 − 1e-4))).
    let vp = VpLinearBeta { steps: 1000.0, beta_start: 1e-4, beta_end: 0.02 };
    let expected = (1.0 - (-10.05f64).exp()).sqrt();
    assert!((vp.sigma(&t1).double_value(&[0]) - expected).abs() < 1e-15);
    // Discrete DDPM: alpha(1) = √ā_999.
    let ddpm = DdpmSchedule::default();
    let ab = ddpm.alphas_cumprod_vec();
    assert!((ddpm.alpha(&t1).double_value(&[0]) - ab[999].sqrt()).abs() < 1e-15);
}

#[test]
fn conversions_round_trip() {
    single_thread();
    let x = Tensor::randn([5, 3, 2], (Kind::Double, Device::Cpu));
    let eps = Tensor::randn([5, 3, 2], (Kind::Double, Device::Cpu));
    let t = Tensor::from_slice(&[0.05f64, 0.25, 0.5, 0.75, 0.95]);
    for path in paths() {
        let x_t = path.interpolate(&x, &eps, &t);
        let v = path.velocity(&x, &eps, &t);
        let score = path.score_from_eps(&eps, &t);
        let cases = [
            ("x_from_velocity", path.x_from_velocity(&x_t, &v, &t), &x),
            ("eps_from_velocity", path.eps_from_velocity(&x_t, &v, &t), &eps),
            ("x_from_eps", path.x_from_eps(&x_t, &eps, &t), &x),
            ("eps_from_x", path.eps_from_x(&x_t, &x, &t), &eps),
            ("velocity_from_eps", path.velocity_from_eps(&x_t, &eps, &t), &v),
            ("velocity_from_x", path.velocity_from_x(&x_t, &x, &t), &v),
            ("eps_from_score", path.eps_from_score(&score, &t), &eps),
            ("velocity_from_score", path.velocity_from_score(&x_t, &score, &t), &v),
        ];
        for (name, got, want) in cases {
            let err = max_abs_diff(&got, want);
            assert!(err < 1e-10, "{path:?} {name}: {err:e}");
        }
        let s = path.score_from_velocity(&x_t, &v, &t);
        assert!(max_abs_diff(&s, &score) < 1e-9, "{path:?} score_from_velocity");
    }
    // The linear-path closed forms of methods.md §1.3.
    let lin = Linear::new();
    let x_t = lin.interpolate(&x, &eps, &t);
    let v = &eps - &x;
    assert!(max_abs_diff(&lin.velocity(&x, &eps, &t), &v) < 1e-15);
    let tb = t.reshape([5, 1, 1]);
    assert!(max_abs_diff(&lin.x_from_velocity(&x_t, &v, &t), &(&x_t - &tb * &v)) < 1e-14);
    let eps_lin = &x_t + (1.0 - &tb) * &v;
    assert!(max_abs_diff(&lin.eps_from_velocity(&x_t, &v, &t), &eps_lin) < 1e-14);
    assert!(max_abs_diff(&lin.score_from_velocity(&x_t, &v, &t), &(-(&eps_lin / &tb))) < 1e-13);
    // Shortcut path: v = (1 − sigma_min)·eps − x.
    let sc = Linear::shortcut();
    assert!(max_abs_diff(&sc.velocity(&x, &eps, &t), &(&eps * (1.0 - 1e-5) - &x)) < 1e-15);
}

#[test]
fn ddpm_schedule_matches_discrete_definition() {
    single_thread();
    let ddpm = DdpmSchedule::default();
    let betas = ddpm.betas_vec();
    assert_eq!(betas.len(), 1000);
    assert_eq!(betas[0], 1e-4);
    assert!((betas[999] - 0.02).abs() < 1e-17);
    let ab = ddpm.alphas_cumprod_vec();
    // ā_999 of the ADM linear schedule (numpy float64: 4.0358e-05).
    assert!((ab[999] - 4.0358e-5).abs() < 1e-8, "ā_999 = {:e}", ab[999]);
    let ab_tensor = f64s(&ddpm.alphas_cumprod(Device::Cpu));
    let err = ab.iter().zip(&ab_tensor).map(|(a, b)| (a - b).abs() / a).fold(0.0, f64::max);
    assert!(err < 1e-12, "host and tensor tables differ by {err:e}");
    // The interpolant is exact at t_n = (n + 1)/1000 (float64 t), also in float32 to f32 precision.
    let n = Tensor::from_slice(&[0i64, 1, 17, 249, 500, 998, 999]);
    let t = (n.to_kind(Kind::Double) + 1.0) / 1000.0;
    let alpha = f64s(&ddpm.alpha(&t));
    let sigma = f64s(&ddpm.sigma(&t));
    for (k, &nk) in [0usize, 1, 17, 249, 500, 998, 999].iter().enumerate() {
        assert!((alpha[k] * alpha[k] - ab[nk]).abs() < 1e-12, "alpha(t_{nk})² vs ā: {:e}", alpha[k] * alpha[k] - ab[nk]);
        assert!((sigma[k] * sigma[k] - (1.0 - ab[nk])).abs() < 1e-12, "sigma(t_{nk})²");
    }
    assert!(ddpm.step_of_t(&t).equal(&n));
    assert!(ddpm.step_of_t(&ddpm.t_of_step(&n)).equal(&n), "round trip through float32 t");
    // The continuous VP path tracks the discrete one (log(1 − beta) ≈ −beta; grid offsets).
    let vp = VpLinearBeta { steps: 1000.0, beta_start: 1e-4, beta_end: 0.02 };
    let all_n = Tensor::arange(1000, (Kind::Int64, Device::Cpu));
    let t_all = (all_n.to_kind(Kind::Double) + 1.0) / 1000.0;
    let gap = max_abs_diff(&vp.alpha(&t_all), &ddpm.alpha(&t_all));
    assert!(gap < 2e-3, "continuous vs discrete alpha differ by {gap:e}");
}

/// One intra-op thread: the test threads already use both cores, and OpenMP spinning on an
/// oversubscribed machine is many times slower than running single-threaded.
fn single_thread() {
    tch::set_num_threads(1);
}
