//! `flowmap table SPEC --jobs N`: trains a table's rows N at a time, each as a child
//! `flowmap train ROW_CONFIG --set ... --run-dir DIR` (the same config, overrides and run directory
//! the table would use itself), before the table evaluates them one after another.
//!
//! On a CPU each child gets cores / N intra-op threads (`OMP_NUM_THREADS`, unless already set): a
//! small model gains little from a second thread, so concurrent single-threaded runs finish sooner
//! than the same runs one after another with two threads each (README, "The demo"). Each child
//! writes its log to `OUT_DIR/logs/ROW.log`. A SIGTERM or SIGINT is passed on to every child
//! (each writes a checkpoint); a failed row stops the others the same way, and the error names the
//! row, how it ended and the last lines of its log.
use crate::cli::launch::describe;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One row to train: what `flowmap table` would train in-process.
#[derive(Debug, Clone)]
pub struct RowJob {
    pub label: String,
    pub config: PathBuf,
    pub sets: Vec<String>,
    pub run_dir: PathBuf,
    pub log: PathBuf,
}

/// Intra-op threads per child: the cores shared out over the jobs that run at once (at least 1).
pub fn threads_per_job(jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / jobs.max(1)).max(1)
}

struct Running {
    index: usize,
    child: Child,
    started: Instant,
}

/// Trains `rows`, at most `jobs` at a time, and returns each row's wall time in seconds. Stops
/// early (every child checkpointed) when `stop` is set or a row fails.
pub fn train_rows(rows: &[RowJob], jobs: usize, stop: &AtomicBool) -> Result<Vec<f64>> {
    ensure!(jobs >= 1, "--jobs {jobs}: must be at least 1");
    let exe = std::env::current_exe().context("finding the flowmap binary")?;
    let threads = std::env::var("OMP_NUM_THREADS").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| threads_per_job(jobs.min(rows.len())).to_string());
    let mut seconds = vec![0.0; rows.len()];
    let mut next = 0;
    let mut running: Vec<Running> = Vec::new();
    let mut failure: Option<String> = None;
    let mut forwarded = false;
    loop {
        while failure.is_none() && !stop.load(Ordering::SeqCst) && running.len() < jobs && next < rows.len() {
            running.push(spawn(&exe, &rows[next], next, &threads)?);
            next += 1;
        }
        let mut still = Vec::with_capacity(running.len());
        for mut r in running {
            match r.child.try_wait().with_context(|| format!("waiting for row {:?}", rows[r.index].label))? {
                None => still.push(r),
                Some(status) => {
                    seconds[r.index] = r.started.elapsed().as_secs_f64();
                    if !status.success() && failure.is_none() && !stop.load(Ordering::SeqCst) {
                        failure = Some(failed_row(&rows[r.index], &status));
                    } else if status.success() {
                        tracing::info!("== {}: trained in {:.0} s (log {})", rows[r.index].label, seconds[r.index], rows[r.index].log.display());
                    }
                }
            }
        }
        running = still;
        if (failure.is_some() || stop.load(Ordering::SeqCst)) && !forwarded {
            for r in &running {
                // SAFETY: kill(2) on the pid of a child not yet reaped (so not reused).
                unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGTERM) };
            }
            forwarded = true;
        }
        if running.is_empty() && (next == rows.len() || forwarded) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(f) = failure {
        bail!("{f}; the other rows were stopped with a checkpoint: fix it and run the same `flowmap table` command again to continue");
    }
    ensure!(!stop.load(Ordering::SeqCst), "stopped: every row in training wrote a checkpoint; run the same `flowmap table` command again to continue");
    Ok(seconds)
}

fn spawn(exe: &Path, row: &RowJob, index: usize, threads: &str) -> Result<Running> {
    if let Some(dir) = row.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::File::create(&row.log).with_context(|| format!("creating {}", row.log.display()))?;
    let err = log.try_clone().with_context(|| format!("opening {}", row.log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("train").arg(&row.config);
    for s in &row.sets {
        cmd.arg("--set").arg(s);
    }
    cmd.arg("--run-dir").arg(&row.run_dir).arg("--resume").arg("auto");
    let child = cmd.env("OMP_NUM_THREADS", threads).stdin(Stdio::null()).stdout(log).stderr(err).spawn().with_context(|| format!("starting `{} train` for row {:?}", exe.display(), row.label))?;
    tracing::info!("== {}: training in a child process ({} thread(s), log {})", row.label, threads, row.log.display());
    Ok(Running { index, child, started: Instant::now() })
}

/// "row X: `flowmap train` exited with status 1; from LOG: Error: ..." (the child's error without
/// its backtrace, else the log's last lines).
fn failed_row(row: &RowJob, status: &ExitStatus) -> String {
    let text = std::fs::read_to_string(&row.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let shown: Vec<&str> = match lines.iter().rposition(|l| l.starts_with("Error:")) {
        Some(i) => lines[i..].iter().take_while(|l| !l.starts_with("Stack backtrace:")).take(8).copied().collect(),
        None => lines[lines.len().saturating_sub(5)..].to_vec(),
    };
    format!("row {:?}: `flowmap train` {}; from {}:\n  {}", row.label, describe(status), row.log.display(), shown.join("\n  "))
}
