//! Closed forms on Gaussian data x ~ N(mu, s²·I) with the linear path: the exact average velocity
//! u(x_t, t, h) plugged in as the "network". Flow matching and MeanFlow keep an irreducible
//! conditional variance (computed here in closed form and matched within Monte-Carlo error);
//! Shortcut's self-consistency residual, progressive distillation with an exact teacher and every
//! loss on a point mass (s = 0) vanish.
use flowmap_core::{per_sample, DdpmSchedule, Interpolant, PairSamplerConfig, VelocityField};
use flowmap_objectives::*;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

// Forward-AD levels and the global generator are process-wide: these tests must not overlap
// (the one_pass vs graph_free comparison reseeds and expects identical draws).
static LEVEL: Mutex<()> = Mutex::new(());
fn lock() -> std::sync::MutexGuard<'static, ()> {
    LEVEL.lock().unwrap_or_else(|e| e.into_inner())
}

const D: i64 = 8;
const MU: f64 = 0.5;
const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

/// sigma_t of the marginal: √((1 − t)²s² + t²).
fn sigma_t(t: &Tensor, s: f64) -> Tensor {
    ((-t + 1.0).square() * (s * s) + t.square()).sqrt()
}

/// The exact average velocity over [t − h, t] of the Gaussian's probability-flow ODE, smooth in h:
/// x_r = mu_r + (σ_r/σ_t)(x_t − mu_t) gives u = −mu + g/σ_t·(x_t − (1 − t)·mu) with
/// g = (σ_t − σ_r)/h = [(t + r) − s²(2 − t − r)]/(σ_t + σ_r). At h = 0, u = v = dx_t/dt.
fn exact_u(s: f64) -> impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Tensor {
    exact_u_mean(s, MU)
}

/// [`exact_u`] for data N(mu, s²·I).
fn exact_u_mean(s: f64, mu: f64) -> impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Tensor {
    move |x_t: &Tensor, t: &Tensor, h: &Tensor, _class: &Tensor| {
        let r = t - h;
        let (st, sr) = (sigma_t(t, s), sigma_t(&r, s));
        let g = ((t + &r) - (-(t + &r) + 2.0) * (s * s)) / (&st + &sr);
        (x_t - per_sample(&(-t + 1.0), x_t) * mu) * per_sample(&(g / st), x_t) - mu
    }
}

fn data(n: i64, s: f64) -> Batch {
    let x = Tensor::randn([n, D], F64) * s + MU;
    Batch::new(x, Tensor::zeros([n], (Kind::Int64, Device::Cpu)))
}

fn run(objective: &dyn Objective, net: &dyn VelocityField, batch: &Batch) -> Loss {
    objective.loss(Nets { online: net, ema: net, teacher: Some(net) }, batch, 0)
}

fn metric(loss: &Loss, name: &str) -> f64 {
    loss.metrics.iter().find(|(k, _)| *k == name).unwrap_or_else(|| panic!("no metric {name}")).1.double_value(&[])
}

/// E_t[s²/σ_t²] for t ~ U[0, 1] by the midpoint rule: the per-element conditional variance
/// Var(ε − x | x_t) = s²/σ_t² (derived: s²(1 − t + t)²/σ_t²).
fn fm_variance_uniform(s: f64) -> f64 {
    let n = 200_000;
    (0..n).map(|i| (i as f64 + 0.5) / n as f64).map(|t| s * s / ((1.0 - t).powi(2) * s * s + t * t)).sum::<f64>() / n as f64
}

fn assert_close(measured: f64, expected: f64, rel: f64, what: &str) {
    println!("{what}: measured {measured:.5}, closed form {expected:.5}, rel. diff {:.2e}", (measured - expected).abs() / expected.abs().max(1e-12));
    assert!((measured - expected).abs() <= rel * expected.abs(), "{what}: measured {measured}, expected {expected} (rel tol {rel})");
}

#[test]
fn flow_matching_loss_equals_the_conditional_variance() {
    let _g = lock();
    tch::manual_seed(1);
    let s = 1.0;
    let net = (exact_u(s), 0);
    let fm = FlowMatchingConfig::default().build().unwrap();
    let loss = run(&fm, &net, &data(16_384, s)).value.double_value(&[]);
    let expected = fm_variance_uniform(s); // π/2 for s = 1
    assert!((expected - std::f64::consts::FRAC_PI_2).abs() < 1e-6);
    assert_close(loss, expected, 0.03, "FM loss with the exact velocity (s = 1)");
    // A point mass has no conditional variance.
    let point = (exact_u(0.0), 0);
    let loss0 = run(&fm, &point, &data(1024, 0.0)).value.double_value(&[]);
    println!("FM loss on a point mass: {loss0:.3e}");
    assert!(loss0 < 1e-20);
}

/// E over MeanFlow pairs of D·f(t, r) for the sampler's (t, r) distribution, by sampling it.
fn over_pairs(f: impl Fn(&Tensor, &Tensor) -> Tensor) -> f64 {
    let pairs = PairSamplerConfig::MeanFlow(Default::default()).build().sample(2_000_000, Device::Cpu);
    let (t, r) = (pair_kind(&pairs.t), pair_kind(&pairs.r));
    f(&t, &r).mean(Kind::Double).double_value(&[]) * D as f64
}
fn pair_kind(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Double)
}

#[test]
fn mean_flow_residuals_are_the_conditional_variance() {
    let _g = lock();
    let s = 1.0;
    let net = (exact_u(s), 0);
    let batch_of = |seed| {
        tch::manual_seed(seed);
        data(16_384, s)
    };
    // Official objective: residual (I − h∂ₓu)(v − v_marg) = (σ_r/σ_t)(v − v_marg), so the per-sample
    // sum has mean D·E[(σ_r/σ_t)²·s²/σ_t²] [derived].
    let official = MeanFlowConfig { weighting: AdaptiveWeighting::none(), ..Default::default() }.build().unwrap();
    let batch = batch_of(2);
    let loss = run(&official, &net, &batch).value.double_value(&[]);
    let expected = over_pairs(|t, r| (sigma_t(r, s) / sigma_t(t, s)).square() * (s * s) / sigma_t(t, s).square());
    assert_close(loss, expected, 0.03, "MeanFlow official (conditional tangent, sg) with the exact u");

    // The graph-free JVP gives the same loss from the same draws.
    let graph_free = MeanFlowConfig { weighting: AdaptiveWeighting::none(), jvp_mode: JvpMode::GraphFree, ..Default::default() }.build().unwrap();
    tch::manual_seed(7);
    let a = run(&official, &net, &batch).value.double_value(&[]);
    tch::manual_seed(7);
    let b = run(&graph_free, &net, &batch).value.double_value(&[]);
    println!("one_pass {a:.12} vs graph_free {b:.12}");
    assert!((a - b).abs() <= 1e-12 * a.abs());
    // The finite-difference JVP (float32, default step) gives the same loss up to its truncation.
    let fd = MeanFlowConfig { weighting: AdaptiveWeighting::none(), jvp_mode: JvpMode::FiniteDifference, ..Default::default() }.build().unwrap();
    tch::manual_seed(7);
    let c = run(&fd, &net, &batch).value.double_value(&[]);
    println!("one_pass {a:.12} vs finite_difference {c:.12}");
    assert!((a - c).abs() <= 1e-4 * a.abs(), "{a} vs {c}");

    // Model tangent (the seed's first and second objectives): with the exact u₀ = v_marg the
    // residual is v_marg − v, so the loss is D·E_t[s²/σ_t²] over the sampler's t.
    let expected_model = over_pairs(|t, _| (s * s) / sigma_t(t, s).square());
    for (name, cfg) in [("first (no sg)", MeanFlowConfig::model_tangent_full()), ("second (sg)", MeanFlowConfig::model_tangent_stop_gradient())] {
        let objective = MeanFlowConfig { weighting: AdaptiveWeighting::none(), ..cfg }.build().unwrap();
        let loss = run(&objective, &net, &batch).value.double_value(&[]);
        assert_close(loss, expected_model, 0.03, &format!("MeanFlow {name} objective with the exact u"));
    }

    // Point mass: every residual vanishes, for all three objectives and with adaptive weighting on.
    let point = (exact_u(0.0), 0);
    tch::manual_seed(3);
    let batch0 = data(2048, 0.0);
    for cfg in [MeanFlowConfig::default(), MeanFlowConfig::model_tangent_full(), MeanFlowConfig::model_tangent_stop_gradient()] {
        let l = run(&cfg.build().unwrap(), &point, &batch0);
        let raw = metric(&l, "mf_loss_unweighted");
        println!("MeanFlow {:?}/sg={} on a point mass: {raw:.3e}", cfg.tangent, cfg.stop_gradient);
        assert!(raw < 1e-18, "{raw}");
    }
}

#[test]
fn shortcut_self_consistency_residual_vanishes() {
    let _g = lock();
    tch::manual_seed(4);
    let s = 1.0;
    let net = (exact_u(s), 0);
    for cfg in [ShortcutConfig::paper(), ShortcutConfig { clip: f64::INFINITY, bootstrap_cfg_scale: 1.0, ..ShortcutConfig::official_code() }] {
        let shortcut = cfg.build().unwrap();
        let l = run(&shortcut, &net, &data(8192, s));
        let boot = metric(&l, "bootstrap_loss");
        println!("Shortcut ({} bootstrap rows of 8192) self-consistency residual with the exact u: {boot:.3e}", cfg.bootstrap_rows(8192));
        assert!(boot < 1e-20, "{boot}");
    }
    // The flow rows keep FM's conditional variance.
    let shortcut = ShortcutConfig::paper().build().unwrap();
    let flow = metric(&run(&shortcut, &net, &data(32_768, s)), "flow_loss");
    assert_close(flow, fm_variance_uniform(s), 0.03, "Shortcut flow rows with the exact velocity");
}

#[test]
fn progressive_distillation_with_an_exact_teacher_has_zero_loss() {
    let _g = lock();
    tch::manual_seed(5);
    let net = (exact_u(1.0), 0);
    let pd = ProgressiveConfig::new(10).build().unwrap();
    for step in [0, 15, 69] {
        let l = pd.loss(Nets { online: &net, ema: &net, teacher: Some(&net) }, &data(1024, 1.0), step);
        let v = l.value.double_value(&[]);
        println!("PD at step {step} (level {}): {v:.3e}", pd.level(step));
        assert!(v < 1e-20);
    }
}

#[test]
fn ddpm_loss_with_the_exact_noise_prediction_is_the_posterior_variance() {
    let _g = lock();
    tch::manual_seed(6);
    let (s, schedule) = (1.0, DdpmSchedule::default());
    // E[ε | x_n] = σ(x_n − α·mu)/(α²s² + σ²); residual variance α²s²/(α²s² + σ²) per element.
    let eps_hat = move |x_t: &Tensor, t: &Tensor, _h: &Tensor, _c: &Tensor| {
        let (a, sg) = (schedule.alpha(t), schedule.sigma(t));
        let denom = a.square() * (s * s) + sg.square();
        (x_t - per_sample(&a, x_t) * MU) * per_sample(&(sg / denom), x_t)
    };
    let net = (eps_hat, 0);
    let ddpm = DdpmObjectiveConfig::default().build().unwrap();
    let loss = run(&ddpm, &net, &data(32_768, s)).value.double_value(&[]);
    let ab = schedule.alphas_cumprod(Device::Cpu);
    let expected = (&ab * (s * s) / (&ab * (s * s) - &ab + 1.0)).mean(Kind::Double).double_value(&[]);
    assert_close(loss, expected, 0.03, "DDPM loss with the exact noise prediction");
}

/// σ'_t = dσ_t/dt = (t − s²(1 − t))/σ_t, the slope g at h = 0 of [`exact_u`].
fn g0(t: &Tensor, s: f64) -> Tensor {
    (t - (-t + 1.0) * (s * s)) / sigma_t(t, s)
}
/// The slope g(t, r) of [`exact_u`]: u = −mu + g/σ_t·(x_t − (1 − t)·mu).
fn g_of(t: &Tensor, r: &Tensor, s: f64) -> Tensor {
    ((t + r) - (-(t + r) + 2.0) * (s * s)) / (sigma_t(t, s) + sigma_t(r, s))
}

/// The exact average velocity as a network that takes a guidance input (and ignores it: the
/// data are unconditional, so v̂(ω | y) = v̂(1 | ∅) and the guided target is v for every ω).
struct ExactGuided(f64);
impl VelocityField for ExactGuided {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        exact_u(self.0)(x_t, t, h, class)
    }
    fn null_class(&self) -> i64 {
        0
    }
    fn takes_guidance(&self) -> bool {
        true
    }
    fn forward_guidance(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, g: &flowmap_core::GuidanceInput) -> Option<Tensor> {
        assert!(g.scale.ge(1.0).all().int64_value(&[]) == 1, "ω >= 1");
        Some(self.forward(x_t, t, h, class))
    }
}

/// A guidance-conditioned field that is already at iMF's fixed point: with a = the exact
/// velocity of the class's data N(MU, s²) and b = any "unconditional" field (the exact one of
/// N(−1, s²)), F(ω, [t_min, t_max] | y) = ω'·a + (1 − ω')·b, ω' = ω for t in the interval and 1
/// outside; F(· | ∅) = b.
struct CfgFixedPoint(f64);
impl VelocityField for CfgFixedPoint {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        self.forward_guidance(x_t, t, h, class, &flowmap_core::GuidanceInput::constant(t, 1.0, 0.0, 1.0)).unwrap()
    }
    fn null_class(&self) -> i64 {
        1
    }
    fn takes_guidance(&self) -> bool {
        true
    }
    fn forward_guidance(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, g: &flowmap_core::GuidanceInput) -> Option<Tensor> {
        let (a, b) = (exact_u_mean(self.0, MU)(x_t, t, h, class), exact_u_mean(self.0, -1.0)(x_t, t, h, class));
        let inside = t.ge_tensor(&g.t_min).logical_and(&t.le_tensor(&g.t_max));
        let w = g.scale.where_self(&inside, &t.ones_like()).where_self(&class.ne(1), &t.ones_like());
        let base = a.where_self(&per_sample(&class.ne(1), x_t), &b);
        Some(per_sample(&w, x_t) * base + per_sample(&(-w + 1.0), x_t) * b)
    }
}

#[test]
fn improved_mean_flow_v_loss_is_the_conditional_variance() {
    let _g = lock();
    let s = 1.0;
    let net = (exact_u(s), 0);
    tch::manual_seed(21);
    let batch = data(16_384, s);
    // With the exact u and the model's exact tangent v̂ = v_marg, the compound V = u + h·du/dt is
    // v_marg exactly (the identity of methods.md §1.2: zero self-consistency residual), so both
    // terms are ‖v_marg − v‖², mean D·E_t[s²/σ_t²] over the pairs' t [derived].
    let expected = over_pairs(|t, _| (s * s) / sigma_t(t, s).square());
    let unweighted = |cfg: ImprovedMeanFlowConfig| ImprovedMeanFlowConfig { weighting: AdaptiveWeighting::none(), ..cfg }.build().unwrap();
    let plain = unweighted(ImprovedMeanFlowConfig::default());
    tch::manual_seed(8);
    let l = run(&plain, &net, &batch);
    assert_close(metric(&l, "imf_loss_u_unweighted"), expected, 0.03, "iMF V-term with the exact u");
    assert_close(metric(&l, "imf_loss_v_unweighted"), expected, 0.03, "iMF v-term with the exact u");
    assert_close(l.value.double_value(&[]), 2.0 * expected, 0.03, "iMF total (unweighted) with the exact u");
    // The guided (official) setting on a network that takes the scale and interval: same values.
    let guided = unweighted(ImprovedMeanFlowConfig::official());
    tch::manual_seed(8);
    let lg = run(&guided, &ExactGuided(s), &batch);
    assert_close(metric(&lg, "imf_loss_u_unweighted"), expected, 0.03, "iMF guided V-term with the exact u");
    // The guided target itself: at the CFG fixed point v̂(ω) = ω·a + (1 − ω)·b the v-term's residual
    // is a − v on every row (inside or outside each row's interval), so its mean is the
    // conditional variance again, for every drawn ω and interval [derived]. (No label dropout:
    // dropped rows would compare b with v.)
    let fixed = unweighted(ImprovedMeanFlowConfig { label_dropout: 0.0, ..ImprovedMeanFlowConfig::official() });
    tch::manual_seed(8);
    let lf = run(&fixed, &CfgFixedPoint(s), &batch);
    assert_close(metric(&lf, "imf_loss_v_unweighted"), expected, 0.03, "iMF guided v-term at the CFG fixed point");

    // The three JVP modes give the same loss from the same draws (float64 data: the finite
    // difference agrees to ~1e-9 relative).
    let a = metric(&l, "imf_loss_u_unweighted");
    for mode in [JvpMode::GraphFree, JvpMode::FiniteDifference] {
        let other = unweighted(ImprovedMeanFlowConfig { jvp_mode: mode, ..Default::default() });
        tch::manual_seed(8);
        let b = metric(&run(&other, &net, &batch), "imf_loss_u_unweighted");
        println!("iMF one_pass {a:.12} vs {} {b:.12}", mode.name());
        assert!((a - b).abs() <= 1e-6 * a, "{} differs: {a} vs {b}", mode.name());
    }

    // Point mass: every residual vanishes, with the adaptive weighting on, guided or not.
    let point = (exact_u(0.0), 0);
    tch::manual_seed(9);
    let batch0 = data(2048, 0.0);
    for (name, cfg) in [("plain", ImprovedMeanFlowConfig::default()), ("guided", ImprovedMeanFlowConfig::official())] {
        let objective = cfg.build().unwrap();
        let l = if name == "guided" { run(&objective, &ExactGuided(0.0), &batch0) } else { run(&objective, &point, &batch0) };
        let (ru, rv) = (metric(&l, "imf_loss_u_unweighted"), metric(&l, "imf_loss_v_unweighted"));
        println!("iMF {name} on a point mass: V-term {ru:.3e}, v-term {rv:.3e}");
        assert!(ru < 1e-18 && rv < 1e-18, "{ru} {rv}");
    }
}

/// E of α-Flow's per-row, per-element residual with the exact u, over its (t, r) draws
/// (half the rows r = t from one logit-normal draw, half t = max, r = min of two) [derived]:
/// r = t rows: s²/σ_t²; other rows with δ = α·h, s' = t − δ:
///   α > 0: (α·σ_r/σ_s')²·[(g(t, s') − σ'_t)² + s²/σ_t²]  (the target's residual is
///          α·(σ_r/σ_s')·(u(x_t, t, δ) − v): it inherits the error of stepping with v, not u)
///   α = 0: (σ_r/σ_t)²·s²/σ_t²                                (MeanFlow's)
fn alpha_flow_expected(alpha: f64, s: f64) -> f64 {
    let n = 2_000_000;
    let ln = |n: i64| (Tensor::randn([n], F64) * 1.0 - 0.4).sigmoid();
    let t_fm = ln(n);
    let fm = (s * s / sigma_t(&t_fm, s).square()).mean(Kind::Double).double_value(&[]);
    let (a, b) = (ln(n), ln(n));
    let (t, r) = (a.maximum(&b), a.minimum(&b));
    let var = sigma_t(&t, s).square().reciprocal() * (s * s);
    let mf = if alpha == 0.0 {
        (sigma_t(&r, s) / sigma_t(&t, s)).square() * &var
    } else {
        let sp = &t - (&t - &r) * alpha;
        let ratio = sigma_t(&r, s) / sigma_t(&sp, s) * alpha;
        ratio.square() * ((g_of(&t, &sp, s) - g0(&t, s)).square() + &var)
    };
    0.5 * fm + 0.5 * mf.mean(Kind::Double).double_value(&[])
}

#[test]
fn alpha_flow_residuals_match_their_closed_forms_along_the_curriculum() {
    let _g = lock();
    let s = 1.0;
    let net = (exact_u(s), 0);
    let af = AlphaFlowConfig::default().build().unwrap();
    tch::manual_seed(31);
    let batch = data(32_768, s);
    // The sigmoid curriculum: α = 1 at the start, 1/2 at mid-training, 0 at the end.
    for (step, alpha) in [(0, 1.0), (200_000, 0.5), (400_000, 0.0)] {
        assert_eq!(af.cfg.alpha.at(step), alpha);
        tch::manual_seed(100 + step as i64);
        let expected = alpha_flow_expected(alpha, s);
        tch::manual_seed(32);
        let l = af.loss(Nets { online: &net, ema: &net, teacher: None }, &batch, step);
        assert_close(metric(&l, "af_loss_unweighted"), expected, 0.03, &format!("alpha-Flow at step {step} (α = {alpha}) with the exact u"));
    }
    // α = 0 (MeanFlow's target): the three JVP modes agree in float64.
    tch::manual_seed(33);
    let a = metric(&af.loss(Nets { online: &net, ema: &net, teacher: None }, &batch, 400_000), "af_loss_unweighted");
    for mode in [JvpMode::GraphFree, JvpMode::FiniteDifference] {
        let other = AlphaFlowConfig { jvp_mode: mode, ..Default::default() }.build().unwrap();
        tch::manual_seed(33);
        let b = metric(&other.loss(Nets { online: &net, ema: &net, teacher: None }, &batch, 400_000), "af_loss_unweighted");
        println!("alpha-Flow (α = 0) one_pass {a:.12} vs {} {b:.12}", mode.name());
        assert!((a - b).abs() <= 1e-6 * a, "{} differs: {a} vs {b}", mode.name());
    }
    // Point mass: zero at every α.
    let point = (exact_u(0.0), 0);
    tch::manual_seed(34);
    let batch0 = data(2048, 0.0);
    for step in [0, 150_000, 200_000, 250_000, 400_000] {
        let raw = metric(&af.loss(Nets { online: &point, ema: &point, teacher: None }, &batch0, step), "af_loss_unweighted");
        println!("alpha-Flow at step {step} (α = {:.4}) on a point mass: {raw:.3e}", af.cfg.alpha.at(step));
        assert!(raw < 1e-18, "{raw}");
    }
}

#[test]
fn split_mean_flow_splitting_residual_vanishes() {
    let _g = lock();
    let s = 1.0;
    let net = (exact_u(s), 0);
    tch::manual_seed(41);
    let batch = data(32_768, s);
    let split = SplitMeanFlowConfig::default().build().unwrap();
    let l = run(&split, &net, &batch);
    // The exact flow map satisfies the interval-splitting identity: zero residual on r < t rows.
    let consistency = metric(&l, "split_consistency_loss");
    println!("SplitMeanFlow splitting residual with the exact u: {consistency:.3e}");
    assert!(consistency < 1e-20, "{consistency}");
    // The r = t rows are flow matching: D·E[s²/σ_t²] over the pairs' t.
    let expected = over_pairs(|t, _| (s * s) / sigma_t(t, s).square());
    assert_close(metric(&l, "split_flow_loss"), expected, 0.03, "SplitMeanFlow r = t rows with the exact velocity");
}

/// sCM's per-element irreducible value at TrigFlow time τ for data N(mu, s²I) (no tangent
/// normalisation, r = 1, no weighting) [derived]: with V = cos²τ·s² + σ_d²·sin²τ the exact
/// consistency function is f = mu + (s/√V)(x_τ − cos τ·mu), so cos τ·df/dτ along the conditional
/// velocity is g = cos τ·(s/√V)·(dx/dτ − v(x_τ)), and Var(dx/dτ | x_τ) = s²σ_d²/V (the
/// determinant of the rotated independent pair (x, σ_d ε) over V). Hence E[g²] = cos²τ·s⁴σ_d²/V².
fn scm_irreducible(tau: f64, s: f64, sigma_d: f64) -> f64 {
    let v = tau.cos().powi(2) * s * s + sigma_d * sigma_d * tau.sin().powi(2);
    tau.cos().powi(2) * s.powi(4) * sigma_d * sigma_d / (v * v)
}

/// E over sCM's proposal τ = arctan(e^n/σ_d), n ~ N(p_mean, p_std²), by the midpoint rule on n.
fn over_scm_times(p_mean: f64, p_std: f64, sigma_d: f64, f: impl Fn(f64) -> f64) -> f64 {
    let (n, lo, hi) = (200_000, -10.0, 10.0);
    let dz = (hi - lo) / n as f64;
    (0..n)
        .map(|i| {
            let z = lo + (i as f64 + 0.5) * dz;
            let tau = ((p_mean + p_std * z).exp() / sigma_d).atan();
            f(tau) * (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt() * dz
        })
        .sum()
}

fn scm_gaussian(s: f64) -> flowmap_core::GaussianData {
    flowmap_core::GaussianData { mu: Tensor::full([D], MU, F64), s }
}

#[test]
fn scm_training_loss_with_the_exact_consistency_function_is_its_irreducible_value() {
    let _g = lock();
    let sigma_d = 0.5;
    let path = flowmap_core::TrigFlow { sigma_d };
    for s in [0.5, 1.0] {
        let data = scm_gaussian(s);
        let net = flowmap_core::ExactTrigFlowJump { data: &data, path: &path };
        let cfg = ScmConfig { tangent_norm: TangentNorm::None, prior_weighting: false, adaptive_weighting: false, tangent_warmup_steps: 0, ..Default::default() };
        let sct = cfg.build(false).unwrap();
        tch::manual_seed(21);
        let batch = Batch::new(data.sample(32_768), Tensor::zeros([32_768], (Kind::Int64, Device::Cpu)));
        tch::manual_seed(22);
        let one_pass = run(&sct, &net, &batch).value.double_value(&[]);
        let expected = over_scm_times(cfg.p_mean, cfg.p_std, sigma_d, |tau| scm_irreducible(tau, s, sigma_d));
        assert_close(one_pass, expected, 0.03, &format!("sCT loss with the exact consistency function (s = {s}, σ_d = {sigma_d})"));
        // With the default tangent normalisation the logged raw tangent (`scm_tangent_sq`, the
        // progress line's loss) is the same quantity from the same draws.
        let normalised = ScmConfig { tangent_norm: TangentNorm::L2, ..cfg.clone() }.build(false).unwrap();
        tch::manual_seed(22);
        let logged = metric(&run(&normalised, &net, &batch), "scm_tangent_sq");
        assert!((logged - one_pass).abs() <= 1e-12 * one_pass, "{logged} vs {one_pass}");
        // The three JVP modes give the same loss from the same draws (float64).
        for (mode, tol) in [(JvpMode::GraphFree, 1e-12), (JvpMode::FiniteDifference, 1e-6)] {
            let other = ScmConfig { jvp_mode: mode, ..cfg.clone() }.build(false).unwrap();
            tch::manual_seed(22);
            let v = run(&other, &net, &batch).value.double_value(&[]);
            println!("sCT one_pass {one_pass:.12} vs {} {v:.12}", mode.name());
            assert!((v - one_pass).abs() <= tol * one_pass, "{}: {v} vs {one_pass}", mode.name());
        }
    }
}

#[test]
fn scm_distillation_with_an_exact_teacher_has_zero_loss() {
    let _g = lock();
    let s = 1.0;
    let gaussian = scm_gaussian(s);
    let trig = flowmap_core::TrigFlow { sigma_d: 0.5 };
    let student = flowmap_core::ExactTrigFlowJump { data: &gaussian, path: &trig };
    // Teachers on other paths, predicting velocity (flow matching) or eps (DDPM), converted to
    // TrigFlow by equal signal-to-noise ratio: with the exact fields g = cos τ·df/dτ = 0.
    let linear = flowmap_core::Linear::new();
    let cosine = flowmap_core::VpCosine { offset: 0.008 };
    let ddpm = DdpmSchedule::default();
    let fm_teacher = flowmap_core::ExactVelocity { data: &gaussian, path: &linear };
    let cos_teacher = flowmap_core::ExactEps { data: &gaussian, path: &cosine };
    let ddpm_teacher = flowmap_core::ExactEps { data: &gaussian, path: &ddpm };
    let cases: [(&str, &dyn VelocityField, flowmap_core::InterpolantConfig, TeacherPrediction); 3] = [
        ("linear velocity", &fm_teacher, flowmap_core::InterpolantConfig::Linear(flowmap_core::NoParams {}), TeacherPrediction::Velocity),
        ("vp_cosine eps", &cos_teacher, flowmap_core::InterpolantConfig::VpCosine(Default::default()), TeacherPrediction::Eps),
        ("ddpm eps", &ddpm_teacher, flowmap_core::InterpolantConfig::DdpmLinearBeta(Default::default()), TeacherPrediction::Eps),
    ];
    for (name, teacher, path, prediction) in cases {
        tch::manual_seed(23);
        let batch = data(4096, s);
        // Default settings: tangent normalisation, prior weighting (the weighting is not initialised: u = 0).
        for norm in [TangentNorm::None, TangentNorm::L2] {
            let scd = ScmConfig { teacher_path: Some(path.clone()), teacher_prediction: Some(prediction), tangent_norm: norm, ..Default::default() }.build(true).unwrap();
            let l = scd.loss(Nets { online: &student, ema: &student, teacher: Some(teacher) }, &batch, 20_000);
            let raw = metric(&l, "scm_loss_unweighted");
            println!("sCD with the exact {name} teacher, tangent_norm {norm:?}: {raw:.3e}");
            assert!(raw < 1e-18, "{name}: {raw}");
        }
    }
}

#[test]
fn scm_exact_one_step_map_has_zero_self_consistency_residual() {
    let _g = lock();
    tch::manual_seed(24);
    let s = 1.0;
    let data = scm_gaussian(s);
    let path = flowmap_core::TrigFlow { sigma_d: 0.5 };
    let net = flowmap_core::ExactTrigFlowJump { data: &data, path: &path };
    let n = 2048;
    let x0 = data.sample(n);
    let eps = Tensor::randn([n, D], F64);
    let t = Tensor::rand([n], F64) * 0.98 + 0.01;
    let r = &t * Tensor::rand([n], F64);
    let x_t = path.interpolate(&x0, &eps, &t);
    let x_r = data.flow_map(&path, &x_t, &t, &(&t - &r)); // the probability-flow ODE from t to r
    let c = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
    // f(x, t) = alpha·x − sigma·F(x/σ_d, t, t): the trig_flow rule's jump to data.
    let f = |x: &Tensor, t: &Tensor| per_sample(&path.alpha(t), x) * x - per_sample(&path.sigma(t), x) * net.forward(&(x / 0.5), t, t, &c);
    let residual = (f(&x_t, &t) - f(&x_r, &r)).abs().max().double_value(&[]);
    println!("sCM exact one-step map: max |f(x_t, t) − f(x_r, r)| = {residual:.3e}");
    assert!(residual < 1e-12, "{residual}");
    // The map sends the TrigFlow prior σ_d·ε to the data law.
    let one = f(&(Tensor::randn([65_536, D], F64) * 0.5), &Tensor::ones([65_536], F64));
    let (m, v) = (one.mean(Kind::Double).double_value(&[]), one.var(true).double_value(&[]));
    assert!((m - MU).abs() < 0.01 && (v - s * s).abs() < 0.01, "mean {m}, var {v}");
}
