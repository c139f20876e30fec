//! The `flowmap` binary runs without LD_LIBRARY_PATH (rpath) and links libtorch_cuda.
use std::process::Command;

#[test]
fn doctor_runs_without_ld_library_path_and_reports_verified_data() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowmap")).arg("doctor").env_remove("LD_LIBRARY_PATH").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "doctor failed: {}\n{}", text, String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("libtorch      2.11.0"), "{text}");
    assert!(text.contains("CUDA"), "{text}");
    for f in ["mnist/train-images-idx3-ubyte", "fashion-mnist/train-images-idx3-ubyte.gz", "inception/pt_inception-2015-12-05.pt"] {
        let line = text.lines().find(|l| l.contains(f)).unwrap_or_else(|| panic!("{f} not listed:\n{text}"));
        assert!(line.ends_with("verified"), "{line}");
    }
}

#[test]
fn binary_keeps_libtorch_cuda_and_an_rpath() {
    let exe = env!("CARGO_BIN_EXE_flowmap");
    let out = Command::new("readelf").args(["-d", exe]).output().expect("readelf (binutils) is needed for this test");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(dynamic.contains("[libtorch_cuda.so]"), "libtorch_cuda.so was dropped by the linker:\n{dynamic}");
    assert!(dynamic.contains("RUNPATH") || dynamic.contains("RPATH"), "no rpath:\n{dynamic}");
}
