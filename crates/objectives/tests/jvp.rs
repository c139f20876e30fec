//! `jvp` against central finite differences in float64, on an MLP and on a transformer block with
//! math attention; primal exactness; second-order gradients; the level is always released.
use anyhow::{anyhow, Result};
use flowmap_objectives::{jvp, jvp_graph_free};
use flowmap_sys::{forward_ad_active, SdpBackend, SdpBackendGuard};
use std::sync::Mutex;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

// Forward-AD levels are process-global: tests that enter one must not overlap.
static LEVEL: Mutex<()> = Mutex::new(());
fn lock() -> std::sync::MutexGuard<'static, ()> {
    LEVEL.lock().unwrap_or_else(|e| e.into_inner())
}

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

fn mlp(vs: &nn::Path, d: i64) -> impl Module {
    nn::seq().add(nn::linear(vs / "l1", d, 32, Default::default())).add_fn(|x| x.gelu("none")).add(nn::linear(vs / "l2", 32, d, Default::default()))
}

/// Pre-norm transformer block: x + attn(ln(x)), then + mlp(ln(x)); attention through SDPA on the
/// math backend (the only one with a forward derivative).
struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    fn new(vs: &nn::Path, d: i64, heads: i64) -> Self {
        Self {
            ln1: nn::layer_norm(vs / "ln1", vec![d], Default::default()),
            qkv: nn::linear(vs / "qkv", d, 3 * d, Default::default()),
            proj: nn::linear(vs / "proj", d, d, Default::default()),
            ln2: nn::layer_norm(vs / "ln2", vec![d], Default::default()),
            fc1: nn::linear(vs / "fc1", d, 4 * d, Default::default()),
            fc2: nn::linear(vs / "fc2", 4 * d, d, Default::default()),
            heads,
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().unwrap();
        let qkv = self.qkv.forward(&self.ln1.forward(x)).reshape([b, n, 3, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]); // (3, B, H, N, Dh)
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let a = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false); // (B, H, N, Dh)
        let x = x + self.proj.forward(&a.transpose(1, 2).reshape([b, n, d]));
        &x + self.fc2.forward(&self.fc1.forward(&self.ln2.forward(&x)).gelu("tanh"))
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[])
}

/// Central difference of f along v at x, step eps.
fn central_fd(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, v: &Tensor, eps: f64) -> Tensor {
    (f(&(x + v * eps)) - f(&(x - v * eps))) / (2.0 * eps)
}

#[test]
fn mlp_jvp_matches_finite_differences_and_primal_is_exact() {
    let _g = lock();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root(), 8);
    let mut vs = vs;
    vs.double();
    let x = Tensor::randn([16, 8], F64);
    let v = Tensor::randn([16, 8], F64);
    let (primal, tangent) = jvp(|p| Ok(net.forward(&p[0])), &[x.shallow_clone()], &[v.shallow_clone()]).unwrap();
    let plain = net.forward(&x);
    assert!(primal.equal(&plain), "the primal must equal a plain forward bit for bit");
    let fd = tch::no_grad(|| central_fd(&|z| net.forward(z), &x, &v, 1e-6));
    let err = rel_err(&tangent, &fd);
    println!("MLP jvp vs central FD (f64, eps 1e-6): relative error {err:.3e}");
    assert!(err < 1e-6, "relative error {err:e}");
}

#[test]
fn transformer_block_jvp_matches_finite_differences_with_math_attention() {
    let _g = lock();
    let _math = SdpBackendGuard::only(&[SdpBackend::Math]).unwrap();
    tch::manual_seed(1);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let block = Block::new(&vs.root(), 32, 4);
    vs.double();
    let x = Tensor::randn([2, 10, 32], F64);
    let v = Tensor::randn([2, 10, 32], F64);
    let (primal, tangent) = jvp(|p| Ok(block.forward(&p[0])), &[x.shallow_clone()], &[v.shallow_clone()]).unwrap();
    assert!(primal.equal(&block.forward(&x)));
    let fd = tch::no_grad(|| central_fd(&|z| block.forward(z), &x, &v, 1e-6));
    let err = rel_err(&tangent, &fd);
    println!("transformer block jvp vs central FD (f64, eps 1e-6): relative error {err:.3e}");
    assert!(err < 1e-6, "relative error {err:e}");
}

#[test]
fn jvp_with_several_inputs_sums_the_directional_derivatives() {
    let _g = lock();
    // f(a, b) = a * sin(b): J·(va, vb) = va * sin(b) + a * cos(b) * vb.
    let a = Tensor::from_slice(&[1.0f64, 2.0, -0.5]);
    let b = Tensor::from_slice(&[0.3f64, -1.0, 2.0]);
    let va = Tensor::from_slice(&[1.0f64, 0.0, 2.0]);
    let vb = Tensor::from_slice(&[0.5f64, 1.0, -1.0]);
    let (_, t) = jvp(|p| Ok(&p[0] * p[1].sin()), &[a.shallow_clone(), b.shallow_clone()], &[va.shallow_clone(), vb.shallow_clone()]).unwrap();
    let exact = &va * b.sin() + &a * b.cos() * &vb;
    assert!(rel_err(&t, &exact) < 1e-15);
}

#[test]
fn a_loss_on_the_tangent_backpropagates_to_the_parameters() {
    let _g = lock();
    tch::manual_seed(2);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root(), 4);
    vs.double();
    let x = Tensor::randn([8, 4], F64);
    let v = Tensor::randn([8, 4], F64);
    let loss_of = |net: &dyn Module| -> Tensor {
        let (_, t) = jvp(|p| Ok(net.forward(&p[0])), &[x.shallow_clone()], &[v.shallow_clone()]).unwrap();
        t.square().sum(Kind::Double)
    };
    let loss = loss_of(&net);
    loss.backward();
    let vars = vs.variables();
    // J·v depends on every weight and on the first bias (through gelu'), never on the last bias.
    for name in ["l1.weight", "l1.bias", "l2.weight"] {
        let g = vars[name].grad();
        assert!(g.defined() && g.abs().max().double_value(&[]) > 0.0, "{name} got no gradient");
    }
    let g = vars["l2.bias"].grad();
    assert!(!g.defined() || g.abs().max().double_value(&[]) == 0.0);
    // Compare d loss / d W1[0, 0] with a central difference in that weight.
    let w = &vars["l1.weight"];
    let analytic = w.grad().double_value(&[0, 0]);
    let eps = 1e-6;
    let at = |delta: f64| {
        tch::no_grad(|| {
            let _ = w.get(0).get(0).f_add_(&Tensor::from(delta).to_kind(Kind::Double)).unwrap();
        });
        let l = loss_of(&net).double_value(&[]);
        tch::no_grad(|| {
            let _ = w.get(0).get(0).f_sub_(&Tensor::from(delta).to_kind(Kind::Double)).unwrap();
        });
        l
    };
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    let err = (analytic - numeric).abs() / numeric.abs();
    println!("d(|J v|^2)/dW: analytic {analytic:.9} numeric {numeric:.9} rel {err:.2e}");
    assert!(err < 1e-6, "analytic {analytic} vs numeric {numeric}");
}

#[test]
fn the_level_is_released_when_the_closure_fails_or_panics() {
    let _g = lock();
    let x = Tensor::ones([3], F64);
    let r = jvp(|_| Err(anyhow!("closure failed")), &[x.shallow_clone()], &[x.shallow_clone()]);
    assert_eq!(r.unwrap_err().to_string(), "closure failed");
    assert!(!forward_ad_active());
    let p = std::panic::catch_unwind(|| jvp(|_| -> Result<Tensor> { panic!("inside") }, &[x.shallow_clone()], &[x.shallow_clone()]));
    assert!(p.is_err());
    assert!(!forward_ad_active());
    // A later jvp works (a leaked level would make it fail with "nested").
    let (_, t) = jvp(|p| Ok(&p[0] * 3.0), &[x.shallow_clone()], &[x.shallow_clone()]).unwrap();
    assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![3.0; 3]);
}

#[test]
fn mismatched_tangents_are_rejected_with_shapes() {
    let _g = lock();
    let err = jvp(|p| Ok(p[0].shallow_clone()), &[Tensor::ones([2, 3], F64)], &[Tensor::ones([3, 2], F64)]).unwrap_err().to_string();
    assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
    let err = jvp(|p| Ok(p[0].shallow_clone()), &[Tensor::ones([2], F64)], &[]).unwrap_err().to_string();
    assert!(err.contains("1 primals but 0 tangents"), "{err}");
}

#[test]
fn graph_free_jvp_equals_jvp_without_a_graph() {
    let _g = lock();
    tch::manual_seed(3);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root(), 4);
    vs.double();
    let x = Tensor::randn([5, 4], F64);
    let v = Tensor::randn([5, 4], F64);
    let (p1, t1) = jvp(|p| Ok(net.forward(&p[0])), &[x.shallow_clone()], &[v.shallow_clone()]).unwrap();
    let (p2, t2) = jvp_graph_free(|p| Ok(net.forward(&p[0])), &[x.shallow_clone()], &[v.shallow_clone()]).unwrap();
    assert!(p1.requires_grad() && t1.requires_grad());
    assert!(!p2.requires_grad() && !t2.requires_grad());
    assert!(p1.equal(&p2) && t1.equal(&t2));
}
