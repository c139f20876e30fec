//! Running the `flowmap` binary from the integration tests.
//!
//! Every call points `FLOWMAP_DERIVED_CACHE` (FID reference statistics) at a folder of this test
//! alone, empty when the test starts, so no test depends on what another test or an earlier run
//! left in a shared cache: each sees what a fresh machine sees.
#![allow(dead_code)] // each test binary uses a subset
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// This test's derived-cache folder: `<target tmp>/derived-cache/<process start>/<test name>`
/// (libtest names each test's thread after the test). A test run on the main thread gets a new
/// folder per call.
pub fn derived_cache() -> PathBuf {
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("derived-cache").join(run);
    match std::thread::current().name() {
        Some(name) if name != "main" => base.join(name.replace("::", "-")),
        _ => tempfile::tempdir_in({
            std::fs::create_dir_all(&base).unwrap();
            &base
        })
        .unwrap()
        .keep(),
    }
}

/// Runs `flowmap ARGS` and returns the whole output, successful or not.
pub fn flowmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowmap")).env("FLOWMAP_DERIVED_CACHE", derived_cache()).args(args).output().expect("running the flowmap binary")
}

/// Runs `flowmap ARGS`, fails the test with its stderr unless it succeeded, returns stdout.
pub fn flowmap_ok(args: &[&str]) -> String {
    let out = flowmap(args);
    assert!(out.status.success(), "flowmap {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
