//! All-reduce bandwidth of flowmap-sys' c10d process group, float32 buffers of 1 MB … 64 MB.
//!
//! ```text
//! cargo build --release -p flowmap-sys --example allreduce_bench
//! # under the venv's torchrun (scripts/setup.sh puts it in $FLOWMAP_CACHE/venv-torch-2.11.0):
//! ~/.cache/flowmap/venv-torch-2.11.0/bin/torchrun --no-python --standalone --nproc-per-node=2 \
//!     target/release/examples/allreduce_bench
//! # or with plain variables:
//! for r in 0 1; do RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 \
//!     target/release/examples/allreduce_bench & done; wait
//! ```
//!
//! Arguments: `--backend gloo|nccl` (default gloo: CPU tensors; nccl: tensors on cuda:LOCAL_RANK),
//! `--max-mb N` (default 64). Rank 0 prints, per size, the slowest rank's time per all_reduce_sum,
//! the algorithm bandwidth (bytes / time) and the bus bandwidth (algbw · 2(n−1)/n, the traffic per
//! rank of a ring all-reduce, comparable across world sizes as in nccl-tests).
//!
//! Measured on a shared 2-core CPU machine (loopback, 2 ranks, Gloo, torchrun): bus bandwidth about
//! 0.4-0.6 GB/s at 1 MB and 1.3-1.7 GB/s at 8-64 MB (64 MB in 39-44 ms); PyTorch 2.11's own
//! `torch.distributed.all_reduce` (Gloo, same sizes and iteration counts) ran at the same speed
//! within the run-to-run noise.
use flowmap_sys::dist::{Backend, DistEnv, ProcessGroup};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const MB: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let backend = match value("--backend").as_deref() {
        None | Some("gloo") => Backend::Gloo,
        Some("nccl") => Backend::Nccl,
        Some(other) => return Err(format!("--backend {other}: expected gloo or nccl").into()),
    };
    let max_mb: usize = value("--max-mb").map(|v| v.parse()).transpose()?.unwrap_or(64);
    let Some(env) = DistEnv::from_env()? else {
        return Err("no distributed job: run under torchrun or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (see the top of examples/allreduce_bench.rs)".into());
    };
    let device = match backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => Device::Cuda(env.local_rank),
    };
    let pg = ProcessGroup::init(&env, backend, Duration::from_secs(120))?;
    let n = pg.world_size();
    if pg.rank() == 0 {
        println!("all_reduce_sum, {backend:?}, {n} ranks, float32 on {device:?}, {} intra-op threads per rank", tch::get_num_threads());
        println!("{:>8} {:>12} {:>12} {:>12} {:>6}", "size", "time/iter", "algbw GB/s", "busbw GB/s", "iters");
    }
    let mut mb = 1;
    while mb <= max_mb {
        let bytes = mb * MB;
        let mut t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, device));
        // The same count on every rank (a time-based count could differ and leave a rank waiting).
        let iters = (256 / mb).clamp(5, 100);
        for _ in 0..2 {
            pg.all_reduce_sum(&mut t)?; // warm-up: buffers and connections
        }
        pg.barrier()?;
        let started = Instant::now();
        for _ in 0..iters {
            pg.all_reduce_sum(&mut t)?;
        }
        let mut per_iter = Tensor::from_slice(&[started.elapsed().as_secs_f64() / iters as f64]);
        pg.all_reduce_max(&mut per_iter)?; // the slowest rank
        let secs = per_iter.double_value(&[0]);
        let algbw = bytes as f64 / secs / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        if pg.rank() == 0 {
            println!("{:>5} MB {:>9.3} ms {:>12.3} {:>12.3} {:>6}", mb, secs * 1e3, algbw, busbw, iters);
        }
        mb *= 2;
    }
    Ok(())
}
