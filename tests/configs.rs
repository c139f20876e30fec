//! Every TOML file under experiments/ parses and validates (experiment files through the training
//! loader, table specs through the table loader, including each row's experiment), and typos in
//! any section are rejected with the key named.
use flowmap::experiments::{config, report::table};
use std::path::{Path, PathBuf};

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            toml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

fn experiments_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments")
}

#[test]
fn every_experiment_file_parses_and_validates() {
    let mut files = vec![];
    toml_files(&experiments_dir(), &mut files);
    assert!(files.len() >= 40, "expected the small-scale grid of configs, found {}", files.len());
    let mut failures = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let result = if text.lines().any(|l| l.trim() == "[table]") { table::read_spec(f).map(|_| ()) } else { config::load_config(f, &[]).map(|_| ()) };
        if let Err(e) = result {
            failures.push(format!("{}: {e:#}", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn typos_in_any_section_are_rejected_naming_the_key() {
    let f = experiments_dir().join("small/mnist/cond/mean_flow.toml");
    for (set, key) in [
        ("run.stepz=3", "stepz"),
        ("data.datset=mnist", "datset"),
        ("model.hiden_size=8", "hiden_size"),
        ("objective.equal_fractoin=0.5", "equal_fractoin"),
        ("optimizer.betas2=0.9", "betas2"),
        ("ema.decai=0.9", "decai"),
        ("sampling.rulle=euler", "rulle"),
        ("eval.num_sample=3", "num_sample"),
        ("model.kind=dit2", "dit2"),
    ] {
        let e = format!("{:#}", config::load_config(&f, &[set.to_string()]).unwrap_err());
        assert!(e.contains(key), "--set {set}: {e}");
        assert!(e.contains("mean_flow.toml"), "--set {set}: the file is not named: {e}");
    }
    // Cross-section checks: the model must embed exactly the data's classes.
    let e = format!("{:#}", config::load_config(&f, &["model.num_classes=3".into()]).unwrap_err());
    assert!(e.contains("model.num_classes = 3"), "{e}");
}

/// The newer flow-map objectives reject bad settings with the key named: iMF's guidance needs a
/// network that takes it, α-Flow's curriculum and the sampling interval are range-checked.
#[test]
fn flow_map_objective_settings_are_checked_naming_the_key() {
    let dir = experiments_dir().join("small/mnist/cond");
    for (file, set, key) in [
        ("improved_mean_flow.toml", "model.guidance_conditioning=false", "model.guidance_conditioning"),
        ("improved_mean_flow.toml", "objective.guidance.t_min_range=[0.6, 0.2]", "objective.guidance.t_min_range"),
        ("improved_mean_flow.toml", "sampling.cfg_interval=[0.7, 0.2]", "sampling.cfg_interval"),
        ("alpha_flow.toml", "objective.alpha.end_step=0", "objective.alpha"),
        ("alpha_flow.toml", "objective.alpha.initial=1.5", "objective.alpha.initial"),
        ("alpha_flow.toml", "objective.fm_fraction=2.0", "objective.fm_fraction"),
        ("split_mean_flow.toml", "objective.label_dropout=2.0", "label_dropout"),
        ("split_mean_flow.toml", "model.guidance_conditioning=true", "model.guidance_conditioning"),
    ] {
        let e = format!("{:#}", config::load_config(&dir.join(file), &[set.to_string()]).unwrap_err());
        assert!(e.contains(key), "{file} --set {set}: {e}");
    }
    for file in ["improved_mean_flow.toml", "alpha_flow.toml", "split_mean_flow.toml"] {
        config::load_config(&dir.join(file), &["sampling.cfg_interval=[0.4, 0.65]".into()]).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}

/// Every experiment file dry-runs (`flowmap train FILE --dry-run`, without the forward pass): on
/// data this machine has (MNIST, Fashion-MNIST) it passes; a file whose data are not here
/// (ImageNet, CelebA-HQ, latents, reflow pairs still to be made) fails with an error naming what is
/// missing, never a panic.
#[test]
fn every_experiment_file_dry_runs_or_names_its_missing_data() {
    use flowmap::experiments::cli::dry_run::{dry_run, DryRunOptions};
    let mut files = vec![];
    toml_files(&experiments_dir(), &mut files);
    files.sort();
    let (mut passed, mut missing, mut failures) = (0, 0, vec![]);
    for f in &files {
        if std::fs::read_to_string(f).unwrap().lines().any(|l| l.trim() == "[table]") {
            continue;
        }
        let (cfg, _) = config::load_config(f, &[]).unwrap();
        let here = cfg.data.is_builtin() && cfg.data.reflow_pairs().is_none();
        match (dry_run(&cfg, DryRunOptions { forward: false }), here) {
            (Ok(report), true) => {
                assert!(report.parameters > 0 && report.data_len > 0, "{}: {report:?}", f.display());
                passed += 1;
            }
            (Err(e), false) => {
                let e = format!("{e:#}");
                let named = ["is not set", "No such file", "does not exist", "not found", "no such", "missing"].iter().any(|s| e.to_lowercase().contains(&s.to_lowercase()));
                if named {
                    missing += 1;
                } else {
                    failures.push(format!("{}: fails without naming what is missing: {e}", f.display()));
                }
            }
            (Ok(_), false) => failures.push(format!("{}: dry run passed although its data should not be here", f.display())),
            (Err(e), true) => failures.push(format!("{}: {e:#}", f.display())),
        }
    }
    println!("{passed} dry runs passed, {missing} named their missing data");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(passed >= 40, "only {passed} configs dry-ran");
}

/// The Shortcut Table-1 configs run what kvfrans/shortcut-models ran (issue 18): every row's path,
/// listed here, is the one its objective trains on and its sampler walks (the code's sigma_min =
/// 1e-5 path for every flow row; the Diffusion row's DDPM schedule), and each row sets the code's
/// option where flowmap's default differs.
#[test]
fn every_table1_config_trains_and_samples_the_codes_path_and_options() {
    use flowmap::objectives::{ObjectiveConfig as O, ReflowTarget, TargetNet};
    use flowmap::{DdpmConfig, InterpolantConfig, SigmaMinConfig};
    let sigma_min = InterpolantConfig::LinearSigmaMin(SigmaMinConfig { sigma_min: 1e-5 });
    let ddpm = InterpolantConfig::DdpmLinearBeta(DdpmConfig { steps: 1000, beta_start: 1e-4, beta_end: 0.02 });
    let expected = [
        ("flow_matching.toml", &sigma_min),
        ("diffusion.toml", &ddpm),
        ("progressive_distillation.toml", &sigma_min),
        ("consistency_distillation.toml", &sigma_min),
        ("consistency_training.toml", &sigma_min),
        ("live_reflow.toml", &sigma_min),
        ("shortcut.toml", &sigma_min),
    ];
    let paper = experiments_dir().join("paper");
    for dataset in ["imagenet256", "celebahq256"] {
        let spec_path = paper.join(format!("table_shortcut_{dataset}.toml"));
        let spec = table::read_spec(&spec_path).unwrap();
        let mut rows: Vec<String> = spec.rows.iter().map(|r| r.config.file_name().unwrap().to_string_lossy().into_owned()).collect();
        rows.sort();
        let mut listed: Vec<String> = expected.iter().map(|(f, _)| f.to_string()).collect();
        listed.sort();
        assert_eq!(rows, listed, "{}: every row of the table is in this test's list", spec_path.display());
        for (file, path) in expected {
            let f = paper.join(format!("shortcut_{dataset}/{file}"));
            let (cfg, _) = config::load_config(&f, &[]).unwrap();
            let what = f.display();
            assert_eq!(&cfg.objective.default_sampler().path, path, "{what}: the path the objective trains on");
            assert_eq!(&cfg.sampler().unwrap().path, path, "{what}: the path the sampler walks");
            match &cfg.objective {
                O::ProgressiveDistillation(c) => {
                    assert_eq!(c.refresh_from, TargetNet::Ema, "{what}: the code's refreshed teacher is the student's EMA");
                    assert!(cfg.teacher.as_ref().unwrap().init_student, "{what}");
                }
                O::ConsistencyDistillation(_) => assert!(cfg.teacher.as_ref().unwrap().init_student, "{what}: the code's CD student starts from the teacher"),
                O::ConsistencyTraining(c) => assert_eq!(c.count_steps_from, 1, "{what}: the code counts updates from 1"),
                O::LiveReflow(c) => {
                    assert_eq!(c.reflow_target, ReflowTarget::EndpointDifference, "{what}");
                    // The ImageNet command rolls out with cfg_scale 1.5; CelebA-HQ's cfg_scale 0 unconditionally.
                    let guidance = if dataset == "imagenet256" { Some(1.5) } else { None };
                    assert_eq!(c.rollout_cfg_scale, guidance, "{what}");
                }
                _ => {}
            }
        }
    }
}

/// The ImageNet live-reflow config's rollouts are guided (conditional and unconditional passes on
/// the same points, combined with scale 1.5) and labelled with the reflow rows' own classes.
#[test]
fn imagenet_live_reflow_rollouts_are_guided_with_the_rows_labels() {
    use flowmap::objectives::{Batch, Nets};
    use std::cell::RefCell;
    use tch::{Device, Kind, Tensor};
    let f = experiments_dir().join("paper/shortcut_imagenet256/live_reflow.toml");
    let (cfg, _) = config::load_config(&f, &[]).unwrap();
    let objective = cfg.objective.build().unwrap();
    const NULL: i64 = 1000;
    let calls: RefCell<Vec<[Tensor; 4]>> = RefCell::new(vec![]);
    // u = 0.5·x + 0.001·class: class-dependent, so guidance changes the rollout.
    let u = |x: &Tensor, class: &Tensor| x * 0.5 + class.to_kind(Kind::Double).reshape([-1, 1, 1, 1]) * 1e-3;
    let net = (
        |x: &Tensor, t: &Tensor, h: &Tensor, c: &Tensor| {
            calls.borrow_mut().push([x.copy(), t.copy(), h.copy(), c.copy()]);
            u(x, c)
        },
        NULL,
    );
    tch::manual_seed(0);
    let n = 16; // 1/8 reflow rows: 2
    let class = Tensor::from_slice(&[5i64, 917, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    let batch = Batch::new(Tensor::randn([n, 4, 2, 2], (Kind::Double, Device::Cpu)), class.shallow_clone());
    let _ = objective.loss(Nets { online: &net, ema: &net, teacher: None }, &batch, 0);

    let calls = calls.into_inner();
    let rollout: Vec<&[Tensor; 4]> = calls.iter().filter(|[x, ..]| x.size()[0] == 4).collect();
    assert_eq!(rollout.len(), 8, "8 guided Euler steps on the 2 reflow rows, each a conditional and an unconditional pass");
    let expected_class = vec![5i64, 917, NULL, NULL];
    for (i, [x, t, h, c]) in rollout.iter().enumerate() {
        assert_eq!(Vec::<i64>::try_from(c).unwrap(), expected_class, "step {i}: the rows' labels, then the null class");
        assert!(x.narrow(0, 0, 2).equal(&x.narrow(0, 2, 2)), "step {i}: both passes at the same points");
        let t_i = 1.0 - i as f64 / 8.0;
        assert!(Vec::<f64>::try_from(t).unwrap().iter().all(|&v| (v - t_i).abs() < 1e-12), "step {i}: t");
        assert!(Vec::<f64>::try_from(h).unwrap().iter().all(|&v| v == 1.0 / 128.0), "step {i}: h = flow_h");
        if i + 1 < rollout.len() {
            // x_{i+1} = x_i − (1/8)·(u(∅) + 1.5·(u(c) − u(∅))).
            let (xi, ci) = (x.narrow(0, 0, 2), c.narrow(0, 0, 2));
            let (cond, uncond) = (u(&xi, &ci), u(&xi, &ci.full_like(NULL)));
            let next = &xi - (&uncond + (cond - &uncond) * 1.5) / 8.0;
            let d = (next - rollout[i + 1][0].narrow(0, 0, 2)).abs().max().double_value(&[]);
            assert!(d < 1e-12, "step {i}: the rollout is not the scale-1.5 guided Euler step (diff {d})");
        }
    }
}
