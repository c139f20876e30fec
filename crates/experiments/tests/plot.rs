//! Plots render to real PNG and SVG files from fid.csv and metrics.jsonl.
use flowmap_experiments::eval::fid::{append_fid_csv, FidRow};
use flowmap_experiments::report::plot::{fid_vs_sampling_steps_from_runs, fid_vs_sampling_steps_series, fid_vs_step, loss_curves, nfe_note, read_metric, PlotFiles};
use std::path::Path;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

fn row(step: u64, steps: usize, fid: f64, weights: &str) -> FidRow {
    FidRow { train_step: step, steps, nfe: Some(steps as f64), cfg_scale: 1.0, weights: weights.into(), num_samples: 1000, ref_stats: "mnist-test-10000".into(), preprocess: "pytorch_fid".into(), fid, kid: None, eval_seed: 0 }
}

/// Checks the PNG decodes at 900x600 with more than one colour and returns the SVG text.
fn check_files(files: &PlotFiles) -> String {
    let bytes = std::fs::read(&files.png).unwrap();
    assert_eq!(bytes[..8], PNG_SIGNATURE, "{} is not a PNG", files.png.display());
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (900, 600));
    let pixels = &buf[..info.buffer_size()];
    let non_white = pixels.chunks(3).filter(|p| p != &[255, 255, 255]).count();
    assert!(non_white > 5_000, "the PNG is nearly blank ({non_white} non-white pixels)");
    let coloured = pixels.chunks(3).filter(|p| p[0].abs_diff(p[1]) > 60 || p[1].abs_diff(p[2]) > 60).count();
    assert!(coloured > 200, "no coloured lines drawn ({coloured} pixels)");
    let svg = std::fs::read_to_string(&files.svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "not an SVG document");
    svg
}

/// The contents of the SVG's <text> elements, trimmed.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string())).collect()
}

#[test]
fn fid_vs_sampling_steps_for_several_runs() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, rows: &[FidRow]| {
        let run = dir.path().join(name);
        append_fid_csv(&run.join("fid.csv"), rows).unwrap();
        run
    };
    let fm = write("flow_matching", &[row(500, 1, 300.0, "ema"), row(1000, 1, 250.0, "ema"), row(1000, 2, 120.0, "ema"), row(1000, 4, 40.0, "ema"), row(1000, 8, 15.0, "ema"), row(1000, 64, 5.0, "ema")]);
    let mf = write("mean_flow", &[row(1000, 1, 20.0, "ema"), row(1000, 2, 12.0, "ema"), row(1000, 4, 9.0, "ema"), row(1000, 1, 35.0, "online")]);
    // Heun with guidance: 4 evaluations per step, noted in the legend (the x axis stays steps).
    let heun = write("heun", &[FidRow { nfe: Some(4.0), ..row(1000, 1, 80.0, "ema") }, FidRow { nfe: Some(8.0), ..row(1000, 2, 30.0, "ema") }]);
    let files = fid_vs_sampling_steps_from_runs(&[fm, mf, heun], &dir.path().join("plots/fid_vs_steps")).unwrap();
    assert_eq!(files.png, dir.path().join("plots/fid_vs_steps.png"));
    let texts = svg_texts(&check_files(&files));
    for name in ["flow_matching", "mean_flow (ema)", "mean_flow (online)", "heun (NFE = 4×steps)", "FID vs number of sampling steps", "sampling steps"] {
        assert!(texts.iter().any(|t| t == name), "the SVG lacks `{name}`: {texts:?}");
    }
    // log₂ axis: every power of two from 1 to 64 labelled, nothing in between
    let x_ticks: Vec<&str> = texts.iter().map(|t| t.as_str()).skip_while(|t| *t != "1").take(7).collect();
    assert_eq!(x_ticks, ["1", "2", "4", "8", "16", "32", "64"], "{texts:?}");

    // Series logic: the run's latest train_step only; groups by weights.
    let s = fid_vs_sampling_steps_series("fm", &[row(500, 1, 300.0, "ema"), row(1000, 1, 250.0, "ema"), row(1000, 2, 120.0, "ema")]);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].name, "fm");
    assert_eq!(s[0].points, vec![(1.0, 250.0), (2.0, 120.0)]);
}

#[test]
fn the_nfe_note_says_how_the_cost_relates_to_the_steps() {
    assert_eq!(nfe_note(&[(1, Some(1.0)), (4, Some(4.0))]), None);
    assert_eq!(nfe_note(&[(1, None), (4, None)]), None, "legacy rows: NFE unknown");
    assert_eq!(nfe_note(&[(1, Some(2.0)), (4, Some(8.0))]).as_deref(), Some("NFE = 2×steps"));
    assert_eq!(nfe_note(&[(1, Some(1.0)), (2, Some(3.0)), (4, Some(7.0))]).as_deref(), Some("NFE 1, 3, 7"));
}

#[test]
fn legacy_fid_csv_reads_its_nfe_column_as_steps_and_is_upgraded_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fid.csv");
    std::fs::write(&path, "train_step,nfe,cfg_scale,weights,num_samples,ref_stats,preprocess,fid,kid\n100,1,1,ema,1000,mnist-test-10000,pytorch_fid,250.5,\n100,4,1,ema,1000,mnist-test-10000,pytorch_fid,60.25,0.01\n").unwrap();
    let old = flowmap_experiments::eval::fid::read_fid_csv(&path).unwrap();
    assert_eq!(old.iter().map(|r| (r.steps, r.nfe, r.fid)).collect::<Vec<_>>(), [(1, None, 250.5), (4, None, 60.25)]);
    assert_eq!(old[1].kid, Some(0.01));
    // The plot code draws them at their step counts.
    let s = fid_vs_sampling_steps_series("old", &old);
    assert_eq!((s[0].name.as_str(), s[0].points.clone()), ("old", vec![(1.0, 250.5), (4.0, 60.25)]));
    // Appending rewrites the file with the current header and keeps the old rows.
    append_fid_csv(&path, &[FidRow { nfe: Some(4.0), ..row(200, 2, 90.0, "ema") }]).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().next().unwrap(), "train_step,steps,nfe,cfg_scale,weights,num_samples,ref_stats,preprocess,fid,kid,eval_seed");
    let all = flowmap_experiments::eval::fid::read_fid_csv(&path).unwrap();
    assert_eq!(all[..2], old[..]);
    assert_eq!((all[2].steps, all[2].nfe, all[2].train_step), (2, Some(4.0), 200));
}

#[test]
fn fid_vs_training_step() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<FidRow> = [1usize, 4].iter().flat_map(|&steps| (1..=5).map(move |k| row(k * 1000, steps, 200.0 / (k as f64 * steps as f64), "ema"))).collect();
    let texts = svg_texts(&check_files(&fid_vs_step(&rows, &dir.path().join("fid_vs_step")).unwrap()));
    assert!(texts.contains(&"1 step".to_string()) && texts.contains(&"4 steps".to_string()), "{texts:?}");
}

#[test]
fn loss_curves_from_metrics_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, scale: f64| {
        let path = dir.path().join(name).join("metrics.jsonl");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut text = String::new();
        for step in 0..3000 {
            text.push_str(&format!("{{\"step\": {step}, \"loss\": {}, \"lr\": 0.0001}}\n", scale * (1.0 + 1.0 / (1.0 + step as f64 / 100.0))));
            if step % 500 == 0 {
                text.push_str(&format!("{{\"step\": {step}, \"fid\": 12.5}}\n"));
                // no loss: skipped
            }
        }
        text.push_str("{\"step\": 3000, \"lo"); // killed mid-write
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = write("fm", 1.0);
    let b = write("shortcut", 0.5);
    let points = read_metric(&a, "loss").unwrap();
    assert_eq!(points.len(), 3000);
    assert_eq!(points[0], (0.0, 2.0));
    let files = loss_curves(&[("fm".into(), a.clone()), ("shortcut".into(), b)], "loss", &dir.path().join("loss")).unwrap();
    let texts = svg_texts(&check_files(&files));
    for name in ["fm", "shortcut", "loss during training"] {
        assert!(texts.iter().any(|t| t == name), "the SVG lacks `{name}`: {texts:?}");
    }
    // A malformed line that is not the last one is an error, not silently skipped.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"step\": 0, \"loss\": 1}\nnot json\n{\"step\": 1, \"loss\": 1}\n").unwrap();
    let err = read_metric(&bad, "loss").unwrap_err();
    assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    assert!(loss_curves(&[("x".into(), bad)], "loss", Path::new("/nonexistent/x")).is_err());
}
