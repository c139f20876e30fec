//! Every objective kind parses from TOML and builds; typos and degenerate settings are rejected;
//! Shortcut presets resolve with overrides; stage and row bookkeeping.
use flowmap_objectives::*;

fn parse(text: &str) -> anyhow::Result<ObjectiveConfig> {
    Ok(toml::from_str::<ObjectiveConfig>(text)?)
}

#[test]
fn every_kind_parses_with_defaults_and_builds() {
    let kinds = [
        "kind = \"flow_matching\"",
        "kind = \"ddpm\"",
        "kind = \"consistency_training\"\n[grid.spacing]\nkind = \"uniform\"\n[grid.schedule]\nkind = \"doubling\"\nstages = 7\ntotal_steps = 7000",
        "kind = \"consistency_distillation\"",
        "kind = \"progressive_distillation\"\nsteps_per_stage = 1000",
        "kind = \"reflow\"",
        "kind = \"live_reflow\"",
        "kind = \"shortcut\"",
        "kind = \"mean_flow\"",
        "kind = \"scm_training\"",
        "kind = \"scm_distillation\"",
    ];
    for text in kinds {
        let cfg = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        cfg.build().unwrap_or_else(|e| panic!("{text}: {e}"));
        // The resolved config round-trips through TOML.
        let back: ObjectiveConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg, "{text}");
    }
}

#[test]
fn full_tables_parse() {
    let mf = parse(
        r#"
        kind = "mean_flow"
        tangent = "model"
        stop_gradient = false
        jvp_mode = "one_pass"
        label_dropout = 0.1
        label_dropout_rows = "random"
        [times]
        equal_fraction = 0.5
        [times.times]
        kind = "logit_normal"
        mean = -0.4
        std = 1.0
        [weighting]
        power = 0.75
        c = 0.01
        [guidance]
        omega = 1.0
        kappa = 0.5
        t_start = 0.0
        t_end = 0.8
        "#,
    )
    .unwrap();
    let ObjectiveConfig::MeanFlow(c) = &mf else { panic!() };
    assert_eq!((c.tangent, c.stop_gradient, c.times.equal_fraction, c.weighting.power), (MeanFlowTangent::Model, false, 0.5, 0.75));
    assert_eq!(c.guidance.unwrap().t_end, 0.8);
    mf.build().unwrap();

    let ddpm = parse("kind = \"ddpm\"\nvariance = \"learned\"\n[schedule]\nsteps = 1000\nbeta_start = 1e-4\nbeta_end = 0.02").unwrap();
    ddpm.build().unwrap();
}

#[test]
fn typos_are_rejected() {
    for text in [
        "kind = \"flow_matching\"\nflow_hh = 0.0",
        "kind = \"mean_flow\"\nequal_fraction = 0.5",
        "kind = \"mean_flow\"\n[weighting]\npower = 1.0\ncc = 0.1",
        "kind = \"shortcut\"\npreset = \"official_code\"\nbootstrap_every = 8",
        "kind = \"shortcut\"\npreset = \"offical_code\"",
        "kind = \"progressive_distillation\"",
        "kind = \"flowmatching\"",
    ] {
        assert!(parse(text).is_err(), "accepted: {text}");
    }
}

#[test]
fn invalid_values_fail_at_build() {
    for text in [
        "kind = \"mean_flow\"\nstop_gradient = false\njvp_mode = \"graph_free\"",
        "kind = \"mean_flow\"\nstop_gradient = false\njvp_mode = \"finite_difference\"",
        "kind = \"mean_flow\"\njvp_mode = \"finite_difference\"\njvp_fd_step = 0.0",
        "kind = \"flow_matching\"\nlabel_dropout = 1.5",
        "kind = \"live_reflow\"\nreflow_fraction = 2.0",
    ] {
        assert!(parse(text).unwrap().build().is_err(), "built: {text}");
    }
    // Shortcut validates while parsing (its preset is resolved there).
    assert!(parse("kind = \"shortcut\"\nbootstrap_fraction = -0.1").is_err());
}

#[test]
fn shortcut_presets_and_overrides() {
    let ObjectiveConfig::Shortcut(paper) = parse("kind = \"shortcut\"").unwrap() else { panic!() };
    assert_eq!(paper, ShortcutConfig::paper());
    assert_eq!((paper.bootstrap_fraction, paper.flow_h, paper.target, paper.clip), (0.25, 0.0, TargetNet::Online, f64::INFINITY));
    let ObjectiveConfig::Shortcut(code) = parse("kind = \"shortcut\"\npreset = \"official_code\"\nbootstrap_fraction = 0.25").unwrap() else { panic!() };
    assert_eq!(code, ShortcutConfig { bootstrap_fraction: 0.25, ..ShortcutConfig::official_code() });
    assert_eq!((code.flow_h, code.target, code.clip, code.bootstrap_cfg_scale, code.reuse_bootstrap_images), (1.0 / 128.0, TargetNet::Ema, 4.0, 1.5, true));
    // `clip = inf` switches clipping off under the code preset.
    let ObjectiveConfig::Shortcut(unclipped) = parse("kind = \"shortcut\"\npreset = \"official_code\"\nclip = inf").unwrap() else { panic!() };
    assert!(unclipped.clip.is_infinite());
}

#[test]
fn shortcut_rejects_degenerate_batches() {
    // shortcut-models issue #11: batch 32 with 1/8 bootstrap rows = 4 rows for 7 levels.
    let code = ObjectiveConfig::Shortcut(ShortcutConfig::official_code());
    let err = code.build_for_batch(32).err().expect("batch 32 must be rejected").to_string();
    assert!(err.contains("issue #11"), "{err}");
    code.build_for_batch(56).unwrap();
    ObjectiveConfig::Shortcut(ShortcutConfig::paper()).build_for_batch(28).unwrap();
    assert!(ObjectiveConfig::Shortcut(ShortcutConfig::paper()).build_for_batch(27).is_err());
}

#[test]
fn progressive_stages_and_teacher_refresh() {
    let pd = ProgressiveConfig::new(100).build().unwrap();
    assert!(pd.needs_teacher());
    let levels: Vec<u32> = [0, 99, 100, 650, 699, 700, 10_000].iter().map(|&s| pd.level(s)).collect();
    assert_eq!(levels, vec![6, 6, 5, 0, 0, 0, 0]);
    let refresh: Vec<u64> = (0..1000).filter(|&s| pd.refresh_teacher_at(s)).collect();
    assert_eq!(refresh, vec![100, 200, 300, 400, 500, 600]);
    let fm = FlowMatchingConfig::default().build().unwrap();
    assert!(!fm.refresh_teacher_at(100) && !fm.needs_teacher());
}

#[test]
fn every_objective_covers_every_kind_and_each_kind_round_trips_through_toml() {
    let list = flowmap_objectives::every_objective();
    let mut names: Vec<&str> = list.iter().map(|v| v.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), list.len(), "variant names must be unique");
    for kind in ObjectiveConfig::KINDS {
        assert!(list.iter().any(|v| v.config.kind() == kind), "every_objective() has no `{kind}`");
    }
    for v in &list {
        assert!(ObjectiveConfig::KINDS.contains(&v.config.kind()), "{}: kind {} missing from KINDS", v.name, v.config.kind());
        let text = toml::to_string(&v.config).unwrap();
        assert!(text.contains(&format!("kind = \"{}\"", v.config.kind())), "{}: {text}", v.name);
        let back: ObjectiveConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, v.config, "{}", v.name);
        v.config.build().unwrap_or_else(|e| panic!("{}: {e}", v.name));
    }
}

#[test]
fn scm_bad_values_are_errors_naming_the_key() {
    let err = |text: &str| -> String {
        let cfg: ObjectiveConfig = toml::from_str(text).unwrap();
        match cfg.build() {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => format!("{e:#}"),
        }
    };
    for (text, key) in [
        ("kind = \"scm_training\"\nsigma_d = 0.0", "objective.sigma_d"),
        ("kind = \"scm_training\"\np_std = -1.0", "objective.p_std"),
        ("kind = \"scm_training\"\ntangent_norm_c = 0.0", "objective.tangent_norm_c"),
        ("kind = \"scm_training\"\nweighting_features = 3", "objective.weighting_features"),
        ("kind = \"scm_training\"\nmid_tau = 1.6", "objective.mid_tau"),
        ("kind = \"scm_training\"\njvp_mode = \"finite_difference\"\njvp_fd_step = 2.0", "objective.jvp_fd_step"),
        ("kind = \"scm_training\"\nteacher_prediction = \"eps\"", "objective.teacher_prediction"),
        ("kind = \"scm_distillation\"\nteacher_h = 2.0", "objective.teacher_h"),
        ("kind = \"scm_distillation\"\nteacher_path = { kind = \"trig_flow\", sigma_d = -1.0 }", "objective.teacher_path"),
    ] {
        let e = err(text);
        assert!(e.contains(key), "{text}: {e}");
    }
    // A typo is refused by serde, naming the field.
    let e = toml::from_str::<ObjectiveConfig>("kind = \"scm_training\"\ntangent_warmup = 5").unwrap_err().to_string();
    assert!(e.contains("tangent_warmup"), "{e}");
    // tangent_norm = "none" needs no c.
    let ok: ObjectiveConfig = toml::from_str("kind = \"scm_training\"\ntangent_norm = \"none\"\ntangent_norm_c = 0.0").unwrap();
    assert!(ok.build().is_ok());
}
