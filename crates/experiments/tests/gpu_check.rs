//! `scripts/gpu_check.sh --quick`: the GPU acceptance run's code paths on the CPU, as CI runs them,
//! so the script cannot rot. Asserts that report.json has every field, that flowmap and the PyTorch
//! reference agree on the DiT's parameter count and on a forward pass of the same weights (and on
//! the SD-VAE decoder), that every correctness check and the three MNIST runs produced values, and
//! two negative controls: tampered weights fail the parity check, a failed check fails the report.
//! Needs `make setup` (the venv with torch and the data cache).
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tch::Tensor;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project venv's python (FLOWMAP_VENV from .cargo/config.toml).
fn python() -> PathBuf {
    let venv = std::env::var_os("FLOWMAP_VENV").map(PathBuf::from).or_else(|| option_env!("FLOWMAP_VENV").map(PathBuf::from)).expect("FLOWMAP_VENV is not set: run `make setup`");
    let py = venv.join("bin").join("python");
    assert!(py.exists(), "{} is missing: run `make setup`", py.display());
    py
}

fn python_ref(args: &[&str]) -> std::process::Output {
    Command::new(python()).args(["-m", "flowmap_ref"]).args(args).env("PYTHONPATH", root().join("python")).env("OMP_NUM_THREADS", "1").output().expect("running python -m flowmap_ref")
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = cur.get(key).unwrap_or_else(|| panic!("report.json has no `{path}` (missing `{key}`)"));
    }
    cur
}

fn num(v: &Value, path: &str) -> f64 {
    at(v, path).as_f64().unwrap_or_else(|| panic!("`{path}` is not a number: {}", at(v, path)))
}

/// Every key of the fixed schema (python/flowmap_ref/report.py), present even when null.
const KEYS: [&str; 20] = [
    "schema",
    "mode",
    "created",
    "duration_s",
    "machine.device",
    "machine.peak_bf16_tflops",
    "machine.torch_python",
    "inception_weights",
    "model.config",
    "model.forward_gflops_per_image",
    "parity.parameters_equal",
    "parity.forward_max_abs_diff",
    "throughput",
    "meanflow_over_flow_matching.flowmap",
    "sampler.host_syncs_long",
    "checks",
    "mnist.rows",
    "steps",
    "failures",
    "reference_problems",
];
const ROWS: [&str; 9] = ["train_flow_matching", "train_mean_flow", "train_shortcut", "forward_batch1", "forward_batch", "sample_1_step", "sample_128_steps", "inception", "vae_decode"];
const ROW_KEYS: [&str; 12] = ["unit", "better", "flowmap", "pytorch_eager", "pytorch_compiled", "ratio_eager", "ratio_compiled", "flowmap_peak_gb", "pytorch_peak_gb", "flowmap_mfu", "pytorch_mfu", "flowmap_batch"];

#[test]
fn quick_gpu_check_runs_every_section_and_compares_one_network() {
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let run = Command::new(root().join("scripts/gpu_check.sh")).arg("--quick").arg(out.path()).env("PYTHON", python()).env("FLOWMAP_BIN", env!("CARGO_BIN_EXE_flowmap")).env_remove("FLOWMAP_INCEPTION").output().expect("running scripts/gpu_check.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    eprintln!("gpu_check.sh --quick took {:.1} s", started.elapsed().as_secs_f64());
    assert!(run.status.success(), "gpu_check.sh --quick failed ({:?})", run.status);

    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap()).unwrap();
    for key in KEYS {
        at(&report, key);
    }
    assert_eq!(at(&report, "schema"), "flowmap-gpu-check/1");
    assert_eq!(at(&report, "mode"), "quick");
    assert_eq!(at(&report, "failures"), &Value::Array(vec![]), "failures");
    assert_eq!(at(&report, "pass"), &Value::Bool(true));

    // The side-by-side compares one network: equal parameter counts, the same forward.
    let par = at(&report, "parity");
    let (ours, theirs) = (num(par, "parameters_flowmap"), num(par, "parameters_pytorch"));
    let diff = num(par, "forward_max_abs_diff");
    let scale = num(par, "forward_max_abs_output");
    eprintln!(
        "parity: {ours} parameters in flowmap, {theirs} in the PyTorch reference; forward max |diff| {diff:.3e} (outputs up to {scale:.3}), math path {:.3e}, JVP tangent {:.3e}, VAE decode {:.3e}",
        num(par, "forward_math_max_abs_diff"),
        num(par, "jvp_tangent_max_abs_diff"),
        num(par, "vae_decode_max_abs_diff")
    );
    assert_eq!(ours, theirs);
    assert_eq!(ours, 201_744.0, "the quick DiT (depth 2, width 64, patch 2, 4×8×8, 10 classes)");
    assert!(scale > 0.1, "parity outputs must not be trivially zero: {scale}");
    assert!(diff <= 1e-5 * scale, "forward max |diff| {diff}");
    assert!(num(par, "jvp_tangent_max_abs_diff") <= 1e-4 * scale);
    assert_eq!(at(par, "vae_parameters_equal"), &Value::Bool(true));
    assert!(num(par, "vae_decode_max_abs_diff") < 1e-4);
    assert_eq!(num(&report, "model.parameters_pytorch"), ours, "the benchmarked reference is the same size");

    // Every throughput row has every column, and both sides measured every eager row.
    for row in ROWS {
        let r = at(&report, &format!("throughput.{row}"));
        for k in ROW_KEYS {
            at(r, k);
        }
        let (f, e) = (num(r, "flowmap"), num(r, "pytorch_eager"));
        assert!(f > 0.0 && e > 0.0 && (num(r, "ratio_eager") - f / e).abs() < 1e-9 * f / e, "{row}: {r}");
    }
    for row in ["train_flow_matching", "train_shortcut", "forward_batch", "forward_batch1", "sample_1_step", "sample_128_steps"] {
        assert!(num(&report, &format!("throughput.{row}.pytorch_compiled")) > 0.0, "{row}: compiled (trace-only backend in quick mode)");
    }
    assert_eq!(num(&report, "throughput.train_flow_matching.flowmap_batch"), 32.0);
    let mf = num(&report, "meanflow_over_flow_matching.flowmap");
    assert!(mf > 1.0, "a MeanFlow step costs more than a flow-matching step: {mf}");
    assert_eq!(num(&report, "sampler.host_syncs_long"), 0.0);

    let checks = at(&report, "checks").as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["bf16_vs_f32", "fused_adamw", "jvp_finite_differences", "sampler_host_syncs"]);
    for c in checks {
        assert_eq!(c["pass"], Value::Bool(true), "{c}");
    }
    assert!(num(&checks[2], "value.rel_err") < 1e-6);
    assert!(num(&checks[1], "value.max_update") > 1e-3, "AdamW moved the parameters");

    let rows = at(&report, "mnist.rows").as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["objective"].as_str().unwrap()).collect::<Vec<_>>(), ["flow_matching", "shortcut", "mean_flow"]);
    for r in rows {
        assert_eq!(r["error"], Value::Null);
        assert_eq!(r["train_steps"], 2);
        let fid = num(r, "fid.1");
        assert!(fid.is_finite() && fid > 0.0, "{r}");
    }
    // The bundle's route to the FID weights (float16 copy, restored; FLOWMAP_INCEPTION) was taken.
    assert!(at(&report, "inception_weights").as_str().unwrap().contains("float16"), "{}", at(&report, "inception_weights"));
    let mnist_log = std::fs::read_to_string(out.path().join("logs/flowmap_mnist.log")).unwrap();
    assert!(mnist_log.contains("Inception weights from FLOWMAP_INCEPTION="), "the MNIST FID used another Inception file");
    let plot = out.path().join(at(&report, "mnist.plot_png").as_str().unwrap());
    assert!(plot.exists() && std::fs::metadata(&plot).unwrap().len() > 1000, "{}", plot.display());
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    for section in ["## Same network", "## Throughput and memory", "## Correctness on the device", "## Real data: MNIST", "| MeanFlow (official) |"] {
        assert!(md.contains(section), "report.md lacks {section:?}");
    }

    // Negative control 1: the report fails when a check fails.
    let checks_file = out.path().join("flowmap_checks.json");
    let text = std::fs::read_to_string(&checks_file).unwrap();
    std::fs::write(&checks_file, text.replacen("\"pass\": true", "\"pass\": false", 1)).unwrap();
    let rerun = python_ref(&["report", out.path().to_str().unwrap()]);
    assert_eq!(rerun.status.code(), Some(1), "a failed check must fail the report");
    let failed: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap()).unwrap();
    assert!(failed["failures"].as_array().unwrap().iter().any(|f| f.as_str().unwrap().starts_with("check bf16_vs_f32")), "{}", failed["failures"]);
}

#[test]
fn parity_detects_different_weights() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let fm_json = dir.path().join("flowmap_parity.json");
    let st = Command::new(env!("CARGO_BIN_EXE_flowmap")).args(["gpu-check", "parity", "--quick", "--device", "cpu", "--work", work.to_str().unwrap(), "--out", fm_json.to_str().unwrap()]).env("OMP_NUM_THREADS", "1").status().unwrap();
    assert!(st.success());
    // One weight of one block moved by 0.01: the reference must see a different network.
    let weights = work.join("dit.safetensors");
    let mut tensors = Tensor::read_safetensors(&weights).unwrap();
    let w = tensors.iter_mut().find(|(k, _)| k == "blocks.1.mlp.fc2.weight").expect("blocks.1.mlp.fc2.weight");
    w.1 = &w.1 + 0.01;
    Tensor::write_safetensors(&tensors, &weights).unwrap();
    let out = dir.path().join("pytorch_parity.json");
    let run = python_ref(&["parity", "--device", "cpu", "--flowmap-json", fm_json.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    eprintln!("{}", String::from_utf8_lossy(&run.stdout));
    assert_eq!(run.status.code(), Some(1), "tampered weights must fail: {}", String::from_utf8_lossy(&run.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["dit"]["parameters_equal"], Value::Bool(true));
    assert!(v["dit"]["forward_fused"]["max_abs_diff"].as_f64().unwrap() > 1e-3);
    assert_eq!(v["vae"]["pass"], Value::Bool(true), "the VAE was not touched");
}
