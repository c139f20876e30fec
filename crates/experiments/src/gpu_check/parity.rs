//! `flowmap gpu-check parity`: flowmap's DiT (the benchmarked architecture, float32) and SD-VAE
//! decoder with every weight random and non-zero, written as safetensors with fixed inputs and
//! flowmap's outputs. `python/flowmap_ref/parity.py` loads the same weights into the PyTorch
//! reference under the same names, recomputes the outputs and reports the parameter counts and the
//! largest differences: the side-by-side then provably compares one network.
//!
//! Outputs written (file `dit_io.safetensors`): `out_fused` (fused attention and LayerNorm),
//! `out_math` (the explicit math path the JVP uses), `jvp_u` / `jvp_du` (forward-mode JVP in
//! (x, t, h) along (vx, 1, 1), MeanFlow's tangent); `vae_io.safetensors`: `z` and `image`.
use super::{GpuCheckOptions, JsonReport, Scale};
use crate::run::model::named_vars;
use anyhow::{Context, Result};
use flowmap_models::{AttnPath, Dit, DitConfig, Precision, Vae};
use serde_json::json;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// Standard deviation given to the layers DiT initialises at zero (adaLN-Zero modulation, final
/// projection), so that every weight influences the output.
const ZERO_INIT_STD: f64 = 0.02;
/// Rows of the parity batch.
const PARITY_BATCH: i64 = 4;

/// A DiT with DiT's initialisation, then N(0, 0.02) in every all-zero trainable variable.
pub fn random_dit(cfg: &DitConfig, device: Device) -> Result<(nn::VarStore, Dit)> {
    let vs = nn::VarStore::new(device);
    let net = Dit::new(&vs.root(), cfg)?;
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            if v.abs().max().double_value(&[]) == 0.0 {
                let r = v.randn_like() * ZERO_INIT_STD;
                v.copy_(&r);
            }
        }
    });
    Ok((vs, net))
}

fn write(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.to_string(), t.to_device(Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, path).with_context(|| format!("writing {}", path.display()))
}

pub fn run(opts: &GpuCheckOptions, report: &mut JsonReport) -> Result<()> {
    let device = opts.device;
    // float32 without TF32: the comparison is about the network, not about rounding modes.
    if device.is_cuda() {
        flowmap_sys::set_tf32(false)?;
    }
    let scale = Scale::of(opts.quick);
    let cfg = DitConfig { precision: Precision::F32, ..scale.dit.clone() };
    tch::manual_seed(1);
    let (vs, net) = random_dit(&cfg, device)?;
    let weights = opts.work.join("dit.safetensors");
    let named = named_vars(&vs);
    write(&weights, &named.iter().map(|(k, t)| (k.as_str(), t)).collect::<Vec<_>>())?;
    let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();

    let b = PARITY_BATCH;
    let opts_f = (Kind::Float, device);
    let x = Tensor::randn([b, cfg.in_channels, cfg.input_size, cfg.input_size], opts_f);
    let t = Tensor::rand([b], opts_f);
    let h = &t * Tensor::rand([b], opts_f);
    // Every row a real class except the last, which takes the null row of the label table.
    let class = Tensor::randint(cfg.num_classes.max(1), [b], (Kind::Int64, device));
    let _ = class.get(b - 1).fill_(cfg.num_classes);
    let vx = x.randn_like();
    let (out_fused, out_math) = tch::no_grad(|| (net.forward_with(&x, &t, &h, &class, AttnPath::Fused), net.forward_with(&x, &t, &h, &class, AttnPath::Math)));
    let primals = [x.shallow_clone(), t.shallow_clone(), h.shallow_clone()];
    let tangents = [vx.shallow_clone(), t.ones_like(), t.ones_like()];
    let (u, du) = flowmap_objectives::jvp_graph_free(|p| Ok(flowmap_core::VelocityField::forward(&net, &p[0], &p[1], &p[2], &class)), &primals, &tangents)?;
    let io = opts.work.join("dit_io.safetensors");
    write(&io, &[("x", &x), ("t", &t), ("h", &h), ("class", &class), ("vx", &vx), ("out_fused", &out_fused), ("out_math", &out_math), ("jvp_u", &u), ("jvp_du", &du)])?;
    let fused_vs_math = (&out_fused - &out_math).abs().max().double_value(&[]);
    report.set(
        "dit",
        json!({
            "config": cfg,
            "parameters": params,
            "buffers": ["pos_embed"],
            "weights": weights.display().to_string(),
            "io": io.display().to_string(),
            "batch": b,
            "output_abs_max": out_fused.abs().max().double_value(&[]),
            "fused_vs_math_max_abs_diff": fused_vs_math,
            "jvp_du_abs_max": du.abs().max().double_value(&[]),
        }),
    )?;
    drop((vs, net));

    let vae = Vae::random(&scale.vae, device, 0)?;
    let vae_weights = opts.work.join("vae.safetensors");
    vae.save(&vae_weights)?;
    let latent = scale.latent();
    let z = Tensor::randn([2, latent[0], latent[1], latent[2]], opts_f);
    let image = vae.decode(&z);
    let vae_io = opts.work.join("vae_io.safetensors");
    write(&vae_io, &[("z", &z), ("image", &image)])?;
    let decoder_params: i64 = vae.named_tensors().iter().filter(|(k, _)| k.starts_with("decoder.") || k.starts_with("post_quant_conv.")).map(|(_, t)| t.numel() as i64).sum();
    report.set(
        "vae",
        json!({
            "config": scale.vae,
            "decoder_parameters": decoder_params,
            "weights": vae_weights.display().to_string(),
            "io": vae_io.display().to_string(),
            "image_abs_max": image.abs().max().double_value(&[]),
        }),
    )?;
    Ok(())
}
