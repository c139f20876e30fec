//! TOML experiment files with typed `--set a.b=c` overrides.
//!
//! The file is parsed into a `toml::Table`, each override edits the table at its dotted path, and
//! only then is the table deserialised, so an unknown key (from the file or from `--set`) fails on
//! `deny_unknown_fields` and a wrong type fails in serde, with the dotted path in the message.
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;
use toml::{Table, Value};

/// Reads a TOML file into a table; errors name the file (and toml gives line and column).
pub fn read_table(path: &Path) -> Result<Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    text.parse::<Table>().map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Parses the right-hand side of `key=value` as a TOML value (`3`, `1e-4`, `true`, `[0.9, 0.99]`,
/// `"text"`); anything that is not valid TOML is taken as a bare string (`kind=mean_flow`).
fn parse_value(text: &str) -> Value {
    let doc = format!("v = {text}");
    match doc.parse::<Table>() {
        Ok(mut t) => t.remove("v").expect("key v"),
        Err(_) => Value::String(text.to_string()),
    }
}

/// Applies one `a.b.c=value` override. Intermediate tables are created as needed; a path through
/// a non-table value is an error naming it.
pub fn apply_override(table: &mut Table, assignment: &str) -> Result<()> {
    let (path, value) = assignment.split_once('=').ok_or_else(|| anyhow!("--set {assignment:?}: expected key.path=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--set {assignment:?}: empty key in path {path:?}");
    }
    let mut node = table;
    for (i, key) in keys[..keys.len() - 1].iter().enumerate() {
        let entry = node.entry(key.to_string()).or_insert_with(|| Value::Table(Table::new()));
        node = entry.as_table_mut().ok_or_else(|| anyhow!("--set {assignment:?}: {} is not a table", keys[..=i].join(".")))?;
    }
    node.insert(keys[keys.len() - 1].to_string(), parse_value(value.trim()));
    Ok(())
}

/// Deserialises a table into `T`, naming the dotted path of the offending key on error.
pub fn deserialize<T: DeserializeOwned>(table: &Table, origin: &str) -> Result<T> {
    let text = toml::to_string(table).context("re-serialising the config")?;
    let de = toml::Deserializer::new(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.message().to_string();
        anyhow!("{origin}: key `{path}`: {msg}")
    })
}

/// File + overrides → `T`, plus the resolved table (saved with the run).
pub fn load<T: DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<(T, Table)> {
    let mut table = read_table(path)?;
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    Ok((deserialize(&table, &origin(path, overrides))?, table))
}

/// How errors name a file loaded with overrides: `path`, or `path (with --set a=1 b=2)`.
pub fn origin(path: &Path, overrides: &[String]) -> String {
    if overrides.is_empty() {
        path.display().to_string()
    } else {
        format!("{} (with --set {})", path.display(), overrides.join(" "))
    }
}
