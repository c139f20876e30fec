//! The sampler is derived from the objective: `[sampling].rule`/`.path` are overrides checked
//! against it, `[sampling].time_grid` replaces the uniform grid of its step count, and fid.csv
//! records the step count with the NFE measured while sampling.
mod cli_support;
use cli_support::flowmap_ok;
use flowmap_core::{DdpmConfig, InterpolantConfig, NoParams, StepRule};
use flowmap_experiments::config::{load_config, ExperimentConfig};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

/// The tiny config without its `rule = "euler"` line: `[sampling]` then overrides nothing.
fn tiny_without_rule(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(tiny()).unwrap();
    assert!(text.contains("rule = \"euler\"\n"), "tiny_cpu.toml changed: {text}");
    let path = dir.join("tiny_no_rule.toml");
    std::fs::write(&path, text.replace("rule = \"euler\"\n", "")).unwrap();
    path
}

/// `--set`s that make the tiny config train consistency training.
const CT: [&str; 2] = ["objective.kind=consistency_training", "objective.grid={ spacing = { kind = \"uniform\" }, schedule = { kind = \"doubling\", stages = 2, total_steps = 20 } }"];

fn load(path: &Path, sets: &[&str]) -> anyhow::Result<ExperimentConfig> {
    load_config(path, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map(|(c, _)| c)
}

fn error(path: &Path, sets: &[&str]) -> String {
    match load(path, sets) {
        Ok(_) => panic!("{sets:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn without_overrides_each_objective_samples_its_own_way() {
    let dir = tempfile::tempdir().unwrap();
    let f = tiny_without_rule(dir.path());
    let fm = load(&f, &[]).unwrap().sampler().unwrap();
    assert_eq!((fm.rule, &fm.path), (StepRule::Euler, &InterpolantConfig::Linear(NoParams {})));
    let ddpm = load(&f, &["objective.kind=ddpm", "objective.schedule.steps=500"]).unwrap().sampler().unwrap();
    assert_eq!(ddpm.rule, StepRule::Ddim);
    assert_eq!(ddpm.path, InterpolantConfig::DdpmLinearBeta(DdpmConfig { steps: 500, ..DdpmConfig::default() }), "the sampler walks the schedule the objective trains on");
    for (kind, rule) in [("mean_flow", StepRule::Jump), ("live_reflow", StepRule::Jump)] {
        assert_eq!(load(&f, &[&format!("objective.kind={kind}")]).unwrap().sampler().unwrap().rule, rule, "{kind}");
    }
    assert_eq!(load(&f, &CT).unwrap().sampler().unwrap().rule, StepRule::Renoise);
    let vp = load(&f, &["objective.path={ kind = \"vp_cosine\" }"]).unwrap().sampler().unwrap();
    assert!(matches!(vp.path, InterpolantConfig::VpCosine(_)), "{vp}");
    // sCM: the trig_flow rule on the TrigFlow path of its σ_d, 2 steps through τ_mid = 1.1 (the
    // other step counts uniform), unless [sampling].time_grid names its own grid.
    let scm = load(&f, &["objective.kind=scm_training", "objective.sigma_d=0.6"]).unwrap().sampler().unwrap();
    assert_eq!((scm.rule, &scm.path), (StepRule::TrigFlow, &InterpolantConfig::TrigFlow(flowmap_core::TrigFlowConfig { sigma_d: 0.6 })));
    let two = scm.grid(2);
    assert!(two.len() == 3 && (two[1] - 2.2 / std::f64::consts::PI).abs() < 1e-15, "{two:?}");
    assert_eq!(scm.grid(1), vec![1.0, 0.0]);
    assert_eq!(scm.grid(4), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    let own = load(&f, &["objective.kind=scm_training", "sampling.time_grid=[1.0, 0.5, 0.0]", "sampling.steps=[1, 2]"]).unwrap().sampler().unwrap();
    assert_eq!(own.grid(2), vec![1.0, 0.5, 0.0]);
    let e = error(&f, &["objective.kind=scm_distillation"]);
    assert!(e.contains("needs a [teacher] table"), "{e}");
    let e = error(&f, &["objective.kind=scm_training", "sampling.rule=renoise"]);
    assert!(e.contains("sampling.rule") && e.contains("trig_flow"), "{e}");
    let e = error(&f, &["objective.kind=scm_training", "objective.teacher_h=0.1"]);
    assert!(e.contains("objective.teacher_h") && e.contains("scm_distillation"), "{e}");
    let e = error(&f, &["objective.kind=scm_training", "objective.mid_tau=2.0"]);
    assert!(e.contains("objective.mid_tau"), "{e}");
}

#[test]
fn a_sampling_path_that_disagrees_with_the_objective_is_rejected_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let f = tiny_without_rule(dir.path());
    // A DDPM schedule in [objective] and a different path in [sampling].
    let e = error(&f, &["objective.kind=ddpm", "sampling.path={ kind = \"linear\" }"]);
    assert!(e.contains("sampling.path") && e.contains("objective.schedule") && e.contains("linear") && e.contains("ddpm_linear_beta"), "{e}");
    // The same kind of schedule with another length is another path.
    let e = error(&f, &["objective.kind=ddpm", "sampling.path={ kind = \"ddpm_linear_beta\", steps = 500 }"]);
    assert!(e.contains("sampling.path") && e.contains("objective.schedule") && e.contains("500") && e.contains("1000"), "{e}");
    let e = error(&f, &["sampling.path={ kind = \"vp_cosine\" }"]);
    assert!(e.contains("sampling.path") && e.contains("objective.path") && e.contains("vp_cosine"), "{e}");
    assert!(e.contains("tiny_no_rule.toml"), "the file is not named: {e}");
    // Equal to the objective's path: a consistent override (as the configs in experiments/ write it).
    let ok = load(&f, &["objective.kind=ddpm", "sampling.rule=ddim", "sampling.path={ kind = \"ddpm_linear_beta\", steps = 1000, beta_start = 0.0001, beta_end = 0.02 }"]).unwrap();
    assert_eq!(ok.sampler().unwrap().rule, StepRule::Ddim);
}

#[test]
fn a_rule_that_cannot_read_the_objectives_network_is_rejected_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let f = tiny_without_rule(dir.path());
    for (sets, rule, kind) in [
        (&["sampling.rule=ddim"][..], "ddim", "flow_matching"),
        (&["objective.kind=ddpm", "sampling.rule=euler"][..], "euler", "ddpm"),
        (&["sampling.rule=jump"][..], "jump", "flow_matching"),
        (&[CT[0], CT[1], "sampling.rule=heun"][..], "heun", "consistency_training"),
    ] {
        let e = error(&f, sets);
        assert!(e.contains(&format!("sampling.rule = \"{rule}\"")) && e.contains(&format!("objective.kind = \"{kind}\"")), "{sets:?}: {e}");
    }
    // Compatible overrides: Heun for flow matching, Euler instead of the jump, DDPM ancestral for DDPM.
    assert_eq!(load(&f, &["sampling.rule=heun"]).unwrap().sampler().unwrap().rule, StepRule::Heun);
    assert_eq!(load(&f, &["objective.kind=mean_flow", "sampling.rule=euler"]).unwrap().sampler().unwrap().rule, StepRule::Euler);
    assert_eq!(load(&f, &["objective.kind=ddpm", "sampling.rule=ddpm_ancestral"]).unwrap().sampler().unwrap().rule, StepRule::DdpmAncestral);
    let e = error(&f, &["sampling.rule=sde"]);
    assert!(e.contains("sampling.diffusion"), "{e}");
}

#[test]
fn an_explicit_time_grid_is_walked_at_its_step_count() {
    let (cfg, _) = load_config(&tiny(), &[]).unwrap();
    let net = (|x: &Tensor, t: &Tensor, _h: &Tensor, _c: &Tensor| x * 0.5 + t.reshape([-1, 1, 1, 1]) * t.reshape([-1, 1, 1, 1]), 10i64);
    tch::manual_seed(3);
    let noise = Tensor::randn([3, 1, 4, 4], (Kind::Float, Device::Cpu));
    let class = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
    let uniform = cfg.sampler().unwrap();
    let with = |grid: &str| load(&tiny(), &[&format!("sampling.time_grid={grid}"), "sampling.steps=[1, 2, 4]"]).unwrap().sampler().unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    // [1, 0.5, 0] is the uniform 2-step grid: the same samples.
    let half = with("[1.0, 0.5, 0.0]");
    assert_eq!(max_diff(&half.generate(&net, noise.copy(), &class, 2), &uniform.generate(&net, noise.copy(), &class, 2)), 0.0);
    // Another 2-step grid changes the 2-step samples, and only those.
    let skewed = with("[1.0, 0.9, 0.0]");
    assert_eq!(skewed.grid(2), vec![1.0, 0.9, 0.0]);
    assert_eq!(skewed.grid(4), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    assert!(max_diff(&skewed.generate(&net, noise.copy(), &class, 2), &uniform.generate(&net, noise.copy(), &class, 2)) > 1e-3);
    assert_eq!(max_diff(&skewed.generate(&net, noise.copy(), &class, 4), &uniform.generate(&net, noise.copy(), &class, 4)), 0.0);
    // By hand: Euler on [1, 0.9, 0] with F = x/2 + t².
    let mut x = noise.copy();
    for (t, r) in [(1.0f64, 0.9f64), (0.9, 0.0)] {
        x = &x - (&x * 0.5 + t * t) * (t - r);
    }
    assert!(max_diff(&skewed.generate(&net, noise.copy(), &class, 2), &x) < 1e-6);
}

#[test]
fn a_bad_time_grid_is_rejected_naming_the_key() {
    for (grid, why) in [
        ("[1.0]", "at least 2"),
        ("[1.0, 0.5, 0.5, 0.0]", "descending"),
        ("[1.0, 0.3, 0.6, 0.0]", "descending"),
        ("[0.9, 0.5, 0.0]", "start at 1.0"),
        ("[1.0, 0.5, 0.1]", "end at 0.0"),
        ("[1.0, nan, 0.0]", "finite"),
        ("[1.0, 0.5, -0.5, 0.0]", "[0, 1]"),
    ] {
        let e = error(&tiny(), &[&format!("sampling.time_grid={grid}"), "sampling.steps=[1, 2, 3]"]);
        assert!(e.contains("sampling.time_grid") && e.contains(why), "{grid}: {e}");
    }
    // A grid whose step count is never sampled would be silently unused.
    let e = error(&tiny(), &["sampling.time_grid=[1.0, 0.6, 0.3, 0.0]"]);
    assert!(e.contains("sampling.time_grid") && e.contains("sampling.steps"), "{e}");
}

#[test]
fn a_guided_heun_runs_fid_csv_shows_the_measured_nfe() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Heun (2 evaluations per step, the last step included) with guidance (cond + uncond: 2 per
    // evaluation): NFE = 4·steps.
    let sets = [
        "run.steps=2",
        "run.log_every=1",
        "run.checkpoint_every=0",
        "sampling.rule=heun",
        "sampling.cfg_scale=2.0",
        "sampling.steps=[1]",
        "sampling.grid_images=4",
        "eval.every=2",
        "eval.num_samples=4",
        "eval.batch=4",
        "eval.steps=[1, 3]",
        "eval.reference.num_images=6",
    ];
    let tiny = tiny();
    let mut args = vec!["train", tiny.to_str().unwrap(), "--run-dir", run.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    flowmap_ok(&args);
    let text = std::fs::read_to_string(run.join("fid.csv")).unwrap();
    assert!(text.starts_with("train_step,steps,nfe,"), "{text}");
    let rows = flowmap_experiments::eval::fid::read_fid_csv(&run.join("fid.csv")).unwrap();
    let cells: Vec<(u64, usize, Option<f64>)> = rows.iter().map(|r| (r.train_step, r.steps, r.nfe)).collect();
    assert_eq!(cells, vec![(2, 1, Some(4.0)), (2, 3, Some(12.0))], "{text}");
    assert!(rows.iter().all(|r| r.fid.is_finite() && r.cfg_scale == 2.0));
    // `flowmap fid` appends with the same measurement (unguided runs count one per step: the
    // table test's rows).
    flowmap_ok(&["fid", "--run", run.to_str().unwrap(), "--steps", "2", "--num-samples", "4", "--ref-images", "6"]);
    let rows = flowmap_experiments::eval::fid::read_fid_csv(&run.join("fid.csv")).unwrap();
    assert_eq!((rows[2].steps, rows[2].nfe), (2, Some(8.0)));
}

#[test]
fn a_resume_compares_the_sampler_in_use_not_how_it_was_written() {
    use flowmap_experiments::config::change::differences;
    let dir = tempfile::tempdir().unwrap();
    let (written, implied) = (load(&tiny(), &[]).unwrap(), load(&tiny_without_rule(dir.path()), &[]).unwrap());
    assert_eq!(written.sampling.rule.map(|r| format!("{r:?}")), Some("Euler".into()));
    assert!(implied.sampling.rule.is_none());
    assert!(differences(&written, &implied).unwrap().is_empty(), "rule = \"euler\" written out and left to flow matching's default are the same sampler");
    let heun = load(&tiny(), &["sampling.rule=heun"]).unwrap();
    let changes = differences(&implied, &heun).unwrap();
    assert_eq!(changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), vec!["sampling.rule"], "{changes:?}");
    assert_eq!((changes[0].old.as_deref(), changes[0].new.as_deref()), (Some("\"euler\""), Some("\"heun\"")));
}
