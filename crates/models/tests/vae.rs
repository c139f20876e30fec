//! AutoencoderKL: parity with diffusers' own AutoencoderKL (tests/python/vae_reference.py, which
//! installs diffusers from PyPI into the project venv when missing), the sd-vae-ft-mse parameter
//! count, weight files (fp16/bf16, legacy attention names, save round trip, errors that name the
//! file and the keys), the config and the FID decode helper.
use flowmap_models::{decode_for_fid, from_model_space, to_model_space, Vae, VaeConfig, SD_VAE_SCALE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// The parity tolerance in float32 (outputs are O(1)).
const PARITY_TOL: f64 = 1e-4;

/// The project venv's python (FLOWMAP_VENV, set by .cargo/config.toml), else `python3`.
fn python() -> PathBuf {
    std::env::var_os("FLOWMAP_VENV").map(PathBuf::from).or_else(|| option_env!("FLOWMAP_VENV").map(PathBuf::from)).map(|v| v.join("bin").join("python")).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("python3"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn max_abs(a: &Tensor) -> f64 {
    a.abs().max().double_value(&[])
}

/// The test VAE of vae_reference.py: three levels (32, 64, 64), two resnets per encoder level, 8 groups.
fn reference_config() -> VaeConfig {
    VaeConfig { block_out_channels: vec![32, 64, 64], layers_per_block: 2, norm_num_groups: 8, sample_size: 32, ..VaeConfig::default() }
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn write(path: &Path, tensors: &BTreeMap<String, Tensor>) {
    let named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    Tensor::write_safetensors(&named, path).unwrap();
}

/// Encodes and decodes fixed inputs; used to compare two VAEs bit for bit. The input is a fixed
/// function, not a draw from libtorch's global generator, which parallel tests share.
fn outputs(vae: &Vae) -> Vec<Tensor> {
    let x = (Tensor::arange(2 * 3 * 16 * 16, (Kind::Float, Device::Cpu)) * 0.37).sin().reshape([2, 3, 16, 16]);
    let (mean, std) = vae.encode_moments(&x);
    let decoded = vae.decode(&mean);
    vec![mean, std, decoded]
}

#[test]
fn matches_diffusers_autoencoder_kl() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/vae_reference.py");
    let out = Command::new(python()).arg(&script).arg(dir.path()).output().unwrap_or_else(|e| panic!("cannot run {} {script:?}: {e}; run scripts/setup.sh (make setup) or set FLOWMAP_VENV", python().display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        eprintln!("SKIPPED: {}", stderr.trim());
        return;
    }
    assert!(out.status.success(), "{script:?} failed ({}):\n{stderr}", out.status);
    let versions = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let weights = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let cfg = reference_config();
    let vae = Vae::load(&weights, &cfg, Device::Cpu).unwrap();
    let r = read(&dir.path().join("reference.safetensors"));

    let (mean, std) = vae.encode_moments(&r["x"]);
    let (mean_odd, std_odd) = vae.encode_moments(&r["x_odd"]);
    let decoded = vae.decode(&r["z"]);
    assert_eq!(mean.size(), [2, 4, 8, 8]);
    assert_eq!(mean_odd.size(), [1, 4, 7, 8]); // 30×34 → 15×17 → 7×8: pad (0, 1, 0, 1), 3×3 stride 2, no padding
    assert_eq!(decoded.size(), [2, 3, 32, 32]);
    let mut worst: f64 = 0.0;
    for (name, ours, theirs) in [("mean", &mean, "mean"), ("std", &std, "std"), ("mean_odd", &mean_odd, "mean_odd"), ("std_odd", &std_odd, "std_odd"), ("decoded", &decoded, "decoded")] {
        let err = max_abs_diff(ours, &r[theirs]);
        eprintln!("vae parity vs {versions}: {name:>8}: max |diff| {err:.2e} (max |ref| {:.3})", max_abs(&r[theirs]));
        assert!(err < PARITY_TOL, "{name}: max |diff| {err:.3e} >= {PARITY_TOL:e}");
        worst = worst.max(err);
    }
    eprintln!("vae parity vs {versions}: worst max |diff| {worst:.2e} (tolerance {PARITY_TOL:e})");

    // Vae::save writes exactly diffusers' keys and shapes, and the values it loaded.
    let saved = dir.path().join("saved.safetensors");
    vae.save(&saved).unwrap();
    let (ours, theirs) = (read(&saved), read(&weights));
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (k, t) in &theirs {
        assert_eq!(ours[k].size(), t.size(), "{k}");
        assert_eq!(max_abs_diff(&ours[k], t), 0.0, "{k}");
    }
}

/// stabilityai/sd-vae-ft-mse: 83,653,863 parameters (diffusers 0.42.1: encoder 34,163,592,
/// decoder 49,490,179, 248 state-dict entries); a 64×64 image encodes to 4×8×8 and decodes back.
#[test]
fn sd_vae_ft_mse_architecture() {
    tch::set_num_threads(1);
    let cfg = VaeConfig::sd_vae_ft_mse();
    assert_eq!(cfg.downsample_factor(), 8);
    assert_eq!(cfg.latent_shape(256, 256), [4, 32, 32]);
    let vae = Vae::random(&cfg, Device::Cpu, 0).unwrap();
    let named = vae.named_tensors();
    assert_eq!(named.len(), 248);
    let count = |prefix: &str| named.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, t)| t.numel() as i64).sum::<i64>();
    assert_eq!(count(""), 83_653_863);
    assert_eq!(count("encoder."), 34_163_592);
    assert_eq!(count("decoder."), 49_490_179);
    for key in [
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down_blocks.2.downsamplers.0.conv.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.3.resnets.2.conv2.bias",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ] {
        assert!(named.contains_key(key), "{key} missing");
    }
    assert!(!named.contains_key("encoder.down_blocks.3.downsamplers.0.conv.weight"));
    assert!(named.values().all(|t| !t.requires_grad()), "the VAE is frozen");

    let x = Tensor::rand([1, 3, 64, 64], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let (mean, std) = vae.encode_moments(&x);
    assert_eq!(mean.size(), [1, 4, 8, 8]);
    assert!(std.min().double_value(&[]) > 0.0);
    let images = vae.decode(&mean);
    assert_eq!(images.size(), [1, 3, 64, 64]);
    assert!(!images.requires_grad());
    assert!(images.isfinite().all().int64_value(&[]) == 1);
}

#[test]
fn save_round_trips_and_random_is_seeded() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaeConfig::tiny();
    let vae = Vae::random(&cfg, Device::Cpu, 3).unwrap();
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    vae.save(&path).unwrap();
    let loaded = Vae::load(&path, &cfg, Device::Cpu).unwrap();
    for (a, b) in outputs(&vae).iter().zip(outputs(&loaded).iter()) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    // PyTorch's default init: U(±1/√fan_in) for convs (conv_in: fan_in 3·3·3), GroupNorm 1 and 0.
    let named = vae.named_tensors();
    let (w, bound) = (&named["encoder.conv_in.weight"], 1.0 / 27f64.sqrt());
    assert!(max_abs(w) <= bound && max_abs(w) > 0.9 * bound, "conv_in init range {}", max_abs(w));
    let std = w.std(true).double_value(&[]);
    assert!((std - bound / 3f64.sqrt()).abs() < 0.15 * bound, "conv_in init std {std}");
    assert_eq!(max_abs_diff(&named["encoder.down_blocks.0.resnets.0.norm1.weight"], &Tensor::ones([32], (Kind::Float, Device::Cpu))), 0.0);
    assert_eq!(max_abs(&named["decoder.mid_block.attentions.0.group_norm.bias"]), 0.0);
    let again = Vae::random(&cfg, Device::Cpu, 3).unwrap();
    let other = Vae::random(&cfg, Device::Cpu, 4).unwrap();
    let w = "encoder.conv_in.weight";
    assert_eq!(max_abs_diff(&vae.named_tensors()[w], &again.named_tensors()[w]), 0.0);
    assert!(max_abs_diff(&vae.named_tensors()[w], &other.named_tensors()[w]) > 0.0);
}

/// Half-precision files load as float32 copies of the rounded values.
#[test]
fn fp16_and_bf16_files_load_as_f32() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaeConfig::tiny();
    let vae = Vae::random(&cfg, Device::Cpu, 5).unwrap();
    for kind in [Kind::Half, Kind::BFloat16] {
        let half: BTreeMap<String, Tensor> = vae.named_tensors().into_iter().map(|(k, t)| (k, t.to_kind(kind))).collect();
        let path = dir.path().join(format!("{kind:?}.safetensors"));
        write(&path, &half);
        let loaded = Vae::load(&path, &cfg, Device::Cpu).unwrap();
        for (k, t) in loaded.named_tensors() {
            assert_eq!(t.kind(), Kind::Float, "{k}");
            assert_eq!(max_abs_diff(&t, &half[&k].to_kind(Kind::Float)), 0.0, "{kind:?} {k}");
        }
    }
}

/// diffusers ≤ 0.13 files name the attention projections query/key/value/proj_attn; older
/// conversions store them as 1×1 convs (C, C, 1, 1). Both load to the same model.
#[test]
fn legacy_attention_names_load() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaeConfig::tiny();
    let vae = Vae::random(&cfg, Device::Cpu, 6).unwrap();
    let legacy: BTreeMap<String, Tensor> = vae
        .named_tensors()
        .into_iter()
        .map(|(k, t)| {
            let k = k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.").replace(".to_out.0.", ".proj_attn.");
            let t = if k.ends_with("query.weight") { t.reshape([t.size()[0], t.size()[1], 1, 1]) } else { t };
            (k, t)
        })
        .collect();
    assert!(legacy.contains_key("encoder.mid_block.attentions.0.proj_attn.weight"));
    let path = dir.path().join("legacy.safetensors");
    write(&path, &legacy);
    let loaded = Vae::load(&path, &cfg, Device::Cpu).unwrap();
    for (a, b) in outputs(&vae).iter().zip(outputs(&loaded).iter()) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
}

#[test]
fn bad_files_are_named_with_their_keys() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaeConfig::tiny();
    let vae = Vae::random(&cfg, Device::Cpu, 8).unwrap();
    let mut tensors = vae.named_tensors();
    tensors.remove("decoder.conv_out.bias");
    tensors.insert("encoder.extra.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)));
    tensors.insert("quant_conv.weight".into(), Tensor::zeros([8, 8, 3, 3], (Kind::Float, Device::Cpu)));
    let path = dir.path().join("broken.safetensors");
    write(&path, &tensors);
    let err = format!("{:#}", Vae::load(&path, &cfg, Device::Cpu).unwrap_err());
    eprintln!("{err}");
    for needle in [path.to_str().unwrap(), "1 missing, 1 unexpected, 1 shape mismatches", "missing: decoder.conv_out.bias", "unexpected: encoder.extra.weight", "quant_conv.weight: file [8, 8, 3, 3], model [8, 8, 1, 1]"] {
        assert!(err.contains(needle), "error lacks `{needle}`:\n{err}");
    }
    // The sd-vae-ft-mse config against a tiny file: the mismatch is reported, not a panic.
    let good = dir.path().join("tiny.safetensors");
    vae.save(&good).unwrap();
    let err = format!("{:#}", Vae::load(&good, &VaeConfig::sd_vae_ft_mse(), Device::Cpu).unwrap_err());
    assert!(err.contains("tiny.safetensors") && err.contains("missing") && err.contains("shape mismatch"), "{err}");
    // A file that is not safetensors, and one that does not exist.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let err = format!("{:#}", Vae::load(&junk, &cfg, Device::Cpu).unwrap_err());
    assert!(err.contains("junk.safetensors"), "{err}");
    let err = format!("{:#}", Vae::load(&dir.path().join("absent.safetensors"), &cfg, Device::Cpu).unwrap_err());
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn config_defaults_and_unknown_keys() {
    let cfg: VaeConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, VaeConfig::sd_vae_ft_mse());
    assert_eq!(cfg.scaling_factor, SD_VAE_SCALE);
    let small: VaeConfig = toml::from_str("block_out_channels = [32, 64]\nlayers_per_block = 1\nnorm_num_groups = 8").unwrap();
    assert_eq!(small, VaeConfig { sample_size: 256, ..VaeConfig::tiny() });
    assert!(toml::from_str::<VaeConfig>("block_out_channel = [32]").is_err(), "typo must be rejected");
    assert!(VaeConfig { norm_num_groups: 7, ..VaeConfig::tiny() }.validate().is_err());
    assert!(Vae::random(&VaeConfig { block_out_channels: vec![], ..VaeConfig::tiny() }, Device::Cpu, 0).is_err());
}

#[test]
fn model_space_and_fid_decode() {
    tch::set_num_threads(1);
    let z = Tensor::randn([3, 4, 4, 4], (Kind::Float, Device::Cpu));
    assert!(max_abs_diff(&from_model_space(&to_model_space(&z)), &z) < 1e-6);
    assert!(max_abs_diff(&to_model_space(&z), &(&z * 0.18215)) < 1e-7);
    let vae = Vae::random(&VaeConfig::tiny(), Device::Cpu, 9).unwrap();
    // Large latents so that some decoded pixels leave [-1, 1] and the clamp matters.
    let z_model = Tensor::randn([20, 4, 4, 4], (Kind::Float, Device::Cpu)) * 3.0;
    let images = decode_for_fid(&vae, &z_model);
    assert_eq!(images.size(), [20, 3, 8, 8]);
    let direct = vae.decode(&(&z_model / SD_VAE_SCALE));
    assert!(max_abs(&direct) > 1.0, "test latents should overflow [-1, 1]");
    assert!(max_abs_diff(&images, &direct.clamp(-1.0, 1.0)) < 1e-5);
    assert!(max_abs(&images) <= 1.0);
}
