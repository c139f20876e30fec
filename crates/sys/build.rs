//! Compiles csrc/glue.cpp against the libtorch that torch-sys found.
use std::path::PathBuf;

fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report libtorch. \
         Build with LIBTORCH_USE_PYTORCH=1 (run `make setup` once) or set LIBTORCH.",
    );
    let lib = PathBuf::from(lib);
    let include = lib.join("..").join("include");
    println!("cargo:rerun-if-changed=csrc/glue.cpp");
    // Exposed to our dependents' build scripts as DEP_FLOWMAP_SYS_LIBTORCH_LIB.
    println!("cargo:libtorch_lib={}", lib.display());
    cc::Build::new()
        .cpp(true)
        .file("csrc/glue.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("flowmap_glue");
    println!("cargo:rustc-link-lib=dl");
    flowmap_build::link_libtorch_at(&lib.display().to_string());
}
