//! Multistep solvers (DPM-Solver++ 2M/3M, UniPC bh2) and the sampling grids against the closed
//! forms of Gaussian data, float64: convergence orders, NFE counted, the times the network sees.
use flowmap_core::grids::EdmGrid;
use flowmap_core::grids::{noise_level, time_at_level};
use flowmap_core::{edm_grid, logsnr_grid, sample, uniform_grid, DdpmSchedule, ExactEps, ExactVelocity, GaussianData, GridKind, Interpolant, Linear, NfeCounter, Reads, StepRule, VelocityField, VpLinearBeta};
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

const MU: [f64; 4] = [1.0, -2.0, 0.5, 3.0];
const S: f64 = 0.5;

fn data() -> GaussianData {
    GaussianData { mu: Tensor::from_slice(&MU), s: S }
}

fn no_class(b: i64) -> Tensor {
    Tensor::zeros([b], (Kind::Int64, Device::Cpu))
}

fn rms(a: &Tensor) -> f64 {
    a.square().mean(Kind::Double).sqrt().double_value(&[])
}

/// Deterministic inputs (no generator): b rows of 4 coordinates in about [−1.6, 1.6].
fn inputs(b: i64) -> Tensor {
    (Tensor::arange(b * 4, (Kind::Double, Device::Cpu)) * 0.7).sin().reshape([b, 4]) * 1.6
}

fn multistep_rules(reads: Reads) -> [StepRule; 3] {
    [StepRule::DpmSolverPp2M { reads }, StepRule::DpmSolverPp3M { reads }, StepRule::UniPc { reads }]
}

/// `n` steps uniform in log-SNR from t_start down to t_end (both interior: finite λ).
fn interior_grid(path: &dyn Interpolant, t_start: f64, t_end: f64, n: usize) -> Vec<f64> {
    let (hi, lo) = (noise_level(path, t_start).ln(), noise_level(path, t_end).ln());
    let mut g: Vec<f64> = (0..=n).map(|i| time_at_level(path, (hi + (lo - hi) * i as f64 / n as f64).exp())).collect();
    (g[0], g[n]) = (t_start, t_end);
    g
}

/// As [`interior_grid`], with the first step cut to Δλ² (so a first-order first step's local
/// error is O(Δλ⁴)): λ_0, λ_0 + Δλ², λ_0 + Δλ, λ_0 + 2Δλ, …
fn short_first_step_grid(path: &dyn Interpolant, t_start: f64, t_end: f64, n: usize) -> Vec<f64> {
    let (hi, lo) = (noise_level(path, t_start).ln(), noise_level(path, t_end).ln());
    let dl = (hi - lo) / n as f64;
    let mut g = interior_grid(path, t_start, t_end, n);
    g.insert(1, time_at_level(path, (hi - dl * dl).exp()));
    g
}

/// RMS error at t_end of `rule` on `grid` (from t_start = grid[0] to t_end = grid[last]) from x at
/// t_start (drawn deterministically from the marginal), against the exact flow map.
fn grid_error(net: &dyn VelocityField, path: &dyn Interpolant, rule: StepRule, grid: &[f64]) -> f64 {
    let data = data();
    let b = 64;
    let (t_start, t_end) = (grid[0], grid[grid.len() - 1]);
    let t = Tensor::full([b], t_start, (Kind::Double, Device::Cpu));
    let x = data.marginal_mean(path, &t, &inputs(b)) + inputs(b) * data.marginal_std(path, &t).double_value(&[0]);
    let exact = data.flow_map(path, &x, &t, &t.full_like(t_start - t_end));
    rms(&(sample(net, path, x, &no_class(b), grid, rule) - exact))
}

/// Error ratios per halving of the step (n → 2n) for n in `ns`, on `make_grid(n)`.
fn ratios(net: &dyn VelocityField, path: &dyn Interpolant, rule: StepRule, ns: &[usize], make_grid: &dyn Fn(usize) -> Vec<f64>) -> (Vec<f64>, Vec<f64>) {
    let errs: Vec<f64> = ns.iter().map(|&n| grid_error(net, path, rule, &make_grid(n))).collect();
    let r = errs.windows(2).map(|w| w[0] / w[1]).collect();
    (errs, r)
}

fn assert_band(r: &[f64], lo: f64, hi: f64, what: &str) {
    for &x in r {
        assert!((lo..=hi).contains(&x), "{what}: ratio {x} outside [{lo}, {hi}] (all: {r:?})");
    }
}

/// Orders on a path, grids uniform in log-SNR between two interior times (finite λ, so the
/// endpoint rules of the solvers are not involved; the exact flow map is the reference).
///
/// DPM-Solver++(3M) warms up with a first-order step, whose local error is O(Δλ²): on a plain
/// λ-uniform grid that term takes over at fine grids (measured on the linear path [0.9, 0.1]:
/// ratios 13.9, 18.5, 10.8, 1.6, 3.1 for n = 16 … 512, heading to 4), so its order is measured
/// with the first step cut to Δλ² ([`short_first_step_grid`]); 2M and UniPC on the plain grid.
fn check_orders(net: &dyn VelocityField, path: &dyn Interpolant, reads: Reads, (t0, t1): (f64, f64), ns: &[usize], what: &str) {
    let plain = |n: usize| interior_grid(path, t0, t1, n);
    let short = |n: usize| short_first_step_grid(path, t0, t1, n);
    let (e, r) = ratios(net, path, StepRule::Euler, ns, &plain);
    eprintln!("{what} euler: errors {e:?} ratios {r:?}");
    if reads == Reads::Velocity {
        assert_band(&r, 1.8, 2.2, "euler");
    }
    let (e, r) = ratios(net, path, StepRule::DpmSolverPp2M { reads }, ns, &plain);
    eprintln!("{what} dpm_solver_pp_2m: errors {e:?} ratios {r:?}");
    assert_band(&r, 3.2, 5.0, &format!("{what} 2M"));
    let (e, r) = ratios(net, path, StepRule::DpmSolverPp3M { reads }, ns, &short);
    eprintln!("{what} dpm_solver_pp_3m (short first step): errors {e:?} ratios {r:?}");
    assert_band(&r, 6.0, 10.0, &format!("{what} 3M"));
    let (e, r) = ratios(net, path, StepRule::UniPc { reads }, ns, &plain);
    eprintln!("{what} unipc: errors {e:?} ratios {r:?}");
    assert_band(&r, 6.0, 10.0, &format!("{what} UniPC"));
}

#[test]
fn velocity_models_on_the_linear_path_reach_the_solvers_orders() {
    tch::set_num_threads(1);
    let data = data();
    let path = Linear::new();
    let net = ExactVelocity { data: &data, path: &path };
    check_orders(&net, &path, Reads::Velocity, (0.9, 0.1), &[32, 64, 128, 256], "linear/velocity");
}

#[test]
fn eps_models_on_a_vp_path_reach_the_solvers_orders() {
    tch::set_num_threads(1);
    let data = data();
    let path = VpLinearBeta { steps: 1000.0, beta_start: 1e-4, beta_end: 0.02 };
    let net = ExactEps { data: &data, path: &path };
    check_orders(&net, &path, Reads::Eps, (0.8, 0.05), &[64, 128, 256, 512], "vp/eps");
}

/// Records every (t, h) the network is called with and whether its input was finite.
/// One call: t, h, whether x_t was finite.
type Call = (Vec<f64>, Vec<f64>, bool);

struct Recorder<'a>(RefCell<Vec<Call>>, &'a dyn VelocityField);

impl VelocityField for Recorder<'_> {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        let finite = x_t.isfinite().all().int64_value(&[]) == 1;
        self.0.borrow_mut().push((Vec::try_from(t).unwrap(), Vec::try_from(h).unwrap(), finite));
        self.1.forward(x_t, t, h, class)
    }
    fn null_class(&self) -> i64 {
        0
    }
}

/// Every solver on full grids from noise (t = 1, alpha = 0 on the linear path: λ = −∞) to data
/// (t = 0, sigma = 0: λ = +∞): one call per step at the grid times but the last, h = 0, times in
/// [0, 1], finite inputs and outputs; NFE counted = steps = calls; and the samples approach the
/// exact ones as the grid is refined.
#[test]
fn full_grids_cost_one_nfe_per_step_and_stay_finite() {
    tch::set_num_threads(1);
    let data = data();
    let path = Linear::new();
    let exact_net = ExactVelocity { data: &data, path: &path };
    let b = 16;
    let eps = inputs(b);
    let exact = &eps * S + &data.mu;
    for rule in multistep_rules(Reads::Velocity) {
        for kind in [GridKind::Uniform, GridKind::Logsnr(Default::default()), GridKind::Edm(EdmGrid { rho: 7.0, sigma_min: 0.002, sigma_max: 80.0 })] {
            let mut errs = vec![];
            for steps in [1, 2, 3, 5, 10, 40, 160] {
                let grid = kind.times(&path, steps);
                assert_eq!((grid.len(), grid[0], grid[steps]), (steps + 1, 1.0, 0.0), "{kind:?} {steps}: {grid:?}");
                let rec = Recorder(RefCell::new(vec![]), &exact_net);
                let counter = NfeCounter::new(&rec);
                let x = sample(&counter, &path, eps.copy(), &no_class(b), &grid, rule);
                assert_eq!((counter.calls(), counter.nfe(b)), (steps as u64, steps as f64), "{rule:?} {kind:?} {steps}");
                let calls = rec.0.into_inner();
                let times: Vec<f64> = calls.iter().map(|(t, _, _)| t[0]).collect();
                assert_eq!(times, grid[..steps].to_vec(), "{rule:?} {kind:?}");
                assert!(calls.iter().all(|(t, h, finite)| *finite && t.iter().all(|v| (0.0..=1.0).contains(v)) && h.iter().all(|&v| v == 0.0)));
                assert_eq!(x.isfinite().all().int64_value(&[]), 1, "{rule:?} {kind:?} {steps}");
                errs.push(rms(&(x - &exact)));
            }
            eprintln!("{rule:?} {}: errors at 1, 2, 3, 5, 10, 40, 160 steps {errs:?}", kind.name());
            // One step is DDIM to x̂(x_1) = E[x] on every rule. Near t = 1 (λ = −∞) and at the
            // denoise-to-zero step the error is not monotone at a few steps (2M on the uniform
            // grid: 0.0036 at 10 steps, 0.0062 at 20), but 160 steps are close to exact.
            assert!(errs[6] < 2e-3 && errs[6] < errs[5] && errs[6] < 0.01 * errs[0], "{rule:?} {kind:?}: {errs:?}");
        }
    }
}

/// An eps model on the discrete DDPM path (alpha(1) > 0): the solvers from t = 1 to 0 match the
/// exact flow map from 1 to 0 and improve on DDIM.
#[test]
fn eps_models_on_the_ddpm_path_sample_the_data() {
    tch::set_num_threads(1);
    let data = data();
    let path = DdpmSchedule::default();
    let net = ExactEps { data: &data, path: &path };
    let ddim = grid_error(&net, &path, StepRule::Ddim, &uniform_grid(20));
    for rule in multistep_rules(Reads::Eps) {
        let err = grid_error(&net, &path, rule, &uniform_grid(20));
        eprintln!("ddpm {rule:?} 20 steps: {err} (ddim {ddim})");
        assert!(err.is_finite() && err < 0.5 * ddim, "{rule:?}: {err} vs ddim {ddim}");
    }
}

#[test]
fn grids_follow_their_noise_levels() {
    let path = Linear::new();
    // Log-SNR: levels s = t/(1 − t) log-uniform from 80 to 0.002; t_0 is pinned at 1.
    let g = logsnr_grid(&path, 5, 0.002, 80.0);
    let levels: Vec<f64> = g[1..5].iter().map(|&t| noise_level(&path, t)).collect();
    for (i, s) in levels.iter().enumerate() {
        let want = (80f64.ln() + (0.002f64.ln() - 80f64.ln()) * (i + 1) as f64 / 4.0).exp();
        assert!((s / want - 1.0).abs() < 1e-9, "logsnr level {i}: {s} vs {want}");
    }
    // EDM, rho = 7: s_i^(1/7) uniform; the last level is sigma_min.
    let g = edm_grid(&path, 4, 7.0, 0.002, 80.0);
    let a = 80f64.powf(1.0 / 7.0);
    let c = 0.002f64.powf(1.0 / 7.0);
    for i in 1..4 {
        let want = (a + (c - a) * i as f64 / 3.0).powf(7.0);
        assert!((noise_level(&path, g[i]) / want - 1.0).abs() < 1e-9, "edm level {i}");
    }
    assert_eq!((g[0], g[4]), (1.0, 0.0));
    // On the DDPM path s(1) ≈ 157 > 80; on VP cosine with s(1) small, the top level is s(1): t_0 = 1
    // and the second time is below it.
    let ddpm = DdpmSchedule::default();
    assert!(noise_level(&ddpm, 1.0) > 80.0);
    assert!((time_at_level(&ddpm, noise_level(&ddpm, 0.5)) - 0.5).abs() < 1e-9);
    assert_eq!(uniform_grid(4), GridKind::Uniform.times(&path, 4));
}
