//! Throughput of one DiT preset: forward, forward + backward, forward with a JVP in (x, t, h), and
//! a MeanFlow-style step (JVP with graph, backward through the primal). Prints one JSON object.
//!
//! cargo run --release -p flowmap-experiments --bin bench_dit -- --preset S/2 --batch 8 --in-channels 1
use anyhow::{bail, Result};
use clap::Parser;
use flowmap_core::VelocityField;
use flowmap_models::{Dit, DitConfig, Precision};
use serde_json::json;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

#[derive(Parser)]
#[command(about = "Benchmark a DiT preset; prints JSON")]
struct Args {
    /// Preset name, e.g. S/2, B/2, XL/2.
    #[arg(long, default_value = "B/2")]
    preset: String,
    #[arg(long, default_value_t = 8)]
    batch: i64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, tf32 or bf16 (CUDA only; the CPU runs f32).
    #[arg(long, default_value = "f32")]
    precision: String,
    #[arg(long, default_value_t = 32)]
    input_size: i64,
    #[arg(long, default_value_t = 4)]
    in_channels: i64,
    #[arg(long, default_value_t = 1000)]
    num_classes: i64,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Skip the JVP + backward measurement (the slowest one).
    #[arg(long)]
    skip_jvp_backward: bool,
}

fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("device {s:?}: expected cpu, cuda or cuda:N"),
        },
    })
}

fn parse_precision(s: &str) -> Result<Precision> {
    Ok(match s {
        "f32" => Precision::F32,
        "tf32" => Precision::Tf32,
        "bf16" => Precision::Bf16,
        _ => bail!("precision {s:?}: expected f32, tf32 or bf16"),
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Seconds per call of `f`, after `warmup` untimed calls; CUDA is synchronised around the timed loop.
fn time(device: Device, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    sync(device);
    flowmap_sys::cuda_reset_peak_memory(device)?;
    for _ in 0..warmup {
        f()?;
    }
    sync(device);
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync(device);
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

fn zero_grads(vs: &nn::VarStore) {
    for v in vs.trainable_variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into())).with_writer(std::io::stderr).init();
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let precision = parse_precision(&args.precision)?;
    let cfg = DitConfig { input_size: args.input_size, in_channels: args.in_channels, num_classes: args.num_classes, precision, ..DitConfig::preset(&args.preset)? };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = Dit::new(&vs.root(), &cfg)?;
    let params: i64 = vs.trainable_variables().iter().map(|v| v.numel() as i64).sum();

    let b = args.batch;
    let opts = (Kind::Float, device);
    let x = Tensor::randn([b, cfg.in_channels, cfg.input_size, cfg.input_size], opts);
    let t = Tensor::rand([b], opts);
    let h = &t * Tensor::rand([b], opts);
    let class = Tensor::randint(cfg.num_classes + 1, [b], (Kind::Int64, device));
    let (vx, vt, vh) = (x.randn_like(), t.ones_like(), h.zeros_like());
    let (w, n) = (args.warmup, args.iters);

    // Peak CUDA memory (allocated bytes) of each measurement, None on the CPU.
    let peak = || flowmap_sys::cuda_memory(device).map(|m| m.map(|m| m.peak_allocated));
    let fwd = time(device, w, n, || {
        let _out = tch::no_grad(|| net.forward(&x, &t, &h, &class));
        Ok(())
    })?;
    let fwd_peak = peak()?;
    let fwd_bwd = time(device, w, n, || {
        let loss = net.forward(&x, &t, &h, &class).square().mean(Kind::Float);
        loss.backward();
        zero_grads(&vs);
        Ok(())
    })?;
    let fwd_bwd_peak = peak()?;
    let primals = [x.shallow_clone(), t.shallow_clone(), h.shallow_clone()];
    let tangents = [vx.shallow_clone(), vt.shallow_clone(), vh.shallow_clone()];
    let fwd_jvp = time(device, w, n, || {
        let _out = flowmap_objectives::jvp_graph_free(|p| Ok(net.forward(&p[0], &p[1], &p[2], &class)), &primals, &tangents)?;
        Ok(())
    })?;
    let fwd_jvp_peak = peak()?;
    let jvp_bwd = if args.skip_jvp_backward {
        None
    } else {
        Some(time(device, w, n, || {
            let (u, du) = flowmap_objectives::jvp(|p| Ok(net.forward(&p[0], &p[1], &p[2], &class)), &primals, &tangents)?;
            // MeanFlow: the target uses the tangent with stop-gradient; backward through u only.
            (u - du.detach()).square().mean(Kind::Float).backward();
            zero_grads(&vs);
            Ok(())
        })?)
    };
    let jvp_bwd_peak = if jvp_bwd.is_some() { peak()? } else { None };

    let img_s = |s: f64| b as f64 / s;
    let report = json!({
        "preset": args.preset,
        "input": [cfg.in_channels, cfg.input_size, cfg.input_size],
        "num_classes": cfg.num_classes,
        "trainable_parameters": params,
        "batch": b,
        "device": format!("{device:?}"),
        "device_name": match device { Device::Cuda(i) => flowmap_sys::cuda_device_name(i as i64).ok(), _ => None },
        "cpu_threads": tch::get_num_threads(),
        // Other processes share the CPU: timings under load are lower bounds of the throughput.
        "load_average_1m": std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok())),
        "torch": flowmap_sys::torch_version(),
        "precision_requested": format!("{precision:?}"),
        "precision_effective": format!("{:?}", net.precision()),
        "jvp_precision": "f32 (bf16 autocast is dropped under forward AD), math attention",
        "warmup": w,
        "iters": n,
        "forward_img_s": img_s(fwd),
        "forward_backward_img_s": img_s(fwd_bwd),
        "forward_jvp_img_s": img_s(fwd_jvp),
        "jvp_time_over_forward": fwd_jvp / fwd,
        "jvp_backward_img_s": jvp_bwd.map(img_s),
        "jvp_backward_time_over_forward_backward": jvp_bwd.map(|s| s / fwd_bwd),
        // The CUDA caching allocator's peak allocated bytes per measurement (flowmap_sys::cuda_memory); null on the CPU.
        "peak_memory_bytes": { "forward": fwd_peak, "forward_backward": fwd_bwd_peak, "forward_jvp": fwd_jvp_peak, "jvp_backward": jvp_bwd_peak },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
