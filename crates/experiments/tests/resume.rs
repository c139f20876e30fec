//! Exact resume across processes, SIGTERM, non-finite losses: the reliability promises of the
//! training loop, on the tiny CPU config (experiments/tiny_cpu.toml).
use flowmap_experiments::config::load_config;
use flowmap_experiments::run::checkpoint::{Checkpoint, CheckpointDir};
use flowmap_experiments::train::{train, Outcome, Resume, TrainOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

const N: u64 = 12;
const K: u64 = 5;

fn config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

fn flowmap(run_dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train".to_string(), config().display().to_string(), "--run-dir".into(), run_dir.display().to_string()];
    for s in [format!("run.steps={N}"), "run.log_every=1".into(), "run.checkpoint_every=0".into(), "run.keep_checkpoints=1".into(), "objective.label_dropout=0.3".into()] {
        args.extend(["--set".to_string(), s]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_flowmap")).args(&args).output().unwrap();
    assert!(out.status.success(), "flowmap {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn latest(run: &Path) -> Checkpoint {
    CheckpointDir::new(run.join("checkpoints"), 1).latest().unwrap().unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    flowmap_experiments::train::metrics::read(&run.join("metrics.jsonl")).unwrap().iter().map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap())).collect()
}

fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: different tensors");
    for (k, t) in a {
        assert!(t.equal(&b[k]), "{what}: `{k}` differs");
    }
}

fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    a.iter().map(|(k, t)| (t - &b[k]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

#[test]
fn resume_in_a_new_process_is_bit_exact_and_dropping_optimizer_state_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, resumed, control) = (dir.path().join("straight"), dir.path().join("resumed"), dir.path().join("control"));
    flowmap(&straight, &["--resume", "never"]);
    flowmap(&resumed, &["--max-steps", &K.to_string()]);
    assert_eq!(latest(&resumed).step, K);
    flowmap(&resumed, &["--resume", "auto"]);

    let (a, b) = (latest(&straight), latest(&resumed));
    assert_eq!((a.step, b.step), (N, N));
    for stem in ["model", "ema", "optim"] {
        assert_same(&a.tensors(stem).unwrap(), &b.tensors(stem).unwrap(), stem);
    }
    assert_eq!(a.state().unwrap()["data"], b.state().unwrap()["data"]);
    let (la, lb) = (losses(&straight), losses(&resumed));
    assert_eq!(la.len() as u64, N);
    assert_eq!(la, lb, "loss sequences differ");

    // Negative control: resume after zeroing the AdamW moments (what shortcut-models' resume does).
    flowmap(&control, &["--max-steps", &K.to_string()]);
    let ck = latest(&control);
    let zeroed: Vec<(String, Tensor)> = ck.tensors("optim").unwrap().into_iter().map(|(k, t)| (k, t.zeros_like())).collect();
    Tensor::write_safetensors(&zeroed, ck.dir.join("optim.safetensors")).unwrap();
    rewrite_manifest(&ck.dir);
    flowmap(&control, &["--resume", "auto"]);
    let c = latest(&control);
    let d = max_diff(&a.tensors("model").unwrap(), &c.tensors("model").unwrap());
    assert!(d > 1e-6, "resuming without optimizer state should change the weights, max diff {d}");
    assert_ne!(losses(&control)[K as usize..], la[K as usize..]);
}

fn rewrite_manifest(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("MANIFEST")).unwrap();
    let fixed: String = text
        .lines()
        .map(|l| {
            let (_, f) = l.split_once("  ").unwrap();
            format!("{}  {f}\n", flowmap_experiments::data::cache::sha256_file(&dir.join(f)).unwrap())
        })
        .collect();
    std::fs::write(dir.join("MANIFEST"), fixed).unwrap();
}

#[test]
fn sigterm_checkpoints_at_a_step_boundary_and_the_resume_matches_a_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, stopped) = (dir.path().join("straight"), dir.path().join("stopped"));
    let long = ["--set", "run.steps=60"];
    flowmap(&straight, &long);
    let mut args = vec!["train".to_string(), config().display().to_string(), "--run-dir".into(), stopped.display().to_string()];
    for s in ["run.steps=60", "run.log_every=1", "run.checkpoint_every=0", "run.keep_checkpoints=1", "objective.label_dropout=0.3"] {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let child = Command::new(env!("CARGO_BIN_EXE_flowmap")).args(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait for a few steps, then SIGTERM.
    let metrics = stopped.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) < 3 {
        assert!(t0.elapsed().as_secs() < 60, "the child made no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "SIGTERM should end the run cleanly: {}", String::from_utf8_lossy(&out.stderr));
    let at = latest(&stopped).step;
    assert!((3..60).contains(&at), "stopped at step {at}");
    flowmap(&stopped, &long);
    let (a, b) = (latest(&straight), latest(&stopped));
    assert_eq!(b.step, 60);
    for stem in ["model", "ema", "optim"] {
        assert_same(&a.tensors(stem).unwrap(), &b.tensors(stem).unwrap(), stem);
    }
}

#[test]
fn non_finite_loss_stops_keeping_the_last_checkpoint_or_skips_by_config() {
    let dir = tempfile::tempdir().unwrap();
    let sets = |extra: &[&str]| -> Vec<String> { ["run.steps=8", "run.checkpoint_every=2", "run.keep_checkpoints=3"].iter().chain(extra).map(|s| s.to_string()).collect() };
    // stop: an error naming the step and the last good checkpoint, which still loads.
    let (cfg, table) = load_config(&config(), &sets(&[])).unwrap();
    let run = dir.path().join("stop");
    let opts = TrainOptions { run_dir: Some(run.clone()), resume: Resume::Never, inject_nan_at: vec![5], ..Default::default() };
    let err = format!("{:#}", train(&cfg, &table, &opts).unwrap_err());
    assert!(err.contains("non-finite") && err.contains("step 5") && err.contains("step_00000004"), "{err}");
    assert_eq!(latest(&run).step, 4);

    // skip: parameters, EMA and optimizer untouched by the bad step; counted; the run finishes.
    let (cfg, table) = load_config(&config(), &sets(&["run.on_nonfinite=skip"])).unwrap();
    let run = dir.path().join("skip");
    let opts = TrainOptions { run_dir: Some(run.clone()), resume: Resume::Never, inject_nan_at: vec![4], ..Default::default() };
    let s = train(&cfg, &table, &opts).unwrap();
    assert_eq!((s.outcome, s.skipped_steps, s.step), (Outcome::Finished, 1, 8));
    // The checkpoint at step 4 and the one at 5 (written by a second run stopped there) hold the
    // same weights: step 4 → 5 was the skipped update.
    let run5 = dir.path().join("skip5");
    let opts5 = TrainOptions { run_dir: Some(run5.clone()), resume: Resume::Never, inject_nan_at: vec![4], max_steps_this_call: Some(5), ..Default::default() };
    train(&cfg, &table, &opts5).unwrap();
    let at5 = latest(&run5);
    assert_eq!(at5.step, 5);
    let at4 = CheckpointDir::new(run.join("checkpoints"), 3).candidates().into_iter().find(|c| c.step == 4).unwrap();
    for stem in ["model", "ema", "optim"] {
        assert_same(&at4.tensors(stem).unwrap(), &at5.tensors(stem).unwrap(), stem);
    }
    assert_eq!(at5.state().unwrap()["skipped_steps"], 1);

    // Too many in a row stops.
    let (cfg, table) = load_config(&config(), &sets(&["run.on_nonfinite=skip", "run.max_consecutive_skips=2"])).unwrap();
    let opts = TrainOptions { run_dir: Some(dir.path().join("many")), resume: Resume::Never, inject_nan_at: vec![1, 2, 3], ..Default::default() };
    let err = format!("{:#}", train(&cfg, &table, &opts).unwrap_err());
    assert!(err.contains("3 non-finite steps in a row"), "{err}");
}
