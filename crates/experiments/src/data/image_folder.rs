//! Image-folder data sets (ImageNet's train layout, CelebA-HQ as a flat folder): listing, ADM's
//! center crop, reproducible flips, parallel decoding with bounded prefetch, and corrupt files
//! skipped (counted, reported, replaced by the next readable index) instead of crashing a run.
//!
//! Layouts:
//! * `class_folders`: `root/<class>/<image>`; class folder names sorted → class ids 0..K−1
//!   (ImageNet's synsets `n01440764` … give torchvision's `ImageFolder` ids).
//! * `flat`: `root/<image>` (unconditional; sub-folders are ignored).
//!
//! Files ending in .jpg, .jpeg, .png (any case) are listed, sorted by path.
//!
//! Pre-processing is ADM's `center_crop_arr` (guided-diffusion `image_datasets.py`): halve with
//! PIL's BOX filter while the short side is ≥ 2·size, BICUBIC-resize so the short side is `size`
//! (Python's round-half-even for the long side), then center crop. The resampling is a port of
//! PIL's separable `ImagingResample` (same filters, supports and coefficient normalisation) in
//! float with rounding to u8 after each pass (PIL uses 22-bit fixed point: ±1 on rare pixels).
use crate::run::rng::{self, Stream};
use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// How the images are arranged under the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// One folder per class (ImageNet train); class ids from the sorted folder names.
    /// On the command line `class-folders`, and the config spelling `class_folders` too.
    #[value(alias = "class_folders")]
    ClassFolders,
    /// All images directly in the root (CelebA-HQ); unconditional.
    Flat,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::ClassFolders => "class_folders",
            Layout::Flat => "flat",
        }
    }
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")).unwrap_or(false)
}

fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        if is_image(&path) && entry.file_type().map(|t| !t.is_dir()).unwrap_or(false) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A listed image folder: every file with its class id.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub layout: Layout,
    pub files: Vec<PathBuf>,
    pub labels: Vec<i64>,
    /// Sorted class folder names (empty for `flat`).
    pub classes: Vec<String>,
}

impl ImageFolder {
    /// Lists `root` (errors name the folder; an empty folder is an error).
    pub fn scan(root: &Path, layout: Layout) -> Result<Self> {
        ensure!(root.is_dir(), "image folder {} does not exist or is not a folder", root.display());
        let (mut files, mut labels, mut classes) = (Vec::new(), Vec::new(), Vec::new());
        match layout {
            Layout::Flat => {
                files = list_images(root)?;
                labels = vec![0; files.len()];
            }
            Layout::ClassFolders => {
                let mut dirs: Vec<PathBuf> = std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))?.filter_map(|e| e.ok()).filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false)).map(|e| e.path()).collect();
                dirs.sort();
                ensure!(!dirs.is_empty(), "{}: layout = \"class_folders\" but there are no class folders (use layout = \"flat\" for a folder of images)", root.display());
                for (id, dir) in dirs.iter().enumerate() {
                    let f = list_images(dir)?;
                    labels.extend(std::iter::repeat_n(id as i64, f.len()));
                    files.extend(f);
                    classes.push(dir.file_name().and_then(|n| n.to_str()).context("non-UTF-8 class folder name")?.to_string());
                }
            }
        }
        ensure!(!files.is_empty(), "{}: no .jpg/.jpeg/.png images found (layout = \"{}\")", root.display(), layout.name());
        Ok(Self { root: root.to_path_buf(), layout, files, labels, classes })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Classes the data can condition on (0 for a flat folder).
    pub fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }

    /// sha256 of the relative file list and labels (the identity of the listing, not of the bytes).
    pub fn listing_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (f, l) in self.files.iter().zip(&self.labels) {
            h.update(f.strip_prefix(&self.root).unwrap_or(f).to_string_lossy().as_bytes());
            h.update([0u8]);
            h.update(l.to_le_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Decodes one image and center-crops it: (size·size·3) RGB u8, row-major HWC.
    pub fn load(&self, index: usize, size: u32) -> Result<Vec<u8>> {
        load_center_cropped(&self.files[index], size)
    }
}

/// Decodes a JPEG/PNG file (any colour type → RGB8) and applies [`center_crop_arr`]. A JPEG cut
/// short is an error: the decoder would fill the missing part with grey.
pub fn load_center_cropped(path: &Path, size: u32) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(&[0xFF, 0xD8]) {
        ensure!(jpeg_is_complete(&bytes), "{}: truncated JPEG (no end-of-image marker after the image data)", path.display());
    }
    let img = image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format().with_context(|| format!("reading {}", path.display()))?.decode().with_context(|| format!("decoding {}", path.display()))?.to_rgb8();
    let (w, h) = img.dimensions();
    ensure!(w >= 1 && h >= 1, "{}: empty image", path.display());
    Ok(center_crop_arr(img.as_raw(), w as usize, h as usize, size as usize))
}

/// Whether a JPEG's marker structure runs to an end-of-image marker (EOI, FF D9): segments are
/// skipped by their length, entropy-coded data up to the next marker (FF 00 is a stuffed byte,
/// FF D0–D7 restart markers). A file cut anywhere before its EOI fails; bytes after it are ignored,
/// and so are stray bytes before a marker (libjpeg's "extraneous bytes before marker" warning).
fn jpeg_is_complete(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    loop {
        // A marker: one or more FF fill bytes, then the code.
        match b.get(i..).and_then(|rest| rest.iter().position(|&x| x == 0xFF)) {
            Some(skip) => i += skip,
            None => return false,
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&code) = b.get(i) else { return false };
        i += 1;
        match code {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue, // standalone markers
            _ => {}
        }
        let Some(len) = b.get(i..i + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else { return false };
        if len < 2 {
            return false;
        }
        i += len;
        if code == 0xDA {
            // Entropy-coded data of a scan: runs to the next marker that is not a stuffed byte or a restart.
            loop {
                match b.get(i..i + 2) {
                    None => return false,
                    Some([0xFF, n]) if *n != 0x00 && !(0xD0..=0xD7).contains(n) && *n != 0xFF => break,
                    _ => i += 1,
                }
            }
        }
    }
}

/// ADM's `center_crop_arr` on an RGB8 image (HWC); returns size×size×3.
pub fn center_crop_arr(rgb: &[u8], w: usize, h: usize, size: usize) -> Vec<u8> {
    let (mut buf, mut w, mut h) = (rgb.to_vec(), w, h);
    while w.min(h) >= 2 * size {
        let (nw, nh) = (w / 2, h / 2);
        buf = resample(&buf, w, h, nw, nh, Filter::Box);
        (w, h) = (nw, nh);
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (((w as f64) * scale).round_ties_even() as usize, ((h as f64) * scale).round_ties_even() as usize);
    if (nw, nh) != (w, h) {
        buf = resample(&buf, w, h, nw, nh, Filter::Bicubic);
        (w, h) = (nw, nh);
    }
    let (cy, cx) = ((h - size) / 2, (w - size) / 2);
    let mut out = Vec::with_capacity(size * size * 3);
    for y in cy..cy + size {
        out.extend_from_slice(&buf[(y * w + cx) * 3..(y * w + cx + size) * 3]);
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Filter {
    Box,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// PIL's `precompute_coeffs`: for each output pixel, (first input pixel, normalised weights).
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<f32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax).map(|x| filter.eval((x as f64 - center + 0.5) / filterscale)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            (xmin, k.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

fn clip8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Separable resampling of an RGB8 image, horizontal pass first (as PIL), u8 between passes.
fn resample(src: &[u8], w: usize, h: usize, nw: usize, nh: usize, filter: Filter) -> Vec<u8> {
    let mut cur = src.to_vec();
    let mut cw = w;
    if nw != w {
        let k = coeffs(w, nw, filter);
        let mut out = vec![0u8; nw * h * 3];
        for y in 0..h {
            let row = &cur[y * cw * 3..(y + 1) * cw * 3];
            for (x, (x0, ws)) in k.iter().enumerate() {
                for c in 0..3 {
                    let s: f32 = ws.iter().enumerate().map(|(i, wt)| wt * row[(x0 + i) * 3 + c] as f32).sum();
                    out[(y * nw + x) * 3 + c] = clip8(s);
                }
            }
        }
        cur = out;
        cw = nw;
    }
    if nh != h {
        let k = coeffs(h, nh, filter);
        let mut out = vec![0u8; cw * nh * 3];
        for (y, (y0, ws)) in k.iter().enumerate() {
            for x in 0..cw * 3 {
                let s: f32 = ws.iter().enumerate().map(|(i, wt)| wt * cur[(y0 + i) * cw * 3 + x] as f32).sum();
                out[y * cw * 3 + x] = clip8(s);
            }
        }
        cur = out;
    }
    cur
}

/// Horizontal flips of a batch: one bit per row from (seed, draw key) on the Augment stream, so a
/// resumed run (and a prefetching thread) draws the same flips.
pub fn flips(seed: u64, key: u64, n: usize) -> Vec<bool> {
    let mut r = ChaCha8Rng::seed_from_u64(rng::seed(seed, key, Stream::Augment) as u64);
    (0..n).map(|_| r.gen::<bool>()).collect()
}

/// A decoded batch on the CPU: images (B, 3, S, S) u8 and classes (B,).
pub struct U8Batch {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    /// Source index actually used for each row (differs from the requested one after a skip).
    pub used: Vec<usize>,
}

/// Files that failed to decode: counted once each, with the first error.
#[derive(Debug, Default)]
pub struct SkipLog {
    bad: Mutex<BTreeMap<usize, String>>,
    /// Rows replaced in batches so far (a bad file drawn twice counts twice).
    pub replaced_rows: AtomicU64,
}

impl SkipLog {
    pub fn is_bad(&self, i: usize) -> bool {
        self.bad.lock().expect("skip log").contains_key(&i)
    }
    pub fn record(&self, i: usize, path: &Path, err: &anyhow::Error) {
        let mut bad = self.bad.lock().expect("skip log");
        if let std::collections::btree_map::Entry::Vacant(e) = bad.entry(i) {
            tracing::warn!("skipping unreadable image {} ({err:#}); using the next index instead", path.display());
            e.insert(format!("{err:#}"));
        }
    }
    /// (index, error) of every bad file seen so far.
    pub fn bad_files(&self) -> Vec<(usize, String)> {
        self.bad.lock().expect("skip log").iter().map(|(k, v)| (*k, v.clone())).collect()
    }
    pub fn count(&self) -> usize {
        self.bad.lock().expect("skip log").len()
    }
}

/// Tries `index`, then index+1, … (mod N) until one decodes; at most `MAX_TRIES`.
const MAX_TRIES: usize = 64;

pub fn load_with_replacement(folder: &ImageFolder, index: usize, size: u32, skips: &SkipLog) -> Result<(usize, Vec<u8>)> {
    let n = folder.len();
    let mut replaced = false;
    for k in 0..MAX_TRIES.min(n) {
        let i = (index + k) % n;
        if skips.is_bad(i) {
            replaced = true;
            continue;
        }
        match folder.load(i, size) {
            Ok(px) => {
                if replaced {
                    skips.replaced_rows.fetch_add(1, Ordering::Relaxed);
                }
                return Ok((i, px));
            }
            Err(e) => {
                skips.record(i, &folder.files[i], &e);
                replaced = true;
            }
        }
    }
    bail!("{}: {MAX_TRIES} consecutive images from index {index} could not be decoded (see the warnings above)", folder.root.display())
}

/// HWC → CHW of an s×s RGB image, with mirrored columns when `flip`.
pub fn hwc_to_chw(hwc: &[u8], s: usize, flip: bool) -> Vec<u8> {
    let mut chw = vec![0u8; 3 * s * s];
    for y in 0..s {
        for x in 0..s {
            let sx = if flip { s - 1 - x } else { x };
            for c in 0..3 {
                chw[c * s * s + y * s + x] = hwc[(y * s + sx) * 3 + c];
            }
        }
    }
    chw
}

/// Decodes a batch in parallel (on the current rayon pool), flipping the rows marked in `flip`.
pub fn load_batch(folder: &ImageFolder, indices: &[i64], flip: &[bool], size: u32, skips: &SkipLog) -> Result<U8Batch> {
    let s = size as usize;
    let rows: Vec<(usize, Vec<u8>)> = indices
        .par_iter()
        .zip(flip.par_iter())
        .map(|(&i, &f)| {
            let (used, hwc) = load_with_replacement(folder, i as usize, size, skips)?;
            Ok((used, hwc_to_chw(&hwc, s, f)))
        })
        .collect::<Result<_>>()?;
    let mut images = Vec::with_capacity(rows.len() * 3 * s * s);
    let mut used = Vec::with_capacity(rows.len());
    for (u, px) in rows {
        images.extend_from_slice(&px);
        used.push(u);
    }
    let labels = used.iter().map(|&u| folder.labels[u]).collect();
    Ok(U8Batch { images, labels, used })
}

impl U8Batch {
    /// (B, 3, S, S) float in [−1, 1] and (B,) Int64 on `device`.
    pub fn to_tensors(&self, size: i64, device: Device) -> (Tensor, Tensor) {
        let b = self.labels.len() as i64;
        let x = Tensor::from_slice(&self.images).reshape([b, 3, size, size]).to_device(device).to_kind(Kind::Float) / 127.5 - 1.0;
        (x, Tensor::from_slice(&self.labels).to_device(device))
    }
}

/// Training reader over an image folder: flips from the Augment stream, decoding on a rayon pool
/// of `workers` threads, up to `depth` batches decoded ahead (bounded).
pub struct FolderReader {
    pub folder: Arc<ImageFolder>,
    pub size: u32,
    pub flip: bool,
    pub seed: u64,
    /// Unconditional data gets this class on every row.
    pub null_class: Option<i64>,
    pub skips: Arc<SkipLog>,
    pool: Arc<rayon::ThreadPool>,
    depth: usize,
    pending: HashMap<u64, (Vec<i64>, crossbeam_channel::Receiver<Result<U8Batch>>)>,
}

impl FolderReader {
    pub fn new(folder: ImageFolder, size: u32, flip: bool, seed: u64, null_class: Option<i64>, workers: usize, depth: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(workers.max(1)).thread_name(|i| format!("flowmap-decode-{i}")).build().context("starting the decode threads")?;
        Ok(Self { folder: Arc::new(folder), size, flip, seed, null_class, skips: Arc::new(SkipLog::default()), pool: Arc::new(pool), depth, pending: HashMap::new() })
    }

    /// Batches decoded ahead.
    pub fn depth(&self) -> usize {
        self.depth
    }

    fn flips_for(&self, key: u64, n: usize) -> Vec<bool> {
        if self.flip {
            flips(self.seed, key, n)
        } else {
            vec![false; n]
        }
    }

    /// Starts decoding the coming batches, given as (draw key, indices) (at most `depth` in flight).
    pub fn prefetch(&mut self, upcoming: &[(u64, Vec<i64>)]) {
        for (key, idx) in upcoming.iter().take(self.depth) {
            let key = *key;
            if self.pending.contains_key(&key) || self.pending.len() >= self.depth {
                continue;
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            let (folder, skips, size, flip, indices) = (Arc::clone(&self.folder), Arc::clone(&self.skips), self.size, self.flips_for(key, idx.len()), idx.clone());
            let pool = Arc::clone(&self.pool);
            self.pool.spawn(move || {
                let r = pool.install(|| load_batch(&folder, &indices, &flip, size, &skips));
                let _ = tx.send(r);
            });
            self.pending.insert(key, (idx.clone(), rx));
        }
    }

    /// The batch of draw key `key` (from the prefetch if it was started with the same indices;
    /// prefetches of earlier steps are dropped).
    pub fn batch(&mut self, indices: &[i64], key: u64, device: Device) -> Result<(Tensor, Tensor)> {
        let step = rng::key_step(key);
        self.pending.retain(|&k, _| rng::key_step(k) >= step);
        let b = match self.pending.remove(&key) {
            Some((idx, rx)) if idx == indices => rx.recv().context("a decode thread stopped")??,
            _ => {
                let flip = self.flips_for(key, indices.len());
                self.pool.install(|| load_batch(&self.folder, indices, &flip, self.size, &self.skips))?
            }
        };
        let (x, mut c) = b.to_tensors(self.size as i64, device);
        if let Some(null) = self.null_class {
            c = Tensor::full([indices.len() as i64], null, (Kind::Int64, device));
        }
        Ok((x, c))
    }
}
