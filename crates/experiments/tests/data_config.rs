//! The `[data]` table tagged by `kind` (issue 11): keys of another kind are refused by serde naming
//! the key; files in the old form (`dataset = "mnist"`) are refused with the exact edits and the
//! `flowmap migrate-config` command, which rewrites them into the hand-written new form; and run
//! directories whose config.toml is in the old form still sample and resume.
use flowmap_experiments::config::load_config;
use flowmap_experiments::config::migrate::{migrate, migrate_text, Change};
use flowmap_experiments::data::config::{DataConfig, DataSet};
mod cli_support;
use cli_support::{flowmap, flowmap_ok as ok};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/tiny_cpu.toml")
}

/// tiny_cpu.toml as it was written before `kind`.
fn old_tiny_text() -> String {
    let text = std::fs::read_to_string(tiny()).unwrap();
    let old = text.replace("[data]\nkind = \"mnist\"", "[data]\ndataset = \"mnist\"");
    assert_ne!(old, text, "tiny_cpu.toml no longer starts its [data] with kind = \"mnist\"");
    old
}

fn err(path: &Path, sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    format!("{:#}", load_config(path, &sets).expect_err("the config loaded"))
}

#[test]
fn the_new_form_reads_each_kind_with_its_defaults() {
    let (cfg, _) = load_config(&tiny(), &[]).unwrap();
    assert_eq!(cfg.data.data_set(), DataSet::Mnist);
    assert_eq!((cfg.data.num_classes(), cfg.data.sample_shape(), cfg.data.limit()), (10, vec![1, 32, 32], Some(256)));
    let folder: DataConfig = toml::from_str("kind = \"image_folder\"\nlayout = \"flat\"\nimage_size = 64").unwrap();
    let DataConfig::ImageFolder(f) = &folder else { panic!("{folder:?}") };
    assert_eq!((f.flip, f.prefetch, f.conditional, f.num_classes), (true, 2, false, None));
    assert_eq!((folder.num_classes(), folder.sample_shape()), (0, vec![3, 64, 64]));
    let latents: DataConfig = toml::from_str("kind = \"latents\"\nconditional = true\nnum_classes = 1000").unwrap();
    assert_eq!((latents.num_classes(), latents.sample_shape(), latents.name()), (1000, vec![4, 32, 32], "latents"));
    assert!(latents.latents().is_some() && folder.latents().is_none());
}

/// `data.image_size = 16` for MNIST: the padded 32×32 digits average-pooled 2× (pixel (i, j) is
/// the mean of the 2×2 block at (2i, 2j)); other sizes and a model of another size are refused
/// naming the key.
#[test]
fn builtin_image_size_pools_the_padded_digits() {
    let sets = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (small, _) = load_config(&tiny(), &sets(&["data.image_size=16", "model.input_size=16", "model.patch_size=2"])).unwrap();
    let (full, _) = load_config(&tiny(), &[]).unwrap();
    assert_eq!(small.data.sample_shape(), vec![1, 16, 16]);
    let (DataConfig::Mnist(s), DataConfig::Mnist(f)) = (&small.data, &full.data) else { panic!("tiny_cpu.toml is not mnist") };
    let (s, f) = (s.load(DataSet::Mnist, 10).unwrap().images, f.load(DataSet::Mnist, 10).unwrap().images);
    assert_eq!((s.size(), f.size()), (vec![256, 1, 16, 16], vec![256, 1, 32, 32]));
    let block = f.narrow(2, 14, 2).narrow(3, 16, 2).mean_dim([2i64, 3].as_slice(), false, tch::Kind::Float);
    let pooled = s.narrow(2, 7, 1).narrow(3, 8, 1).flatten(1, 3);
    assert!(pooled.allclose(&block, 1e-6, 1e-6, false));
    assert!(block.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
    let e = err(&tiny(), &["data.image_size=20"]);
    assert!(e.contains("data.image_size = 20") && e.contains("32, 16 or 8"), "{e}");
    let e = err(&tiny(), &["data.image_size=16"]);
    assert!(e.contains("[1, 16, 16]") && e.contains("[1, 32, 32]"), "{e}");
}

#[test]
fn keys_of_another_kind_are_refused_naming_the_key() {
    // tiny_cpu.toml is mnist with limit = 256: latents have no limit, image folders no split.
    for (sets, key) in [(&["data.layout=\"flat\""][..], "layout"), (&["data.workers=2"], "workers"), (&["data.kind=\"latents\"", "data.path=\"x\""], "limit"), (&["data.kind=\"image_folder\"", "data.split=\"test\""], "split")] {
        let e = err(&tiny(), sets);
        assert!(e.contains(&format!("unknown field `{key}`")), "--set {sets:?}: {e}");
        assert!(e.contains("tiny_cpu.toml") && e.contains("data"), "--set {sets:?}: {e}");
    }
    let e = err(&tiny(), &["data.kind=\"cifar\""]);
    assert!(e.contains("cifar") && e.contains("mnist"), "{e}");
}

#[test]
fn an_old_file_is_refused_with_the_edits_and_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.toml");
    std::fs::write(&old, old_tiny_text()).unwrap();
    let e = err(&old, &[]);
    assert!(e.contains("`data.dataset = \"mnist\"` -> `data.kind = \"mnist\"`"), "{e}");
    assert!(e.contains(&format!("flowmap migrate-config {}", old.display())), "{e}");
    assert!(e.contains(&format!("{}.bak", old.display())), "{e}");
    assert!(!e.contains("unknown field"), "serde's message instead of the migration hint: {e}");

    // The same through the binary: an error exit, no panic.
    let out = flowmap(&["train", old.to_str().unwrap(), "--dry-run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("flowmap migrate-config") && !stderr.contains("panicked"), "{stderr}");

    // An old key given with --set names the override and the new spelling.
    let e = err(&tiny(), &["data.dataset=\"fashion_mnist\""]);
    assert!(e.contains("--set") && e.contains("old name") && e.contains("`kind = \"fashion_mnist\"`"), "{e}");
}

#[test]
fn migrate_config_turns_an_old_file_into_the_hand_written_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny_cpu.toml");
    let old = old_tiny_text();
    std::fs::write(&path, &old).unwrap();
    let out = ok(&["migrate-config", path.to_str().unwrap()]);
    assert!(out.contains("`data.dataset = \"mnist\"` -> `data.kind = \"mnist\"`"), "{out}");
    assert!(out.contains("tiny_cpu.toml.bak"), "{out}");
    // Line by line: comments and order kept, so the file is exactly the hand-written one.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), std::fs::read_to_string(tiny()).unwrap());
    assert_eq!(std::fs::read_to_string(dir.path().join("tiny_cpu.toml.bak")).unwrap(), old);
    let (migrated, _) = load_config(&path, &[]).unwrap();
    let (written, _) = load_config(&tiny(), &[]).unwrap();
    assert_eq!(toml::Value::try_from(&migrated).unwrap(), toml::Value::try_from(&written).unwrap());
    assert_eq!(migrated.data, written.data);

    // A second call leaves the file (and its backup) alone.
    let again = ok(&["migrate-config", path.to_str().unwrap()]);
    assert!(again.contains("already current"), "{again}");
    assert_eq!(std::fs::read_to_string(dir.path().join("tiny_cpu.toml.bak")).unwrap(), old);

    // A missing file is an error naming it, after the other files were done.
    let missing = dir.path().join("missing.toml");
    let out = flowmap(&["migrate-config", path.to_str().unwrap(), missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn migration_edits_latents_and_falls_back_for_inline_tables() {
    // An old latents table with `split = "train"` (allowed then, meaningless): renamed and removed.
    let text = "[data]  # the data\ndataset = \"latents\"   # kept comment\nsplit = \"train\"\npath = \"/x\"\n\n[model]\nkind = \"dit\"\n";
    let (new, changes, kept) = migrate_text(text, "t.toml").unwrap();
    assert!(kept);
    assert_eq!(new, "[data]  # the data\nkind = \"latents\"   # kept comment\npath = \"/x\"\n\n[model]\nkind = \"dit\"\n");
    assert_eq!(changes.len(), 2);
    assert!(matches!(&changes[1], Change::Removed { key, .. } if key == "data.split"), "{changes:?}");
    let data: DataConfig = toml::from_str::<toml::Table>(&new).unwrap()["data"].clone().try_into().unwrap();
    assert_eq!(data.latents().unwrap().path.as_deref(), Some("/x"));

    // An inline table cannot be edited line by line: the table is written from the parsed form.
    let (new, changes, kept) = migrate_text("data = { dataset = \"mnist\", conditional = true }\n", "t.toml").unwrap();
    assert!(!kept && changes.len() == 1);
    let data: DataConfig = toml::from_str::<toml::Table>(&new).unwrap()["data"].clone().try_into().unwrap();
    assert_eq!((data.data_set(), data.conditional()), (DataSet::Mnist, true));

    // Both spellings at once have no single reading: an error naming both.
    let both: toml::Table = toml::from_str("[data]\ndataset = \"mnist\"\nkind = \"fashion_mnist\"\n").unwrap();
    let e = format!("{:#}", migrate(both).unwrap_err());
    assert!(e.contains("dataset") && e.contains("kind"), "{e}");
    // A current table is left as it is.
    let current: toml::Table = toml::from_str("[data]\nkind = \"latents\"\n").unwrap();
    assert_eq!(migrate(current.clone()).unwrap(), (current, vec![]));
}

#[test]
fn an_old_run_directory_still_samples_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (t, r) = (tiny(), run.to_str().unwrap().to_string());
    let sets = ["run.steps=4", "run.checkpoint_every=2", "run.sample_every=0", "run.log_every=1"];
    let train = |extra: &[&str], max_steps: Option<&str>| {
        let mut args = vec!["train", t.to_str().unwrap(), "--run-dir", &r];
        for s in sets.iter().chain(extra) {
            args.extend(["--set", s]);
        }
        if let Some(m) = max_steps {
            args.extend(["--max-steps", m]);
        }
        flowmap(&args)
    };
    let first = train(&[], Some("2"));
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // The run's config.toml as an older flowmap wrote it.
    let config = run.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert_eq!(text.matches("kind = \"mnist\"").count(), 1, "{text}");
    let old = text.replace("kind = \"mnist\"", "dataset = \"mnist\"");
    std::fs::write(&config, &old).unwrap();

    let samples = dir.path().join("samples");
    let out = flowmap(&["sample", "--run", &r, "--steps", "1", "--num", "2", "--out", samples.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("older config form") && stderr.contains("migrate-config"), "no migration warning: {stderr}");
    assert!(std::fs::read_dir(&samples).unwrap().count() > 0);

    // The migration is not a config change: a real change is refused naming only that key.
    let changed = train(&["optimizer.lr=0.002"], None);
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success());
    let listed = stderr.split_once("keys that change training:").and_then(|(_, rest)| rest.split_once("Restore")).map(|(keys, _)| keys.trim()).unwrap_or_default();
    assert_eq!(listed, "optimizer.lr: 0.001 -> 0.002", "{stderr}");
    // The same config resumes and finishes.
    let resumed = train(&[], None);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("at step 4"), "{}", String::from_utf8_lossy(&resumed.stdout));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), old, "resuming rewrote the run's config.toml");
}
