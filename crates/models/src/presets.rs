//! DiT presets (methods.md §16; DiT `DiT_models`, MeanFlow's M) and the TOML form of a
//! [`DitConfig`]: `preset = "B/2"` plus explicit fields that override it.
use crate::dit::{AttnScale, DitConfig, Variance};
use crate::embedding::HEmbedding;
use crate::precision::Precision;
use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// (name, depth, hidden_size, num_heads) of each size; every size comes with patch 2, 4 and 8.
const SIZES: [(&str, i64, i64, i64); 5] = [
    ("S", 12, 384, 6),
    ("B", 12, 768, 12),
    ("M", 16, 1024, 16), // MeanFlow's DiT-M (models_dit.py)
    ("L", 24, 1024, 16),
    ("XL", 28, 1152, 16),
];
const PATCHES: [i64; 3] = [2, 4, 8];

/// Every preset name, "S/2" … "XL/8".
pub fn preset_names() -> Vec<String> {
    SIZES.iter().flat_map(|(s, ..)| PATCHES.iter().map(move |p| format!("{s}/{p}"))).collect()
}

impl DitConfig {
    /// A preset by name ("S/2", "B/4", "XL/8", ...) with the defaults of the other fields:
    /// 4×32×32 input, 1000 classes, continuous h-embedder, 1/√d attention, raw t, C output
    /// channels, float32.
    pub fn preset(name: &str) -> Result<Self> {
        let (size, patch) = name.split_once('/').with_context(|| format!("dit preset {name:?}: expected SIZE/PATCH, e.g. \"B/2\""))?;
        let patch: i64 = patch.parse().with_context(|| format!("dit preset {name:?}: patch is not an integer"))?;
        let Some(&(_, depth, hidden_size, num_heads)) = SIZES.iter().find(|(s, ..)| *s == size) else {
            bail!("dit preset {name:?}: unknown size {size:?} (known: {:?})", preset_names());
        };
        if !PATCHES.contains(&patch) {
            bail!("dit preset {name:?}: patch must be one of {PATCHES:?}");
        }
        Ok(Self::arch(depth, hidden_size, num_heads, patch))
    }

    /// An architecture with the default options.
    pub fn arch(depth: i64, hidden_size: i64, num_heads: i64, patch_size: i64) -> Self {
        Self {
            depth,
            hidden_size,
            num_heads,
            patch_size,
            mlp_ratio: 4.0,
            in_channels: 4,
            input_size: 32,
            num_classes: 1000,
            h_embedding: HEmbedding::Continuous,
            attn_scale: AttnScale::InvSqrtHeadDim,
            t_scale: 1.0,
            variance: Variance::Fixed,
            precision: Precision::F32,
            guidance_conditioning: false,
        }
    }
}

macro_rules! named_presets {
    ($($fn_name:ident => $name:literal),* $(,)?) => {
        impl DitConfig {
            $(
                #[doc = concat!("DiT-", $name, " with the default options.")]
                pub fn $fn_name() -> Self {
                    Self::preset($name).expect("built-in preset")
                }
            )*
        }
    };
}

named_presets! {
    s2 => "S/2", s4 => "S/4", s8 => "S/8",
    b2 => "B/2", b4 => "B/4", b8 => "B/8",
    m2 => "M/2", m4 => "M/4", m8 => "M/8",
    l2 => "L/2", l4 => "L/4", l8 => "L/8",
    xl2 => "XL/2", xl4 => "XL/4", xl8 => "XL/8",
}

/// The TOML form of a DiT config: an optional preset and overrides. Without a preset, the four
/// architecture fields are required.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitSpec {
    pub preset: Option<String>,
    pub depth: Option<i64>,
    pub hidden_size: Option<i64>,
    pub num_heads: Option<i64>,
    pub patch_size: Option<i64>,
    pub mlp_ratio: Option<f64>,
    pub in_channels: Option<i64>,
    pub input_size: Option<i64>,
    pub num_classes: Option<i64>,
    pub h_embedding: Option<HEmbedding>,
    pub attn_scale: Option<AttnScale>,
    pub t_scale: Option<f64>,
    pub variance: Option<Variance>,
    pub precision: Option<Precision>,
    pub guidance_conditioning: Option<bool>,
}

impl TryFrom<DitSpec> for DitConfig {
    type Error = anyhow::Error;

    fn try_from(s: DitSpec) -> Result<Self> {
        let mut cfg = match &s.preset {
            Some(name) => DitConfig::preset(name)?,
            None => match (s.depth, s.hidden_size, s.num_heads, s.patch_size) {
                (Some(depth), Some(hidden), Some(heads), Some(patch)) => DitConfig::arch(depth, hidden, heads, patch),
                _ => bail!("dit config: give a preset or all of depth, hidden_size, num_heads, patch_size"),
            },
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = s.$field { cfg.$field = v; } )* };
        }
        set!(depth, hidden_size, num_heads, patch_size, mlp_ratio, in_channels, input_size, num_classes, h_embedding, attn_scale, t_scale, variance, precision, guidance_conditioning);
        cfg.validate()?;
        Ok(cfg)
    }
}
