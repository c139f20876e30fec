//! Checkpoints across PyTorch and flowmap, both ways (tests/python/dit_interop.py, python/):
//! a randomly initialised PyTorch DiT-S/2 state dict in the facebookresearch/DiT naming goes
//! through `flowmap import-checkpoint` and gives the PyTorch outputs in flowmap; a flowmap run's
//! DiT, rebuilt in PyTorch by python/flowmap_dit.py from its config.toml and safetensors, gives
//! flowmap's outputs. Every layer is random (no zero-initialised layer hides a wrong name).
use flowmap_experiments::cli::import_checkpoint::python;
use flowmap_experiments::eval::fid::stats::{read_array, write_npz};
use flowmap_experiments::eval::sampling::Weights;
use flowmap_experiments::run::checkpoint::{CheckpointContents, CheckpointDir};
use flowmap_experiments::run::model::{load_run_weights, ModelConfig};
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn helper(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/dit_interop.py");
    let out = Command::new(python()).arg(&script).args(args).output().expect("running the venv's python");
    assert!(out.status.success(), "{script:?} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn flowmap(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flowmap")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn array(path: &Path, name: &str) -> Tensor {
    let mut npz = npyz::npz::NpzArchive::open(path).unwrap();
    read_array(&mut npz, name, path).unwrap().unwrap_or_else(|| panic!("{name} in {}", path.display()))
}

fn rel_max(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

#[test]
fn a_pytorch_dit_s2_state_dict_imports_and_gives_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let count: usize = helper(&["make-dit", d.to_str().unwrap()]).trim().parse().unwrap();
    let run = d.join("imported");
    let out = flowmap(&["import-checkpoint", d.join("dit.pt").to_str().unwrap(), "--source", "dit", "--out", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("import.json")).unwrap()).unwrap();
    assert_eq!(report["tensors"].as_u64().unwrap() as usize, count, "every tensor of the state dict is used");
    assert_eq!(report["name_map"].as_object().unwrap().len(), count);

    let table = flowmap_experiments::config::overrides::read_table(&run.join("model.toml")).unwrap();
    let model: ModelConfig = table["model"].clone().try_into().unwrap();
    let ModelConfig::Dit(cfg) = &model else { panic!("a DiT") };
    assert_eq!((cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.num_classes, cfg.out_channels(), cfg.t_scale), (12, 384, 6, 2, 1000, 8, 1000.0));
    let net = load_run_weights(&run, &model, Weights::Ema, Device::Cpu).unwrap();
    let io = d.join("io.npz");
    let (x, t, y, want) = (array(&io, "x").to_kind(Kind::Float), array(&io, "t"), array(&io, "y").to_kind(Kind::Int64), array(&io, "out"));
    // DiT's step index n is flowmap's t = n/1000 with t_scale = 1000.
    let t = (t / 1000.0).to_kind(Kind::Float);
    let got = tch::no_grad(|| net.net.forward(&x, &t, &t.zeros_like(), &y)).to_kind(Kind::Double);
    assert_eq!(got.size(), [3, 8, 32, 32]);
    let err = rel_max(&got, &want);
    eprintln!("imported DiT-S/2 ({} parameters): flowmap vs PyTorch max |diff| / max |out| = {err:.2e} (max |out| {:.3})", net.num_parameters(), want.abs().max().double_value(&[]));
    assert!(err < 1e-5, "{err}");

    // A state dict that does not fit is refused, naming the first tensor that does not.
    let mut tensors = Tensor::read_safetensors(run.join("checkpoints/step_00000000/ema.safetensors")).unwrap();
    let i = tensors.iter().position(|(n, _)| n == "blocks.3.mlp.fc1.bias").unwrap();
    tensors[i].1 = Tensor::zeros([7], (Kind::Float, Device::Cpu));
    let bad = d.join("bad.safetensors");
    Tensor::write_safetensors(&tensors, &bad).unwrap();
    let out = flowmap(&["import-checkpoint", bad.to_str().unwrap(), "--out", d.join("bad").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("blocks.3.mlp.fc1.bias") && err.contains("[7]"), "{err}");
    tensors.retain(|(n, _)| n != "blocks.3.mlp.fc1.bias");
    tensors.push(("blocks.3.mlp.typo.bias".into(), Tensor::zeros([1536], (Kind::Float, Device::Cpu))));
    Tensor::write_safetensors(&tensors, &bad).unwrap();
    let out = flowmap(&["import-checkpoint", bad.to_str().unwrap(), "--out", d.join("bad2").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("blocks.3.mlp.typo.bias"), "{err}");
}

#[test]
fn a_pytorch_sit_s2_imports_as_a_flowmap_velocity_field() {
    // SiT: x = t_SiT·data + (1 − t_SiT)·noise, output d x/d t_SiT. flowmap: t = 1 − t_SiT, v = −that.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    helper(&["make-sit", d.to_str().unwrap()]);
    let run = d.join("imported");
    let out = flowmap(&["import-checkpoint", d.join("sit.pt").to_str().unwrap(), "--source", "sit", "--out", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let table = flowmap_experiments::config::overrides::read_table(&run.join("model.toml")).unwrap();
    let model: ModelConfig = table["model"].clone().try_into().unwrap();
    let ModelConfig::Dit(cfg) = &model else { panic!("a DiT") };
    assert_eq!((cfg.out_channels(), cfg.t_scale), (4, 1.0), "a plain velocity field with raw t");
    let net = load_run_weights(&run, &model, Weights::Ema, Device::Cpu).unwrap();
    let io = d.join("sit_io.npz");
    let (x, t_sit, y, sit_out) = (array(&io, "x").to_kind(Kind::Float), array(&io, "t"), array(&io, "y").to_kind(Kind::Int64), array(&io, "out"));
    let t = (t_sit.neg() + 1.0).to_kind(Kind::Float);
    let v = tch::no_grad(|| net.net.forward(&x, &t, &t.zeros_like(), &y)).to_kind(Kind::Double);
    let err = rel_max(&v, &(-&sit_out));
    eprintln!("imported SiT-S/2: flowmap v(x, 1 - t_SiT) vs -SiT(x, t_SiT): max |diff| / max |out| = {err:.2e} (max |out| {:.3})", sit_out.abs().max().double_value(&[]));
    assert!(err < 1e-5, "{err}");
    assert!(rel_max(&v, &sit_out) > 1.0, "the sign is flowmap's, not SiT's");
}

#[test]
fn a_flowmap_run_rebuilt_in_pytorch_gives_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // A flow-map DiT with an h-embedder and raw t (flowmap's defaults), on 28x28x1 with 10 classes.
    let table: toml::Table = toml::from_str("[model]\nkind = \"dit\"\ndepth = 2\nhidden_size = 64\nnum_heads = 4\npatch_size = 4\nin_channels = 1\ninput_size = 28\nnum_classes = 10\n").unwrap();
    let model: ModelConfig = table["model"].clone().try_into().unwrap();
    let net = model.build(Device::Cpu).unwrap();
    tch::manual_seed(3);
    tch::no_grad(|| {
        for (name, t) in net.named() {
            if name != "pos_embed" {
                t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.05));
            }
        }
    });
    let named = net.named();
    let state = serde_json::to_value(flowmap_experiments::run::state::TrainerState::default()).unwrap();
    CheckpointDir::new(run.join("checkpoints"), 1).save(5, &CheckpointContents { tensors: vec![("model", named.iter().map(|(n, t)| (n.clone(), t * 0.0)).collect()), ("ema", named)], state }).unwrap();
    let mut config = toml::Table::new();
    config.insert("model".into(), toml::Value::try_from(&model).unwrap());
    std::fs::write(run.join("config.toml"), toml::to_string(&config).unwrap()).unwrap();

    let x = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0.0f32, 0.25, 0.7, 1.0]);
    let h = Tensor::from_slice(&[0.0f32, 0.25, 0.1, 0.5]);
    let class = Tensor::from_slice(&[0i64, 9, 10, 4]);
    let want = tch::no_grad(|| net.net.forward(&x, &t, &h, &class));
    let io = dir.path().join("io.npz");
    write_npz(&io, &[("x", &x), ("t", &t), ("h", &h), ("class", &class.to_kind(Kind::Double))]).unwrap();
    helper(&["run-flowmap", run.to_str().unwrap(), io.to_str().unwrap(), dir.path().join("out.npz").to_str().unwrap()]);
    let got = array(&dir.path().join("out.npz"), "out");
    let err = rel_max(&got, &want.to_kind(Kind::Double));
    let scale = want.abs().max().double_value(&[]);
    eprintln!("flowmap run rebuilt in PyTorch (python/flowmap_dit.py): max |diff| / max |out| = {err:.2e} (max |out| {scale:.3})");
    assert!(scale > 0.1, "a random network's output is not ~0: {scale}");
    assert!(err < 1e-5, "{err}");
}
