//! Time samplers: ranges, proportions, grid membership, curricula, reproducibility under a seed.
use flowmap_core::time::{DoublingSchedule, FixedPoints, KarrasSpacing, ProgressiveSchedule};
use flowmap_core::{ConsistencyCurriculum, ConsistencyGrid, CtSchedule, DdpmSteps, DiscreteUniform, DyadicSteps, GridSpacing, LogitNormal, MeanFlowPairs, NoParams, PairSampler, TimeSampler, Uniform};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Tests in one binary run on parallel threads and share libtorch's global generator.
static RNG: Mutex<()> = Mutex::new(());

const CPU: Device = Device::Cpu;

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

#[test]
fn continuous_samplers_ranges_and_moments() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(1);
    let n = 200_000;
    let u = Uniform.sample(n, CPU);
    assert_eq!(u.size(), [n]);
    assert_eq!(u.kind(), Kind::Float);
    let v = f64s(&u);
    assert!(v.iter().all(|&t| (0.0..1.0).contains(&t)));
    let (m, s) = mean_std(&v);
    // 5 standard errors: sd of U[0,1] is 1/√12.
    let se = (1.0f64 / 12.0).sqrt() / (n as f64).sqrt();
    assert!((m - 0.5).abs() < 5.0 * se, "uniform mean {m}");
    assert!((s - (1.0f64 / 12.0).sqrt()).abs() < 0.003, "uniform std {s}");

    let ln = LogitNormal { mean: -0.4, std: 1.0 }.sample(n, CPU);
    let v = f64s(&ln);
    assert!(v.iter().all(|&t| t > 0.0 && t < 1.0));
    let logits: Vec<f64> = v.iter().map(|t| (t / (1.0 - t)).ln()).collect();
    let (m, s) = mean_std(&logits);
    let se = 1.0 / (n as f64).sqrt();
    assert!((m + 0.4).abs() < 5.0 * se, "logit mean {m}");
    assert!((s - 1.0).abs() < 5.0 * se * std::f64::consts::FRAC_1_SQRT_2 + 1e-4, "logit std {s}");
}

#[test]
fn discrete_samplers_lie_on_their_grids() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(2);
    let n = 50_000;
    let t = f64s(&DiscreteUniform { bins: 128 }.sample(n, CPU));
    let mut hit = vec![0usize; 129];
    for &ti in &t {
        let j = ti * 128.0;
        assert_eq!(j, j.round(), "t = {ti} is not on the 1/128 grid");
        assert!((1.0..=128.0).contains(&j), "t = {ti} outside {{1/128, …, 1}}");
        hit[j as usize] += 1;
    }
    assert!(hit[1..].iter().all(|&c| c > 0), "every bin is drawn");

    let t = f64s(&DdpmSteps { steps: 1000 }.sample(n, CPU));
    for &ti in &t {
        let m = (ti * 1000.0).round();
        assert!((ti * 1000.0 - m).abs() < 1e-3, "t = {ti} is not (n + 1)/1000");
        assert!((1.0..=1000.0).contains(&m));
    }
    let (m, _) = mean_std(&t);
    // Mean of (n + 1)/1000 for n ~ U{0..999} is 0.5005; sd ≈ 0.2887.
    assert!((m - 0.5005).abs() < 5.0 * 0.2887 / (n as f64).sqrt(), "ddpm mean {m}");
}

#[test]
fn mean_flow_pairs_equal_fraction() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    for (n, frac, equal) in [(1000i64, 0.75, 750usize), (256, 0.75, 192), (10, 0.0, 0), (10, 1.0, 10), (30, 0.1, 3)] {
        let s = MeanFlowPairs { times: Box::new(LogitNormal { mean: -0.4, std: 1.0 }), equal_fraction: frac };
        assert_eq!(s.equal_rows(n) as usize, equal);
        let p = s.sample(n, CPU);
        let (t, r, h) = (f64s(&p.t), f64s(&p.r), f64s(&p.h()));
        for i in 0..n as usize {
            assert!(0.0 < r[i] && r[i] <= t[i] && t[i] < 1.0);
            assert_eq!(h[i], (t[i] as f32 - r[i] as f32) as f64);
            if i < equal {
                assert_eq!(r[i], t[i], "row {i} should have r = t");
            } else {
                assert!(r[i] < t[i], "row {i} should have r < t");
            }
        }
    }
    // t = max and r = min of two logit-normal draws: E[t] > E[single draw] > E[r].
    let s = MeanFlowPairs { times: Box::new(Uniform), equal_fraction: 0.0 };
    let p = s.sample(100_000, CPU);
    let (mt, _) = mean_std(&f64s(&p.t));
    let (mr, _) = mean_std(&f64s(&p.r));
    // For U[0,1]: E[max] = 2/3, E[min] = 1/3; sd ≈ 0.236, 5 SE ≈ 0.004.
    assert!((mt - 2.0 / 3.0).abs() < 0.004 && (mr - 1.0 / 3.0).abs() < 0.004, "E[t] = {mt}, E[r] = {mr}");
}

#[test]
fn dyadic_steps_layout_and_grid_membership() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(4);
    let sampler = DyadicSteps { max_level: 6 };
    // B_b = 32 (B = 256, bootstrap 1/8): 4 rows per level 6, 5, …, 0, then 4 extra rows at level 0.
    let levels: Vec<i64> = Vec::try_from(sampler.levels(32, CPU)).unwrap();
    let mut expected: Vec<i64> = (0..7).rev().flat_map(|k| [k; 4]).collect();
    expected.extend([0; 4]);
    assert_eq!(levels, expected);
    let n = 7 * 2000;
    let p = sampler.sample(n, CPU);
    let levels: Vec<i64> = Vec::try_from(sampler.levels(n, CPU)).unwrap();
    let (t, r, h) = (f64s(&p.t), f64s(&p.r), f64s(&p.h()));
    let mut seen = vec![vec![false; 65]; 7];
    for i in 0..n as usize {
        let k = levels[i];
        let sections = (1i64 << k) as f64;
        assert_eq!(h[i], 1.0 / sections, "h = 2^-k exactly");
        let j = t[i] * sections;
        assert_eq!(j, j.round(), "t on the level-{k} grid");
        assert!(1.0 <= j && j <= sections, "t = {} outside {{h, …, 1}}", t[i]);
        assert!(r[i] >= 0.0);
        assert_eq!(r[i] * sections, j - 1.0, "r one step of h below t");
        seen[k as usize][j as usize] = true;
    }
    for k in 0..7 {
        assert!((1..=(1 << k)).all(|j| seen[k][j]), "every t on level {k} is drawn");
    }
}

#[test]
#[should_panic(expected = "issue #11")]
fn dyadic_steps_reject_too_few_rows() {
    single_thread();
    let _ = DyadicSteps { max_level: 6 }.levels(6, CPU);
}

#[test]
fn consistency_grids_and_curricula() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let grid = ConsistencyGrid { points: 9, spacing: GridSpacing::Uniform(NoParams {}) };
    let p = grid.sample(5000, CPU);
    let (t, r) = (f64s(&p.t), f64s(&p.r));
    for i in 0..5000 {
        let j = t[i] * 8.0;
        assert_eq!(j, j.round());
        assert!((1.0..=8.0).contains(&j));
        assert_eq!(r[i] * 8.0, j - 1.0);
    }
    // Karras spacing: sigma from 0.002 to 80, t = sigma/(1 + sigma); pairs are adjacent points.
    let karras = GridSpacing::Karras(KarrasSpacing::default());
    let times = karras.times(18);
    assert!((times[0] - 0.002 / 1.002).abs() < 1e-15 && (times[17] - 80.0 / 81.0).abs() < 1e-15);
    assert!(times.windows(2).all(|w| w[0] < w[1]));
    let p = ConsistencyGrid { points: 18, spacing: karras }.sample(2000, CPU);
    for (ti, ri) in f64s(&p.t).into_iter().zip(f64s(&p.r)) {
        let k = times.iter().position(|&g| (g as f32 as f64 - ri).abs() < 1e-9).expect("r on the grid");
        assert!((times[k + 1] as f32 as f64 - ti).abs() < 1e-9, "t is the next grid point");
    }

    // Shortcut code: 7 doubling stages over 700 steps.
    let doubling = CtSchedule::Doubling(DoublingSchedule { stages: 7, total_steps: 700 });
    let points: Vec<i64> = [0u64, 99, 100, 250, 599, 600, 699, 5000].iter().map(|&s| doubling.points(s)).collect();
    assert_eq!(points, [2, 2, 3, 5, 33, 65, 65, 65]);
    // OpenAI progressive: 2 → 200 scales, i.e. 2 points at step 0 and 201 at the end.
    let progressive = CtSchedule::Progressive(ProgressiveSchedule { start_scales: 2, end_scales: 200, total_steps: 800_000 });
    assert_eq!(progressive.points(0), 2);
    assert_eq!(progressive.points(800_000), 201);
    // Half way: ⌈√(0.5·(201² − 4) + 4) − 1⌉ + 1 = ⌈141.14⌉ + 1.
    assert_eq!(progressive.points(400_000), 143);
    // OpenAI: mu = exp(ln(0.95)·s₀/scales) with scales = points − 1: 0.95² at step 0, 0.95^(1/100) at the end.
    assert!((progressive.adaptive_ema(0, 0.95) - 0.9025).abs() < 1e-15);
    assert!((progressive.adaptive_ema(800_000, 0.95) - 0.95f64.powf(0.01)).abs() < 1e-15);
    assert_eq!(CtSchedule::Fixed(FixedPoints { points: 11 }).points(123), 11);

    let curriculum = ConsistencyCurriculum { spacing: GridSpacing::Uniform(NoParams {}), schedule: doubling };
    let p = curriculum.sample_at_step(1000, 250, CPU);
    let h = f64s(&p.h());
    assert!(h.iter().all(|&hi| hi == 0.25), "stage 2 uses 4 intervals");
    let p = curriculum.sample(10, CPU);
    assert!(f64s(&p.h()).iter().all(|&hi| hi == 1.0 / 64.0), "without a step: the finest grid");
}

#[test]
fn draws_are_reproducible_under_a_seed() {
    single_thread();
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let draw = || {
        let mut out = vec![Uniform.sample(64, CPU), LogitNormal { mean: 0.0, std: 1.0 }.sample(64, CPU)];
        out.push(DiscreteUniform { bins: 128 }.sample(64, CPU));
        out.push(DdpmSteps { steps: 1000 }.sample(64, CPU));
        for p in [
            MeanFlowPairs { times: Box::new(LogitNormal { mean: -0.4, std: 1.0 }), equal_fraction: 0.5 }.sample(64, CPU),
            DyadicSteps { max_level: 6 }.sample(64, CPU),
            ConsistencyGrid { points: 17, spacing: GridSpacing::Uniform(NoParams {}) }.sample(64, CPU),
        ] {
            out.push(p.t);
            out.push(p.r);
        }
        out
    };
    tch::manual_seed(42);
    let a = draw();
    tch::manual_seed(42);
    let b = draw();
    tch::manual_seed(43);
    let c = draw();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.equal(y), "draw {i} differs under the same seed");
    }
    assert!(!a[0].equal(&c[0]) && !a[1].equal(&c[1]), "a different seed gives different draws");
}

/// One intra-op thread: the test threads already use both cores, and OpenMP spinning on an
/// oversubscribed machine is many times slower than running single-threaded.
fn single_thread() {
    tch::set_num_threads(1);
}
