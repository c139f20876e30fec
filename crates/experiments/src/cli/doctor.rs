//! `flowmap doctor`: what this machine and build can do, and which data are in place.
use crate::data::cache::{self, FileState};
use crate::run::device;
use anyhow::Result;
use std::fmt::Write;

/// The report as text (also used by the tests).
pub fn report() -> Result<String> {
    let mut s = String::new();
    writeln!(s, "flowmap {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(s, "libtorch      {} (tch 0.24.0 expects 2.11.0), loaded from {}", flowmap_sys::torch_version(), flowmap_sys::libtorch_path().unwrap_or_else(|e| e.0))?;
    let cuda = tch::Cuda::is_available();
    writeln!(s, "CUDA          {}", if cuda { format!("available, {} device(s), cuDNN {}", tch::Cuda::device_count(), tch::Cuda::cudnn_is_available()) } else { "not available (CPU only)".into() })?;
    if cuda {
        for i in 0..tch::Cuda::device_count() {
            writeln!(s, "  device {i}    {}", cuda_device_name(i))?;
        }
    }
    // The same facts `device = "auto"` goes by (crate::run::device), so its warning can be checked here.
    let facts = device::CudaFacts::probe();
    writeln!(s, "  libtorch    {}", facts.torch_text())?;
    writeln!(s, "  driver      {}", facts.driver_text())?;
    match device::fallback_reason(&facts) {
        None => writeln!(s, "  auto        cuda:0")?,
        Some(reason) => writeln!(s, "  auto        CPU, because {reason}")?,
    }
    writeln!(s, "threads       {} intra-op", tch::get_num_threads())?;
    writeln!(s, "cache         {}", cache::root().display())?;
    writeln!(s, "data          {}", cache::data_dir().display())?;
    writeln!(s, "files (sha256 against data/SHA256SUMS):")?;
    for (want, rel) in cache::expected_files() {
        let state = match cache::check_file(rel, want)? {
            FileState::Verified => "verified".to_string(),
            FileState::Missing => "MISSING (run `make setup`)".to_string(),
            FileState::Mismatch { got } => format!("MISMATCH (got {}…; delete and run `make setup`)", &got[..12]),
        };
        writeln!(s, "  {rel:<48} {state}")?;
    }
    Ok(s)
}

fn cuda_device_name(i: i64) -> String {
    flowmap_sys::cuda_device_name(i).unwrap_or_else(|e| format!("? ({e})"))
}
