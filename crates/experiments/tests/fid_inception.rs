//! FID with the real Inception network on a few MNIST test images (≈ 6 images/s on 2 CPU cores,
//! so every test uses at most 16 distinct images per set). Needs `make setup` (data cache).
use flowmap_experiments::data::cache;
use flowmap_experiments::data::idx::{self, Split};
use flowmap_experiments::eval::fid::{evaluate_steps, read_fid_csv, EvalSettings, Inception, KidSettings, Preprocess, RefDataset, Reference, SampleSetting, SplitSpec, FEATURE_DIM};
use flowmap_experiments::run::world::World;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

mod fid_support;
use fid_support::reference_helper;

/// The first `n` MNIST test images, (n, 1, 32, 32) in [−1, 1].
fn mnist_test(n: i64) -> Tensor {
    let (images, _) = idx::split_files(&cache::mnist_dir(), Split::Test, false);
    idx::read_images(&images).expect("MNIST test images (run `make setup`)").narrow(0, 0, n)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn write_u8_npz(path: &Path, images: &Tensor) {
    use npyz::WriterBuilder;
    let q = flowmap_experiments::eval::fid::quantize(images).contiguous();
    let shape: Vec<u64> = q.size().iter().map(|&s| s as u64).collect();
    let v: Vec<u8> = Vec::try_from(q.reshape([-1])).unwrap();
    let mut npz = npyz::npz::NpzWriter::create(path).unwrap();
    let mut w = npz.array::<u8>("images", Default::default()).unwrap().default_dtype().shape(&shape).begin_nd().unwrap();
    w.extend(v).unwrap();
    w.finish().unwrap();
}

#[test]
fn features_match_torch_and_are_nonnegative() {
    let dir = tempfile::tempdir().unwrap();
    let images = mnist_test(3);
    let npz = dir.path().join("images.npz");
    write_u8_npz(&npz, &images);
    let torch_out = dir.path().join("torch.npz");
    let torch_ok = reference_helper(&["features", cache::inception_weights().to_str().unwrap(), npz.to_str().unwrap(), torch_out.to_str().unwrap()]).is_some();
    for preprocess in [Preprocess::PytorchFid, Preprocess::Tf] {
        let net = Inception::load(Device::Cpu, preprocess).unwrap().with_batch_size(2); // 2 + 1: batching is exercised
        let f = net.features(&images).unwrap();
        assert_eq!(f.size(), [3, FEATURE_DIM]);
        assert_eq!(f.kind(), Kind::Double);
        assert!(f.isfinite().all().int64_value(&[]) == 1);
        assert!(f.min().double_value(&[]) >= 0.0, "pool3 features follow a ReLU");
        let mean = f.mean(Kind::Double).double_value(&[]);
        assert!(mean > 0.01, "features are not all ~0: mean {mean}");
        assert!(max_abs(&(f.get(0) - f.get(1))) > 0.1, "different digits give different features");
        if !torch_ok {
            continue;
        }
        let torch = read_features(&torch_out, &format!("features_{preprocess}"));
        let err = max_abs(&(&f - &torch)) / max_abs(&torch);
        eprintln!("{preprocess}: features vs torch/python: max |diff| / max |f| = {err:.2e}; mean feature {mean:.4}");
        assert!(err < 1e-4, "{preprocess}: {err}");
    }
}

/// One (N, 2048) float64 array from the helper's npz.
fn read_features(path: &Path, name: &str) -> Tensor {
    let mut npz = npyz::npz::NpzArchive::open(path).unwrap();
    let arr = npz.by_name(name).unwrap().unwrap();
    let shape: Vec<i64> = arr.shape().iter().map(|&s| s as i64).collect();
    let v: Vec<f64> = arr.into_vec().unwrap();
    Tensor::from_slice(&v).reshape(&shape)
}

#[test]
fn fid_of_a_split_against_itself_is_zero_and_against_a_shifted_copy_is_large() {
    let n = 12;
    let all = mnist_test(2 * n);
    let images = all.narrow(0, 0, n);
    let net = Inception::load(Device::Cpu, Preprocess::PytorchFid).unwrap().with_batch_size(n as usize);
    let start = Instant::now();
    let reference = Reference::from_images(&net, &images, "mnist-test-12").unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!("Inception on CPU: {n} images in {secs:.1} s = {:.1} img/s ({} threads)", n as f64 / secs, tch::get_num_threads());

    // Step count → images, delivered in chunks of 8 (so batches differ from the reference's):
    // 1 = the reference shifted by 6 px, 2 = the reference plus noise, 4 = the reference itself,
    // 8 = 12 other MNIST test images (same distribution, disjoint sample).
    let shifted = (&images + 1.0).roll([6, 6], [2, 3]) - 1.0;
    let noisy = (&images + Tensor::randn_like(&images) * 0.3).clamp(-1.0, 1.0);
    let others = all.narrow(0, n, n);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("fid.csv");
    let mut offset = 0;
    // one subset of all 12 rows: the exact unbiased estimate, no subset noise
    let settings = EvalSettings { num_samples: n as usize, generate_batch: 8, kid: Some(KidSettings { num_subsets: 1, max_subset_size: 1000, seed: 0 }) };
    let sample = SampleSetting { train_step: 100, cfg_scale: 1.0, weights: "ema".into(), eval_seed: 0 };
    let rows = evaluate_steps(&net, Some(&reference), &World::single(), &[1, 2, 4, 8], &sample, &settings, Some(&csv), |nfe, _chunk, count| {
        let source = match nfe {
            1 => &shifted,
            2 => &noisy,
            4 => &images,
            _ => &others,
        };
        let out = source.narrow(0, offset % n, count as i64);
        offset += count as i64;
        Ok(out)
    })
    .unwrap();
    let fid: Vec<f64> = rows.iter().map(|r| r.fid).collect();
    let kid: Vec<f64> = rows.iter().map(|r| r.kid.unwrap()).collect();
    eprintln!("FID: self {:.3e}, shifted {:.2}, noisy {:.2}, other real images {:.2}; KID: self {:.4}, shifted {:.4}, noisy {:.4}, other real images {:.4}", fid[2], fid[0], fid[1], fid[3], kid[2], kid[0], kid[1], kid[3]);
    // Same images, different batch composition: equal up to float32 conv rounding.
    assert!(fid[2].abs() < 1e-6, "self FID {}", fid[2]);
    assert!(fid[0] > 50.0, "shifted FID {}", fid[0]);
    assert!(fid[1] > 50.0, "noisy FID {}", fid[1]);
    // KID: the noisy copy is far; a disjoint real sample is near 0 (unbiased), while FID at
    // 12 samples is strongly biased upwards even between real images.
    assert!(kid[1] > 0.05, "noisy KID {}", kid[1]);
    assert!(kid[3].abs() < 0.3 * kid[1], "KID of other real images {} vs noisy {}", kid[3], kid[1]);
    assert!(fid[3] > 10.0, "FID of 12 vs 12 real images carries a large small-sample bias: {}", fid[3]);

    let back = read_fid_csv(&csv).unwrap();
    assert_eq!(back, rows);
    assert_eq!(back.iter().map(|r| r.steps).collect::<Vec<_>>(), [1, 2, 4, 8]);
    assert!(back.iter().all(|r| r.nfe.is_none()), "the generator does not count evaluations");
    assert!(back.iter().all(|r| r.num_samples == 12 && r.ref_stats == "mnist-test-12" && r.preprocess == "pytorch_fid" && r.train_step == 100));

    // A reference computed with the other convention is refused.
    let tf = Reference { preprocess: Some(Preprocess::Tf), ..Reference::from_features("tf", None, reference.features.as_ref().unwrap().copy()).unwrap() };
    let err = evaluate_steps(&net, Some(&tf), &World::single(), &[1], &sample, &settings, None, |_, _, c| Ok(images.narrow(0, 0, c as i64))).unwrap_err();
    assert!(format!("{err:#}").contains("convention"), "{err:#}");
}

#[test]
fn split_reference_is_cached_and_keyed_by_convention() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SplitSpec { dataset: RefDataset::Mnist, split: Split::Test, num_images: Some(8), image_size: 32 };
    let pt = Inception::load(Device::Cpu, Preprocess::PytorchFid).unwrap();
    let (first, from_cache) = Reference::from_split(&pt, &spec, dir.path()).unwrap();
    assert!(!from_cache);
    assert_eq!(first.name, "mnist-test-8");
    let start = Instant::now();
    let (again, from_cache) = Reference::from_split(&pt, &spec, dir.path()).unwrap();
    assert!(from_cache, "the second call reads the cache");
    assert!(start.elapsed().as_secs_f64() < 5.0, "a cache hit does not run the network");
    assert_eq!(max_abs(&(&again.stats.sigma - &first.stats.sigma)), 0.0);
    assert!(again.stats.frechet_distance(&first.stats).unwrap().abs() < 1e-9);
    assert_eq!(again.preprocess, Some(Preprocess::PytorchFid));

    let tf = Inception::load(Device::Cpu, Preprocess::Tf).unwrap();
    let (tf_ref, from_cache) = Reference::from_split(&tf, &spec, dir.path()).unwrap();
    assert!(!from_cache, "another convention is another cache entry");
    let files: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|f| f.ends_with(".npz")).collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.iter().any(|f| f.starts_with("mnist-test-8-tf-")) && files.iter().any(|f| f.starts_with("mnist-test-8-pytorch_fid-")));
    // The conventions differ a little (resize grid, 127.5 vs 128), not a lot.
    let between = tf_ref.stats.frechet_distance(&first.stats).unwrap();
    let rel = max_abs(&(tf_ref.features.as_ref().unwrap() - first.features.as_ref().unwrap())) / max_abs(first.features.as_ref().unwrap());
    eprintln!("pytorch_fid vs tf on 8 MNIST images: FID {between:.3}, max relative feature difference {rel:.3}");
    assert!(between > 1e-3 && rel > 1e-4, "the conventions give different features");
    // Each cache entry carries a human-readable description.
    let meta = std::fs::read_to_string(dir.path().join(files[0].replace(".npz", ".json"))).unwrap();
    assert!(meta.contains("\"num_images\": 8") && meta.contains("t10k-images"), "{meta}");
}
