//! The commands end to end on the tiny config: `table` (train two objectives, FID/KID at two step
//! counts, Markdown/CSV/plots), then `sample`, `fid` and `plot` on one of its runs.
mod cli_support;
use cli_support::flowmap_ok as flowmap;
use std::path::Path;

#[test]
fn table_sample_fid_and_plot_on_the_tiny_config() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml").canonicalize().unwrap();
    let out = dir.path().join("table");
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            r#"[table]
name = "tiny"
out_dir = "{out}"
steps = [1, 4]
set = ["run.steps=6", "run.checkpoint_every=0"]

[eval]
num_samples = 4
batch = 4
[eval.reference]
split = "test"
num_images = 6

[[rows]]
label = "Flow matching"
config = "{tiny}"

[[rows]]
label = "MeanFlow"
config = "{tiny}"
set = ["objective.kind=mean_flow", "sampling.rule=jump"]
"#,
            out = out.display(),
            tiny = tiny.display()
        ),
    )
    .unwrap();
    let stdout = flowmap(&["table", spec.to_str().unwrap()]);
    assert!(stdout.contains("| Flow matching |") && stdout.contains("| MeanFlow |"), "{stdout}");
    for f in ["table.md", "table.csv", "fid_vs_steps.png", "fid_vs_steps.svg", "loss.png", "loss.svg"] {
        assert!(out.join(f).metadata().map(|m| m.len() > 0).unwrap_or(false), "{f} missing");
    }
    let csv = std::fs::read_to_string(out.join("table.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for r in &rows {
        let fid: f64 = r.split(',').nth(2).unwrap().parse().unwrap();
        assert!(fid.is_finite() && fid > 0.0, "{r}");
    }
    // A second call reuses the finished runs and their fid.csv rows (no new rows).
    let before = std::fs::read_to_string(out.join("flow-matching/fid.csv")).unwrap();
    flowmap(&["table", spec.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(out.join("flow-matching/fid.csv")).unwrap(), before);
    // Another table over the same runs (`runs_dir`): the same row reuses run and FID rows, a row
    // sampling it with Heun adds its own folder there, and table and plots go to its out_dir.
    let other = dir.path().join("other");
    let spec2 = dir.path().join("spec2.toml");
    let text = std::fs::read_to_string(&spec).unwrap().replace(&format!("out_dir = \"{}\"", out.display()), &format!("out_dir = \"{}\"\nruns_dir = \"{}\"", other.display(), out.display()));
    let text = text.split("[[rows]]\nlabel = \"MeanFlow\"").next().unwrap().to_string() + &format!("[[rows]]\nlabel = \"Flow matching (Heun)\"\nconfig = \"{}\"\nrun = \"Flow matching\"\nset = [\"sampling.rule=heun\"]\n", tiny.display());
    std::fs::write(&spec2, text).unwrap();
    let stdout = flowmap(&["table", spec2.to_str().unwrap()]);
    assert!(stdout.contains("| Flow matching |") && stdout.contains("| Flow matching (Heun)"), "{stdout}");
    assert_eq!(std::fs::read_to_string(out.join("flow-matching/fid.csv")).unwrap(), before);
    assert!(out.join("flow-matching-heun/fid.csv").exists() && other.join("table.md").exists() && !other.join("flow-matching").exists());

    let run = out.join("meanflow");
    let run = run.to_str().unwrap();
    flowmap(&["sample", "--run", run, "--steps", "1,2", "--num", "4", "--class", "3"]);
    let t = tch::Tensor::read_safetensors(Path::new(run).join("samples/sample/steps2.safetensors")).unwrap();
    let images = &t.iter().find(|(k, _)| k == "images").unwrap().1;
    assert_eq!(images.size(), vec![4, 1, 32, 32]);
    assert_eq!(Vec::<i64>::try_from(&t.iter().find(|(k, _)| k == "class").unwrap().1).unwrap(), vec![3; 4]);
    assert!(Path::new(run).join("samples/sample/steps1.png").exists());

    let fid = flowmap(&["fid", "--run", run, "--steps", "2", "--num-samples", "4", "--ref-images", "6"]);
    assert!(fid.starts_with("steps,eval_seed,fid,kid\n2,0,"), "{fid}");
    let plots = flowmap(&["plot", "--run", run, "--run", out.join("flow-matching").to_str().unwrap(), "--out", dir.path().join("plots").to_str().unwrap()]);
    assert!(plots.contains("fid_vs_steps.svg") && plots.contains("fid_vs_nfe.png") && plots.contains("loss.png"), "{plots}");
}

#[test]
fn fid_while_training_writes_one_row_per_evaluation_and_a_fid_vs_train_step_plot() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml");
    let run = dir.path().join("run");
    let sets = ["run.steps=6", "eval.every=3", "eval.num_samples=4", "eval.batch=4", "eval.steps=[1, 2]", "eval.reference.num_images=6"];
    let mut args = vec!["train", tiny.to_str().unwrap(), "--run-dir", run.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    flowmap(&args);
    let rows = flowmap_experiments::eval::fid::read_fid_csv(&run.join("fid.csv")).unwrap();
    let cells: Vec<(u64, usize)> = rows.iter().map(|r| (r.train_step, r.steps)).collect();
    assert_eq!(cells, vec![(3, 1), (3, 2), (6, 1), (6, 2)]);
    assert!(rows.iter().all(|r| r.fid.is_finite() && r.num_samples == 4));
    let plots = flowmap(&["plot", "--run", run.to_str().unwrap(), "--out", dir.path().join("plots").to_str().unwrap()]);
    assert!(plots.contains("run_fid_vs_train_step.png") && plots.contains("run_fid_vs_train_step.svg"), "{plots}");
}

/// `flowmap table --jobs 2`: the rows train side by side in child processes (one log each) into
/// the run directories the table then evaluates; a row that fails in its child is named with the
/// child's own error, and the next call (the broken row removed) reuses the finished run.
#[test]
fn table_jobs_trains_rows_in_child_processes_and_names_a_failed_row() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml").canonicalize().unwrap();
    let out = dir.path().join("table");
    let spec = |rows: &str| {
        let path = dir.path().join("spec.toml");
        let head = format!("[table]\nname = \"tiny\"\nout_dir = \"{}\"\nsteps = [1]\nset = [\"run.steps=5\", \"run.checkpoint_every=0\"]\n[eval]\nnum_samples = 4\nbatch = 4\n[eval.reference]\nsplit = \"test\"\nnum_images = 6\n", out.display());
        std::fs::write(&path, head + rows).unwrap();
        path
    };
    let good = format!("[[rows]]\nlabel = \"Flow matching\"\nconfig = \"{t}\"\n[[rows]]\nlabel = \"MeanFlow\"\nconfig = \"{t}\"\nset = [\"objective.kind=mean_flow\", \"sampling.rule=jump\"]\n", t = tiny.display());
    let broken = format!("[[rows]]\nlabel = \"Broken\"\nconfig = \"{}\"\nset = [\"data.reflow_pairs=\\\"{}/no-such-pairs.safetensors\\\"\"]\n", tiny.display(), dir.path().display());

    let failed = cli_support::flowmap(&["table", spec(&(good.clone() + &broken)).to_str().unwrap(), "--jobs", "2"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("row \"Broken\"") && stderr.contains("no-such-pairs.safetensors") && stderr.contains("logs/broken.log"), "{stderr}");

    let stdout = flowmap(&["table", spec(&good).to_str().unwrap(), "--jobs", "2"]);
    assert!(stdout.contains("trained 2 at a time") && stdout.contains("| Flow matching |") && stdout.contains("| MeanFlow |"), "{stdout}");
    for row in ["flow-matching", "meanflow"] {
        let log = std::fs::read_to_string(out.join(format!("logs/{row}.log"))).unwrap();
        assert!(log.contains("at step 5 (Finished)"), "{row}: {log}");
        assert!(out.join(row).join("checkpoints/LATEST").exists(), "{row}: no checkpoint");
    }
}

#[test]
fn an_nfe_table_puts_solvers_amed_and_an_optimised_grid_next_to_a_one_step_model() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml").canonicalize().unwrap();
    let out = dir.path().join("table");
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            r#"[table]
name = "tiny NFE"
out_dir = "{out}"
nfe = [1, 2, 4]
set = ["run.steps=6", "run.checkpoint_every=0"]

[eval]
num_samples = 4
batch = 4
[eval.reference]
split = "test"
num_images = 6

[[rows]]
label = "Flow matching (Euler)"
config = "{tiny}"

[[rows]]
label = "Flow matching (Heun)"
config = "{tiny}"
run = "Flow matching (Euler)"
set = ["sampling.rule=heun"]

[[rows]]
label = "Flow matching (Euler, optimised grid)"
config = "{tiny}"
run = "Flow matching (Euler)"
optimize_grid = "ld3-euler"
grid_samples = 16
grid_reference_steps = 16

[[rows]]
label = "AMED"
config = "{tiny}"
set = ["objective={{ kind = \"amed\", steps = [1, 2], teacher_substeps = 1 }}", "teacher={{ run = \"{out}/flow-matching-euler\", init_student = true }}", "sampling.rule=amed", "run.steps=2"]

[[rows]]
label = "MeanFlow"
config = "{tiny}"
set = ["objective.kind=mean_flow", "sampling.rule=jump"]
"#,
            out = out.display(),
            tiny = tiny.display()
        ),
    )
    .unwrap();
    let stdout = flowmap(&["table", spec.to_str().unwrap()]);
    assert!(stdout.contains("| NFE 1 | NFE 2 | NFE 4 |"), "{stdout}");
    for f in ["table.md", "table.csv", "fid_vs_nfe.png", "fid_vs_nfe.svg", "fid_vs_steps.png"] {
        assert!(out.join(f).metadata().map(|m| m.len() > 0).unwrap_or(false), "{f} missing");
    }
    // (label, steps, counted nfe) of every cell: Heun and AMED spend 2 per step and have no NFE-1 cell.
    let csv = std::fs::read_to_string(out.join("table.csv")).unwrap();
    let mut cells: Vec<(String, usize, f64)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let label = l.split('"').nth(1).unwrap().to_string();
            let f: Vec<&str> = l.rsplitn(10, ',').collect::<Vec<_>>().into_iter().rev().collect();
            (label, f[1].parse().unwrap(), f[8].parse().unwrap())
        })
        .collect();
    cells.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let expect = |label: &str, v: &[(usize, f64)]| {
        let got: Vec<(usize, f64)> = cells.iter().filter(|c| c.0 == label).map(|c| (c.1, c.2)).collect();
        assert_eq!(got, v, "{label}: {csv}");
    };
    expect("Flow matching (Euler)", &[(1, 1.0), (2, 2.0), (4, 4.0)]);
    expect("Flow matching (Heun)", &[(1, 2.0), (2, 4.0)]);
    expect("Flow matching (Euler, optimised grid)", &[(1, 1.0), (2, 2.0), (4, 4.0)]);
    expect("AMED", &[(1, 2.0), (2, 4.0)]);
    expect("MeanFlow", &[(1, 1.0), (2, 2.0), (4, 4.0)]);
    // The sampling rows trained nothing; their rows live in their own folders, the grid under the run.
    assert!(!out.join("flow-matching-heun/checkpoints").exists());
    assert!(out.join("flow-matching-heun/fid.csv").exists());
    assert!(out.join("flow-matching-euler/grids/ld3-euler.toml").exists());
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(md.contains("| Flow matching (Heun) (NFE = 2×steps) | – |"), "{md}");
}
