//! `flowmap gpu-check checks`: correctness on the device itself, where the CPU tests cannot look.
//!
//! * `bf16_vs_f32`: the same DiT weights under bf16 autocast and in float32 (TF32 off): relative
//!   error of the output and of a flow-matching loss, cosine of the two gradients;
//! * `fused_adamw`: the trainer's AdamW with libtorch's fused kernel against its plain per-tensor
//!   update, three steps on the device;
//! * `jvp_finite_differences`: forward-mode JVP of a small DiT in float64 on the device against
//!   central finite differences in (x, t, h);
//! * `sampler_host_syncs`: host synchronisations counted (libtorch's sync debug hook) while the
//!   sampler runs 1 and N steps, with a deliberately synchronising loop as the positive control,
//!   and whether the GPU was still busy when the sampler returned.
//!
//! On the CPU every check runs too (CI's `--quick`), but bf16 falls back to float32 and there is
//! no CUDA synchronisation to count; the JSON says so under `note`.
use super::measure::{self, Failure};
use super::throughput::{counted_sampling, euler_sampler, inputs};
use super::{GpuCheckOptions, JsonReport, Scale};
use crate::train::adamw::{AdamW, AdamWConfig, AdamWKernel};
use anyhow::Result;
use flowmap_core::VelocityField;
use flowmap_models::{Dit, DitConfig, Precision};
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

/// Largest accepted relative error of bf16 against float32 (output and loss); bf16 keeps 8 bits
/// of mantissa (relative step 2⁻⁸ ≈ 0.4 %), and 12 blocks compound it.
pub const BF16_REL_TOL: f64 = 5e-2;
/// Smallest accepted cosine between the bf16 and float32 gradients.
pub const BF16_GRAD_COS_MIN: f64 = 0.99;
/// Largest accepted |fused − plain| after three AdamW steps (lr 1e-2, parameters ~N(0, 1)): a few
/// float32 rounding steps; a wrong formula is off by about lr.
pub const ADAMW_TOL: f64 = 1e-5;
/// Largest accepted relative error of the JVP against central differences in float64.
pub const JVP_REL_TOL: f64 = 1e-6;
/// Central-difference step of the JVP check.
const FD_STEP: f64 = 1e-6;

fn failed(name: &str, f: Failure) -> Value {
    json!({ "name": name, "pass": false, "error": f.message() })
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

/// Every trainable gradient of a store, flattened in name order, as float64.
fn flat_grads(vs: &nn::VarStore) -> Tensor {
    let vars: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    Tensor::cat(&vars.values().map(|t| t.grad().to_kind(Kind::Double).reshape([-1])).collect::<Vec<_>>(), 0)
}

/// bf16 autocast against float32 on the same weights.
fn bf16_vs_f32(cfg: &DitConfig, device: Device) -> Result<Value> {
    flowmap_sys::set_tf32(false)?;
    tch::manual_seed(2);
    let f32_cfg = DitConfig { precision: Precision::F32, ..cfg.clone() };
    let (vs32, net32) = super::parity::random_dit(&f32_cfg, device)?;
    let mut vs16 = nn::VarStore::new(device);
    let net16 = Dit::new(&vs16.root(), &DitConfig { precision: Precision::Bf16, ..cfg.clone() })?;
    vs16.copy(&vs32)?;
    let (x, class) = inputs(cfg, 8, device);
    let t = Tensor::rand([8], (Kind::Float, device));
    let h = t.zeros_like();
    let (y32, y16) = tch::no_grad(|| (net32.forward(&x, &t, &h, &class), net16.forward(&x, &t, &h, &class)));
    // A flow-matching loss and its gradient on fixed draws.
    let eps = x.randn_like();
    let x_t = &x * (-&t + 1.0).view([-1, 1, 1, 1]) + &eps * t.view([-1, 1, 1, 1]);
    let v = &eps - &x;
    let loss32 = (net32.forward(&x_t, &t, &h, &class) - &v).square().mean(Kind::Float);
    let loss16 = (net16.forward(&x_t, &t, &h, &class) - &v).square().mean(Kind::Float);
    loss32.backward();
    loss16.backward();
    let (g32, g16) = (flat_grads(&vs32), flat_grads(&vs16));
    let cos = (&g32 * &g16).sum(Kind::Double).double_value(&[]) / (g32.norm().double_value(&[]) * g16.norm().double_value(&[])).max(1e-300);
    let out_rel = rel(&y16, &y32);
    let loss_rel = rel(&loss16, &loss32);
    let effective = net16.precision();
    let pass = out_rel < BF16_REL_TOL && loss_rel < BF16_REL_TOL && cos > BF16_GRAD_COS_MIN;
    let note = (effective != Precision::Bf16).then_some("bf16 runs as float32 on this device: the comparison is trivially equal");
    Ok(json!({
        "name": "bf16_vs_f32",
        "pass": pass,
        "value": { "output_rel_err": out_rel, "loss_rel_err": loss_rel, "grad_cosine": cos, "loss_f32": loss32.double_value(&[]), "loss_bf16": loss16.double_value(&[]), "effective_precision": format!("{effective:?}") },
        "tolerance": { "output_rel_err": BF16_REL_TOL, "loss_rel_err": BF16_REL_TOL, "grad_cosine_min": BF16_GRAD_COS_MIN },
        "note": note,
    }))
}

/// The trainer's AdamW, fused kernel against the plain update, on the device.
fn fused_adamw(device: Device) -> Result<Value> {
    tch::manual_seed(3);
    let shapes: [&[i64]; 4] = [&[768, 768], &[3072], &[12, 64, 7], &[1]];
    let make = || {
        let vs = nn::VarStore::new(device);
        for (i, s) in shapes.iter().enumerate() {
            let _ = vs.root().var(&format!("p{i}"), s, nn::Init::Const(0.0));
        }
        vs
    };
    let (plain_vs, fused_vs) = (make(), make());
    let init: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, device))).collect();
    let grads: Vec<Vec<Tensor>> = (0..3).map(|_| shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, device))).collect()).collect();
    for vs in [&plain_vs, &fused_vs] {
        let vars = vs.variables();
        tch::no_grad(|| {
            for (i, t) in init.iter().enumerate() {
                vars[&format!("p{i}")].shallow_clone().copy_(t);
            }
        });
    }
    let cfg = |kernel| AdamWConfig { lr: 1e-2, betas: [0.9, 0.95], weight_decay: 0.1, eps: 1e-8, warmup_steps: 0, grad_clip: None, kernel };
    let mut plain = AdamW::new(&plain_vs, cfg(AdamWKernel::Plain));
    let mut fused = AdamW::new(&fused_vs, cfg(AdamWKernel::Fused));
    for g in &grads {
        for (vs, opt) in [(&plain_vs, &mut plain), (&fused_vs, &mut fused)] {
            opt.zero_grad();
            let vars = vs.variables();
            // d/dp Σ p·g = g exactly: the same gradient in both stores.
            let loss = Tensor::stack(&(0..shapes.len()).map(|i| (&vars[&format!("p{i}")] * &g[i]).sum(Kind::Float)).collect::<Vec<_>>(), 0).sum(Kind::Float);
            loss.backward();
            opt.step()?;
        }
    }
    let (a, b) = (plain_vs.variables(), fused_vs.variables());
    let diff = (0..shapes.len()).map(|i| (&a[&format!("p{i}")] - &b[&format!("p{i}")]).abs().max().double_value(&[])).fold(0.0, f64::max);
    let moved = (0..shapes.len()).map(|i| (&a[&format!("p{i}")] - &init[i]).abs().max().double_value(&[])).fold(0.0, f64::max);
    Ok(json!({
        "name": "fused_adamw",
        "pass": diff < ADAMW_TOL && moved > 1e-3,
        "value": { "max_abs_diff": diff, "max_update": moved, "steps": grads.len() },
        "tolerance": { "max_abs_diff": ADAMW_TOL },
        "note": (!device.is_cuda()).then_some("CPU: libtorch's CPU fused kernel against the plain update"),
    }))
}

/// Forward-mode JVP of a 2-block DiT in float64 against central differences.
fn jvp_finite_differences(device: Device) -> Result<Value> {
    tch::manual_seed(4);
    let cfg = DitConfig { input_size: 8, num_classes: 10, precision: Precision::F32, ..DitConfig::arch(2, 64, 4, 2) };
    let (mut vs, dit) = super::parity::random_dit(&cfg, device)?;
    vs.double(); // converts the variables in place: the module sees float64 weights
    let b = 3;
    let o = (Kind::Double, device);
    let x = Tensor::randn([b, cfg.in_channels, cfg.input_size, cfg.input_size], o);
    let t = Tensor::rand([b], o) * 0.8 + 0.1;
    let h = &t * 0.5;
    let class = Tensor::randint(cfg.num_classes, [b], (Kind::Int64, device));
    let (vx, vt, vh) = (x.randn_like(), t.ones_like(), t.ones_like());
    let f = |x: &Tensor, t: &Tensor, h: &Tensor| tch::no_grad(|| dit.forward(x, t, h, &class));
    let (_, du) = flowmap_objectives::jvp_graph_free(|p| Ok(dit.forward(&p[0], &p[1], &p[2], &class)), &[x.shallow_clone(), t.shallow_clone(), h.shallow_clone()], &[vx.shallow_clone(), vt.shallow_clone(), vh.shallow_clone()])?;
    let e = FD_STEP;
    let fd = (f(&(&x + &vx * e), &(&t + &vt * e), &(&h + &vh * e)) - f(&(&x - &vx * e), &(&t - &vt * e), &(&h - &vh * e))) / (2.0 * e);
    let err = rel(&du, &fd);
    Ok(json!({
        "name": "jvp_finite_differences",
        "pass": err < JVP_REL_TOL && du.abs().max().double_value(&[]) > 0.0,
        "value": { "rel_err": err, "dtype": "float64", "direction": "(vx, 1, 1) in (x, t, h)" },
        "tolerance": { "rel_err": JVP_REL_TOL },
        "note": Value::Null,
    }))
}

/// Host synchronisations of the sampler at 1 and N steps, against a loop that reads a value back
/// every step (the positive control: it must count N on a GPU).
fn sampler_host_syncs(cfg: &DitConfig, batch: i64, steps: usize, device: Device) -> Result<Value> {
    let vs = nn::VarStore::new(device);
    let net = Dit::new(&vs.root(), cfg)?;
    let sampler = euler_sampler()?;
    let (noise, class) = inputs(cfg, batch, device);
    let _warm = sampler.generate(&net, noise.shallow_clone(), &class, 2);
    let one = counted_sampling(&sampler, &net, &noise, &class, 1, device)?;
    let many = counted_sampling(&sampler, &net, &noise, &class, steps, device)?;
    // The control: the same Euler loop, but reading the mean back after every step.
    measure::sync(device);
    let counter = flowmap_sys::SyncCounter::start()?;
    tch::no_grad(|| {
        let mut x = noise.shallow_clone();
        for i in 0..steps {
            let t = Tensor::full([batch], 1.0 - i as f64 / steps as f64, (Kind::Float, device));
            x = &x - net.forward(&x, &t, &t.zeros_like(), &class) / steps as f64;
            let _ = x.mean(Kind::Float).double_value(&[]); // CPU–GPU sync, on purpose
        }
    });
    let control = counter.syncs();
    drop(counter);
    let (s1, sn) = (one["host_syncs"].as_i64().unwrap_or(-1), many["host_syncs"].as_i64().unwrap_or(-1));
    let on_gpu = device.is_cuda();
    let counter_works = !on_gpu || control >= steps as i64;
    let pass = s1 >= 0 && sn == s1 && counter_works;
    Ok(json!({
        "name": "sampler_host_syncs",
        "pass": pass,
        "value": { "syncs_1_step": s1, "syncs_n_steps": sn, "steps": steps, "control_syncs": control, "gpu_busy_at_return": many["gpu_busy_at_return"], "host_return_seconds": many["host_return_seconds"], "seconds": many["seconds"] },
        "tolerance": { "syncs_n_steps": "= syncs_1_step (none inside the loop)", "control_syncs": if on_gpu { json!(format!(">= {steps}")) } else { json!("(CPU: 0)") } },
        "note": (!on_gpu).then_some("CPU: there are no CUDA synchronisations to count; the counter itself is tested in crates/sys/tests/glue.rs"),
    }))
}

pub fn run(opts: &GpuCheckOptions, report: &mut JsonReport) -> Result<()> {
    let device = opts.device;
    let scale = Scale::of(opts.quick);
    let mut results = Vec::new();
    let guarded = |name: &str, f: &mut dyn FnMut() -> Result<Value>| measure::guarded(f).unwrap_or_else(|e| failed(name, e));
    results.push(guarded("bf16_vs_f32", &mut || bf16_vs_f32(&scale.dit, device)));
    report.set("checks", json!(results))?;
    results.push(guarded("fused_adamw", &mut || fused_adamw(device)));
    report.set("checks", json!(results))?;
    results.push(guarded("jvp_finite_differences", &mut || jvp_finite_differences(device)));
    report.set("checks", json!(results))?;
    let steps = if opts.quick { 8 } else { 32 };
    results.push(guarded("sampler_host_syncs", &mut || sampler_host_syncs(&scale.dit, scale.batch, steps, device)));
    report.set("checks", json!(results))?;
    report.set("all_pass", json!(results.iter().all(|r| r["pass"] == json!(true))))?;
    Ok(())
}
