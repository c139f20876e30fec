//! A run directory under crashes, concurrent processes and changed configs (issue 10, B–G), on the
//! tiny CPU config: what `--resume auto` does with broken checkpoints, the run lock, the FID cache
//! shared by two processes, skipped non-finite steps, config changes on resume, the reported
//! MeanFlow loss and SIGTERM during `flowmap table`.
use flowmap_experiments::config::load_config;
use flowmap_experiments::run::checkpoint::{verify, CheckpointDir};
use flowmap_experiments::train::{train, Outcome, TrainOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The in-process trainings of this binary share tch's global generator.
static GENERATOR: Mutex<()> = Mutex::new(());

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

/// `flowmap train tiny_cpu.toml --run-dir RUN --set …` with its FID statistics cached in `cache`.
fn train_cmd(run: &Path, cache: &Path, sets: &[&str], extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowmap"));
    c.env("FLOWMAP_DERIVED_CACHE", cache).args(["train", tiny().to_str().unwrap(), "--run-dir", run.to_str().unwrap()]);
    for s in sets {
        c.args(["--set", s]);
    }
    c.args(extra);
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("running flowmap")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(c: Command) -> Output {
    let o = run(c);
    assert!(o.status.success(), "flowmap failed:\n{}", stderr(&o));
    o
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const SHORT: &[&str] = &["run.steps=4", "run.checkpoint_every=2", "run.log_every=1", "run.sample_every=0"];

#[test]
fn resume_auto_refuses_a_run_whose_checkpoints_are_all_broken_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (runp, cache) = (dir.path().join("run"), dir.path().join("cache"));
    ok(train_cmd(&runp, &cache, SHORT, &["--set", "run.keep_checkpoints=1"]));
    let ck = CheckpointDir::new(runp.join("checkpoints"), 1).latest().unwrap().unwrap();
    assert_eq!(ck.step, 4);
    let (config, metrics) = (read(&runp.join("config.toml")), read(&runp.join("metrics.jsonl")));

    // Corrupt the only checkpoint: resume must stop, naming it, not start again at step 0.
    let f = ck.dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(train_cmd(&runp, &cache, SHORT, &["--set", "run.keep_checkpoints=1"]));
    assert!(!o.status.success(), "resumed from a corrupt checkpoint");
    assert!(stderr(&o).contains("none is complete and intact") && stderr(&o).contains("model.safetensors does not match"), "{}", stderr(&o));
    // A deleted MANIFEST is reported as such.
    std::fs::write(&f, &bytes).unwrap();
    std::fs::remove_file(ck.dir.join("MANIFEST")).unwrap();
    let o = run(train_cmd(&runp, &cache, SHORT, &[]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no MANIFEST"), "{}", stderr(&o));
    assert_eq!(read(&runp.join("config.toml")), config, "config.toml was rewritten");
    assert_eq!(read(&runp.join("metrics.jsonl")), metrics, "metrics.jsonl was rewritten");
    assert!(ck.dir.join("model.safetensors").exists(), "the checkpoint was deleted");
}

#[test]
fn a_second_train_on_a_locked_run_is_refused_naming_the_holder_and_the_first_finishes_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (runp, cache) = (dir.path().join("run"), dir.path().join("cache"));
    // The first run is long enough to be still training when the second starts (400 tiny steps can
    // finish within the second's start-up on a quiet machine); it is stopped with SIGTERM below.
    let mut first = train_cmd(&runp, &cache, &["run.steps=1000000", "run.checkpoint_every=50", "run.log_every=10"], &[]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until the first process holds the lock (its pid is in LOCK).
    let lock = runp.join("LOCK");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&lock).map(|s| s.contains(&format!("pid {}", first.id()))).unwrap_or(false) {
        assert!(t0.elapsed() < Duration::from_secs(120), "the first process never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run(train_cmd(&runp, &cache, &["run.steps=1000000", "run.checkpoint_every=50", "run.log_every=10"], &[]));
    assert!(first.try_wait().unwrap().is_none(), "the first process ended before the second was refused");
    assert!(!o.status.success(), "the second process trained on a locked run");
    assert!(stderr(&o).contains("is in use by pid") && stderr(&o).contains(&first.id().to_string()), "{}", stderr(&o));
    // SIGTERM: the first writes a checkpoint at its next step and exits 0.
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGTERM) };
    let status = first.wait().unwrap();
    assert!(status.success(), "the first process failed");
    let ck = CheckpointDir::new(runp.join("checkpoints"), 2);
    let steps: Vec<u64> = ck.candidates().iter().map(|c| c.step).collect();
    assert_eq!(steps.len(), 2, "{steps:?}");
    for c in ck.candidates() {
        verify(&c.dir).unwrap();
    }
    // Nothing but the two last checkpoints and LATEST is left in checkpoints/.
    let mut names: Vec<String> = std::fs::read_dir(runp.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let mut want: Vec<String> = steps.iter().map(|s| format!("step_{s:08}")).collect();
    want.insert(0, "LATEST".into());
    want.sort();
    assert_eq!(names, want);
    // The lock is released with the process: training on is allowed again.
    ok(train_cmd(&runp, &cache, &["run.steps=1000000", "run.checkpoint_every=50", "run.log_every=10"], &["--max-steps", "5"]));
}

#[test]
fn two_fid_processes_on_a_cold_cache_share_one_computation_and_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let (runp, cache) = (dir.path().join("run"), dir.path().join("cache"));
    ok(train_cmd(&runp, &cache, &["run.steps=2", "run.checkpoint_every=0", "run.sample_every=0"], &[]));
    let fid = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flowmap"));
        c.env("FLOWMAP_DERIVED_CACHE", &cache).args(["fid", "--run", runp.to_str().unwrap(), "--steps", "1", "--num-samples", "4", "--ref-images", "12"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let (a, b) = (fid(), fid());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "first fid failed:\n{}", stderr(&a));
    assert!(b.status.success(), "second fid failed:\n{}", stderr(&b));
    // Same run, seeds and reference: the same number, computed from one stored reference.
    assert_eq!(String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout));
    let computed = [&a, &b].iter().filter(|o| stderr(o).contains("computing reference statistics")).count();
    assert_eq!(computed, 1, "both processes computed the reference:\n{}\n---\n{}", stderr(&a), stderr(&b));
    let stats: Vec<PathBuf> = std::fs::read_dir(cache.join("fid-stats")).unwrap().map(|e| e.unwrap().path()).collect();
    let npz: Vec<&PathBuf> = stats.iter().filter(|p| p.extension().is_some_and(|e| e == "npz")).collect();
    assert_eq!(npz.len(), 1, "{stats:?}");
    assert!(!stats.iter().any(|p| p.to_string_lossy().contains("partial")), "a temporary file was left: {stats:?}");
    flowmap_experiments::eval::fid::Reference::from_npz(npz[0]).unwrap();
    // fid.csv: one header, one row from each process.
    let csv = read(&runp.join("fid.csv"));
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert_eq!(csv.lines().filter(|l| l.starts_with("train_step")).count(), 1, "{csv}");

    // A corrupt cached file is recomputed, not a permanent failure.
    std::fs::write(npz[0], b"PK\x03\x04 not a zip").unwrap();
    let o = fid().wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("unusable") && stderr(&o).contains("recomputing"), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&a.stdout));
}

#[test]
fn skipped_non_finite_steps_still_checkpoint_and_a_skipped_last_step_saves_the_final_checkpoint() {
    let _guard = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let sets: Vec<String> = ["run.steps=4", "run.checkpoint_every=2", "run.keep_checkpoints=5", "run.log_every=1", "run.sample_every=2", "run.on_nonfinite=\"skip\""].map(String::from).to_vec();
    let (cfg, table) = load_config(&tiny(), &sets).unwrap();
    // Loop steps 1 and 3 produce steps 2 and 4: a checkpoint step and the last step.
    let opts = TrainOptions { run_dir: Some(dir.path().join("run")), inject_nan_at: vec![1, 3], ..Default::default() };
    let s = train(&cfg, &table, &opts).unwrap();
    assert_eq!((s.outcome, s.step, s.skipped_steps), (Outcome::Finished, 4, 2));
    let steps: Vec<u64> = CheckpointDir::new(dir.path().join("run/checkpoints"), 5).candidates().iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![2, 4]);
    for step in [2, 4] {
        assert!(dir.path().join(format!("run/samples/step_{step:07}_steps1.png")).exists(), "no grid at step {step}");
    }
    let state = CheckpointDir::new(dir.path().join("run/checkpoints"), 5).latest().unwrap().unwrap().state().unwrap();
    assert_eq!(state["skipped_steps"], 2);
}

#[test]
fn resume_refuses_a_changed_config_listing_the_keys_unless_allowed_and_records_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let (runp, cache) = (dir.path().join("run"), dir.path().join("cache"));
    ok(train_cmd(&runp, &cache, &["run.steps=2", "run.checkpoint_every=2", "run.sample_every=0"], &[]));
    let config = read(&runp.join("config.toml"));
    let changed = ["run.steps=4", "run.checkpoint_every=2", "run.sample_every=0", "optimizer.lr=0.002", "run.batch_size=8", "data.limit=128"];
    let o = run(train_cmd(&runp, &cache, &changed, &[]));
    assert!(!o.status.success(), "resumed with a changed learning rate");
    let err = stderr(&o);
    for key in ["optimizer.lr: 0.001 -> 0.002", "run.batch_size: 16 -> 8", "data.limit: 256 -> 128", "run.steps: 2 -> 4"] {
        assert!(err.contains(key), "{key} not listed:\n{err}");
    }
    assert!(err.contains("--allow-config-change"), "{err}");
    assert_eq!(read(&runp.join("config.toml")), config);
    assert_eq!(CheckpointDir::new(runp.join("checkpoints"), 2).latest().unwrap().unwrap().step, 2);

    // Keys that do not change training may differ freely.
    ok(train_cmd(&runp, &cache, &["run.steps=2", "run.checkpoint_every=1", "run.sample_every=0", "run.log_every=7", "run.threads=2"], &[]));
    assert!(!runp.join("config_changes.jsonl").exists());

    // With the flag: trained on, the old config kept, the change recorded.
    ok(train_cmd(&runp, &cache, &changed, &["--allow-config-change"]));
    assert_eq!(CheckpointDir::new(runp.join("checkpoints"), 2).latest().unwrap().unwrap().step, 4);
    assert_eq!(read(&runp.join("config.step_00000002.toml")), config);
    assert!(read(&runp.join("config.toml")).contains("lr = 0.002"));
    let log = read(&runp.join("config_changes.jsonl"));
    let rec: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(rec["step"], 2);
    let keys: Vec<&str> = rec["changes"].as_array().unwrap().iter().map(|c| c["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["data.limit", "optimizer.lr", "run.batch_size", "run.steps"]);
}

#[test]
fn mean_flow_reports_its_unweighted_loss_not_the_adaptively_weighted_one() {
    let _guard = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let sets: Vec<String> = ["run.steps=3", "run.log_every=1", "run.checkpoint_every=0", "run.sample_every=0", "objective.kind=mean_flow", "sampling.rule=jump"].map(String::from).to_vec();
    let (cfg, table) = load_config(&tiny(), &sets).unwrap();
    let s = train(&cfg, &table, &TrainOptions { run_dir: Some(dir.path().join("run")), ..Default::default() }).unwrap();
    let rows = flowmap_experiments::train::metrics::read(&dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let (shown, raw, optimized) = (r["loss"].as_f64().unwrap(), r["mf_loss_unweighted"].as_f64().unwrap(), r["loss_optimized"].as_f64().unwrap());
        assert_eq!(shown, raw);
        // The adaptive weight 1/(loss + c)^p with p = 1 makes the optimised value ~1 at every step.
        assert!((optimized - 1.0).abs() < 1e-2, "optimised {optimized}");
        assert!(shown > 0.05 && (shown - 1.0).abs() > 0.05, "reported {shown}");
    }
    assert_eq!(s.last_loss, rows.last().unwrap()["loss"].as_f64());
}

#[test]
fn sigterm_during_table_checkpoints_the_run_in_progress_and_the_next_call_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("table");
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "[table]\nname = \"t\"\nout_dir = \"{}\"\nsteps = [1]\nset = [\"run.steps=3000\", \"run.checkpoint_every=0\", \"run.log_every=10\", \"run.sample_every=0\"]\n\n[eval]\nnum_samples = 4\nbatch = 4\n[eval.reference]\nsplit = \"test\"\nnum_images = 6\n\n[[rows]]\nlabel = \"fm\"\nconfig = \"{}\"\n",
            out.display(),
            tiny().display()
        ),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let child = Command::new(env!("CARGO_BIN_EXE_flowmap")).env("FLOWMAP_DERIVED_CACHE", &cache).args(["table", spec.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let metrics = out.join("fm/metrics.jsonl");
    let t0 = Instant::now();
    while read_len(&metrics) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(300), "the table never started training");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "the table reported success after SIGTERM");
    assert!(stderr(&o).contains("stopped at step") && stderr(&o).contains("run the same `flowmap table` command again"), "{}", stderr(&o));
    let ck = CheckpointDir::new(out.join("fm/checkpoints"), 1).latest().unwrap().expect("no checkpoint written on SIGTERM");
    assert!(ck.step > 0 && ck.step < 3000, "checkpoint at step {}", ck.step);
    verify(&ck.dir).unwrap();
}

fn read_len(p: &Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0)
}
