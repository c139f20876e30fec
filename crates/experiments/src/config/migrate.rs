//! Experiment files written in an older form, brought to the current one.
//!
//! One migration so far: `[data]` became a table tagged by `kind` (issue 11). The old flat table
//! named the data set with `dataset = "mnist"` and allowed `split = "train"` beside an image folder
//! or latents; the new one says `kind = "mnist"` and each kind takes only its own keys.
//!
//! [`migrate`] rewrites a parsed table and says what it changed. It is used by
//! `flowmap migrate-config FILE...` ([`migrate_file`], which keeps comments and writes a `.bak`),
//! and when an existing run directory's `config.toml` is read (old runs keep sampling, evaluating
//! and resuming; the migration is not a config change). Loading an experiment file in the old form
//! is an error that names the keys and this command ([`refuse_old`]).
use anyhow::{bail, Context, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Kinds that read all of `data.path` (an old `split = "train"` beside them meant nothing).
const NO_SPLIT: &[&str] = &["image_folder", "latents"];

/// One edit made by [`migrate`]; keys are dotted paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `from = value` became `to = value`.
    Renamed { from: String, to: String, value: String },
    /// `key = value` was dropped: `why`.
    Removed { key: String, value: String, why: &'static str },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Renamed { from, to, value } => write!(f, "`{from} = {value}` -> `{to} = {value}`"),
            Change::Removed { key, value, why } => write!(f, "`{key} = {value}` removed ({why})"),
        }
    }
}

/// The table in the current form and the edits that got it there (none: it already was).
/// Errors only where the old and the new form are mixed in a way with no single reading.
pub fn migrate(mut table: Table) -> Result<(Table, Vec<Change>)> {
    let mut changes = vec![];
    if let Some(Value::Table(data)) = table.get_mut("data") {
        if let Some(dataset) = data.remove("dataset") {
            if let Some(kind) = data.get("kind") {
                bail!("[data] sets both `kind = {kind}` and `dataset = {dataset}`, the old name of `kind`: keep only `kind` (write `kind = {dataset}` to choose that data set)");
            }
            changes.push(Change::Renamed { from: "data.dataset".into(), to: "data.kind".into(), value: dataset.to_string() });
            data.insert("kind".into(), dataset);
        }
        let kind = data.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        if !changes.is_empty() && NO_SPLIT.contains(&kind.as_str()) && data.get("split").and_then(Value::as_str) == Some("train") {
            let value = data.remove("split").map(|v| v.to_string()).unwrap_or_default();
            changes.push(Change::Removed { key: "data.split".into(), value, why: "image_folder and latents read all of data.path" });
        }
    }
    Ok((table, changes))
}

/// Fails if the experiment table `file_table` (as read from `path`) or `resolved` (after the
/// `--set` overrides) is in an old form, with the exact edits and the command that makes them.
pub fn refuse_old(path: &Path, file_table: &Table, resolved: &Table) -> Result<()> {
    let (_, in_file) = migrate(file_table.clone()).with_context(|| path.display().to_string())?;
    if !in_file.is_empty() {
        bail!(
            "{}: [data] is in the old form (before `kind`). Change:\n  {}\nor run `flowmap migrate-config {}` to rewrite the file (the original is kept as {}).",
            path.display(),
            in_file.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("\n  "),
            path.display(),
            backup_path(path).display()
        );
    }
    let (_, in_sets) = migrate(resolved.clone()).with_context(|| format!("{} with its --set overrides", path.display()))?;
    if !in_sets.is_empty() {
        bail!("{}: a --set override uses the old [data] keys; write instead:\n  {}", path.display(), in_sets.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("\n  "));
    }
    Ok(())
}

/// Where [`migrate_file`] keeps the original: `FILE.bak` (`x.toml` -> `x.toml.bak`).
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".bak");
    path.with_file_name(name)
}

/// What [`migrate_file`] did to one file.
#[derive(Debug, Clone)]
pub struct FileMigration {
    pub path: PathBuf,
    /// Empty: the file was already current and was not touched.
    pub changes: Vec<Change>,
    /// The original's copy (when the file was rewritten).
    pub backup: Option<PathBuf>,
    /// False when the edits could not be made line by line and the file was written from the
    /// parsed table (its comments are then only in the backup).
    pub kept_comments: bool,
}

/// The text of a TOML file with its old-form keys rewritten in place (comments, order and
/// spacing kept), and the edits; falls back to re-serialising the table when an edit cannot be
/// made line by line (a `data = { ... }` inline table, dotted keys). Also returns whether the
/// comments were kept.
pub fn migrate_text(text: &str, origin: &str) -> Result<(String, Vec<Change>, bool)> {
    let table: Table = text.parse().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    let (migrated, changes) = migrate(table).with_context(|| origin.to_string())?;
    if changes.is_empty() {
        return Ok((text.to_string(), changes, true));
    }
    let mut out = String::with_capacity(text.len());
    let mut in_data = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            in_data = trimmed.strip_prefix("[data]").is_some_and(|rest| rest.trim().is_empty() || rest.trim_start().starts_with('#'));
        }
        let key = trimmed.split(['=', ' ', '\t']).next().unwrap_or_default();
        let indent = &line[..line.len() - trimmed.len()];
        if in_data && trimmed.contains('=') {
            let renamed = changes.iter().find_map(|c| match c {
                Change::Renamed { from, to, .. } if from.strip_prefix("data.") == Some(key) => to.strip_prefix("data."),
                _ => None,
            });
            if let Some(to) = renamed {
                out.push_str(indent);
                out.push_str(to);
                out.push_str(&trimmed[key.len()..]);
                continue;
            }
            if changes.iter().any(|c| matches!(c, Change::Removed { key: k, .. } if k.strip_prefix("data.") == Some(key))) {
                continue;
            }
        }
        out.push_str(line);
    }
    match out.parse::<Table>() {
        Ok(edited) if edited == migrated => Ok((out, changes, true)),
        _ => Ok((toml::to_string(&migrated).context("serialising the migrated config")?, changes, false)),
    }
}

/// `flowmap migrate-config FILE`: rewrites `path` in the current form (atomically), keeping the
/// original as `FILE.bak`; a file already current is left alone.
pub fn migrate_file(path: &Path) -> Result<FileMigration> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (new_text, changes, kept_comments) = migrate_text(&text, &path.display().to_string())?;
    if changes.is_empty() {
        return Ok(FileMigration { path: path.to_path_buf(), changes, backup: None, kept_comments });
    }
    let backup = backup_path(path);
    crate::run::atomic_file::write_atomic(&backup, text.as_bytes())?;
    crate::run::atomic_file::write_atomic(path, new_text.as_bytes())?;
    Ok(FileMigration { path: path.to_path_buf(), changes, backup: Some(backup), kept_comments })
}
