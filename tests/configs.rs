//! Every TOML file under experiments/ parses and validates (experiment files through the training
//! loader, table specs through the table loader, including each row's experiment), and typos in
//! any section are rejected with the key named.
use flowmap::experiments::{config, report::table};
use std::path::{Path, PathBuf};

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            toml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

fn experiments_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments")
}

#[test]
fn every_experiment_file_parses_and_validates() {
    let mut files = vec![];
    toml_files(&experiments_dir(), &mut files);
    assert!(files.len() >= 40, "expected the small-scale grid of configs, found {}", files.len());
    let mut failures = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let result = if text.lines().any(|l| l.trim() == "[table]") { table::read_spec(f).map(|_| ()) } else { config::load_config(f, &[]).map(|_| ()) };
        if let Err(e) = result {
            failures.push(format!("{}: {e:#}", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn typos_in_any_section_are_rejected_naming_the_key() {
    let f = experiments_dir().join("small/mnist/cond/mean_flow.toml");
    for (set, key) in [
        ("run.stepz=3", "stepz"),
        ("data.datset=mnist", "datset"),
        ("model.hiden_size=8", "hiden_size"),
        ("objective.equal_fractoin=0.5", "equal_fractoin"),
        ("optimizer.betas2=0.9", "betas2"),
        ("ema.decai=0.9", "decai"),
        ("sampling.rulle=euler", "rulle"),
        ("eval.num_sample=3", "num_sample"),
        ("model.kind=dit2", "dit2"),
    ] {
        let e = format!("{:#}", config::load_config(&f, &[set.to_string()]).unwrap_err());
        assert!(e.contains(key), "--set {set}: {e}");
        assert!(e.contains("mean_flow.toml"), "--set {set}: the file is not named: {e}");
    }
    // Cross-section checks: the model must embed exactly the data's classes.
    let e = format!("{:#}", config::load_config(&f, &["model.num_classes=3".into()]).unwrap_err());
    assert!(e.contains("model.num_classes = 3"), "{e}");
}
