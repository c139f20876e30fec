//! Config enums: every kind parses and builds, defaults, and typos are rejected.
use flowmap_core::time::{CtSchedule, DoublingSchedule, LogitNormalConfig, MeanFlowPairsConfig};
use flowmap_core::{GridSpacing, InterpolantConfig, NoParams, PairSamplerConfig, TimeSamplerConfig};
use tch::{Device, Tensor};

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, toml::de::Error> {
    toml::from_str(s)
}

#[test]
fn interpolant_kinds_parse_and_build() {
    let t = Tensor::from_slice(&[0.5f64]);
    for (src, alpha_half) in [
        ("kind = \"linear\"", 0.5),
        ("kind = \"linear_sigma_min\"", 0.5),
        ("kind = \"linear_sigma_min\"\nsigma_min = 0.001", 0.5),
        ("kind = \"vp_cosine\"", (0.508f64 / 1.008 * std::f64::consts::FRAC_PI_2).cos() / (0.008f64 / 1.008 * std::f64::consts::FRAC_PI_2).cos()),
        ("kind = \"vp_linear_beta\"", (-0.5f64 * 1000.0 * (1e-4 * 0.5 + 0.5 * 0.25 * (0.02 - 1e-4))).exp()),
        ("kind = \"ddpm_linear_beta\"\nsteps = 1000", f64::NAN),
        ("kind = \"trig_flow\"\nsigma_d = 1.0", std::f64::consts::FRAC_1_SQRT_2),
    ] {
        let cfg: InterpolantConfig = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        let path = cfg.build();
        let a = path.alpha(&t).double_value(&[0]);
        if alpha_half.is_finite() {
            assert!((a - alpha_half).abs() < 1e-14, "{src}: alpha(0.5) = {a}, expected {alpha_half}");
        }
        // Round trip through TOML.
        let back: InterpolantConfig = parse(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }
    assert_eq!(parse::<InterpolantConfig>("kind = \"linear\"").unwrap(), InterpolantConfig::Linear(NoParams {}));
}

#[test]
fn typos_are_rejected() {
    // A unit variant would accept these silently (serde #2123); NoParams rejects them.
    assert!(parse::<InterpolantConfig>("kind = \"linear\"\nsigma_mn = 1e-5").is_err());
    assert!(parse::<InterpolantConfig>("kind = \"linear_sigma_min\"\nsigma_mn = 1e-5").is_err());
    assert!(parse::<InterpolantConfig>("kind = \"cosine\"").is_err());
    assert!(parse::<TimeSamplerConfig>("kind = \"uniform\"\nbins = 3").is_err());
    assert!(parse::<TimeSamplerConfig>("kind = \"logit_normal\"\nmu = 0.0").is_err());
    assert!(parse::<PairSamplerConfig>("kind = \"mean_flow\"\nratio = 0.25").is_err());
    assert!(parse::<PairSamplerConfig>("kind = \"dyadic\"").is_err(), "max_level has no default");
    assert!(parse::<PairSamplerConfig>("kind = \"consistency\"\n[spacing]\nkind = \"uniform\"\nrho = 7\n[schedule]\nkind = \"fixed\"\npoints = 3").is_err());
}

#[test]
fn time_and_pair_kinds_parse_and_build() {
    let cfg: TimeSamplerConfig = parse("kind = \"logit_normal\"\nmean = -0.4\nstd = 1.0").unwrap();
    assert_eq!(cfg, TimeSamplerConfig::LogitNormal(LogitNormalConfig { mean: -0.4, std: 1.0 }));
    for src in ["kind = \"uniform\"", "kind = \"discrete_uniform\"\nbins = 128", "kind = \"ddpm_steps\""] {
        let cfg: TimeSamplerConfig = parse(src).unwrap();
        assert_eq!(cfg.build().sample(8, Device::Cpu).size(), [8]);
    }
    // MeanFlow defaults: equal_fraction 0.75 and logit-normal(-0.4, 1.0).
    let cfg: PairSamplerConfig = parse("kind = \"mean_flow\"").unwrap();
    assert_eq!(cfg, PairSamplerConfig::MeanFlow(MeanFlowPairsConfig::default()));
    let cfg: PairSamplerConfig = parse("kind = \"mean_flow\"\nequal_fraction = 0.5\n[times]\nkind = \"logit_normal\"\nmean = 0.0\nstd = 1.0").unwrap();
    let PairSamplerConfig::MeanFlow(m) = &cfg else { panic!() };
    assert_eq!(m.equal_fraction, 0.5);
    assert_eq!(cfg.build().sample(8, Device::Cpu).t.size(), [8]);
    let cfg: PairSamplerConfig = parse("kind = \"dyadic\"\nmax_level = 6").unwrap();
    assert_eq!(cfg.build().sample(7, Device::Cpu).t.size(), [7]);
    let cfg: PairSamplerConfig = parse("kind = \"consistency\"\n[spacing]\nkind = \"uniform\"\n[schedule]\nkind = \"doubling\"\nstages = 7\ntotal_steps = 700").unwrap();
    let PairSamplerConfig::Consistency(c) = &cfg else { panic!() };
    assert_eq!(c.spacing, GridSpacing::Uniform(NoParams {}));
    assert_eq!(c.schedule, CtSchedule::Doubling(DoublingSchedule { stages: 7, total_steps: 700 }));
    let cfg: PairSamplerConfig = parse("kind = \"consistency\"\n[spacing]\nkind = \"karras\"\n[schedule]\nkind = \"progressive\"\nstart_scales = 2\nend_scales = 200\ntotal_steps = 100").unwrap();
    assert_eq!(cfg.build().sample_at_step(4, 0, Device::Cpu).t.size(), [4]);
}

#[test]
fn out_of_range_values_fail_validation() {
    let bad: PairSamplerConfig = parse("kind = \"mean_flow\"\nequal_fraction = 75.0").unwrap();
    assert!(bad.validate().is_err());
    let bad: TimeSamplerConfig = parse("kind = \"logit_normal\"\nstd = -1.0").unwrap();
    assert!(bad.validate().is_err());
    let bad: InterpolantConfig = parse("kind = \"ddpm_linear_beta\"\nbeta_end = 1.5").unwrap();
    assert!(bad.validate().is_err());
}

#[test]
fn sampler_grid_and_diffusion_configs() {
    use flowmap_core::{Diffusion, DiffusionScale, TimeGrid};
    let g: TimeGrid = parse("kind = \"uniform\"\nsteps = 4").unwrap();
    assert_eq!(g.times(), [1.0, 0.75, 0.5, 0.25, 0.0]);
    g.validate().unwrap();
    let g: TimeGrid = parse("kind = \"list\"\ntimes = [1.0, 0.5, 0.0]").unwrap();
    assert_eq!(g.times(), [1.0, 0.5, 0.0]);
    let bad: TimeGrid = parse("kind = \"list\"\ntimes = [0.0, 0.5, 1.0]").unwrap();
    assert!(bad.validate().is_err(), "ascending grids are rejected");
    assert!(parse::<TimeGrid>("kind = \"uniform\"\nstep = 4").is_err());
    let d: Diffusion = parse("kind = \"sigma\"\nscale = 1.5").unwrap();
    assert_eq!(d, Diffusion::Sigma(DiffusionScale { scale: 1.5 }));
    assert_eq!(d.g(0.5), 0.75);
}
