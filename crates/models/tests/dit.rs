//! DiT: presets and parameter counts, adaLN-Zero output, attention paths, checkpoints, config.
mod common;

use common::{forward_ad_lock, inputs, max_abs_diff, randomise_zeros, tiny_config};
use flowmap_core::VelocityField;
use flowmap_models::{attention, preset_names, AttnPath, AttnScale, Dit, DitConfig, DitSpec, HEmbedding, Precision, Variance};
use tch::{nn, Device, Kind, Tensor};

fn trainable(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|v| v.numel() as i64).sum()
}

/// methods.md §16 / style.md §9: DiT-B/2 flow model on 4×32×32 latents, 1000 classes, with the
/// h-embedder. The frozen position table (256·768 = 196,608) is not counted.
#[test]
fn b2_parameter_counts_are_pinned() {
    let flow = DitConfig::b2();
    assert_eq!(flow.num_parameters(), 131_091_472);
    // DiT proper: no h-embedder (−787,968 = 256·768 + 768 + 768·768 + 768) and learned sigma
    // (+12,304: the final linear maps to 2·2²·4 = 32 channels instead of 16).
    let dit = DitConfig { h_embedding: HEmbedding::None, variance: Variance::Learned, ..DitConfig::b2() };
    assert_eq!(dit.num_parameters(), 130_315_808);
    // CelebA-HQ: K = 1, so the label table has 2 rows instead of 1001 (−999·768).
    assert_eq!(DitConfig { num_classes: 1, ..DitConfig::b2() }.num_parameters(), 130_324_240);
    // DiT's printed XL/2 count includes the 256·1152 position table: 674,834,720 + 294,912 = 675,129,632.
    let xl = DitConfig { h_embedding: HEmbedding::None, variance: Variance::Learned, ..DitConfig::xl2() };
    assert_eq!(xl.num_parameters(), 674_834_720);
    // The Shortcut level embedder has the same parameters as the continuous one.
    assert_eq!(DitConfig { h_embedding: HEmbedding::Log2Level, ..DitConfig::b2() }.num_parameters(), 131_091_472);
}

/// Every preset: the VarStore holds exactly `num_parameters()` trainable values, the output has
/// the input's shape, and it is exactly 0 at initialisation (adaLN-Zero). Small 8×8 inputs, one
/// sample; the trainable count does not depend on the input size.
#[test]
fn every_preset_builds_counts_and_outputs_zero() {
    let _lock = forward_ad_lock();
    // Flow model with h-embedder, 4×32×32 latents, 1000 classes (millions, methods.md §16).
    let expected: [(&str, i64); 15] = [
        ("S/2", 33_105_424),
        ("S/4", 33_142_336),
        ("S/8", 33_289_984),
        ("B/2", 131_091_472),
        ("B/4", 131_165_248),
        ("B/8", 131_460_352),
        ("M/2", 308_019_216),
        ("M/4", 308_117_568),
        ("M/8", 308_510_976),
        ("L/2", 459_137_040),
        ("L/4", 459_235_392),
        ("L/8", 459_628_800),
        ("XL/2", 676_440_592),
        ("XL/4", 676_551_232),
        ("XL/8", 676_993_792),
    ];
    assert_eq!(preset_names(), expected.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>());
    for (name, count) in expected {
        let cfg = DitConfig::preset(name).unwrap();
        assert_eq!(cfg.num_parameters(), count, "{name}: analytic count");
        // Building and running the big ones costs seconds and gigabytes: one patch size per big width.
        let build = matches!(name, "S/2" | "S/4" | "S/8" | "B/2" | "B/8" | "M/8" | "L/8" | "XL/8");
        if !build {
            continue;
        }
        let cfg = DitConfig { input_size: 8, ..cfg };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = cfg.init(vs.root()).unwrap();
        assert_eq!(trainable(&vs), count, "{name}: VarStore count");
        let (x, t, h, class) = inputs(&cfg, 1, Kind::Float);
        let out = tch::no_grad(|| net.forward(&x, &t, &h, &class));
        assert_eq!(out.size(), x.size(), "{name}: output shape");
        assert_eq!(out.abs().max().double_value(&[]), 0.0, "{name}: output at init");
    }
}

#[test]
fn learned_variance_doubles_output_channels_and_unconditional_has_one_row() {
    let cfg = DitConfig { variance: Variance::Learned, num_classes: 0, h_embedding: HEmbedding::None, ..tiny_config() };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Dit::new(&vs.root(), &cfg).unwrap();
    assert_eq!(net.null_class(), 0);
    assert_eq!(vs.variables()["y_embedder.embedding_table"].size(), vec![1, 64]);
    assert!(!vs.variables().keys().any(|k| k.starts_with("h_embedder")));
    assert_eq!(trainable(&vs), cfg.num_parameters());
    let (x, t, h, _) = inputs(&cfg, 2, Kind::Float);
    let class = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
    let out = tch::no_grad(|| net.forward(&x, &t, &h, &class));
    assert_eq!(out.size(), vec![2, 6, 8, 8]);
}

/// DiT's initialisation (methods.md §15.3): the zeroed layers, the std of the embeddings, the
/// Xavier bound of a linear and of the patch embedding, and the frozen position table.
#[test]
fn initialisation_follows_dit() {
    tch::manual_seed(0);
    let cfg = DitConfig { num_classes: 1000, ..DitConfig::arch(2, 256, 4, 2) };
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = cfg.init(vs.root()).unwrap();
    let vars = vs.variables();
    let max = |k: &str| vars[k].abs().max().double_value(&[]);
    let std = |k: &str| vars[k].std(true).double_value(&[]);
    for k in ["blocks.0.adaLN_modulation.1.weight", "blocks.1.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.linear.bias", "blocks.0.attn.qkv.bias"] {
        assert_eq!(max(k), 0.0, "{k}");
    }
    for k in ["y_embedder.embedding_table", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "h_embedder.mlp.0.weight"] {
        assert!((std(k) - 0.02).abs() < 0.002, "{k}: std {}", std(k));
    }
    // Xavier-uniform bound √(6/(fan_in + fan_out)): qkv is one (3D, D) matrix; patch embed fan-in C·p·p.
    let qkv_bound = (6.0f64 / (256.0 + 768.0)).sqrt();
    assert!(max("blocks.0.attn.qkv.weight") <= qkv_bound && max("blocks.0.attn.qkv.weight") > 0.95 * qkv_bound);
    let patch_bound = (6.0f64 / (16.0 + 256.0)).sqrt();
    assert!(max("x_embedder.proj.weight") <= patch_bound && max("x_embedder.proj.weight") > 0.9 * patch_bound);
    assert!(!vars["pos_embed"].requires_grad());
    // Token 0 sits at (0, 0): sin terms 0, cos terms 1. Token 1 is column 1 of row 0.
    let pos = &vars["pos_embed"];
    assert_eq!(pos.size(), vec![1, 256, 256]);
    assert_eq!(pos.get(0).get(0).slice(0, 0, 64, 1).abs().max().double_value(&[]), 0.0);
    assert_eq!(pos.get(0).get(0).slice(0, 64, 128, 1).min().double_value(&[]), 1.0);
    assert!((pos.get(0).get(1).double_value(&[0]) - 1f64.sin()).abs() < 1e-7);
    assert_eq!(pos.get(0).get(1).double_value(&[128]), 0.0); // row index 0 in the second half
}

/// The free attention function: fused SDPA and explicit matmul + softmax agree, for both scales.
#[test]
fn math_and_fused_attention_agree() {
    tch::manual_seed(1);
    let q = Tensor::randn([2, 4, 64, 32], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([2, 4, 64, 32], (Kind::Float, Device::Cpu));
    let v = Tensor::randn([2, 4, 64, 32], (Kind::Float, Device::Cpu));
    for scale in [AttnScale::InvSqrtHeadDim, AttnScale::InvHeadDim] {
        let s = scale.value(32);
        let diff = max_abs_diff(&attention(&q, &k, &v, s, AttnPath::Fused), &attention(&q, &k, &v, s, AttnPath::Math));
        eprintln!("attention {scale:?}: max |fused − math| = {diff:.3e}");
        assert!(diff < 1e-5, "{scale:?}: {diff}");
    }
}

/// The whole DiT: the automatic switch picks math inside a forward-AD level, and the output equals
/// the fused one; fused SDPA really has no forward derivative (the reason for the switch).
#[test]
fn dit_attention_switch_is_invisible() {
    let _lock = forward_ad_lock();
    tch::manual_seed(2);
    for attn_scale in [AttnScale::InvSqrtHeadDim, AttnScale::InvHeadDim] {
        let cfg = DitConfig { attn_scale, ..tiny_config() };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = cfg.init(vs.root()).unwrap();
        randomise_zeros(&vs, 0.1);
        let (x, t, h, class) = inputs(&cfg, 3, Kind::Float);
        assert_eq!(AttnPath::auto(), AttnPath::Fused);
        let fused = tch::no_grad(|| net.forward(&x, &t, &h, &class));
        let explicit_math = tch::no_grad(|| net.forward_with(&x, &t, &h, &class, AttnPath::Math));
        let auto_math = {
            let _level = flowmap_sys::DualLevel::enter().unwrap();
            assert_eq!(AttnPath::auto(), AttnPath::Math);
            tch::no_grad(|| net.forward(&x, &t, &h, &class))
        };
        let diff = max_abs_diff(&fused, &auto_math);
        eprintln!("dit {attn_scale:?}: max |fused − math| = {diff:.3e} (output max {:.3})", fused.abs().max().double_value(&[]));
        assert!(fused.abs().max().double_value(&[]) > 1e-2);
        assert!(diff < 1e-5, "{diff}");
        assert!(explicit_math.equal(&auto_math));
    }
    let level = flowmap_sys::DualLevel::enter().unwrap();
    let q = Tensor::randn([1, 2, 16, 8], (Kind::Float, Device::Cpu));
    let q_dual = level.make_dual(&q, &q.ones_like());
    let fused = Tensor::f_scaled_dot_product_attention(&q_dual, &q, &q, None::<Tensor>, 0.0, false, None, false);
    assert!(fused.is_err(), "fused SDPA accepted a forward-AD tangent; the math switch may no longer be needed");
}

/// Save to safetensors, load into a model initialised differently: bit-identical outputs.
#[test]
fn checkpoint_round_trip_is_bit_identical() {
    let _lock = forward_ad_lock();
    let cfg = tiny_config();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    randomise_zeros(&vs, 0.1);
    let (x, t, h, class) = inputs(&cfg, 4, Kind::Float);
    let before = tch::no_grad(|| net.forward(&x, &t, &h, &class));

    let file = std::env::temp_dir().join(format!("flowmap-models-dit-{}.safetensors", std::process::id()));
    vs.save(&file).unwrap();
    tch::manual_seed(4);
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let net2 = cfg.init(vs2.root()).unwrap();
    let fresh = tch::no_grad(|| net2.forward(&x, &t, &h, &class));
    assert!(!fresh.equal(&before));
    vs2.load(&file).unwrap();
    std::fs::remove_file(&file).ok();
    let after = tch::no_grad(|| net2.forward(&x, &t, &h, &class));
    assert!(after.equal(&before), "max diff {}", max_abs_diff(&after, &before));
}

/// Learned parameters move the output of a fresh model (gradients reach the zeroed layers).
#[test]
fn gradients_reach_every_trainable_variable_after_one_step() {
    let _lock = forward_ad_lock();
    tch::manual_seed(5);
    let cfg = tiny_config();
    let vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    randomise_zeros(&vs, 0.1);
    let (x, t, h, class) = inputs(&cfg, 4, Kind::Float);
    net.forward(&x, &t, &h, &class).square().mean(Kind::Float).backward();
    for (name, v) in vs.variables() {
        if v.requires_grad() {
            let g = v.grad();
            // Only the rows of the label table that appear in `class` get a gradient.
            if name != "y_embedder.embedding_table" {
                assert!(g.defined() && g.abs().max().double_value(&[]) > 0.0, "{name}: no gradient");
            }
        }
    }
}

#[test]
fn bf16_on_cpu_falls_back_to_f32() {
    let _lock = forward_ad_lock();
    tch::manual_seed(6);
    let cfg = DitConfig { precision: Precision::Bf16, ..tiny_config() };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    randomise_zeros(&vs, 0.1);
    assert_eq!(net.precision(), Precision::F32);
    let (x, t, h, class) = inputs(&cfg, 2, Kind::Float);
    let out = tch::no_grad(|| net.forward(&x, &t, &h, &class));
    assert_eq!(out.kind(), Kind::Float);
}

/// Presets plus overrides; without a preset the architecture must be complete.
#[test]
fn spec_resolves_presets_and_overrides() {
    let spec = DitSpec { preset: Some("B/2".into()), h_embedding: Some(HEmbedding::Log2Level), attn_scale: Some(AttnScale::InvHeadDim), num_classes: Some(1), ..Default::default() };
    let cfg = DitConfig::try_from(spec).unwrap();
    assert_eq!(cfg, DitConfig { h_embedding: HEmbedding::Log2Level, attn_scale: AttnScale::InvHeadDim, num_classes: 1, ..DitConfig::b2() });
    assert!(DitConfig::try_from(DitSpec { depth: Some(2), ..Default::default() }).is_err());
    assert!(DitConfig::try_from(DitSpec { preset: Some("B/3".into()), ..Default::default() }).is_err());
    assert!(DitConfig::try_from(DitSpec { preset: Some("S/2".into()), num_heads: Some(5), ..Default::default() }).is_err());
    let custom = DitSpec { depth: Some(2), hidden_size: Some(64), num_heads: Some(4), patch_size: Some(2), ..Default::default() };
    assert_eq!(DitConfig::try_from(custom).unwrap(), DitConfig::arch(2, 64, 4, 2));
}

/// `guidance_conditioning` (improved MeanFlow): three more timestep embedders, counted; output 0
/// at init; plain `forward` is ω = 1 on [0, 1]; the scale and both interval ends reach the output;
/// off by default (and then `forward_guidance` is `None`).
#[test]
fn guidance_conditioning_adds_scale_and_interval_inputs() {
    use flowmap_core::GuidanceInput;
    tch::manual_seed(3);
    assert!(!DitConfig::b2().guidance_conditioning);
    let plain_cfg = tiny_config();
    let cfg = DitConfig { guidance_conditioning: true, ..tiny_config() };
    assert_eq!(cfg.num_parameters() - plain_cfg.num_parameters(), 3 * (256 * 64 + 64 + 64 * 64 + 64));
    let vs = nn::VarStore::new(Device::Cpu);
    let net = cfg.init(vs.root()).unwrap();
    assert_eq!(trainable(&vs), cfg.num_parameters());
    assert!(net.takes_guidance());
    for k in ["omega_embedder.mlp.0.weight", "t_min_embedder.mlp.2.weight", "t_max_embedder.mlp.0.bias"] {
        assert!(vs.variables().contains_key(k), "{k}");
    }
    let (x, t, h, class) = inputs(&cfg, 3, Kind::Float);
    let g1 = GuidanceInput::constant(&t, 1.0, 0.0, 1.0);
    let at_init = tch::no_grad(|| net.forward_guidance(&x, &t, &h, &class, &g1).unwrap());
    assert_eq!(at_init.abs().max().double_value(&[]), 0.0);
    randomise_zeros(&vs, 0.1);
    let (plain, unguided) = tch::no_grad(|| (net.forward(&x, &t, &h, &class), net.forward_guidance(&x, &t, &h, &class, &g1).unwrap()));
    assert!(plain.equal(&unguided), "plain forward must be ω = 1 on [0, 1]");
    for (name, g) in [("scale", GuidanceInput::constant(&t, 4.0, 0.0, 1.0)), ("t_min", GuidanceInput::constant(&t, 1.0, 0.3, 1.0)), ("t_max", GuidanceInput::constant(&t, 1.0, 0.0, 0.7))] {
        let out = tch::no_grad(|| net.forward_guidance(&x, &t, &h, &class, &g).unwrap());
        assert!(max_abs_diff(&out, &plain) > 1e-4, "{name} does not reach the output");
    }
    // Without the option: no guidance input, no extra variables, the same output as before.
    let vs0 = nn::VarStore::new(Device::Cpu);
    let net0 = plain_cfg.init(vs0.root()).unwrap();
    assert!(!net0.takes_guidance());
    assert!(net0.forward_guidance(&x, &t, &h, &class, &g1).is_none());
    assert!(!vs0.variables().keys().any(|k| k.starts_with("omega_embedder")));
}
