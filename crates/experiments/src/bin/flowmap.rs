//! The `flowmap` command: thin wrappers over flowmap-experiments.
use anyhow::{Context, Result};
use clap::Parser;
use flowmap_experiments::cli::{Cli, Command};
use flowmap_experiments::eval::{evaluator, fid, optimized_grid, sample_export};
use flowmap_experiments::report::table;
use flowmap_experiments::run::run_dir;
use flowmap_experiments::train;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&flag)).context("installing the signal handler")?;
    }
    Ok(flag)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())).with_writer(std::io::stderr).init();
    match Cli::parse().command {
        Command::Train { config, set, resume, run_dir, max_steps, dry_run, no_forward, allow_config_change } => {
            let (cfg, table) = flowmap_experiments::config::load_config(&config, &set)?;
            if dry_run {
                let report = flowmap_experiments::cli::dry_run::dry_run(&cfg, flowmap_experiments::cli::dry_run::DryRunOptions { forward: !no_forward })?;
                print!("{}", report.render());
                println!("{}: dry run passed", config.display());
                return Ok(());
            }
            let opts = train::TrainOptions { run_dir, resume, stop: stop_flag()?, max_steps_this_call: max_steps, inject_nan_at: vec![], allow_config_change };
            let s = train::train(&cfg, &table, &opts)?;
            println!("{} at step {} ({:?}); run directory {}", cfg.run.name, s.step, s.outcome, s.run_dir.display());
        }
        Command::Sample { run, steps, num, weights, cfg_scale, class, seed, out, grid } => {
            let mut cfg = read_run_config(&run)?;
            if grid.is_some() {
                cfg.sampling.optimized_grid = grid;
            }
            let req = sample_export::SampleRequest { steps, num, weights, cfg_scale, class, seed, out };
            let out = sample_export::sample_run(&run, &cfg, &req, cfg.run.device.device()?)?;
            println!("samples in {}", out.display());
        }
        Command::Fid { run, steps, num_samples, weights, tf, ref_npz, ref_images, seeds, grid } => {
            let mut cfg = read_run_config(&run)?;
            if grid.is_some() {
                cfg.sampling.optimized_grid = grid;
            }
            let mut ev = cfg.eval.clone().unwrap_or(evaluator::EvalConfig { num_samples: 1000, steps: None, reference: Default::default(), preprocess: Default::default(), kid: true, batch: 100, every: 0, seeds: 1 });
            if let Some(n) = num_samples {
                ev.num_samples = n;
            }
            if tf {
                ev.preprocess = fid::Preprocess::Tf;
            }
            if ref_npz.is_some() {
                ev.reference.npz = ref_npz;
            }
            if ref_images.is_some() {
                ev.reference.num_images = ref_images;
            }
            if let Some(n) = seeds {
                ev.seeds = n;
            }
            let steps = if steps.is_empty() { ev.steps.clone().unwrap_or(cfg.sampling.steps.clone()) } else { steps };
            let rows = evaluator::evaluate_run(&run, &cfg.eval_inputs()?, &ev, weights, &steps, cfg.run.device.device()?)?;
            // Under a data-parallel launch rank 0 scores and prints; the other ranks have no rows.
            if !rows.is_empty() {
                println!("steps,eval_seed,fid,kid");
            }
            for r in rows {
                println!("{},{},{:.3},{}", r.steps, r.eval_seed, r.fid, r.kid.map(|k| format!("{k:.5}")).unwrap_or_default());
            }
        }
        Command::ExportSamples { run, steps, num, weights, cfg_scale, seed, shard_size, batch, out } => {
            let cfg = read_run_config(&run)?;
            let req = flowmap_experiments::eval::npz_export::ExportRequest { steps, num, weights, cfg_scale, seed, shard_size, batch, out };
            let files = flowmap_experiments::eval::npz_export::export_samples(&run, &cfg, &req, cfg.run.device.device()?)?;
            if flowmap_experiments::run::world::World::global(cfg.run.device.device()?)?.is_main() {
                for f in files {
                    println!("{}", f.display());
                }
            }
        }
        Command::Evaluate { samples, reference, inception_logits, preprocess, k, is_splits, batch, device, json } => {
            use flowmap_experiments::eval::adm;
            let settings = adm::AdmSettings { k, is_splits: is_splits.parse()?, chunk: batch };
            let metrics = adm::evaluate_files(&samples, &reference, inception_logits.as_deref(), preprocess.parse()?, &settings, device.device()?)?;
            // Under a data-parallel launch rank 0 scores and prints.
            if let Some(m) = metrics {
                print!("{}", m.render());
                if let Some(path) = json {
                    flowmap_experiments::run::atomic_file::write_atomic(&path, (serde_json::to_string_pretty(&m)? + "\n").as_bytes())?;
                }
            }
        }
        Command::ImportCheckpoint { checkpoint, source, key, allow_pickle, num_heads, out } => {
            let req = flowmap_experiments::cli::import_checkpoint::ImportRequest { checkpoint, source, key, allow_pickle, num_heads, out };
            let r = flowmap_experiments::cli::import_checkpoint::import_checkpoint(&req)?;
            println!("{}: {} tensors, {} parameters (key `{}`) → {}", r.checkpoint, r.tensors, r.parameters, r.key, req.out.display());
            for n in r.notes {
                println!("note: {n}");
            }
        }
        Command::ReflowPairs { teacher, count, steps, weights, batch, out } => {
            let cfg = read_run_config(&teacher)?;
            let out = out.unwrap_or_else(|| teacher.join("reflow_pairs.safetensors"));
            let req = flowmap_experiments::cli::reflow_pairs::PairsRequest { count, steps, batch, weights };
            flowmap_experiments::cli::reflow_pairs::make_pairs(&teacher, &cfg, &req, &out, cfg.run.device.device()?)?;
            println!("{}", out.display());
        }
        Command::OptimizeGrid { run, name, steps, rule, samples, reference_steps, sweeps, probes, weights } => {
            let cfg = read_run_config(&run)?;
            let req = optimized_grid::GridSearchRequest { name, steps, rule, samples, reference_steps, sweeps, probes, weights };
            let (path, file) = optimized_grid::optimize_run_grid(&run, &cfg, &req, cfg.run.device.device()?)?;
            println!("steps,times,held_out_error,held_out_start_error");
            for g in &file.grids {
                println!("{},{:?},{:.5e},{:.5e}", g.steps, g.times, g.held_out_error, g.held_out_start_error);
            }
            println!("grid file {}", path.display());
        }
        Command::Demo2d { out, seeds, steps, toy } => {
            let toys = if toy.is_empty() { flowmap_experiments::demo::toy_data::Toy::ALL.to_vec() } else { toy };
            anyhow::ensure!(seeds >= 1 && steps >= 1, "--seeds and --steps must be at least 1");
            let settings = flowmap_experiments::demo::toy::ToySettings { seeds, train_steps: steps, ..Default::default() };
            let report = flowmap_experiments::demo::run_2d(&toys, &settings, &out)?;
            println!("{}", report.markdown);
            for f in report.figures.iter().chain([&report.table, &report.csv]) {
                println!("{}", f.display());
            }
        }
        Command::Launch { nproc, master_port, args } => {
            flowmap_experiments::cli::launch::launch(&flowmap_experiments::cli::launch::LaunchRequest { nproc, master_port, args }, stop_flag()?)?;
        }
        Command::Plot { runs, out } => {
            let out = out.unwrap_or_else(|| run_dir::RunDir::new(&runs[0]).plots());
            for f in table::plot_runs(&runs, &out)? {
                println!("{}", f.display());
            }
        }
        Command::Table { spec, jobs } => {
            let report = table::run_table(&spec, stop_flag()?, jobs as usize)?;
            println!("{}", report.markdown);
            println!("table: {}\nplot: {}", report.markdown_path.display(), report.plot_png.display());
        }
        Command::Latents { source, layout, out, vae, vae_arch, image_size, dtype, no_flip, shard_size, batch, workers, device, max_shards } => {
            use flowmap_experiments::data::latents;
            let arch: flowmap_models::vae::VaeConfig = match &vae_arch {
                Some(p) => flowmap_experiments::config::overrides::load(p, &[])?.0,
                None => Default::default(),
            };
            let opts =
                latents::EncodeOptions { source, layout, out, image_size, dtype, flip: !no_flip, shard_size, batch, workers: workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)), max_new_shards: max_shards };
            // Before the VAE is loaded: bad arguments fail without any work.
            arch.validate()?;
            opts.validate(arch.downsample_factor())?;
            let section = flowmap_experiments::data::vae::VaeSection { weights: vae.map(|p| p.display().to_string()), arch };
            let device = device.device()?;
            let model = section.load(device)?;
            let shape = model.config().latent_shape(image_size as i64, image_size as i64).to_vec();
            let mut encode = |x: &tch::Tensor| -> Result<(tch::Tensor, tch::Tensor)> { Ok(model.encode_moments(&x.to_device(device))) };
            let r = latents::encode_folder(&opts, section.identity()?, shape, &mut encode)?;
            let per_s = r.encoded_images as f64 * if opts.flip { 2.0 } else { 1.0 } / r.seconds.max(1e-9);
            println!(
                "{}: {} latents in {} shards ({} encoded now, {} verified and skipped), {} unreadable files skipped; {} images encoded in {:.3} s ({per_s:.1} VAE encodes/s incl. flips, decoding included){}",
                opts.out.join(latents::MANIFEST).display(),
                r.manifest.num_rows(),
                r.manifest.shards.len(),
                r.encoded_shards,
                r.verified_shards,
                r.manifest.skipped.len(),
                r.encoded_images,
                r.seconds,
                if r.complete { "" } else { "; NOT complete: run the same command again to continue" }
            );
        }
        Command::MigrateConfig { files } => print!("{}", flowmap_experiments::cli::migrate_config::run(&files)?),
        Command::Doctor => print!("{}", flowmap_experiments::cli::doctor::report()?),
        Command::GpuCheck { section, out, work, quick, device, inception, train_seconds } => {
            let opts = flowmap_experiments::gpu_check::GpuCheckOptions { quick, device: device.device()?, work, inception, train_seconds };
            flowmap_experiments::gpu_check::run(section, &opts, &out)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}

fn read_run_config(run: &std::path::Path) -> Result<flowmap_experiments::config::ExperimentConfig> {
    let table = run_dir::read_config(run)?;
    flowmap_experiments::config::overrides::deserialize(&table, &run.join("config.toml").display().to_string())
}
