//! The paper-scale data path on a small generated image folder (issue 7): image folders with
//! corrupt files, latents (encode, resume), dry runs of every paper config, and the whole
//! pipeline folder → latents → training → sampling → decode → FID.
mod cli_support;
mod paper_support;
use cli_support::flowmap_ok as flowmap;

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
    reader.prefetch(&[(0, all.clone())]);
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

/// A JPEG cut after its headers and part of its scan decodes without error (the decoder fills the
/// rest with grey); the loader must refuse it, so the folder reader skips and counts it like any
/// unreadable file. A JPEG with bytes after its end marker is still fine.
#[test]
fn truncated_jpeg_is_skipped_and_counted_not_decoded_as_grey() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("flat");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..4 {
        paper_support::image(96, 80, 7 + i).save(root.join(format!("img_{i}.jpg"))).unwrap();
    }
    let whole = std::fs::read(root.join("img_1.jpg")).unwrap();
    let cut = &whole[..whole.len() * 2 / 3];
    eprintln!("the image decoder alone on the cut file: {:?}", image::load_from_memory(cut).map(|i| (i.width(), i.height())));
    std::fs::write(root.join("img_1.jpg"), cut).unwrap();
    let mut trailing = std::fs::read(root.join("img_3.jpg")).unwrap();
    trailing.extend_from_slice(b"\xFF\xDAtrailer bytes after EOI");
    std::fs::write(root.join("img_3.jpg"), &trailing).unwrap();

    let folder = ImageFolder::scan(&root, Layout::Flat).unwrap();
    let err = format!("{:#}", folder.load(1, 32).unwrap_err());
    assert!(err.contains("truncated JPEG") && err.contains("img_1.jpg"), "{err}");
    assert_eq!(folder.load(3, 32).unwrap().len(), 32 * 32 * 3, "bytes after the end marker are ignored");

    let mut reader = FolderReader::new(folder, 32, false, 0, None, 2, 0).unwrap();
    let (x, _) = reader.batch(&[0, 1, 2, 3], 0, Device::Cpu).unwrap();
    assert_eq!(reader.skips.count(), 1, "the cut file is counted once");
    assert_eq!(reader.skips.bad_files()[0].0, 1);
    assert!(x.get(1).equal(&x.get(2)), "row 1 is replaced by the next readable image, not a grey-filled decode");
    assert_eq!(reader.skips.replaced_rows.load(std::sync::atomic::Ordering::Relaxed), 1);
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

#[test]
fn a_second_encoder_on_the_same_latents_folder_is_refused_and_a_finished_one_leaves_no_temporary_files() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    paper_support::class_folder(&root, 2, 2, 40);
    let out = dir.path().join("latents");
    // Another encoder holds the folder.
    let held = flowmap_experiments::run::file_lock::FileLock::try_acquire(&out.join("LOCK"), "test").unwrap();
    let err = format!("{:#}", encode_folder(&opts(&root, &out, None), vae_id(), vec![4, 4, 4], &mut fake_encode).unwrap_err());
    assert!(err.contains("is in use by pid") && err.contains(&std::process::id().to_string()), "{err}");
    assert!(!out.join("manifest.json").exists());
    drop(held);
    let r = encode_folder(&opts(&root, &out, None), vae_id(), vec![4, 4, 4], &mut fake_encode).unwrap();
    assert!(r.complete);
    let leftovers: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.starts_with('.')).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// ---------------------------------------------------------------------------------------------
// With a tiny random VAE (f = 8, like sd-vae-ft-mse, but 8 channels per level and one resnet).

use flowmap_models::vae::{Vae, VaeConfig};

/// The tiny VAE's architecture, as `--set` overrides of a config's `[vae.arch]`.
const TINY_VAE_SETS: [&str; 3] = ["vae.arch.block_out_channels=[8, 8, 8, 8]", "vae.arch.layers_per_block=1", "vae.arch.norm_num_groups=4"];
const TINY_VAE_TOML: &str = "block_out_channels = [8, 8, 8, 8]\nlayers_per_block = 1\nnorm_num_groups = 4\n";

fn tiny_vae_config() -> VaeConfig {
    VaeConfig { block_out_channels: vec![8, 8, 8, 8], layers_per_block: 1, norm_num_groups: 4, ..VaeConfig::default() }
}

fn write_tiny_vae(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let weights = dir.join("tiny_vae.safetensors");
    Vae::random(&tiny_vae_config(), Device::Cpu, 0).unwrap().save(&weights).unwrap();
    let arch = dir.join("tiny_vae.toml");
    std::fs::write(&arch, TINY_VAE_TOML).unwrap();
    (weights, arch)
}

fn paper_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/paper").canonicalize().unwrap()
}

fn paper_configs() -> Vec<std::path::PathBuf> {
    let mut v = vec![];
    for sub in ["shortcut_imagenet256", "shortcut_celebahq256", "meanflow_imagenet256"] {
        for e in std::fs::read_dir(paper_dir().join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// Every paper config against fake ImageNet / CelebA-HQ latents (256² crops of a generated class
/// folder and flat folder, encoded with the tiny random VAE): parse, build the model, verify the
/// shards, read a batch, load the VAE and match it with the manifest. The fake ImageNet has 2
/// classes, so the ImageNet configs run with data/model.num_classes = 2 (and without that override
/// the dry run fails naming the class count).
#[test]
fn dry_run_of_every_paper_config_against_fake_data() {
    init();
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (weights, arch) = write_tiny_vae(dir.path());
    paper_support::class_folder(&dir.path().join("imagenet/train"), 2, 2, 260);
    paper_support::flat_folder(&dir.path().join("celebahq"), 3, 256);
    let latents = dir.path().join("latents");
    for (src, layout, name) in [("imagenet/train", "class-folders", "imagenet256"), ("celebahq", "flat", "celebahq256")] {
        let src = dir.path().join(src);
        let out = latents.join(name);
        flowmap(&[
            "latents",
            "--source",
            src.to_str().unwrap(),
            "--layout",
            layout,
            "--out",
            out.to_str().unwrap(),
            "--vae",
            weights.to_str().unwrap(),
            "--vae-arch",
            arch.to_str().unwrap(),
            "--shard-size",
            "2",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--workers",
            "2",
        ]);
    }
    std::env::set_var("FLOWMAP_LATENTS", &latents);
    std::env::set_var("FLOWMAP_SD_VAE", &weights);
    let configs = paper_configs();
    assert_eq!(configs.len(), 18, "7 Shortcut rows × 2 data sets + 4 MeanFlow sizes");
    let mut forwarded = false;
    for path in &configs {
        let imagenet = path.to_str().unwrap().contains("imagenet");
        let mut sets: Vec<String> = TINY_VAE_SETS.iter().map(|s| s.to_string()).collect();
        if imagenet {
            sets.extend(["data.num_classes=2".into(), "model.num_classes=2".into()]);
        }
        let (cfg, _) = flowmap_experiments::config::load_config(path, &sets).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        // One forward pass (B/2 Shortcut on ImageNet); the others only build the model.
        let forward = !forwarded && path.ends_with("shortcut_imagenet256/shortcut.toml");
        forwarded |= forward;
        let r = flowmap_experiments::cli::dry_run::dry_run(&cfg, flowmap_experiments::cli::dry_run::DryRunOptions { forward }).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(r.data_len, if imagenet { 4 } else { 3 }, "{}", path.display());
        assert!(r.lines.iter().any(|l| l.starts_with("vae:")), "{}", path.display());
        eprintln!("{}: {} parameters; {} warnings", path.strip_prefix(paper_dir()).unwrap().display(), r.parameters, r.warnings.len());
    }
    assert!(forwarded);
    // The real class count is checked against the data.
    let (cfg, _) = flowmap_experiments::config::load_config(&paper_dir().join("shortcut_imagenet256/flow_matching.toml"), &TINY_VAE_SETS.map(String::from)).unwrap();
    let err = format!("{:#}", flowmap_experiments::cli::dry_run::dry_run(&cfg, flowmap_experiments::cli::dry_run::DryRunOptions { forward: false }).unwrap_err());
    assert!(err.contains("num_classes = 1000") && err.contains("2 classes"), "{err}");
    // A VAE other than the one the latents were made with is refused.
    let other = dir.path().join("other_vae.safetensors");
    Vae::random(&tiny_vae_config(), Device::Cpu, 1).unwrap().save(&other).unwrap();
    let mut sets: Vec<String> = TINY_VAE_SETS.map(String::from).to_vec();
    sets.push(format!("vae.weights={:?}", other.display().to_string()));
    let (cfg, _) = flowmap_experiments::config::load_config(&paper_dir().join("shortcut_celebahq256/shortcut.toml"), &sets).unwrap();
    let err = format!("{:#}", flowmap_experiments::cli::dry_run::dry_run(&cfg, flowmap_experiments::cli::dry_run::DryRunOptions { forward: false }).unwrap_err());
    assert!(err.contains("not the weights the latents were encoded with"), "{err}");
    // The table specs parse and name existing configs.
    for spec in ["table_shortcut_imagenet256.toml", "table_shortcut_celebahq256.toml", "table_meanflow_imagenet256.toml"] {
        let s = flowmap_experiments::report::table::read_spec(&paper_dir().join(spec)).unwrap();
        for row in &s.rows {
            assert!(paper_dir().join(&row.config).is_file(), "{spec}: {}", row.config.display());
        }
    }
    eprintln!("dry runs of {} configs in {:.1} s", configs.len(), t0.elapsed().as_secs_f64());
}

/// folder (16 images of 64², 2 classes) → `flowmap latents` (tiny random VAE, f = 8: 4×8×8) →
/// `flowmap train` (4 steps of a tiny DiT on the latents, grids decoded by the VAE) → `flowmap fid`
/// (sampling, decode, Inception; reference statistics from the same folder, 8 images; 4 samples).
#[test]
fn full_pipeline_folder_latents_train_sample_decode_fid() {
    init();
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (weights, arch) = write_tiny_vae(dir.path());
    let src = dir.path().join("images");
    paper_support::class_folder(&src, 2, 8, 64);
    let lat = dir.path().join("latents");
    let t_enc = std::time::Instant::now();
    let out = flowmap(&[
        "latents",
        "--source",
        src.to_str().unwrap(),
        "--out",
        lat.to_str().unwrap(),
        "--vae",
        weights.to_str().unwrap(),
        "--vae-arch",
        arch.to_str().unwrap(),
        "--image-size",
        "64",
        "--shard-size",
        "8",
        "--batch",
        "8",
        "--device",
        "cpu",
        "--workers",
        "2",
    ]);
    let enc_s = t_enc.elapsed().as_secs_f64();
    eprintln!("{out}latents command: 16 images (+16 flipped) in {enc_s:.2} s wall = {:.1} img/s end to end", 16.0 / enc_s);
    let m = Manifest::read(&lat.join("manifest.json")).unwrap();
    assert!(m.complete);
    assert_eq!((m.num_rows(), m.shards.len(), m.latent_shape.clone()), (16, 2, vec![4, 8, 8]));
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"[run]
name = "pipeline"
steps = 4
batch_size = 8
device = "cpu"
threads = 1
log_every = 1
out_dir = "{runs}"

[data]
kind = "latents"
path = "{lat}"
conditional = true
num_classes = 2
image_size = 64

[vae]
weights = "{weights}"
[vae.arch]
{TINY_VAE_TOML}
[model]
kind = "dit"
depth = 1
hidden_size = 32
num_heads = 2
patch_size = 2
in_channels = 4
input_size = 8
num_classes = 2

[objective]
kind = "flow_matching"

[optimizer]
lr = 1e-3

[sampling]
rule = "euler"
steps = [1, 2]
grid_images = 4

[eval]
num_samples = 4
batch = 4
kid = false
[eval.reference]
num_images = 8
"#,
            runs = dir.path().join("runs").display(),
            lat = lat.display(),
            weights = weights.display()
        ),
    )
    .unwrap();
    let dry = flowmap(&["train", config.to_str().unwrap(), "--dry-run"]);
    assert!(dry.contains("dry run passed") && dry.contains("forward:"), "{dry}");
    flowmap(&["train", config.to_str().unwrap()]);
    let run = dir.path().join("runs/pipeline");
    let losses: Vec<f64> = flowmap_experiments::train::metrics::read(&run.join("metrics.jsonl")).unwrap().iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()));
    for s in [1, 2] {
        let grid = run.join(format!("samples/step_0000004_steps{s}.png"));
        let img = image::open(&grid).unwrap();
        assert!(img.width() >= 128 && img.height() >= 128 && img.color().channel_count() == 3, "decoded RGB grid of 64² images {}: {}x{}", grid.display(), img.width(), img.height());
    }
    let fid = flowmap(&["fid", "--run", run.to_str().unwrap(), "--steps", "1,2"]);
    let rows = flowmap_experiments::eval::fid::read_fid_csv(&run.join("fid.csv")).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert!(r.fid.is_finite() && r.fid >= 0.0, "{fid}");
        assert_eq!(r.num_samples, 4);
    }
    eprintln!("{fid}FID (4 samples vs 8 reference images): {:?}; pipeline in {:.1} s", rows.iter().map(|r| (r.steps, r.fid)).collect::<Vec<_>>(), t0.elapsed().as_secs_f64());
}

/// Encode throughput of `flowmap latents` with the sd-vae-ft-mse architecture (random weights) on
/// 256² crops, CPU. Ignored (tens of seconds): `cargo test --release -p flowmap-experiments --test
/// paper_pipeline encode_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn encode_throughput_sd_vae_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("sd_vae_random.safetensors");
    Vae::random(&VaeConfig::default(), Device::Cpu, 0).unwrap().save(&weights).unwrap();
    let src = dir.path().join("images");
    paper_support::class_folder(&src, 2, 4, 300);
    for flip in [false, true] {
        let out = dir.path().join(format!("latents_{flip}"));
        let mut args = vec!["latents", "--source", src.to_str().unwrap(), "--out", out.to_str().unwrap(), "--vae", weights.to_str().unwrap(), "--batch", "4", "--device", "cpu"];
        if !flip {
            args.push("--no-flip");
        }
        let t = std::time::Instant::now();
        let s = flowmap(&args);
        eprintln!("{s}wall {:.1} s for 8 images (flip {flip}), {:.2} img/s end to end", t.elapsed().as_secs_f64(), 8.0 / t.elapsed().as_secs_f64());
    }
}
