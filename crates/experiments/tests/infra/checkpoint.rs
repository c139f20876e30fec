use flowmap_experiments::checkpoint::{verify, CheckpointContents, CheckpointDir};
use tch::{Kind, Tensor};

fn contents(step: u64) -> CheckpointContents<'static> {
    let w = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).reshape([2, 3]) * step as f64;
    CheckpointContents { tensors: vec![("model", vec![("w".to_string(), w)])], state: serde_json::json!({ "step": step }) }
}

#[test]
fn save_round_trips_and_latest_points_at_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let ck = CheckpointDir::new(dir.path().join("checkpoints"), 3);
    for s in [10, 20] {
        ck.save(s, &contents(s)).unwrap();
    }
    let latest = ck.latest().unwrap().unwrap();
    assert_eq!(latest.step, 20);
    let t = latest.tensors("model").unwrap();
    assert!(t["w"].equal(&(Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).reshape([2, 3]) * 20.0)));
    assert_eq!(latest.state().unwrap()["step"], 20);
}

#[test]
fn retention_keeps_exactly_the_last_k() {
    let dir = tempfile::tempdir().unwrap();
    let ck = CheckpointDir::new(dir.path(), 2);
    for s in 1..=4 {
        ck.save(s, &contents(s)).unwrap();
    }
    let steps: Vec<u64> = ck.candidates().iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![3, 4]);
}

#[test]
fn a_checkpoint_interrupted_mid_write_is_never_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let ck = CheckpointDir::new(dir.path(), 5);
    ck.save(10, &contents(10)).unwrap();
    // Crash while writing step 20: the temp directory has a partial file and no MANIFEST.
    let tmp = dir.path().join("step_00000020.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    // A final-named directory without MANIFEST (e.g. copied by hand) is also ignored.
    let nomanifest = dir.path().join("step_00000030");
    std::fs::create_dir_all(&nomanifest).unwrap();
    std::fs::write(nomanifest.join("model.safetensors"), b"partial").unwrap();
    assert_eq!(ck.latest().unwrap().unwrap().step, 10);
}

#[test]
fn a_corrupt_latest_falls_back_to_the_previous_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = CheckpointDir::new(dir.path(), 5);
    ck.save(10, &contents(10)).unwrap();
    let c20 = ck.save(20, &contents(20)).unwrap();
    // Truncate a file after the fact (disk trouble): its MANIFEST checksum no longer matches.
    let f = c20.dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert!(verify(&c20.dir).is_err());
    assert_eq!(ck.latest().unwrap().unwrap().step, 10);
    assert_eq!(std::fs::read_to_string(dir.path().join("LATEST")).unwrap().trim(), "step_00000020");
}

#[test]
fn no_checkpoint_gives_none() {
    let dir = tempfile::tempdir().unwrap();
    assert!(CheckpointDir::new(dir.path().join("absent"), 1).latest().unwrap().is_none());
}
