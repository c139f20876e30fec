//! An objective that owns a trainable parameter: the trainer optimises it with the model,
//! checkpoints it (`objective.safetensors`, its AdamW moments under `m.objective.*`) and resumes it
//! exactly, with no change to the loop. The test objective is flow matching with a learned
//! homoscedastic weighting (Kendall et al. 2018), the scalar form of sCM's learned weighting:
//! L(s) = exp(−s)·L_fm + s, whose gradient in s is 1 − exp(−s)·L_fm.
use flowmap_experiments::config::load_config;
use flowmap_experiments::run::checkpoint::CheckpointDir;
use flowmap_experiments::train::trainer::Trainer;
use flowmap_experiments::train::{Outcome, Resume, TrainOptions};
use flowmap_objectives::{Batch, FlowMatching, FlowMatchingConfig, Loss, Nets, Objective};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const N: u64 = 10;
const K: u64 = 4;

// tch's global generator is shared by the test threads of this binary: one trainer at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct LearnedWeighting {
    inner: FlowMatching,
    log_scale: Option<Tensor>,
}

impl Objective for LearnedWeighting {
    fn init_params(&mut self, root: &tch::nn::Path) -> anyhow::Result<()> {
        self.log_scale = Some(root.zeros("log_scale", &[]));
        Ok(())
    }
    fn loss(&self, nets: Nets<'_>, batch: &Batch, step: u64) -> Loss {
        let s = self.log_scale.as_ref().expect("init_params was called");
        let fm = self.inner.loss(nets, batch, step);
        let value = (-s).exp() * &fm.value + s;
        // Metrics are read after the update: log a copy, not a view of the parameter.
        Loss { value, metrics: vec![("fm_loss", fm.value.detach()), ("log_scale", s.detach().copy())] }
    }
}

fn objective() -> Box<dyn Objective> {
    Box::new(LearnedWeighting { inner: FlowMatchingConfig::default().build().unwrap(), log_scale: None })
}

fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

/// Trains the tiny config with the test objective into `dir`, at most `max` steps this call.
fn train(dir: &Path, max: Option<u64>) -> (Outcome, Vec<(String, Tensor)>) {
    let overrides = [format!("run.steps={N}"), "run.log_every=1".into(), "run.checkpoint_every=0".into(), "run.keep_checkpoints=1".into(), "optimizer.lr=0.01".into()];
    let (cfg, table) = load_config(&config_path(), &overrides).unwrap();
    let opts = TrainOptions { run_dir: Some(dir.to_path_buf()), resume: Resume::Auto, max_steps_this_call: max, ..Default::default() };
    let trainer = Trainer::open_with_objective(&cfg, &table, &opts, objective()).unwrap();
    let params = trainer.objective_params();
    assert_eq!(params.len(), 1, "the objective owns one parameter");
    let summary = trainer.run().unwrap();
    (summary.outcome, params)
}

fn checkpoint(dir: &Path, part: &str) -> BTreeMap<String, Tensor> {
    CheckpointDir::new(dir.join("checkpoints"), 1).latest().unwrap().unwrap().tensors(part).unwrap()
}

fn metric(dir: &Path, name: &str) -> Vec<f64> {
    flowmap_experiments::train::metrics::read(&dir.join("metrics.jsonl")).unwrap().iter().map(|r| r[name].as_f64().unwrap()).collect()
}

#[test]
fn an_objective_parameter_is_optimised_saved_and_resumed_exactly() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));

    // Optimised: the parameter the trainer holds moves, in the direction its gradient says.
    let (outcome, params) = train(&straight, None);
    assert_eq!(outcome, Outcome::Finished);
    let live = params[0].1.double_value(&[]);
    let saved = checkpoint(&straight, "objective");
    assert_eq!(saved.keys().collect::<Vec<_>>(), vec!["log_scale"]);
    assert_eq!(saved["log_scale"].double_value(&[]), live, "the checkpoint holds the trained value");
    let fm_first = metric(&straight, "fm_loss")[0];
    let logged = metric(&straight, "log_scale");
    assert_eq!(logged[0], 0.0, "the loss of step 0 uses the initial value");
    // dL/ds = 1 − exp(−s)·L_fm: s rises while L_fm > exp(s), falls otherwise; AdamW moves it by
    // about lr = 0.01 per step while the sign holds.
    let expected_sign = (fm_first - 1.0).signum();
    assert!(live * expected_sign > 0.5 * 0.01 * (N as f64 - 1.0) * 0.5, "log_scale = {live} after {N} steps, first fm loss {fm_first}");
    let optim = checkpoint(&straight, "optim");
    assert!(optim.contains_key("m.objective.log_scale") && optim.contains_key("v.objective.log_scale"), "AdamW moments of the parameter are saved: {:?}", optim.keys().filter(|k| k.contains("objective")).collect::<Vec<_>>());
    let model = checkpoint(&straight, "model");
    let model_moments: Vec<&str> = optim.keys().filter_map(|k| k.strip_prefix("m.")).filter(|k| !k.starts_with("objective.")).collect();
    assert!(model_moments.len() > 1 && model_moments.iter().all(|k| model.contains_key(*k)), "the model's moments keep their names (checkpoints of older runs still resume)");

    // Resumed exactly: K steps, a new trainer, the rest.
    let (outcome, _) = train(&resumed, Some(K));
    assert_eq!(outcome, Outcome::Interrupted);
    assert_eq!(CheckpointDir::new(resumed.join("checkpoints"), 1).latest().unwrap().unwrap().step, K);
    let (outcome, params) = train(&resumed, None);
    assert_eq!(outcome, Outcome::Finished);
    assert_eq!(params[0].1.double_value(&[]), live, "resumed parameter equals the straight run's");
    for part in ["model", "ema", "optim", "objective"] {
        let (a, b) = (checkpoint(&straight, part), checkpoint(&resumed, part));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{part}");
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{part}: `{k}` differs after resume");
        }
    }
    assert_eq!(metric(&straight, "loss"), metric(&resumed, "loss"), "loss sequences differ");
    assert_eq!(metric(&straight, "log_scale"), metric(&resumed, "log_scale"));
}

/// Trains the tiny config with sCT (`kind = "scm_training"`, its learned weighting on, the
/// tangent warm-up short so the JVP term matters) into `dir`, at most `max` steps this call.
fn train_scm(dir: &Path, max: Option<u64>) -> (Outcome, Vec<(String, Tensor)>) {
    let overrides = [
        format!("run.steps={N}"),
        "run.log_every=1".into(),
        "run.checkpoint_every=0".into(),
        "run.keep_checkpoints=1".into(),
        "optimizer.lr=0.01".into(),
        "objective.kind=\"scm_training\"".into(),
        "objective.tangent_warmup_steps=2".into(),
        "sampling.rule=\"trig_flow\"".into(),
    ];
    let (cfg, table) = load_config(&config_path(), &overrides).unwrap();
    let opts = TrainOptions { run_dir: Some(dir.to_path_buf()), resume: Resume::Auto, max_steps_this_call: max, ..Default::default() };
    let trainer = Trainer::open(&cfg, &table, &opts).unwrap();
    let params = trainer.objective_params();
    let summary = trainer.run().unwrap();
    (summary.outcome, params)
}

#[test]
fn scm_weighting_parameters_get_gradients_and_are_saved_and_resumed_exactly() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));
    let (outcome, params) = train_scm(&straight, None);
    assert_eq!(outcome, Outcome::Finished);
    let names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, vec!["weighting.bias", "weighting.weight"], "sCM's log-variance head");
    // Zero-initialised; after N steps every entry has moved (each got a gradient: the bias through
    // 1 − prior·e^{−u}·L, every weight through its Fourier feature).
    let saved = checkpoint(&straight, "objective");
    for (name, live) in &params {
        assert!(saved[name.as_str()].equal(live), "{name}: the checkpoint holds the trained value");
        let smallest = live.abs().min().double_value(&[]);
        println!("sCM {name}: {:?} entries, smallest |value| after {N} steps {smallest:.3e}", live.size());
        assert!(smallest > 1e-4, "{name} did not move from 0 (no gradient?)");
    }
    let optim = checkpoint(&straight, "optim");
    assert!(optim.contains_key("m.objective.weighting.weight") && optim.contains_key("v.objective.weighting.bias"));
    let logvar = metric(&straight, "scm_logvar");
    assert_eq!(logvar[0], 0.0, "step 0 uses u = 0");
    assert!(logvar[N as usize - 1] != 0.0);

    let (outcome, _) = train_scm(&resumed, Some(K));
    assert_eq!(outcome, Outcome::Interrupted);
    let (outcome, _) = train_scm(&resumed, None);
    assert_eq!(outcome, Outcome::Finished);
    for part in ["model", "ema", "optim", "objective"] {
        let (a, b) = (checkpoint(&straight, part), checkpoint(&resumed, part));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{part}");
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{part}: `{k}` differs after resume");
        }
    }
    assert_eq!(metric(&straight, "loss"), metric(&resumed, "loss"), "loss sequences differ");
    assert_eq!(metric(&straight, "scm_logvar"), metric(&resumed, "scm_logvar"));
}
