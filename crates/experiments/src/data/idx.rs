//! Readers for the IDX files of MNIST and Fashion-MNIST (raw or gzip).
//!
//! Images come out as (N, 1, 32, 32) float in [-1, 1]: the 28x28 digit is padded with 2 pixels of
//! background (-1) on every side, so that patch sizes 2, 4 and 8 tile it. Labels are (N,) Int64.
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Side length after padding.
pub const PADDED: i64 = 32;
const IMAGES_MAGIC: u32 = 0x0000_0803; // unsigned byte, 3 dimensions
const LABELS_MAGIC: u32 = 0x0000_0801; // unsigned byte, 1 dimension

/// The whole file, gunzipped when its name ends in `.gz` (or it starts with the gzip magic).
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading IDX file {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out).with_context(|| format!("{}: corrupt or truncated gzip stream", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses an IDX header with `dims` dimensions and checks that the payload is complete.
fn parse(path: &Path, bytes: &[u8], magic: u32, dims: usize) -> Result<Vec<usize>> {
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        bail!("{}: truncated IDX file ({} bytes, the header alone needs {header})", path.display(), bytes.len());
    }
    let got = be_u32(bytes, 0);
    if got != magic {
        bail!("{}: wrong IDX magic 0x{got:08x}, expected 0x{magic:08x} (is this an {} file?)", path.display(), if dims == 1 { "IDX labels" } else { "IDX images" });
    }
    let shape: Vec<usize> = (0..dims).map(|i| be_u32(bytes, 4 + 4 * i) as usize).collect();
    let want = header + shape.iter().product::<usize>();
    if bytes.len() != want {
        bail!("{}: truncated or oversized IDX file: {} bytes, the header {:?} says {want}", path.display(), bytes.len(), shape);
    }
    Ok(shape)
}

/// Images as (N, 1, 32, 32) float in [-1, 1].
pub fn read_images(path: &Path) -> Result<Tensor> {
    let bytes = read_maybe_gz(path)?;
    let shape = parse(path, &bytes, IMAGES_MAGIC, 3)?;
    let (n, h, w) = (shape[0] as i64, shape[1] as i64, shape[2] as i64);
    if h > PADDED || w > PADDED {
        bail!("{}: images are {h}x{w}, larger than {PADDED}x{PADDED}", path.display());
    }
    let raw = Tensor::from_slice(&bytes[16..]).reshape([n, 1, h, w]);
    let x = raw.to_kind(Kind::Float) / 127.5 - 1.0;
    let (top, left) = ((PADDED - h) / 2, (PADDED - w) / 2);
    // Pad (x + 1) with zeros, i.e. x with -1 (background).
    Ok((x + 1.0).constant_pad_nd([left, PADDED - w - left, top, PADDED - h - top]) - 1.0)
}

/// Labels as (N,) Int64.
pub fn read_labels(path: &Path) -> Result<Tensor> {
    let bytes = read_maybe_gz(path)?;
    let shape = parse(path, &bytes, LABELS_MAGIC, 1)?;
    Ok(Tensor::from_slice(&bytes[8..8 + shape[0]]).to_kind(Kind::Int64))
}

/// A labelled image set held in memory.
#[derive(Debug)]
pub struct LabelledImages {
    /// (N, 1, 32, 32) float in [-1, 1]
    pub images: Tensor,
    /// (N,) Int64
    pub labels: Tensor,
}

/// The two splits of the IDX data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Loads an images/labels pair and checks they have the same length.
pub fn read_pair(images: &Path, labels: &Path) -> Result<LabelledImages> {
    let x = read_images(images)?;
    let y = read_labels(labels)?;
    if x.size()[0] != y.size()[0] {
        bail!("{} has {} images but {} has {} labels", images.display(), x.size()[0], labels.display(), y.size()[0]);
    }
    Ok(LabelledImages { images: x, labels: y })
}

/// File names of a split inside a data set directory, with the extension the data set uses.
pub fn split_files(dir: &Path, split: Split, gz: bool) -> (PathBuf, PathBuf) {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let ext = if gz { ".gz" } else { "" };
    (dir.join(format!("{prefix}-images-idx3-ubyte{ext}")), dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")))
}

/// The average-pooling factor that takes the padded 32×32 images to `size` (32, 16 or 8).
pub fn pool_factor(size: i64) -> Result<i64> {
    match size {
        32 | 16 | 8 => Ok(PADDED / size),
        _ => bail!("the built-in data sets come at 32, 16 or 8 pixels (32: the 28×28 digits padded by 2; 16 and 8: average-pooled), not {size}"),
    }
}

/// (N, 1, 32, 32) images average-pooled to (N, 1, size, size) (unchanged at 32).
pub fn downsample(images: &Tensor, size: i64) -> Result<Tensor> {
    let f = pool_factor(size)?;
    Ok(if f == 1 { images.shallow_clone() } else { images.avg_pool2d([f, f], [f, f], [0, 0], false, true, None) })
}
