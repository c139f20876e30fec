//! AMED and optimised grids through the run machinery on the tiny CPU config: `flowmap train`
//! with objective.kind = "amed" and a flow-matching teacher trains only the predictor (the run's
//! weights stay the teacher's), saves it with the run and samples with it at 2·steps counted
//! NFE; `optimize-grid` writes a grid file that `[sampling] optimized_grid` walks; bad settings
//! and files are errors naming the key or the file.
use flowmap_experiments::config::{load_config, overrides, ExperimentConfig};
use flowmap_experiments::eval::optimized_grid::{grid_file, optimize_run_grid, GridFile, GridSearchRequest};
use flowmap_experiments::eval::sample_export::{sample_run, SampleRequest};
use flowmap_experiments::eval::sampling::Weights;
use flowmap_experiments::run::checkpoint::CheckpointDir;
use flowmap_experiments::run::model::load_run_weights;
use flowmap_experiments::train::{train, Resume, TrainOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

// tch's global generator is shared by the test threads of this binary: one run at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

fn config(extra: &[String]) -> anyhow::Result<ExperimentConfig> {
    let mut s = vec!["run.log_every=1".to_string(), "run.checkpoint_every=0".into(), "sampling.steps=[1, 2]".into()];
    s.extend(extra.iter().cloned());
    load_config(&tiny(), &s).map(|(c, _)| c)
}

fn run(dir: &Path, extra: &[String]) -> PathBuf {
    let mut s = vec!["run.log_every=1".to_string(), "run.checkpoint_every=0".into(), "sampling.steps=[1, 2]".into()];
    s.extend(extra.iter().cloned());
    let (cfg, table) = load_config(&tiny(), &s).unwrap();
    train(&cfg, &table, &TrainOptions { run_dir: Some(dir.to_path_buf()), resume: Resume::Never, ..Default::default() }).unwrap();
    dir.to_path_buf()
}

fn latest(run: &Path, part: &str) -> BTreeMap<String, Tensor> {
    CheckpointDir::new(run.join("checkpoints"), 5).latest().unwrap().unwrap().tensors(part).unwrap()
}

fn read_run(run: &Path) -> ExperimentConfig {
    let table = flowmap_experiments::run::run_dir::read_config(run).unwrap();
    overrides::deserialize(&table, "config.toml").unwrap()
}

fn amed_sets(teacher: &Path) -> Vec<String> {
    vec!["objective={ kind = \"amed\", steps = [1, 2], teacher_substeps = 1 }".into(), format!("teacher={{ run = {:?}, init_student = true }}", teacher.display().to_string()), "run.steps=3".into(), "sampling.rule=amed".into()]
}

#[test]
fn an_amed_run_trains_only_its_predictor_and_samples_with_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let teacher = run(&dir.path().join("fm"), &["run.steps=6".into()]);
    let amed = run(&dir.path().join("amed"), &amed_sets(&teacher));
    // The run's weights are the teacher's EMA, unchanged by training (the model is frozen).
    let teacher_ema = latest(&teacher, "ema");
    for part in ["model", "ema"] {
        let w = latest(&amed, part);
        for (k, t) in &teacher_ema {
            assert_eq!((&w[k] - t).abs().max().double_value(&[]), 0.0, "{part}.{k} changed");
        }
    }
    let predictor = latest(&amed, "objective");
    assert!(predictor.keys().all(|k| k.starts_with("amed.")) && predictor.len() == 10, "{:?}", predictor.keys());
    // The heads start at zero: three optimizer steps moved them.
    assert!(predictor["amed.fc_r.weight"].abs().max().double_value(&[]) > 0.0);

    // Sampling: the amed rule loads the predictor and costs 2 NFE per step, counted.
    let cfg = read_run(&amed);
    let mut sampler = cfg.sampler().unwrap();
    assert_eq!(sampler.rule, flowmap_core::StepRule::Amed);
    assert!(sampler.check_steps(&[1]).unwrap_err().to_string().contains("predictor"));
    sampler.attach_run(&amed, Device::Cpu).unwrap();
    let net = load_run_weights(&amed, &cfg.model, Weights::Ema, Device::Cpu).unwrap();
    for steps in [1, 2, 3] {
        let noise = Tensor::randn([4, 1, 32, 32], (Kind::Float, Device::Cpu));
        let out = sampler.generate_counted(net.net.as_ref(), noise, &Tensor::zeros([4], (Kind::Int64, Device::Cpu)), steps);
        assert_eq!(out.nfe, 2.0 * steps as f64);
        assert!(out.x.isfinite().all().int64_value(&[]) == 1);
    }
    // `flowmap sample` on the run.
    let out = sample_run(&amed, &cfg, &SampleRequest { steps: vec![1, 2], num: 4, weights: Weights::Ema, cfg_scale: None, class: None, seed: 0, out: Some(dir.path().join("s")) }, Device::Cpu).unwrap();
    assert!(out.join("steps2.png").exists());
    // The velocity rules still read the run's (teacher's) network.
    assert!(config(&[amed_sets(&teacher), vec!["sampling.rule=heun".to_string()]].concat()).unwrap().sampler().is_ok());
}

#[test]
fn amed_settings_are_checked_with_the_key_named() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let e = config(&["objective={ kind = \"amed\" }".into(), "teacher={ run = \"runs/x\" }".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("teacher.init_student = true"), "{e:#}");
    let e = config(&["objective={ kind = \"amed\" }".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("[teacher]"), "{e:#}");
    let e = config(&["objective={ kind = \"amed\", steps = [] }".into(), "teacher={ run = \"runs/x\", init_student = true }".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("objective.steps"), "{e:#}");
    let e = config(&["objective={ kind = \"amed\", grid = { kind = \"logsnr\" } }".into(), "teacher={ run = \"runs/x\", init_student = true }".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("objective.grid") && format!("{e:#}").contains("sampling.grid"), "{e:#}");
    let e = config(&["sampling.rule=amed".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("sampling.rule = \"amed\"") && format!("{e:#}").contains("flow_matching"), "{e:#}");
}

#[test]
fn an_optimised_grid_is_saved_with_the_run_and_walked_by_name() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fm = run(&dir.path().join("fm"), &["run.steps=6".into()]);
    let cfg = read_run(&fm);
    let req = GridSearchRequest { samples: 8, reference_steps: 16, sweeps: 1, probes: 4, ..GridSearchRequest::new("ld3-euler", vec![2, 3]) };
    let (path, file) = optimize_run_grid(&fm, &cfg, &req, Device::Cpu).unwrap();
    assert_eq!(path, grid_file(&fm, "ld3-euler"));
    assert_eq!(GridFile::read(&fm, "ld3-euler", "k").unwrap(), file);
    assert_eq!(file.step_counts(), vec![2, 3]);
    for g in &file.grids {
        assert!(g.fit_error <= g.fit_start_error, "{g:?}");
    }

    // Walked by name from [sampling] (what --grid sets too), at the step counts it has.
    let named = config(&["sampling.optimized_grid=\"ld3-euler\"".into()]).unwrap();
    let mut sampler = named.sampler().unwrap();
    sampler.attach_run(&fm, Device::Cpu).unwrap();
    assert_eq!(sampler.grid(2), file.grids[0].times);
    let e = sampler.check_steps(&[2, 4]).unwrap_err().to_string();
    assert!(e.contains("sampling.optimized_grid") && e.contains("[4]") && e.contains("[2, 3]"), "{e}");
    let net = load_run_weights(&fm, &cfg.model, Weights::Ema, Device::Cpu).unwrap();
    let out = sampler.generate_counted(net.net.as_ref(), Tensor::randn([3, 1, 32, 32], (Kind::Float, Device::Cpu)), &Tensor::zeros([3], (Kind::Int64, Device::Cpu)), 3);
    assert_eq!(out.nfe, 3.0);

    // Another rule than the file's, a missing file, a malformed one, a bad name: errors naming them.
    let mut heun = config(&["sampling.optimized_grid=\"ld3-euler\"".into(), "sampling.rule=heun".into()]).unwrap().sampler().unwrap();
    let e = heun.attach_run(&fm, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("ld3-euler.toml") && e.contains("\"euler\"") && e.contains("\"heun\""), "{e}");
    let mut missing = config(&["sampling.optimized_grid=\"nope\"".into()]).unwrap().sampler().unwrap();
    let e = missing.attach_run(&fm, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("sampling.optimized_grid = \"nope\"") && e.contains("nope.toml") && e.contains("flowmap optimize-grid"), "{e}");
    std::fs::write(grid_file(&fm, "broken"), "rule = \"euler\"\nreference_rule = \"heun\"\nreference_steps = 8\nsamples = 2\nweights = \"ema\"\n[[grids]]\nsteps = 2\ntimes = [1.0, 0.2, 0.5, 0.0]\nstart = [1.0, 0.5, 0.0]\nfit_error = 0.0\nfit_start_error = 0.0\nheld_out_error = 0.0\nheld_out_start_error = 0.0\n").unwrap();
    let e = format!("{:#}", GridFile::read(&fm, "broken", "sampling.optimized_grid").unwrap_err());
    assert!(e.contains("broken.toml") && e.contains("grids[0].times") && e.contains("descending"), "{e}");
    std::fs::write(grid_file(&fm, "garbage"), "rule = 3").unwrap();
    let e = format!("{:#}", GridFile::read(&fm, "garbage", "sampling.optimized_grid").unwrap_err());
    assert!(e.contains("garbage.toml") && e.contains("not a grid file"), "{e}");
    let e = format!("{:#}", config(&["sampling.optimized_grid=\"../x\"".into()]).unwrap_err());
    assert!(e.contains("sampling.optimized_grid = \"../x\""), "{e}");
    let e = format!("{:#}", optimize_run_grid(&fm, &read_run(&fm), &GridSearchRequest::new("a", vec![]), Device::Cpu).unwrap_err());
    assert!(e.contains("--steps"), "{e}");
}
