//! `[data]` table: which data set a run trains on, and the [`DataSource`] that serves batches.
//!
//! ```toml
//! [data]                                   # built-in, in memory (unchanged)
//! dataset = "mnist"                        # | "fashion_mnist"
//! conditional = true
//!
//! [data]                                   # pixels from an image folder, decoded while training
//! dataset = "image_folder"
//! path = "${IMAGENET_DIR}/train"           # ${VAR} expanded; default $FLOWMAP_IMAGENET (class_folders) or $FLOWMAP_CELEBAHQ (flat)
//! layout = "class_folders"                 # | "flat"
//! conditional = true
//! num_classes = 1000                       # checked against the folder
//! image_size = 256                         # ADM center crop; default 256
//!
//! [data]                                   # cached SD-VAE latents (`flowmap latents`)
//! dataset = "latents"
//! path = "${FLOWMAP_LATENTS}/imagenet256"  # the folder or its manifest.json; default $FLOWMAP_LATENTS
//! conditional = true
//! num_classes = 1000
//! image_size = 256                         # latents are 4 × image_size/8 × image_size/8
//! ```
use super::idx::{read_pair, split_files, LabelledImages, Split};
use super::image_folder::{FolderReader, ImageFolder, Layout};
use super::latents::LatentReader;
use crate::data::cache;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// Where the images come from.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataSet {
    /// Built-in (package registries, data/SHA256SUMS), held in memory.
    Mnist,
    FashionMnist,
    /// JPEG/PNG files under `path` (ImageNet train layout or a flat folder), decoded each step.
    ImageFolder,
    /// SD-VAE posterior moments written by `flowmap latents`.
    Latents,
}

/// `[data]`: data set, split, and whether labels condition the model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// "mnist" | "fashion_mnist" | "image_folder" | "latents"
    pub dataset: DataSet,
    /// mnist/fashion_mnist: "train" (default) | "test"
    #[serde(default = "default_split")]
    pub split: SplitName,
    /// class-conditional or unconditional (all null)
    #[serde(default)]
    pub conditional: bool,
    /// use only the first `limit` images (smoke tests)
    #[serde(default)]
    pub limit: Option<usize>,
    /// image_folder: the root; latents: the folder or manifest.json; ${VAR} expanded
    #[serde(default)]
    pub path: Option<String>,
    /// image_folder: "class_folders" (default) | "flat"
    #[serde(default)]
    pub layout: Option<Layout>,
    /// image_folder/latents with conditional = true: K (checked against the data)
    #[serde(default)]
    pub num_classes: Option<i64>,
    /// image_folder/latents: crop size in pixels; default 256
    #[serde(default)]
    pub image_size: Option<i64>,
    /// image_folder/latents: random horizontal flip; default true
    #[serde(default)]
    pub flip: Option<bool>,
    /// image_folder: decode threads; default: all cores
    #[serde(default)]
    pub workers: Option<usize>,
    /// image_folder: batches decoded ahead; default 2
    #[serde(default)]
    pub prefetch: Option<usize>,
    #[serde(default)]
    pub reflow_pairs: Option<String>, // train on stored (noise, sample) pairs from `flowmap reflow-pairs` (two-stage reflow); the other fields still describe the data
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

/// A source of training batches.
pub trait DataSource {
    /// Items (images or latent rows) one epoch draws from.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Classes the labels range over (0 when unconditional).
    fn num_classes(&self) -> i64;
    /// Shape of one training sample, e.g. [1, 32, 32], [3, 256, 256], [4, 32, 32].
    fn sample_shape(&self) -> Vec<i64>;
    /// One line for the log.
    fn describe(&self) -> String;
    /// Starts preparing the batches of steps `first_step`, `first_step + 1`, … (a hint).
    fn prefetch(&mut self, _first_step: u64, _upcoming: &[Vec<i64>]) {}
    /// How many batches ahead [`DataSource::prefetch`] wants.
    fn prefetch_depth(&self) -> usize {
        0
    }
    /// The batch of `indices` for `step`: (x, class) on `device`. A pure function of
    /// (data, indices, step, seed), so a resumed run reads the same batches.
    fn batch(&mut self, indices: &[i64], step: u64, device: Device) -> Result<(Tensor, Tensor)>;
    /// The stored noise of each row when the data are (noise, sample) couplings (reflow pairs).
    fn coupled_noise(&mut self, _indices: &[i64], _device: Device) -> Option<Tensor> {
        None
    }
    /// Unreadable files skipped so far (image folders).
    fn skipped(&self) -> usize {
        0
    }
}

/// MNIST / Fashion-MNIST in memory.
pub struct InMemory {
    pub images: Tensor,
    pub labels: Tensor,
    /// (N, ...) noise coupled to each image (reflow pairs), or None for independent data.
    pub noise: Option<Tensor>,
    pub num_classes: i64,
    pub name: String,
}

impl DataSource for InMemory {
    fn len(&self) -> usize {
        self.images.size()[0] as usize
    }
    fn num_classes(&self) -> i64 {
        self.num_classes
    }
    fn sample_shape(&self) -> Vec<i64> {
        self.images.size()[1..].to_vec()
    }
    fn describe(&self) -> String {
        format!("{}: {} images in memory", self.name, self.len())
    }
    fn batch(&mut self, indices: &[i64], _step: u64, device: Device) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(indices);
        Ok((self.images.index_select(0, &idx).to_device(device), self.labels.index_select(0, &idx).to_device(device)))
    }
    fn coupled_noise(&mut self, indices: &[i64], device: Device) -> Option<Tensor> {
        self.noise.as_ref().map(|n| n.index_select(0, &Tensor::from_slice(indices)).to_device(device))
    }
}

impl DataSource for FolderReader {
    fn len(&self) -> usize {
        self.folder.len()
    }
    fn num_classes(&self) -> i64 {
        if self.null_class.is_some() {
            0
        } else {
            self.folder.num_classes()
        }
    }
    fn sample_shape(&self) -> Vec<i64> {
        vec![3, self.size as i64, self.size as i64]
    }
    fn describe(&self) -> String {
        format!("image folder {} ({}): {} images, {} classes, {}² center crop, flip {}", self.folder.root.display(), self.folder.layout.name(), self.folder.len(), self.folder.num_classes(), self.size, self.flip)
    }
    fn prefetch(&mut self, first_step: u64, upcoming: &[Vec<i64>]) {
        FolderReader::prefetch(self, first_step, upcoming)
    }
    fn prefetch_depth(&self) -> usize {
        self.depth()
    }
    fn batch(&mut self, indices: &[i64], step: u64, device: Device) -> Result<(Tensor, Tensor)> {
        FolderReader::batch(self, indices, step, device)
    }
    fn skipped(&self) -> usize {
        self.skips.count()
    }
}

impl DataSource for LatentReader {
    fn len(&self) -> usize {
        LatentReader::len(self)
    }
    fn num_classes(&self) -> i64 {
        if self.null_class.is_some() {
            0
        } else {
            self.manifest.num_classes()
        }
    }
    fn sample_shape(&self) -> Vec<i64> {
        self.manifest.latent_shape.clone()
    }
    fn describe(&self) -> String {
        let m = &self.manifest;
        format!(
            "latents {} ({} rows from {}, {:?} latents {:?} of {}² crops, flips stored {}, {} classes, VAE sha256 {}…)",
            self.dir.display(),
            self.len(),
            m.source,
            m.dtype,
            m.latent_shape,
            m.image_size,
            m.flip,
            m.num_classes(),
            &m.vae.sha256[..m.vae.sha256.len().min(12)]
        )
    }
    fn batch(&mut self, indices: &[i64], step: u64, device: Device) -> Result<(Tensor, Tensor)> {
        LatentReader::batch(self, indices, step, device)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    Train,
    Test,
}

fn default_split() -> SplitName {
    SplitName::Train
}

impl DataSet {
    pub const NUM_CLASSES: i64 = 10;
    /// (channels, height, width) of one built-in image.
    pub fn shape(self) -> [i64; 3] {
        [1, super::idx::PADDED, super::idx::PADDED]
    }
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
            DataSet::ImageFolder | DataSet::Latents => bail!("data set {} is not built in", self.name()),
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

pub const DEFAULT_IMAGE_SIZE: i64 = 256;
/// SD-VAE: 4 latent channels, 8× downsampling.
pub const LATENT_CHANNELS: i64 = 4;
pub const LATENT_FACTOR: i64 = 8;

impl DataConfig {
    /// Number of classes the model must embed (0 when unconditional).
    pub fn num_classes(&self) -> i64 {
        match (self.conditional, self.dataset.is_builtin()) {
            (false, _) => 0,
            (true, true) => DataSet::NUM_CLASSES,
            (true, false) => self.num_classes.unwrap_or(0),
        }
    }

    pub fn image_size(&self) -> i64 {
        self.image_size.unwrap_or(DEFAULT_IMAGE_SIZE)
    }

    /// Shape of one training sample as the config states it (checked against the data on open).
    pub fn sample_shape(&self) -> Vec<i64> {
        let s = self.image_size();
        match self.dataset {
            DataSet::Mnist | DataSet::FashionMnist => self.dataset.shape().to_vec(),
            DataSet::ImageFolder => vec![3, s, s],
            DataSet::Latents => vec![LATENT_CHANNELS, s / LATENT_FACTOR, s / LATENT_FACTOR],
        }
    }

    /// Field checks that need no file system.
    pub fn validate(&self) -> Result<()> {
        let name = self.dataset.name();
        if let Some(n) = self.limit {
            ensure!(n >= 1, "data.limit = {n}: must be >= 1 (leave it out to use all the data)");
        }
        if let Some(p) = &self.reflow_pairs {
            ensure!(!p.is_empty(), "data.reflow_pairs: empty path (a file made by `flowmap reflow-pairs`)");
        }
        if self.dataset.is_builtin() {
            for (set, key) in [
                (self.path.is_some(), "path"),
                (self.layout.is_some(), "layout"),
                (self.num_classes.is_some(), "num_classes"),
                (self.image_size.is_some(), "image_size"),
                (self.flip.is_some(), "flip"),
                (self.workers.is_some(), "workers"),
                (self.prefetch.is_some(), "prefetch"),
            ] {
                ensure!(!set, "data.{key} is for dataset = \"image_folder\" or \"latents\", not {name:?}");
            }
            if let (Some(n), None, Some(total)) = (self.limit, &self.reflow_pairs, self.dataset.split_len(self.split)) {
                ensure!(n <= total, "data.limit = {n}: must be between 1 and {total} (the size of {name} {:?})", self.split);
            }
            return Ok(());
        }
        ensure!(self.path.as_ref().is_none_or(|p| !p.is_empty()), "data.path: empty path");
        if let Some(w) = self.workers {
            ensure!(w >= 1, "data.workers = {w}: must be >= 1 (leave it out to use all cores)");
        }
        ensure!(self.split == SplitName::Train, "data.split is for the built-in data sets; {name} reads all of data.path");
        if self.conditional {
            ensure!(self.num_classes.is_some_and(|k| k >= 1), "data.conditional = true with dataset = {name:?} needs data.num_classes (e.g. 1000 for ImageNet); it is checked against the data");
        } else {
            ensure!(self.num_classes.is_none(), "data.num_classes is only for conditional = true");
        }
        let s = self.image_size();
        ensure!(s >= LATENT_FACTOR && s % LATENT_FACTOR == 0, "data.image_size = {s}: must be a multiple of {LATENT_FACTOR}, at least {LATENT_FACTOR}");
        if self.dataset == DataSet::Latents {
            ensure!(self.limit.is_none(), "data.limit is not supported with latents");
            for (set, key) in [(self.layout.is_some(), "layout"), (self.workers.is_some(), "workers"), (self.prefetch.is_some(), "prefetch")] {
                ensure!(!set, "data.{key} is for dataset = \"image_folder\" (the latents manifest records the layout)");
            }
        }
        Ok(())
    }

    /// The folder (image_folder) or latents folder/manifest (latents): `path` with ${VAR}
    /// expanded, else the environment (FLOWMAP_IMAGENET for class_folders, FLOWMAP_CELEBAHQ for
    /// flat, FLOWMAP_LATENTS for latents).
    pub fn resolved_path(&self) -> Result<PathBuf> {
        if let Some(p) = &self.path {
            return Ok(PathBuf::from(expand_env(p).context("data.path")?));
        }
        let var = match (self.dataset, self.layout.unwrap_or(Layout::ClassFolders)) {
            (DataSet::Latents, _) => "FLOWMAP_LATENTS",
            (DataSet::ImageFolder, Layout::ClassFolders) => "FLOWMAP_IMAGENET",
            (DataSet::ImageFolder, Layout::Flat) => "FLOWMAP_CELEBAHQ",
            _ => bail!("data set {} has no path", self.dataset.name()),
        };
        std::env::var_os(var).map(PathBuf::from).with_context(|| format!("data.path is not set and neither is the environment variable {var}"))
    }

    /// Opens the data for training: built-in sets are loaded into memory; folders and latents
    /// are listed (and checked against the config) and read while training. `verify`: check the
    /// latents' shard checksums (slow on big sets; the dry run does it).
    pub fn open(&self, null_class: i64, seed: u64, verify: bool) -> Result<Box<dyn DataSource>> {
        self.validate()?;
        let null = (!self.conditional).then_some(null_class);
        if let Some(pairs) = &self.reflow_pairs {
            let path = PathBuf::from(expand_env(pairs).context("data.reflow_pairs")?);
            let p = crate::data::reflow_pairs::load_pairs(&path)?;
            ensure!(p.x.size()[1..] == self.sample_shape()[..], "{}: pairs of shape {:?}, the data's samples are {:?}", path.display(), &p.x.size()[1..], self.sample_shape());
            let labels = if self.conditional { p.class } else { p.class.full_like(null_class) };
            let name = format!("reflow pairs {}", path.display());
            return Ok(Box::new(InMemory { images: p.x, labels, noise: Some(p.noise), num_classes: self.num_classes(), name }));
        }
        let source: Box<dyn DataSource> = match self.dataset {
            DataSet::Mnist | DataSet::FashionMnist => {
                let d = self.load(null_class)?;
                Box::new(InMemory { images: d.images, labels: d.labels, noise: None, num_classes: self.num_classes(), name: format!("{} {:?}", self.dataset.name(), self.split) })
            }
            DataSet::ImageFolder => {
                let root = self.resolved_path()?;
                let mut folder = ImageFolder::scan(&root, self.layout.unwrap_or(Layout::ClassFolders))?;
                if let Some(n) = self.limit {
                    ensure!(n >= 1 && n <= folder.len(), "data.limit = {n} must be between 1 and {} (the images in {})", folder.len(), root.display());
                    folder.files.truncate(n);
                    folder.labels.truncate(n);
                }
                let workers = self.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
                Box::new(FolderReader::new(folder, self.image_size() as u32, self.flip.unwrap_or(true), seed, null, workers, self.prefetch.unwrap_or(2))?)
            }
            DataSet::Latents => {
                let path = self.resolved_path()?;
                let r = LatentReader::open(&path, verify, self.flip.unwrap_or(true), seed, null)?;
                ensure!(r.manifest.image_size as i64 == self.image_size(), "{}: latents of {}² images, the config says data.image_size = {}", path.display(), r.manifest.image_size, self.image_size());
                Box::new(r)
            }
        };
        if self.conditional && !self.dataset.is_builtin() {
            let want = self.num_classes();
            let got = source.num_classes();
            ensure!(got == want, "data.num_classes = {want} but the data has {got} classes");
        }
        ensure!(source.sample_shape() == self.sample_shape(), "the data's samples are {:?}, the config implies {:?}", source.sample_shape(), self.sample_shape());
        Ok(source)
    }

    /// The training tensors of a built-in data set: x (N, 1, 32, 32) and class (N,), where unconditional data gets the
    /// null class `null_class` on every row.
    pub fn load(&self, null_class: i64) -> Result<LabelledImages> {
        let mut d = self.dataset.load(self.split)?;
        if let Some(n) = self.limit {
            let total = d.images.size()[0] as usize;
            if n == 0 || n > total {
                bail!("data.limit = {n} must be between 1 and {total} (the size of {} {:?})", self.dataset.name(), self.split);
            }
            d.images = d.images.narrow(0, 0, n as i64);
            d.labels = d.labels.narrow(0, 0, n as i64);
        }
        if !self.conditional {
            d.labels = Tensor::full([d.labels.size()[0]], null_class, (Kind::Int64, d.labels.device()));
        }
        Ok(d)
    }
}
