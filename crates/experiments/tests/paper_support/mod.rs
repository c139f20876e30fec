//! Small generated image folders for the paper-pipeline tests.
#![allow(dead_code)]
use std::path::Path;

/// A deterministic RGB image with some structure (gradients plus a class-dependent blob).
pub fn image(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let r = ((x * 255) / w.max(1)) as u8;
        let g = ((y * 255) / h.max(1)) as u8;
        let d = (x as i64 - (w / 2) as i64).pow(2) + (y as i64 - (h / 3) as i64).pow(2);
        let b = if d < ((w * h) / 16) as i64 { (seed * 53 % 256) as u8 } else { (seed * 17 % 256) as u8 };
        image::Rgb([r, g, b])
    })
}

/// `root/<class>/<i>.{png,jpg}`: `per_class` images in each of `classes` folders, alternating
/// PNG and JPEG, sizes varying around `size` (non-square).
pub fn class_folder(root: &Path, classes: usize, per_class: usize, size: u32) {
    for c in 0..classes {
        let dir = root.join(format!("n{:08}", c));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let seed = (c * per_class + i) as u32;
            let (w, h) = (size + 8 * (i as u32 % 3), size + 4 * (c as u32 % 2));
            let img = image(w, h, seed);
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("img_{i:03}.{ext}"))).unwrap();
        }
    }
}

/// `root/<i>.png|jpg`: a flat folder of `n` images.
pub fn flat_folder(root: &Path, n: usize, size: u32) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..n {
        let img = image(size + 2 * i as u32, size, i as u32 + 100);
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        img.save(root.join(format!("face_{i:03}.{ext}"))).unwrap();
    }
}
