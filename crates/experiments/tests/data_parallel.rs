//! Data-parallel training and evaluation over c10d (Gloo on the CPU, two processes): two ranks
//! equal one process accumulating two micro-batches, for flow matching and for MeanFlow (JVP); a
//! SIGTERM to one rank stops both at one step and the resume is exact; a rank that dies makes the
//! other exit naming it; two-rank FID equals one-rank FID. On the tiny CPU config.
use flowmap_experiments::run::checkpoint::{Checkpoint, CheckpointDir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

fn config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

/// `train CONFIG --run-dir DIR` with `--set` overrides.
fn train_args(run: &Path, sets: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["train".to_string(), config().display().to_string(), "--run-dir".into(), run.display().to_string()];
    for s in ["run.log_every=1", "run.checkpoint_every=0", "run.keep_checkpoints=1", "run.sample_every=100000"].iter().chain(sets) {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn flowmap(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowmap"));
    c.args(args).env("FLOWMAP_DIST_TIMEOUT_S", "60").stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Waits for `child` at most `limit`; kills it and fails the test on a hang.
fn wait(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{what} still running after {} s (killed):\n{}", limit.as_secs(), String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn ok(c: &mut Command, what: &str) -> Output {
    let out = wait(c.spawn().unwrap(), Duration::from_secs(300), what);
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// One rank of a 2-process job started by hand (as torchrun would), so a test can signal it.
fn rank(rank: usize, port: u16, args: &[String]) -> Child {
    let mut c = flowmap(args);
    c.env("RANK", rank.to_string()).env("LOCAL_RANK", rank.to_string()).env("WORLD_SIZE", "2").env("LOCAL_WORLD_SIZE", "2").env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
    c.spawn().unwrap()
}

fn latest(run: &Path) -> Checkpoint {
    CheckpointDir::new(run.join("checkpoints"), 1).latest().unwrap().expect("a checkpoint")
}

fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter().map(|(k, t)| (t - &b[k]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn losses(run: &Path) -> Vec<f64> {
    flowmap_experiments::train::metrics::read(&run.join("metrics.jsonl")).unwrap().iter().map(|r| r["loss"].as_f64().unwrap()).collect()
}

fn logged_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl")).ok().and_then(|t| t.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter_map(|r| r["step"].as_u64()).max()).unwrap_or(0)
}

/// 2 ranks (flowmap launch) against 1 process with run.micro_batches = 2, and against a plain
/// 1-process run (the negative control: other draws, other weights).
fn two_ranks_against_accumulation(objective: &[&str]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (one, two, plain) = (dir.path().join("one"), dir.path().join("two"), dir.path().join("plain"));
    let sets: Vec<&str> = ["run.steps=4", "run.batch_size=16", "objective.label_dropout=0.25"].into_iter().chain(objective.iter().copied()).collect();
    let with_micro: Vec<&str> = sets.iter().copied().chain(["run.micro_batches=2"]).collect();
    ok(&mut flowmap(&train_args(&one, &with_micro, &[])), "1 rank × 2 micro-batches");
    let mut launch = vec!["launch".to_string(), "--nproc".into(), "2".into(), "--".into()];
    launch.extend(train_args(&two, &sets, &[]));
    let out = ok(&mut flowmap(&launch), "flowmap launch --nproc 2");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("rank 1 of 2"), "the ranks did not form a group of 2:\n{log}");
    ok(&mut flowmap(&train_args(&plain, &sets, &[])), "1 rank × 1 micro-batch");

    let (a, b, c) = (latest(&one), latest(&two), latest(&plain));
    assert_eq!((a.step, b.step), (4, 4));
    let mut worst: f64 = 0.0;
    for part in ["model", "ema", "optim"] {
        let d = max_diff(&a.tensors(part).unwrap(), &b.tensors(part).unwrap());
        eprintln!("{objective:?} {part}: max |2 ranks − 1 rank × 2 micro-batches| = {d:.3e}");
        worst = worst.max(d);
    }
    let (la, lb) = (losses(&one), losses(&two));
    assert_eq!(la.len(), 4);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "logged losses differ: {la:?} vs {lb:?}");
    }
    let control = max_diff(&a.tensors("model").unwrap(), &c.tensors("model").unwrap());
    eprintln!("{objective:?} control: max |1 × 2 micro-batches − 1 × 1| = {control:.3e}");
    assert!(control > 1e-4, "splitting the batch should change the random draws, max diff {control}");
    assert!(worst < 1e-5, "2 ranks differ from 1 rank with 2 micro-batches by {worst:.3e}");
    worst
}

#[test]
fn two_ranks_equal_one_process_accumulating_two_micro_batches_flow_matching() {
    two_ranks_against_accumulation(&[]);
}

#[test]
fn two_ranks_equal_one_process_accumulating_two_micro_batches_mean_flow_jvp() {
    two_ranks_against_accumulation(&["objective.kind=\"mean_flow\"", "sampling.rule=\"jump\""]);
}

#[test]
fn sigterm_to_one_rank_stops_both_at_one_step_and_the_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, resumed) = (dir.path().join("straight"), dir.path().join("resumed"));
    let n = 60;
    let sets = [format!("run.steps={n}"), "run.batch_size=32".into()];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let port = flowmap_experiments::cli::launch::free_port().unwrap();
    let args = train_args(&resumed, &sets, &[]);
    let (r0, r1) = (rank(0, port, &args), rank(1, port, &args));
    let start = Instant::now();
    while logged_step(&resumed) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "the 2-rank run made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(r1.id() as i32, libc::SIGTERM) };
    let (o0, o1) = (wait(r0, Duration::from_secs(120), "rank 0"), wait(r1, Duration::from_secs(120), "rank 1"));
    for (r, o) in [(0, &o0), (1, &o1)] {
        assert!(o.status.success(), "rank {r} failed after the SIGTERM:\n{}", String::from_utf8_lossy(&o.stderr));
    }
    let stopped = latest(&resumed).step;
    assert!(stopped < n, "the run ended (step {stopped}) before the SIGTERM took effect: make it longer");
    for o in [&o0, &o1] {
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("at step {stopped} (Interrupted)")), "both ranks stop at step {stopped}:\n{}", String::from_utf8_lossy(&o.stdout));
    }
    // Continue both ranks, and compare with a 2-rank run that was never stopped.
    let port = flowmap_experiments::cli::launch::free_port().unwrap();
    let (r0, r1) = (rank(0, port, &args), rank(1, port, &args));
    for (r, c) in [(0, r0), (1, r1)] {
        let o = wait(c, Duration::from_secs(120), "resumed rank");
        assert!(o.status.success(), "resumed rank {r} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut launch = vec!["launch".to_string(), "--nproc".into(), "2".into(), "--".into()];
    launch.extend(train_args(&straight, &sets, &[]));
    ok(&mut flowmap(&launch), "straight 2-rank run");
    let (a, b) = (latest(&straight), latest(&resumed));
    assert_eq!((a.step, b.step), (n, n));
    for part in ["model", "ema", "optim"] {
        let d = max_diff(&a.tensors(part).unwrap(), &b.tensors(part).unwrap());
        assert_eq!(d, 0.0, "{part}: the resumed 2-rank run differs from the straight one by {d:.3e} (stopped at {stopped})");
    }
    assert_eq!(losses(&straight), losses(&resumed));
}

#[test]
fn a_rank_that_dies_makes_the_other_exit_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let port = flowmap_experiments::cli::launch::free_port().unwrap();
    let args = train_args(&run, &["run.steps=100000"], &[]);
    let (r0, mut r1) = (rank(0, port, &args), rank(1, port, &args));
    let start = Instant::now();
    while logged_step(&run) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "the 2-rank run made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    r1.kill().unwrap();
    let _ = r1.wait();
    let killed = Instant::now();
    let o0 = wait(r0, Duration::from_secs(90), "rank 0 after rank 1 was killed");
    let err = String::from_utf8_lossy(&o0.stderr);
    eprintln!("rank 0 exited {:.1} s after rank 1 was killed", killed.elapsed().as_secs_f64());
    assert!(!o0.status.success(), "rank 0 should fail when rank 1 dies");
    assert!(err.contains("rank 1"), "the error does not name rank 1:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn two_rank_fid_equals_one_rank_fid() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // eval.batch = 4: chunks of 4, 4 and 2 samples, so rank 0 generates two and rank 1 one.
    ok(&mut flowmap(&train_args(&run, &["run.steps=10", "eval.num_samples=10", "eval.batch=4"], &[])), "training");
    let fid = |launcher: &[&str]| -> String {
        let mut args: Vec<String> = launcher.iter().map(|s| s.to_string()).collect();
        args.extend(["fid", "--run", run.to_str().unwrap(), "--steps", "1,2", "--num-samples", "10", "--ref-images", "12", "--seeds", "2"].map(String::from));
        let mut c = flowmap(&args);
        c.env("FLOWMAP_DERIVED_CACHE", dir.path().join("cache"));
        String::from_utf8_lossy(&ok(&mut c, &format!("{args:?}")).stdout).into_owned()
    };
    let one = fid(&[]);
    let two = fid(&["launch", "--nproc", "2", "--"]);
    eprintln!("1 rank:\n{one}2 ranks:\n{two}");
    assert!(one.contains("steps,eval_seed,fid,kid"), "{one}");
    assert_eq!(one, two, "FID of the same samples differs between 1 and 2 ranks");
    // Rows of one evaluation: (steps 1, 2) × (eval_seed 0, 1); the two evaluations agree.
    let rows = flowmap_experiments::eval::fid::read_fid_csv(&run.join("fid.csv")).unwrap();
    assert_eq!(rows.len(), 8);
    assert_eq!(rows.iter().map(|r| (r.steps, r.eval_seed)).collect::<Vec<_>>()[..4], [(1, 0), (2, 0), (1, 1), (2, 1)]);
    for (a, b) in rows[..4].iter().zip(&rows[4..]) {
        assert_eq!((a.fid, a.kid, a.nfe), (b.fid, b.kid, b.nfe));
    }
    assert_ne!(rows[0].fid, rows[1].fid, "1 and 2 sampling steps should give different samples");
    assert_ne!(rows[0].fid, rows[2].fid, "evaluation seeds 0 and 1 should draw different noise");
}

/// The venv's torchrun (scripts/setup.sh: $FLOWMAP_VENV, else $FLOWMAP_CACHE/venv-torch-2.11.0).
fn torchrun() -> Option<PathBuf> {
    let venv = std::env::var_os("FLOWMAP_VENV").map(PathBuf::from).or_else(|| {
        let cache = std::env::var_os("FLOWMAP_CACHE").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/flowmap")))?;
        Some(cache.join("venv-torch-2.11.0"))
    })?;
    Some(venv.join("bin/torchrun")).filter(|p| p.exists())
}

#[test]
fn torchrun_runs_flowmap_train_as_it_runs_a_pytorch_job() {
    let Some(torchrun) = torchrun() else {
        println!("SKIPPED: no torchrun in the venv (FLOWMAP_VENV / FLOWMAP_CACHE); run `make setup`");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (by_torchrun, by_launch) = (dir.path().join("torchrun"), dir.path().join("launch"));
    let sets = ["run.steps=3"];
    let mut c = Command::new(torchrun);
    c.args(["--standalone", "--nproc-per-node=2", "--no-python", env!("CARGO_BIN_EXE_flowmap")]).args(train_args(&by_torchrun, &sets, &[])).stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = ok(&mut c, "torchrun --nproc-per-node=2 --no-python flowmap train");
    assert!(String::from_utf8_lossy(&out.stderr).contains("rank 1 of 2"), "{}", String::from_utf8_lossy(&out.stderr));
    let mut launch = vec!["launch".to_string(), "--nproc".into(), "2".into(), "--".into()];
    launch.extend(train_args(&by_launch, &sets, &[]));
    ok(&mut flowmap(&launch), "flowmap launch --nproc 2");
    let d = max_diff(&latest(&by_torchrun).tensors("model").unwrap(), &latest(&by_launch).tensors("model").unwrap());
    assert_eq!(d, 0.0, "torchrun and flowmap launch trained different weights (max diff {d:.3e})");
}
