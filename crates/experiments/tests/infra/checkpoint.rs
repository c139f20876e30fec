use flowmap_experiments::run::checkpoint::{verify, CheckpointContents, CheckpointDir, Fault};
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

fn w_of(ck: &flowmap_experiments::run::checkpoint::Checkpoint) -> f64 {
    ck.tensors("model").unwrap()["w"].sum(Kind::Double).double_value(&[])
}

#[test]
fn resaving_a_step_keeps_a_complete_checkpoint_of_it_even_when_killed_between_the_renames() {
    let dir = tempfile::tempdir().unwrap();
    let mut ck = CheckpointDir::new(dir.path(), 2);
    ck.save(5, &contents(5)).unwrap();
    // Re-save step 5 and fail after the old directory was renamed aside, before the new one is
    // renamed in: what a kill -9 at that instant leaves.
    ck.fault = Some(Fault::BetweenRenames);
    let err = ck.save(5, &contents(7)).unwrap_err();
    assert!(format!("{err:#}").contains("injected fault"), "{err:#}");
    assert!(!dir.path().join("step_00000005").exists(), "the fault was not injected between the renames");
    let found = ck.latest().unwrap().expect("no checkpoint of step 5 left");
    assert_eq!(found.step, 5);
    verify(&found.dir).unwrap();
    assert_eq!(w_of(&found), 15.0 * 5.0, "not the old complete checkpoint");
    // The next save (the resumed run) cleans up and leaves exactly one directory per step.
    ck.fault = None;
    ck.save(5, &contents(7)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["LATEST", "step_00000005"]);
    assert_eq!(w_of(&ck.latest().unwrap().unwrap()), 15.0 * 7.0);
}

#[test]
fn a_complete_temporary_checkpoint_is_a_resume_point_and_is_pruned_only_once_superseded() {
    let dir = tempfile::tempdir().unwrap();
    let ck = CheckpointDir::new(dir.path(), 1);
    ck.save(10, &contents(10)).unwrap();
    // Killed after the MANIFEST of step 20 was written, before its rename.
    let c20 = ck.save(20, &contents(20)).unwrap();
    std::fs::rename(&c20.dir, dir.path().join("step_00000020.tmp-abc123")).unwrap();
    let found = ck.latest().unwrap().unwrap();
    assert_eq!(found.step, 20);
    assert_eq!(w_of(&found), 15.0 * 20.0);
    // Saving an older step (not possible in a run, but prune must not assume it) keeps it.
    ck.save(15, &contents(15)).unwrap();
    assert!(dir.path().join("step_00000020.tmp-abc123").exists(), "a newer complete checkpoint was pruned");
    ck.save(30, &contents(30)).unwrap();
    assert!(!dir.path().join("step_00000020.tmp-abc123").exists());
}

#[test]
fn latest_is_an_error_when_checkpoints_exist_but_none_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let ck = CheckpointDir::new(dir.path(), 2);
    let c = ck.save(10, &contents(10)).unwrap();
    std::fs::remove_file(c.dir.join("MANIFEST")).unwrap();
    let err = format!("{:#}", ck.latest().unwrap_err());
    assert!(err.contains("none is complete and intact") && err.contains("has no MANIFEST"), "{err}");
    assert!(ck.has_any());
    // An incomplete temporary directory alone is reported too, not taken for "no checkpoint".
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir2.path().join("step_00000003.tmp-xyz")).unwrap();
    assert!(CheckpointDir::new(dir2.path(), 1).latest().is_err());
}
