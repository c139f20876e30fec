//! Bad user input through the real `flowmap` binary (issue 10): every out-of-range config value
//! (via `--set` on the tiny config) and every out-of-range argument of `sample`, `fid`,
//! `reflow-pairs` and `latents` exits non-zero, names the key or argument, does not panic, and
//! creates no run directory (or output) first.
mod cli_support;
mod paper_support;
use cli_support::flowmap_ok;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

/// `flowmap ARGS`, killed after `limit` (a validation error must come at once: `latents
/// --image-size 0` used to loop forever).
fn flowmap_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowmap")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("running the flowmap binary");
    let t0 = Instant::now();
    while child.try_wait().expect("waiting for flowmap").is_none() {
        if t0.elapsed() > limit {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!("flowmap {args:?} still running after {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Runs `flowmap ARGS` and checks it failed cleanly with every one of `names` in stderr.
fn refused(args: &[&str], names: &[&str]) -> String {
    let out = flowmap_within(args, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "flowmap {args:?} succeeded; stdout:\n{}\nstderr:\n{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("panicked"), "flowmap {args:?} panicked:\n{stderr}");
    for n in names {
        assert!(stderr.contains(n), "flowmap {args:?}: stderr does not name {n:?}:\n{stderr}");
    }
    stderr
}

/// Entries of a folder (empty if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

/// Each bad value, set on the tiny config, with the key the error must name. `run.out_dir` and
/// `--run-dir` point into a fresh folder, which must stay empty.
#[test]
fn bad_config_values_are_refused_naming_the_key_before_any_run_directory() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["ema.decay=2"], &["ema.decay", "[0, 1]"]),
        (&["ema.decay=nan"], &["ema.decay"]),
        (&["ema.decay=-0.5"], &["ema.decay"]),
        (&["run.threads=0"], &["run.threads", ">= 1"]),
        (&["run.threads=-2"], &["run.threads"]),
        (&["run.name=\"\""], &["run.name"]),
        (&["run.name=a/b"], &["run.name"]),
        (&["run.name=.."], &["run.name"]),
        (&["run.name=."], &["run.name"]),
        (&["run.steps=0"], &["run.steps", ">= 1"]),
        (&["run.batch_size=0"], &["run.batch_size"]),
        (&["run.batch_size=-4"], &["run.batch_size"]),
        (&["run.batch_size=300"], &["run.batch_size", "data.limit"]),
        (&["run.log_every=0"], &["run.log_every"]),
        (&["run.keep_checkpoints=0"], &["run.keep_checkpoints"]),
        (&["optimizer.lr=-1e-3"], &["optimizer.lr", "> 0"]),
        (&["optimizer.lr=0"], &["optimizer.lr"]),
        (&["optimizer.lr=nan"], &["optimizer.lr"]),
        (&["optimizer.lr=inf"], &["optimizer.lr"]),
        (&["optimizer.grad_clip=-1.0"], &["optimizer.grad_clip", "> 0"]),
        (&["optimizer.grad_clip=0.0"], &["optimizer.grad_clip"]),
        (&["optimizer.grad_clip=nan"], &["optimizer.grad_clip"]),
        (&["optimizer.betas=[0.9, 1.0]"], &["optimizer.betas[1]", "[0, 1)"]),
        (&["optimizer.betas=[1.5, 0.999]"], &["optimizer.betas[0]"]),
        (&["optimizer.betas=[-0.1, 0.999]"], &["optimizer.betas[0]"]),
        (&["optimizer.eps=0.0"], &["optimizer.eps", "> 0"]),
        (&["optimizer.eps=-1e-8"], &["optimizer.eps"]),
        (&["optimizer.weight_decay=-0.1"], &["optimizer.weight_decay"]),
        (&["optimizer.weight_decay=nan"], &["optimizer.weight_decay"]),
        (&["sampling.cfg_scale=nan"], &["sampling.cfg_scale", "finite"]),
        (&["sampling.cfg_scale=inf"], &["sampling.cfg_scale"]),
        (&["sampling.steps=[0]"], &["sampling.steps"]),
        (&["sampling.steps=[]"], &["sampling.steps"]),
        (&["sampling.grid_images=0"], &["sampling.grid_images"]),
        (&["data.limit=0"], &["data.limit", ">= 1"]),
        (&["data.limit=70000"], &["data.limit", "60000"]),
        (&["eval.num_samples=1"], &["eval.num_samples", ">= 2"]),
        (&["eval.num_samples=100", "eval.batch=0"], &["eval.batch"]),
        (&["eval.num_samples=100", "eval.steps=[0]"], &["eval.steps"]),
        (&["eval.num_samples=100", "eval.reference.num_images=1"], &["eval.reference.num_images"]),
        (&["objective.label_dropout=1.5"], &["[objective]", "label_dropout", "[0, 1]"]),
        (&["objective.flow_h=nan"], &["[objective]", "flow_h"]),
        (&["objective.times.kind=logit_normal", "objective.times.std=0.0"], &["[objective]", "std"]),
        (&["model.hidden_size=30"], &["model", "hidden_size"]),
        (&["model.mlp_ratio=inf"], &["model", "mlp_ratio"]),
        (&["model.input_size=0"], &["input_size"]),
        (&["teacher.run=\"\""], &["teacher.run"]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("runs");
    let run_dir = dir.path().join("run");
    let out_set = format!("run.out_dir={:?}", out_dir.display().to_string());
    let tiny = tiny();
    // Every other case names the run directory with --run-dir (one process per case: 2 cores).
    for (i, (sets, names)) in cases.iter().enumerate() {
        let mut args = vec!["train", tiny.to_str().unwrap(), "--set", &out_set];
        for s in *sets {
            args.extend(["--set", s]);
        }
        if i % 2 == 1 {
            args.extend(["--run-dir", run_dir.to_str().unwrap()]);
        }
        refused(&args, names);
        assert!(!out_dir.exists() && !run_dir.exists(), "flowmap {args:?} created a run directory: {:?}", entries(dir.path()));
    }
    // The dry run refuses the same values.
    refused(&["train", tiny.to_str().unwrap(), "--set", "ema.decay=2", "--dry-run"], &["ema.decay"]);
}

/// Bad arguments of the commands that read a trained run (one tiny run, 2 steps): nothing is
/// written into the run (or the output folder) before the error.
#[test]
fn bad_sample_fid_and_reflow_arguments_are_refused_naming_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    flowmap_ok(&["train", tiny().to_str().unwrap(), "--run-dir", r, "--set", "run.steps=2", "--set", "run.log_every=1", "--set", "sampling.steps=[1]"]);
    let before = entries(&run);
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["sample", "--run", r, "--steps", "0"], &["--steps", ">= 1"]),
        (&["sample", "--run", r, "--steps", "1,0"], &["--steps"]),
        (&["sample", "--run", r, "--num", "0"], &["--num", ">= 1"]),
        (&["sample", "--run", r, "--num=-3"], &["--num"]),
        (&["sample", "--run", r, "--cfg-scale", "nan"], &["--cfg-scale", "finite"]),
        (&["sample", "--run", r, "--cfg-scale", "inf"], &["--cfg-scale"]),
        (&["sample", "--run", r, "--class", "10"], &["--class", "0..=9"]),
        (&["sample", "--run", r, "--class=-1"], &["--class"]),
        (&["sample", "--run", r, "--num", "0", "--out", o], &["--num"]),
        (&["fid", "--run", r, "--steps", "0"], &["--steps", ">= 1"]),
        (&["fid", "--run", r, "--steps", "1", "--num-samples", "1"], &["--num-samples", ">= 2"]),
        (&["fid", "--run", r, "--steps", "1", "--num-samples", "0"], &["--num-samples"]),
        (&["fid", "--run", r, "--steps", "1", "--ref-images", "1"], &["--ref-images", ">= 2"]),
        (&["reflow-pairs", "--teacher", r, "--count", "0"], &["--count", ">= 1"]),
        (&["reflow-pairs", "--teacher", r, "--count", "4", "--steps", "0"], &["--steps"]),
        (&["reflow-pairs", "--teacher", r, "--count", "4", "--batch", "0"], &["--batch"]),
        (&["reflow-pairs", "--teacher", r, "--count", "4", "--batch=-1", "--out", o], &["--batch"]),
    ];
    for (args, names) in cases {
        refused(args, names);
        assert_eq!(entries(&run), before, "flowmap {args:?} wrote into the run");
        assert!(!out.exists(), "flowmap {args:?} created its output folder");
    }
    // The same run samples fine with good arguments (the failures above are the arguments').
    flowmap_ok(&["sample", "--run", r, "--steps", "1", "--num", "2", "--cfg-scale", "1.5", "--class", "3", "--out", o]);
    assert!(out.join("steps1.png").is_file());
}

/// `flowmap latents` with bad sizes and counts fails at once (no VAE weights are even needed),
/// naming the argument, and writes no output folder.
#[test]
fn bad_latents_arguments_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("images");
    paper_support::class_folder(&src, 1, 1, 16);
    let out = dir.path().join("latents");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let cases: &[(&[&str], &[&str])] = &[
        (&["--image-size", "0"], &["--image-size", "multiple of the VAE's downsampling factor 8"]),
        (&["--image-size", "4"], &["--image-size"]),
        (&["--image-size", "260"], &["--image-size", "260"]),
        (&["--shard-size", "0"], &["--shard-size", ">= 1"]),
        (&["--batch", "0"], &["--batch", ">= 1"]),
        (&["--workers", "0"], &["--workers", ">= 1"]),
    ];
    for (extra, names) in cases {
        let mut args = vec!["latents", "--source", s, "--out", o, "--device", "cpu", "--vae", "/nonexistent/vae.safetensors"];
        args.extend_from_slice(extra);
        let t0 = Instant::now();
        refused(&args, names);
        assert!(t0.elapsed() < Duration::from_secs(60));
        assert!(!out.exists(), "flowmap {args:?} created {o}");
    }
    // Both spellings of the layout parse (the config spelling is an alias); they then fail on the
    // missing VAE weights, not on the argument.
    for layout in ["class-folders", "class_folders"] {
        let err = refused(&["latents", "--source", s, "--out", o, "--layout", layout, "--device", "cpu", "--vae", "/nonexistent/vae.safetensors"], &["/nonexistent/vae.safetensors"]);
        assert!(!err.contains("invalid value"), "{err}");
    }
}

/// Training checks the latent shards' sha256 against the manifest when it opens them (before it
/// only did with `--dry-run`): a damaged shard stops `train` with an error naming the file.
#[test]
fn training_refuses_a_latent_shard_whose_sha256_does_not_match() {
    use flowmap_experiments::data::image_folder::Layout;
    use flowmap_experiments::data::latents::{encode_folder, EncodeOptions, LatentDtype, VaeIdentity};
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("images");
    paper_support::flat_folder(&src, 4, 40);
    let lat = dir.path().join("latents");
    let opts = EncodeOptions { source: src, layout: Layout::Flat, out: lat.clone(), image_size: 32, dtype: LatentDtype::F32, flip: false, shard_size: 2, batch: 2, workers: 1, max_new_shards: None };
    // An 8× average-pooling stand-in encoder: (B, 3, 32, 32) → mean and std (B, 4, 4, 4).
    let mut encode = |x: &tch::Tensor| -> anyhow::Result<(tch::Tensor, tch::Tensor)> {
        let z = tch::Tensor::cat(&[x.shallow_clone(), x.mean_dim(1, true, tch::Kind::Float)], 1).avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>);
        Ok((z.shallow_clone(), z.abs() * 0.1 + 0.01))
    };
    let vae = VaeIdentity { weights: "fake".into(), sha256: "0".repeat(64), scale: 0.18215 };
    assert!(encode_folder(&opts, vae, vec![4, 4, 4], &mut encode).unwrap().complete);
    // Damage the last byte of shard 1 (its data, not its header: it still opens and reads).
    let shard = lat.join("shard_00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    *bytes.last_mut().unwrap() ^= 0xFF;
    std::fs::write(&shard, bytes).unwrap();
    let config = dir.path().join("latents.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"latents\"\nsteps = 2\nbatch_size = 2\ndevice = \"cpu\"\nthreads = 1\nout_dir = {runs:?}\n\n[data]\nkind = \"latents\"\npath = {lat:?}\nimage_size = 32\n\n\
             [model]\nkind = \"dit\"\ndepth = 1\nhidden_size = 32\nnum_heads = 2\npatch_size = 2\nin_channels = 4\ninput_size = 4\nnum_classes = 0\n\n\
             [objective]\nkind = \"flow_matching\"\n\n[optimizer]\nlr = 1e-3\n\n[sampling]\nrule = \"euler\"\nsteps = [1]\ngrid_images = 2\n",
            runs = dir.path().join("runs").display().to_string(),
            lat = lat.display().to_string()
        ),
    )
    .unwrap();
    // The dry run finds it (it always did) and training finds it with the same check.
    refused(&["train", config.to_str().unwrap(), "--dry-run"], &["shard_00001.safetensors", "sha256"]);
    let err = refused(&["train", config.to_str().unwrap()], &["shard_00001.safetensors", "sha256"]);
    assert!(!err.contains("shard_00000.safetensors"), "only the damaged shard is named:\n{err}");
}
