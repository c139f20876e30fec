//! FID / KID maths without the Inception network: the Fréchet distance against scipy
//! (tests/python/frechet_reference.py) and closed forms, streaming statistics, KID's
//! unbiasedness, the `.npz` format, the stats cache key and `fid.csv`.
use flowmap_experiments::eval::fid::{append_fid_csv, frechet_distance, kernel_inception_distance, mmd2_unbiased, read_fid_csv, stats_cache_key, FeatureStats, FidRow, GaussianStats, KidSettings, Preprocess, Reference};
mod fid_support;
use fid_support::reference_helper;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// (n, d) standard normal Float64 from a seeded ChaCha stream (Box–Muller), independent of
/// libtorch's global generator which parallel tests share.
fn normal(rng: &mut ChaCha8Rng, n: i64, d: i64) -> Tensor {
    let v: Vec<f64> = (0..n * d)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(f64::MIN_POSITIVE), rng.gen());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_slice(&v).reshape([n, d])
}

/// Random Gaussian statistics: μ ~ N(0, I), Σ = A Aᵀ / k with A (d, k) (full rank when k ≥ d).
fn random_stats(rng: &mut ChaCha8Rng, d: i64, k: i64, mean_scale: f64) -> GaussianStats {
    let mu = normal(rng, 1, d).reshape([d]) * mean_scale;
    let a = normal(rng, d, k);
    GaussianStats::new(mu, a.matmul(&a.tr()) / k as f64).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn frechet_matches_scipy_on_random_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut worst: f64 = 0.0;
    // (dim, rank of A, mean scale): full-rank and nearly-equal pairs
    for (case, (d, k, scale)) in [(16, 32, 1.0), (64, 128, 0.1), (256, 512, 0.01)].into_iter().enumerate() {
        let s1 = random_stats(&mut rng, d, k, scale);
        let s2 = random_stats(&mut rng, d, k, scale);
        let (p1, p2) = (dir.path().join(format!("a{case}.npz")), dir.path().join(format!("b{case}.npz")));
        s1.write_npz(&p1).unwrap();
        s2.write_npz(&p2).unwrap();
        let ours = s1.frechet_distance(&s2).unwrap();
        let Some(out) = reference_helper(&["frechet", p1.to_str().unwrap(), p2.to_str().unwrap()]) else { return };
        let scipy: f64 = out.parse().unwrap();
        let rel = (ours - scipy).abs() / scipy.abs();
        eprintln!("d={d}: flowmap {ours:.12} scipy {scipy:.12} relative error {rel:.2e}");
        assert!(rel < 1e-6, "d={d}: {ours} vs scipy {scipy}");
        worst = worst.max(rel);
    }
    // numpy-written files (np.savez) read by flowmap
    let (p1, p2) = (dir.path().join("np1.npz"), dir.path().join("np2.npz"));
    let (Some(_), Some(_)) = (reference_helper(&["random", p1.to_str().unwrap(), "128", "7"]), reference_helper(&["random", p2.to_str().unwrap(), "128", "8"])) else { return };
    let ours = GaussianStats::read_npz(&p1).unwrap().frechet_distance(&GaussianStats::read_npz(&p2).unwrap()).unwrap();
    let scipy: f64 = reference_helper(&["frechet", p1.to_str().unwrap(), p2.to_str().unwrap()]).unwrap().parse().unwrap();
    let rel = (ours - scipy).abs() / scipy;
    eprintln!("numpy-made d=128: flowmap {ours:.12} scipy {scipy:.12} relative error {rel:.2e}; worst Rust-made {worst:.2e}");
    assert!(rel < 1e-6, "{ours} vs scipy {scipy}");
}

#[test]
fn frechet_closed_forms() {
    // Commuting (diagonal) covariances: FID = ‖μ₁ − μ₂‖² + Σ (√a − √b)².
    let a = Tensor::from_slice(&[1.0f64, 4.0, 9.0, 0.25]);
    let b = Tensor::from_slice(&[4.0f64, 1.0, 9.0, 1.0]);
    let mu1 = Tensor::from_slice(&[0.0f64, 1.0, 2.0, 3.0]);
    let mu2 = Tensor::from_slice(&[1.0f64, 1.0, 0.0, 3.0]);
    let want = 1.0 + 4.0 + (1.0 + 1.0 + 0.0 + 0.25); // 7.25
    let got = frechet_distance(&mu1, &a.diag(0), &mu2, &b.diag(0)).unwrap();
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    // Invariant under a common rotation of both Gaussians.
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (q, _) = Tensor::linalg_qr(&normal(&mut rng, 4, 4), "reduced");
    let rot = |s: &Tensor| q.matmul(s).matmul(&q.tr());
    let got = frechet_distance(&q.matmul(&mu1), &rot(&a.diag(0)), &q.matmul(&mu2), &rot(&b.diag(0))).unwrap();
    assert!((got - want).abs() < 1e-10, "rotated: {got} vs {want}");
    // Rank-deficient (16 samples in 2048-d, as in small tests): self-distance 0, finite.
    let f = normal(&mut rng, 16, 2048).abs();
    let s = FeatureStats::from_features(&f).unwrap().finish().unwrap();
    let self_fid = s.frechet_distance(&s).unwrap();
    eprintln!("rank-15 2048-d self FID {self_fid:.3e} (trace Σ = {:.1})", s.sigma.trace().double_value(&[]));
    assert!(self_fid.abs() < 1e-8, "{self_fid}");
}

#[test]
fn streaming_statistics_match_direct_mean_and_cov() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = normal(&mut rng, 100, 8) * 2.0 + 5.0;
    let mut s = FeatureStats::new(8);
    s.update(&x.narrow(0, 0, 30).to_kind(Kind::Float)).unwrap(); // any float kind
    s.update(&x.narrow(0, 30, 50)).unwrap();
    let mut rest = FeatureStats::new(8);
    rest.update(&x.narrow(0, 80, 20)).unwrap();
    s.merge(&rest).unwrap();
    assert_eq!(s.count(), 100);
    let g = s.finish().unwrap();
    let mu = x.mean_dim(0, false, Kind::Double);
    let xc = &x - &mu;
    let cov = xc.tr().matmul(&xc) / 99.0; // np.cov(rowvar=False)
    assert!(max_abs(&(&g.mu - &mu)) < 1e-6); // the first 30 rows went through float32
    assert!(max_abs(&(&g.sigma - &cov)) < 1e-5, "{}", max_abs(&(&g.sigma - &cov)));
    let exact = FeatureStats::from_features(&x).unwrap().finish().unwrap();
    assert!(max_abs(&(&exact.sigma - &cov)) < 1e-11);
    assert!(FeatureStats::from_features(&x.narrow(0, 0, 1)).unwrap().finish().is_err(), "one row has no covariance");
}

#[test]
fn npz_round_trip_and_cache_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let s = random_stats(&mut rng, 32, 8, 1.0);
    let p = dir.path().join("stats.npz");
    s.write_npz(&p).unwrap();
    let back = GaussianStats::read_npz(&p).unwrap();
    assert_eq!(max_abs(&(&back.mu - &s.mu)), 0.0);
    assert_eq!(max_abs(&(&back.sigma - &s.sigma)), 0.0);
    assert_eq!(back.sigma.size(), [32, 32]);

    // A reference with features: features are stored as float32, mu/sigma as float64.
    let feats = normal(&mut rng, 10, 32).to_kind(Kind::Float).to_kind(Kind::Double);
    let r = Reference::from_features("toy", Some(Preprocess::Tf), feats.copy()).unwrap();
    let p = dir.path().join("sub/toy.npz");
    r.write_npz(&p).unwrap();
    let back = Reference::from_npz(&p).unwrap();
    assert_eq!(back.name, "toy");
    assert_eq!(back.preprocess, None, "an npz does not record the convention");
    assert_eq!(max_abs(&(back.features.unwrap() - &feats)), 0.0);
    assert_eq!(max_abs(&(&back.stats.sigma - &r.stats.sigma)), 0.0);
    assert!(!dir.path().join("sub/toy.npz.partial").exists());
    let missing = GaussianStats::read_npz(&dir.path().join("nope.npz")).unwrap_err();
    assert!(format!("{missing:#}").contains("nope.npz"));

    // Cache key: stable, and changes with every input.
    let w = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34";
    let base = stats_cache_key("mnist/t10k-images-idx3-ubyte:0fa7", 10_000, Preprocess::PytorchFid, w);
    assert_eq!(base.len(), 64);
    assert_eq!(base, stats_cache_key("mnist/t10k-images-idx3-ubyte:0fa7", 10_000, Preprocess::PytorchFid, w));
    assert_ne!(base, stats_cache_key("mnist/t10k-images-idx3-ubyte:0fa7", 10_000, Preprocess::Tf, w));
    assert_ne!(base, stats_cache_key("mnist/t10k-images-idx3-ubyte:0fa7", 9_999, Preprocess::PytorchFid, w));
    assert_ne!(base, stats_cache_key("mnist/train-images-idx3-ubyte:ba89", 10_000, Preprocess::PytorchFid, w));
    assert_ne!(base, stats_cache_key("mnist/t10k-images-idx3-ubyte:0fa7", 10_000, Preprocess::PytorchFid, "00"));
}

#[test]
fn kid_matches_numpy_and_is_unbiased() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // The per-subset estimator against numpy.
    let x = normal(&mut rng, 40, 16).abs();
    let y = normal(&mut rng, 40, 16).abs() * 1.1;
    let ours = mmd2_unbiased(&x, &y);
    let xy = dir.path().join("xy_arrays.npz");
    write_xy(&xy, &x, &y);
    if let Some(out) = reference_helper(&["mmd", xy.to_str().unwrap()]) {
        let numpy: f64 = out.parse().unwrap();
        eprintln!("MMD² flowmap {ours:.12} numpy {numpy:.12}");
        assert!((ours - numpy).abs() <= 1e-9 * numpy.abs().max(1e-3), "{ours} vs {numpy}");
    }
    // Whole-set subsets: every subset is a permutation, so KID equals the estimator with std 0.
    let kid = kernel_inception_distance(&x, &y, &KidSettings { num_subsets: 5, max_subset_size: 1000, seed: 0 }).unwrap();
    assert_eq!(kid.subset_size, 40);
    assert!((kid.mean - ours).abs() < 1e-9 * ours.abs().max(1.0) && kid.std < 1e-9, "{kid:?} vs {ours}");

    // Unbiasedness at tiny sample counts: 400 pairs of 8 samples from one Gaussian.
    let (trials, m, d) = (400, 8, 16);
    let (mut unbiased, mut biased) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let (a, b) = (normal(&mut rng, m, d), normal(&mut rng, m, d));
        unbiased.push(mmd2_unbiased(&a, &b));
        let k = |p: &Tensor, q: &Tensor| (p.matmul(&q.tr()) / d as f64 + 1.0).pow_tensor_scalar(3).mean(Kind::Double).double_value(&[]);
        biased.push(k(&a, &a) + k(&b, &b) - 2.0 * k(&a, &b)); // V-statistic, with the diagonal
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mu_u, mu_b) = (mean(&unbiased), mean(&biased));
    let se = (unbiased.iter().map(|v| (v - mu_u).powi(2)).sum::<f64>() / (trials as f64 - 1.0)).sqrt() / (trials as f64).sqrt();
    // Different distributions: shifted by 1 in every coordinate.
    let kid_diff = kernel_inception_distance(&normal(&mut rng, 200, d), &(normal(&mut rng, 200, d) + 1.0), &KidSettings { num_subsets: 20, max_subset_size: 100, seed: 1 }).unwrap();
    let kid_same = kernel_inception_distance(&normal(&mut rng, 200, d), &normal(&mut rng, 200, d), &KidSettings { num_subsets: 20, max_subset_size: 100, seed: 1 }).unwrap();
    eprintln!("m=8 same-distribution: unbiased mean {mu_u:.4} ± {se:.4} (s.e.), biased V-statistic {mu_b:.4}; KID n=200 same {:.4} ± {:.4}, shifted {:.4} ± {:.4}", kid_same.mean, kid_same.std, kid_diff.mean, kid_diff.std);
    assert!(mu_u.abs() < 4.0 * se, "unbiased estimator mean {mu_u} (s.e. {se})");
    assert!(mu_b > 20.0 * se && mu_b > 0.5, "the biased estimator should be clearly positive: {mu_b}");
    assert!(kid_same.mean.abs() < 0.05 * kid_diff.mean, "same {kid_same:?} vs shifted {kid_diff:?}");
    assert!(kid_diff.mean > 10.0 * kid_diff.std.max(kid_same.std));
    assert!(kernel_inception_distance(&x.narrow(0, 0, 1), &y, &KidSettings::default()).is_err());
}

/// Writes float64 arrays `x`, `y` into an npz with npyz directly.
fn write_xy(path: &Path, x: &Tensor, y: &Tensor) {
    use npyz::WriterBuilder;
    let mut npz = npyz::npz::NpzWriter::create(path).unwrap();
    for (name, t) in [("x", x), ("y", y)] {
        let v: Vec<f64> = Vec::try_from(t.to_device(Device::Cpu).contiguous().reshape([-1])).unwrap();
        let shape: Vec<u64> = t.size().iter().map(|&s| s as u64).collect();
        let mut w = npz.array::<f64>(name, Default::default()).unwrap().default_dtype().shape(&shape).begin_nd().unwrap();
        w.extend(v).unwrap();
        w.finish().unwrap();
    }
}

#[test]
fn fid_csv_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/fid.csv");
    let row = |steps: usize, nfe: Option<f64>, fid: f64, kid: Option<f64>| FidRow {
        train_step: 5000,
        steps,
        nfe,
        cfg_scale: 1.5,
        weights: "ema".into(),
        num_samples: 1024,
        ref_stats: "mnist-test-10000, first".into(), // a comma: quoted
        preprocess: "pytorch_fid".into(),
        fid,
        kid,
        eval_seed: steps as u64 % 2,
    };
    let rows = vec![row(1, Some(2.0), 123.456789012345, Some(0.0123)), row(2, None, 45.5, None), row(3, Some(5.5), 7.25, None)];
    append_fid_csv(&path, &rows[..1]).unwrap();
    append_fid_csv(&path, &rows[1..]).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().next().unwrap(), "train_step,steps,nfe,cfg_scale,weights,num_samples,ref_stats,preprocess,fid,kid,eval_seed");
    assert_eq!(text.lines().count(), 4, "one header, three rows:\n{text}");
    assert!(text.lines().nth(1).unwrap().starts_with("5000,1,2,1.5,ema,"), "{text}");
    assert!(text.contains("\"mnist-test-10000, first\""));
    assert_eq!(read_fid_csv(&path).unwrap(), rows);
    // A file written before the eval_seed column: read as seed 0, upgraded on the next append.
    let before = dir.path().join("before.csv");
    std::fs::write(&before, "train_step,steps,nfe,cfg_scale,weights,num_samples,ref_stats,preprocess,fid,kid\n100,1,1,1,ema,8,r,pytorch_fid,12.5,\n").unwrap();
    assert_eq!(read_fid_csv(&before).unwrap()[0].eval_seed, 0);
    append_fid_csv(&before, &rows[2..]).unwrap();
    let upgraded = std::fs::read_to_string(&before).unwrap();
    assert_eq!(upgraded.lines().collect::<Vec<_>>()[..2], ["train_step,steps,nfe,cfg_scale,weights,num_samples,ref_stats,preprocess,fid,kid,eval_seed", "100,1,1,1,ema,8,r,pytorch_fid,12.5,,0"]);
    assert_eq!(read_fid_csv(&before).unwrap()[1], rows[2]);
    let other = dir.path().join("other.csv");
    std::fs::write(&other, "a,b\n1,2\n").unwrap();
    assert!(append_fid_csv(&other, &rows).is_err(), "a foreign header is not appended to");
}

/// Timing only (ignored by default): KID at the protocol size, 1000 samples against 10,000
/// reference rows, 100 subsets of 1000. `cargo test --release -p flowmap-experiments --test
/// fid_math -- --ignored --nocapture`.
#[test]
#[ignore]
fn kid_cost_at_protocol_size() {
    use flowmap_experiments::eval::fid::KidReference;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let reference = normal(&mut rng, 10_000, 2048).abs();
    let samples = normal(&mut rng, 1000, 2048).abs();
    let t = std::time::Instant::now();
    let r = KidReference::new(&reference, 1000, &KidSettings::default()).unwrap();
    let prep = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let kid = r.kid(&samples).unwrap();
    eprintln!("KID 1000 vs 10000 (100 subsets of 1000, {} threads): reference side {prep:.1} s once, per sample set {:.1} s; {kid:?}", tch::get_num_threads(), t.elapsed().as_secs_f64());
}
