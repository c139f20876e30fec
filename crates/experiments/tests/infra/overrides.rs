use flowmap_experiments::config::overrides::{apply_override, deserialize, load};
use serde::Deserialize;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Opt {
    lr: f64,
    betas: [f64; 2],
}
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Cfg {
    name: String,
    steps: u64,
    optimizer: Opt,
}

const TEXT: &str = "name = \"a\"\nsteps = 10\n[optimizer]\nlr = 1e-4\nbetas = [0.9, 0.99]\n";

#[test]
fn overrides_are_typed_and_applied_before_deserialising() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, TEXT).unwrap();
    let sets = vec!["steps=20".to_string(), "optimizer.betas=[0.5, 0.6]".into(), "name=bare_word".into()];
    let (cfg, table): (Cfg, _) = load(&path, &sets).unwrap();
    assert_eq!(cfg, Cfg { name: "bare_word".into(), steps: 20, optimizer: Opt { lr: 1e-4, betas: [0.5, 0.6] } });
    assert_eq!(table["steps"].as_integer(), Some(20));
}

#[test]
fn typos_and_wrong_types_name_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, TEXT.replace("lr =", "lrr =")).unwrap();
    let e = format!("{:#}", load::<Cfg>(&path, &[]).unwrap_err());
    assert!(e.contains("typo.toml") && e.contains("lrr"), "{e}");

    std::fs::write(&path, TEXT).unwrap();
    let e = format!("{:#}", load::<Cfg>(&path, &["optimizer.lrr=1".into()]).unwrap_err());
    assert!(e.contains("optimizer.lrr") || (e.contains("optimizer") && e.contains("lrr")), "{e}");
    let e = format!("{:#}", load::<Cfg>(&path, &["steps=many".into()]).unwrap_err());
    assert!(e.contains("steps"), "{e}");
    let e = format!("{:#}", load::<Cfg>(&path, &["name.x=1".into()]).unwrap_err());
    assert!(e.contains("name is not a table"), "{e}");
    let e = format!("{:#}", load::<Cfg>(&path, &["novalue".into()]).unwrap_err());
    assert!(e.contains("key.path=value"), "{e}");
    std::fs::write(&path, "name = \n").unwrap();
    let e = format!("{:#}", load::<Cfg>(&path, &[]).unwrap_err());
    assert!(e.contains("typo.toml"), "{e}");
}

#[test]
fn deserialize_reports_nested_paths() {
    let mut t: toml::Table = TEXT.parse().unwrap();
    apply_override(&mut t, "optimizer.betas=3").unwrap();
    let e = format!("{:#}", deserialize::<Cfg>(&t, "origin").unwrap_err());
    assert!(e.contains("optimizer.betas"), "{e}");
}
