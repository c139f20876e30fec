//! The DiT backbone (Peebles and Xie, arXiv 2212.09748; facebookresearch/DiT `models.py`) with a
//! second timestep embedder for h = t − r (MeanFlow `models_dit.py`, Shortcut `model.py`) and the
//! Shortcut code's quirks as named options (methods.md §15). Shapes: B batch, C input channels,
//! H = W input size, p patch, T = (H/p)² tokens, D width, NH heads, d = D/NH head dim.
use crate::embedding::{timestep_embedding, HEmbedding, MAX_PERIOD, TIMESTEP_FREQUENCIES};
use crate::precision::Precision;
use anyhow::{ensure, Result};
use flowmap_core::{GuidanceInput, VelocityField};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// LayerNorm epsilon, no affine parameters (DiT `nn.LayerNorm(..., elementwise_affine=False, eps=1e-6)`).
const LN_EPS: f64 = 1e-6;
/// Std of the label table and the timestep-MLP weights (DiT `initialize_weights`).
const EMBED_INIT_STD: f64 = 0.02;

/// Scale of the attention logits q·k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnScale {
    /// 1/√d, standard (DiT, MeanFlow).
    #[default]
    InvSqrtHeadDim,
    /// 1/d: the Shortcut code divides q by its last dimension (`model.py`); for exact reproduction.
    InvHeadDim,
}

impl AttnScale {
    pub fn value(self, head_dim: i64) -> f64 {
        match self {
            AttnScale::InvSqrtHeadDim => 1.0 / (head_dim as f64).sqrt(),
            AttnScale::InvHeadDim => 1.0 / head_dim as f64,
        }
    }
}

/// What the output channels hold besides the field itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// C output channels: the field (velocity, average velocity or eps); any variance is fixed by
    /// the objective.
    #[default]
    Fixed,
    /// 2C output channels: [field, variance interpolation], DiT's `learn_sigma` for the DDPM
    /// baseline. The objective splits the channels.
    Learned,
}

/// A DiT's architecture and options. In TOML: `preset = "B/2"` plus any explicit field, which
/// overrides the preset (parsed through [`crate::presets::DitSpec`], which denies unknown keys).
/// Serialises fully resolved, without `preset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "crate::presets::DitSpec", deny_unknown_fields)]
pub struct DitConfig {
    /// transformer blocks (S/B: 12, L: 24, XL: 28)
    pub depth: i64,
    /// token width D, divisible by num_heads and by 4 (position table)
    pub hidden_size: i64,
    /// attention heads; head dim d = D / num_heads
    pub num_heads: i64,
    /// p; T = (input_size / p)² tokens
    pub patch_size: i64,
    /// MLP hidden width = mlp_ratio·D; default 4
    pub mlp_ratio: f64,
    /// C: 4 for SD-VAE latents, 1 or 3 for pixels; default 4
    pub in_channels: i64,
    /// H = W of the input, divisible by p; default 32 (256² through the VAE)
    pub input_size: i64,
    /// K; the label table has K + 1 rows, row K = null; 0 = unconditional; default 1000
    pub num_classes: i64,
    /// continuous | log2_level | none; default continuous
    pub h_embedding: HEmbedding,
    /// inv_sqrt_head_dim | inv_head_dim (Shortcut); default inv_sqrt_head_dim
    pub attn_scale: AttnScale,
    /// t and a continuous h are multiplied by this before the sinusoid; default 1 (raw t, Shortcut/MeanFlow); 1000 = DiT's step index
    pub t_scale: f64,
    /// fixed (C out channels) | learned (2C, DiT learn_sigma); default fixed
    pub variance: Variance,
    /// f32 | tf32 | bf16 (CUDA only; CPU runs f32); default f32
    pub precision: Precision,
    /// Improved MeanFlow's guidance conditioning (arXiv 2512.02012, `imfDiT.py`): three more
    /// timestep embedders for 1 − 1/ω, t_min and t_max of the CFG scale ω and interval, added to
    /// the adaLN conditioning (the official model prepends them as in-context tokens instead).
    /// Plain `forward` then means ω = 1 on [0, 1]. Default false.
    pub guidance_conditioning: bool,
}

impl DitConfig {
    /// Builds the model under `path` (`cfg.init(vs.root())`).
    pub fn init(&self, path: nn::Path) -> Result<Dit> {
        Dit::new(&path, self)
    }

    pub fn validate(&self) -> Result<()> {
        let (d, nh, p) = (self.hidden_size, self.num_heads, self.patch_size);
        ensure!(self.depth >= 1 && d >= 4 && nh >= 1 && p >= 1, "dit: depth, hidden_size, num_heads, patch_size must be positive: {self:?}");
        ensure!(d % nh == 0, "dit: hidden_size {d} is not divisible by num_heads {nh}");
        ensure!(d % 4 == 0, "dit: hidden_size {d} must be divisible by 4 (2-D sin-cos position table)");
        ensure!(self.input_size >= p && self.input_size % p == 0, "dit: input_size {} must be a positive multiple of patch_size {p}", self.input_size);
        ensure!(self.in_channels >= 1 && self.num_classes >= 0, "dit: in_channels >= 1 and num_classes >= 0 required");
        ensure!(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.t_scale.is_finite() && self.t_scale > 0.0, "dit: mlp_ratio ({}) and t_scale ({}) must be finite and > 0", self.mlp_ratio, self.t_scale);
        Ok(())
    }

    pub fn tokens(&self) -> i64 {
        (self.input_size / self.patch_size).pow(2)
    }
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }
    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64 // DiT: int(hidden_size * mlp_ratio)
    }
    pub fn out_channels(&self) -> i64 {
        match self.variance {
            Variance::Fixed => self.in_channels,
            Variance::Learned => 2 * self.in_channels,
        }
    }

    /// Trainable parameters, from the architecture alone (the frozen position table excluded).
    /// Pinned against the VarStore count in the tests.
    pub fn num_parameters(&self) -> i64 {
        let (d, p, m) = (self.hidden_size, self.patch_size, self.mlp_hidden());
        let linear = |i: i64, o: i64| i * o + o;
        let patch = linear(self.in_channels * p * p, d);
        let t_mlp = linear(TIMESTEP_FREQUENCIES, d) + linear(d, d);
        let h_mlp = if self.h_embedding == HEmbedding::None { 0 } else { t_mlp };
        let guidance_mlps = if self.guidance_conditioning { 3 * t_mlp } else { 0 };
        let labels = (self.num_classes + 1) * d;
        let block = linear(d, 3 * d) + linear(d, d) + linear(d, m) + linear(m, d) + linear(d, 6 * d);
        let last = linear(d, 2 * d) + linear(d, p * p * self.out_channels());
        patch + t_mlp + h_mlp + guidance_mlps + labels + self.depth * block + last
    }
}

/// Which kernels run for attention and LayerNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnPath {
    /// libtorch's `scaled_dot_product_attention` (flash / memory-efficient / cuDNN / CPU flash)
    /// and `layer_norm`.
    Fused,
    /// Explicit matmul + softmax and an explicit LayerNorm, written so that their forward
    /// derivatives are themselves reverse-differentiable: fused SDPA has no forward derivative
    /// (toolchain.md), and libtorch's `layer_norm` and `softmax` forward-AD formulas break
    /// reverse-over-forward (softmax raises an in-place error; layer_norm silently gives a wrong
    /// gradient, 37 % off in a float64 check), which MeanFlow's full second-order loss needs.
    Math,
}

impl AttnPath {
    /// Math while a forward-AD level is entered (tangents may flow), fused otherwise.
    pub fn auto() -> Self {
        if flowmap_sys::forward_ad_active() {
            AttnPath::Math
        } else {
            AttnPath::Fused
        }
    }
}

/// softmax(q·kᵀ·scale)·v. q, k, v: (B, NH, T, d); returns (B, NH, T, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, path: AttnPath) -> Tensor {
    match path {
        AttnPath::Fused => Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, scale, false),
        AttnPath::Math => {
            let logits = q.matmul(&k.transpose(-2, -1)) * scale; // (B, NH, T, T)
                                                                 // Softmax written out of place: libtorch's `softmax` forward-AD formula is not
                                                                 // differentiable in reverse mode ("output 0 of ExpBackward0 ... modified by an inplace
                                                                 // operation"), and MeanFlow back-propagates through the tangent. The max shift only
                                                                 // guards exp against overflow; softmax is invariant to it, so it is detached.
            let e = (&logits - logits.amax([-1], true).detach()).exp(); // (B, NH, T, T)
            let probs = &e / e.sum_dim_intlist(&[-1i64][..], true, None::<Kind>); // (B, NH, T, T)
            probs.matmul(v) // (B, NH, T, d)
        }
    }
}

/// Linear with Xavier-uniform weight and zero bias (DiT `_basic_init`).
fn xavier_linear(path: nn::Path, fan_in: i64, fan_out: i64) -> nn::Linear {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let cfg = nn::LinearConfig { ws_init: nn::Init::Uniform { lo: -bound, up: bound }, bs_init: Some(nn::Init::Const(0.0)), bias: true };
    nn::linear(path, fan_in, fan_out, cfg)
}

/// Linear with weight and bias 0 (adaLN-Zero modulation and the final projection).
fn zero_linear(path: nn::Path, fan_in: i64, fan_out: i64) -> nn::Linear {
    let cfg = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
    nn::linear(path, fan_in, fan_out, cfg)
}

/// x·(1 + scale) + shift; x (B, T, D), shift and scale (B, D).
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1) // (B, T, D)
}

/// LayerNorm over the last dimension without affine parameters; x (B, T, D) -> (B, T, D).
fn layer_norm(x: &Tensor, path: AttnPath) -> Tensor {
    let d = *x.size().last().expect("layer_norm of a scalar");
    match path {
        AttnPath::Fused => x.layer_norm([d], None::<Tensor>, None::<Tensor>, LN_EPS, true),
        AttnPath::Math => {
            let last = &[-1i64][..];
            let centred = x - x.mean_dim(last, true, None::<Kind>); // (B, T, D)
            let var = centred.square().mean_dim(last, true, None::<Kind>); // (B, T, 1), biased like LayerNorm
            centred * (var + LN_EPS).rsqrt() // (B, T, D)
        }
    }
}

/// Fixed 2-D sin-cos position table, (T, D) as f64 values in row-major token order
/// (DiT `get_2d_sincos_pos_embed`): token (i, j) gets [1-D(D/2, j), 1-D(D/2, i)], and the 1-D
/// embedding of position x is [sin(x·ω_k), cos(x·ω_k)] with ω_k = 10000^(−k/(D/4)), k < D/4.
pub fn sincos_pos_table(dim: i64, grid: i64) -> Vec<f64> {
    let quarter = (dim / 4) as usize;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10_000f64.powf(k as f64 / quarter as f64)).collect();
    let one_d = |pos: f64, out: &mut Vec<f64>| {
        out.extend(omega.iter().map(|w| (pos * w).sin()));
        out.extend(omega.iter().map(|w| (pos * w).cos()));
    };
    let mut table = Vec::with_capacity((grid * grid * dim) as usize);
    for i in 0..grid {
        for j in 0..grid {
            // numpy meshgrid(grid_w, grid_h)[0] is the column index, and it comes first.
            one_d(j as f64, &mut table);
            one_d(i as f64, &mut table);
        }
    }
    table
}

/// Sinusoid of a scalar, then Linear(256, D) → SiLU → Linear(D, D), weights N(0, 0.02), biases 0.
#[derive(Debug)]
struct TimestepEmbedder {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl TimestepEmbedder {
    fn new(path: nn::Path, d: i64) -> Self {
        let cfg = nn::LinearConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: EMBED_INIT_STD }, bs_init: Some(nn::Init::Const(0.0)), bias: true };
        // DiT names: t_embedder.mlp.0 / mlp.2 (mlp.1 is the SiLU).
        let fc1 = nn::linear(&path / "mlp" / 0, TIMESTEP_FREQUENCIES, d, cfg);
        let fc2 = nn::linear(&path / "mlp" / 2, d, d, cfg);
        Self { fc1, fc2 }
    }

    /// s (B,) -> (B, D).
    fn forward(&self, s: &Tensor) -> Tensor {
        let freq = timestep_embedding(s, TIMESTEP_FREQUENCIES, MAX_PERIOD); // (B, 256)
        self.fc2.forward(&self.fc1.forward(&freq).silu()) // (B, D)
    }
}

/// One adaLN-Zero block: attention and MLP, each gated by a conditioning-dependent scalar per channel.
#[derive(Debug)]
struct Block {
    qkv: nn::Linear,
    proj: nn::Linear,
    fc1: nn::Linear,
    fc2: nn::Linear,
    ada_ln: nn::Linear,
    num_heads: i64,
    scale: f64,
}

impl Block {
    fn new(path: nn::Path, cfg: &DitConfig) -> Self {
        let (d, m) = (cfg.hidden_size, cfg.mlp_hidden());
        // Names follow DiT's state dict (blocks.i.attn.qkv, ..., blocks.i.adaLN_modulation.1).
        Self {
            qkv: xavier_linear(&path / "attn" / "qkv", d, 3 * d),
            proj: xavier_linear(&path / "attn" / "proj", d, d),
            fc1: xavier_linear(&path / "mlp" / "fc1", d, m),
            fc2: xavier_linear(&path / "mlp" / "fc2", m, d),
            ada_ln: zero_linear(&path / "adaLN_modulation" / 1, d, 6 * d),
            num_heads: cfg.num_heads,
            scale: cfg.attn_scale.value(cfg.head_dim()),
        }
    }

    /// x (B, T, D), c_act = SiLU(c) (B, D) -> (B, T, D).
    fn forward(&self, x: &Tensor, c_act: &Tensor, path: AttnPath) -> Tensor {
        let m = self.ada_ln.forward(c_act).chunk(6, 1); // 6 × (B, D)
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let a = self.attention(&modulate(&layer_norm(x, path), shift_msa, scale_msa), path); // (B, T, D)
        let x = x + gate_msa.unsqueeze(1) * a; // (B, T, D)
        let f = self.fc2.forward(&self.fc1.forward(&modulate(&layer_norm(&x, path), shift_mlp, scale_mlp)).gelu("tanh")); // (B, T, D)
        &x + gate_mlp.unsqueeze(1) * f // (B, T, D)
    }

    /// Multi-head self-attention, one qkv projection (timm `Attention`). x (B, T, D) -> (B, T, D).
    fn attention(&self, x: &Tensor, path: AttnPath) -> Tensor {
        let (b, t, d) = x.size3().expect("attention input must be (B, T, D)");
        let qkv = self.qkv.forward(x).reshape([b, t, 3, self.num_heads, d / self.num_heads]).permute([2, 0, 3, 1, 4]); // (3, B, NH, T, d)
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2)); // (B, NH, T, d)
        let o = attention(&q, &k, &v, self.scale, path); // (B, NH, T, d)
        self.proj.forward(&o.transpose(1, 2).reshape([b, t, d])) // (B, T, D)
    }
}

/// A DiT F(x_t, t, h, class). Built with [`Dit::new`] or [`DitConfig::init`].
#[derive(Debug)]
pub struct Dit {
    cfg: DitConfig,
    precision: Precision, // what runs on this device (bf16 requested on the CPU runs f32)
    x_embedder: nn::Conv2D,
    pos_embed: Tensor, // (1, T, D), frozen
    t_embedder: TimestepEmbedder,
    h_embedder: Option<TimestepEmbedder>,
    /// 1 − 1/ω, t_min, t_max embedders (`guidance_conditioning`)
    guidance_embedders: Option<[TimestepEmbedder; 3]>,
    y_table: Tensor, // (K + 1, D)
    blocks: Vec<Block>,
    final_ada_ln: nn::Linear,
    final_linear: nn::Linear,
}

impl Dit {
    /// Creates the variables under `path` with DiT's initialisation (methods.md §15.3): the output
    /// is exactly 0 until the zero-initialised layers move.
    pub fn new(path: &nn::Path, cfg: &DitConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.in_channels);
        // Patch embedding: Xavier-uniform on the weight viewed as (D, C·p·p), i.e. fan-in C·p·p.
        let bound = (6.0 / (c * p * p + d) as f64).sqrt();
        let conv_cfg = nn::ConvConfig { stride: p, ws_init: nn::Init::Uniform { lo: -bound, up: bound }, bs_init: nn::Init::Const(0.0), ..Default::default() };
        let x_embedder = nn::conv2d(path / "x_embedder" / "proj", c, d, p, conv_cfg);

        let grid = cfg.input_size / p;
        let mut pos_embed = path.zeros_no_train("pos_embed", &[1, grid * grid, d]);
        let table = Tensor::from_slice(&sincos_pos_table(d, grid)).reshape([1, grid * grid, d]);
        tch::no_grad(|| pos_embed.copy_(&table));

        let t_embedder = TimestepEmbedder::new(path / "t_embedder", d);
        let h_embedder = (cfg.h_embedding != HEmbedding::None).then(|| TimestepEmbedder::new(path / "h_embedder", d));
        let guidance_embedders = cfg.guidance_conditioning.then(|| ["omega_embedder", "t_min_embedder", "t_max_embedder"].map(|name| TimestepEmbedder::new(path / name, d)));
        let y_table = (path / "y_embedder").var("embedding_table", &[cfg.num_classes + 1, d], nn::Init::Randn { mean: 0.0, stdev: EMBED_INIT_STD });
        let blocks = (0..cfg.depth).map(|i| Block::new(path / "blocks" / i, cfg)).collect();
        let final_ada_ln = zero_linear(path / "final_layer" / "adaLN_modulation" / 1, d, 2 * d);
        let final_linear = zero_linear(path / "final_layer" / "linear", d, p * p * cfg.out_channels());
        let precision = cfg.precision.effective(path.device());
        Ok(Self { cfg: cfg.clone(), precision, x_embedder, pos_embed, t_embedder, h_embedder, guidance_embedders, y_table, blocks, final_ada_ln, final_linear })
    }

    pub fn config(&self) -> &DitConfig {
        &self.cfg
    }

    /// The precision that runs (the configured one, or f32 on the CPU).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn device(&self) -> Device {
        self.y_table.device()
    }

    /// The conditioning vector e = t_emb(t) + h_emb(h) + y_emb(class) (+ the guidance embeddings
    /// with `guidance_conditioning`; `None` means ω = 1 on [0, 1]), (B, D).
    fn conditioning(&self, t: &Tensor, h: &Tensor, class: &Tensor, guidance: Option<&GuidanceInput>) -> Tensor {
        let mut e = self.t_embedder.forward(&(t * self.cfg.t_scale)) + Tensor::embedding(&self.y_table, class, -1, false, false); // (B, D)
        if let (Some(embedder), Some(s)) = (&self.h_embedder, self.cfg.h_embedding.input(h, self.cfg.t_scale)) {
            e = e + embedder.forward(&s); // (B, D)
        }
        if let Some([omega, t_min, t_max]) = &self.guidance_embedders {
            let unguided;
            let g = match guidance {
                Some(g) => g,
                None => {
                    unguided = GuidanceInput::constant(t, 1.0, 0.0, 1.0);
                    &unguided
                }
            };
            let ts = self.cfg.t_scale;
            // imfDiT embeds 1 − 1/ω (in [0, 1) for ω >= 1), not ω itself.
            e = e + omega.forward(&((-g.scale.reciprocal() + 1.0) * ts)) + t_min.forward(&(&g.t_min * ts)) + t_max.forward(&(&g.t_max * ts));
            // (B, D)
        }
        e
    }

    /// The forward pass with explicit kernels; `forward` picks them automatically.
    /// x_t (B, C, H, W); t, h (B,); class (B,) Int64 -> (B, C_out, H, W) in x_t's dtype.
    pub fn forward_with(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, path: AttnPath) -> Tensor {
        self.forward_guided_with(x_t, t, h, class, None, path)
    }

    /// [`Self::forward_with`] with a guidance input (used with `guidance_conditioning`; ignored
    /// without it).
    pub fn forward_guided_with(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, guidance: Option<&GuidanceInput>, path: AttnPath) -> Tensor {
        let (b, c, height, width) = x_t.size4().expect("dit input must be (B, C, H, W)");
        let (p, size) = (self.cfg.patch_size, self.cfg.input_size);
        assert!(c == self.cfg.in_channels && height == size && width == size, "dit: input {:?} does not match in_channels {} and input_size {size}", x_t.size(), self.cfg.in_channels);
        let _precision = self.precision.enter();
        let x = self.x_embedder.forward(x_t).flatten(2, 3).transpose(1, 2); // (B, T, D)
        let mut x = x + &self.pos_embed; // (B, T, D)
        let c_act = self.conditioning(t, h, class, guidance).silu(); // (B, D); every adaLN starts with SiLU
        for block in &self.blocks {
            x = block.forward(&x, &c_act, path); // (B, T, D)
        }
        let m = self.final_ada_ln.forward(&c_act).chunk(2, 1); // 2 × (B, D): shift, scale
        let x = self.final_linear.forward(&modulate(&layer_norm(&x, path), &m[0], &m[1])); // (B, T, p²·C_out)
                                                                                           // Unpatchify (DiT `unpatchify`): token (i, j) holds the (p, p, C_out) patch at rows i·p…, cols j·p….
        let (g, c_out) = (size / p, self.cfg.out_channels());
        let x = x.reshape([b, g, g, p, p, c_out]).permute([0, 5, 1, 3, 2, 4]).reshape([b, c_out, size, size]); // (B, C_out, H, W)
        x.to_kind(x_t.kind())
    }
}

impl VelocityField for Dit {
    /// (B, C, H, W) -> (B, C_out, H, W); C_out = 2C with `variance = "learned"`. Fused attention,
    /// or the math path while a forward-AD level is entered.
    fn forward(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor) -> Tensor {
        self.forward_with(x_t, t, h, class, AttnPath::auto())
    }

    fn null_class(&self) -> i64 {
        self.cfg.num_classes
    }

    fn takes_guidance(&self) -> bool {
        self.cfg.guidance_conditioning
    }

    fn forward_guidance(&self, x_t: &Tensor, t: &Tensor, h: &Tensor, class: &Tensor, guidance: &GuidanceInput) -> Option<Tensor> {
        self.cfg.guidance_conditioning.then(|| self.forward_guided_with(x_t, t, h, class, Some(guidance), AttnPath::auto()))
    }
}
