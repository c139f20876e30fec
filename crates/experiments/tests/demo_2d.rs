//! The demo's 2-D part (`flowmap demo-2d`): one-step Shortcut and MeanFlow samples beat one-step
//! flow matching on a ring of Gaussians by more than the spread over training seeds, and the
//! command's files are written.
use flowmap_experiments::demo::toy::{self, ToySettings};
use flowmap_experiments::demo::toy_data::{sliced_w1, Toy};
use flowmap_experiments::eval::sampling::SamplingConfig;

/// Mean and sample standard deviation.
fn spread(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

#[test]
fn one_step_shortcut_and_mean_flow_beat_one_step_flow_matching_by_more_than_the_seed_spread() {
    tch::set_num_threads(1);
    let settings = ToySettings { train_steps: 600, seeds: 3, eval_points: 1024, ..Default::default() };
    let toy = Toy::Ring;
    tch::manual_seed(-7);
    let held_out = toy.sample(settings.eval_points);
    let mut one_step = Vec::new();
    for method in toy::methods(settings.train_steps).unwrap().into_iter().filter(|m| m.label != "consistency training") {
        let sampler = toml::from_str::<SamplingConfig>("").unwrap().resolve(&method.objective).unwrap();
        let w: Vec<f64> = (0..settings.seeds)
            .map(|seed| {
                let net = toy::train(toy, &method, &settings, seed).unwrap();
                tch::manual_seed(1_000 + seed as i64);
                let x = tch::no_grad(|| toy::sample(&sampler, &net, settings.eval_points, 1));
                sliced_w1(&x, &held_out, 128)
            })
            .collect();
        let (mean, sd) = spread(&w);
        eprintln!("{}: one-step sliced W1 {mean:.3} ± {sd:.3} over {} seeds {w:?}", method.label, settings.seeds);
        one_step.push((method.label, mean, sd));
    }
    let (_, fm, fm_sd) = one_step[0];
    for &(label, mean, sd) in &one_step[1..] {
        let margin = fm - mean;
        assert!(margin > 3.0 * (fm_sd + sd), "{label}: one-step W1 {mean:.3} ± {sd:.3} vs flow matching {fm:.3} ± {fm_sd:.3}: margin {margin:.3} is within 3× the seed spread");
        assert!(mean < 0.5 * fm, "{label}: one-step W1 {mean:.3} should be well below flow matching's {fm:.3}");
    }
}

#[test]
fn demo_2d_writes_its_figure_and_tables() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let settings = ToySettings { train_steps: 20, seeds: 2, eval_points: 256, step_counts: vec![1, 2], ..Default::default() };
    let report = flowmap_experiments::demo::run_2d(&[Toy::Moons], &settings, dir.path()).unwrap();
    assert_eq!(report.figures, vec![dir.path().join("moons.png")]);
    let png = image::open(&report.figures[0]).unwrap();
    assert_eq!((png.width(), png.height()), (150 + 2 * 190, 30 + 4 * 190), "2 step counts × 4 methods");
    // 4 methods × 2 seeds × 2 step counts, plus the held-out data's own score.
    assert_eq!(report.scores.len(), 4 * 2 * 2 + 1);
    let csv = std::fs::read_to_string(&report.csv).unwrap();
    assert_eq!(csv.lines().count(), 1 + report.scores.len());
    let md = std::fs::read_to_string(&report.table).unwrap();
    for method in ["flow matching", "Shortcut", "MeanFlow", "consistency training"] {
        assert!(md.contains(&format!("| {method} |")), "{md}");
    }
    assert!(md.contains(" ± "), "{md}");
}
