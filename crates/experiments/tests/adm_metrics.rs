//! The ADM suite (FID, sFID, Inception Score, precision/recall) against independent Python
//! implementations on the same images: torch-fidelity 0.4.0's own Inception network and metric
//! code and pytorch-fid 0.3.0's Fréchet distance (tests/python/adm_reference.py), fed the Inception
//! weights of the data cache. 300 MNIST test digits (100 reference, 100 samples, 100 shifted and
//! blurred samples) through flowmap's network and 200 through torch-fidelity's (in a second
//! process at the same time): about 2–3 minutes on 2 CPU cores. Needs `make setup` (data cache and the reference packages in the venv).
use flowmap_experiments::data::cache;
use flowmap_experiments::data::idx::{self, Split};
use flowmap_experiments::eval::adm::sample_batch::{to_hwc_u8, write_batch};
use flowmap_experiments::eval::adm::{batch_activations, score_activations, AdmSettings, ReferenceBatch};
use flowmap_experiments::eval::fid::inception_net::LogitsHead;
use flowmap_experiments::eval::fid::stats::write_npz;
use flowmap_experiments::eval::fid::{Inception, Preprocess};
use flowmap_experiments::run::world::World;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[allow(dead_code)] // shared with the fid tests; this one uses only `python()`
mod fid_support;

const N: i64 = 100;

/// Starts tests/python/adm_reference.py (one thread, so that it runs beside flowmap's work).
fn start_reference(args: &[&str]) -> std::process::Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/adm_reference.py");
    Command::new(fid_support::python()).arg(&script).args(args).env("FLOWMAP_REFERENCE_THREADS", "1").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("running the venv's python")
}

/// Waits for the helper and reads its JSON; a missing package is a failure that names the fix.
fn finish_reference(child: std::process::Child, out_json: &Path) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "adm_reference.py failed (exit {:?}; `make setup` installs torch-fidelity and pytorch-fid): {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(out_json).unwrap()).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn adm_suite_matches_torch_fidelity_and_pytorch_fid_and_a_degraded_set_scores_worse() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f);
    let (images, _) = idx::split_files(&cache::mnist_dir(), Split::Test, false);
    let digits = idx::read_images(&images).expect("MNIST test images (run `make setup`)").narrow(0, 0, 2 * N); // (2N, 1, 28, 28) in [−1, 1]
    let (ref_images, samples) = (digits.narrow(0, 0, N), digits.narrow(0, N, N));
    // Shifted by 3 px and blurred (3×3 box): a set that must score worse on every number.
    let degraded = ((&samples + 1.0).roll([3, 3], [2, 3]).avg_pool2d([3, 3], [1, 1], [1, 1], false, true, None) - 1.0).clamp(-1.0, 1.0);
    write_batch(&p("ref.npz"), &to_hwc_u8(&ref_images), None).unwrap();
    write_batch(&p("samples.npz"), &to_hwc_u8(&samples), None).unwrap();
    write_batch(&p("degraded.npz"), &to_hwc_u8(&degraded), None).unwrap();
    // The real 1008-way classifier is in no package registry: a fixed random stand-in exercises
    // the same path on both sides (logits = pool3 · Wᵀ, softmax, 10 splits).
    tch::manual_seed(14);
    let w = Tensor::randn([1008, 2048], (Kind::Float, Device::Cpu)) * 0.05;
    write_npz(&p("logits.npz"), &[("weight", &w)]).unwrap();

    // torch-fidelity and pytorch-fid on the same files, in a second process meanwhile.
    let start = Instant::now();
    let python = start_reference(&["suite", cache::inception_weights().to_str().unwrap(), p("samples.npz").to_str().unwrap(), p("ref.npz").to_str().unwrap(), p("theirs.json").to_str().unwrap(), p("logits.npz").to_str().unwrap()]);
    let inception = Inception::load(Device::Cpu, Preprocess::Tf).unwrap().with_logits(&LogitsHead::read_npz(&p("logits.npz")).unwrap());
    let world = World::single();
    let settings = AdmSettings::default();
    let reference_batch = ReferenceBatch::load(&p("ref.npz"), &inception, &world, settings.chunk, &p("cache")).unwrap().unwrap();
    eprintln!("reference activations: {:.1} s", start.elapsed().as_secs_f64());
    let acts = batch_activations(&p("samples.npz"), &inception, &world, 64).unwrap().unwrap();
    eprintln!("+ sample activations: {:.1} s", start.elapsed().as_secs_f64());
    let ours = score_activations("samples", &acts, &reference_batch, &inception, &settings).unwrap();
    eprintln!("+ scores: {:.1} s", start.elapsed().as_secs_f64());
    let worse = score_activations("degraded", &batch_activations(&p("degraded.npz"), &inception, &world, 64).unwrap().unwrap(), &reference_batch, &inception, &settings).unwrap();
    let flowmap_s = start.elapsed().as_secs_f64();

    let theirs = finish_reference(python, &p("theirs.json"));
    let python_s = start.elapsed().as_secs_f64();
    let t = |k: &str| theirs[k].as_f64().unwrap();
    let (pr, is) = (ours.precision_recall.unwrap(), ours.inception_score.unwrap());
    let sfid = ours.sfid.unwrap();
    eprintln!("flowmap ({flowmap_s:.0} s, 300 images): FID {:.6} sFID {:.6} IS {:.6} precision {} recall {}", ours.fid, sfid, is.mean, pr.precision, pr.recall);
    eprintln!(
        "torch-fidelity/pytorch-fid (done {python_s:.0} s after the start, 200 images): FID {:.6} (pytorch-fid {:.6}) sFID {:.6} IS {:.6} precision {} recall {}",
        t("fid"),
        t("fid_pytorch_fid"),
        t("sfid"),
        t("inception_score"),
        t("precision"),
        t("recall")
    );
    let d = [rel(ours.fid, t("fid")), rel(ours.fid, t("fid_pytorch_fid")), rel(sfid, t("sfid")), rel(is.mean, t("inception_score"))];
    eprintln!("relative differences: FID vs torch-fidelity {:.1e}, vs pytorch-fid {:.1e}; sFID vs torch-fidelity {:.1e}; IS {:.1e}", d[0], d[1], d[2], d[3]);
    for (what, diff) in ["FID/torch-fidelity", "FID/pytorch-fid", "sFID/torch-fidelity", "IS"].iter().zip(d) {
        assert!(diff < 1e-3, "{what}: relative difference {diff:.2e}");
    }
    if let Some(s) = theirs.get("sfid_pytorch_fid").and_then(|v| v.as_f64()) {
        eprintln!("sFID vs pytorch-fid (FLOWMAP_REFERENCE_SQRTM=1): {s:.6}, relative difference {:.1e}", rel(sfid, s));
        assert!(rel(sfid, s) < 1e-3);
    }
    // End to end the two networks' features differ by float32 rounding (~1e-6): a point on a
    // ball's edge could flip, so allow one point either way here; exact equality on identical
    // features follows.
    assert!((pr.precision - t("precision")).abs() <= 1.0 / N as f64 && (pr.recall - t("recall")).abs() <= 1.0 / N as f64, "P/R {pr:?} vs {theirs}");

    // The same features through torch-fidelity's precision/recall and IS: exactly equal.
    write_npz(&p("features.npz"), &[("reference", &reference_batch.pool.as_ref().unwrap().to_kind(Kind::Double)), ("samples", &acts.pool.to_kind(Kind::Double)), ("logits", &acts.logits.as_ref().unwrap().to_kind(Kind::Double))]).unwrap();
    let same = finish_reference(start_reference(&["prc", p("features.npz").to_str().unwrap(), p("same.json").to_str().unwrap()]), &p("same.json"));
    eprintln!("identical features: precision {} vs {}, recall {} vs {}, IS {} vs {}", pr.precision, same["precision"], pr.recall, same["recall"], is.mean, same["inception_score"]);
    // torch-fidelity averages in float32 (0.88 reads 0.8799999952): compare the counts of points.
    let count = |share: f64| (share * N as f64).round() as i64;
    assert_eq!((count(pr.precision), count(pr.recall)), (count(same["precision"].as_f64().unwrap()), count(same["recall"].as_f64().unwrap())));
    assert!((pr.precision - same["precision"].as_f64().unwrap()).abs() < 1e-6 && (pr.recall - same["recall"].as_f64().unwrap()).abs() < 1e-6);
    assert!(rel(is.mean, same["inception_score"].as_f64().unwrap()) < 1e-9);

    // Worse on every number; real digits against real digits are close to the reference.
    let wpr = worse.precision_recall.unwrap();
    eprintln!("shifted+blurred: FID {:.3} sFID {:.3} precision {} recall {}", worse.fid, worse.sfid.unwrap(), wpr.precision, wpr.recall);
    assert!(worse.fid > ours.fid * 1.5 && worse.sfid.unwrap() > sfid * 1.5, "{worse:?} vs {ours:?}");
    assert!(wpr.precision < pr.precision - 0.2 && wpr.recall < pr.recall, "{wpr:?} vs {pr:?}");
    assert!(pr.precision > 0.5 && pr.recall > 0.5, "real digits lie on the reference manifold: {pr:?}");

    // A reference of statistics only (mu, sigma, mu_s, sigma_s, as the ADM batches carry them):
    // the same FID and sFID, no precision/recall, and the report says why.
    let (rs, rss) = (&reference_batch.stats.stats, &reference_batch.spatial_stats.as_ref().unwrap().stats);
    write_npz(&p("stats.npz"), &[("mu", &rs.mu), ("sigma", &rs.sigma), ("mu_s", &rss.mu), ("sigma_s", &rss.sigma)]).unwrap();
    let stats_only = ReferenceBatch::load(&p("stats.npz"), &inception, &world, settings.chunk, &p("cache")).unwrap().unwrap();
    let by_stats = score_activations("samples", &acts, &stats_only, &inception, &settings).unwrap();
    assert!(stats_only.stats_from_file && stats_only.pool.is_none());
    assert!(rel(by_stats.fid, ours.fid) < 1e-12 && rel(by_stats.sfid.unwrap(), sfid) < 1e-12, "{by_stats:?}");
    assert!(by_stats.precision_recall.is_none() && by_stats.render().contains("Precision: not computed"), "{}", by_stats.render());

    // The reference activations are cached: a second load does not run the network.
    let start = Instant::now();
    let again = ReferenceBatch::load(&p("ref.npz"), &inception, &world, settings.chunk, &p("cache")).unwrap().unwrap();
    assert!(start.elapsed().as_secs_f64() < 5.0);
    assert!(again.pool.unwrap().equal(reference_batch.pool.as_ref().unwrap()));
}

#[test]
fn the_native_inception_graph_matches_the_torchscript_module() {
    // The same normalised input through the TorchScript file (pool3 only) and through
    // InceptionNet built from its parameters (pool3, mixed_6/conv, logits in one pass).
    use flowmap_experiments::eval::fid::inception_net::{InceptionNet, SPATIAL_DIM};
    let path = cache::inception_weights();
    let ts = tch::CModule::load_on_device(&path, Device::Cpu).expect("the Inception file (run `make setup`)");
    let native = InceptionNet::load(&path, Device::Cpu).unwrap();
    tch::manual_seed(5);
    let x = Tensor::rand([2, 3, 299, 299], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let want = tch::no_grad(|| ts.forward_ts(&[&x]).unwrap());
    let got = tch::no_grad(|| native.forward(&x).unwrap());
    let err = (&got.pool - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    eprintln!("native Inception vs TorchScript: pool3 max |diff| / max = {err:.1e}");
    assert!(err < 1e-6, "{err}");
    assert_eq!(got.spatial.size(), [2, SPATIAL_DIM]);
    assert!(got.spatial.min().double_value(&[]) >= 0.0 && got.spatial.max().double_value(&[]) > 0.0, "mixed_6/conv follows a ReLU");
    assert!(got.logits.is_none() && !native.has_logits());
}
