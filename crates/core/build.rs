fn main() {
    flowmap_build::link_libtorch();
}
