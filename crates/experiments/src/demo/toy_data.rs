//! The 2-D distributions of the demo's first part: a checkerboard, two moons and a ring of eight
//! Gaussians, each scaled to about unit spread so one noise level suits all three. Draws use tch's
//! global generator (seed it first).
use serde::Serialize;
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// A 2-D data distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Toy {
    /// 8 squares of a 4×4 board on [−2, 2]², uniform inside each (FFJORD's checkerboard, halved).
    Checkerboard,
    /// Two interleaving half circles with noise 0.05 (scikit-learn's make_moons), centred.
    Moons,
    /// Eight Gaussians of std 0.1 on a circle of radius 2.
    Ring,
}

impl Toy {
    pub const ALL: [Toy; 3] = [Toy::Checkerboard, Toy::Moons, Toy::Ring];

    pub fn name(self) -> &'static str {
        match self {
            Toy::Checkerboard => "checkerboard",
            Toy::Moons => "moons",
            Toy::Ring => "ring",
        }
    }

    /// `n` points (n, 2), float32 on the CPU.
    pub fn sample(self, n: i64) -> Tensor {
        let opts = (Kind::Float, Device::Cpu);
        match self {
            Toy::Checkerboard => {
                let x = Tensor::rand([n], opts) * 4.0 - 2.0;
                // A row of the board: the cell's column parity shifts it up by one.
                let y = Tensor::rand([n], opts) - Tensor::randint(2, [n], (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) * 2.0;
                let y = y + x.floor().remainder(2.0);
                Tensor::stack(&[x, y], 1)
            }
            Toy::Moons => {
                let theta = Tensor::rand([n], opts) * PI;
                let upper = Tensor::randint(2, [n], (Kind::Int64, Device::Cpu)).to_kind(Kind::Float);
                let lower = 1.0 - &upper;
                // Upper moon: (cos θ, sin θ); lower moon: (1 − cos θ, 0.5 − sin θ).
                let x = &upper * theta.cos() + &lower * (1.0 - theta.cos());
                let y = &upper * theta.sin() + &lower * (0.5 - theta.sin());
                let points = Tensor::stack(&[x - 0.5, y - 0.25], 1) * 1.6;
                points + Tensor::randn([n, 2], opts) * 0.05 * 1.6
            }
            Toy::Ring => {
                let k = Tensor::randint(8, [n], (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) * (2.0 * PI / 8.0);
                Tensor::stack(&[k.cos() * 2.0, k.sin() * 2.0], 1) + Tensor::randn([n, 2], opts) * 0.1
            }
        }
    }
}

/// Sliced Wasserstein-1 distance between two equal-size point sets, over `directions` random unit
/// directions (sorted projections; the directions come from the global generator).
pub fn sliced_w1(a: &Tensor, b: &Tensor, directions: i64) -> f64 {
    assert_eq!(a.size(), b.size(), "sliced_w1 needs equal-size point sets");
    let dirs = Tensor::randn([a.size()[1], directions], (Kind::Float, Device::Cpu));
    let dirs = &dirs / dirs.square().sum_dim_intlist([0i64].as_slice(), true, None).sqrt();
    let (pa, _) = a.to_kind(Kind::Float).matmul(&dirs).sort(0, false);
    let (pb, _) = b.to_kind(Kind::Float).matmul(&dirs).sort(0, false);
    (pa - pb).abs().mean(None).double_value(&[])
}
