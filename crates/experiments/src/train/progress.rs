//! Progress: an indicatif bar when stderr is a terminal, plain periodic lines otherwise (Slurm
//! logs, CI). Shows step, loss, img/s and an ETA that counts only training time (not evaluation
//! or checkpoint pauses), starting at the resumed step.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    start_step: u64,
    train_time: Duration,
    last_tick: Instant,
    last_line: Instant,
    line_every: Duration,
}

impl Progress {
    pub fn new(start_step: u64, total: u64, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}").expect("template").progress_chars("=> "));
            b.set_prefix(label.to_string());
            b.set_position(start_step);
            b
        });
        Self { bar, total, start_step, train_time: Duration::ZERO, last_tick: Instant::now(), last_line: Instant::now(), line_every: Duration::from_secs(10) }
    }

    /// Excludes the time since the last tick from the ETA (call after evaluation or saving).
    pub fn pause_done(&mut self) {
        self.last_tick = Instant::now();
    }

    /// Seconds per step and ETA from training time only.
    fn eta(&self, step: u64) -> (f64, Duration) {
        let done = step.saturating_sub(self.start_step).max(1) as f64;
        let per = self.train_time.as_secs_f64() / done;
        (per, Duration::from_secs_f64(per * (self.total.saturating_sub(step)) as f64))
    }

    /// Called after every step; `loss` only when it was read (log steps).
    pub fn tick(&mut self, step: u64, loss: Option<f64>, img_per_s: Option<f64>) {
        let now = Instant::now();
        self.train_time += now - self.last_tick;
        self.last_tick = now;
        let (_, eta) = self.eta(step);
        let msg = format!("{}{}eta {}", loss.map(|l| format!("loss {l:.4} ")).unwrap_or_default(), img_per_s.map(|r| format!("{r:.0} img/s ")).unwrap_or_default(), fmt_duration(eta));
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                if loss.is_some() {
                    b.set_message(msg);
                }
            }
            None => {
                if loss.is_some() && (now - self.last_line >= self.line_every || step == self.total) {
                    self.last_line = now;
                    tracing::info!("step {step}/{} {msg}", self.total);
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
