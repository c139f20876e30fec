//! `[sampling]` with the multistep solvers and the grid key: which objectives they load for, the
//! errors that name the keys, and the grids and NFE they give.
use flowmap_core::{GridKind, Reads, StepRule};
use flowmap_experiments::config::{load_config, ExperimentConfig};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

fn load(sets: &[&str]) -> anyhow::Result<ExperimentConfig> {
    load_config(&tiny(), &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map(|(c, _)| c)
}

fn error(sets: &[&str]) -> String {
    match load(sets).and_then(|c| c.sampler().map(|_| ())) {
        Ok(_) => panic!("{sets:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn multistep_rules_load_for_velocity_and_eps_models_only() {
    // tiny_cpu.toml trains flow matching: the solvers read velocity.
    for (name, rule) in [("dpm_solver_pp_2m", StepRule::DpmSolverPp2M { reads: Reads::Velocity }), ("dpm_solver_pp_3m", StepRule::DpmSolverPp3M { reads: Reads::Velocity }), ("unipc", StepRule::UniPc { reads: Reads::Velocity })] {
        assert_eq!(load(&[&format!("sampling.rule={name}")]).unwrap().sampler().unwrap().rule, rule, "{name}");
    }
    // DDPM: they read eps.
    let ddpm = load(&["objective.kind=ddpm", "sampling.rule=dpm_solver_pp_2m"]).unwrap().sampler().unwrap();
    assert_eq!(ddpm.rule, StepRule::DpmSolverPp2M { reads: Reads::Eps });
    // Average-velocity and jump models: rejected naming both keys.
    for (kind, rule) in [("mean_flow", "dpm_solver_pp_2m"), ("mean_flow", "unipc"), ("live_reflow", "dpm_solver_pp_3m")] {
        let e = error(&[&format!("objective.kind={kind}"), &format!("sampling.rule={rule}")]);
        assert!(e.contains(&format!("sampling.rule = \"{rule}\"")) && e.contains(&format!("objective.kind = \"{kind}\"")), "{kind} {rule}: {e}");
    }
}

#[test]
fn the_grid_key_selects_the_grid_and_the_explicit_list_wins_at_its_step_count() {
    let uniform = load(&[]).unwrap().sampler().unwrap();
    assert_eq!(uniform.grid, GridKind::Uniform);
    assert_eq!(uniform.grid(4), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    let logsnr = load(&["sampling.grid={ kind = \"logsnr\" }"]).unwrap().sampler().unwrap();
    let g = logsnr.grid(4);
    // Linear path: levels t/(1 − t) log-uniform from 80 to 0.002 after t_0 = 1.
    let want = |i: f64| (80f64.ln() + (0.002f64.ln() - 80f64.ln()) * i / 3.0).exp();
    assert_eq!((g.len(), g[0], g[4]), (5, 1.0, 0.0));
    for i in 1..4 {
        assert!((g[i] / (1.0 - g[i]) / want(i as f64) - 1.0).abs() < 1e-9, "{g:?}");
    }
    let edm = load(&["sampling.grid={ kind = \"edm\", rho = 7.0 }", "sampling.time_grid=[1.0, 0.9, 0.0]", "sampling.steps=[2, 4]"]).unwrap().sampler().unwrap();
    assert_eq!(edm.grid(2), vec![1.0, 0.9, 0.0]);
    let g = edm.grid(4);
    assert!((g[3] / (1.0 - g[3]) - 0.002).abs() < 1e-9 && g[1] < 1.0 && g[1] > g[2], "{g:?}");
    assert!(edm.to_string().contains("Edm"), "{edm}");
    // Sampling with a multistep rule on the EDM grid costs one NFE per step.
    let s = load(&["sampling.grid={ kind = \"edm\" }", "sampling.rule=unipc"]).unwrap().sampler().unwrap();
    let net = (|x: &Tensor, t: &Tensor, _h: &Tensor, _c: &Tensor| x * 0.5 + t.reshape([-1, 1, 1, 1]), 10i64);
    let noise = Tensor::ones([3, 1, 4, 4], (Kind::Float, Device::Cpu));
    let out = s.generate_counted(&net, noise, &Tensor::zeros([3], (Kind::Int64, Device::Cpu)), 8);
    assert_eq!(out.nfe, 8.0);
    assert_eq!(out.x.isfinite().all().int64_value(&[]), 1);
}

#[test]
fn a_bad_grid_is_rejected_naming_the_key() {
    for (grid, why) in [("{ kind = \"edm\", rho = -1.0 }", "rho"), ("{ kind = \"edm\", rho = 7.0, sigma_min = 0.0 }", "sigma_min"), ("{ kind = \"logsnr\", sigma_min = 1.0, sigma_max = 0.5 }", "sigma_max")] {
        let e = error(&[&format!("sampling.grid={grid}")]);
        assert!(e.contains("sampling.grid") && e.contains(why), "{grid}: {e}");
    }
    // Unknown kinds and fields: the TOML error names the key and the allowed values.
    for (grid, why) in [("{ kind = \"karras\" }", "expected one of `uniform`, `logsnr`, `edm`"), ("{ kind = \"edm\", rh = 7.0 }", "unknown field `rh`")] {
        let e = error(&[&format!("sampling.grid={grid}")]);
        assert!(e.contains("sampling.grid") && e.contains(why), "{grid}: {e}");
    }
}
