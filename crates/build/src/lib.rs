//! Called from the build script of every flowmap package that produces binaries or tests.
//!
//! tch links libtorch but sets no rpath, and the linker drops `libtorch_cuda.so` as unneeded (then
//! CUDA is never found). This adds, for the calling package's binaries, tests and benches only:
//! an rpath to the libtorch that torch-sys found (RUNPATH, so `LD_LIBRARY_PATH` still overrides it)
//! and `--no-as-needed -ltorch_cuda`. It must not go into global rustflags: host artefacts (proc
//! macros) would then load libtorch into rustc, which crashes.

pub mod notebook;
pub use notebook::compile_notebooks;

/// Emits the link arguments. The calling package must depend on `flowmap-sys`, whose build script
/// publishes the libtorch directory as `DEP_FLOWMAP_SYS_LIBTORCH_LIB`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_FLOWMAP_SYS_LIBTORCH_LIB");
    let lib = std::env::var("DEP_FLOWMAP_SYS_LIBTORCH_LIB").expect("DEP_FLOWMAP_SYS_LIBTORCH_LIB is not set: this package must depend on flowmap-sys directly");
    link_libtorch_at(&lib);
}

/// The same, given the libtorch library directory (used by flowmap-sys itself).
pub fn link_libtorch_at(lib: &str) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let cuda = std::path::Path::new(&lib).join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
