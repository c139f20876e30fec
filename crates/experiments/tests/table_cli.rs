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

    let run = out.join("meanflow");
    let run = run.to_str().unwrap();
    flowmap(&["sample", "--run", run, "--steps", "1,2", "--num", "4", "--class", "3"]);
    let t = tch::Tensor::read_safetensors(Path::new(run).join("samples/sample/steps2.safetensors")).unwrap();
    let images = &t.iter().find(|(k, _)| k == "images").unwrap().1;
    assert_eq!(images.size(), vec![4, 1, 32, 32]);
    assert_eq!(Vec::<i64>::try_from(&t.iter().find(|(k, _)| k == "class").unwrap().1).unwrap(), vec![3; 4]);
    assert!(Path::new(run).join("samples/sample/steps1.png").exists());

    let fid = flowmap(&["fid", "--run", run, "--steps", "2", "--num-samples", "4", "--ref-images", "6"]);
    assert!(fid.starts_with("steps,fid,kid\n2,"), "{fid}");
    let plots = flowmap(&["plot", "--run", run, "--run", out.join("flow-matching").to_str().unwrap(), "--out", dir.path().join("plots").to_str().unwrap()]);
    assert!(plots.contains("fid_vs_steps.svg") && plots.contains("loss.png"), "{plots}");
}
