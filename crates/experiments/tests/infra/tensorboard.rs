use flowmap_experiments::eval::image_grid::grid_png;
use flowmap_experiments::train::tensorboard::{read_records, EventWriter};
use tch::{Kind, Tensor};

#[test]
fn event_file_records_have_valid_crcs_and_carry_tag_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path()).unwrap();
    w.scalar("loss/train", 0.25, 7).unwrap();
    let x = Tensor::linspace(-1.0, 1.0, 4 * 8 * 8, (Kind::Float, tch::Device::Cpu)).reshape([4, 1, 8, 8]);
    let (png, h, wd, c) = grid_png(&x).unwrap();
    assert_eq!((h, wd, c), (2 + 2 * 34, 2 + 2 * 34, 1)); // 8-pixel images drawn 4x (32 pixels)
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    w.image("samples/nfe1", &png, h, wd, c, 7).unwrap();
    drop(w);
    let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
    assert!(file.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
    let recs = read_records(&file).unwrap();
    assert_eq!(recs.len(), 3);
    assert!(recs[0].windows(13).any(|s| s == b"brain.Event:2"));
    assert!(recs[1].windows(10).any(|s| s == b"loss/train"));
    assert!(recs[1].windows(4).any(|s| s == 0.25f32.to_le_bytes()));
    assert!(recs[2].windows(png.len()).any(|s| s == png.as_slice()));
}

#[test]
fn grid_quantisation_follows_dit() {
    let x = Tensor::from_slice(&[-1.0f32, 0.0, 1.0, 2.0]).reshape([1, 1, 2, 2]);
    let q = Vec::<u8>::try_from(flowmap_experiments::eval::image_grid::to_uint8(&x).flatten(0, -1)).unwrap();
    assert_eq!(q, vec![0, 128, 255, 255]);
}
