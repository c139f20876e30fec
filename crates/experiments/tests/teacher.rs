//! The teacher of the distillation objectives, through the trainer on the tiny CPU config:
//! progressive distillation's refresh at a stage boundary copies the student's EMA
//! (`refresh_from = "ema"`, the Shortcut code) or its online weights (`"online"`), and a
//! consistency-distillation run with `init_student = true` starts from the teacher's weights; sCD
//! (`scm_distillation`) trains from a flow-matching teacher run.
use flowmap_experiments::config::load_config;
use flowmap_experiments::run::checkpoint::CheckpointDir;
use flowmap_experiments::train::trainer::Trainer;
use flowmap_experiments::train::{train, Resume, TrainOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

// tch's global generator is shared by the test threads of this binary: one trainer at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

fn sets(extra: &[String]) -> Vec<String> {
    let mut s = vec!["run.log_every=1".to_string(), "run.checkpoint_every=0".into(), "run.keep_checkpoints=5".into()];
    s.extend(extra.iter().cloned());
    s
}

/// A flow-matching teacher run of `steps` steps in `dir`.
fn teacher_run(dir: &Path, steps: u64) -> PathBuf {
    let run = dir.join("teacher");
    let (cfg, table) = load_config(&tiny(), &sets(&[format!("run.steps={steps}")])).unwrap();
    train(&cfg, &table, &TrainOptions { run_dir: Some(run.clone()), resume: Resume::Never, ..Default::default() }).unwrap();
    run
}

fn open(dir: &Path, extra: &[String]) -> Trainer {
    let (cfg, table) = load_config(&tiny(), &sets(extra)).unwrap();
    Trainer::open(&cfg, &table, &TrainOptions { run_dir: Some(dir.to_path_buf()), resume: Resume::Never, ..Default::default() }).unwrap()
}

/// Saves a checkpoint of the trainer's current step and reads back its `part`s.
fn saved(trainer: &mut Trainer, parts: &[&str]) -> Vec<BTreeMap<String, Tensor>> {
    trainer.save().unwrap();
    let ck = CheckpointDir::new(trainer.run_dir().join("checkpoints"), 5).latest().unwrap().unwrap();
    assert_eq!(ck.step, trainer.step());
    parts.iter().map(|p| ck.tensors(p).unwrap()).collect()
}

fn latest(run: &Path, part: &str) -> BTreeMap<String, Tensor> {
    CheckpointDir::new(run.join("checkpoints"), 5).latest().unwrap().unwrap().tensors(part).unwrap()
}

fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "different tensors");
    a.iter().map(|(k, t)| (t - &b[k]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

#[test]
fn progressive_teacher_after_a_stage_boundary_is_the_students_ema_or_online_weights() {
    let _serial = serial();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let teacher = teacher_run(dir.path(), 3);
    const K: u64 = 2; // steps per stage: the refresh comes before step K
    for source in ["ema", "online"] {
        let run = dir.path().join(format!("pd-{source}"));
        let mut t = open(
            &run,
            &[
                "objective.kind=progressive_distillation".into(),
                "objective.stages=3".into(),
                format!("objective.steps_per_stage={K}"),
                format!("objective.refresh_from={source}"),
                format!("teacher.run=\"{}\"", teacher.display()),
                "teacher.init_student=true".into(),
                "run.steps=6".into(),
            ],
        );
        for _ in 0..K {
            t.train_step().unwrap();
        }
        // Stage 0: the teacher is the teacher run's EMA weights (`[teacher].weights` default).
        let before = saved(&mut t, &["model", "ema", "teacher"]);
        let (model, ema) = (&before[0], &before[1]);
        assert_eq!(max_diff(&before[2], &latest(&teacher, "ema")), 0.0, "{source}: stage-0 teacher");
        assert!(max_diff(model, ema) > 1e-6, "the EMA must differ from the online weights for this test to tell them apart");
        assert!(max_diff(&before[2], ema) > 1e-6 && max_diff(&before[2], model) > 1e-6, "the student has moved away from the teacher");

        t.train_step().unwrap(); // step K: refresh, then the update
        let after = saved(&mut t, &["teacher", "model", "ema"]);
        let copied = if source == "ema" { ema } else { model };
        let other = if source == "ema" { model } else { ema };
        assert_eq!(max_diff(&after[0], copied), 0.0, "{source}: the refreshed teacher is the student's {source} weights at the boundary");
        assert!(max_diff(&after[0], other) > 1e-6, "{source}: the teacher must not be the other weights");
        assert!(max_diff(&after[1], model) > 1e-6 && max_diff(&after[2], ema) > 1e-6, "the student kept training");

        // The teacher stays frozen within the stage.
        t.train_step().unwrap();
        let next = saved(&mut t, &["teacher"]);
        assert_eq!(max_diff(&next[0], &after[0]), 0.0, "{source}: the teacher changed within a stage");
    }
}

#[test]
fn consistency_distillation_with_init_student_starts_from_the_teacher() {
    let _serial = serial();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let teacher = teacher_run(dir.path(), 3);
    let teacher_ema = latest(&teacher, "ema");
    for init in [true, false] {
        let mut t = open(
            &dir.path().join(format!("cd-{init}")),
            &["objective.kind=consistency_distillation".into(), "sampling.rule=renoise".into(), format!("teacher.run=\"{}\"", teacher.display()), format!("teacher.init_student={init}"), "run.steps=2".into(), "run.seed=1".into()],
        );
        let start = saved(&mut t, &["model", "ema", "teacher"]);
        assert_eq!(t.step(), 0);
        assert_eq!(max_diff(&start[2], &teacher_ema), 0.0, "the CD teacher is the teacher run's EMA weights");
        if init {
            assert_eq!(max_diff(&start[0], &teacher_ema), 0.0, "init_student: the student starts as the teacher");
            assert_eq!(max_diff(&start[1], &teacher_ema), 0.0, "init_student: the student's EMA starts as the teacher");
        } else {
            // run.seed = 1: the student's own initialisation is not the teacher run's (seed 0), which
            // after 3 steps at EMA decay 0.99 is still within 1e-4 of its initialisation.
            assert!(max_diff(&start[0], &teacher_ema) > 1e-3, "without init_student the student starts from its own initialisation");
        }
        t.train_step().unwrap();
    }
}

#[test]
fn scm_distillation_trains_from_a_flow_matching_teacher_run() {
    let _serial = serial();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let teacher = teacher_run(dir.path(), 3);
    let base = ["objective.kind=\"scm_distillation\"".to_string(), "objective.tangent_warmup_steps=0".into(), "sampling.rule=\"trig_flow\"".into(), "run.steps=3".into()];
    // Without a [teacher] table the config is refused, naming what is missing.
    let err = load_config(&tiny(), &sets(&base)).unwrap_err();
    assert!(format!("{err:#}").contains("needs a [teacher] table"), "{err:#}");
    let mut with_teacher = base.to_vec();
    with_teacher.push(format!("teacher.run=\"{}\"", teacher.display()));
    let mut t = open(&dir.path().join("scd"), &with_teacher);
    let start = saved(&mut t, &["teacher", "model"]);
    assert_eq!(max_diff(&start[0], &latest(&teacher, "ema")), 0.0, "the sCD teacher is the teacher run's EMA weights");
    let mut losses = vec![];
    for _ in 0..3 {
        let report = t.train_step().unwrap();
        assert!(report.applied);
        let raw = report.loss.metrics.iter().find(|(k, _)| *k == "scm_loss_unweighted").unwrap().1.double_value(&[]);
        losses.push(raw);
    }
    println!("sCD from a 3-step flow-matching teacher: unweighted loss per step {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0));
    let end = saved(&mut t, &["teacher", "model"]);
    assert_eq!(max_diff(&end[0], &start[0]), 0.0, "the teacher stays frozen");
    assert!(max_diff(&end[1], &start[1]) > 1e-6, "the student trained");
}
