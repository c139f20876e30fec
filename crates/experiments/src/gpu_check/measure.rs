//! Timing with CUDA synchronisation, peak CUDA memory, and out-of-memory handling for the GPU
//! check: the same protocol as the PyTorch reference (`python/flowmap_ref/bench.py`): reset the
//! allocator's peak, run the warm-up iterations, synchronise, time the timed iterations, synchronise.
use anyhow::Result;
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;
use tch::Device;

/// Waits for the device (a no-op on the CPU).
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// One timed measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Items per call (images, latents).
    pub batch: i64,
    pub warmup: usize,
    pub iters: usize,
    /// Mean wall-clock seconds of one call over the timed iterations.
    pub seconds: f64,
    /// The CUDA allocator's peak allocated / reserved bytes from before the warm-up to the end
    /// (None on the CPU).
    pub peak_allocated: Option<i64>,
    pub peak_reserved: Option<i64>,
}

impl Timing {
    pub fn per_second(&self) -> f64 {
        self.batch as f64 / self.seconds
    }

    pub fn to_json(&self) -> Value {
        let gb = |b: Option<i64>| b.map(|b| b as f64 / 1e9);
        json!({
            "batch": self.batch,
            "warmup": self.warmup,
            "iters": self.iters,
            "seconds_per_call": self.seconds,
            "items_per_s": self.per_second(),
            "peak_allocated_gb": gb(self.peak_allocated),
            "peak_reserved_gb": gb(self.peak_reserved),
        })
    }
}

/// How a measurement failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The CUDA allocator ran out of memory (the message of libtorch's error).
    OutOfMemory(String),
    Other(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::OutOfMemory(m) | Failure::Other(m) => m,
        }
    }
}

/// Runs `f`, turning a panic (tch's infallible ops panic on libtorch errors) or an error into a
/// [`Failure`]; an out-of-memory error is told apart by libtorch's message. CUDA caches are
/// emptied after a failure so the next attempt starts clean.
pub fn guarded<T>(f: impl FnOnce() -> Result<T>) -> std::result::Result<T, Failure> {
    let outcome = catch_unwind(AssertUnwindSafe(f));
    let message = match outcome {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panic without a message".into()),
    };
    let _ = flowmap_sys::cuda_empty_cache();
    if message.to_lowercase().contains("out of memory") {
        Err(Failure::OutOfMemory(first_line(&message)))
    } else {
        Err(Failure::Other(first_line(&message)))
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(400).collect()
}

/// Times `call` (one call processes `batch` items): `warmup` untimed calls, then `iters` timed
/// ones, with the device synchronised around the timed loop and the peak memory reset before the
/// warm-up.
pub fn time_calls(device: Device, batch: i64, (warmup, iters): (usize, usize), mut call: impl FnMut() -> Result<()>) -> Result<Timing> {
    sync(device);
    flowmap_sys::cuda_reset_peak_memory(device)?;
    for _ in 0..warmup {
        call()?;
    }
    sync(device);
    let iters = iters.max(1);
    let start = Instant::now();
    for _ in 0..iters {
        call()?;
    }
    sync(device);
    let seconds = start.elapsed().as_secs_f64() / iters as f64;
    let mem = flowmap_sys::cuda_memory(device)?;
    Ok(Timing { batch, warmup, iters, seconds, peak_allocated: mem.map(|m| m.peak_allocated), peak_reserved: mem.map(|m| m.peak_reserved) })
}

/// Measures at `batch`, halving it after each out-of-memory error down to `min_batch` (the
/// PyTorch reference does the same). Returns the JSON of the measurement (with the batches that
/// did not fit under `"oom_batches"`) or of the failure.
pub fn with_batch_fallback(batch: i64, min_batch: i64, mut measure: impl FnMut(i64) -> Result<Timing>) -> Value {
    let mut oom = Vec::new();
    let mut b = batch;
    loop {
        match guarded(|| measure(b)) {
            Ok(t) => {
                let mut v = t.to_json();
                v["oom_batches"] = json!(oom);
                return v;
            }
            Err(Failure::OutOfMemory(m)) if b / 2 >= min_batch.max(1) => {
                tracing::warn!("batch {b} ran out of memory ({m}); trying {}", b / 2);
                oom.push(b);
                b /= 2;
            }
            Err(f) => {
                oom.push(b);
                return json!({ "error": f.message(), "out_of_memory": matches!(f, Failure::OutOfMemory(_)), "oom_batches": oom });
            }
        }
    }
}

/// The JSON of a measurement that may have failed.
pub fn outcome_json(r: std::result::Result<Timing, Failure>) -> Value {
    match r {
        Ok(t) => t.to_json(),
        Err(f) => json!({ "error": f.message(), "out_of_memory": matches!(f, Failure::OutOfMemory(_)) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_classifies_panics_and_errors() {
        assert_eq!(guarded(|| Ok(3)), Ok(3));
        let oom = guarded::<()>(|| panic!("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"));
        assert_eq!(oom, Err(Failure::OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB".into())));
        let other = guarded::<()>(|| anyhow::bail!("shape mismatch"));
        assert_eq!(other, Err(Failure::Other("shape mismatch".into())));
    }

    #[test]
    fn batch_fallback_halves_on_out_of_memory_only() {
        let v = with_batch_fallback(16, 4, |b| {
            if b > 4 {
                panic!("CUDA out of memory (batch {b})");
            }
            Ok(Timing { batch: b, warmup: 0, iters: 1, seconds: 0.5, peak_allocated: None, peak_reserved: None })
        });
        assert_eq!(v["batch"], json!(4));
        assert_eq!(v["oom_batches"], json!([16, 8]));
        assert_eq!(v["items_per_s"], json!(8.0));
        let failed = with_batch_fallback(16, 4, |_| anyhow::bail!("no kernel"));
        assert_eq!(failed["error"], json!("no kernel"));
        assert_eq!(failed["out_of_memory"], json!(false));
    }
}
