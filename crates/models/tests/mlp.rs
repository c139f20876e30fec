//! The small MLP: interface, zero output at init, JVP, and that it learns a 2-D flow.
use flowmap_core::VelocityField;
use flowmap_models::{HEmbedding, MlpConfig, NoParams, TimeEmbedding};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

#[test]
fn mlp_shapes_null_row_and_zero_init() {
    for (time_embedding, h_embedding) in [(TimeEmbedding::default(), HEmbedding::Continuous), (TimeEmbedding::Linear(NoParams {}), HEmbedding::None), (TimeEmbedding::default(), HEmbedding::Log2Level)] {
        let cfg = MlpConfig { num_classes: 3, time_embedding, h_embedding, ..MlpConfig::new(2) };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = cfg.init(vs.root()).unwrap();
        assert_eq!(net.null_class(), 3);
        assert_eq!(vs.variables()["y_table"].size(), vec![4, 256]);
        let x = Tensor::randn([5, 2], (Kind::Float, Device::Cpu));
        let t = Tensor::rand([5], (Kind::Float, Device::Cpu));
        let class = Tensor::from_slice(&[0i64, 1, 2, 3, 3]);
        let out = net.forward(&x, &t, &(&t * 0.5), &class);
        assert_eq!(out.size(), vec![5, 2]);
        assert_eq!(out.abs().max().double_value(&[]), 0.0);
    }
}

/// Flow matching on two Gaussian blobs (t = 0 data, t = 1 noise): the loss falls well below the
/// loss of F = 0 within 300 Adam steps.
#[test]
fn mlp_learns_a_2d_flow() {
    // Tiny ops: one intra-op thread avoids OpenMP oversubscription on a busy 2-core machine
    // (seen: 1 s alone, 25 s under load with two threads).
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let cfg = MlpConfig { width: 128, ..MlpConfig::new(2) };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    let mut opt = nn::Adam::default().build(&vs, 2e-3).unwrap();
    let null = Tensor::full([512], 0, (Kind::Int64, Device::Cpu));
    let batch = || {
        let sign = Tensor::randint(2, [512, 1], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let x = Tensor::cat(&[&sign * 2.0, sign.zeros_like()], 1) + Tensor::randn([512, 2], (Kind::Float, Device::Cpu)) * 0.1;
        let eps = x.randn_like();
        let t = Tensor::rand([512], (Kind::Float, Device::Cpu));
        let tc = t.unsqueeze(1);
        let x_t = &x * (1.0 - &tc) + &eps * &tc;
        (x_t, t, eps - x)
    };
    let loss_of = |x_t: &Tensor, t: &Tensor, v: &Tensor| (net.forward(x_t, t, &t.zeros_like(), &null) - v).square().mean(Kind::Float);
    let (x_t, t, v) = batch();
    let initial = tch::no_grad(|| loss_of(&x_t, &t, &v)).double_value(&[]);
    let mut last = initial;
    for _ in 0..300 {
        let (x_t, t, v) = batch();
        let loss = loss_of(&x_t, &t, &v);
        opt.backward_step(&loss);
        last = loss.double_value(&[]);
    }
    eprintln!("mlp flow matching: loss {initial:.3} at F = 0, {last:.3} after 300 steps");
    assert!(last < 0.6 * initial, "{initial} -> {last}");
}

#[test]
fn mlp_jvp_matches_central_differences_f64() {
    tch::manual_seed(1);
    let cfg = MlpConfig { width: 32, ..MlpConfig::new(2) };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    vs.double();
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            let r = v.randn_like() * 0.3;
            v.copy_(&r);
        }
    });
    let x = Tensor::randn([4, 2], (Kind::Double, Device::Cpu));
    let t = Tensor::rand([4], (Kind::Double, Device::Cpu));
    let h = &t * 0.3;
    let class = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
    let (vx, vt, vh) = (x.randn_like(), t.randn_like(), h.randn_like());
    let f = |x: &Tensor, t: &Tensor, h: &Tensor| net.forward(x, t, h, &class);
    let (_, tangent) = flowmap_objectives::jvp_graph_free(|p| Ok(f(&p[0], &p[1], &p[2])), &[x.shallow_clone(), t.shallow_clone(), h.shallow_clone()], &[vx.shallow_clone(), vt.shallow_clone(), vh.shallow_clone()]).unwrap();
    // Sinusoid frequencies reach 1000 (scale 1000), so a smaller step than the DiT test's keeps
    // the truncation error (1000·ε)²/6 small.
    let eps = 1e-7;
    let fd = (f(&(&x + &vx * eps), &(&t + &vt * eps), &(&h + &vh * eps)) - f(&(&x - &vx * eps), &(&t - &vt * eps), &(&h - &vh * eps))) / (2.0 * eps);
    let err = (&tangent - &fd).norm().double_value(&[]) / fd.norm().double_value(&[]);
    eprintln!("mlp JVP rel error {err:.3e}");
    assert!(err < 1e-5);
}
