//! Samplers against the closed forms of Gaussian data (linear and DDPM paths), float64.
use flowmap_core::{sample, uniform_grid, DdpmSchedule, Diffusion, DiffusionScale, ExactAverageVelocity, ExactEps, ExactTrigFlowJump, ExactVelocity, GaussianData, Linear, StepRule, TrigFlow, VelocityField};
use std::cell::RefCell;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

static RNG: Mutex<()> = Mutex::new(());
const MU: [f64; 4] = [1.0, -2.0, 0.5, 3.0];
const S: f64 = 0.5;

fn data() -> GaussianData {
    GaussianData { mu: Tensor::from_slice(&MU), s: S }
}

fn noise(b: i64) -> Tensor {
    Tensor::randn([b, 4], (Kind::Double, Device::Cpu))
}

fn no_class(b: i64) -> Tensor {
    Tensor::zeros([b], (Kind::Int64, Device::Cpu))
}

fn rms(a: &Tensor) -> f64 {
    a.square().mean(Kind::Double).sqrt().double_value(&[])
}

/// Per-dimension sample mean and the pooled variance around `centre` (4,).
fn moments(x: &Tensor, centre: &[f64; 4]) -> ([f64; 4], f64) {
    let m: Vec<f64> = Vec::try_from(x.mean_dim(0, false, Kind::Double)).unwrap();
    let var = (x - Tensor::from_slice(centre)).square().mean(Kind::Double).double_value(&[]);
    ([m[0], m[1], m[2], m[3]], var)
}

/// Asserts sample moments equal (mean, var) within 5 standard errors for b rows of 4 coordinates.
fn assert_moments(x: &Tensor, mean: &[f64; 4], var: f64, what: &str) {
    let b = x.size()[0] as f64;
    let (m, v) = moments(x, mean);
    for d in 0..4 {
        assert!((m[d] - mean[d]).abs() < 5.0 * (var / b).sqrt(), "{what}: mean[{d}] = {} vs {}", m[d], mean[d]);
    }
    let se_var = var * (2.0 / (4.0 * b)).sqrt();
    assert!((v - var).abs() < 5.0 * se_var, "{what}: var = {v} vs {var} (5 SE = {})", 5.0 * se_var);
}

#[test]
fn exact_fields_are_consistent() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let data = data();
    let path = Linear::new();
    tch::manual_seed(0);
    let eps = noise(64);
    let ones = Tensor::ones([64], (Kind::Double, Device::Cpu));
    // Φ(eps, 1, 1) = mu + s·eps: the linear-path flow map pushes N(0, I) onto N(mu, s² I).
    let x = data.flow_map(&path, &eps, &ones, &ones);
    assert!(rms(&(&x - (&eps * S + &data.mu))) < 1e-14);
    // u(x_t, t, h) → v as h → 0 (first order in h), and u(·, ·, 0) = v exactly.
    let t = Tensor::full([64], 0.7, (Kind::Double, Device::Cpu));
    let v = data.velocity(&path, &eps, &t);
    let u0 = data.average_velocity(&path, &eps, &t, &t.zeros_like());
    assert!(u0.equal(&v));
    let u_small = data.average_velocity(&path, &eps, &t, &t.full_like(1e-6));
    assert!(rms(&(&u_small - &v)) < 1e-5);
    // v is the conditional expectation: for x_t from the true joint, E[(eps − x) − v(x_t)] = 0 and
    // v matches the closed form of the docs: −mu + ((t − (1 − t)s²)/S²)(x_t − (1 − t)mu).
    let (tt, s2) = (0.7, S * S);
    let var = (1.0 - tt) * (1.0 - tt) * s2 + tt * tt;
    let by_hand = ((&eps - &data.mu * (1.0 - tt)) * ((tt - (1.0 - tt) * s2) / var)) - &data.mu;
    assert!(rms(&(&v - by_hand)) < 1e-14);
}

/// RMS error of sampling `eps` to t = 0 with `rule` on N uniform steps against the exact flow map.
fn ode_error(net: &dyn VelocityField, eps: &Tensor, steps: usize, rule: StepRule) -> f64 {
    let path = Linear::new();
    let data = data();
    let b = eps.size()[0];
    let exact = eps * S + &data.mu;
    let x = sample(net, &path, eps.copy(), &no_class(b), &uniform_grid(steps), rule);
    rms(&(x - exact))
}

#[test]
fn euler_is_first_order_and_heun_second_order() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(1);
    let data = data();
    let path = Linear::new();
    let net = ExactVelocity { data: &data, path: &path };
    let eps = noise(256);
    let euler: Vec<f64> = [32, 64, 128].iter().map(|&n| ode_error(&net, &eps, n, StepRule::Euler)).collect();
    let heun: Vec<f64> = [32, 64, 128].iter().map(|&n| ode_error(&net, &eps, n, StepRule::Heun)).collect();
    let ratios = |e: &[f64]| [e[0] / e[1], e[1] / e[2]];
    let (re, rh) = (ratios(&euler), ratios(&heun));
    eprintln!("euler errors {euler:?} ratios {re:?}; heun errors {heun:?} ratios {rh:?}");
    // Global error C/N·(1 + O(1/N)): doubling N halves it; for Heun C/N²·(1 + O(1/N)): quarters
    // it. Measured at N = 16 → 32 the ratios are 1.96 and 3.64, so the O(1/N) terms are ~0.04·16/N
    // (Euler) and ~0.36·16/N (Heun); the bounds allow that at N = 32.
    for r in re {
        assert!((r - 2.0).abs() < 0.05, "Euler ratio {r}");
    }
    for r in rh {
        assert!((r - 4.0).abs() < 0.2, "Heun ratio {r}");
    }
    assert!(heun[2] < euler[2] / 50.0);
}

#[test]
fn mean_flow_jump_with_exact_average_velocity_is_exact() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(2);
    let data = data();
    let path = Linear::new();
    let net = ExactAverageVelocity { data: &data, path: &path };
    let b = 20_000;
    let eps = noise(b);
    let exact = &eps * S + &data.mu;
    for grid in [vec![1.0, 0.0], vec![1.0, 0.5, 0.0], uniform_grid(4), vec![1.0, 0.9, 0.2, 0.0]] {
        let x = sample(&net, &path, eps.copy(), &no_class(b), &grid, StepRule::Jump);
        let err = rms(&(&x - &exact));
        assert!(err < 1e-13, "grid {grid:?}: error {err:e}");
    }
    // One step: the sample distribution is N(mu, s²) within sampling error.
    let x = sample(&net, &path, eps, &no_class(b), &[1.0, 0.0], StepRule::Jump);
    let (m, v) = moments(&x, &MU);
    eprintln!("one-step MeanFlow: mean {m:?}, var {v} (target {MU:?}, {})", S * S);
    assert_moments(&x, &MU, S * S, "one-step MeanFlow");
}

#[test]
fn sde_matches_the_ode_marginals() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let data = data();
    let path = Linear::new();
    let net = ExactVelocity { data: &data, path: &path };
    let b = 20_000;
    let s2 = S * S;
    // The exact law of the Euler–Maruyama chain: every step is x_r = A·x + B·mu + C·z per
    // coordinate (linear path: v = k·x + (−1 − k(1 − t))·mu, ε̂ = x + (1 − t)·v,
    // x_r = x − h·v − (h·g²/(2t))·ε̂ + g·√h·z), so its mean and variance follow a recursion.
    let chain_law = |diffusion: Diffusion, steps: usize| {
        let grid = uniform_grid(steps);
        let (mut mean_coef, mut var) = (0.0, 1.0); // mean = mean_coef·mu
        for w in grid.windows(2) {
            let (t, r) = (w[0], w[1]);
            let h = t - r;
            let g = diffusion.g(t);
            let k = (t - (1.0 - t) * s2) / ((1.0 - t) * (1.0 - t) * s2 + t * t);
            let (vx, vm) = (k, -1.0 - k * (1.0 - t));
            let (ex, em) = (1.0 + (1.0 - t) * vx, (1.0 - t) * vm);
            let c = h * g * g / (2.0 * t);
            let (a, bm) = (1.0 - h * vx - c * ex, -h * vm - c * em);
            let noise_var = if r > 0.0 { g * g * h } else { 0.0 };
            mean_coef = a * mean_coef + bm;
            var = a * a * var + noise_var;
        }
        (mean_coef, var)
    };
    for diffusion in [Diffusion::Constant(DiffusionScale { scale: 1.0 }), Diffusion::Sigma(DiffusionScale { scale: 1.5 })] {
        // The chain's marginal converges to the ODE's, N(mu, s²), at first order (weak order 1).
        let biases: Vec<(f64, f64)> = [100, 200, 400].iter().map(|&n| chain_law(diffusion, n)).map(|(m, v)| (m - 1.0, v - s2)).collect();
        eprintln!("{diffusion:?}: chain-law (mean, var) biases at 100/200/400 steps {biases:?}");
        for w in biases.windows(2) {
            let r = w[0].1 / w[1].1;
            assert!((1.8..2.2).contains(&r), "variance bias ratio {r}");
            assert!(w[1].0.abs() < 1e-9 || (1.8..2.2).contains(&(w[0].0 / w[1].0)), "mean bias {:?}", w);
        }
        assert!(biases[1].1.abs() < 0.03 * s2);
        let x = sample(&net, &path, noise(b), &no_class(b), &uniform_grid(200), StepRule::Sde { diffusion });
        let (mean_coef, var) = chain_law(diffusion, 200);
        let chain_mean: [f64; 4] = MU.map(|m| m * mean_coef);
        let (m, v) = moments(&x, &chain_mean);
        eprintln!("{diffusion:?}: 200-step sample mean {m:?}, var {v}; chain law var {var}");
        assert_moments(&x, &chain_mean, var, "SDE sample vs its chain law");
    }
}

#[test]
fn ddpm_ancestral_and_ddim_on_the_discrete_schedule() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(4);
    let data = data();
    let path = DdpmSchedule::default();
    let net = ExactEps { data: &data, path: &path };
    // The full 1000-step chain: t_n = (n + 1)/1000 for n = 999..0, then t = 0.
    let grid: Vec<f64> = (0..=1000).rev().map(|n| n as f64 / 1000.0).collect();
    let b = 10_000;
    let x = sample(&net, &path, noise(b), &no_class(b), &grid, StepRule::DdpmAncestral);
    // The chain's own law from DDPM's formulas (Ho et al. eq. 7): posterior mean
    // sqrt(ā_{n−1})·beta_n/(1 − ā_n)·x̂ + sqrt(1 − beta_n)·(1 − ā_{n−1})/(1 − ā_n)·x_n, variance
    // beta~_n = beta_n·(1 − ā_{n−1})/(1 − ā_n); here x̂ = E[x | x_n] = P·x_n + Q·mu.
    let ab = path.alphas_cumprod_vec();
    let s2 = S * S;
    let (mut mean_coef, mut var) = (0.0, 1.0);
    for n in (0..1000).rev() {
        let ab_t = ab[n];
        let ab_r = if n == 0 { 1.0 } else { ab[n - 1] };
        let beta = 1.0 - ab_t / ab_r;
        let total = ab_t * s2 + (1.0 - ab_t); // Var(x_n)
        let p = (1.0 - (1.0 - ab_t) / total) / ab_t.sqrt();
        let q = (1.0 - ab_t) / total;
        let c_hat = ab_r.sqrt() * beta / (1.0 - ab_t);
        let c_x = (1.0 - beta).sqrt() * (1.0 - ab_r) / (1.0 - ab_t);
        let a = c_x + c_hat * p;
        mean_coef = a * mean_coef + c_hat * q;
        var = a * a * var + beta * (1.0 - ab_r) / (1.0 - ab_t);
    }
    eprintln!("DDPM chain law: mean {mean_coef}·mu, var {var} (data: mu, {s2})");
    // Ancestral sampling with x̂ = E[x | x_n] drops c_hat²·Var(x | x_n) from every step's variance,
    // so the chain is slightly under-dispersed: about 1.6 % of s² here.
    assert!((mean_coef - 1.0).abs() < 1e-4 && (var - s2).abs() < 2e-2 * s2);
    let chain_mean: [f64; 4] = MU.map(|m| m * mean_coef);
    let (m, v) = moments(&x, &chain_mean);
    eprintln!("DDPM ancestral sample: mean {m:?}, var {v}");
    assert_moments(&x, &chain_mean, var, "DDPM ancestral");

    // DDIM with the exact eps is a first-order solver of the same ODE: compare with the exact flow
    // map of the discrete path from t = 1.
    let eps = noise(256);
    let ones = Tensor::ones([256], (Kind::Double, Device::Cpu));
    let exact = data.flow_map(&path, &eps, &ones, &ones);
    let errs: Vec<f64> = [50usize, 100, 200].iter().map(|&n| rms(&(sample(&net, &path, eps.copy(), &no_class(256), &uniform_grid(n), StepRule::Ddim) - &exact))).collect();
    eprintln!("DDIM errors {errs:?}");
    assert!(errs[2] < 0.02, "DDIM with 200 steps: {}", errs[2]);
    for w in errs.windows(2) {
        let r = w[0] / w[1];
        assert!((1.7..2.3).contains(&r), "DDIM error ratio {r}");
    }
}

#[test]
fn consistency_multistep_with_exact_jump_keeps_the_data_law() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let data = data();
    let path = Linear::new();
    let net = ExactAverageVelocity { data: &data, path: &path };
    let b = 20_000;
    // Each jump to data is exact and each re-noising draws x_τ from the true marginal.
    let x = sample(&net, &path, noise(b), &no_class(b), &[1.0, 0.6, 0.3, 0.0], StepRule::Renoise);
    assert_moments(&x, &MU, S * S, "consistency multistep");
}

#[test]
fn trig_flow_consistency_sampling_with_the_exact_jump_keeps_the_data_law() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(6);
    let data = data();
    let path = TrigFlow { sigma_d: 0.5 };
    let net = ExactTrigFlowJump { data: &data, path: &path };
    let b = 20_000;
    // The rule starts from sigma(1)·eps = σ_d·eps; one step, two steps at sCM's τ_mid = 1.1
    // (t = 2.2/π), and four uniform steps all land on N(mu, s² I).
    let mid = 2.2 / std::f64::consts::PI;
    for grid in [vec![1.0, 0.0], vec![1.0, mid, 0.0], uniform_grid(4)] {
        let x = sample(&net, &path, noise(b), &no_class(b), &grid, StepRule::TrigFlow);
        assert_moments(&x, &MU, S * S, &format!("trig_flow on {grid:?}"));
    }
    // One step is the exact flow map of the start point (deterministic).
    let eps = noise(64);
    let ones = Tensor::ones([64], (Kind::Double, Device::Cpu));
    let one = sample(&net, &path, eps.copy(), &no_class(64), &[1.0, 0.0], StepRule::TrigFlow);
    let exact = data.flow_map(&path, &(&eps * 0.5), &ones, &ones);
    assert!(rms(&(one - exact)) < 1e-12);
    // The network sees x_t/σ_d = (σ_d·ε)/σ_d: a recorder of inputs gets ε back.
    let seen = RefCell::new(Tensor::zeros([1], (Kind::Double, Device::Cpu)));
    let spy = (
        |x: &Tensor, _t: &Tensor, _h: &Tensor, _c: &Tensor| {
            *seen.borrow_mut() = x.copy();
            x.zeros_like()
        },
        0,
    );
    let start = noise(8);
    let out = sample(&spy, &path, start.copy(), &no_class(8), &[1.0, 0.0], StepRule::TrigFlow);
    assert!(rms(&(&*seen.borrow() - &start)) < 1e-15);
    assert!(rms(&out) < 1e-15, "alpha(1) = 0: a zero output jumps to 0");
}

/// (t, h, kind of t) of one call.
type Call = (Vec<f64>, Vec<f64>, Kind);

/// Records (t, h) of every call; returns zeros shaped like x_t.
struct Recorder(RefCell<Vec<Call>>);
impl VelocityField for Recorder {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, _class: &Tensor) -> Tensor {
        self.0.borrow_mut().push((Vec::try_from(t).unwrap(), Vec::try_from(h).unwrap(), t.kind()));
        x_t.zeros_like()
    }
    fn null_class(&self) -> i64 {
        0
    }
}

#[test]
fn the_network_receives_t_and_h_per_rule() {
    single_thread();
    let grid = uniform_grid(4);
    let noise = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
    let cases: [(StepRule, Vec<(f64, f64)>); 5] = [
        (StepRule::Euler, vec![(1.0, 0.0), (0.75, 0.0), (0.5, 0.0), (0.25, 0.0)]),
        (StepRule::Jump, vec![(1.0, 0.25), (0.75, 0.25), (0.5, 0.25), (0.25, 0.25)]),
        (StepRule::Heun, vec![(1.0, 0.0), (0.75, 0.0), (0.75, 0.0), (0.5, 0.0), (0.5, 0.0), (0.25, 0.0), (0.25, 0.0), (0.0, 0.0)]),
        (StepRule::Renoise, vec![(1.0, 1.0), (0.75, 0.75), (0.5, 0.5), (0.25, 0.25)]),
        (StepRule::TrigFlow, vec![(1.0, 1.0), (0.75, 0.75), (0.5, 0.5), (0.25, 0.25)]),
    ];
    for (rule, expected) in cases {
        let rec = Recorder(RefCell::new(vec![]));
        let x = sample(&rec, &Linear::new(), noise.copy(), &no_class(3), &grid, rule);
        assert_eq!(x.size(), [3, 2]);
        let calls = rec.0.into_inner();
        let got: Vec<(f64, f64)> = calls.iter().map(|(t, h, _)| (t[0], h[0])).collect();
        assert_eq!(got, expected, "{rule:?}");
        assert!(calls.iter().all(|(t, h, k)| t.len() == 3 && h.len() == 3 && *k == Kind::Float));
    }
}

#[test]
#[should_panic(expected = "strictly descending")]
fn ascending_grids_are_rejected() {
    single_thread();
    let rec = Recorder(RefCell::new(vec![]));
    let _ = sample(&rec, &Linear::new(), Tensor::zeros([1, 1], (Kind::Float, Device::Cpu)), &no_class(1), &[0.0, 1.0], StepRule::Euler);
}

/// One intra-op thread: the test threads already use both cores, and OpenMP spinning on an
/// oversubscribed machine is many times slower than running single-threaded.
fn single_thread() {
    tch::set_num_threads(1);
}
