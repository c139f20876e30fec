//! MNIST / Fashion-MNIST IDX readers on the real files from the data cache (`make setup`).
use flowmap_experiments::data::cache;
use flowmap_experiments::data::idx::{read_images, read_labels, read_pair, split_files, Split};
use std::io::Write;
use tch::Kind;

fn class_counts(labels: &tch::Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&labels.bincount(None::<tch::Tensor>, 10)).unwrap()
}

#[test]
fn mnist_train_is_60k_padded_images_in_range_with_known_label_counts() {
    cache::require("mnist/").unwrap();
    let (img, lab) = split_files(&cache::mnist_dir(), Split::Train, false);
    let d = read_pair(&img, &lab).unwrap();
    assert_eq!(d.images.size(), vec![60000, 1, 32, 32]);
    assert_eq!(d.images.kind(), Kind::Float);
    assert_eq!(d.images.min().double_value(&[]), -1.0);
    assert_eq!(d.images.max().double_value(&[]), 1.0);
    // The 2-pixel frame added around 28x28 is background (-1) everywhere.
    let frame = d.images.narrow(2, 0, 2).max().double_value(&[]).max(d.images.narrow(3, 30, 2).max().double_value(&[]));
    assert_eq!(frame, -1.0);
    // Published class counts of the MNIST training set.
    assert_eq!(class_counts(&d.labels), vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    assert_eq!(d.labels.int64_value(&[0]), 5);
}

#[test]
fn fashion_mnist_gzip_test_split_is_balanced() {
    cache::require("fashion-mnist/").unwrap();
    let (img, lab) = split_files(&cache::fashion_mnist_dir(), Split::Test, true);
    let d = read_pair(&img, &lab).unwrap();
    assert_eq!(d.images.size(), vec![10000, 1, 32, 32]);
    assert_eq!(class_counts(&d.labels), vec![1000; 10]);
}

#[test]
fn gzip_and_raw_give_identical_tensors() {
    cache::require("mnist/").unwrap();
    let (img, _) = split_files(&cache::mnist_dir(), Split::Test, false);
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("t10k-images-idx3-ubyte.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(&std::fs::read(&img).unwrap()).unwrap();
    enc.finish().unwrap();
    assert!(read_images(&img).unwrap().equal(&read_images(&gz).unwrap()));
}

#[test]
fn truncated_and_wrong_magic_files_are_errors_naming_the_file() {
    cache::require("mnist/").unwrap();
    let (img, lab) = split_files(&cache::mnist_dir(), Split::Test, false);
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&img).unwrap();

    let truncated = dir.path().join("truncated-images");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let e = format!("{:#}", read_images(&truncated).unwrap_err());
    assert!(e.contains("truncated-images") && e.contains("truncated"), "{e}");

    let header_only = dir.path().join("short");
    std::fs::write(&header_only, &bytes[..7]).unwrap();
    let e = format!("{:#}", read_images(&header_only).unwrap_err());
    assert!(e.contains("short") && e.contains("truncated"), "{e}");

    // A labels file passed as images (and the reverse) is a wrong-magic error.
    let e = format!("{:#}", read_images(&lab).unwrap_err());
    assert!(e.contains("t10k-labels-idx1-ubyte") && e.contains("magic"), "{e}");
    let e = format!("{:#}", read_labels(&img).unwrap_err());
    assert!(e.contains("t10k-images-idx3-ubyte") && e.contains("magic"), "{e}");

    let bad_gz = dir.path().join("broken.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&bytes).unwrap();
    let z = enc.finish().unwrap();
    std::fs::write(&bad_gz, &z[..z.len() / 2]).unwrap();
    let e = format!("{:#}", read_images(&bad_gz).unwrap_err());
    assert!(e.contains("broken.gz"), "{e}");

    let e = format!("{:#}", read_images(&dir.path().join("missing")).unwrap_err());
    assert!(e.contains("missing"), "{e}");
}
