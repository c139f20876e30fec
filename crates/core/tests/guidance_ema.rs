//! Classifier-free guidance wrapper and parameter EMA against hand-computed values.
use flowmap_core::{Ema, Guided, VelocityField};
use std::cell::Cell;
use tch::{nn, Device, Kind, Tensor};

/// F(x_t, t, h, c) = x_t·(c + 1) + t + 2h, per sample; counts calls and rows.
struct Stub {
    calls: Cell<usize>,
    rows: Cell<i64>,
}
impl VelocityField for Stub {
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        self.calls.set(self.calls.get() + 1);
        self.rows.set(self.rows.get() + x_t.size()[0]);
        let c = (class.to_kind(Kind::Double) + 1.0).reshape([-1, 1]);
        x_t * c + (t + h * 2.0).reshape([-1, 1])
    }
    fn null_class(&self) -> i64 {
        10
    }
}

fn stub() -> Stub {
    Stub { calls: Cell::new(0), rows: Cell::new(0) }
}

fn inputs() -> (Tensor, Tensor, Tensor, Tensor) {
    let x = Tensor::from_slice(&[1.0f64, 2.0, -1.0, 0.5, 3.0, -2.0]).reshape([3, 2]);
    let t = Tensor::from_slice(&[0.1f64, 0.4, 0.9]);
    let h = Tensor::from_slice(&[0.0f64, 0.1, 0.3]);
    let class = Tensor::from_slice(&[0i64, 3, 7]);
    (x, t, h, class)
}

#[test]
fn guidance_scale_one_is_the_conditional_output() {
    let (x, t, h, class) = inputs();
    let net = stub();
    let cond = net.forward(&x, &t, &h, &class);
    let guided = Guided::new(&net, 1.0).forward(&x, &t, &h, &class);
    assert!(guided.equal(&cond));
    assert_eq!(Guided::new(&net, 1.0).null_class(), 10);
}

#[test]
fn guidance_combines_halves_computed_in_one_batch() {
    let (x, t, h, class) = inputs();
    let net = stub();
    let w = 3.0;
    let out = Guided::new(&net, w).forward(&x, &t, &h, &class);
    assert_eq!((net.calls.get(), net.rows.get()), (1, 6), "one forward of 2B rows");
    // By hand: cond = x·(c + 1) + t + 2h, null = x·11 + t + 2h, guided = null + w·(cond − null).
    let xs: Vec<f64> = Vec::try_from(x.flatten(0, -1)).unwrap();
    let got: Vec<f64> = Vec::try_from(out.flatten(0, -1)).unwrap();
    let (ts, hs, cs) = ([0.1, 0.4, 0.9], [0.0, 0.1, 0.3], [0.0, 3.0, 7.0]);
    for i in 0..3 {
        for j in 0..2 {
            let xv = xs[2 * i + j];
            let cond = xv * (cs[i] + 1.0) + ts[i] + 2.0 * hs[i];
            let null = xv * 11.0 + ts[i] + 2.0 * hs[i];
            let want = null + w * (cond - null);
            assert!((got[2 * i + j] - want).abs() < 1e-12, "row {i} col {j}: {} vs {want}", got[2 * i + j]);
        }
    }
    // Guidance interval [0.2, 0.6]: only row 1 (t = 0.4) is guided; rows 0 and 2 are conditional.
    let net2 = stub();
    let cond = net2.forward(&x, &t, &h, &class);
    let inter = Guided { net: &net2, scale: w, interval: Some((0.2, 0.6)) }.forward(&x, &t, &h, &class);
    assert!(inter.get(0).equal(&cond.get(0)) && inter.get(2).equal(&cond.get(2)));
    assert!((inter.get(1) - out.get(1)).abs().max().double_value(&[]) < 1e-12);
}

fn store(values: &[(&str, &[f64])]) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    for (name, v) in values {
        let parts: Vec<&str> = name.split('.').collect();
        let p = parts[..parts.len() - 1].iter().fold(vs.root(), |p, d| p.sub(*d));
        let _ = p.add(parts[parts.len() - 1], Tensor::from_slice(v), true);
    }
    vs
}

fn set(vs: &nn::VarStore, name: &str, v: &[f64]) {
    let mut var = vs.variables()[name].shallow_clone();
    tch::no_grad(|| var.copy_(&Tensor::from_slice(v)));
}

fn get(vs: &nn::VarStore, name: &str) -> Vec<f64> {
    Vec::try_from(vs.variables()[name].detach()).unwrap()
}

#[test]
fn ema_follows_the_hand_computed_recursion() {
    tch::set_num_threads(1);
    for warmup in [false, true] {
        let online = store(&[("block.0.w", &[1.0, 2.0, 3.0]), ("b", &[-1.0, 0.0])]);
        let mut ema = Ema::new(&online, 0.9, warmup);
        assert_eq!(get(ema.shadow(), "block.0.w"), [1.0, 2.0, 3.0], "starts as a copy");
        assert_eq!(ema.shadow().variables()["b"].kind(), Kind::Double, "keeps the kind");
        assert!(!ema.shadow().variables()["b"].requires_grad(), "shadow is not trainable");
        let mut want_w = [1.0, 2.0, 3.0];
        let mut want_b = [-1.0, 0.0];
        let targets: [([f64; 3], [f64; 2]); 4] = [([2.0, 2.0, 2.0], [1.0, 1.0]), ([0.0, 4.0, -1.0], [0.5, 2.0]), ([5.0, 5.0, 5.0], [0.0, 0.0]), ([1.0, 0.0, 1.0], [3.0, -3.0])];
        for (n, (w, b)) in targets.iter().enumerate() {
            set(&online, "block.0.w", w);
            set(&online, "b", b);
            ema.update(&online);
            // d_n = min(0.9, (1 + n)/(10 + n)) with warm-up: 0.1, 2/11, 3/12, 4/13.
            let d = if warmup { (0.9f64).min((1.0 + n as f64) / (10.0 + n as f64)) } else { 0.9 };
            assert_eq!(ema.decay_at(n as u64), d);
            for i in 0..3 {
                want_w[i] = d * want_w[i] + (1.0 - d) * w[i];
            }
            for i in 0..2 {
                want_b[i] = d * want_b[i] + (1.0 - d) * b[i];
            }
            let (got_w, got_b) = (get(ema.shadow(), "block.0.w"), get(ema.shadow(), "b"));
            for i in 0..3 {
                assert!((got_w[i] - want_w[i]).abs() < 1e-14, "warmup {warmup} step {n}: {got_w:?} vs {want_w:?}");
            }
            for i in 0..2 {
                assert!((got_b[i] - want_b[i]).abs() < 1e-14);
            }
        }
        assert_eq!(ema.updates(), 4);
        // Online values are untouched by the update.
        assert_eq!(get(&online, "b"), [3.0, -3.0]);
    }
}

#[test]
fn ema_with_a_model_built_shadow_and_copy_to() {
    let online = store(&[("lin.weight", &[1.0, 2.0]), ("lin.bias", &[0.5])]);
    let shadow = store(&[("lin.weight", &[0.0, 0.0]), ("lin.bias", &[0.0])]);
    let mut ema = Ema::with_shadow(shadow, &online, 0.5, false).unwrap();
    assert_eq!(get(ema.shadow(), "lin.weight"), [1.0, 2.0], "initialised from online");
    set(&online, "lin.weight", &[3.0, 4.0]);
    ema.update(&online);
    assert_eq!(get(ema.shadow(), "lin.weight"), [2.0, 3.0]);
    let mut eval = store(&[("lin.weight", &[9.0, 9.0]), ("lin.bias", &[9.0])]);
    ema.copy_to(&mut eval).unwrap();
    assert_eq!(get(&eval, "lin.weight"), [2.0, 3.0]);
    assert_eq!(get(&eval, "lin.bias"), [0.5]);
    // Checkpoint-style restore of the counter.
    ema.set_updates(41);
    assert_eq!(ema.updates(), 41);
    // A shadow that lacks a variable of the online store is an error.
    let partial = store(&[("lin.weight", &[0.0, 0.0])]);
    assert!(Ema::with_shadow(partial, &online, 0.5, false).is_err());
}

/// A network that takes guidance as an input (improved MeanFlow) gets ω and the interval through
/// `forward_guidance` in one B-row call, counted as one NFE; no unconditional pass runs.
#[test]
fn guided_passes_scale_and_interval_to_a_network_that_takes_them() {
    use flowmap_core::{GuidanceInput, NfeCounter};
    /// F = x·ω + t_min − t_max (so the inputs are visible in the output).
    struct TakesGuidance(Cell<usize>);
    impl VelocityField for TakesGuidance {
        fn forward(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Tensor {
            panic!("a guidance-taking network is called through forward_guidance")
        }
        fn null_class(&self) -> i64 {
            10
        }
        fn takes_guidance(&self) -> bool {
            true
        }
        fn forward_guidance(&self, x_t: &Tensor, _t: &Tensor, _h: &Tensor, _c: &Tensor, g: &GuidanceInput) -> Option<Tensor> {
            self.0.set(self.0.get() + 1);
            Some(x_t * g.scale.reshape([-1, 1]) + (&g.t_min - &g.t_max).reshape([-1, 1]))
        }
    }
    let net = TakesGuidance(Cell::new(0));
    let (x, t, h, class) = inputs();
    let counter = NfeCounter::new(&net);
    let out = Guided { interval: Some((0.4, 0.65)), ..Guided::new(&counter, 7.5) }.forward(&x, &t, &h, &class);
    let expected = &x * 7.5 + (0.4 - 0.65);
    assert!((out - expected).abs().max().double_value(&[]) < 1e-12);
    assert_eq!(net.0.get(), 1);
    assert_eq!(counter.nfe(3), 1.0);
    // Without an interval: [0, 1]; scale 1 is passed too (not skipped).
    let out = Guided::new(&net, 1.0).forward(&x, &t, &h, &class);
    assert!((out - (&x - 1.0)).abs().max().double_value(&[]) < 1e-12);
}
