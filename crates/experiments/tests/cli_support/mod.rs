//! Running the `flowmap` binary from the integration tests.
#![allow(dead_code)] // each test binary uses a subset
use std::process::{Command, Output};

/// Runs `flowmap ARGS` and returns the whole output, successful or not.
pub fn flowmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowmap")).args(args).output().expect("running the flowmap binary")
}

/// Runs `flowmap ARGS`, fails the test with its stderr unless it succeeded, returns stdout.
pub fn flowmap_ok(args: &[&str]) -> String {
    let out = flowmap(args);
    assert!(out.status.success(), "flowmap {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
