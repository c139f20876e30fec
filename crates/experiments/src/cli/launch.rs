//! `flowmap launch --nproc N -- train CONFIG`: N local ranks of a data-parallel job for users
//! without torchrun. Each rank is this binary with the arguments after `--` and the variables
//! torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
//!
//! A SIGTERM or SIGINT to the launcher is passed on to every rank (they agree on a step, write a
//! checkpoint and exit). When a rank fails, the others notice at their next collective and exit
//! with an error naming it; a rank still running [`GRACE`] later is sent SIGTERM, then SIGKILL.
use anyhow::{bail, ensure, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the other ranks get to notice a failed rank and exit by themselves.
pub const GRACE: Duration = Duration::from_secs(30);

/// What `flowmap launch` starts.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub nproc: usize,
    /// Port of rank 0's store (default: a free port).
    pub master_port: Option<u16>,
    /// The `flowmap` arguments every rank runs, e.g. `train CONFIG`.
    pub args: Vec<String>,
}

/// Runs the ranks to the end; an error names every rank that failed and how.
pub fn launch(req: &LaunchRequest, stop: Arc<AtomicBool>) -> Result<()> {
    ensure!(req.nproc >= 1, "--nproc {}: must be at least 1", req.nproc);
    ensure!(!req.args.is_empty(), "nothing to launch: give the command after --, e.g. flowmap launch --nproc 2 -- train CONFIG");
    ensure!(req.args[0] != "launch", "flowmap launch cannot launch itself");
    let port = match req.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let exe = std::env::current_exe().context("finding the flowmap binary")?;
    let mut ranks: Vec<(Child, Option<ExitStatus>)> = Vec::with_capacity(req.nproc);
    for rank in 0..req.nproc {
        let child = Command::new(&exe)
            .args(&req.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", req.nproc.to_string())
            .env("LOCAL_WORLD_SIZE", req.nproc.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()));
        match child {
            Ok(c) => ranks.push((c, None)),
            Err(e) => {
                for (c, _) in &mut ranks {
                    let _ = c.kill();
                }
                return Err(e);
            }
        }
    }
    tracing::info!("launched {} rank(s) of `flowmap {}` (store 127.0.0.1:{port})", req.nproc, req.args.join(" "));

    let mut forwarded = false;
    let mut first_failure: Option<Instant> = None;
    let mut terminated = false;
    loop {
        for (rank, (child, status)) in ranks.iter_mut().enumerate() {
            if status.is_none() {
                if let Some(s) = child.try_wait().with_context(|| format!("waiting for rank {rank}"))? {
                    if !s.success() && first_failure.is_none() {
                        tracing::error!("rank {rank} (pid {}) {}; the other ranks stop at their next collective", child.id(), describe(&s));
                        first_failure = Some(Instant::now());
                    }
                    *status = Some(s);
                }
            }
        }
        if ranks.iter().all(|(_, s)| s.is_some()) {
            break;
        }
        if stop.load(Ordering::SeqCst) && !forwarded {
            tracing::info!("passing the stop request on to every rank");
            signal_all(&ranks, libc::SIGTERM);
            forwarded = true;
        }
        if let Some(t) = first_failure {
            if t.elapsed() > GRACE && !terminated {
                tracing::warn!("ranks still running {} s after a failure: sending SIGTERM", GRACE.as_secs());
                signal_all(&ranks, libc::SIGTERM);
                terminated = true;
            } else if t.elapsed() > GRACE + Duration::from_secs(10) {
                signal_all(&ranks, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed: Vec<String> = ranks.iter().enumerate().filter_map(|(r, (_, s))| s.filter(|s| !s.success()).map(|s| format!("rank {r} {}", describe(&s)))).collect();
    if !failed.is_empty() {
        bail!("{} of {} rank(s) failed: {}", failed.len(), req.nproc, failed.join("; "));
    }
    Ok(())
}

fn signal_all(ranks: &[(Child, Option<ExitStatus>)], signal: i32) {
    for (child, status) in ranks {
        if status.is_none() {
            // SAFETY: kill(2) on the pid of a child we have not yet reaped (so not reused).
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }
}

/// "exited with status N" or "was killed by signal N".
pub fn describe(s: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// A TCP port that was free a moment ago (bound to port 0 and released).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the store")?;
    Ok(listener.local_addr()?.port())
}
