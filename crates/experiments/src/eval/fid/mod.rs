//! FID and KID with the Inception-v3 network from the data cache (methods.md §18, ecosystem.md §6).
//!
//! * [`Inception`]: images in [−1, 1] → (N, 2048) Float64 pool3 features, in the pytorch-fid
//!   convention by default or the TF one ([`Preprocess`]).
//! * [`FeatureStats`] / [`GaussianStats`] / [`frechet_distance`]: float64 statistics and distance.
//! * [`kernel_inception_distance`]: unbiased KID over subsets.
//! * [`inception_net`]: the network itself (pool3, the sFID layer and the logits in one pass);
//!   [`inception_score`], [`precision_recall`]: the other numbers of the ADM suite (`crate::eval::adm`).
//! * [`Reference`]: statistics of a data split (cached by [`stats_cache_key`]) or of an `.npz`.
//! * [`evaluate_steps`]: FID (and KID) at a list of step counts in one call, appended to `fid.csv`
//!   with the step count and the measured NFE.
use crate::run::world::World;
use anyhow::{bail, ensure, Context, Result};
use std::io::Write;
use std::path::Path;
use tch::Tensor;

pub mod inception;
pub mod inception_net;
pub mod inception_score;
pub mod kid;
pub mod precision_recall;
pub mod reference;
pub mod stats;

pub use inception::{quantize, Inception, Preprocess, FEATURE_DIM, INCEPTION_ENV, INCEPTION_SIZE};
pub use kid::{kernel_inception_distance, mmd2_unbiased, Kid, KidReference, KidSettings};
pub use reference::{cached_reference, default_cache_dir, stats_cache_key, tensor_identity, RefDataset, Reference, SplitSpec};
pub use stats::{frechet_distance, FeatureStats, GaussianStats, RootedStats};

/// Column names of `fid.csv`, in order (long format: one row per evaluation).
pub const FID_CSV_HEADER: [&str; 11] = ["train_step", "steps", "nfe", "cfg_scale", "weights", "num_samples", "ref_stats", "preprocess", "fid", "kid", "eval_seed"];

/// The header of `fid.csv` files written before the `eval_seed` column existed: their rows were
/// evaluated with seed 0, and an append rewrites such a file in the current format first.
pub const PRE_SEED_FID_CSV_HEADER: [&str; 10] = ["train_step", "steps", "nfe", "cfg_scale", "weights", "num_samples", "ref_stats", "preprocess", "fid", "kid"];

/// The header of `fid.csv` files written before the `steps` column existed. Their `nfe` column
/// held the number of sampling steps (not a count of network evaluations), so it is read as
/// `steps` with an unknown NFE, and an append rewrites such a file in the current format first.
pub const LEGACY_FID_CSV_HEADER: [&str; 9] = ["train_step", "nfe", "cfg_scale", "weights", "num_samples", "ref_stats", "preprocess", "fid", "kid"];

/// One evaluation: one row of `fid.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct FidRow {
    pub train_step: u64,
    /// Sampling steps (grid intervals).
    pub steps: usize,
    /// Network evaluations per sample, measured while sampling (Heun and guidance cost more than
    /// one per step); None for rows of a legacy file or a generator that does not count.
    pub nfe: Option<f64>,
    pub cfg_scale: f64,
    /// `ema` or `online`.
    pub weights: String,
    pub num_samples: usize,
    /// Name of the reference statistics ([`Reference::name`]).
    pub ref_stats: String,
    pub preprocess: String,
    pub fid: f64,
    /// KID mean over subsets; None when the reference has no features.
    pub kid: Option<f64>,
    /// Which evaluation seed drew the noise and labels (`[eval].seeds`); 0 is the run's own.
    pub eval_seed: u64,
}

/// What was sampled: the fixed columns of the rows one [`evaluate_steps`] call writes.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSetting {
    pub train_step: u64,
    pub cfg_scale: f64,
    pub weights: String,
    /// The evaluation seed the generator draws with (written to the rows).
    pub eval_seed: u64,
}

/// How many samples, in what chunks, and whether to compute KID.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSettings {
    /// per step count; state it next to the number (it is not FID-50k)
    pub num_samples: usize,
    pub generate_batch: usize,    // images per `generate` call
    pub kid: Option<KidSettings>, // None: FID only; KID also needs reference features
}

impl EvalSettings {
    pub fn new(num_samples: usize) -> Self {
        Self { num_samples, generate_batch: 256, kid: Some(KidSettings::default()) }
    }
}

/// One batch a FID generator returns: images in [−1, 1] (n, C, H, W) and, when the generator
/// counts them, the network evaluations per image that made them.
#[derive(Debug)]
pub struct Sampled {
    pub images: Tensor,
    pub nfe: Option<f64>,
}

impl From<Tensor> for Sampled {
    /// Images whose cost is not known.
    fn from(images: Tensor) -> Self {
        Self { images, nfe: None }
    }
}

/// FID and (optionally) KID of one sample set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub fid: f64,
    pub kid: Option<Kid>,
}

/// Scores (N, 2048) features against a reference. KID is computed when `kid` is Some and the
/// reference has features.
pub fn score_features(features: &Tensor, reference: &Reference, kid: Option<&KidSettings>) -> Result<Score> {
    let stats = FeatureStats::from_features(features)?.finish()?;
    let fid = stats.frechet_distance(&reference.stats)?;
    let kid = match (kid, &reference.features) {
        (Some(settings), Some(ref_features)) => Some(kernel_inception_distance(features, ref_features, settings)?),
        _ => None,
    };
    Ok(Score { fid, kid })
}

/// Scores images in [−1, 1] (N, C, H, W) against a reference (see [`score_features`]).
pub fn score_images(inception: &Inception, images: &Tensor, reference: &Reference, kid: Option<&KidSettings>) -> Result<Score> {
    check_convention(inception, reference)?;
    score_features(&inception.features(images)?, reference, kid)
}

fn check_convention(inception: &Inception, reference: &Reference) -> Result<()> {
    if let Some(p) = reference.preprocess {
        ensure!(p == inception.preprocess(), "reference `{}` was computed with the {p} convention but the Inception extractor uses {}", reference.name, inception.preprocess());
    }
    Ok(())
}

/// Evaluates FID (and KID, see [`score_features`]) at every step count in `step_counts`.
///
/// `generate(steps, chunk, n)` returns the n images of chunk `chunk` (n, C, H, W) in [−1, 1],
/// sampled with `steps` steps, as a tensor or as [`Sampled`] with the NFE it measured; chunk c
/// holds samples c·`settings.generate_batch` … and n ≤ `settings.generate_batch` (keep the seeds
/// and labels a function of the chunk). A row's `nfe` is the mean over its images (None unless
/// every call measured it).
///
/// Data-parallel: rank k of W generates chunks k, k + W, …, and the Inception features are
/// gathered on rank 0, which adds them to the statistics in chunk order, so W ranks give the
/// number one process gives in about 1/W of the time. Rank 0 must pass the `reference`; it scores,
/// appends each row to `csv` as soon as it is computed (the header is written to a new file and
/// checked on an existing one) and returns the rows in the order of `step_counts`. The other ranks
/// return no rows.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_steps<G, S>(inception: &Inception, reference: Option<&Reference>, world: &World, step_counts: &[usize], sample: &SampleSetting, settings: &EvalSettings, csv: Option<&Path>, mut generate: G) -> Result<Vec<FidRow>>
where
    G: FnMut(usize, usize, usize) -> Result<S>,
    S: Into<Sampled>,
{
    let reference = match (world.is_main(), reference) {
        (true, Some(r)) => {
            check_convention(inception, r)?;
            Some(r)
        }
        (true, None) => bail!("evaluate_steps: rank 0 needs the reference statistics"),
        (false, _) => None,
    };
    ensure!(settings.num_samples >= 2, "FID needs at least 2 samples, got {}", settings.num_samples);
    ensure!(settings.generate_batch >= 1, "generate_batch must be at least 1");
    let batch = settings.generate_batch;
    let chunks = settings.num_samples.div_ceil(batch);
    let mut rows = Vec::with_capacity(step_counts.len());
    // The reference side of KID is the same for every step count: prepared once.
    let kid_reference = match (&settings.kid, reference.and_then(|r| r.features.as_ref())) {
        (Some(kid), Some(ref_features)) => Some(KidReference::new(ref_features, settings.num_samples, kid)?),
        _ => None,
    };
    for &steps in step_counts {
        let start = std::time::Instant::now();
        // Keep the features only when KID will use them; FID needs just the running sums.
        let keep = kid_reference.is_some();
        let mut stats = FeatureStats::new(FEATURE_DIM);
        let mut kept = Vec::new();
        // Σ nfe·n over the chunks; None once a chunk does not count.
        let mut evaluations = Some(0.0);
        for round in (0..chunks).step_by(world.size()) {
            let chunk = round + world.rank();
            let n = match chunk < chunks {
                true => batch.min(settings.num_samples - chunk * batch),
                false => 0,
            };
            // (features padded to `batch` rows, [n, Σ nfe or −1]) of this rank's chunk.
            let (features, meta) = if n > 0 {
                let Sampled { images, nfe } = generate(steps, chunk, n).with_context(|| format!("generating {n} images with {steps} steps"))?.into();
                ensure!(images.dim() == 4 && images.size()[0] == n as i64, "generate({steps}, {chunk}, {n}) returned shape {:?}, expected ({n}, C, H, W)", images.size());
                let features = inception.features(&images)?;
                let meta = Tensor::from_slice(&[n as f64, nfe.map_or(-1.0, |v| v * n as f64)]).to_device(features.device());
                (features, meta)
            } else {
                let device = inception.device();
                (Tensor::zeros([0, FEATURE_DIM], (tch::Kind::Double, device)), Tensor::from_slice(&[0.0, 0.0]).to_device(device))
            };
            let padded = match world.size() {
                1 => features,
                _ => Tensor::cat(&[features.shallow_clone(), features.new_zeros([(batch - n) as i64, FEATURE_DIM], (features.kind(), features.device()))], 0),
            };
            let (all_features, all_meta) = (world.gather(&padded)?, world.gather(&meta)?);
            if !world.is_main() {
                continue;
            }
            for (f, m) in all_features.iter().zip(&all_meta) {
                let (n, nfe) = (m.double_value(&[0]) as i64, m.double_value(&[1]));
                if n == 0 {
                    continue;
                }
                let f = f.narrow(0, 0, n);
                evaluations = evaluations.zip((nfe >= 0.0).then_some(nfe)).map(|(sum, v)| sum + v);
                stats.update(&f)?;
                if keep {
                    kept.push(f);
                }
            }
        }
        let Some(reference) = reference else { continue };
        let fid = stats.finish()?.frechet_distance(&reference.stats)?;
        let kid = match &kid_reference {
            Some(r) => Some(r.kid(&Tensor::cat(&kept, 0))?),
            None => None,
        };
        let score = Score { fid, kid };
        let nfe = evaluations.map(|sum| sum / settings.num_samples as f64);
        tracing::info!(
            steps,
            nfe,
            fid = score.fid,
            kid = ?score.kid.map(|k| k.mean),
            kid_std = ?score.kid.map(|k| k.std),
            ranks = world.size(),
            seconds = start.elapsed().as_secs_f64(),
            "evaluated"
        );
        let row = FidRow {
            train_step: sample.train_step,
            steps,
            nfe,
            cfg_scale: sample.cfg_scale,
            weights: sample.weights.clone(),
            num_samples: settings.num_samples,
            ref_stats: reference.name.clone(),
            preprocess: inception.preprocess().name().to_string(),
            fid: score.fid,
            kid: score.kid.map(|k| k.mean),
            eval_seed: sample.eval_seed,
        };
        if let Some(path) = csv {
            append_fid_csv(path, std::slice::from_ref(&row))?;
        }
        rows.push(row);
    }
    Ok(rows)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Appends rows to a `fid.csv`, writing the header when the file is new or empty and refusing a
/// file whose header differs. A legacy file ([`LEGACY_FID_CSV_HEADER`]) is first rewritten in the
/// current format (its rows keep their values, with `steps` from the old `nfe` column and an empty
/// `nfe`). Concurrent writers (two `flowmap fid` on one run, an in-training evaluation) take turns
/// on `<path>.lock`, so the header is written once and rows never interleave.
pub fn append_fid_csv(path: &Path, rows: &[FidRow]) -> Result<()> {
    let _lock = crate::run::file_lock::FileLock::acquire(&path.with_extension("csv.lock"), &format!("appending to {}", path.display()))?;
    let header = FID_CSV_HEADER.join(",");
    let mut existing = std::fs::read_to_string(path).unwrap_or_default();
    if let Some(first) = existing.lines().next() {
        let older = [(LEGACY_FID_CSV_HEADER.join(","), "`steps` (their old `nfe` held the step count)"), (PRE_SEED_FID_CSV_HEADER.join(","), "`eval_seed` (0: they were evaluated with the run's seed)")];
        if let Some((_, what)) = older.iter().find(|(h, _)| first.trim_end() == h) {
            let old = read_fid_csv(path).with_context(|| format!("{} has an older header (no {what} column) and could not be read to upgrade it", path.display()))?;
            existing = format!("{header}\n{}", old.iter().map(fid_csv_line).collect::<String>());
            crate::run::atomic_file::write_atomic(path, existing.as_bytes()).with_context(|| format!("rewriting {} with the current columns", path.display()))?;
            tracing::info!("{}: rewrote {} older rows with the column {what}", path.display(), old.len());
        } else {
            ensure!(first.trim_end() == header, "{} has header `{first}`, expected `{header}`; not appending", path.display());
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut out = String::new();
    if existing.is_empty() {
        out.push_str(&header);
        out.push('\n');
    } else if !existing.ends_with('\n') {
        out.push('\n');
    }
    for r in rows {
        out.push_str(&fid_csv_line(r));
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    f.write_all(out.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One `fid.csv` record in [`FID_CSV_HEADER`] order, with its line break.
fn fid_csv_line(r: &FidRow) -> String {
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let fields =
        [r.train_step.to_string(), r.steps.to_string(), opt(r.nfe), r.cfg_scale.to_string(), csv_field(&r.weights), r.num_samples.to_string(), csv_field(&r.ref_stats), csv_field(&r.preprocess), r.fid.to_string(), opt(r.kid), r.eval_seed.to_string()];
    fields.join(",") + "\n"
}

/// Splits CSV text into records of fields (RFC 4180 quoting; no quoted line breaks needed here,
/// but they are handled).
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    ensure!(!quoted, "unterminated quoted field");
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records.retain(|r| !(r.len() == 1 && r[0].trim().is_empty()));
    Ok(records)
}

/// Reads a `fid.csv` by column name (extra columns are ignored; `kid` may be absent or empty).
pub fn read_fid_csv(path: &Path) -> Result<Vec<FidRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let records = parse_csv(&text).with_context(|| format!("parsing {}", path.display()))?;
    let Some((header, body)) = records.split_first() else {
        bail!("{} is empty", path.display());
    };
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let need = |name: &str| col(name).with_context(|| format!("{} has no `{name}` column", path.display()));
    let (i_step, i_cfg, i_w, i_n, i_ref, i_pre, i_fid) = (need("train_step")?, need("cfg_scale")?, need("weights")?, need("num_samples")?, need("ref_stats")?, need("preprocess")?, need("fid")?);
    // Legacy files (LEGACY_FID_CSV_HEADER) have no `steps` column and their `nfe` column holds the
    // step count: read it as `steps`, with the NFE unknown.
    let (i_steps, i_nfe) = match col("steps") {
        Some(i) => (i, col("nfe")),
        None => (need("nfe").with_context(|| format!("{} has neither a `steps` column nor a legacy `nfe` column", path.display()))?, None),
    };
    let (i_kid, i_seed) = (col("kid"), col("eval_seed"));
    body.iter()
        .enumerate()
        .map(|(line, r)| {
            let get = |i: usize| r.get(i).map(|s| s.trim()).with_context(|| format!("{} line {}: too few fields", path.display(), line + 2));
            let num = |i: usize| -> Result<f64> { get(i)?.parse::<f64>().with_context(|| format!("{} line {}: `{}` is not a number", path.display(), line + 2, r[i])) };
            let int = |i: usize| -> Result<u64> { get(i)?.parse::<u64>().with_context(|| format!("{} line {}: `{}` is not an integer", path.display(), line + 2, r[i])) };
            let optional = |i: Option<usize>| -> Result<Option<f64>> {
                match i.and_then(|i| r.get(i)).map(|s| s.trim()) {
                    None | Some("") => Ok(None),
                    Some(_) => Ok(Some(num(i.expect("checked"))?)),
                }
            };
            let kid = optional(i_kid)?;
            let eval_seed = match i_seed.and_then(|i| r.get(i)).map(|s| s.trim()) {
                None | Some("") => 0,
                Some(_) => int(i_seed.expect("checked"))?,
            };
            Ok(FidRow {
                train_step: int(i_step)?,
                steps: int(i_steps)? as usize,
                nfe: optional(i_nfe)?,
                cfg_scale: num(i_cfg)?,
                weights: get(i_w)?.to_string(),
                num_samples: int(i_n)? as usize,
                ref_stats: get(i_ref)?.to_string(),
                preprocess: get(i_pre)?.to_string(),
                fid: num(i_fid)?,
                kid,
                eval_seed,
            })
        })
        .collect()
}
