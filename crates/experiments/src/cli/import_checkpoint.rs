//! `flowmap import-checkpoint`: a facebookresearch/DiT or SiT PyTorch checkpoint (a bare state
//! dict such as `DiT-XL-2-256x256.pt`, or a training checkpoint with `ema`/`model`) as a flowmap
//! run folder that `[teacher] run = "…"` (with `init_student = true` to fine-tune from it) and the
//! evaluation commands read:
//!
//! ```text
//! OUT/model.toml                                the [model] table of the network (inferred from the shapes)
//! OUT/checkpoints/step_00000000/{model,ema}.safetensors, trainer_state.json, MANIFEST
//! OUT/import.json                               source file, sha256, key, name map, parameter count
//! ```
//!
//! The venv's Python (torch) unpickles the `.pt` into safetensors (`python/import_checkpoint.py`);
//! a `.safetensors` input is read directly. The name map is then checked both ways: every source
//! tensor must map to a flowmap variable and every variable must receive a tensor of its shape; the
//! first mismatch is the error. flowmap's DiT uses the DiT state-dict names, so the map renames
//! nothing for DiT and SiT (its `models.py` keeps DiT's names); it is written out per tensor anyway.
//!
//! Conventions: DiT embeds the DDPM step index n = 0…999 (`t_scale = 1000`, flowmap's t = n/1000,
//! t = 0 data as in flowmap) and, with `learn_sigma`, outputs [eps, variance] (`variance =
//! "learned"`). SiT (its default Linear path with velocity prediction, `transport/path.py`
//! `ICPlan`) embeds a continuous t_SiT ∈ [0, 1] with data at t_SiT = 1 (x = t_SiT·x_data +
//! (1 − t_SiT)·noise) and predicts d x/d t_SiT = x_data − noise. In flowmap's convention (t = 1 −
//! t_SiT, data at 0) the same network predicts v = noise − x_data. Both changes are folded into the
//! weights exactly, so the import is a flowmap velocity field (`t_scale = 1`): the sinusoid of
//! 1 − t is a fixed rotation of the sinusoid of t per frequency ω (cos ω(1 − t) = cos ω·cos ωt +
//! sin ω·sin ωt, sin ω(1 − t) = sin ω·cos ωt − cos ω·sin ωt), which goes into the first Linear of
//! `t_embedder`; the output Linear is negated, and with `learn_sigma` only its first C channels
//! (SiT's `forward` drops the others) are kept.
use crate::run::checkpoint::{CheckpointContents, CheckpointDir};
use crate::run::model::ModelConfig;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// Whose checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// facebookresearch/DiT (`models.py`, DDPM step index, learn_sigma)
    Dit,
    /// willisma/SiT (same module names; continuous t with data at t = 1, converted on import)
    Sit,
}

#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// `.pt` / `.pth` (unpickled by the venv's torch) or `.safetensors`
    pub checkpoint: PathBuf,
    pub source: Source,
    /// auto | ema | model | none (the dict itself)
    pub key: String,
    /// let torch.load unpickle Python objects (training checkpoints' `args`): trusted files only
    pub allow_pickle: bool,
    /// attention heads (not in the weights); default from the DiT presets by width
    pub num_heads: Option<i64>,
    pub out: PathBuf,
}

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub source: Source,
    pub checkpoint: String,
    pub sha256: String,
    pub key: String,
    pub tensors: usize,
    pub parameters: i64,
    pub model: toml::Table,
    /// source name → flowmap name, every tensor
    pub name_map: BTreeMap<String, String>,
    /// source tensors whose values were converted (SiT), not only renamed
    pub transformed: Vec<String>,
    pub notes: Vec<String>,
}

/// The venv's python (FLOWMAP_VENV at run or build time), else `python3`.
pub fn python() -> PathBuf {
    std::env::var_os("FLOWMAP_VENV").map(PathBuf::from).or_else(|| option_env!("FLOWMAP_VENV").map(PathBuf::from)).map(|v| v.join("bin").join("python")).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("python3"))
}

/// The repository's `python/` folder (FLOWMAP_PYTHON_DIR overrides the one of the source tree this
/// binary was built from).
pub fn python_dir() -> PathBuf {
    std::env::var_os("FLOWMAP_PYTHON_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python"))
}

/// The flowmap name of a DiT/SiT state-dict entry (the two share DiT's layout), or None when it is
/// not part of that layout.
pub fn flowmap_name(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let ok = match parts.as_slice() {
        ["pos_embed"] => true,
        ["x_embedder", "proj", "weight" | "bias"] => true,
        ["t_embedder" | "h_embedder", "mlp", "0" | "2", "weight" | "bias"] => true,
        ["y_embedder", "embedding_table"] => true,
        ["blocks", i, rest @ ..] => i.parse::<usize>().is_ok() && matches!(rest, ["attn", "qkv" | "proj", "weight" | "bias"] | ["mlp", "fc1" | "fc2", "weight" | "bias"] | ["adaLN_modulation", "1", "weight" | "bias"]),
        ["final_layer", "linear", "weight" | "bias"] | ["final_layer", "adaLN_modulation", "1", "weight" | "bias"] => true,
        _ => false,
    };
    ok.then(|| name.to_string())
}

/// DiT's heads per width (S 384: 6, B 768: 12, L 1024: 16, XL 1152: 16).
fn preset_heads(width: i64) -> Option<i64> {
    match width {
        384 => Some(6),
        768 => Some(12),
        1024 | 1152 => Some(16),
        _ => None,
    }
}

fn shape(tensors: &BTreeMap<String, Tensor>, name: &str) -> Result<Vec<i64>> {
    Ok(tensors.get(name).with_context(|| format!("the checkpoint has no `{name}`: not a DiT/SiT state dict"))?.size())
}

/// The `[model]` table of the network the tensors describe.
pub fn infer_model(tensors: &BTreeMap<String, Tensor>, source: Source, num_heads: Option<i64>) -> Result<toml::Table> {
    let patch = shape(tensors, "x_embedder.proj.weight")?; // (D, C, p, p)
    ensure!(patch.len() == 4 && patch[2] == patch[3], "x_embedder.proj.weight has shape {patch:?}, expected (D, C, p, p)");
    let (d, c, p) = (patch[0], patch[1], patch[2]);
    let pos = shape(tensors, "pos_embed")?; // (1, T, D)
    let grid = (pos[1] as f64).sqrt().round() as i64;
    ensure!(pos.len() == 3 && grid * grid == pos[1] && pos[2] == d, "pos_embed has shape {pos:?}, expected (1, T, {d}) with T a square");
    let depth = tensors.keys().filter_map(|k| k.strip_prefix("blocks.")?.split('.').next()?.parse::<i64>().ok()).max().map_or(0, |m| m + 1);
    ensure!(depth >= 1, "the checkpoint has no transformer blocks");
    let table = shape(tensors, "y_embedder.embedding_table")?; // (K + 1, D)
    let fc1 = shape(tensors, "blocks.0.mlp.fc1.weight")?; // (M, D)
    let out = shape(tensors, "final_layer.linear.weight")?; // (p²·C_out, D)
    let c_out = out[0] / (p * p);
    let variance = match c_out {
        _ if c_out == c => "fixed",
        _ if c_out == 2 * c => "learned",
        _ => bail!("final_layer.linear.weight has {} rows: neither p²·C = {} nor p²·2C = {}", out[0], p * p * c, 2 * p * p * c),
    };
    let heads = match num_heads.or(preset_heads(d)) {
        Some(h) => h,
        None => bail!("width {d} is not a DiT preset's: give --num-heads (the weights do not say)"),
    };
    let mut m = toml::Table::new();
    m.insert("kind".into(), "dit".into());
    m.insert("depth".into(), depth.into());
    m.insert("hidden_size".into(), d.into());
    m.insert("num_heads".into(), heads.into());
    m.insert("patch_size".into(), p.into());
    m.insert("mlp_ratio".into(), (fc1[0] as f64 / d as f64).into());
    m.insert("in_channels".into(), c.into());
    m.insert("input_size".into(), (grid * p).into());
    m.insert("num_classes".into(), (table[0] - 1).into());
    m.insert("h_embedding".into(), if tensors.contains_key("h_embedder.mlp.0.weight") { "continuous" } else { "none" }.into());
    m.insert(
        "t_scale".into(),
        match source {
            Source::Dit => 1000.0,
            Source::Sit => 1.0,
        }
        .into(),
    );
    // SiT's learned-variance channels are dropped on import ([`sit_to_flowmap`]).
    m.insert("variance".into(), if source == Source::Sit { "fixed" } else { variance }.into());
    Ok(m)
}

/// SiT's time direction and output sign folded into its weights (module docs): the (D, 256) first
/// timestep Linear sees the sinusoid of 1 − t through a rotation per frequency, the output Linear
/// is negated and cut to the first `c` channels. Returns the names it changed.
pub fn sit_to_flowmap(tensors: &mut BTreeMap<String, Tensor>, c: i64, p: i64) -> Result<Vec<String>> {
    use flowmap_models::embedding::{MAX_PERIOD, TIMESTEP_FREQUENCIES};
    let half = TIMESTEP_FREQUENCIES / 2;
    let w = tensors.get("t_embedder.mlp.0.weight").context("the checkpoint has no `t_embedder.mlp.0.weight`")?.to_kind(Kind::Double); // (D, 256): [cos | sin]
    ensure!(w.size()[1] == TIMESTEP_FREQUENCIES, "t_embedder.mlp.0.weight has shape {:?}, expected (D, {TIMESTEP_FREQUENCIES})", w.size());
    let omega = (Tensor::arange(half, (Kind::Double, Device::Cpu)) * (-MAX_PERIOD.ln() / half as f64)).exp(); // (128,)
    let (cos, sin) = (omega.cos().unsqueeze(0), omega.sin().unsqueeze(0)); // (1, 128)
    let (wc, ws) = (w.narrow(1, 0, half), w.narrow(1, half, half));
    // W·[cos ω(1−t); sin ω(1−t)] = (Wc cos ω + Ws sin ω)·cos ωt + (Wc sin ω − Ws cos ω)·sin ωt
    let rotated = Tensor::cat(&[&wc * &cos + &ws * &sin, &wc * &sin - &ws * &cos], 1);
    tensors.insert("t_embedder.mlp.0.weight".into(), rotated.to_kind(Kind::Float));
    for (name, rows) in [("final_layer.linear.weight", true), ("final_layer.linear.bias", false)] {
        let t = tensors.get(name).with_context(|| format!("the checkpoint has no `{name}`"))?;
        let c_out = t.size()[0] / (p * p);
        // rows are (p, p, C_out) per token, channel fastest: keep channels < c
        let kept = match rows {
            true => t.reshape([p * p, c_out, -1]).narrow(1, 0, c).reshape([p * p * c, -1]),
            false => t.reshape([p * p, c_out]).narrow(1, 0, c).reshape([p * p * c]),
        };
        tensors.insert(name.into(), -kept);
    }
    Ok(vec!["t_embedder.mlp.0.weight".into(), "final_layer.linear.weight".into(), "final_layer.linear.bias".into()])
}

/// Reads the checkpoint's tensors (through the venv's torch for a pickle).
fn read_tensors(req: &ImportRequest, tmp: &Path) -> Result<(BTreeMap<String, Tensor>, String)> {
    let is_safetensors = req.checkpoint.extension().is_some_and(|e| e == "safetensors");
    let (path, key) = if is_safetensors {
        (req.checkpoint.clone(), "none".to_string())
    } else {
        let out = tmp.join("state_dict.safetensors");
        let script = python_dir().join("import_checkpoint.py");
        let mut cmd = Command::new(python());
        cmd.arg(&script).arg(&req.checkpoint).arg(&out).args(["--key", &req.key]);
        if req.allow_pickle {
            cmd.arg("--allow-pickle");
        }
        let o = cmd.output().with_context(|| format!("running {} {}", python().display(), script.display()))?;
        ensure!(o.status.success(), "reading {} with the venv's torch failed: {}", req.checkpoint.display(), String::from_utf8_lossy(&o.stderr).trim());
        let line: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| format!("{}: unexpected output {:?}", script.display(), String::from_utf8_lossy(&o.stdout)))?;
        (out, line["key"].as_str().unwrap_or("?").to_string())
    };
    let list = Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((list.into_iter().collect(), key))
}

/// Imports the checkpoint (see the module docs); refuses an `out` that already holds a run.
pub fn import_checkpoint(req: &ImportRequest) -> Result<ImportReport> {
    ensure!(!req.out.join("checkpoints").exists(), "{} already holds checkpoints; choose another --out", req.out.display());
    let tmp = tempfile::tempdir()?;
    let (mut source_tensors, key) = read_tensors(req, tmp.path())?;
    let model_table = infer_model(&source_tensors, req.source, req.num_heads)?;
    let transformed = match req.source {
        Source::Dit => vec![],
        Source::Sit => {
            let (c, p) = (model_table["in_channels"].as_integer().unwrap_or(0), model_table["patch_size"].as_integer().unwrap_or(0));
            sit_to_flowmap(&mut source_tensors, c, p)?
        }
    };
    let wrapped = toml::Table::from_iter([("model".to_string(), toml::Value::Table(model_table.clone()))]);
    let model: ModelConfig = crate::config::overrides::deserialize::<ModelWrapper>(&wrapped, "the inferred [model]")?.model;
    let net = model.build(Device::Cpu)?;
    let vars: BTreeMap<String, Tensor> = net.named().into_iter().collect();
    // Source → flowmap, checked both ways; the first mismatch (in name order) is the error.
    let mut name_map = BTreeMap::new();
    let mut mapped = BTreeMap::new();
    for (name, t) in &source_tensors {
        let Some(target) = flowmap_name(name) else { bail!("{}: tensor `{name}` {:?} is not part of the {:?} layout flowmap imports", req.checkpoint.display(), t.size(), req.source) };
        let Some(var) = vars.get(&target) else { bail!("{}: tensor `{name}` maps to `{target}`, which the inferred model has not", req.checkpoint.display()) };
        ensure!(var.size() == t.size(), "{}: `{name}` has shape {:?}, flowmap's `{target}` has {:?}", req.checkpoint.display(), t.size(), var.size());
        name_map.insert(name.clone(), target.clone());
        mapped.insert(target, t.to_kind(var.kind()));
    }
    if let Some(missing) = vars.keys().find(|k| !mapped.contains_key(*k)) {
        bail!("{}: no tensor for flowmap's `{missing}` (a checkpoint of another architecture?)", req.checkpoint.display());
    }
    let named: Vec<(String, Tensor)> = mapped.into_iter().collect();
    let state = serde_json::to_value(crate::run::state::TrainerState { flowmap_version: env!("CARGO_PKG_VERSION").into(), world_size: 1, micro_batches: 1, ..Default::default() })?;
    std::fs::create_dir_all(&req.out).with_context(|| format!("creating {}", req.out.display()))?;
    let mut model_file = toml::Table::new();
    model_file.insert("model".into(), toml::Value::Table(model_table.clone()));
    let header = format!("# Imported from {} by `flowmap import-checkpoint` ({:?}).\n", req.checkpoint.display(), req.source);
    crate::run::atomic_file::write_atomic(&req.out.join("model.toml"), (header + &toml::to_string(&model_file)?).as_bytes())?;
    CheckpointDir::new(req.out.join("checkpoints"), 1).save(0, &CheckpointContents { tensors: vec![("model", named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()), ("ema", named)], state })?;
    let mut notes = vec![];
    if req.source == Source::Sit {
        notes.push(format!("SiT's time direction (data at t = 1) and velocity sign were folded into {}: the import is a flowmap velocity field, data at t = 0 (learned-variance channels, if any, dropped)", transformed.join(", ")));
    }
    let report = ImportReport {
        source: req.source,
        checkpoint: req.checkpoint.display().to_string(),
        sha256: crate::data::cache::sha256_file(&req.checkpoint)?,
        key,
        tensors: name_map.len(),
        parameters: net.num_parameters(),
        model: model_table,
        name_map,
        transformed,
        notes,
    };
    crate::run::atomic_file::write_atomic(&req.out.join("import.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
    Ok(report)
}

/// `[model]` alone, for deserialising the inferred table with the config's own checks.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelWrapper {
    model: ModelConfig,
}
