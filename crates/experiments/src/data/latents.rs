//! Cached VAE latents: an image folder encoded once into shards of the posterior (mean, std), so
//! training draws a fresh latent sample every step, x = (mean + std·eps)·scale (MeanFlow; the
//! posterior sampling of Shortcut's online encoding, methods.md §17).
//!
//! Output folder:
//! * `shard_00000.safetensors`, … : tensors `mean`, `std` (N, 4, S/8, S/8) in `dtype` (float16 by
//!   default, or float32), and when flips are stored `mean_flip`, `std_flip` (the encoding of the
//!   horizontally flipped image: flipping a latent is not the latent of the flipped image), plus
//!   `label` (N,) Int64 and `index` (N,) Int64 (the source file's index in the sorted listing).
//! * `manifest.json` (written atomically after every shard, `complete: true` at the end): the
//!   settings (source folder, listing sha256, layout, classes, image size, crop, VAE weights and
//!   sha256, scale, dtype, flips, shard size) and for each shard its file name, first source index,
//!   source count, rows and sha256; plus the skipped (unreadable) files.
//!
//! Rerunning with the same settings resumes: shards listed in the manifest whose sha256 verifies
//! are skipped, the rest are encoded again. Different settings are an error naming the field.
//! Shards cover fixed ranges of source indices (`shard_size` files each), so an interrupted and
//! resumed encode writes byte-identical shards and manifest to a straight one.
use super::image_folder::{hwc_to_chw, ImageFolder, Layout, SkipLog};
use crate::data::cache::sha256_file;
use crate::run::atomic_file::write_atomic;
use crate::run::rng::{self, Stream};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "flowmap-latents-v1";
/// The crop every shard is made with.
pub const CROP: &str = "adm_center_crop_arr";

/// Storage precision of mean and std.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LatentDtype {
    F16,
    F32,
}

impl LatentDtype {
    fn kind(self) -> Kind {
        match self {
            LatentDtype::F16 => Kind::Half,
            LatentDtype::F32 => Kind::Float,
        }
    }
    fn bytes(self) -> usize {
        match self {
            LatentDtype::F16 => 2,
            LatentDtype::F32 => 4,
        }
    }
    fn st_name(self) -> &'static str {
        match self {
            LatentDtype::F16 => "F16",
            LatentDtype::F32 => "F32",
        }
    }
}

/// The VAE that produced the latents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeIdentity {
    /// path as given
    pub weights: String,
    /// of the weights file
    pub sha256: String,
    /// latent scaling factor applied at training time (SD: 0.18215)
    pub scale: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    /// first source index covered
    pub first_index: usize,
    /// source indices covered (first_index .. first_index + sources)
    pub sources: usize,
    /// latents stored (sources minus skipped files)
    pub rows: usize,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedFile {
    pub index: usize,
    pub file: String,
    pub error: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub complete: bool,
    pub source: String,
    pub layout: Layout,
    pub listing_sha256: String,
    pub num_sources: usize,
    pub classes: Vec<String>,
    pub image_size: u32,
    pub crop: String,
    pub vae: VaeIdentity,
    pub latent_shape: Vec<i64>,
    pub dtype: LatentDtype,
    pub flip: bool,
    pub shard_size: usize,
    pub shards: Vec<ShardEntry>,
    pub skipped: Vec<SkippedFile>,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(m.format == FORMAT, "{}: format {:?}, expected {FORMAT:?}", path.display(), m.format);
        Ok(m)
    }
    pub fn num_rows(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }
    pub fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }
    fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(MANIFEST), (serde_json::to_string_pretty(self)? + "\n").as_bytes())
    }
    /// Checks every shard's sha256 (errors name the shard).
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for s in &self.shards {
            let got = sha256_file(&dir.join(&s.file))?;
            ensure!(got == s.sha256, "{}: sha256 {got}, the manifest says {} (re-run `flowmap latents` to re-encode it)", dir.join(&s.file).display(), s.sha256);
        }
        Ok(())
    }
}

/// Settings of one `flowmap latents` call.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub source: PathBuf,
    pub layout: Layout,
    pub out: PathBuf,
    pub image_size: u32,
    pub dtype: LatentDtype,
    pub flip: bool,
    pub shard_size: usize,
    pub batch: usize,
    pub workers: usize,
    /// Stop after writing this many shards in this call (tests: "interrupted").
    pub max_new_shards: Option<usize>,
}

impl EncodeOptions {
    /// Range checks before any work (errors name the `flowmap latents` argument). `factor` is the
    /// VAE's spatial downsampling factor (8 for sd-vae-ft-mse): latents of an image size that is
    /// not a multiple of it would not match any `data.image_size`.
    pub fn validate(&self, factor: i64) -> Result<()> {
        ensure!(factor >= 1, "the VAE's downsampling factor is {factor}");
        let s = self.image_size as i64;
        ensure!(s >= factor && s % factor == 0, "--image-size {s}: must be a multiple of the VAE's downsampling factor {factor}, at least {factor} (e.g. 256)");
        ensure!(self.shard_size >= 1, "--shard-size {}: must be >= 1", self.shard_size);
        ensure!(self.batch >= 1, "--batch {}: must be >= 1", self.batch);
        ensure!(self.workers >= 1, "--workers {}: must be >= 1", self.workers);
        Ok(())
    }
}

/// What an encode call did.
#[derive(Debug, Clone)]
pub struct EncodeReport {
    pub manifest: Manifest,
    pub encoded_shards: usize,
    pub verified_shards: usize,
    pub encoded_images: usize,
    pub seconds: f64,
    pub complete: bool,
}

/// Encodes `opts.source` with `encode` ((B, 3, S, S) in [−1, 1] → unscaled posterior (mean, std)),
/// resuming from an existing manifest in `opts.out`.
pub fn encode_folder(opts: &EncodeOptions, vae: VaeIdentity, latent_shape: Vec<i64>, encode: &mut dyn FnMut(&Tensor) -> Result<(Tensor, Tensor)>) -> Result<EncodeReport> {
    // The factor the encoder's latent shape (C, h, w) implies; an image size it does not divide
    // (or a zero-sized latent) fails `validate`.
    ensure!(latent_shape.len() == 3 && latent_shape.iter().all(|&d| d >= 1) && latent_shape[1] == latent_shape[2], "latent shape {latent_shape:?} for --image-size {}: expected (C, h, h) with h >= 1", opts.image_size);
    opts.validate(opts.image_size as i64 / latent_shape[1])?;
    let t0 = Instant::now();
    let folder = ImageFolder::scan(&opts.source, opts.layout)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    // One encoder per output folder: a second `flowmap latents` on it is refused, naming the first.
    let _lock = crate::run::file_lock::FileLock::try_acquire(&opts.out.join("LOCK"), &format!("latents folder {}", opts.out.display()))?;
    let mut manifest = Manifest {
        format: FORMAT.into(),
        complete: false,
        source: opts.source.display().to_string(),
        layout: opts.layout,
        listing_sha256: folder.listing_sha256(),
        num_sources: folder.len(),
        classes: folder.classes.clone(),
        image_size: opts.image_size,
        crop: CROP.into(),
        vae,
        latent_shape,
        dtype: opts.dtype,
        flip: opts.flip,
        shard_size: opts.shard_size,
        shards: vec![],
        skipped: vec![],
    };
    let mut done: Vec<ShardEntry> = vec![];
    let mut skipped: Vec<SkippedFile> = vec![];
    let mpath = opts.out.join(MANIFEST);
    if mpath.exists() {
        let old = Manifest::read(&mpath)?;
        let same = |field: &str, a: String, b: String| -> Result<()> {
            ensure!(a == b, "{}: {field} is {a}, this call has {b}; use another output folder (or delete it) to encode with new settings", mpath.display());
            Ok(())
        };
        same("source", old.source.clone(), manifest.source.clone())?;
        same("listing_sha256", old.listing_sha256.clone(), manifest.listing_sha256.clone())?;
        same("image_size", old.image_size.to_string(), opts.image_size.to_string())?;
        same("vae.sha256", old.vae.sha256.clone(), manifest.vae.sha256.clone())?;
        same("dtype", format!("{:?}", old.dtype), format!("{:?}", opts.dtype))?;
        same("flip", old.flip.to_string(), opts.flip.to_string())?;
        same("shard_size", old.shard_size.to_string(), opts.shard_size.to_string())?;
        for s in old.shards {
            let path = opts.out.join(&s.file);
            match sha256_file(&path) {
                Ok(sha) if sha == s.sha256 => {
                    skipped.extend(old.skipped.iter().filter(|k| (s.first_index..s.first_index + s.sources).contains(&k.index)).cloned());
                    done.push(s);
                }
                _ => tracing::warn!("{}: missing or its sha256 does not match the manifest; encoding it again", path.display()),
            }
        }
    }
    let verified_shards = done.len();
    let num_shards = folder.len().div_ceil(opts.shard_size);
    let (mut encoded_shards, mut encoded_images) = (0, 0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.workers.max(1)).build().context("starting the decode threads")?;
    for k in 0..num_shards {
        let first = k * opts.shard_size;
        if done.iter().any(|s| s.first_index == first) {
            continue;
        }
        if opts.max_new_shards.is_some_and(|m| encoded_shards >= m) {
            break;
        }
        let count = opts.shard_size.min(folder.len() - first);
        let skips = SkipLog::default();
        let (mut means, mut stds, mut fmeans, mut fstds, mut labels, mut indices) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut start = first;
        while start < first + count {
            let n = opts.batch.min(first + count - start);
            let idx: Vec<i64> = (start..start + n).map(|i| i as i64).collect();
            let batch = pool.install(|| load_batch_skipping(&folder, &idx, opts.image_size, &skips));
            let (b, used) = batch?;
            if !used.is_empty() {
                let s = opts.image_size as i64;
                let x = Tensor::from_slice(&b).reshape([used.len() as i64, 3, s, s]).to_kind(Kind::Float) / 127.5 - 1.0;
                let (m, sd) = tch::no_grad(|| encode(&x))?;
                means.push(m.to_device(Device::Cpu).to_kind(opts.dtype.kind()).contiguous());
                stds.push(sd.to_device(Device::Cpu).to_kind(opts.dtype.kind()).contiguous());
                if opts.flip {
                    let (m, sd) = tch::no_grad(|| encode(&x.flip([3])))?;
                    fmeans.push(m.to_device(Device::Cpu).to_kind(opts.dtype.kind()).contiguous());
                    fstds.push(sd.to_device(Device::Cpu).to_kind(opts.dtype.kind()).contiguous());
                }
                labels.extend(used.iter().map(|&u| folder.labels[u]));
                indices.extend(used.iter().map(|&u| u as i64));
                encoded_images += used.len();
            }
            start += n;
        }
        for (i, e) in skips.bad_files() {
            skipped.push(SkippedFile { index: i, file: folder.files[i].strip_prefix(&folder.root).unwrap_or(&folder.files[i]).display().to_string(), error: e });
        }
        let rows = labels.len();
        let file = format!("shard_{k:05}.safetensors");
        let path = opts.out.join(&file);
        let mut tensors: Vec<(&str, Tensor)> = vec![];
        let empty = || Tensor::zeros([0, manifest.latent_shape[0], manifest.latent_shape[1], manifest.latent_shape[2]], (opts.dtype.kind(), Device::Cpu));
        let cat = |v: &Vec<Tensor>| if v.is_empty() { empty() } else { Tensor::cat(v, 0).contiguous() };
        tensors.push(("mean", cat(&means)));
        tensors.push(("std", cat(&stds)));
        if opts.flip {
            tensors.push(("mean_flip", cat(&fmeans)));
            tensors.push(("std_flip", cat(&fstds)));
        }
        tensors.push(("label", Tensor::from_slice(&labels)));
        tensors.push(("index", Tensor::from_slice(&indices)));
        for (name, t) in &tensors[..2] {
            ensure!(t.size()[1..] == manifest.latent_shape[..], "the encoder returned {name} of shape {:?}, expected (N, {:?})", t.size(), manifest.latent_shape);
        }
        crate::run::atomic_file::write_atomic_to(&path, |tmp| Ok(Tensor::write_safetensors(&tensors, tmp)?))?;
        done.push(ShardEntry { file, first_index: first, sources: count, rows, sha256: sha256_file(&path)? });
        encoded_shards += 1;
        done.sort_by_key(|s| s.first_index);
        skipped.sort_by_key(|s| s.index);
        manifest.shards = done.clone();
        manifest.skipped = skipped.clone();
        manifest.complete = done.len() == num_shards;
        manifest.write(&opts.out)?;
        tracing::info!("{} ({rows} latents, {}/{} shards)", path.display(), done.len(), num_shards);
    }
    done.sort_by_key(|s| s.first_index);
    skipped.sort_by_key(|s| s.index);
    manifest.shards = done.clone();
    manifest.skipped = skipped;
    manifest.complete = done.len() == num_shards;
    manifest.write(&opts.out)?;
    Ok(EncodeReport { complete: manifest.complete, manifest, encoded_shards, verified_shards, encoded_images, seconds: t0.elapsed().as_secs_f64() })
}

/// Decodes `indices` (no flips), leaving unreadable files out (recorded in `skips`):
/// (CHW u8 rows, indices used).
fn load_batch_skipping(folder: &ImageFolder, indices: &[i64], size: u32, skips: &SkipLog) -> Result<(Vec<u8>, Vec<usize>)> {
    use rayon::prelude::*;
    let s = size as usize;
    let rows: Vec<Option<(usize, Vec<u8>)>> = indices
        .par_iter()
        .map(|&i| {
            let i = i as usize;
            match folder.load(i, size) {
                Ok(hwc) => Some((i, hwc_to_chw(&hwc, s, false))),
                Err(e) => {
                    skips.record(i, &folder.files[i], &e);
                    None
                }
            }
        })
        .collect();
    let mut out = Vec::with_capacity(rows.len() * 3 * s * s);
    let mut used = vec![];
    for (i, px) in rows.into_iter().flatten() {
        out.extend_from_slice(&px);
        used.push(i);
    }
    Ok((out, used))
}

/// Byte range of one tensor inside a safetensors file.
#[derive(Debug, Clone, Copy)]
struct TensorSpan {
    start: u64,
    row_bytes: u64,
}

/// The header of a safetensors file: name → (dtype, shape, absolute byte offset of the data).
fn safetensors_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0).with_context(|| format!("{}: reading the safetensors header", path.display()))?;
    let n = u64::from_le_bytes(n);
    ensure!(n < 100 << 20, "{}: safetensors header of {n} bytes", path.display());
    let mut h = vec![0u8; n as usize];
    f.read_exact_at(&mut h, 8).with_context(|| format!("{}: reading the safetensors header", path.display()))?;
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&h).with_context(|| format!("{}: parsing the safetensors header", path.display()))?;
    for v in map.values_mut() {
        if let Some(off) = v.get_mut("data_offsets").and_then(|o| o.as_array_mut()) {
            for o in off.iter_mut() {
                *o = serde_json::json!(o.as_u64().unwrap_or(0) + 8 + n);
            }
        }
    }
    Ok(map)
}

struct ShardFile {
    file: File,
    mean: TensorSpan,
    std: TensorSpan,
    flip: Option<(TensorSpan, TensorSpan)>,
}

/// Training reader over cached latents: rows read on demand (`pread`, the OS page cache does the
/// rest), labels in memory, a fresh posterior sample per step.
pub struct LatentReader {
    pub manifest: Manifest,
    pub dir: PathBuf,
    shards: Vec<ShardFile>,
    /// First global row of each shard.
    offsets: Vec<usize>,
    labels: Vec<i64>,
    pub flip: bool,
    pub seed: u64,
    pub null_class: Option<i64>,
    row_elems: i64,
}

impl LatentReader {
    /// Opens a latents folder (or its manifest.json). With `verify`, checks every shard's sha256.
    pub fn open(path: &Path, verify: bool, flip: bool, seed: u64, null_class: Option<i64>) -> Result<Self> {
        let (dir, mpath) = if path.is_dir() { (path.to_path_buf(), path.join(MANIFEST)) } else { (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf()) };
        ensure!(mpath.exists(), "no latents manifest at {} (encode the images with `flowmap latents`)", mpath.display());
        let manifest = Manifest::read(&mpath)?;
        ensure!(manifest.complete, "{}: the encode is not complete ({} shards written); re-run `flowmap latents` with the same arguments to finish it", mpath.display(), manifest.shards.len());
        if verify {
            manifest.verify(&dir)?;
        }
        let row_elems: i64 = manifest.latent_shape.iter().product();
        let row_bytes = row_elems as u64 * manifest.dtype.bytes() as u64;
        let (mut shards, mut offsets, mut labels) = (vec![], vec![], vec![]);
        let mut total = 0;
        for s in &manifest.shards {
            let p = dir.join(&s.file);
            let header = safetensors_header(&p)?;
            let span = |name: &str| -> Result<TensorSpan> {
                let v = header.get(name).with_context(|| format!("{}: no tensor `{name}`", p.display()))?;
                let dtype = v["dtype"].as_str().unwrap_or("");
                ensure!(dtype == manifest.dtype.st_name(), "{}: `{name}` is {dtype}, the manifest says {:?}", p.display(), manifest.dtype);
                let shape: Vec<i64> = v["shape"].as_array().map(|a| a.iter().filter_map(|x| x.as_i64()).collect()).unwrap_or_default();
                ensure!(shape.len() == 4 && shape[0] as usize == s.rows && shape[1..] == manifest.latent_shape[..], "{}: `{name}` has shape {shape:?}, expected ({}, {:?})", p.display(), s.rows, manifest.latent_shape);
                Ok(TensorSpan { start: v["data_offsets"][0].as_u64().unwrap_or(0), row_bytes })
            };
            let (mean, std) = (span("mean")?, span("std")?);
            let fl = if manifest.flip { Some((span("mean_flip")?, span("std_flip")?)) } else { None };
            let lab = Tensor::read_safetensors(&p).with_context(|| format!("reading {}", p.display()))?.into_iter().find(|(n, _)| n == "label").with_context(|| format!("{}: no tensor `label`", p.display()))?.1;
            let lab: Vec<i64> = Vec::try_from(&lab)?;
            ensure!(lab.len() == s.rows, "{}: {} labels for {} rows", p.display(), lab.len(), s.rows);
            labels.extend(lab);
            offsets.push(total);
            total += s.rows;
            shards.push(ShardFile { file: File::open(&p).with_context(|| format!("opening {}", p.display()))?, mean, std, flip: fl });
        }
        ensure!(total >= 1, "{}: no latents", mpath.display());
        Ok(Self { manifest, dir, shards, offsets, labels, flip, seed, null_class, row_elems })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn locate(&self, row: usize) -> (usize, u64) {
        let k = self.offsets.partition_point(|&o| o <= row) - 1;
        (k, (row - self.offsets[k]) as u64)
    }

    /// Unscaled (mean, std) rows, (B, C, h, w) Float on the CPU; `flips` picks the flipped
    /// encodings (when stored).
    pub fn moments(&self, indices: &[i64], flips: &[bool]) -> Result<(Tensor, Tensor)> {
        let rb = self.row_elems as usize * self.manifest.dtype.bytes();
        let mut mean = vec![0u8; indices.len() * rb];
        let mut std = vec![0u8; indices.len() * rb];
        for (j, &i) in indices.iter().enumerate() {
            ensure!(i >= 0 && (i as usize) < self.len(), "latent row {i} out of range (0..{})", self.len());
            let (k, r) = self.locate(i as usize);
            let sh = &self.shards[k];
            let (ms, ss) = match (flips.get(j).copied().unwrap_or(false), sh.flip) {
                (true, Some(f)) => f,
                _ => (sh.mean, sh.std),
            };
            sh.file.read_exact_at(&mut mean[j * rb..(j + 1) * rb], ms.start + r * ms.row_bytes).with_context(|| format!("reading {}", self.manifest.shards[k].file))?;
            sh.file.read_exact_at(&mut std[j * rb..(j + 1) * rb], ss.start + r * ss.row_bytes).with_context(|| format!("reading {}", self.manifest.shards[k].file))?;
        }
        let mut shape = vec![indices.len() as i64];
        shape.extend_from_slice(&self.manifest.latent_shape);
        let kind = self.manifest.dtype.kind();
        let t = |b: &[u8]| Tensor::from_data_size(b, &shape, kind).to_kind(Kind::Float);
        Ok((t(&mean), t(&std)))
    }

    /// The batch of draw key `key` ([`rng::draw_key`]): x = (mean + std·eps)·scale with eps from
    /// the Latent stream of (seed, key), flips from the Augment stream; classes (or the null class).
    pub fn batch(&self, indices: &[i64], key: u64, device: Device) -> Result<(Tensor, Tensor)> {
        let flips = if self.flip && self.manifest.flip { super::image_folder::flips(self.seed, key, indices.len()) } else { vec![false; indices.len()] };
        let (mean, std) = self.moments(indices, &flips)?;
        let (mean, std) = (mean.to_device(device), std.to_device(device));
        rng::reseed(self.seed, key, Stream::Latent);
        let eps = Tensor::randn(mean.size().as_slice(), (Kind::Float, device));
        let x = (mean + std * eps) * self.manifest.vae.scale;
        let class = match self.null_class {
            Some(null) => Tensor::full([indices.len() as i64], null, (Kind::Int64, device)),
            None => Tensor::from_slice(&indices.iter().map(|&i| self.labels[i as usize]).collect::<Vec<_>>()).to_device(device),
        };
        Ok((x, class))
    }
}
