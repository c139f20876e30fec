//! Sample grids as PNG: (B, C, H, W) in [-1, 1] → uint8 (clamp(127.5·x + 128), as DiT's
//! sample_ddp.py) → a near-square grid with a 2-pixel gap. Images under 32 pixels (16×16 MNIST)
//! are enlarged by pixel repetition to at least 32, so grids stay legible.
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// (B, C, H, W) float in [-1, 1] → (B, C, H, W) uint8.
pub fn to_uint8(x: &Tensor) -> Tensor {
    (x.to_kind(Kind::Float) * 127.5 + 128.0).clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

/// Images smaller than this (in pixels) are enlarged by an integer factor to reach it.
const MIN_SIDE: i64 = 32;

/// Encodes images as one grid; returns (png bytes, height, width, channels).
pub fn grid_png(x: &Tensor) -> Result<(Vec<u8>, u32, u32, u32)> {
    let size = x.size();
    if size.len() != 4 || !(size[1] == 1 || size[1] == 3) {
        bail!("sample grid needs (B, 1 or 3, H, W) images, got {size:?}");
    }
    let (b, c) = (size[0], size[1]);
    let zoom = (MIN_SIDE + size[2].min(size[3]) - 1) / size[2].min(size[3]).max(1);
    let img = to_uint8(&x.to_device(tch::Device::Cpu));
    let img = if zoom > 1 { img.repeat_interleave_self_int(zoom, 2, None).repeat_interleave_self_int(zoom, 3, None) } else { img };
    let (h, w) = (size[2] * zoom, size[3] * zoom);
    let cols = (b as f64).sqrt().ceil() as i64;
    let rows = (b + cols - 1) / cols;
    let gap = 2;
    let (gh, gw) = (rows * (h + gap) + gap, cols * (w + gap) + gap);
    let canvas = Tensor::zeros([c, gh, gw], (Kind::Uint8, tch::Device::Cpu));
    for i in 0..b {
        let (r, col) = (i / cols, i % cols);
        canvas.narrow(1, gap + r * (h + gap), h).narrow(2, gap + col * (w + gap), w).copy_(&img.get(i));
    }
    let hwc = canvas.permute([1, 2, 0]).contiguous();
    let bytes = Vec::<u8>::try_from(hwc.flatten(0, -1))?;
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, gw as u32, gh as u32);
        enc.set_color(if c == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&bytes)?;
    }
    Ok((png_bytes, gh as u32, gw as u32, c as u32))
}

/// Writes a grid PNG file (atomically).
pub fn save_grid(x: &Tensor, path: &Path) -> Result<()> {
    let (png, ..) = grid_png(x)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::run::atomic_file::write_atomic(path, &png)
}
