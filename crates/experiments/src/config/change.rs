//! Resuming a run with a config that differs from the one it was started with.
//!
//! A resume compares the new config with the run's `config.toml`, both with every default filled
//! in (a sampling rule or path left out is the objective's own). Keys that cannot change the trained weights (where logs and checkpoints go and how often,
//! threads, device, the `[eval]` section, the grid size) may differ freely. Any other difference is
//! refused with the list of keys, unless `--allow-config-change` is given; then the old file is
//! kept as `config.step_XXXXXXXX.toml`, the new one becomes `config.toml`, and the change is
//! appended to `config_changes.jsonl`.
use crate::config::ExperimentConfig;
use crate::run::run_dir::RunDir;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;

/// Dotted keys (or key prefixes, for whole sections) whose change does not change training.
const NEUTRAL: &[&str] = &["run.name", "run.out_dir", "run.log_every", "run.sample_every", "run.checkpoint_every", "run.keep_checkpoints", "run.threads", "run.device", "eval", "sampling.grid_images"];

/// One differing key; `None` where the key is absent on that side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".into());
        write!(f, "{}: {} -> {}", self.key, show(&self.old), show(&self.new))
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn flat(cfg: &ExperimentConfig) -> Result<BTreeMap<String, String>> {
    // `[sampling].rule`/`.path` left out mean the objective's own: compare what is used.
    let mut cfg = cfg.clone();
    let native = cfg.objective.default_sampler();
    cfg.sampling.rule.get_or_insert(native.rule);
    cfg.sampling.path.get_or_insert(native.path);
    let mut out = BTreeMap::new();
    flatten("", &toml::Value::try_from(&cfg).context("serialising the config")?, &mut out);
    Ok(out)
}

fn neutral(key: &str) -> bool {
    NEUTRAL.iter().any(|n| key == *n || key.strip_prefix(n).is_some_and(|rest| rest.starts_with('.')))
}

/// The keys (defaults filled in) whose values differ and that change what is trained.
pub fn differences(old: &ExperimentConfig, new: &ExperimentConfig) -> Result<Vec<Change>> {
    let (a, b) = (flat(old)?, flat(new)?);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    Ok(keys.into_iter().filter(|k| !neutral(k) && a.get(*k) != b.get(*k)).map(|k| Change { key: k.clone(), old: a.get(k).cloned(), new: b.get(k).cloned() }).collect())
}

/// Checks a resume at `step` of `run` with `cfg` (resolved `table`); see the module docs.
pub fn check_resume(run: &RunDir, cfg: &ExperimentConfig, table: &toml::Table, step: u64, allow: bool) -> Result<()> {
    let path = run.config();
    let old: Result<ExperimentConfig> = crate::run::run_dir::read_config(&run.root).and_then(|t| crate::config::overrides::deserialize(&t, &path.display().to_string()));
    let changes = match &old {
        Ok(old) => differences(old, cfg)?,
        Err(_) => vec![],
    };
    match (&old, changes.is_empty(), allow) {
        (Ok(_), true, _) => return Ok(()),
        (Err(e), _, false) => bail!("{}: cannot read the config this run was started with ({e:#}); resuming would not know what changed. Pass --allow-config-change to continue with the given config (recorded in {}).", run.root.display(), run.config_changes().display()),
        (Ok(_), false, false) => bail!(
            "{}: the config differs from the run's config.toml (the run is at step {step}) in keys that change training:\n  {}\nRestore those values, choose another run.name, or pass --allow-config-change to continue with the new ones (the change is recorded in {}).",
            run.root.display(),
            changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("\n  "),
            run.config_changes().display()
        ),
        _ => {}
    }
    for c in &changes {
        tracing::warn!("config change at step {step} (--allow-config-change): {c}");
    }
    // The record first, then the old file kept, then the new one: a kill at any point leaves the
    // change recorded (a repeated resume records it again) and never loses the old config.
    let had_config = path.exists();
    let before = run.root.join(format!("config.step_{step:08}.toml"));
    let record = serde_json::json!({
        "step": step,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "previous_config": if had_config { before.file_name().map(|n| n.to_string_lossy().into_owned()) } else { None },
        "unreadable_previous_config": old.as_ref().err().map(|e| format!("{e:#}")),
        "changes": changes.iter().map(|c| serde_json::json!({ "key": c.key, "old": c.old, "new": c.new })).collect::<Vec<_>>(),
    });
    let log = run.config_changes();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log).with_context(|| format!("opening {}", log.display()))?;
    f.write_all(format!("{record}\n").as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", log.display()))?;
    if had_config {
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        crate::run::atomic_file::write_atomic(&before, &text)?;
    }
    run.write_config(table)?;
    Ok(())
}
