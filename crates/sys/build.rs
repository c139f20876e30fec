//! Compiles csrc/glue.cpp and csrc/dist.cpp against the libtorch that torch-sys found.
//!
//! dist.cpp (c10d process groups) needs two sets of headers the torch wheel lacks:
//! * gloo's, for ProcessGroupGloo (always): `make setup` unpacks Debian's libgloo-dev into
//!   `$FLOWMAP_CACHE/gloo/usr/include`; without them the build fails and says so;
//! * NCCL's and the CUDA ones it pulls in, for ProcessGroupNCCL (optional): the wheel's
//!   `nvidia/nccl/include` and `nvidia/cu13/include`, plus the crt and CCCL headers `make setup`
//!   installs into the venv. Without them dist.cpp is built without NCCL, and `Backend::Nccl` returns
//!   an error that quotes `FLOWMAP_SYS_NCCL` (set below).
use std::path::{Path, PathBuf};

fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report libtorch. \
         Build with LIBTORCH_USE_PYTORCH=1 (run `make setup` once) or set LIBTORCH.",
    );
    let lib = PathBuf::from(lib);
    let include = lib.join("..").join("include");
    println!("cargo:rerun-if-changed=csrc/glue.cpp");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    // Exposed to our dependents' build scripts as DEP_FLOWMAP_SYS_LIBTORCH_LIB.
    println!("cargo:libtorch_lib={}", lib.display());

    let gloo = gloo_include();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/glue.cpp")
        .file("csrc/dist.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-DUSE_C10D_GLOO")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-interference-size")
        .warnings(false);
    match nccl_includes(&lib) {
        Ok(dirs) => {
            build.flag("-DUSE_C10D_NCCL");
            for d in &dirs {
                build.include(d);
            }
            // ProcessGroupNCCL's code lives in libtorch_cuda.so, the CUDA guards it inlines in c10_cuda.
            println!("cargo:rustc-link-lib=dylib=torch_cuda");
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
            println!("cargo:rustc-env=FLOWMAP_SYS_NCCL=compiled with NCCL headers from {}", dirs[0].display());
        }
        Err(why) => {
            println!("cargo:warning=flowmap-sys: building without ProcessGroupNCCL: {why}");
            println!("cargo:rustc-env=FLOWMAP_SYS_NCCL={why}");
        }
    }
    build.compile("flowmap_glue");
    println!("cargo:rustc-link-lib=dl");
    flowmap_build::link_libtorch_at(&lib.display().to_string());
}

/// `$FLOWMAP_CACHE/gloo/usr/include` (the cache defaults as in scripts/setup.sh); panics with the fix
/// when the headers are missing.
fn gloo_include() -> PathBuf {
    println!("cargo:rerun-if-env-changed=FLOWMAP_CACHE");
    println!("cargo:rerun-if-env-changed=XDG_CACHE_HOME");
    let cache = match std::env::var_os("FLOWMAP_CACHE") {
        Some(c) => PathBuf::from(c),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
            base.join("flowmap")
        }
    };
    let dir = cache.join("gloo").join("usr").join("include");
    let marker = dir.join("gloo").join("config.h");
    if !marker.exists() {
        panic!("flowmap-sys needs the gloo headers at {} (Debian libgloo-dev; the torch wheel ships none) for c10d's ProcessGroupGloo: run `make setup`", dir.display());
    }
    // The stamp data/fetch.sh writes after verifying the package: re-extraction reruns this script.
    rerun_if_changed(&cache.join("gloo").join(".flowmap-from"));
    dir
}

/// The include directories ProcessGroupNCCL.hpp needs, or why they are not all there.
fn nccl_includes(lib: &Path) -> Result<Vec<PathBuf>, String> {
    if !lib.join("libtorch_cuda.so").exists() {
        return Err(format!("this libtorch has no libtorch_cuda.so (CPU-only build) in {}", lib.display()));
    }
    // <site-packages>/torch/lib -> <site-packages>/nvidia
    let nvidia = lib.join("..").join("..").join("nvidia");
    let nvidia = nvidia.canonicalize().unwrap_or(nvidia);
    let cuda = nvidia.join("cu13").join("include");
    let needed = [
        (nvidia.join("nccl/include"), "nccl.h", "the wheel's nvidia-nccl-cu13"),
        (cuda.clone(), "cuda_runtime.h", "the wheel's nvidia-cuda-runtime (CUDA 13)"),
        (cuda.clone(), "crt/host_config.h", "nvidia-cuda-crt (`make setup` installs it)"),
        (cuda.join("cccl"), "nv/target", "nvidia-cuda-cccl (`make setup` installs it)"),
    ];
    let mut dirs = Vec::new();
    let mut missing = Vec::new();
    for (dir, file, from) in needed {
        let path = dir.join(file);
        rerun_if_changed(&path);
        if path.exists() {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        } else {
            missing.push(format!("{} (from {from})", path.display()));
        }
    }
    if missing.is_empty() {
        Ok(dirs)
    } else {
        Err(format!("missing {}", missing.join(", ")))
    }
}

/// rerun-if-changed on `path`, or on its nearest existing ancestor while it does not exist (cargo
/// reruns a build script on every build for a path that does not exist).
fn rerun_if_changed(path: &Path) {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => return,
        }
    }
    println!("cargo:rerun-if-changed={}", p.display());
}
