//! The paper-scale data path on a small generated image folder (issue 7): image folders with
//! corrupt files, latents (encode, resume), dry runs of every paper config, and the whole
//! pipeline folder → latents → training → sampling → decode → FID.
mod paper_support;

use flowmap_experiments::data::image_folder::{center_crop_arr, flips, FolderReader, ImageFolder, Layout};
use flowmap_experiments::data::latents::{encode_folder, EncodeOptions, LatentDtype, LatentReader, Manifest, VaeIdentity};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn init() {
    tch::set_num_threads(1);
}

#[test]
fn center_crop_follows_adm() {
    // 600×400 → halve once (min side 400 ≥ 2·64 … twice: 400→200→100), bicubic to short side 64, crop.
    let img = paper_support::image(600, 400, 3);
    let out = center_crop_arr(img.as_raw(), 600, 400, 64);
    assert_eq!(out.len(), 64 * 64 * 3);
    // A constant image stays constant through box, bicubic and crop.
    let flat = vec![77u8; 300 * 200 * 3];
    assert!(center_crop_arr(&flat, 300, 200, 64).iter().all(|&v| v == 77));
    // Flips are a pure function of (seed, step).
    assert_eq!(flips(3, 10, 16), flips(3, 10, 16));
    assert_ne!(flips(3, 10, 64), flips(3, 11, 64));
}

#[test]
fn corrupt_images_are_skipped_counted_and_the_batch_stays_full() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    paper_support::class_folder(&root, 2, 4, 40);
    // A truncated JPEG and an empty file, in class 0.
    let good = std::fs::read(root.join("n00000000/img_001.jpg")).unwrap();
    std::fs::write(root.join("n00000000/img_001.jpg"), &good[..good.len() / 3]).unwrap();
    std::fs::write(root.join("n00000000/img_002.png"), b"").unwrap();
    let folder = ImageFolder::scan(&root, Layout::ClassFolders).unwrap();
    assert_eq!((folder.len(), folder.num_classes()), (8, 2));
    let mut reader = FolderReader::new(folder, 32, true, 0, None, 2, 2).unwrap();
    let all: Vec<i64> = (0..8).collect();
    reader.prefetch(0, std::slice::from_ref(&all));
    let (x, c) = reader.batch(&all, 0, Device::Cpu).unwrap();
    assert_eq!(x.size(), [8, 3, 32, 32]);
    assert_eq!(c.size(), [8]);
    assert!(x.min().double_value(&[]) >= -1.0 && x.max().double_value(&[]) <= 1.0);
    assert_eq!(reader.skips.count(), 2, "two unreadable files");
    // Replacement is deterministic: the next readable index (1 → 3, 2 → 3).
    let labels: Vec<i64> = Vec::try_from(&c).unwrap();
    assert_eq!(labels, vec![0, 0, 0, 0, 1, 1, 1, 1]);
    let (x2, _) = reader.batch(&all, 0, Device::Cpu).unwrap();
    assert!(x.equal(&x2), "same step, same batch");
    let row = |t: &Tensor, i: i64| t.get(i);
    assert!(row(&x, 1).equal(&row(&x, 3)) || row(&x, 1).equal(&row(&x, 3).flip([2])), "row 1 is a copy of image 3");
}

/// A stand-in encoder: 8× average pooling of (RGB, mean) → 4 channels; std from a fixed map.
pub fn fake_encode(x: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
    let m = x.mean_dim(1, true, Kind::Float);
    let z = Tensor::cat(&[x.shallow_clone(), m], 1).avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>);
    let s = (z.abs() * 0.1 + 0.01).shallow_clone();
    Ok((z, s))
}

fn opts(src: &Path, out: &Path, max: Option<usize>) -> EncodeOptions {
    EncodeOptions { source: src.to_path_buf(), layout: Layout::ClassFolders, out: out.to_path_buf(), image_size: 32, dtype: LatentDtype::F16, flip: true, shard_size: 3, batch: 2, workers: 2, max_new_shards: max }
}

fn vae_id() -> VaeIdentity {
    VaeIdentity { weights: "fake".into(), sha256: "0".repeat(64), scale: 0.18215 }
}

#[test]
fn latents_resume_skips_verified_shards_and_gives_the_same_manifest() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    paper_support::class_folder(&root, 2, 4, 40);
    std::fs::write(root.join("n00000001/img_003.jpg"), b"not a jpeg").unwrap();
    let (straight, resumed) = (dir.path().join("straight"), dir.path().join("resumed"));
    let a = encode_folder(&opts(&root, &straight, None), vae_id(), vec![4, 4, 4], &mut fake_encode).unwrap();
    assert!(a.complete);
    assert_eq!((a.encoded_shards, a.manifest.num_rows(), a.manifest.skipped.len()), (3, 7, 1));
    let b1 = encode_folder(&opts(&root, &resumed, Some(1)), vae_id(), vec![4, 4, 4], &mut fake_encode).unwrap();
    assert!(!b1.complete);
    assert_eq!(b1.encoded_shards, 1);
    assert!(LatentReader::open(&resumed, false, true, 0, None).is_err(), "an incomplete encode is refused for training");
    // Corrupt nothing, rerun: shard 0 verified and skipped.
    let b2 = encode_folder(&opts(&root, &resumed, None), vae_id(), vec![4, 4, 4], &mut fake_encode).unwrap();
    assert_eq!((b2.verified_shards, b2.encoded_shards), (1, 2));
    let (ma, mb) = (std::fs::read_to_string(straight.join("manifest.json")).unwrap(), std::fs::read_to_string(resumed.join("manifest.json")).unwrap());
    assert_eq!(ma.replace(&straight.display().to_string(), ""), mb.replace(&resumed.display().to_string(), ""), "same manifest (shard checksums included)");
    // A damaged shard is found by verification and re-encoded by the next call.
    std::fs::write(resumed.join("shard_00001.safetensors"), b"garbage").unwrap();
    assert!(Manifest::read(&resumed.join("manifest.json")).unwrap().verify(&resumed).is_err());
    let b3 = encode_folder(&opts(&root, &resumed, None), vae_id(), vec![4, 4, 4], &mut fake_encode).unwrap();
    assert_eq!((b3.verified_shards, b3.encoded_shards), (2, 1));
    // Training reads: x = (mean + std·eps)·scale, fresh eps per step, same for the same step.
    let r = LatentReader::open(&resumed, true, true, 0, None).unwrap();
    assert_eq!((r.len(), r.manifest.num_classes()), (7, 2));
    let (x0, c0) = r.batch(&[0, 6, 3], 5, Device::Cpu).unwrap();
    let (x1, _) = r.batch(&[0, 6, 3], 5, Device::Cpu).unwrap();
    let (x2, _) = r.batch(&[0, 6, 3], 6, Device::Cpu).unwrap();
    assert_eq!(x0.size(), [3, 4, 4, 4]);
    assert!(x0.equal(&x1));
    assert!(!x0.equal(&x2));
    assert_eq!(Vec::<i64>::try_from(&c0).unwrap(), vec![0, 1, 0]);
}
