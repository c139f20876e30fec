//! ms per training step (forward + backward + AdamW) of every objective on a tiny DiT on the CPU,
//! and each one's ratio to flow matching measured in the same run.
//!
//! cargo run --release -p flowmap-objectives --example objective_bench [-- steps]
use flowmap_core::VelocityField;
use flowmap_models::{DitConfig, Variance};
use flowmap_objectives::*;
use std::time::Instant;
use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

const CLASSES: i64 = 10;
const BATCH: i64 = 64;
const WARMUP: usize = 3;

fn dit(variance: Variance, guidance_conditioning: bool) -> DitConfig {
    DitConfig { in_channels: 4, input_size: 16, num_classes: CLASSES, variance, guidance_conditioning, ..DitConfig::arch(2, 64, 4, 2) }
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(15);
    tch::set_num_threads(1);
    println!(
        "tiny DiT: depth 2, width 64, 4 heads, patch 2, 4x16x16 input (64 tokens), batch {BATCH}, CPU, 1 thread; \
         {steps} rounds after {WARMUP} warm-up, one step per objective per round (round-robin, so machine load hits all alike); median ms"
    );
    struct Entry {
        name: &'static str,
        objective: Box<dyn Objective>,
        step: u64,
        nets: [(VarStore, flowmap_models::Dit); 3],
        opt: nn::Optimizer,
        times: Vec<f64>,
        failure: Option<String>,
        /// The objective's own parameters (AMED's predictor), kept alive beside it.
        _params: VarStore,
    }
    let mut entries = vec![];
    for Variant { name, config: cfg, step, learned_variance, guidance_input } in every_objective() {
        let variance = if learned_variance { Variance::Learned } else { Variance::Fixed };
        tch::manual_seed(0);
        let make = || -> anyhow::Result<(VarStore, flowmap_models::Dit)> {
            let vs = VarStore::new(Device::Cpu);
            let net = dit(variance, guidance_input).init(vs.root())?;
            Ok((vs, net))
        };
        let nets = [make()?, make()?, make()?];
        let opt = nn::AdamW::default().build(&nets[0].0, 1e-4)?;
        let mut objective = cfg.build_for_batch(BATCH)?;
        let params = VarStore::new(Device::Cpu);
        objective.init_params(&params.root())?;
        entries.push(Entry { name, objective, step, nets, opt, times: vec![], failure: None, _params: params });
    }
    for round in 0..WARMUP + steps {
        for e in entries.iter_mut().filter(|e| e.failure.is_none()) {
            tch::manual_seed(round as i64);
            let x = Tensor::randn([BATCH, 4, 16, 16], (Kind::Float, Device::Cpu));
            let class = Tensor::randint(CLASSES, [BATCH], (Kind::Int64, Device::Cpu));
            let batch = Batch::coupled(x.shallow_clone(), class, x.randn_like());
            let start = Instant::now();
            let nets = Nets { online: &e.nets[0].1 as &dyn VelocityField, ema: &e.nets[1].1, teacher: Some(&e.nets[2].1) };
            let loss = e.objective.loss(nets, &batch, e.step);
            e.opt.zero_grad();
            if let Err(err) = loss.value.f_backward() {
                e.failure = Some(err.to_string().lines().next().unwrap_or_default().chars().take(110).collect());
                continue;
            }
            e.opt.step();
            if round >= WARMUP {
                e.times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |t: &mut Vec<f64>| {
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        t[t.len() / 2]
    };
    let fm = median(&mut entries[0].times.clone());
    for e in entries.iter_mut() {
        match &e.failure {
            Some(err) => println!("{:34} backward failed: {err}", e.name),
            None => {
                let m = median(&mut e.times);
                println!("{:38} {m:8.1} ms/step   {:5.2}x flow matching", e.name, m / fm);
            }
        }
    }
    Ok(())
}
