//! Encode / decode throughput of the full sd-vae-ft-mse AutoencoderKL (random weights; the speed
//! does not depend on them) on 256×256 images.
//!
//!     cargo run --release -p flowmap-models --example vae_bench -- [--batch 4] [--reps 3] [--size 256] [--threads N] [--cuda]
//!
//! Prints img/s for `encode_moments` and `decode`, best and median over `reps` timed batches after
//! one warm-up batch each.
use flowmap_models::{Vae, VaeConfig};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|v| v.parse().unwrap_or_else(|_| panic!("bad value for {name}: {v}"))).unwrap_or(default)
}

/// (best, median) of the timings: on a shared CPU the best is the less contended figure.
fn best_median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batch: i64 = arg(&args, "--batch", 4);
    let reps: usize = arg(&args, "--reps", 3);
    let size: i64 = arg(&args, "--size", 256);
    let threads: i32 = arg(&args, "--threads", tch::get_num_threads());
    let device = if args.iter().any(|a| a == "--cuda") { Device::Cuda(0) } else { Device::Cpu };
    tch::set_num_threads(threads);

    let cfg = VaeConfig::sd_vae_ft_mse();
    let vae = Vae::random(&cfg, device, 0)?;
    let x = Tensor::rand([batch, 3, size, size], (Kind::Float, device)) * 2.0 - 1.0;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let time = |f: &dyn Fn() -> Tensor| {
        let _ = f(); // warm-up: allocator, oneDNN / cuDNN algorithm choice
        sync();
        best_median(
            (0..reps)
                .map(|_| {
                    let t0 = Instant::now();
                    let _ = f();
                    sync();
                    t0.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let (mean, _) = vae.encode_moments(&x);
    let enc = time(&|| vae.encode_moments(&x).0);
    let dec = time(&|| vae.decode(&mean));
    let where_ = if device == Device::Cpu { format!("CPU, {threads} threads") } else { format!("{device:?}") };
    println!("sd-vae-ft-mse {size}x{size}, batch {batch}, {where_}, {reps} timed batches:");
    for (what, (best, med)) in [("encode", enc), ("decode", dec)] {
        println!("  {what}: {:.3} img/s best, {:.3} img/s median ({best:.2} / {med:.2} s per batch)", batch as f64 / best, batch as f64 / med);
    }
    Ok(())
}
