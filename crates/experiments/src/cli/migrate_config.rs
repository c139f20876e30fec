//! `flowmap migrate-config FILE...`: rewrites experiment files (or a run directory's config.toml;
//! a directory means its config.toml) written in an older form ([`crate::config::migrate`]), keeps
//! each original as `FILE.bak`, reports what changed, and checks that each rewritten file loads.
use crate::config::migrate::migrate_file;
use anyhow::{bail, Result};
use std::fmt::Write as _;
use std::path::PathBuf;

/// Migrates every file; the report has one paragraph per file. Fails (after trying every file)
/// if a file cannot be read or migrated, or still does not load once migrated.
pub fn run(files: &[PathBuf]) -> Result<String> {
    let (mut report, mut failures) = (String::new(), vec![]);
    for given in files {
        let path = if given.is_dir() { given.join("config.toml") } else { given.clone() };
        let m = match migrate_file(&path) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{e:#}"));
                continue;
            }
        };
        if m.changes.is_empty() {
            let _ = writeln!(report, "{}: already current", path.display());
            continue;
        }
        let _ = writeln!(report, "{}: migrated (original kept as {})", path.display(), m.backup.as_ref().map(|b| b.display().to_string()).unwrap_or_default());
        for c in &m.changes {
            let _ = writeln!(report, "  {c}");
        }
        if !m.kept_comments {
            let _ = writeln!(report, "  (written from the parsed table: its comments and key order are only in the backup)");
        }
        if let Err(e) = crate::config::load_config(&path, &[]) {
            failures.push(format!("{}: migrated, but it still does not load: {e:#}", path.display()));
        }
    }
    if !failures.is_empty() {
        bail!("{report}{}", failures.join("\n"));
    }
    Ok(report)
}
