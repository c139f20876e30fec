fn main() {
    flowmap_build::link_libtorch();
    // tests/notebooks.rs compiles the code cells of notebooks-rs/*.ipynb.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("notebooks.rs");
    flowmap_build::compile_notebooks(std::path::Path::new("notebooks-rs"), &out);
}
