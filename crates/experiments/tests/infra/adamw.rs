use flowmap_experiments::train::adamw::{AdamW, AdamWConfig, AdamWKernel};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

fn base(kernel: AdamWKernel) -> AdamWConfig {
    AdamWConfig { lr: 1e-2, betas: [0.9, 0.95], weight_decay: 0.1, eps: 1e-8, warmup_steps: 0, grad_clip: None, kernel }
}

/// A deterministic pseudo-random tensor that does not touch tch's global generator (other tests
/// in this binary reseed it from parallel threads).
fn wave(shape: &[i64], phase: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.731 + phase).sin().reshape(shape)
}

/// Trains a tiny linear model for `steps` steps and returns its parameters.
fn train(kernel: AdamWKernel, steps: usize) -> (VarStore, AdamW) {
    let vs = VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "lin", 4, 3, Default::default());
    tch::no_grad(|| {
        lin.ws.shallow_clone().copy_(&wave(&[3, 4], 0.1));
        lin.bs.as_ref().unwrap().shallow_clone().copy_(&wave(&[3], 0.2));
    });
    let mut opt = AdamW::new(&vs, base(kernel));
    for i in 0..steps {
        let x = wave(&[8, 4], 1.0 + i as f64);
        let loss = lin.forward(&x).square().mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        opt.step().unwrap();
    }
    (vs, opt)
}

fn max_diff(a: &VarStore, b: &VarStore) -> f64 {
    let (va, vb) = (a.variables(), b.variables());
    va.iter().map(|(n, t)| (t - &vb[n]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

#[test]
fn fused_kernel_matches_the_plain_update() {
    let (plain, po) = train(AdamWKernel::Plain, 5);
    let (fused, fo) = train(AdamWKernel::Fused, 5);
    let d = max_diff(&plain, &fused);
    println!("fused vs plain AdamW after 5 steps: max |diff| {d:.2e}");
    assert!(d < 1e-6, "{d}");
    for ((n1, a), (n2, b)) in po.state().iter().zip(fo.state().iter()) {
        assert_eq!(n1, n2);
        assert!((a - b).abs().max().double_value(&[]) < 1e-6, "{n1}");
    }
    assert_eq!(po.step_count(), 5);
}

#[test]
fn the_first_step_moves_every_weight_by_lr_times_sign_of_grad() {
    // After one step, m̂ = g and v̂ = g², so the update is lr·g/(|g| + eps) ≈ lr·sign(g), plus decay.
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let w = vs.root().var("w", &[5], nn::Init::Const(1.0));
    let mut c = base(AdamWKernel::Plain);
    c.weight_decay = 0.0;
    let mut opt = AdamW::new(&vs, c);
    let loss = (&w * Tensor::from_slice(&[1.0f32, -2.0, 3.0, -4.0, 5.0])).sum(Kind::Float);
    loss.backward();
    opt.step().unwrap();
    let got = Vec::<f32>::try_from(&w.detach()).unwrap();
    assert_eq!(got, vec![0.99, 1.01, 0.99, 1.01, 0.99]);
}

#[test]
fn state_round_trips_and_bad_state_is_rejected() {
    let (vs, opt) = train(AdamWKernel::Plain, 3);
    let saved: std::collections::BTreeMap<String, Tensor> = opt.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let mut fresh = AdamW::new(&vs, base(AdamWKernel::Plain));
    fresh.load_state(&saved, opt.step_count()).unwrap();
    for ((n, a), (_, b)) in fresh.state().iter().zip(opt.state().iter()) {
        assert!(a.equal(b), "{n}");
    }
    assert_eq!(fresh.step_count(), 3);
    // Missing or mis-shaped entries are errors naming the key.
    let mut broken: std::collections::BTreeMap<String, Tensor> = saved.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    let key = broken.keys().next().unwrap().clone();
    broken.remove(&key);
    assert!(fresh.load_state(&broken, 3).unwrap_err().to_string().contains(&key));
    let mut reshaped = saved;
    reshaped.insert(key.clone(), Tensor::zeros([7], (Kind::Float, Device::Cpu)));
    assert!(fresh.load_state(&reshaped, 3).unwrap_err().to_string().contains("shape"));
}

#[test]
fn warmup_and_clipping() {
    let vs = VarStore::new(Device::Cpu);
    let w = vs.root().var("w", &[2], nn::Init::Const(0.0));
    let mut c = base(AdamWKernel::Plain);
    c.warmup_steps = 4;
    c.grad_clip = Some(1.0);
    let mut opt = AdamW::new(&vs, c);
    assert!((opt.lr() - 0.0025).abs() < 1e-15);
    (&w * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
    let norm = opt.clip_and_norm();
    assert!((norm.double_value(&[]) - 5.0).abs() < 1e-6);
    let g = Vec::<f32>::try_from(&w.grad()).unwrap();
    assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    opt.step().unwrap();
    assert!((opt.lr() - 0.005).abs() < 1e-15);
}
