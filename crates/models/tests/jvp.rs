//! Forward-mode JVPs through the DiT (math attention path) against central finite differences.
mod common;

use common::{forward_ad_lock, inputs, randomise_zeros, tiny_config};
use flowmap_core::VelocityField;
use flowmap_models::{AttnScale, DitConfig, HEmbedding};
use tch::{nn, Device, Kind, Tensor};

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[])
}

/// J·v of F(x, t, h) for random (v_x, v_t, v_h) in float64 equals (F(p + εv) − F(p − εv)) / 2ε.
#[test]
fn dit_jvp_matches_central_differences_f64() {
    let _lock = forward_ad_lock();
    for attn_scale in [AttnScale::InvSqrtHeadDim, AttnScale::InvHeadDim] {
        tch::manual_seed(10);
        let cfg = DitConfig { attn_scale, ..tiny_config() };
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = cfg.init(vs.root()).unwrap();
        vs.double();
        randomise_zeros(&vs, 0.1);
        let (x, t, h, class) = inputs(&cfg, 2, Kind::Double);
        let (vx, vt, vh) = (x.randn_like(), t.randn_like(), h.randn_like());
        let f = |x: &Tensor, t: &Tensor, h: &Tensor| net.forward(x, t, h, &class);

        let (out, tangent) = flowmap_objectives::jvp(|p| Ok(f(&p[0], &p[1], &p[2])), &[x.shallow_clone(), t.shallow_clone(), h.shallow_clone()], &[vx.shallow_clone(), vt.shallow_clone(), vh.shallow_clone()]).unwrap();
        let plain = tch::no_grad(|| f(&x, &t, &h));
        assert!(out.equal(&plain) || rel_err(&out, &plain) < 1e-14, "primal differs: {}", rel_err(&out, &plain));

        let eps = 1e-6;
        let fd = tch::no_grad(|| (f(&(&x + &vx * eps), &(&t + &vt * eps), &(&h + &vh * eps)) - f(&(&x - &vx * eps), &(&t - &vt * eps), &(&h - &vh * eps))) / (2.0 * eps));
        let err = rel_err(&tangent, &fd);
        eprintln!("{attn_scale:?}: JVP rel error vs central differences = {err:.3e} (|J·v| = {:.3e})", fd.norm().double_value(&[]));
        assert!(fd.norm().double_value(&[]) > 1e-3, "tangent is trivially small");
        assert!(err < 1e-5, "{err}");

        // Each direction alone is non-trivial (t and h both reach the output).
        for (name, dx, dt, dh) in [("t", 0.0, 1.0, 0.0), ("h", 0.0, 0.0, 1.0)] {
            let (_, tan) = flowmap_objectives::jvp_graph_free(|p| Ok(f(&p[0], &p[1], &p[2])), &[x.shallow_clone(), t.shallow_clone(), h.shallow_clone()], &[&vx * dx, &vt * dt, &vh * dh]).unwrap();
            assert!(tan.norm().double_value(&[]) > 1e-4, "d/d{name} vanished");
        }
    }
}

/// `jvp_mode = "finite_difference"` against forward mode on the tiny DiT: in float64 the two JVPs
/// agree to 1e-6 relative (the bar; measured ~1e-9) and the primals are the same forward;
/// in float32 to 1e-3 (measured ~5e-5: rounding over the step). Graph-free agrees with one-pass.
#[test]
fn finite_difference_mode_matches_forward_mode_on_the_dit() {
    use flowmap_objectives::JvpMode;
    let _lock = forward_ad_lock();
    for (kind, tol) in [(Kind::Double, 1e-6), (Kind::Float, 1e-3)] {
        tch::manual_seed(13);
        let cfg = tiny_config();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = cfg.init(vs.root()).unwrap();
        if kind == Kind::Double {
            vs.double();
        }
        randomise_zeros(&vs, 0.1);
        let (x, t, h, class) = inputs(&cfg, 2, kind);
        let primals = [x.shallow_clone(), t.shallow_clone(), h.shallow_clone()];
        let tangents = [x.randn_like(), t.ones_like(), t.ones_like()];
        let f = |p: &[Tensor]| Ok(net.forward(&p[0], &p[1], &p[2], &class));
        let run = |mode: JvpMode| mode.primal_and_jvp(f, &primals, &tangents, None).unwrap();
        let (p_fwd, j_fwd) = run(JvpMode::OnePass);
        let (p_gf, j_gf) = run(JvpMode::GraphFree);
        let (p_fd, j_fd) = run(JvpMode::FiniteDifference);
        let err = rel_err(&j_fd, &j_fwd);
        eprintln!("{kind:?}: finite-difference vs forward-mode JVP rel error {err:.3e} (|J·v| = {:.3e})", j_fwd.norm().double_value(&[]));
        assert!(j_fwd.norm().double_value(&[]) > 1e-3, "tangent is trivially small");
        assert!(err < tol, "{kind:?}: {err}");
        assert!(rel_err(&j_gf, &j_fwd.detach()) < 1e-6, "graph-free differs");
        assert!(rel_err(&p_fd, &p_fwd.detach()) < 1e-5 && p_fd.equal(&p_gf), "primal differs");
        // Only the forward-mode tangent carries a graph; every primal does.
        assert!(j_fwd.requires_grad() && !j_fd.requires_grad() && !j_gf.requires_grad());
        assert!(p_fwd.requires_grad() && p_fd.requires_grad() && p_gf.requires_grad());
    }
}

/// The Shortcut level embedding is piecewise constant: finite output at h = 0, zero tangent in h.
#[test]
fn log2_level_jvp_is_finite_and_flat_in_h() {
    let _lock = forward_ad_lock();
    tch::manual_seed(11);
    let cfg = DitConfig { h_embedding: HEmbedding::Log2Level, ..tiny_config() };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    vs.double();
    randomise_zeros(&vs, 0.1);
    let (x, t, _, class) = inputs(&cfg, 3, Kind::Double);
    let h = Tensor::from_slice(&[0.0f64, 0.25, 1.0]);
    let (out, tan) = flowmap_objectives::jvp_graph_free(|p| Ok(net.forward(&x, &t, &p[0], &class)), &[h.shallow_clone()], &[h.ones_like()]).unwrap();
    assert!(bool::try_from(out.isfinite().all()).unwrap());
    assert_eq!(tan.abs().max().double_value(&[]), 0.0);
    // h = 0 and h = 2^-7 share level 7.
    let fine = Tensor::from_slice(&[2f64.powi(-7), 0.25, 1.0]);
    let (out_zero, out_fine) = tch::no_grad(|| (net.forward(&x, &t, &h, &class), net.forward(&x, &t, &fine, &class)));
    assert!(out_zero.equal(&out_fine));
    assert!((&out - &out_zero).abs().max().double_value(&[]) < 1e-12); // math vs fused attention
}

/// Reverse over forward (MeanFlow's full second-order gradient): the gradient of a loss on the
/// tangent with respect to the parameters equals central differences of that loss along a random
/// parameter direction, in float64.
#[test]
fn gradient_through_the_tangent_matches_finite_differences() {
    let _lock = forward_ad_lock();
    tch::manual_seed(12);
    let cfg = tiny_config();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    vs.double();
    randomise_zeros(&vs, 0.1);
    let (x, t, h, class) = inputs(&cfg, 2, Kind::Double);
    let (vx, vt, vh) = (x.randn_like(), t.ones_like(), h.zeros_like());
    let weights = x.randn_like();
    let loss = || {
        let (_, du) = flowmap_objectives::jvp(|p| Ok(net.forward(&p[0], &p[1], &p[2], &class)), &[x.shallow_clone(), t.shallow_clone(), h.shallow_clone()], &[vx.shallow_clone(), vt.shallow_clone(), vh.shallow_clone()]).unwrap();
        (du * &weights).sum(Kind::Double)
    };
    let params = vs.trainable_variables();
    for p in &params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    loss().backward();
    let dirs: Vec<Tensor> = params.iter().map(|p| p.randn_like()).collect();
    let no_grad: Vec<String> = vs.variables().into_iter().filter(|(_, v)| v.requires_grad() && !v.grad().defined()).map(|(k, _)| k).collect();
    eprintln!("variables with no gradient through the tangent: {no_grad:?}");
    // An undefined gradient is a zero one; the finite differences check that too.
    let analytic: f64 = params.iter().zip(&dirs).filter(|(p, _)| p.grad().defined()).map(|(p, d)| (p.grad() * d).sum(Kind::Double).double_value(&[])).sum();
    let eps = 1e-6;
    let shift = |sign: f64| {
        tch::no_grad(|| {
            for (p, d) in params.iter().zip(&dirs) {
                let mut p = p.shallow_clone();
                let _ = p.g_add_(&(d * (sign * eps)));
            }
        })
    };
    shift(1.0);
    let plus = tch::no_grad(loss).double_value(&[]);
    shift(-2.0);
    let minus = tch::no_grad(loss).double_value(&[]);
    shift(1.0);
    let fd = (plus - minus) / (2.0 * eps);
    let err = (analytic - fd).abs() / fd.abs();
    eprintln!("d(loss on tangent)/dθ along a random direction: {analytic:.6e} vs FD {fd:.6e}, rel error {err:.3e}");
    assert!(err < 1e-5, "{err}");
}

/// The JVP through a guidance-conditioned DiT (improved MeanFlow's network: the guidance inputs
/// are held fixed, only (x, t, h) move) equals central differences in float64.
#[test]
fn guidance_conditioned_dit_jvp_matches_central_differences_f64() {
    use flowmap_core::GuidanceInput;
    let _lock = forward_ad_lock();
    tch::manual_seed(14);
    let cfg = DitConfig { guidance_conditioning: true, ..tiny_config() };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    vs.double();
    randomise_zeros(&vs, 0.1);
    let (x, t, h, class) = inputs(&cfg, 2, Kind::Double);
    let g = GuidanceInput { scale: Tensor::from_slice(&[2.5f64, 6.0]), t_min: Tensor::from_slice(&[0.1f64, 0.4]), t_max: Tensor::from_slice(&[0.6f64, 0.9]) };
    let f = |x: &Tensor, t: &Tensor, h: &Tensor| net.forward_guidance(x, t, h, &class, &g).unwrap();
    let (vx, vt, vh) = (x.randn_like(), t.randn_like(), h.randn_like());
    let (_, tangent) = flowmap_objectives::jvp(|p| Ok(f(&p[0], &p[1], &p[2])), &[x.shallow_clone(), t.shallow_clone(), h.shallow_clone()], &[vx.shallow_clone(), vt.shallow_clone(), vh.shallow_clone()]).unwrap();
    let eps = 1e-6;
    let fd = tch::no_grad(|| (f(&(&x + &vx * eps), &(&t + &vt * eps), &(&h + &vh * eps)) - f(&(&x - &vx * eps), &(&t - &vt * eps), &(&h - &vh * eps))) / (2.0 * eps));
    let err = rel_err(&tangent, &fd);
    eprintln!("guidance-conditioned DiT: JVP rel error vs central differences = {err:.3e}");
    assert!(fd.norm().double_value(&[]) > 1e-3 && err < 1e-5, "{err}");
}

/// The JVP objectives added with improved MeanFlow and α-Flow, on the tiny DiT in float64 (the
/// guided iMF on a guidance-conditioned one): `finite_difference` and `graph_free` give the
/// `one_pass` loss from the same draws to 1e-6 relative.
#[test]
fn imf_and_alpha_flow_jvp_modes_agree_on_the_dit_f64() {
    use flowmap_objectives::{AlphaFlowConfig, Batch, ImprovedMeanFlowConfig, JvpMode, Nets, Objective};
    let _lock = forward_ad_lock();
    tch::manual_seed(15);
    let cfg = DitConfig { guidance_conditioning: true, ..tiny_config() };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    vs.double();
    randomise_zeros(&vs, 0.1);
    let (x, _, _, class) = inputs(&cfg, 8, Kind::Double);
    let batch = Batch::new(x, class);
    let metric = |objective: &dyn Objective, step: u64, name: &str| {
        tch::manual_seed(16);
        let l = objective.loss(Nets { online: &net, ema: &net, teacher: None }, &batch, step);
        l.metrics.iter().find(|(k, _)| *k == name).unwrap().1.double_value(&[])
    };
    for mode in [JvpMode::OnePass, JvpMode::GraphFree, JvpMode::FiniteDifference] {
        let imf = ImprovedMeanFlowConfig { jvp_mode: mode, ..ImprovedMeanFlowConfig::official() }.build().unwrap();
        let af = AlphaFlowConfig { jvp_mode: mode, ..Default::default() }.build().unwrap();
        let (a, b) = (metric(&imf, 0, "imf_loss_u_unweighted"), metric(&af, 400_000, "af_loss_unweighted"));
        let imf_ref = metric(&ImprovedMeanFlowConfig::official().build().unwrap(), 0, "imf_loss_u_unweighted");
        let af_ref = metric(&AlphaFlowConfig::default().build().unwrap(), 400_000, "af_loss_unweighted");
        let (ei, ea) = ((a - imf_ref).abs() / imf_ref, (b - af_ref).abs() / af_ref);
        eprintln!("{}: iMF loss {a:.12} (rel diff to one_pass {ei:.2e}), alpha-Flow (α = 0) {b:.12} ({ea:.2e})", mode.name());
        assert!(ei < 1e-6 && ea < 1e-6, "{}: {ei} {ea}", mode.name());
    }
}

/// sCM's loss on the tiny DiT in float64: `finite_difference` agrees with forward mode (one_pass)
/// on the loss value and on every parameter gradient to 1e-6 relative, and graph_free equals
/// one_pass; the draws are the same (reseeded). sCT's tangent (cos τ·sin τ·(dx/dτ/σ_d, 2/π, 2/π))
/// goes through x, t and h. Tangent normalisation off so that the loss is the raw tangent's square.
#[test]
fn scm_loss_and_gradients_agree_across_jvp_modes_on_the_dit() {
    use flowmap_objectives::{Batch, JvpMode, Nets, Objective, ScmConfig, TangentNorm};
    let _lock = forward_ad_lock();
    tch::manual_seed(17);
    let cfg = tiny_config();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    vs.double();
    randomise_zeros(&vs, 0.1);
    let (x, _, _, class) = inputs(&cfg, 4, Kind::Double);
    let batch = Batch::new(x * 0.5, class);
    let run = |mode: JvpMode| -> (f64, Vec<Tensor>) {
        let objective = ScmConfig { jvp_mode: mode, tangent_norm: TangentNorm::None, tangent_warmup_steps: 0, ..Default::default() }.build(false).unwrap();
        for mut v in vs.trainable_variables() {
            v.zero_grad();
        }
        tch::manual_seed(18);
        let loss = objective.loss(Nets { online: &net, ema: &net, teacher: None }, &batch, 0);
        loss.value.backward();
        let grads = vs.trainable_variables().iter().map(|v| if v.grad().defined() { v.grad().copy() } else { v.zeros_like() }).collect();
        (loss.value.double_value(&[]), grads)
    };
    let (l_fwd, g_fwd) = run(JvpMode::OnePass);
    let (l_gf, g_gf) = run(JvpMode::GraphFree);
    let (l_fd, g_fd) = run(JvpMode::FiniteDifference);
    let flat = |g: &[Tensor]| Tensor::cat(&g.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
    let (gf, gg, gd) = (flat(&g_fwd), flat(&g_gf), flat(&g_fd));
    let (err_l, err_g) = ((l_fd - l_fwd).abs() / l_fwd.abs(), rel_err(&gd, &gf));
    eprintln!("sCM on the tiny DiT (f64): loss one_pass {l_fwd:.12}, finite_difference {l_fd:.12} (rel {err_l:.2e}); gradient rel error {err_g:.2e} (|grad| = {:.3e})", gf.norm().double_value(&[]));
    assert!(gf.norm().double_value(&[]) > 1e-3, "trivially small gradient");
    assert!(err_l < 1e-6 && err_g < 1e-6, "loss {err_l}, gradient {err_g}");
    assert!((l_gf - l_fwd).abs() <= 1e-12 * l_fwd.abs() && rel_err(&gg, &gf) < 1e-10, "graph_free differs");
}
