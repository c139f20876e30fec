//! Two-stage reflow end to end on the tiny config: train a flow-matching teacher, store its
//! (noise, sample) couplings with `flowmap reflow-pairs`, train `reflow` on them.
use flowmap_experiments::config::load_config;
use flowmap_experiments::eval::sampling::Weights;
use flowmap_experiments::run::model::load_run_weights;
mod cli_support;
use cli_support::{flowmap, flowmap_ok as ok};
use std::path::Path;

#[test]
fn pairs_are_the_teachers_samples_and_reflow_trains_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml");
    let (teacher, student) = (dir.path().join("teacher"), dir.path().join("student"));
    ok(&["train", tiny.to_str().unwrap(), "--run-dir", teacher.to_str().unwrap(), "--set", "run.steps=6"]);
    let pairs = dir.path().join("pairs.safetensors");
    ok(&["reflow-pairs", "--teacher", teacher.to_str().unwrap(), "--count", "40", "--steps", "2", "--batch", "16", "--out", pairs.to_str().unwrap()]);

    // The stored sample of each noise is what the teacher's sampler makes from it.
    let p = flowmap_experiments::data::reflow_pairs::load_pairs(&pairs).unwrap();
    assert_eq!(p.x.size(), vec![40, 1, 32, 32]);
    assert_eq!(Vec::<i64>::try_from(&p.class.narrow(0, 0, 12)).unwrap(), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    let (cfg, _) = load_config(&tiny, &[]).unwrap();
    let net = load_run_weights(&teacher, &cfg.model, Weights::Ema, tch::Device::Cpu).unwrap();
    let again = cfg.sampler().unwrap().generate(net.net.as_ref(), p.noise.narrow(0, 20, 4), &p.class.narrow(0, 20, 4), 2);
    let d = (&again - p.x.narrow(0, 20, 4)).abs().max().double_value(&[]);
    assert!(d < 1e-5, "stored sample differs from the teacher's by {d}");

    // Stage two needs the pairs; without them the config is rejected naming the key.
    let no_pairs = flowmap(&["train", tiny.to_str().unwrap(), "--run-dir", student.to_str().unwrap(), "--set", "objective.kind=reflow"]);
    assert!(!no_pairs.status.success());
    assert!(String::from_utf8_lossy(&no_pairs.stderr).contains("data.reflow_pairs"));
    let set = format!("data.reflow_pairs=\"{}\"", pairs.display());
    ok(&["train", tiny.to_str().unwrap(), "--run-dir", student.to_str().unwrap(), "--set", "objective.kind=reflow", "--set", &set, "--set", "run.steps=4", "--set", "run.log_every=1"]);
    let losses: Vec<f64> = flowmap_experiments::train::metrics::read(&student.join("metrics.jsonl")).unwrap().iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
}
