//! Documentation cannot drift from the CLI (issue 10): every `flowmap ...` command shown in the
//! README files (code blocks and inline code) and in the comments of every TOML under
//! experiments/ parses with the real clap definitions; every `flowmap train` command loads and
//! validates its config with its `--set` overrides, and runs as a dry run (model built, data
//! read, one forward pass) when its data is built in; every `flowmap table` spec loads and each of
//! its rows validates; every bare mention (`flowmap latents`) names a subcommand that exists.
use clap::{CommandFactory, Parser};
use flowmap_experiments::cli::dry_run::{dry_run, DryRunOptions};
use flowmap_experiments::cli::{Cli, Command};
use flowmap_experiments::config::load_config;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A documented command: where it was found and the text after `flowmap `.
#[derive(Debug, Clone)]
struct Documented {
    origin: String,
    text: String,
}

/// The text of `flowmap …` up to the end of the command: a `#` comment ends it, and in a TOML
/// comment (`in_comment`) also two spaces or ` : ` (prose after the command).
fn command_text(s: &str, in_comment: bool) -> String {
    let mut end = s.len();
    let stops: &[&str] = if in_comment { &[" #", "  ", " : "] } else { &[" #"] };
    for stop in stops {
        if let Some(i) = s.find(stop) {
            end = end.min(i);
        }
    }
    s[..end].trim().to_string()
}

/// Commands and bare mentions in a Markdown file: lines of fenced code blocks that start with
/// `flowmap `, and inline code spans (which may wrap lines) that start with `flowmap `.
fn from_markdown(path: &Path, commands: &mut Vec<Documented>, mentions: &mut Vec<Documented>) {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.strip_prefix(repo()).unwrap().display().to_string();
    let mut prose = String::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            prose.push('\n');
            continue;
        }
        if fenced {
            if let Some(rest) = line.trim().strip_prefix("flowmap ") {
                commands.push(Documented { origin: format!("{name}:{}", i + 1), text: command_text(rest, false) });
            }
            prose.push('\n');
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    // Inline code spans of the prose (single backticks; a span may continue on the next line).
    let parts: Vec<&str> = prose.split('`').collect();
    for (k, span) in parts.iter().enumerate().filter(|(k, _)| k % 2 == 1) {
        let line = parts[..k].iter().map(|p| p.matches('\n').count()).sum::<usize>() + 1;
        let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some(rest) = span.strip_prefix("flowmap ") {
            let d = Documented { origin: format!("{name}:{line} (inline)"), text: rest.to_string() };
            if rest.split_whitespace().count() > 1 {
                commands.push(d);
            } else {
                mentions.push(d);
            }
        }
    }
}

/// Commands in TOML comments: a comment line whose text is `flowmap …` or `Label: flowmap …`;
/// inline `` `flowmap sub` `` spans anywhere in comments are mentions.
fn from_toml(path: &Path, commands: &mut Vec<Documented>, mentions: &mut Vec<Documented>) {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.strip_prefix(repo()).unwrap().display().to_string();
    for (i, line) in text.lines().enumerate() {
        let origin = format!("{name}:{}", i + 1);
        let Some(comment) = line.find('#').map(|at| line[at + 1..].trim()) else { continue };
        if line.trim_start().starts_with('#') {
            let after_label = comment.split_once(": flowmap ").filter(|(label, _)| !label.contains('`')).map(|(_, rest)| rest);
            if let Some(rest) = comment.strip_prefix("flowmap ").or(after_label) {
                commands.push(Documented { origin: origin.clone(), text: command_text(rest, true) });
                continue;
            }
        }
        for span in comment.split('`').skip(1).step_by(2) {
            if let Some(rest) = span.strip_prefix("flowmap ") {
                mentions.push(Documented { origin: origin.clone(), text: rest.to_string() });
            }
        }
    }
}

fn tomls(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            tomls(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

/// Shell-like words: double/single quotes group, `$VAR` and `${VAR}` become a path naming the
/// variable, `[--optional args]` lose their brackets, and the README's placeholders become
/// concrete values.
fn words(text: &str) -> Vec<String> {
    let mut unbracketed = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("[--") {
        let Some(j) = rest[i..].find(']') else { break };
        unbracketed.push_str(&rest[..i]);
        unbracketed.push_str(&rest[i + 1..i + j]);
        rest = &rest[i + j + 1..];
    }
    unbracketed.push_str(rest);
    let (mut out, mut cur, mut quote, mut any) = (vec![], String::new(), None::<char>, false);
    let mut chars = unbracketed.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('"' | '\'', None) => (quote, any) = (Some(c), true),
            (q, Some(open)) if q == open => quote = None,
            ('$', q) if q != Some('\'') => {
                let braced = chars.peek() == Some(&'{');
                if braced {
                    chars.next();
                }
                let mut var = String::new();
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' {
                        var.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if braced {
                    assert_eq!(chars.next(), Some('}'), "unclosed ${{ in {text:?}");
                }
                cur.push_str(&format!("/tmp/flowmap-docs-env/{var}"));
                any = true;
            }
            (w, None) if w.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (c, _) => {
                cur.push(c);
                any = true;
            }
        }
    }
    assert!(quote.is_none(), "unclosed quote in {text:?}");
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out.into_iter()
        .map(|w| match w.as_str() {
            "CONFIG" => "experiments/tiny_cpu.toml".to_string(),
            "DIR" => "/tmp/flowmap-docs-dir".to_string(),
            "FILE" => "/tmp/flowmap-docs-file".to_string(),
            "..." => "runs/example".to_string(),
            _ => w,
        })
        .collect()
}

fn collect() -> (Vec<Documented>, Vec<Documented>) {
    let (mut commands, mut mentions) = (vec![], vec![]);
    for md in ["README.md", "experiments/paper/README.md"] {
        from_markdown(&repo().join(md), &mut commands, &mut mentions);
    }
    let mut files = vec![];
    tomls(&repo().join("experiments"), &mut files);
    files.sort();
    assert!(files.len() >= 60, "only {} TOML files under experiments/", files.len());
    for f in &files {
        from_toml(f, &mut commands, &mut mentions);
    }
    (commands, mentions)
}

#[test]
fn the_word_splitter_handles_quotes_variables_and_placeholders() {
    assert_eq!(
        words(r#"latents --source "$FLOWMAP_IMAGENET" --out "${FLOWMAP_LATENTS}/x" --vae FILE"#),
        ["latents", "--source", "/tmp/flowmap-docs-env/FLOWMAP_IMAGENET", "--out", "/tmp/flowmap-docs-env/FLOWMAP_LATENTS/x", "--vae", "/tmp/flowmap-docs-file"]
    );
    assert_eq!(words("sample --run r --num 64 [--cfg-scale 1.5] [--class 3]"), ["sample", "--run", "r", "--num", "64", "--cfg-scale", "1.5", "--class", "3"]);
    assert_eq!(words("train CONFIG --set 'a.b=[1, 2]'"), ["train", "experiments/tiny_cpu.toml", "--set", "a.b=[1, 2]"]);
    assert_eq!(command_text("train experiments/tiny_cpu.toml   (smoke configuration)", true), "train experiments/tiny_cpu.toml");
    assert_eq!(command_text("table spec.toml : Shortcut Models Table 1", true), "table spec.toml");
    assert_eq!(command_text("fid    --run r --steps 1  # FID", false), "fid    --run r --steps 1");
}

/// Every documented command parses with the CLI; every subcommand is shown in the README.
#[test]
fn every_documented_command_parses_with_the_cli() {
    let (commands, mentions) = collect();
    let mut failures = vec![];
    for d in &commands {
        let argv: Vec<String> = std::iter::once("flowmap".to_string()).chain(words(&d.text)).collect();
        if let Err(e) = Cli::try_parse_from(&argv) {
            failures.push(format!("{}: `flowmap {}`:\n{e}", d.origin, d.text));
        }
    }
    let cli = Cli::command();
    for m in &mentions {
        let sub = m.text.split_whitespace().next().unwrap_or("");
        if cli.find_subcommand(sub).is_none() {
            failures.push(format!("{}: `flowmap {}` names no subcommand", m.origin, m.text));
        }
    }
    assert!(failures.is_empty(), "{} documented commands do not parse:\n{}", failures.len(), failures.join("\n\n"));
    let readme: Vec<&Documented> = commands.iter().filter(|d| d.origin.starts_with("README.md")).collect();
    for sub in cli.get_subcommands().map(|s| s.get_name()) {
        assert!(readme.iter().any(|d| d.text.split_whitespace().next() == Some(sub)), "the README shows no `flowmap {sub}` command");
    }
    let count = |sub: &str| commands.iter().filter(|d| d.text.starts_with(&format!("{sub} "))).count();
    assert!(count("train") >= 60 && count("latents") >= 18 && count("reflow-pairs") >= 5 && count("table") >= 5, "too few commands found: {commands:#?}");
    assert!(mentions.iter().any(|m| m.text == "latents"), "inline mentions are found");
}

/// Every documented `flowmap train` command: its config loads and validates with its `--set`
/// overrides; with built-in data (MNIST, Fashion-MNIST) it runs as `--dry-run` (the model is
/// built, the data read, one forward pass unless the command says --no-forward). Paper configs
/// (latents that are not on this machine) and reflow configs (pairs made by an earlier run) are
/// loaded and validated only.
#[test]
fn every_documented_train_command_validates_and_dry_runs() {
    tch::set_num_threads(1);
    let t0 = std::time::Instant::now();
    let (commands, _) = collect();
    let train: Vec<&Documented> = commands.iter().filter(|d| d.text.starts_with("train ")).collect();
    // (validated, dry runs, failures) of one share of the commands; two shares on two threads.
    let check = |share: &[&Documented]| {
        let (mut validated, mut dry_runs, mut failures) = (0, 0, vec![]);
        for d in share {
            let argv: Vec<String> = std::iter::once("flowmap".to_string()).chain(words(&d.text)).collect();
            let Ok(Cli { command: Command::Train { config, set, no_forward, .. } }) = Cli::try_parse_from(&argv) else {
                failures.push(format!("{}: does not parse: {}", d.origin, d.text));
                continue;
            };
            let cfg = match load_config(&repo().join(config), &set) {
                Ok((cfg, _)) => cfg,
                Err(e) => {
                    failures.push(format!("{}: `flowmap {}`: {e:#}", d.origin, d.text));
                    continue;
                }
            };
            validated += 1;
            if cfg.data.is_builtin() && cfg.data.reflow_pairs().is_none() {
                match dry_run(&cfg, DryRunOptions { forward: !no_forward }) {
                    Ok(r) if r.parameters > 0 && r.data_len > 0 => dry_runs += 1,
                    Ok(r) => failures.push(format!("{}: dry run found nothing: {r:?}", d.origin)),
                    Err(e) => failures.push(format!("{}: `flowmap {} --dry-run`: {e:#}", d.origin, d.text)),
                }
            }
        }
        (validated, dry_runs, failures)
    };
    let half = train.len().div_ceil(2);
    let (a, b) = std::thread::scope(|s| {
        let first = s.spawn(|| check(&train[..half]));
        let second = check(&train[half..]);
        (first.join().unwrap(), second)
    });
    let (validated, dry_runs) = (a.0 + b.0, a.1 + b.1);
    let failures: Vec<String> = a.2.into_iter().chain(b.2).collect();
    assert!(failures.is_empty(), "{} documented train commands fail:\n{}", failures.len(), failures.join("\n\n"));
    assert!(validated >= 60 && dry_runs >= 45, "validated {validated}, dry runs {dry_runs}");
    eprintln!("{validated} train commands validated, {dry_runs} dry runs, in {:.1} s", t0.elapsed().as_secs_f64());
}

/// Every documented `flowmap table SPEC`: the spec loads, its `[eval]` validates, and every row's
/// config validates with the table's and the row's overrides.
#[test]
fn every_documented_table_spec_loads_and_its_rows_validate() {
    let (commands, _) = collect();
    let mut specs = 0;
    for d in commands.iter().filter(|d| d.text.starts_with("table ")) {
        let argv: Vec<String> = std::iter::once("flowmap".to_string()).chain(words(&d.text)).collect();
        let Ok(Cli { command: Command::Table { spec, .. } }) = Cli::try_parse_from(&argv) else { panic!("{}: {}", d.origin, d.text) };
        let spec = repo().join(spec);
        let s = flowmap_experiments::report::table::read_spec(&spec).unwrap_or_else(|e| panic!("{}: {e:#}", d.origin));
        s.eval.validate().unwrap_or_else(|e| panic!("{}: [eval]: {e:#}", d.origin));
        for row in &s.rows {
            let sets: Vec<String> = s.table.set.iter().chain(&row.set).cloned().collect();
            let config = spec.parent().unwrap().join(&row.config);
            load_config(&config, &sets).unwrap_or_else(|e| panic!("{}: row {:?}: {e:#}", d.origin, row.label));
        }
        specs += 1;
    }
    assert!(specs >= 5, "{specs} table commands");
}
