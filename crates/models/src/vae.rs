//! Stable Diffusion's AutoencoderKL (kl-f8, Rombach et al. arXiv 2112.10752), as diffusers builds it
//! (`models/autoencoders/autoencoder_kl.py`, `vae.py` Encoder/Decoder, `resnet.py` ResnetBlock2D,
//! `attention_processor.py` Attention, `downsampling.py`, `upsampling.py`; checked against
//! diffusers 0.42.1 by `tests/vae.rs`). The defaults are `stabilityai/sd-vae-ft-mse`, the VAE whose
//! 32×32×4 latents the Shortcut and MeanFlow ImageNet-256 / CelebA-HQ-256 runs train on.
//!
//! Variable names are diffusers' state-dict keys, so `diffusion_pytorch_model.safetensors` loads
//! as is. The VAE is frozen in flowmap: every variable has `requires_grad = false` and the forward
//! passes run under `no_grad`.
//!
//! Latent spaces: [`Vae::encode_moments`] and [`Vae::decode`] work on *unscaled* latents
//! (diffusers' `latent_dist.mean`); the DiT sees the *model space* z·scaling_factor
//! ([`to_model_space`], [`VaeConfig::to_model_space`]).
//! Shapes: B batch, H×W image, f = 2^(levels − 1) the downsampling factor (8 for kl-f8).
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Latent scaling of sd-vae-ft-mse (and every SD 1.x VAE): diffusers `scaling_factor`, chosen so the
/// scaled latents have about unit variance (LDM §4.3.2).
pub const SD_VAE_SCALE: f64 = 0.18215;
/// GroupNorm epsilon everywhere in the VAE (diffusers `resnet_eps=1e-6`, `conv_norm_out` eps).
const NORM_EPS: f64 = 1e-6;
/// diffusers `DiagonalGaussianDistribution`: logvar is clamped to [−30, 20] before std = exp(logvar/2).
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;
/// Latents decoded per forward pass in [`decode_for_fid`]: at 256² the first decoder level holds
/// 16·128·256²·4 B ≈ 0.5 GB per activation.
const FID_DECODE_CHUNK: i64 = 16;
/// How many names each list in a load error shows before "… and N more".
const ERROR_LIST_MAX: usize = 24;

/// The AutoencoderKL architecture (diffusers `AutoencoderKL` config; DownEncoderBlock2D /
/// UpDecoderBlock2D blocks, SiLU, one single-head attention in each mid block). Defaults are
/// sd-vae-ft-mse; small test VAEs override `block_out_channels`, `layers_per_block`, `norm_num_groups`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    /// image channels; default 3
    pub in_channels: i64,
    /// decoded image channels; default 3
    pub out_channels: i64,
    /// latent channels; default 4
    pub latent_channels: i64,
    pub block_out_channels: Vec<i64>, // channels per level; f = 2^(len − 1); default [128, 256, 512, 512]
    /// resnets per encoder level (decoder: one more); default 2
    pub layers_per_block: i64,
    /// GroupNorm groups, divides every channel count; default 32
    pub norm_num_groups: i64,
    /// training image size (informational); default 256
    pub sample_size: i64,
    /// model-space latent = scaling_factor·z; default 0.18215
    pub scaling_factor: f64,
    /// 1×1 conv on the encoder's moments; default true
    pub use_quant_conv: bool,
    /// 1×1 conv before the decoder; default true
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool, // attention between the two mid-block resnets; default true
}

impl Default for VaeConfig {
    /// sd-vae-ft-mse (`stabilityai/sd-vae-ft-mse/config.json`).
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            sample_size: 256,
            scaling_factor: SD_VAE_SCALE,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// sd-vae-ft-mse (= `Default`).
    pub fn sd_vae_ft_mse() -> Self {
        Self::default()
    }

    /// A tiny VAE for tests and dry runs: channels [32, 64], one resnet per level, 8 groups (f = 2).
    pub fn tiny() -> Self {
        VaeConfig { block_out_channels: vec![32, 64], layers_per_block: 1, norm_num_groups: 8, sample_size: 32, ..Self::default() }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(!self.block_out_channels.is_empty(), "vae: block_out_channels is empty");
        ensure!(self.in_channels >= 1 && self.out_channels >= 1 && self.latent_channels >= 1, "vae: channel counts must be positive: {self:?}");
        ensure!(self.layers_per_block >= 1, "vae: layers_per_block must be >= 1, got {}", self.layers_per_block);
        ensure!(self.norm_num_groups >= 1, "vae: norm_num_groups must be >= 1");
        for &c in &self.block_out_channels {
            ensure!(c >= 1 && c % self.norm_num_groups == 0, "vae: block channels {c} not divisible by norm_num_groups {}", self.norm_num_groups);
        }
        ensure!(self.scaling_factor > 0.0, "vae: scaling_factor must be positive, got {}", self.scaling_factor);
        Ok(())
    }

    /// Spatial downsampling factor f = 2^(levels − 1): 8 for kl-f8.
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Latent shape (C_z, H/f, W/f) of an H×W image (H, W multiples of f).
    pub fn latent_shape(&self, height: i64, width: i64) -> [i64; 3] {
        let f = self.downsample_factor();
        [self.latent_channels, height / f, width / f]
    }

    /// Unscaled latent → model space: z·scaling_factor.
    pub fn to_model_space(&self, z: &Tensor) -> Tensor {
        z * self.scaling_factor
    }

    /// Model space → unscaled latent: z/scaling_factor.
    pub fn from_model_space(&self, z: &Tensor) -> Tensor {
        z / self.scaling_factor
    }
}

/// Unscaled SD latent → model space: z·[`SD_VAE_SCALE`] (for callers without a [`Vae`] at hand,
/// e.g. training on stored posterior moments).
pub fn to_model_space(z: &Tensor) -> Tensor {
    z * SD_VAE_SCALE
}

/// Model space → unscaled SD latent: z/[`SD_VAE_SCALE`].
pub fn from_model_space(z: &Tensor) -> Tensor {
    z / SD_VAE_SCALE
}

/// Layers start at zero: [`Vae::load`] or [`Vae::random`] fills them.
const ZEROS: nn::Init = nn::Init::Const(0.0);

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(p, c_in, c_out, k, nn::ConvConfig { stride, padding, ws_init: ZEROS, bs_init: ZEROS, ..Default::default() })
}

fn linear(p: nn::Path, c_in: i64, c_out: i64) -> nn::Linear {
    nn::linear(p, c_in, c_out, nn::LinearConfig { ws_init: ZEROS, bs_init: Some(ZEROS), bias: true })
}

fn group_norm(p: nn::Path, groups: i64, c: i64) -> nn::GroupNorm {
    nn::group_norm(p, groups, c, nn::GroupNormConfig { eps: NORM_EPS, ..Default::default() })
}

/// diffusers ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))),
/// with a 1×1 `conv_shortcut` on x when the channel count changes (dropout 0, output scale 1).
#[derive(Debug)]
struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, groups: i64) -> Self {
        ResnetBlock {
            norm1: group_norm(p / "norm1", groups, c_in),
            conv1: conv(p / "conv1", c_in, c_out, 3, 1, 1),
            norm2: group_norm(p / "norm2", groups, c_out),
            conv2: conv(p / "conv2", c_out, c_out, 3, 1, 1),
            conv_shortcut: (c_in != c_out).then(|| conv(p / "conv_shortcut", c_in, c_out, 1, 1, 0)),
        }
    }

    /// (B, C_in, H, W) → (B, C_out, H, W).
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// The mid block's attention (diffusers `Attention` with `residual_connection=True`,
/// `norm_num_groups`, one head of width C): x + to_out(softmax(q kᵀ/√C) v) over the H·W positions
/// of group_norm(x). Legacy files name the projections `query/key/value/proj_attn` (renamed on load).
#[derive(Debug)]
struct SpatialAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl SpatialAttention {
    fn new(p: &nn::Path, c: i64, groups: i64) -> Self {
        SpatialAttention { group_norm: group_norm(p / "group_norm", groups, c), to_q: linear(p / "to_q", c, c), to_k: linear(p / "to_k", c, c), to_v: linear(p / "to_v", c, c), to_out: linear(p / "to_out" / "0", c, c) }
    }

    /// (B, C, H, W) → (B, C, H, W).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().unwrap();
        let tokens = self.group_norm.forward(x).reshape([b, c, h * w]).transpose(1, 2); // (B, T, C)
        let heads = |l: &nn::Linear| l.forward(&tokens).unsqueeze(1); // (B, 1, T, C)
                                                                      // Fused SDPA (its default scale is 1/√C); the VAE never runs under forward-mode AD.
        let a = Tensor::scaled_dot_product_attention(&heads(&self.to_q), &heads(&self.to_k), &heads(&self.to_v), None::<Tensor>, 0.0, false, None, false);
        let out = self.to_out.forward(&a.squeeze_dim(1)); // (B, T, C)
        out.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// diffusers UNetMidBlock2D: resnet, then (attention, resnet) once.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<SpatialAttention>,
}

impl MidBlock {
    fn new(p: &nn::Path, c: i64, groups: i64, attention: bool) -> Self {
        let r = p / "resnets";
        MidBlock { resnets: [ResnetBlock::new(&(&r / 0), c, c, groups), ResnetBlock::new(&(&r / 1), c, c, groups)], attention: attention.then(|| SpatialAttention::new(&(p / "attentions" / 0), c, groups)) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x);
        if let Some(a) = &self.attention {
            h = a.forward(&h);
        }
        self.resnets[1].forward(&h)
    }
}

/// One level: resnets, then an optional resampling conv (encoder: Downsample2D, decoder: Upsample2D).
#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    resample: Option<nn::Conv2D>,
}

/// diffusers `Encoder` (DownEncoderBlock2D levels, `double_z`): (B, C_img, H, W) → (B, 2·C_z, H/f, W/f).
#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<Level>,
    mid_block: MidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(p: &nn::Path, cfg: &VaeConfig) -> Self {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::new();
        let mut c_prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let bp = p / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block).map(|j| ResnetBlock::new(&(&bp / "resnets" / j), if j == 0 { c_prev } else { c }, c, g)).collect();
            // Downsample2D(padding=0): pad (0, 1, 0, 1) then a stride-2 3×3 conv without padding.
            let resample = (i + 1 < ch.len()).then(|| conv(&bp / "downsamplers" / 0 / "conv", c, c, 3, 2, 0));
            down_blocks.push(Level { resnets, resample });
            c_prev = c;
        }
        let c_last = *ch.last().unwrap();
        Encoder {
            conv_in: conv(p / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&(p / "mid_block"), c_last, g, cfg.mid_block_add_attention),
            conv_norm_out: group_norm(p / "conv_norm_out", g, c_last),
            conv_out: conv(p / "conv_out", c_last, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for level in &self.down_blocks {
            for r in &level.resnets {
                h = r.forward(&h);
            }
            if let Some(down) = &level.resample {
                h = down.forward(&h.constant_pad_nd([0, 1, 0, 1])); // diffusers Downsample2D: asymmetric pad
            }
        }
        h = self.mid_block.forward(&h);
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// diffusers `Decoder` (UpDecoderBlock2D levels with layers_per_block + 1 resnets):
/// (B, C_z, h, w) → (B, C_img, f·h, f·w).
#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock,
    up_blocks: Vec<Level>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(p: &nn::Path, cfg: &VaeConfig) -> Self {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up_blocks = Vec::new();
        let mut c_prev = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let bp = p / "up_blocks" / i;
            let resnets = (0..=cfg.layers_per_block).map(|j| ResnetBlock::new(&(&bp / "resnets" / j), if j == 0 { c_prev } else { c }, c, g)).collect();
            // Upsample2D: nearest ×2, then a 3×3 conv.
            let resample = (i + 1 < rev.len()).then(|| conv(&bp / "upsamplers" / 0 / "conv", c, c, 3, 1, 1));
            up_blocks.push(Level { resnets, resample });
            c_prev = c;
        }
        let c_first = cfg.block_out_channels[0];
        Decoder {
            conv_in: conv(p / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1),
            mid_block: MidBlock::new(&(p / "mid_block"), rev[0], g, cfg.mid_block_add_attention),
            up_blocks,
            conv_norm_out: group_norm(p / "conv_norm_out", g, c_first),
            conv_out: conv(p / "conv_out", c_first, cfg.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z));
        for level in &self.up_blocks {
            for r in &level.resnets {
                h = r.forward(&h);
            }
            if let Some(up) = &level.resample {
                let (_, _, hh, ww) = h.size4().unwrap();
                h = up.forward(&h.upsample_nearest2d([2 * hh, 2 * ww], 2.0, 2.0));
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// The frozen AutoencoderKL. Float32 on `device`.
#[derive(Debug)]
pub struct Vae {
    vs: nn::VarStore,
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
}

impl Vae {
    fn build(cfg: &VaeConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let zc = 2 * cfg.latent_channels;
        let encoder = Encoder::new(&(&root / "encoder"), cfg);
        let decoder = Decoder::new(&(&root / "decoder"), cfg);
        let quant_conv = cfg.use_quant_conv.then(|| conv(&root / "quant_conv", zc, zc, 1, 1, 0));
        let post_quant_conv = cfg.use_post_quant_conv.then(|| conv(&root / "post_quant_conv", cfg.latent_channels, cfg.latent_channels, 1, 1, 0));
        let mut vae = Vae { vs, cfg: cfg.clone(), encoder, decoder, quant_conv, post_quant_conv };
        vae.vs.freeze();
        Ok(vae)
    }

    /// A randomly initialised VAE for tests and dry runs, with PyTorch's default init (conv and
    /// linear weights and biases U(±1/√fan_in), GroupNorm weight 1 and bias 0). The values come
    /// from a SplitMix64 stream per variable, seeded by (`seed`, name): they depend only on
    /// (cfg, seed), not on libtorch's global generator, which this leaves untouched.
    pub fn random(cfg: &VaeConfig, device: Device, seed: u64) -> Result<Self> {
        let vae = Self::build(cfg, device)?;
        let mut vars: Vec<(String, Tensor)> = vae.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let sizes: BTreeMap<String, Vec<i64>> = vars.iter().map(|(k, v)| (k.clone(), v.size())).collect();
        tch::no_grad(|| {
            for (name, var) in vars.iter_mut() {
                let (module, leaf) = name.rsplit_once('.').expect("variables are named module.leaf");
                let is_norm = ["norm1", "norm2", "group_norm", "conv_norm_out"].iter().any(|n| module.ends_with(n));
                if is_norm {
                    let _ = var.fill_(if leaf == "weight" { 1.0 } else { 0.0 });
                    continue;
                }
                let weight = &sizes[&format!("{module}.weight")];
                let fan_in: i64 = weight[1..].iter().product();
                let bound = 1.0 / (fan_in as f64).sqrt();
                let values = uniform_stream(seed, name, var.numel(), bound);
                var.copy_(&Tensor::from_slice(&values).reshape(var.size()));
            }
        });
        Ok(vae)
    }

    /// Loads diffusers' `diffusion_pytorch_model.safetensors` (fp16, bf16 or fp32 in the file;
    /// float32 in memory). Legacy attention names (`query`, `key`, `value`, `proj_attn`) and
    /// 1×1-conv-shaped attention projections (C, C, 1, 1) are accepted. Fails naming the file and
    /// every missing key, unexpected key and shape mismatch.
    pub fn load(path: &Path, cfg: &VaeConfig, device: Device) -> Result<Self> {
        let vae = Self::build(cfg, device)?;
        let file = Tensor::read_safetensors(path).with_context(|| format!("vae weights {}: cannot read safetensors", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, t) in file {
            let name = modern_attention_name(&name);
            ensure!(t.is_floating_point(), "vae weights {}: tensor `{name}` has dtype {:?}, expected a float", path.display(), t.kind());
            ensure!(tensors.insert(name.clone(), t).is_none(), "vae weights {}: `{name}` appears twice (legacy and new attention names both present)", path.display());
        }
        let mut vars = vae.vs.variables();
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for (name, var) in &vars {
            match tensors.get(name) {
                None => missing.push(name.clone()),
                Some(t) => {
                    let (want, got) = (var.size(), t.size());
                    let conv_1x1 = got.len() == 4 && got[2..] == [1, 1] && want.len() == 2 && got[..2] == want[..];
                    if want != got && !conv_1x1 {
                        mismatched.push(format!("{name}: file {got:?}, model {want:?}"));
                    }
                }
            }
        }
        let unexpected: Vec<String> = tensors.keys().filter(|k| !vars.contains_key(*k)).cloned().collect();
        if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
            missing.sort();
            bail!(
                "vae weights {} do not match the VAE config (block_out_channels {:?}, layers_per_block {}, latent_channels {}): \
                 {} missing, {} unexpected, {} shape mismatches{}{}{}",
                path.display(),
                cfg.block_out_channels,
                cfg.layers_per_block,
                cfg.latent_channels,
                missing.len(),
                unexpected.len(),
                mismatched.len(),
                name_list("\n  missing", &missing),
                name_list("\n  unexpected", &unexpected),
                name_list("\n  shape mismatch", &mismatched),
            );
        }
        tch::no_grad(|| {
            for (name, var) in vars.iter_mut() {
                let t = &tensors[name];
                var.copy_(&t.to_kind(Kind::Float).reshape(var.size()));
            }
        });
        Ok(vae)
    }

    /// Writes the weights as diffusers names them (float32 safetensors), loadable by [`Vae::load`]
    /// and by diffusers' `AutoencoderKL.from_pretrained` next to a matching `config.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let named: BTreeMap<String, Tensor> = self.vs.variables().into_iter().map(|(k, v)| (k, v.to_device(Device::Cpu))).collect();
        let named: Vec<(String, Tensor)> = named.into_iter().collect();
        Tensor::write_safetensors(&named, path).with_context(|| format!("vae weights {}: cannot write", path.display()))
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Name → variable, diffusers' state-dict keys.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Posterior moments of images `x` (B, C_img, H, W) in [−1, 1]: (mean, std), each
    /// (B, C_z, H/f, W/f), *unscaled* (diffusers `latent_dist.mean` / `.std`,
    /// std = exp(clamp(logvar, −30, 20)/2)). H and W should be multiples of f. Runs under no_grad.
    pub fn encode_moments(&self, x: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let h = self.encoder.forward(&x.to_kind(Kind::Float));
            let moments = match &self.quant_conv {
                Some(q) => q.forward(&h),
                None => h,
            };
            let parts = moments.chunk(2, 1);
            let std = (parts[1].clamp(LOGVAR_MIN, LOGVAR_MAX) * 0.5).exp();
            (parts[0].shallow_clone(), std)
        })
    }

    /// Decodes an *unscaled* latent `z` (B, C_z, h, w) to images (B, C_img, f·h, f·w), roughly in
    /// [−1, 1] (not clamped). Runs under no_grad.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let z = z.to_kind(Kind::Float);
            let z = match &self.post_quant_conv {
                Some(q) => q.forward(&z),
                None => z,
            };
            self.decoder.forward(&z)
        })
    }
}

/// Model-space latents `z_model` (B, C_z, h, w) (= z·scaling_factor, what the DiT generates) →
/// images (B, C_img, f·h, f·w) clamped to [−1, 1] for the Inception network, decoded
/// 16 at a time (`FID_DECODE_CHUNK`) to bound activation memory.
pub fn decode_for_fid(vae: &Vae, z_model: &Tensor) -> Tensor {
    let z = vae.config().from_model_space(z_model);
    let parts: Vec<Tensor> = z.split(FID_DECODE_CHUNK, 0).iter().map(|c| vae.decode(c).clamp(-1.0, 1.0)).collect();
    Tensor::cat(&parts, 0)
}

/// diffusers ≤ 0.13 attention names → current ones (diffusers `_convert_deprecated_attention_blocks`):
/// `…attentions.0.query.weight` → `…attentions.0.to_q.weight`, `proj_attn` → `to_out.0`.
fn modern_attention_name(name: &str) -> String {
    const RENAMES: [(&str, &str); 4] = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];
    if name.contains(".attentions.") {
        for (old, new) in RENAMES {
            if name.contains(old) {
                return name.replacen(old, new, 1);
            }
        }
    }
    name.to_string()
}

/// `n` values U(−bound, bound) from SplitMix64 (Steele et al. 2014) seeded by `seed` and an FNV-1a
/// hash of `name`.
fn uniform_stream(seed: u64, name: &str, n: usize, bound: f64) -> Vec<f32> {
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect()
}

fn name_list(title: &str, names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let mut s = format!("{title}: {}", names.iter().take(ERROR_LIST_MAX).cloned().collect::<Vec<_>>().join(", "));
    if names.len() > ERROR_LIST_MAX {
        s.push_str(&format!(", … and {} more", names.len() - ERROR_LIST_MAX));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_are_renamed() {
        assert_eq!(modern_attention_name("encoder.mid_block.attentions.0.query.weight"), "encoder.mid_block.attentions.0.to_q.weight");
        assert_eq!(modern_attention_name("decoder.mid_block.attentions.0.proj_attn.bias"), "decoder.mid_block.attentions.0.to_out.0.bias");
        assert_eq!(modern_attention_name("encoder.mid_block.attentions.0.group_norm.weight"), "encoder.mid_block.attentions.0.group_norm.weight");
        assert_eq!(modern_attention_name("encoder.conv_in.weight"), "encoder.conv_in.weight");
    }
}
