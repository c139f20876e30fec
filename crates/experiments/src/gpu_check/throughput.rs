//! `flowmap gpu-check bench`: what flowmap's DiT costs on this device, measured the way
//! `python/flowmap_ref/bench.py` measures its PyTorch twin: training steps of flow matching,
//! MeanFlow (one-pass JVP, float32, math attention) and Shortcut (paper preset) with fused AdamW
//! and no EMA, no data loading, no gradient clipping (tables.md's [PT-H100] protocol); forward
//! latency at batch 1 and throughput at the full batch; 1- and 128-step Euler sampling of a batch
//! (with the host synchronisations counted); Inception features and SD-VAE decodes per second.
use super::measure::{self, time_calls, with_batch_fallback, Timing};
use super::{dit_forward_flops, GpuCheckOptions, JsonReport, Scale};
use crate::eval::fid::{Inception, Preprocess};
use crate::eval::sampling::{Sampler, SamplingConfig};
use crate::run::model::ModelConfig;
use crate::train::adamw::{AdamW, AdamWConfig, AdamWKernel};
use anyhow::{Context, Result};
use flowmap_core::VelocityField;
use flowmap_models::{DitConfig, Vae};
use flowmap_objectives::{Batch, FlowMatchingConfig, MeanFlowConfig, Nets, ObjectiveConfig, ShortcutConfig};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The objectives whose training step is timed, by report name: flowmap's defaults (MeanFlow's
/// official objective, the Shortcut paper's settings), which the PyTorch reference mirrors.
pub fn objectives() -> Vec<(&'static str, ObjectiveConfig)> {
    vec![("flow_matching", ObjectiveConfig::FlowMatching(FlowMatchingConfig::default())), ("mean_flow", ObjectiveConfig::MeanFlow(MeanFlowConfig::default())), ("shortcut", ObjectiveConfig::Shortcut(ShortcutConfig::paper()))]
}

/// AdamW as the benchmark steps it: fused on CUDA (libtorch's `_fused_adamw_`), plain on the CPU.
pub fn bench_adamw() -> AdamWConfig {
    AdamWConfig { lr: 1e-4, betas: [0.9, 0.999], weight_decay: 0.0, eps: 1e-8, warmup_steps: 0, grad_clip: None, kernel: AdamWKernel::Auto }
}

/// Random latents (B, C, H, W) and labels (B,) in 0..K (or the null class when K = 0).
pub fn inputs(cfg: &DitConfig, batch: i64, device: Device) -> (Tensor, Tensor) {
    let x = Tensor::randn([batch, cfg.in_channels, cfg.input_size, cfg.input_size], (Kind::Float, device));
    let class = match cfg.num_classes {
        0 => Tensor::zeros([batch], (Kind::Int64, device)),
        k => Tensor::randint(k, [batch], (Kind::Int64, device)),
    };
    (x, class)
}

/// One training step (loss, backward, AdamW, zero the gradients) timed at `batch`.
fn train_step(cfg: &DitConfig, objective: &ObjectiveConfig, batch: i64, iters: (usize, usize), device: Device) -> Result<Timing> {
    let net = ModelConfig::Dit(cfg.clone()).build(device)?;
    let objective = objective.build()?;
    objective.check_batch_size(batch)?;
    let mut opt = AdamW::new(&net.vs, bench_adamw());
    let (x, class) = inputs(cfg, batch, device);
    time_calls(device, batch, iters, || {
        let nets = Nets { online: net.net.as_ref(), ema: net.net.as_ref(), teacher: None };
        let loss = objective.loss(nets, &Batch::new(x.shallow_clone(), class.shallow_clone()), 0);
        loss.value.backward();
        opt.step()?;
        opt.zero_grad();
        Ok(())
    })
}

/// The sampler the benchmark times: flow matching's (Euler on the linear path, uniform grid, no
/// guidance), resolved as a run resolves it.
pub fn euler_sampler() -> Result<Sampler> {
    let sampling: SamplingConfig = toml::from_str("").context("default [sampling]")?;
    sampling.resolve(&ObjectiveConfig::FlowMatching(FlowMatchingConfig::default()))
}

/// A sampling run with its host synchronisations counted: seconds until `generate` returned on
/// the host, whether the GPU was still busy then (it queued the steps without waiting), seconds
/// until the GPU finished, and the synchronisations libtorch performed inside (none are expected:
/// `flowmap_core::sampling` reads nothing back).
pub fn counted_sampling(sampler: &Sampler, net: &dyn VelocityField, noise: &Tensor, class: &Tensor, steps: usize, device: Device) -> Result<serde_json::Value> {
    measure::sync(device);
    let counter = flowmap_sys::SyncCounter::start()?;
    let start = Instant::now();
    let x = sampler.generate(net, noise.shallow_clone(), class, steps);
    let host_return = start.elapsed().as_secs_f64();
    let idle_at_return = flowmap_sys::cuda_stream_idle(device)?;
    let syncs = counter.syncs();
    drop(counter);
    measure::sync(device);
    let seconds = start.elapsed().as_secs_f64();
    let finite = x.isfinite().all().int64_value(&[]) == 1;
    Ok(json!({
        "steps": steps,
        "images": noise.size()[0],
        "seconds": seconds,
        "host_return_seconds": host_return,
        "gpu_busy_at_return": idle_at_return.map(|idle| !idle),
        "host_syncs": syncs,
        "finite": finite,
    }))
}

pub fn run(opts: &GpuCheckOptions, report: &mut JsonReport) -> Result<()> {
    let device = opts.device;
    let scale = Scale::of(opts.quick);
    if device.is_cuda() {
        // Both sides run TF32 matmuls for what is not bf16 (the JVP, the VAE), as tables.md's baseline.
        flowmap_sys::set_tf32(true)?;
    }
    let cfg = scale.dit.clone();
    tch::manual_seed(0);
    let params = ModelConfig::Dit(cfg.clone()).build(device)?.num_parameters();
    let flops = dit_forward_flops(&cfg);
    report.set(
        "settings",
        json!({
            "precision": format!("{:?}", cfg.precision.effective(device)),
            "tf32": flowmap_sys::tf32_enabled()?,
            "optimizer": if device.is_cuda() { "AdamW, fused (at::_fused_adamw_)" } else { "AdamW, plain (CPU)" },
            "jvp": "forward-mode AD, float32 (autocast off), math attention and explicit LayerNorm",
            "ema": false,
            "grad_clip": false,
        }),
    )?;
    report.set("model", json!({ "config": cfg, "parameters": params, "forward_flops_per_image": flops, "train_flops_per_image": 3.0 * flops, "batch": scale.batch }))?;

    for (name, objective) in objectives() {
        let iters = if name == "mean_flow" { scale.jvp_iters } else { scale.iters };
        tracing::info!("timing the {name} training step");
        let v = with_batch_fallback(scale.batch, scale.min_batch, |b| train_step(&cfg, &objective, b, iters, device));
        report.set_in("train", name, v)?;
    }

    tracing::info!("timing forward passes and sampling");
    let net = ModelConfig::Dit(cfg.clone()).build(device)?;
    let latency = measure::guarded(|| {
        let (x, class) = inputs(&cfg, 1, device);
        let t = Tensor::rand([1], (Kind::Float, device));
        time_calls(device, 1, scale.latency_iters, || {
            let _ = tch::no_grad(|| net.net.forward(&x, &t, &t.zeros_like(), &class));
            Ok(())
        })
    });
    report.set_in("forward", "batch1", measure::outcome_json(latency))?;
    let v = with_batch_fallback(scale.batch, scale.min_batch, |b| {
        let (x, class) = inputs(&cfg, b, device);
        let t = Tensor::rand([b], (Kind::Float, device));
        time_calls(device, b, scale.iters, || {
            let _ = tch::no_grad(|| net.net.forward(&x, &t, &t.zeros_like(), &class));
            Ok(())
        })
    });
    report.set_in("forward", "batch", v)?;

    let sampler = euler_sampler()?;
    let (noise, class) = inputs(&cfg, scale.batch, device);
    let one = measure::guarded(|| {
        time_calls(device, scale.batch, scale.iters, || {
            let _ = sampler.generate(net.net.as_ref(), noise.shallow_clone(), &class, 1);
            Ok(())
        })
    });
    report.set_in("sampling", "steps1", measure::outcome_json(one))?;
    report.set_in("sampling", "steps1_counted", measure::guarded(|| counted_sampling(&sampler, net.net.as_ref(), &noise, &class, 1, device)).unwrap_or_else(|f| json!({ "error": f.message() })))?;
    let long = measure::guarded(|| counted_sampling(&sampler, net.net.as_ref(), &noise, &class, scale.long_steps, device));
    report.set_in("sampling", "long", long.unwrap_or_else(|f| json!({ "error": f.message() })))?;
    drop(net);
    let _ = flowmap_sys::cuda_empty_cache();

    match &opts.inception {
        Some(path) => {
            tracing::info!("timing Inception features ({})", path.display());
            let r = measure::guarded(|| {
                let net = Inception::load_from(path, device, Preprocess::PytorchFid)?.with_batch_size(scale.inception_batch as usize);
                let images = Tensor::rand([scale.inception_batch, 3, 256, 256], (Kind::Float, device)) * 2.0 - 1.0;
                time_calls(device, scale.inception_batch, scale.inception_iters, || {
                    let _ = net.features(&images)?;
                    Ok(())
                })
            });
            let mut v = measure::outcome_json(r);
            v["weights_file"] = json!(path.display().to_string());
            v["input"] = json!([3, 256, 256]);
            report.set("inception", v)?;
        }
        None => report.set("inception", json!({ "error": "no Inception TorchScript file given (--inception)" }))?,
    }

    tracing::info!("timing SD-VAE decodes");
    let latent = scale.latent();
    let r = measure::guarded(|| {
        let vae = Vae::random(&scale.vae, device, 0)?;
        let z = Tensor::randn([scale.vae_batch, latent[0], latent[1], latent[2]], (Kind::Float, device));
        time_calls(device, scale.vae_batch, scale.iters, || {
            let _ = vae.decode(&z);
            Ok(())
        })
    });
    let mut v = measure::outcome_json(r);
    v["latent"] = json!(latent);
    v["config"] = json!(scale.vae);
    report.set("vae_decode", v)?;
    Ok(())
}
