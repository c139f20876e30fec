//! `[data]`: which data a run trains on. A table tagged by `kind`, each kind with only its own keys
//! (a key of another kind is an unknown field), and [`DataConfig::open`] that makes the
//! [`DataSource`].
//!
//! ```toml
//! [data]                                   # built-in, in memory
//! kind = "mnist"                           # | "fashion_mnist"
//! conditional = true
//! split = "train"                          # | "test"; default train
//! limit = 256                              # the first 256 images (smoke tests)
//!
//! [data]                                   # pixels from an image folder, decoded while training
//! kind = "image_folder"
//! path = "${IMAGENET_DIR}/train"           # ${VAR} expanded; default $FLOWMAP_IMAGENET (class_folders) or $FLOWMAP_CELEBAHQ (flat)
//! layout = "class_folders"                 # | "flat"
//! conditional = true
//! num_classes = 1000                       # checked against the folder
//! image_size = 256                         # ADM center crop; default 256
//!
//! [data]                                   # cached SD-VAE latents (`flowmap latents`)
//! kind = "latents"
//! path = "${FLOWMAP_LATENTS}/imagenet256"  # the folder or its manifest.json; default $FLOWMAP_LATENTS
//! conditional = true
//! num_classes = 1000
//! image_size = 256                         # latents are 4 × image_size/8 × image_size/8
//! ```
//!
//! Every kind takes `reflow_pairs = "FILE"` (two-stage reflow): the run then trains on the stored
//! (noise, sample) pairs of that file ([`crate::data::reflow_pairs`]); the other keys still describe
//! the data the pairs imitate (their sample shape, classes and FID reference). Files written before
//! this layout (`dataset = "mnist"`) are rewritten by `flowmap migrate-config`
//! ([`crate::config::migrate`]).
use super::idx::{read_pair, split_files, LabelledImages, Split};
use super::image_folder::{FolderReader, ImageFolder, Layout};
use super::latents::LatentReader;
use super::source::{DataSource, InMemory};
use crate::data::cache;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// `[data]`, tagged by `kind`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// MNIST (package registries, data/SHA256SUMS), held in memory.
    Mnist(BuiltinConfig),
    /// Fashion-MNIST, held in memory.
    FashionMnist(BuiltinConfig),
    /// JPEG/PNG files under `path` (ImageNet train layout or a flat folder), decoded each step.
    ImageFolder(ImageFolderConfig),
    /// SD-VAE posterior moments written by `flowmap latents`.
    Latents(LatentsConfig),
}

/// `kind = "mnist" | "fashion_mnist"`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuiltinConfig {
    /// "train" (default) | "test"
    #[serde(default)]
    pub split: SplitName,
    /// class-conditional or unconditional (all null); default false
    #[serde(default)]
    pub conditional: bool,
    /// use only the first `limit` images of the split (smoke tests); not applied to reflow pairs
    #[serde(default)]
    pub limit: Option<usize>,
    /// train on the (noise, sample) pairs of this file from `flowmap reflow-pairs`; ${VAR} expanded
    #[serde(default)]
    pub reflow_pairs: Option<String>,
    /// side in pixels: 32 (default: the 28×28 digit padded by 2), or 16 or 8 (the padded image
    /// average-pooled 2× or 4×; FID references of the built-in split are pooled the same way)
    #[serde(default)]
    pub image_size: Option<i64>,
}

/// `kind = "image_folder"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    /// the root; ${VAR} expanded; default $FLOWMAP_IMAGENET (class_folders) or $FLOWMAP_CELEBAHQ (flat)
    #[serde(default)]
    pub path: Option<String>,
    /// "class_folders" (default) | "flat"
    #[serde(default = "default_layout")]
    pub layout: Layout,
    /// class-conditional (needs num_classes) or unconditional; default false
    #[serde(default)]
    pub conditional: bool,
    /// K with conditional = true (checked against the folder)
    #[serde(default)]
    pub num_classes: Option<i64>,
    /// ADM center crop size in pixels, a multiple of 8; default 256
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    /// random horizontal flip; default true
    #[serde(default = "yes")]
    pub flip: bool,
    /// decode threads; default: all cores
    #[serde(default)]
    pub workers: Option<usize>,
    /// batches decoded ahead; default 2
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// use only the first `limit` images of the sorted listing; not applied to reflow pairs
    #[serde(default)]
    pub limit: Option<usize>,
    /// train on the (noise, sample) pairs of this file from `flowmap reflow-pairs`; ${VAR} expanded
    #[serde(default)]
    pub reflow_pairs: Option<String>,
}

/// `kind = "latents"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatentsConfig {
    /// the latents folder or its manifest.json; ${VAR} expanded; default $FLOWMAP_LATENTS
    #[serde(default)]
    pub path: Option<String>,
    /// class-conditional (needs num_classes) or unconditional; default false
    #[serde(default)]
    pub conditional: bool,
    /// K with conditional = true (checked against the manifest)
    #[serde(default)]
    pub num_classes: Option<i64>,
    /// pixels of the encoded crops (latents are 4 × image_size/8 × image_size/8); default 256
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    /// use the stored encoding of the flipped image half the time; default true
    #[serde(default = "yes")]
    pub flip: bool,
    /// train on the (noise, sample) pairs of this file from `flowmap reflow-pairs`; ${VAR} expanded
    #[serde(default)]
    pub reflow_pairs: Option<String>,
}

fn default_layout() -> Layout {
    Layout::ClassFolders
}
fn default_image_size() -> i64 {
    DEFAULT_IMAGE_SIZE
}
fn default_prefetch() -> usize {
    2
}
fn yes() -> bool {
    true
}

/// A data set by name (`[eval.reference] dataset`, and [`DataConfig::data_set`]).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataSet {
    Mnist,
    FashionMnist,
    ImageFolder,
    Latents,
}

/// A split of a built-in data set.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    #[default]
    Train,
    Test,
}

pub const DEFAULT_IMAGE_SIZE: i64 = 256;
/// SD-VAE: 4 latent channels, 8× downsampling.
pub const LATENT_CHANNELS: i64 = 4;
pub const LATENT_FACTOR: i64 = 8;

impl DataSet {
    pub const NUM_CLASSES: i64 = 10;
    /// The `kind` string.
    pub fn name(self) -> &'static str {
        match self {
            DataSet::Mnist => "mnist",
            DataSet::FashionMnist => "fashion_mnist",
            DataSet::ImageFolder => "image_folder",
            DataSet::Latents => "latents",
        }
    }
    /// Images in a split of a built-in data set (MNIST and Fashion-MNIST: 60,000 train, 10,000
    /// test); None for folders and latents.
    pub fn split_len(self, split: SplitName) -> Option<usize> {
        match (self.is_builtin(), split) {
            (false, _) => None,
            (true, SplitName::Train) => Some(60_000),
            (true, SplitName::Test) => Some(10_000),
        }
    }
    pub fn is_builtin(self) -> bool {
        matches!(self, DataSet::Mnist | DataSet::FashionMnist)
    }
    /// The verified IDX files of a split, loaded as (N, 1, 32, 32) in [-1, 1] plus labels.
    pub fn load(self, split: SplitName) -> Result<LabelledImages> {
        let (dir, prefix, gz) = match self {
            DataSet::Mnist => (cache::mnist_dir(), "mnist/", false),
            DataSet::FashionMnist => (cache::fashion_mnist_dir(), "fashion-mnist/", true),
            DataSet::ImageFolder | DataSet::Latents => anyhow::bail!("data set {} is not built in", self.name()),
        };
        cache::require(prefix)?;
        let split = match split {
            SplitName::Train => Split::Train,
            SplitName::Test => Split::Test,
        };
        let (images, labels) = split_files(&dir, split, gz);
        read_pair(&images, &labels)
    }
}

impl DataConfig {
    /// Which data set (the `kind`).
    pub fn data_set(&self) -> DataSet {
        match self {
            DataConfig::Mnist(_) => DataSet::Mnist,
            DataConfig::FashionMnist(_) => DataSet::FashionMnist,
            DataConfig::ImageFolder(_) => DataSet::ImageFolder,
            DataConfig::Latents(_) => DataSet::Latents,
        }
    }

    /// The `kind` string ("mnist", "image_folder", ...).
    pub fn name(&self) -> &'static str {
        self.data_set().name()
    }

    /// MNIST or Fashion-MNIST (held in memory, reference statistics from their test split).
    pub fn is_builtin(&self) -> bool {
        self.data_set().is_builtin()
    }

    /// The latents section when the data are latents (they need a VAE to become pixels).
    pub fn latents(&self) -> Option<&LatentsConfig> {
        match self {
            DataConfig::Latents(l) => Some(l),
            _ => None,
        }
    }

    /// Whether labels condition the model.
    pub fn conditional(&self) -> bool {
        match self {
            DataConfig::Mnist(b) | DataConfig::FashionMnist(b) => b.conditional,
            DataConfig::ImageFolder(f) => f.conditional,
            DataConfig::Latents(l) => l.conditional,
        }
    }

    /// Number of classes the model must embed (0 when unconditional).
    pub fn num_classes(&self) -> i64 {
        if !self.conditional() {
            return 0;
        }
        match self {
            DataConfig::Mnist(_) | DataConfig::FashionMnist(_) => DataSet::NUM_CLASSES,
            DataConfig::ImageFolder(ImageFolderConfig { num_classes, .. }) | DataConfig::Latents(LatentsConfig { num_classes, .. }) => num_classes.unwrap_or(0),
        }
    }

    /// Side of the images in pixels (decoded images for latents).
    pub fn image_size(&self) -> i64 {
        match self {
            DataConfig::Mnist(b) | DataConfig::FashionMnist(b) => b.image_size.unwrap_or(super::idx::PADDED),
            DataConfig::ImageFolder(f) => f.image_size,
            DataConfig::Latents(l) => l.image_size,
        }
    }

    /// Shape of one training sample as the config states it (checked against the data on open).
    pub fn sample_shape(&self) -> Vec<i64> {
        let s = self.image_size();
        match self {
            DataConfig::Mnist(_) | DataConfig::FashionMnist(_) => vec![1, s, s],
            DataConfig::ImageFolder(_) => vec![3, s, s],
            DataConfig::Latents(_) => vec![LATENT_CHANNELS, s / LATENT_FACTOR, s / LATENT_FACTOR],
        }
    }

    /// The reflow-pair file the run trains on, if any (unexpanded).
    pub fn reflow_pairs(&self) -> Option<&str> {
        match self {
            DataConfig::Mnist(b) | DataConfig::FashionMnist(b) => b.reflow_pairs.as_deref(),
            DataConfig::ImageFolder(f) => f.reflow_pairs.as_deref(),
            DataConfig::Latents(l) => l.reflow_pairs.as_deref(),
        }
    }

    /// The images one epoch draws from when `limit` caps them (None: all of them, or reflow pairs).
    pub fn limit(&self) -> Option<usize> {
        if self.reflow_pairs().is_some() {
            return None;
        }
        match self {
            DataConfig::Mnist(b) | DataConfig::FashionMnist(b) => b.limit,
            DataConfig::ImageFolder(f) => f.limit,
            DataConfig::Latents(_) => None,
        }
    }

    /// Field checks that need no file system (serde already refused keys of another kind).
    pub fn validate(&self) -> Result<()> {
        let name = self.name();
        if let Some(p) = self.reflow_pairs() {
            ensure!(!p.is_empty(), "data.reflow_pairs: empty path (a file made by `flowmap reflow-pairs`)");
        }
        match self {
            DataConfig::Mnist(b) | DataConfig::FashionMnist(b) => {
                if let Some(n) = b.limit {
                    ensure!(n >= 1, "data.limit = {n}: must be >= 1 (leave it out to use all the data)");
                    if let (None, Some(total)) = (&b.reflow_pairs, self.data_set().split_len(b.split)) {
                        ensure!(n <= total, "data.limit = {n}: must be between 1 and {total} (the size of {name} {:?})", b.split);
                    }
                }
                if let Some(s) = b.image_size {
                    super::idx::pool_factor(s).with_context(|| format!("data.image_size = {s} for {name}"))?;
                }
                Ok(())
            }
            DataConfig::ImageFolder(f) => {
                ensure!(f.path.as_ref().is_none_or(|p| !p.is_empty()), "data.path: empty path");
                if let Some(n) = f.limit {
                    ensure!(n >= 1, "data.limit = {n}: must be >= 1 (leave it out to use all the data)");
                }
                if let Some(w) = f.workers {
                    ensure!(w >= 1, "data.workers = {w}: must be >= 1 (leave it out to use all cores)");
                }
                check_classes(name, f.conditional, f.num_classes)?;
                check_image_size(f.image_size)
            }
            DataConfig::Latents(l) => {
                ensure!(l.path.as_ref().is_none_or(|p| !p.is_empty()), "data.path: empty path");
                check_classes(name, l.conditional, l.num_classes)?;
                check_image_size(l.image_size)
            }
        }
    }

    /// The image folder the data come from: an image folder's root, or the folder a latents
    /// manifest was encoded from (FID reference images); None for the built-in data sets.
    pub fn source_folder(&self) -> Result<Option<(PathBuf, Layout)>> {
        Ok(match self {
            DataConfig::Mnist(_) | DataConfig::FashionMnist(_) => None,
            DataConfig::ImageFolder(f) => Some((f.resolved_path()?, f.layout)),
            DataConfig::Latents(l) => {
                let m = LatentReader::open(&l.resolved_path()?, false, false, 0, None)?.manifest;
                Some((PathBuf::from(&m.source), m.layout))
            }
        })
    }

    /// Opens the data for training: built-in sets are loaded into memory; folders and latents
    /// are listed (and checked against the config) and read while training; reflow pairs are
    /// loaded into memory with their noise. `verify`: check the latents' shard checksums (slow on
    /// big sets; the dry run does it).
    pub fn open(&self, null_class: i64, seed: u64, verify: bool) -> Result<Box<dyn DataSource>> {
        self.validate()?;
        let conditional = self.conditional();
        let null = (!conditional).then_some(null_class);
        if let Some(pairs) = self.reflow_pairs() {
            let path = PathBuf::from(expand_env(pairs).context("data.reflow_pairs")?);
            let p = crate::data::reflow_pairs::load_pairs(&path)?;
            ensure!(p.x.size()[1..] == self.sample_shape()[..], "{}: pairs of shape {:?}, the data's samples are {:?}", path.display(), &p.x.size()[1..], self.sample_shape());
            let labels = if conditional { p.class } else { p.class.full_like(null_class) };
            let name = format!("reflow pairs {}", path.display());
            return Ok(Box::new(InMemory { images: p.x, labels, noise: Some(p.noise), num_classes: self.num_classes(), name }));
        }
        let source: Box<dyn DataSource> = match self {
            DataConfig::Mnist(b) | DataConfig::FashionMnist(b) => {
                let d = b.load(self.data_set(), null_class)?;
                Box::new(InMemory { images: d.images, labels: d.labels, noise: None, num_classes: self.num_classes(), name: format!("{} {:?}", self.name(), b.split) })
            }
            DataConfig::ImageFolder(f) => {
                let root = f.resolved_path()?;
                let mut folder = ImageFolder::scan(&root, f.layout)?;
                if let Some(n) = f.limit {
                    ensure!(n >= 1 && n <= folder.len(), "data.limit = {n} must be between 1 and {} (the images in {})", folder.len(), root.display());
                    folder.files.truncate(n);
                    folder.labels.truncate(n);
                }
                let workers = f.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
                Box::new(FolderReader::new(folder, f.image_size as u32, f.flip, seed, null, workers, f.prefetch)?)
            }
            DataConfig::Latents(l) => {
                let path = l.resolved_path()?;
                let r = LatentReader::open(&path, verify, l.flip, seed, null)?;
                ensure!(r.manifest.image_size as i64 == l.image_size, "{}: latents of {}² images, the config says data.image_size = {}", path.display(), r.manifest.image_size, l.image_size);
                Box::new(r)
            }
        };
        if conditional && !self.is_builtin() {
            let want = self.num_classes();
            let got = source.num_classes();
            ensure!(got == want, "data.num_classes = {want} but the data has {got} classes");
        }
        ensure!(source.sample_shape() == self.sample_shape(), "the data's samples are {:?}, the config implies {:?}", source.sample_shape(), self.sample_shape());
        Ok(source)
    }
}

fn check_classes(name: &str, conditional: bool, num_classes: Option<i64>) -> Result<()> {
    if conditional {
        ensure!(num_classes.is_some_and(|k| k >= 1), "data.conditional = true with kind = {name:?} needs data.num_classes (e.g. 1000 for ImageNet); it is checked against the data");
    } else {
        ensure!(num_classes.is_none(), "data.num_classes is only for conditional = true");
    }
    Ok(())
}

fn check_image_size(s: i64) -> Result<()> {
    ensure!(s >= LATENT_FACTOR && s % LATENT_FACTOR == 0, "data.image_size = {s}: must be a multiple of {LATENT_FACTOR}, at least {LATENT_FACTOR}");
    Ok(())
}

impl BuiltinConfig {
    /// The training tensors of `set`: x (N, 1, S, S) (S = `image_size`, default 32) and class (N,),
    /// where unconditional data gets the null class `null_class` on every row.
    pub fn load(&self, set: DataSet, null_class: i64) -> Result<LabelledImages> {
        let mut d = set.load(self.split)?;
        if let Some(n) = self.limit {
            let total = d.images.size()[0] as usize;
            ensure!(n >= 1 && n <= total, "data.limit = {n} must be between 1 and {total} (the size of {} {:?})", set.name(), self.split);
            d.images = d.images.narrow(0, 0, n as i64);
            d.labels = d.labels.narrow(0, 0, n as i64);
        }
        d.images = super::idx::downsample(&d.images, self.image_size.unwrap_or(super::idx::PADDED))?;
        if !self.conditional {
            d.labels = Tensor::full([d.labels.size()[0]], null_class, (Kind::Int64, d.labels.device()));
        }
        Ok(d)
    }
}

impl ImageFolderConfig {
    /// `path` with ${VAR} expanded, else $FLOWMAP_IMAGENET (class_folders) or $FLOWMAP_CELEBAHQ (flat).
    pub fn resolved_path(&self) -> Result<PathBuf> {
        let var = match self.layout {
            Layout::ClassFolders => "FLOWMAP_IMAGENET",
            Layout::Flat => "FLOWMAP_CELEBAHQ",
        };
        resolve(&self.path, var)
    }
}

impl LatentsConfig {
    /// `path` with ${VAR} expanded, else $FLOWMAP_LATENTS.
    pub fn resolved_path(&self) -> Result<PathBuf> {
        resolve(&self.path, "FLOWMAP_LATENTS")
    }
}

fn resolve(path: &Option<String>, var: &str) -> Result<PathBuf> {
    if let Some(p) = path {
        return Ok(PathBuf::from(expand_env(p).context("data.path")?));
    }
    std::env::var_os(var).map(PathBuf::from).with_context(|| format!("data.path is not set and neither is the environment variable {var}"))
}

/// Expands `${VAR}` (and `$VAR` up to a non-identifier character) from the environment; an unset
/// variable is an error naming it.
pub fn expand_env(text: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').with_context(|| format!("{text:?}: unclosed ${{"))?;
            (&inner[..end], &inner[end + 1..])
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        ensure!(!name.is_empty(), "{text:?}: `$` without a variable name");
        let value = std::env::var(name).map_err(|_| anyhow::anyhow!("{text:?}: environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}
