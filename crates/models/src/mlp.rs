//! A small MLP F(x_t, t, h, class) on flat data (B, D), for fast tests and 2-D toy sets.
//! e = emb_t(t) + emb_h(h) + table\[class\]; z = Linear(x) + e; `depth` × (SiLU ∘ Linear); Linear out.
use crate::embedding::{timestep_embedding, HEmbedding, NoParams, MAX_PERIOD};
use anyhow::{ensure, Result};
use flowmap_core::VelocityField;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;

/// Features of a time-like scalar (t or a continuous h).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TimeEmbedding {
    /// DiT's [cos, sin] features of scale·s.
    Sinusoidal(SinusoidalTime),
    /// s itself as one feature.
    Linear(NoParams),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinusoidalTime {
    pub features: i64, // even; default 64
    /// s is multiplied by this first; default 1000, so periods from 2π to 2π·10⁴ cover t ∈ [0, 1]
    pub scale: f64,
}

impl Default for SinusoidalTime {
    fn default() -> Self {
        Self { features: 64, scale: 1000.0 }
    }
}

impl Default for TimeEmbedding {
    fn default() -> Self {
        TimeEmbedding::Sinusoidal(SinusoidalTime::default())
    }
}

impl TimeEmbedding {
    fn features(&self) -> i64 {
        match self {
            TimeEmbedding::Sinusoidal(s) => s.features,
            TimeEmbedding::Linear(_) => 1,
        }
    }
    /// s (B,) -> (B, features).
    fn embed(&self, s: &Tensor) -> Tensor {
        match self {
            TimeEmbedding::Sinusoidal(cfg) => timestep_embedding(&(s * cfg.scale), cfg.features, MAX_PERIOD),
            TimeEmbedding::Linear(_) => s.unsqueeze(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// D of the data (2 for toy sets); required
    pub dim: i64,
    /// hidden units per layer; default 256
    #[serde(default = "default_width")]
    pub width: i64,
    /// hidden SiLU layers; default 3
    #[serde(default = "default_depth")]
    pub depth: i64,
    /// K; the table has K + 1 rows, row K = null; default 0 (unconditional)
    #[serde(default)]
    pub num_classes: i64,
    /// of t and of a continuous h; default sinusoidal, 64 features, scale 1000
    #[serde(default)]
    pub time_embedding: TimeEmbedding,
    /// continuous | log2_level | none; default continuous
    #[serde(default = "default_h_embedding")]
    pub h_embedding: HEmbedding,
}

fn default_width() -> i64 {
    256
}
fn default_depth() -> i64 {
    3
}
fn default_h_embedding() -> HEmbedding {
    HEmbedding::Continuous
}

impl MlpConfig {
    /// Defaults for `dim`-dimensional data.
    pub fn new(dim: i64) -> Self {
        Self { dim, width: default_width(), depth: default_depth(), num_classes: 0, time_embedding: TimeEmbedding::default(), h_embedding: default_h_embedding() }
    }

    pub fn init(&self, path: nn::Path) -> Result<Mlp> {
        Mlp::new(&path, self)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.dim >= 1 && self.width >= 1 && self.depth >= 1 && self.num_classes >= 0, "mlp: dim, width, depth must be positive: {self:?}");
        if let TimeEmbedding::Sinusoidal(s) = &self.time_embedding {
            ensure!(s.features >= 2 && s.features % 2 == 0, "mlp: sinusoidal features must be even, got {}", s.features);
            ensure!(s.scale.is_finite(), "mlp: sinusoidal scale must be finite, got {}", s.scale);
        }
        Ok(())
    }
}

/// PyTorch's `nn.Linear` default init, U(±1/√fan_in) for weight and bias (tch's default weight
/// init is Kaiming with the ReLU gain instead).
fn torch_default_linear(path: nn::Path, fan_in: i64, fan_out: i64) -> nn::Linear {
    let b = 1.0 / (fan_in as f64).sqrt();
    let init = nn::Init::Uniform { lo: -b, up: b };
    nn::linear(path, fan_in, fan_out, nn::LinearConfig { ws_init: init, bs_init: Some(init), bias: true })
}

/// The small MLP; the output layer starts at 0, so a fresh net predicts F = 0 (as the DiT does).
#[derive(Debug)]
pub struct Mlp {
    cfg: MlpConfig,
    x_in: nn::Linear,
    t_in: nn::Linear,
    h_in: Option<nn::Linear>,
    y_table: Tensor, // (K + 1, width)
    layers: Vec<nn::Linear>,
    out: nn::Linear,
}

impl Mlp {
    pub fn new(path: &nn::Path, cfg: &MlpConfig) -> Result<Self> {
        cfg.validate()?;
        let (w, f) = (cfg.width, cfg.time_embedding.features());
        let x_in = torch_default_linear(path / "x_in", cfg.dim, w);
        let t_in = torch_default_linear(path / "t_in", f, w);
        let h_in = (cfg.h_embedding != HEmbedding::None).then(|| torch_default_linear(path / "h_in", f, w));
        // nn.Embedding's default N(0, 1): the same scale as the other summands of e.
        let y_table = path.var("y_table", &[cfg.num_classes + 1, w], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
        let layers = (0..cfg.depth).map(|i| torch_default_linear(path / "layers" / i, w, w)).collect();
        let zero = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
        let out = nn::linear(path / "out", w, cfg.dim, zero);
        Ok(Self { cfg: cfg.clone(), x_in, t_in, h_in, y_table, layers, out })
    }

    pub fn config(&self) -> &MlpConfig {
        &self.cfg
    }
}

impl VelocityField for Mlp {
    /// x_t (B, D); t, h (B,); class (B,) Int64 -> (B, D).
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        let emb = &self.cfg.time_embedding;
        let mut z = self.x_in.forward(x_t) + self.t_in.forward(&emb.embed(t)) + Tensor::embedding(&self.y_table, class, -1, false, false); // (B, W)
        if let Some(h_in) = &self.h_in {
            // A continuous h uses the same features as t; t_scale belongs to the sinusoid config here.
            let s = self.cfg.h_embedding.input(h, 1.0).expect("h embedder exists only when h is embedded"); // (B,)
            z = z + h_in.forward(&emb.embed(&s)); // (B, W)
        }
        for layer in &self.layers {
            z = layer.forward(&z.silu()); // (B, W)
        }
        self.out.forward(&z.silu()) // (B, D)
    }

    fn null_class(&self) -> i64 {
        self.cfg.num_classes
    }
}
