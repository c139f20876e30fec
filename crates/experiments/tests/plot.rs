//! Plots render to real PNG and SVG files from fid.csv and metrics.jsonl.
use flowmap_experiments::eval::fid::{append_fid_csv, FidRow};
use flowmap_experiments::report::plot::{fid_vs_nfe_from_runs, fid_vs_nfe_series, fid_vs_step, loss_curves, read_metric, PlotFiles};
use std::path::Path;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

fn row(step: u64, nfe: usize, fid: f64, weights: &str) -> FidRow {
    FidRow { train_step: step, nfe, cfg_scale: 1.0, weights: weights.into(), num_samples: 1000, ref_stats: "mnist-test-10000".into(), preprocess: "pytorch_fid".into(), fid, kid: None }
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
fn fid_vs_nfe_for_several_runs() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, rows: &[FidRow]| {
        let run = dir.path().join(name);
        append_fid_csv(&run.join("fid.csv"), rows).unwrap();
        run
    };
    let fm = write("flow_matching", &[row(500, 1, 300.0, "ema"), row(1000, 1, 250.0, "ema"), row(1000, 2, 120.0, "ema"), row(1000, 4, 40.0, "ema"), row(1000, 8, 15.0, "ema"), row(1000, 64, 5.0, "ema")]);
    let mf = write("mean_flow", &[row(1000, 1, 20.0, "ema"), row(1000, 2, 12.0, "ema"), row(1000, 4, 9.0, "ema"), row(1000, 1, 35.0, "online")]);
    let files = fid_vs_nfe_from_runs(&[fm, mf], &dir.path().join("plots/fid_vs_nfe")).unwrap();
    assert_eq!(files.png, dir.path().join("plots/fid_vs_nfe.png"));
    let texts = svg_texts(&check_files(&files));
    for name in ["flow_matching", "mean_flow (ema)", "mean_flow (online)", "FID vs number of steps", "sampling steps (NFE)"] {
        assert!(texts.iter().any(|t| t == name), "the SVG lacks `{name}`: {texts:?}");
    }
    // log₂ axis: every power of two from 1 to 64 labelled, nothing in between
    let x_ticks: Vec<&str> = texts.iter().map(|t| t.as_str()).skip_while(|t| *t != "1").take(7).collect();
    assert_eq!(x_ticks, ["1", "2", "4", "8", "16", "32", "64"], "{texts:?}");

    // Series logic: the run's latest train_step only; groups by weights.
    let s = fid_vs_nfe_series("fm", &[row(500, 1, 300.0, "ema"), row(1000, 1, 250.0, "ema"), row(1000, 2, 120.0, "ema")]);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].name, "fm");
    assert_eq!(s[0].points, vec![(1.0, 250.0), (2.0, 120.0)]);
}

#[test]
fn fid_vs_training_step() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<FidRow> = [1usize, 4].iter().flat_map(|&nfe| (1..=5).map(move |k| row(k * 1000, nfe, 200.0 / (k as f64 * nfe as f64), "ema"))).collect();
    let texts = svg_texts(&check_files(&fid_vs_step(&rows, &dir.path().join("fid_vs_step")).unwrap()));
    assert!(texts.contains(&"NFE 1".to_string()) && texts.contains(&"NFE 4".to_string()), "{texts:?}");
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
