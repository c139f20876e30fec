//! The demo's 2-D part: flow matching, Shortcut, MeanFlow and consistency training on the
//! distributions of [`super::toy_data`], each an MLP trained with the same budget, sampled at
//! 1, 2, 4 and 16 steps with the objective's own sampler, and scored by sliced Wasserstein-1 to
//! held-out data over several training seeds.
use super::toy_data::{sliced_w1, Toy};
use crate::eval::sampling::{Sampler, SamplingConfig};
use anyhow::{Context, Result};
use flowmap_core::{Ema, VelocityField};
use flowmap_models::{Mlp, MlpConfig, SinusoidalTime, TimeEmbedding};
use flowmap_objectives::{Batch, Nets, ObjectiveConfig};
use serde::Serialize;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// One objective of the comparison.
#[derive(Debug, Clone)]
pub struct ToyMethod {
    pub label: &'static str,
    pub objective: ObjectiveConfig,
}

/// Flow matching (Euler), Shortcut (paper settings), MeanFlow (uniform (t, r), 25 % r = t) and
/// consistency training (doubling curriculum, the online network as its target): every one-step
/// objective that needs no teacher.
pub fn methods(train_steps: u64) -> Result<Vec<ToyMethod>> {
    let parse = |text: &str| toml::from_str::<ObjectiveConfig>(text).with_context(|| format!("demo objective: {text}"));
    Ok(vec![
        ToyMethod { label: "flow matching", objective: parse("kind = \"flow_matching\"\nlabel_dropout = 0.0")? },
        ToyMethod { label: "Shortcut", objective: parse("kind = \"shortcut\"\npreset = \"paper\"\nlabel_dropout = 0.0")? },
        ToyMethod { label: "MeanFlow", objective: parse("kind = \"mean_flow\"\nlabel_dropout = 0.0\n[times]\nequal_fraction = 0.25\n[times.times]\nkind = \"uniform\"")? },
        ToyMethod {
            label: "consistency training",
            objective: parse(&format!("kind = \"consistency_training\"\nlabel_dropout = 0.0\n[grid.spacing]\nkind = \"uniform\"\n[grid.schedule]\nkind = \"doubling\"\nstages = 6\ntotal_steps = {train_steps}"))?,
        },
    ])
}

/// The budget of one (distribution, method, seed) run.
#[derive(Debug, Clone, Serialize)]
pub struct ToySettings {
    pub train_steps: u64,
    pub batch: i64,
    pub width: i64,
    pub depth: i64,
    pub lr: f64,
    /// EMA decay of the weights that sample.
    pub ema: f64,
    /// Training seeds per (distribution, method).
    pub seeds: u64,
    /// Samples scored per cell (and held-out data points).
    pub eval_points: i64,
    pub step_counts: Vec<usize>,
}

impl Default for ToySettings {
    fn default() -> Self {
        Self { train_steps: 1000, batch: 256, width: 128, depth: 3, lr: 2e-3, ema: 0.99, seeds: 3, eval_points: 2048, step_counts: vec![1, 2, 4, 16] }
    }
}

/// Sliced W1 of one cell: (distribution, method, seed, steps).
#[derive(Debug, Clone, Serialize)]
pub struct ToyScore {
    pub toy: Toy,
    pub method: String,
    pub seed: u64,
    pub steps: usize,
    pub sliced_w1: f64,
}

/// The samples of one trained model at every step count (seed 0's, for the figure).
pub struct ToySamples {
    pub toy: Toy,
    pub method: String,
    /// (steps, (n, 2) points)
    pub by_steps: Vec<(usize, Tensor)>,
}

/// Trains an MLP on `toy` with `method` for `settings.train_steps` steps (seeded by `seed`) and
/// returns the network on the EMA of its weights (decay `settings.ema`, with warm-up), which the samples use.
pub fn train(toy: Toy, method: &ToyMethod, settings: &ToySettings, seed: u64) -> Result<Mlp> {
    // Smooth in t and h: MeanFlow differentiates the net along t (scale 1000 makes du/dt rough).
    let mlp = MlpConfig { width: settings.width, depth: settings.depth, time_embedding: TimeEmbedding::Sinusoidal(SinusoidalTime { features: 64, scale: 30.0 }), ..MlpConfig::new(2) };
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp.init(vs.root())?;
    let shadow = nn::VarStore::new(Device::Cpu);
    let ema_net = mlp.init(shadow.root())?;
    let mut ema = Ema::with_shadow(shadow, &vs, settings.ema, true)?;
    let objective = method.objective.build_for_batch(settings.batch)?;
    let mut opt = nn::AdamW::default().build(&vs, settings.lr)?;
    opt.set_weight_decay(0.0);
    let classes = Tensor::zeros([settings.batch], (Kind::Int64, Device::Cpu));
    for step in 0..settings.train_steps {
        tch::manual_seed((seed * 1_000_003 + step) as i64);
        let batch = Batch::new(toy.sample(settings.batch), classes.shallow_clone());
        // Consistency training's target network is the online one (EMA decay 0, as in iCT).
        let loss = objective.loss(Nets { online: &net, ema: &net, teacher: None }, &batch, step);
        opt.backward_step(&loss.value);
        ema.update(&vs);
    }
    // `ema_net` reads the shadow variables the EMA updated in place.
    Ok(ema_net)
}

/// `n` samples of `net` with `steps` steps of `sampler` (noise from the global generator).
pub fn sample(sampler: &Sampler, net: &dyn VelocityField, n: i64, steps: usize) -> Tensor {
    let noise = Tensor::randn([n, 2], (Kind::Float, Device::Cpu));
    let class = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
    sampler.generate(net, noise, &class, steps)
}

/// Every (distribution, method, seed, steps) score, the held-out data's own score (method
/// "held-out data", steps 0: the noise floor of the metric), and seed 0's samples for the figure.
pub fn run(toys: &[Toy], settings: &ToySettings, mut progress: impl FnMut(&str)) -> Result<(Vec<ToyScore>, Vec<ToySamples>)> {
    let methods = methods(settings.train_steps)?;
    let mut scores = Vec::new();
    let mut figures = Vec::new();
    for &toy in toys {
        // Held-out data: a stream no training step draws from.
        tch::manual_seed(-1 - toy as i64);
        let (held_out, second) = (toy.sample(settings.eval_points), toy.sample(settings.eval_points));
        scores.push(ToyScore { toy, method: "held-out data".into(), seed: 0, steps: 0, sliced_w1: sliced_w1(&second, &held_out, 128) });
        for method in &methods {
            let sampler = toml::from_str::<SamplingConfig>("")?.resolve(&method.objective)?;
            for seed in 0..settings.seeds {
                let t0 = std::time::Instant::now();
                let net = train(toy, method, settings, seed)?;
                let mut by_steps = Vec::new();
                for &steps in &settings.step_counts {
                    tch::manual_seed(1_000 + seed as i64);
                    let x = tch::no_grad(|| sample(&sampler, &net, settings.eval_points, steps));
                    scores.push(ToyScore { toy, method: method.label.into(), seed, steps, sliced_w1: sliced_w1(&x, &held_out, 128) });
                    by_steps.push((steps, x));
                }
                progress(&format!("{} / {} / seed {seed}: {:.1} s", toy.name(), method.label, t0.elapsed().as_secs_f64()));
                if seed == 0 {
                    figures.push(ToySamples { toy, method: method.label.into(), by_steps });
                }
            }
        }
    }
    Ok((scores, figures))
}

/// Mean and sample standard deviation over seeds of one (distribution, method, steps) cell.
pub fn cell(scores: &[ToyScore], toy: Toy, method: &str, steps: usize) -> Option<(f64, f64)> {
    let v: Vec<f64> = scores.iter().filter(|s| s.toy == toy && s.method == method && s.steps == steps).map(|s| s.sliced_w1).collect();
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    Some((mean, var.sqrt()))
}

/// The table: one row per method, a column per (distribution, steps), mean ± std over seeds.
pub fn markdown(scores: &[ToyScore], toys: &[Toy], settings: &ToySettings) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Sliced Wasserstein-1 to {} held-out points (lower is better), mean ± std over {} training seeds; MLP {}×{}, {} steps of batch {}, AdamW lr {}, EMA {}.\n",
        settings.eval_points, settings.seeds, settings.depth, settings.width, settings.train_steps, settings.batch, settings.lr, settings.ema
    );
    for &toy in toys {
        let _ = write!(s, "**{}** (held-out data vs itself: {:.3})\n\n| method |", toy.name(), cell(scores, toy, "held-out data", 0).map_or(f64::NAN, |c| c.0));
        for st in &settings.step_counts {
            let _ = write!(s, " {st} step{} |", if *st == 1 { "" } else { "s" });
        }
        let _ = writeln!(s, "\n|---|{}", "---|".repeat(settings.step_counts.len()));
        let mut labels: Vec<&str> = Vec::new();
        for sc in scores.iter().filter(|sc| sc.toy == toy && sc.steps > 0) {
            if !labels.contains(&sc.method.as_str()) {
                labels.push(&sc.method);
            }
        }
        for label in labels {
            let _ = write!(s, "| {label} |");
            for &st in &settings.step_counts {
                match cell(scores, toy, label, st) {
                    Some((m, sd)) => {
                        let _ = write!(s, " {m:.3} ± {sd:.3} |");
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s
}
