//! Shared by the fid tests: the Python reference helper (tests/python/frechet_reference.py).
use std::path::{Path, PathBuf};
use std::process::Command;

/// The project venv's python (FLOWMAP_VENV, set by .cargo/config.toml), else `python3`.
pub fn python() -> PathBuf {
    std::env::var_os("FLOWMAP_VENV").map(PathBuf::from).or_else(|| option_env!("FLOWMAP_VENV").map(PathBuf::from)).map(|v| v.join("bin").join("python")).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs the reference helper and returns its stdout; None (after a SKIPPED message) when python
/// or one of its packages (numpy, scipy; torch for `features`) is missing.
pub fn reference_helper(args: &[&str]) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/frechet_reference.py");
    let out = match Command::new(python()).arg(&script).args(args).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: cannot run {} ({e}); set FLOWMAP_VENV or install python3 with numpy and scipy", python().display());
            return None;
        }
    };
    if out.status.code() == Some(3) {
        eprintln!("SKIPPED: {}: {}", python().display(), String::from_utf8_lossy(&out.stderr).trim());
        return None;
    }
    assert!(out.status.success(), "{script:?} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
}
