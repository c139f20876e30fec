//! Issue 17 on the 2-D ring of Gaussians: a flow-matching MLP sampled at 2 and 4 NFE by AMED
//! (its step predictor trained post hoc on the frozen model) and by Euler on an optimised time
//! grid beats Euler and Heun at the same NFE (sliced W1 to held-out data), and every sampler's
//! NFE is the counted number of network evaluations.
use flowmap_core::{amed_sample, grid_error, sample, search_grid, uniform_grid, Linear, NfeCounter, StepRule, VelocityField};
use flowmap_experiments::demo::toy::{self, ToySettings};
use flowmap_experiments::demo::toy_data::{sliced_w1, Toy};
use flowmap_objectives::{AmedConfig, Batch, Nets, Objective};
use std::sync::Mutex;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// tch's global generator is shared by the tests of this binary.
static RNG: Mutex<()> = Mutex::new(());

/// (samples, counted NFE per sample).
fn counted(net: &dyn VelocityField, noise: &Tensor, f: impl Fn(&dyn VelocityField, Tensor) -> Tensor) -> (Tensor, f64) {
    let counter = NfeCounter::new(net);
    let x = tch::no_grad(|| f(&counter, noise.copy()));
    (x, counter.nfe(noise.size()[0]))
}

#[test]
fn amed_and_an_optimised_grid_beat_euler_and_heun_at_two_and_four_nfe() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(2);
    let t0 = std::time::Instant::now();
    let toy = Toy::Ring;
    let settings = ToySettings { train_steps: 600, ..Default::default() };
    let fm = toy::methods(settings.train_steps).unwrap().into_iter().find(|m| m.label == "flow matching").unwrap();
    let net = toy::train(toy, &fm, &settings, 0).unwrap();
    let train_s = t0.elapsed().as_secs_f64();
    let path = Linear::new();
    let n = 2048;
    let class = Tensor::zeros([n], (Kind::Int64, Device::Cpu));

    // AMED: the predictor alone trains, on fresh noise each step, against Heun teacher steps.
    let mut amed = AmedConfig { steps: vec![1, 2], teacher_substeps: 1, ..Default::default() }.build().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    amed.init_params(&vs.root()).unwrap();
    let mut opt = nn::Adam::default().build(&vs, 2e-3).unwrap();
    let batch_class = Tensor::zeros([128], (Kind::Int64, Device::Cpu));
    let mut first_loss = None;
    let mut last_loss = 0.0;
    for step in 0..150 {
        tch::manual_seed(10_000 + step);
        let batch = Batch::new(Tensor::zeros([128, 2], (Kind::Float, Device::Cpu)), batch_class.shallow_clone());
        let loss = amed.loss(Nets { online: &net, ema: &net, teacher: Some(&net) }, &batch, step as u64);
        last_loss = loss.value.double_value(&[]);
        first_loss.get_or_insert(last_loss);
        opt.backward_step(&loss.value);
    }
    let amed_s = t0.elapsed().as_secs_f64() - train_s;
    let first_loss = first_loss.unwrap();
    eprintln!("AMED loss {first_loss:.4} -> {last_loss:.4}");
    assert!(last_loss < 0.9 * first_loss, "the AMED predictor did not learn: loss {first_loss:.4} -> {last_loss:.4}");

    // Optimised Euler grids: fitted to a 128-step Heun solution on noise that is not the test's.
    tch::manual_seed(77);
    let fit_noise = Tensor::randn([512, 2], (Kind::Float, Device::Cpu));
    let fit_class = Tensor::zeros([512], (Kind::Int64, Device::Cpu));
    let reference = tch::no_grad(|| sample(&net, &path, fit_noise.copy(), &fit_class, &uniform_grid(128), StepRule::Heun));
    let grids: Vec<Vec<f64>> = [2usize, 4]
        .iter()
        .map(|&steps| {
            let found = search_grid(&uniform_grid(steps), 3, 8, |g| grid_error(&net, &path, StepRule::Euler, &fit_noise, &fit_class, &reference, g));
            eprintln!("optimised {steps}-step Euler grid {:?}: error {:.4} (uniform {:.4})", found.times, found.error, found.start_error);
            assert!(found.error < found.start_error, "the search did not improve on the uniform grid");
            found.times
        })
        .collect();
    let grid_s = t0.elapsed().as_secs_f64() - train_s - amed_s;

    // Held-out data and test noise from streams neither fit used.
    tch::manual_seed(-11);
    let held_out = toy.sample(n);
    let noise = Tensor::randn([n, 2], (Kind::Float, Device::Cpu));
    let predictor = amed.predictor().unwrap();
    for (k, nfe) in [(0usize, 2.0), (1, 4.0)] {
        let steps = nfe as usize;
        let score = |(x, counted): (Tensor, f64), what: &str| {
            assert_eq!(counted, nfe, "{what}: counted NFE {counted}, planned {nfe}");
            let w = sliced_w1(&x, &held_out, 128);
            eprintln!("NFE {nfe}: {what:22} sliced W1 {w:.4}");
            w
        };
        let euler = score(counted(&net, &noise, |f, z| sample(f, &path, z, &class, &uniform_grid(steps), StepRule::Euler)), "Euler");
        let heun = score(counted(&net, &noise, |f, z| sample(f, &path, z, &class, &uniform_grid(steps / 2), StepRule::Heun)), "Heun");
        let amed_w = score(counted(&net, &noise, |f, z| amed_sample(f, predictor, z, &class, &uniform_grid(steps / 2))), "AMED");
        let opt_w = score(counted(&net, &noise, |f, z| sample(f, &path, z, &class, &grids[k], StepRule::Euler)), "Euler, optimised grid");
        let best = euler.min(heun);
        assert!(amed_w < best, "NFE {nfe}: AMED W1 {amed_w:.4} does not beat Euler {euler:.4} / Heun {heun:.4}");
        assert!(opt_w < best, "NFE {nfe}: optimised grid W1 {opt_w:.4} does not beat Euler {euler:.4} / Heun {heun:.4}");
    }
    eprintln!("train {train_s:.1} s, AMED {amed_s:.1} s, grids {grid_s:.1} s, total {:.1} s", t0.elapsed().as_secs_f64());
}
